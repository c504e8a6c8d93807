"""Checkers for chapter 1's exercises: low-rank factors, rank for an energy, parameter counts, rank for a gain."""

from __future__ import annotations

from typing import Callable, Iterable

import torch

from lora_edu.checks.core import CheckFailed, as_number, call_learner, expect_tensor, is_number, passed
from lora_edu.plumbing import check_int
from lora_edu.svd import low_rank_approx, low_rank_parameters, rank_for_energy

__all__ = [
    "check_low_rank_factors",
    "check_low_rank_parameters",
    "check_rank_for_energy",
    "check_rank_keeping_gain",
    "gain_kept",
]


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
                hint = "B @ A has lost the singular values: one of the factors (or both, shared) must carry them"
            elif r < len(S) and torch.allclose(product, (U[:, -r:] * S[-r:]) @ Vh[-r:], atol=1e-6):
                hint = "you kept the smallest singular values; torch.linalg.svd returns them largest first, so keep the first r"
            else:
                hint = "B @ A should be the best rank-r approximation, which the SVD gives: keep its r strongest directions"
            error = torch.linalg.norm(W - product).item()
            raise CheckFailed(
                f"For {name} and r={r}, ||W - B @ A|| is {error:.3f} but the best rank-{r} "
                f"approximation reaches {torch.linalg.norm(W - want).item():.3f}: {hint}."
            )
    passed("Correct: B @ A is the best rank-r approximation, as Eckart-Young-Mirsky says.")


def check_rank_for_energy(rank_for_energy_fn: Callable[[torch.Tensor, float], int]) -> None:
    """Exercise 1.2: the smallest r whose top r singular values hold ``energy`` of ||W||_F^2."""
    cases = [
        ("diag(3, 2, 1, 1)", torch.diag(torch.tensor([3.0, 2.0, 1.0, 1.0], dtype=torch.float64)), 0.9),
        ("diag(3, 2, 1, 1)", torch.diag(torch.tensor([3.0, 2.0, 1.0, 1.0], dtype=torch.float64)), 0.5),
        *[(name, W, energy) for name, W in _test_matrices().items() for energy in (0.5, 0.99, 1.0)],
    ]
    answers = []
    for name, W, energy in cases:
        got = as_number(call_learner(rank_for_energy_fn, W.clone(), energy))
        if not is_number(got, int):
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
            hint = "E(r) is the share of the squared singular values held by the top r; find the first rank where it reaches energy"
        (name, _, energy), got, want = next(
            (case, a, w) for case, a, w in zip(cases, answers, wanted) if a != w
        )
        raise CheckFailed(f"For {name} and energy={energy}, the answer is r={want} but you returned {got}: {hint}.")
    passed("Correct: you find the smallest rank that reaches the energy.")


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
            hint = "count the entries of each factor from its shape, and add them"
        raise CheckFailed(f"For d={d}, k={k}, r={r} you counted {got} but B and A hold {want}: {hint}.")
    passed("Correct: rank r costs r (d + k) parameters instead of d k.")


# ---------------------------------------------------------------------------
# Exercise 1.4 (open): the smallest rank that keeps a share of the fine-tune's gain.


def gain_kept(delta: dict[str, torch.Tensor], ranks: Iterable[int]) -> dict[int, float]:
    """For each r in ``ranks``, the share of the fine-tune's held-out Milton improvement that W0 + (ΔW)_r keeps.

    ``delta`` maps the tiny GPT-2's parameter names to their updates ΔW; every one is truncated to rank r
    (its best rank-r approximation). 1.0 is the full fine-tune's gain, 0.0 the pretrained loss: the numbers
    chapter 1 plots, from the same ``evaluate`` on the same held-out text.
    """
    from lora_edu.data import load_split
    from lora_edu.gpt2 import load_tiny
    from lora_edu.train import evaluate

    if not isinstance(delta, dict) or not delta:
        raise TypeError(f"delta must be a non-empty dict of parameter name -> update, got {type(delta).__name__}")
    ranks = [check_int(r, "each of ranks", minimum=0) for r in ranks]
    val = load_split("milton", "val")
    model = load_tiny("cpu")
    params = dict(model.named_parameters())
    unknown = sorted(set(delta) - set(params))
    if unknown:
        raise KeyError(f"delta has names the tiny GPT-2 does not have: {unknown[:3]}")
    W0 = {name: params[name].detach().clone() for name in delta}

    def loss_with(rank: int | None) -> float:
        with torch.no_grad():
            for name, d_w in delta.items():
                d_w = d_w.detach().to("cpu", torch.float32)
                if rank == 0:
                    d_w = torch.zeros_like(d_w)
                elif rank is not None:
                    d_w = low_rank_approx(d_w, min(rank, *d_w.shape))
                params[name].copy_(W0[name] + d_w)
        return evaluate(model, val, model.config.block_size)

    before, after = loss_with(0), loss_with(None)
    return {r: (before - loss_with(r)) / (before - after) for r in ranks}


def check_rank_keeping_gain(r: int, delta: dict[str, torch.Tensor], share: float = 0.9) -> None:
    """Exercise 1.4: ``r`` is the smallest rank at which every truncated update keeps ``share`` of the gain."""
    r = as_number(r)
    if not is_number(r, int) or r < 1:
        raise CheckFailed(f"The answer should be a rank, a positive int; got {r!r}.")
    largest = max(min(d.shape) for d in delta.values())
    if r > largest:
        raise CheckFailed(f"Rank {r} is more than any of these matrices has ({largest}): the answer lies below.")
    kept_at = gain_kept(delta, [r, r - 1] if r > 1 else [r])
    kept = kept_at[r]
    if kept < share:
        raise CheckFailed(
            f"At rank {r} the truncated updates keep {kept:.1%} of the gain, short of {share:.0%}: the rank you want "
            "is higher. Did you measure the loss after truncating every matrix, on the held-out text?"
        )
    if r > 1:
        below = kept_at[r - 1]
        if below >= share:
            raise CheckFailed(
                f"Rank {r} keeps {kept:.1%}, but rank {r - 1} already keeps {below:.1%}: the smallest rank is lower. "
                "Test every rank, not only powers of two."
            )
    passed(f"Correct: rank {r} is the smallest that keeps {share:.0%} of the gain ({kept:.1%}).")
