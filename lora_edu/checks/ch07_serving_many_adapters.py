"""Checkers for chapter 7's exercises: adapters of mixed ranks without padding, a pool's memory, a pool unpadded."""

from __future__ import annotations

from typing import Callable

import torch

from lora_edu.checks.core import CheckFailed, call_learner, expect_shape, expect_tensor, first_hint, first_line, passed
from lora_edu.numerics import matmul_tolerance

__all__ = ["check_pool_bytes", "check_ragged_delta", "check_unpad_pool"]


def _ragged(ranks: list[int], d_in: int, d_out: int, seed: int):
    """Adapters of the given ranks, each (A_i, B_i), and the same stacked without padding."""
    g = torch.Generator().manual_seed(seed)
    adapters = [(torch.randn(r, d_in, generator=g), torch.randn(d_out, r, generator=g)) for r in ranks]
    starts = [sum(ranks[:i]) for i in range(len(ranks))]
    A_rows = torch.cat([a for a, _ in adapters])  # (sum of ranks, in)
    B_cols = torch.cat([b for _, b in adapters], dim=1)  # (out, sum of ranks)
    scaling = torch.rand(len(ranks), generator=g) + 0.5
    return adapters, A_rows, B_cols, starts, scaling


def _per_token(x, adapters, indices, scaling, pick=lambda i, token: i, scale=True):
    """Each token's delta from its adapter's own A_i and B_i, in float64 (the reference)."""
    x, scaling = x.double(), scaling.double()
    adapters = [(a.double(), b.double()) for a, b in adapters]
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
    x, A_rows, B_cols, scaling = x.double(), A_rows.double(), B_cols.double(), scaling.double()
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
        x = torch.randn(len(indices), d_in, generator=torch.Generator().manual_seed(10 + seed))
        try:
            got = call_learner(ragged_delta, x.clone(), A_rows.clone(), B_cols.clone(), list(starts), list(ranks),
                               indices.clone(), scaling.clone())
        except RuntimeError as error:
            if "dtype" not in str(error).lower() and "type" not in str(error).lower():
                raise
            raise CheckFailed(f"ragged_delta raised PyTorch's error {first_line(error)!r}: the inputs here "
                              f"are {x.dtype}, so build the output with the inputs' dtype (x.new_zeros(...) or "
                              "dtype=x.dtype) and keep every product in it.") from None
        got = expect_tensor(got, "ragged_delta")
        want = _per_token(x, adapters, indices, scaling, pick=lambda i, t: None if i < 0 else i)
        setting = f"ranks {ranks} (stacked at rows {starts}), {len(indices)} tokens with indices {indices.tolist()}"
        expect_shape(got, want.shape, f"For {setting}, the delta",
                     otherwise=f"one row per token, with out = {d_out} features")
        got = got.double()
        # float32 inputs: each entry is a chain of d_in then rank sums, within rounding of the float64 reference
        magnitude = max(float(s) * (b.abs() @ (a.abs() @ x.abs().T)).max().item()
                        for (a, b), s in zip(adapters, scaling))
        atol = matmul_tolerance(magnitude, d_in + max(ranks))
        if torch.allclose(got, want, rtol=0, atol=atol):
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
        bad_tokens = [t for t in range(len(indices)) if not torch.allclose(got[t], want[t], rtol=0, atol=atol)]
        default = (f"tokens {bad_tokens} (adapters {sorted(set(indices[bad_tokens].tolist()))}) get a different "
                   "delta from their adapter's own A_i and B_i; find where adapter i's rows start and how many "
                   "it has")
        hint = first_hint(wrong, lambda variant: torch.allclose(got, variant, rtol=0, atol=atol), default)
        raise CheckFailed(f"For {setting}, your delta is off by up to {(got - want).abs().max().item():.3g}: {hint}.")
    passed("Correct: every adapter computes its own delta from exactly its own rows of A_rows and columns of "
           "B_cols.")


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


def _unpad(A, B, ranks):
    A_rows = torch.cat([A[i, :r] for i, r in enumerate(ranks)])
    B_cols = torch.cat([B[i, :, :r] for i, r in enumerate(ranks)], dim=1)
    return A_rows, B_cols, [sum(ranks[:i]) for i in range(len(ranks))]


def _as_starts(value) -> list[int] | None:
    try:
        return [int(v) for v in (value.tolist() if isinstance(value, torch.Tensor) else value)]
    except (TypeError, ValueError):
        return None


