"""Chapter 1's checkers accept the right answer and reject wrong ones with a useful sentence."""

import pytest
import torch

from lora_edu.checks import CheckFailed, check_low_rank_factors, check_low_rank_parameters, check_rank_for_energy


def stub(*args):
    raise NotImplementedError("Exercise hint")


# --- Exercise 1.1: low-rank factors ---

def right_factors(W, r):
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    return U[:, :r] * S[:r], Vh[:r]


def sqrt_split(W, r):  # also right: sqrt(S) into each factor
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    return U[:, :r] * S[:r].sqrt(), S[:r].sqrt()[:, None] * Vh[:r]


def no_singular_values(W, r):
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    return U[:, :r], Vh[:r]


def smallest(W, r):
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    return U[:, -r:] * S[-r:], Vh[-r:]


def transposed(W, r):
    B, A = right_factors(W, r)
    return A.T, B.T


def random_factors(W, r):
    return torch.randn(W.shape[0], r, dtype=W.dtype), torch.randn(r, W.shape[1], dtype=W.dtype)


@pytest.mark.parametrize("right", [right_factors, sqrt_split])
def test_low_rank_factors_accepts(right, capsys):
    check_low_rank_factors(right)
    assert "Correct" in capsys.readouterr().out


@pytest.mark.parametrize("wrong, message", [
    (no_singular_values, "lost the singular values"),
    (smallest, "kept the smallest singular values"),
    (transposed, r"B should be 12 x 1 and A 1 x 8"),
    (random_factors, "should equal the truncated SVD"),
    (lambda W, r: W, "should return a pair"),
    (lambda W, r: (W.tolist(), W.tolist()), "torch.Tensor"),
    (stub, "still the stub"),
])
def test_low_rank_factors_rejects(wrong, message):
    with pytest.raises(CheckFailed, match=message):
        check_low_rank_factors(wrong)


# --- Exercise 1.2: rank for an energy ---

def rank_from(values, energy, offset=1):
    curve = values.cumsum(0) / values.sum()
    return int((curve >= energy - 1e-12).nonzero()[0]) + offset


@pytest.mark.parametrize("wrong, message", [
    (lambda W, e: rank_from(torch.linalg.svdvals(W), e), r"add up S\*\*2, not S"),
    (lambda W, e: rank_from(torch.linalg.svdvals(W) ** 2, e, offset=0), "off by one"),
    (lambda W, e: min(W.shape), "cumulative sum of S\\*\\*2"),
    (lambda W, e: float(rank_from(torch.linalg.svdvals(W) ** 2, e)), "an int"),
    (stub, "still the stub"),
])
def test_rank_for_energy_rejects(wrong, message):
    with pytest.raises(CheckFailed, match=message):
        check_rank_for_energy(wrong)


def test_rank_for_energy_accepts(capsys):
    check_rank_for_energy(lambda W, e: rank_from(torch.linalg.svdvals(W) ** 2, e))
    check_rank_for_energy(lambda W, e: torch.tensor(rank_from(torch.linalg.svdvals(W) ** 2, e)))
    assert capsys.readouterr().out.count("Correct") == 2


# --- Exercise 1.3: parameters of a rank-r factorisation ---

@pytest.mark.parametrize("wrong, message", [
    (lambda d, k, r: d * k * r, "add their sizes"),
    (lambda d, k, r: d * r, "count both factors"),
    (lambda d, k, r: d * k - r * (d + k), "what the factorisation saves"),
    (lambda d, k, r: r * (d + k) + 1, "B has d \\* r entries"),
    (stub, "still the stub"),
])
def test_low_rank_parameters_rejects(wrong, message):
    with pytest.raises(CheckFailed, match=message):
        check_low_rank_parameters(wrong)


def test_low_rank_parameters_accepts(capsys):
    check_low_rank_parameters(lambda d, k, r: r * (d + k))
    assert "Correct" in capsys.readouterr().out
