"""Checkers for chapter 7's exercises: adapters of mixed ranks without padding, a pool's memory, a padded pool."""

from __future__ import annotations

from typing import Callable

import torch

from lora_edu.checks._core import CheckFailed, call_learner, expect_tensor, passed

__all__ = ["check_pad_pool", "check_pool_bytes", "check_ragged_delta"]


def _ragged(ranks: list[int], d_in: int, d_out: int, seed: int):
    """Adapters of the given ranks, each (A_i, B_i), and the same stacked without padding."""
    g = torch.Generator().manual_seed(seed)
    adapters = [(torch.randn(r, d_in, generator=g, dtype=torch.float64),
                 torch.randn(d_out, r, generator=g, dtype=torch.float64)) for r in ranks]
    starts = [sum(ranks[:i]) for i in range(len(ranks))]
    A_rows = torch.cat([a for a, _ in adapters])  # (sum of ranks, in)
    B_cols = torch.cat([b for _, b in adapters], dim=1)  # (out, sum of ranks)
    scaling = torch.rand(len(ranks), generator=g, dtype=torch.float64) + 0.5
    return adapters, A_rows, B_cols, starts, scaling


def _per_token(x, adapters, indices, scaling, pick=lambda i, token: i, scale=True):
    out = x.new_zeros(x.shape[0], adapters[0][1].shape[0])
    for token, i in enumerate(indices.tolist()):
        i = pick(i, token)
        if i is None:
            continue
        a, b = adapters[i]
        out[token] = (scaling[i] if scale else 1) * b @ (a @ x[token])
    return out


def _over_reach(x, A_rows, B_cols, starts, r_max, indices, scaling):
    """Every adapter read as r_max rows and columns from its start: what padding would assume."""
    out = x.new_zeros(x.shape[0], B_cols.shape[0])
    for token, i in enumerate(indices.tolist()):
        if i >= 0:
            a, b = A_rows[starts[i]:starts[i] + r_max], B_cols[:, starts[i]:starts[i] + r_max]
            out[token] = scaling[i] * b @ (a @ x[token])
    return out


def check_ragged_delta(ragged_delta: Callable) -> None:
    """Exercise 7.1: ``ragged_delta(x, A_rows, B_cols, starts, ranks, indices, scaling)``, adapters unpadded."""
    cases = [([2, 4, 1], [0, 0, 2, -1, 1, 1, 0, 2], 6, 5),  # rank 4 in the middle, 1 at the end
             ([3, 1, 5, 2], [3, 2, 2, 0, -1, 1, 3, 3, 2], 7, 4),
             ([1, 1], [1, -1, 0, 1], 3, 6)]
    for seed, (ranks, indices, d_in, d_out) in enumerate(cases):
        adapters, A_rows, B_cols, starts, scaling = _ragged(ranks, d_in, d_out, seed)
        indices = torch.tensor(indices)
        x = torch.randn(len(indices), d_in, generator=torch.Generator().manual_seed(10 + seed), dtype=torch.float64)
        got = expect_tensor(call_learner(ragged_delta, x.clone(), A_rows.clone(), B_cols.clone(), list(starts),
                                         list(ranks), indices.clone(), scaling.clone()), "ragged_delta")
        want = _per_token(x, adapters, indices, scaling, pick=lambda i, t: None if i < 0 else i)
        setting = f"ranks {ranks} (stacked at rows {starts}), {len(indices)} tokens with indices {indices.tolist()}"
        if got.shape != want.shape:
            raise CheckFailed(f"For {setting}, the delta should have shape {tuple(want.shape)}, one row per token "
                              f"with out = {d_out} features, but yours has {tuple(got.shape)}.")
        got = got.double()
        if torch.allclose(got, want, atol=1e-10):
            continue
        n = len(ranks)
        wrong = [
            (_over_reach(x, A_rows, B_cols, starts, max(ranks), indices, scaling),
             "a lower-rank adapter read as many rows of A_rows (and columns of B_cols) as the largest rank, so it "
             "took its neighbour's rows as its own; each adapter owns exactly ranks[i] of them"),
            (_per_token(x, adapters, indices, scaling, pick=lambda i, t: i % n),
             "the tokens with index -1 got the last adapter (a Python index -1); they should get no delta at all"),
            (_per_token(x, adapters, indices, scaling, pick=lambda i, t: None if i < 0 else i, scale=False),
             "no token's delta is multiplied by its adapter's scaling"),
            (_per_token(x, adapters, indices, torch.ones_like(scaling), pick=lambda i, t: None if i < 0 else i)
             * torch.cat([scaling, scaling.new_ones(max(0, len(indices) - n))])[:len(indices), None]
             if len(indices) else None,
             "each token is scaled by the entry of scaling at its own position, not by its adapter's"),
        ]
        bad_tokens = [t for t in range(len(indices)) if not torch.allclose(got[t], want[t], atol=1e-10)]
        default = (f"tokens {bad_tokens} (adapters {sorted(set(indices[bad_tokens].tolist()))}) get a different "
                   "delta from their adapter's own A_i and B_i; find where adapter i's rows start and how many "
                   "it has")
        hint = next((h for variant, h in wrong if variant is not None and torch.allclose(got, variant, atol=1e-10)),
                    default)
        raise CheckFailed(f"For {setting}, your delta is off by up to {(got - want).abs().max().item():.3g}: {hint}.")
    passed("Correct: every adapter computes its own delta from exactly its own rows, and no rank is padded.")