def check_unpad_pool(unpad_pool: Callable) -> None:
    """Exercise 7.3: ``A_rows, B_cols, starts = unpad_pool(A, B, ranks)``, a padded pool stored at each rank."""
    cases = [([2, 4, 1], 4, 6, 5), ([3, 3, 1, 2], 5, 4, 7), ([1], 3, 3, 2)]
    for seed, (ranks, r_max, d_in, d_out) in enumerate(cases):
        g = torch.Generator().manual_seed(20 + seed)
        n = len(ranks)
        A, B = torch.zeros(n, r_max, d_in), torch.zeros(n, d_out, r_max)
        for i, r in enumerate(ranks):  # every adapter in the first r ranks of its slot, zeros after
            A[i, :r] = torch.randn(r, d_in, generator=g)
            B[i, :, :r] = torch.randn(d_out, r, generator=g)
        A_in, B_in = A.clone(), B.clone()
        setting = f"a pool of {n} adapters of ranks {ranks} padded to r_max={r_max} (in={d_in}, out={d_out})"
        got = call_learner(unpad_pool, A_in, B_in, list(ranks))
        if not torch.equal(A_in, A) or not torch.equal(B_in, B):
            raise CheckFailed(f"For {setting}, unpad_pool changed the pool it was given; build new tensors and "
                              "leave A and B as they were.")
        if not isinstance(got, tuple) or len(got) != 3:
            raise CheckFailed(f"unpad_pool should return three things (A_rows, B_cols, starts), got "
                              f"{type(got).__name__}" + (f" of {len(got)}" if isinstance(got, tuple) else "") + ".")
        A_rows = expect_tensor(got[0], "unpad_pool's A_rows")
        B_cols = expect_tensor(got[1], "unpad_pool's B_cols")
        starts = _as_starts(got[2])
        want_A, want_B, want_starts = _unpad(A, B, ranks)
        total = sum(ranks)
        expect_shape(A_rows, want_A.shape, f"For {setting}, A_rows, (sum of ranks, in),",
                     {(n * r_max, d_in): f"that keeps r_max = {r_max} rows for every adapter, padding included: how "
                                         "many rows does adapter i own?"},
                     otherwise="A_rows stacks every adapter's rows of A, one after another")
        transposed = "is B_cols (out, sum of ranks)? Along which of B's dimensions does an adapter's rank run?"
        expect_shape(B_cols, want_B.shape, f"For {setting}, B_cols, (out, sum of ranks),",
                     {(d_out, n * r_max): f"that keeps r_max = {r_max} columns for every adapter: how many columns "
                                          "does adapter i own?",
                      (n * r_max, d_out): transposed, (total, d_out): transposed},  # the transposes win a tie
                     otherwise="B_cols sets every adapter's columns of B side by side")
        if starts is None or len(starts) != n:
            raise CheckFailed(f"For {setting}, starts should be {n} whole numbers, one per adapter: the row of "
                              f"A_rows where each adapter begins; got {got[2]!r}.")
        if starts != want_starts:
            if starts == [s + r for s, r in zip(want_starts, ranks)]:
                hint = "those are where the adapters end; where does adapter 0 begin?"
            elif starts == [i * r_max for i in range(n)]:
                hint = "those are where the slots begin in a padded pool; once the padding is gone, what comes " \
                       "right before adapter i?"
            else:
                hint = "what comes before adapter i in A_rows, and how many rows does it take?"
            raise CheckFailed(f"For {setting}, your starts are {starts}: {hint}")
        for name, mine, want in (("A_rows", A_rows, want_A), ("B_cols", B_cols, want_B)):
            if torch.equal(mine.float(), want):
                continue
            bad = [i for i, (s, r) in enumerate(zip(starts, ranks))
                   if not torch.equal((mine[s:s + r] if name == "A_rows" else mine[:, s:s + r]).float(),
                                      want[s:s + r] if name == "A_rows" else want[:, s:s + r])]
            last = (torch.cat([A[i, r_max - r:] for i, r in enumerate(ranks)]) if name == "A_rows"
                    else torch.cat([B[i, :, r_max - r:] for i, r in enumerate(ranks)], dim=1))
            if torch.equal(mine.float(), last):
                hint = ("they take the last ranks of each slot, where a padded pool keeps its zeros; which end of "
                        "the slot does the adapter fill?")
            elif (mine == 0).all(dim=1 if name == "A_rows" else 0).any():
                hint = "some of them are all zeros: is that padding, kept in place of one of the adapter's own ranks?"
            else:
                hint = "does each adapter's slice hold exactly what its slot in the pool holds, in the same order?"
            raise CheckFailed(f"For {setting}, the {name} of adapters {bad} are not those of the pool: {hint}")
    A, B = torch.zeros(2, 3, 4), torch.zeros(2, 5, 3)
    for ranks, why in (([2, 4], "rank 4 in a pool of r_max=3, more than its slot holds"),
                       ([2, 0], "rank 0, which is no adapter")):
        try:
            call_learner(unpad_pool, A.clone(), B.clone(), list(ranks))
        except ValueError:
            continue
        except (IndexError, RuntimeError) as error:
            raise CheckFailed(f"For ranks {ranks} ({why}), unpad_pool should raise ValueError naming the adapter "
                              f"and the rank it expected, before it touches anything; it raised "
                              f"{type(error).__name__} instead.") from None
        raise CheckFailed(f"For ranks {ranks} ({why}), unpad_pool returned a result: it should raise ValueError, "
                          "since those ranks cannot describe this pool.")
    passed("Correct: each adapter now takes its own rank of rows and columns, and starts says where; that is what "
           "ragged_delta reads.")
