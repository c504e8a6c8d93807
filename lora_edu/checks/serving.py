"""Checkers for chapter 7's exercises: BGMV by gathering, segments of rows, a pool of mixed ranks."""

from __future__ import annotations

from typing import Callable

import torch

from lora_edu.checks._core import CheckFailed, call_learner, expect_tensor, passed
from lora_edu.serving import lora_loop

__all__ = ["check_bgmv", "check_pad_pool", "check_segments"]


def _pool(n: int, r_max: int, d_in: int, d_out: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(n, r_max, d_in, generator=g, dtype=torch.float64)
    B = torch.randn(n, d_out, r_max, generator=g, dtype=torch.float64)
    scaling = torch.rand(n, generator=g, dtype=torch.float64) + 0.5
    return A, B, scaling


def check_bgmv(bgmv: Callable) -> None:
    """Exercise 7.1: ``bgmv(x, A, B, indices, scaling)``, each row's LoRA delta with its own adapter."""
    A, B, scaling = _pool(4, 3, 6, 5, seed=0)
    g = torch.Generator().manual_seed(1)
    for x_shape, indices in [((4, 2, 6), [3, -1, 1, 1]), ((5, 6), [1, 3, 0, 3, 2]), ((6, 6), [2, -1, 0, 2, -1, 3])]:
        x = torch.randn(*x_shape, generator=g, dtype=torch.float64)
        indices = torch.tensor(indices)
        got = expect_tensor(call_learner(bgmv, x.clone(), A.clone(), B.clone(), indices.clone(), scaling.clone()),
                            "bgmv")
        want = lora_loop(x, A, B, indices, scaling)
        setting = f"x of shape {tuple(x.shape)} and indices {indices.tolist()}"
        if got.shape != want.shape:
            raise CheckFailed(f"For {setting}, the delta should have shape {tuple(want.shape)} (one row per row of x, "
                              f"out = {B.shape[1]} features), but yours has {tuple(got.shape)}.")
        got = got.double()
        if torch.allclose(got, want, atol=1e-10):
            continue
        naive = torch.einsum("b...r,bor->b...o", torch.einsum("b...i,bri->b...r", x, A[indices]), B[indices])
        shape = (-1, *[1] * (x.dim() - 1))
        unscaled = lora_loop(x, A, B, indices, torch.ones_like(scaling))
        wrong = [
            (naive * scaling[indices].view(shape), "a row with index -1 got the last adapter (A[-1] is the last one "
                                                   "in Python): -1 means no adapter, so its delta must be zero"),
            (unscaled, "the delta is not scaled: multiply each row by its adapter's scaling"),
            (unscaled * scaling[:len(indices)].view(shape) if len(indices) <= len(scaling) else None,
             "each row must take the scaling of its own adapter, scaling[indices[row]], not scaling[row]"),
        ]
        hint = next((h for variant, h in wrong if variant is not None and torch.allclose(got, variant, atol=1e-10)),
                    "row b should be scaling[i] * B[i] @ (A[i] @ x[b]) with i = indices[b], and zero where i = -1")
        raise CheckFailed(f"For {setting}, your delta is off by up to {(got - want).abs().max().item():.3g}: {hint}.")
    passed("Correct: every row gathers its own A and B, and a row with index -1 gets no adapter at all.")


def check_segments(segments: Callable) -> None:
    """Exercise 7.2: ``order, adapters, counts = segments(indices)``: rows grouped by adapter for SGMV."""
    for indices in ([2, -1, 0, 2, 0, 2], [1, 1, 1], [3, 0, 3, 1, 0, -1, -1, 1]):
        indices = torch.tensor(indices)
        got = call_learner(segments, indices.clone())
        if not isinstance(got, tuple) or len(got) != 3:
            raise CheckFailed(f"segments should return a triple (order, adapters, counts), got {type(got).__name__}.")
        order, adapters, counts = got
        order = expect_tensor(order, "segments' order").long()
        adapters, counts = [int(a) for a in adapters], [int(c) for c in counts]
        setting = f"indices {indices.tolist()}"
        if sorted(order.tolist()) != list(range(len(indices))):
            raise CheckFailed(f"For {setting}, order should list every row exactly once, got {order.tolist()}.")
        if len(adapters) != len(counts) or sum(counts) != len(indices) or min(counts) < 1:
            raise CheckFailed(f"For {setting}, you give adapters {adapters} with counts {counts}: one positive count "
                              f"per segment, adding up to the {len(indices)} rows.")
        if len(set(adapters)) != len(adapters):
            raise CheckFailed(f"For {setting}, an adapter appears in more than one segment ({adapters}): group the "
                              "rows by adapter (sort them first), so that each adapter is one segment.")
        start = 0
        for adapter, count in zip(adapters, counts):
            rows = order[start:start + count]
            start += count
            if not (indices[rows] == adapter).all():
                raise CheckFailed(f"For {setting}, the segment of adapter {adapter} holds rows {rows.tolist()}, which "
                                  f"use adapters {indices[rows].tolist()}.")
    passed("Correct: each adapter is one contiguous segment of the reordered rows, so SGMV reads its A and B once.")


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