def _pool_bytes(layer_shapes, ranks, r_max, bytes_per_number, rank_of=None, numbers=None):
    numbers = numbers or (lambda r, out_f, in_f: r * (in_f + out_f))
    padded = len(ranks) * sum(numbers(r_max, o, i) for o, i in layer_shapes) * bytes_per_number
    unpadded = sum(numbers(r, o, i) for r in ranks for o, i in layer_shapes) * bytes_per_number
    return padded, unpadded


def check_pool_bytes(pool_bytes: Callable) -> None:
    """Exercise 7.2: ``padded, unpadded = pool_bytes(layer_shapes, ranks, r_max, bytes_per_number)``."""
    cases = [([(12, 4), (4, 4), (16, 4), (4, 16)], [8, 8, 2, 64], 64, 2),  # GPT-2's four matrices, tiny
             ([(3072, 1024), (1024, 4096)], [16, 4, 4], 32, 4),  # r_max above the largest rank
             ([(5, 3)], [1], 1, 1)]
    for layer_shapes, ranks, r_max, nbytes in cases:
        got = call_learner(pool_bytes, list(layer_shapes), list(ranks), r_max, nbytes)
        if not isinstance(got, tuple) or len(got) != 2:
            raise CheckFailed(f"pool_bytes should return a pair (padded, unpadded), got {type(got).__name__}.")
        try:
            got = tuple(int(v) for v in got)
        except (TypeError, ValueError):
            raise CheckFailed(f"pool_bytes should return two whole numbers of bytes, got {got!r}.") from None
        want = _pool_bytes(layer_shapes, ranks, r_max, nbytes)
        setting = (f"layers of shape (out, in) {layer_shapes}, adapters of ranks {ranks} in a pool of r_max={r_max}, "
                   f"{nbytes} bytes per number")
        if got == want:
            continue
        if got == want[::-1]:
            raise CheckFailed(f"For {setting}, your pair is the other way round: padded first, then unpadded.")
        for label, g, w in (("padded", got[0], want[0]), ("unpadded", got[1], want[1])):
            if g == w:
                continue
            wrong = {
                _pool_bytes(layer_shapes, ranks, max(ranks), nbytes)[0]:
                    "it pads to the largest rank among these adapters, but the pool reserves r_max for every "
                    "slot, whoever fills it",
                _pool_bytes(layer_shapes, ranks, r_max, 1)[label == "unpadded"]:
                    "it counts numbers, not bytes",
                _pool_bytes(layer_shapes, ranks, r_max, nbytes, numbers=lambda r, o, i: r * i)[label == "unpadded"]:
                    "it counts A (r x in) but not B (out x r)",
                _pool_bytes(layer_shapes, ranks, r_max, nbytes, numbers=lambda r, o, i: r * o)[label == "unpadded"]:
                    "it counts B (out x r) but not A (r x in)",
                _pool_bytes(layer_shapes, ranks, r_max, nbytes, numbers=lambda r, o, i: r * i * o)[label == "unpadded"]:
                    "it counts r x in x out numbers, the size of a dense update, where A and B hold far fewer",
                _pool_bytes(layer_shapes[:1], ranks, r_max, nbytes)[label == "unpadded"]:
                    "it counts the first layer shape only; every adapter sits on every layer in the list",
                want[1 - (label == "unpadded")]:
                    "that is the other total" if label == "padded" else "that is the padded total: an unpadded "
                    "pool stores each adapter at its own rank",
            }
            hint = wrong.get(g, f"that is {g / w:.3g} times the right size; count what one adapter of rank r "
                                "stores on one layer of shape (out, in), then how many adapters and layers there are")
            raise CheckFailed(f"For {setting}, your {label} size is {g} bytes, not {w}: {hint}.")
    passed("Correct: padding reserves r_max for every adapter on every layer; without it each pays its own rank.")


