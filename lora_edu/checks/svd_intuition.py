"""Checkers for chapter 1's exercises: low-rank factors, rank for an energy, parameter counts."""

from __future__ import annotations

from typing import Callable

import torch

from lora_edu.checks._core import CheckFailed, call_learner, expect_tensor
from lora_edu.svd import low_rank_approx, low_rank_parameters, rank_for_energy

__all__ = ["check_low_rank_factors", "check_low_rank_parameters", "check_rank_for_energy"]


def _test_matrices() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "a tall 12 x 8 matrix": torch.randn(12, 8, generator=g, dtype=torch.float64),
        "a wide 5 x 9 matrix": torch.randn(5, 9, generator=g, dtype=torch.float64),
    }


def check_low_rank_factors(low_rank_factors: Callable[[torch.Tensor, int], tuple]) -> None:
    """Exercise 1.1: ``B, A = low_rank_factors(W, r)`` with B (d, r), A (r, k), B @ A the best rank-r W."""
    for name, W in _test_matrices().items():
        d, k = W.shape
        for r in (1, 3, min(d, k)):
            got = call_learner(low_rank_factors, W.clone(), r)
            if not isinstance(got, tuple) or len(got) != 2:
                raise CheckFailed(f"low_rank_factors should return a pair (B, A), got {type(got).__name__}.")
            B, A = (expect_tensor(x, "low_rank_factors") for x in got)
            if B.shape != (d, r) or A.shape != (r, k):
                raise CheckFailed(
                    f"For {name} and r={r}, B should be {d} x {r} and A {r} x {k} (so that B @ A is {d} x {k}); "
                    f"got B {tuple(B.shape)} and A {tuple(A.shape)}."
                )
            product, want = (B @ A).double(), low_rank_approx(W, r)
            if torch.allclose(product, want, atol=1e-6):
                continue
            U, S, Vh = torch.linalg.svd(W, full_matrices=False)
            if torch.allclose(product, U[:, :r] @ Vh[:r], atol=1e-6):
                hint = "B @ A has lost the singular values: put S[:r] into B or A (or split it as sqrt(S) into both)"
            elif r < len(S) and torch.allclose(product, (U[:, -r:] * S[-r:]) @ Vh[-r:], atol=1e-6):
                hint = "you kept the smallest singular values; torch.linalg.svd returns them largest first, so keep the first r"
            else:
                hint = "B @ A should equal the truncated SVD U[:, :r] diag(S[:r]) Vh[:r]"
            error = torch.linalg.norm(W - product).item()
            raise CheckFailed(
                f"For {name} and r={r}, ||W - B @ A|| is {error:.3f} but the best rank-{r} "
                f"approximation reaches {torch.linalg.norm(W - want).item():.3f}: {hint}."
            )
    print("Correct: B @ A is the best rank-r approximation, as Eckart-Young-Mirsky says.")


def check_rank_for_energy(rank_for_energy_fn: Callable[[torch.Tensor, float], int]) -> None:
    """Exercise 1.2: the smallest r whose top r singular values hold ``energy`` of ||W||_F^2."""
    cases = [
        ("diag(3, 2, 1, 1)", torch.diag(torch.tensor([3.0, 2.0, 1.0, 1.0], dtype=torch.float64)), 0.9),
        ("diag(3, 2, 1, 1)", torch.diag(torch.tensor([3.0, 2.0, 1.0, 1.0], dtype=torch.float64)), 0.5),
        *[(name, W, energy) for name, W in _test_matrices().items() for energy in (0.5, 0.99, 1.0)],
    ]
    answers = []
    for name, W, energy in cases:
        got = call_learner(rank_for_energy_fn, W.clone(), energy)
        if isinstance(got, torch.Tensor) and got.numel() == 1:
            got = got.item()
        if isinstance(got, bool) or not isinstance(got, int):
            raise CheckFailed(f"rank_for_energy should return a rank, an int; got {got!r}.")
        answers.append(got)
    wanted = [rank_for_energy(W, energy) for _, W, energy in cases]
    if answers != wanted:
        # Diagnose from all cases at once, so one coincidence does not mislead.
        unsquared = [_rank_reaching(torch.linalg.svdvals(W), energy) for _, W, energy in cases]
        if answers == unsquared:
            hint = "energy is the squared Frobenius norm: add up S**2, not S"
        elif answers == [w - 1 for w in wanted]:
            hint = "off by one: index 0 of the cumulative sum is rank 1"
        else:
            hint = "take the cumulative sum of S**2 over its total and find the first rank where it reaches energy"
        (name, _, energy), got, want = next(
            (case, a, w) for case, a, w in zip(cases, answers, wanted) if a != w
        )
        raise CheckFailed(f"For {name} and energy={energy}, the answer is r={want} but you returned {got}: {hint}.")
    print("Correct: you find the smallest rank that reaches the energy.")


def _rank_reaching(values: torch.Tensor, energy: float) -> int:
    curve = values.cumsum(0) / values.sum()
    return int((curve >= energy - 1e-12).nonzero()[0]) + 1


def check_low_rank_parameters(count: Callable[[int, int, int], int]) -> None:
    """Exercise 1.3: the parameters of B (d x r) and A (r x k)."""
    for d, k, r in [(768, 2304, 8), (768, 768, 4), (3072, 768, 16), (10, 20, 1)]:
        got = call_learner(count, d, k, r)
        want = low_rank_parameters(d, k, r)
        if got == want:
            continue
        if got == d * k * r:
            hint = "B is d x r and A is r x k: add their sizes, do not multiply everything"
        elif got in (d * r, r * k):
            hint = "count both factors, B (d x r) and A (r x k)"
        elif got == d * k - want:
            hint = "that is what the factorisation saves; return how many parameters it has"
        else:
            hint = "B has d * r entries and A has r * k"
        raise CheckFailed(f"For d={d}, k={k}, r={r} you counted {got} but B and A hold {want}: {hint}.")
    print("Correct: rank r costs r (d + k) parameters instead of d k.")