def check_pad_pool(pad_pool: Callable) -> None:
    """Exercise 7.3: ``A, B = pad_pool(adapters, r_max)``, adapters of mixed ranks in one zero-padded pool."""
    g = torch.Generator().manual_seed(2)
    ranks, d_in, d_out, r_max = [2, 4, 1], 6, 5, 4
    adapters = [(torch.randn(r, d_in, generator=g, dtype=torch.float64),
                 torch.randn(d_out, r, generator=g, dtype=torch.float64)) for r in ranks]
    got = call_learner(pad_pool, [(a.clone(), b.clone()) for a, b in adapters], r_max)
    if not isinstance(got, tuple) or len(got) != 2:
        raise CheckFailed(f"pad_pool should return a pair (A, B), got {type(got).__name__}.")
    A, B = (expect_tensor(t, "pad_pool") for t in got)
    if A.shape != (3, r_max, d_in) or B.shape != (3, d_out, r_max):
        raise CheckFailed(f"For 3 adapters of ranks {ranks} and r_max={r_max}, A should be {(3, r_max, d_in)} and B "
                          f"{(3, d_out, r_max)}; yours are {tuple(A.shape)} and {tuple(B.shape)}.")
    x = torch.randn(d_in, generator=g, dtype=torch.float64)
    for i, (a, b) in enumerate(adapters):
        want = b @ (a @ x)
        got_delta = B[i].double() @ (A[i].double() @ x)
        if not torch.allclose(got_delta, want, atol=1e-10):
            r = ranks[i]
            if A[i, :r].shape == a.shape and torch.allclose(A[i, :r].double(), a) and \
                    not torch.allclose(B[i, :, :r].double(), b):
                hint = "B is (out, r): its rank runs along the columns, so pad columns, not rows"
            elif (A[i, r:] != 0).any() or (B[i, :, r:] != 0).any():
                hint = "the padding must be zeros, so that the extra ranks add nothing"
            else:
                hint = "put A's r rows first in the (r_max, in) slot and B's r columns first in the (out, r_max) slot"
            raise CheckFailed(f"Adapter {i} (rank {r}) computes a different delta from the pool than alone: {hint}.")
    too_big = [(torch.randn(5, d_in, dtype=torch.float64), torch.randn(d_out, 5, dtype=torch.float64))]
    try:
        call_learner(pad_pool, too_big, r_max)
    except ValueError:
        pass
    else:
        raise CheckFailed(f"An adapter of rank 5 in a pool with r_max={r_max} must raise ValueError: it cannot fit, "
                          "and cutting it would change what it computes.")
    passed("Correct: padded with zeros, every adapter computes the same delta as alone, whatever its rank.")
