"""Chapter 1's checkers accept the right answer and reject wrong ones with a useful sentence."""

import math

import pytest
import torch

from lora_edu.checks import (
    CheckFailed,
    check_low_rank_factors,
    check_low_rank_parameters,
    check_rank_for_energy,
    check_rank_keeping_gain,
)


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
    (random_factors, "should be the best rank-r approximation"),
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
    (lambda W, e: min(W.shape), "share of the squared singular values"),
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
    (lambda d, k, r: r * (d + k) + 1, "count the entries of each factor"),
    (stub, "still the stub"),
])
def test_low_rank_parameters_rejects(wrong, message):
    with pytest.raises(CheckFailed, match=message):
        check_low_rank_parameters(wrong)


def test_low_rank_parameters_accepts(capsys):
    check_low_rank_parameters(lambda d, k, r: r * (d + k))
    assert "Correct" in capsys.readouterr().out


# --- Exercise 1.4 (open): the smallest rank that keeps 90% of the gain ---

@pytest.fixture
def kept_by_rank(monkeypatch):
    """A stand-in for the held-out measurement: rank r keeps min(1, r / 20) of the gain, so 18 is the answer."""
    from lora_edu.checks import ch01_svd_intuition

    calls = []

    def fake_gain_kept(delta, ranks):
        calls.append(list(ranks))
        return {r: min(1.0, r / 20) for r in ranks}

    monkeypatch.setattr(ch01_svd_intuition, "gain_kept", fake_gain_kept)
    return calls


DELTA = {"transformer.h.0.attn.c_proj.weight": torch.zeros(128, 128)}


def test_rank_keeping_gain_accepts_the_smallest_rank(kept_by_rank, capsys):
    check_rank_keeping_gain(18, DELTA)
    check_rank_keeping_gain(torch.tensor(18), DELTA)
    assert capsys.readouterr().out.count("Correct: rank 18") == 2
    assert kept_by_rank == [[18, 17], [18, 17]]  # the rank and the one below, nothing more


@pytest.mark.parametrize("answer, message", [
    (16, r"At rank 16 .* keep 80.0% .*short of 90%: the rank you want is higher"),
    (32, r"rank 31 already keeps 100.0%: the smallest rank is lower"),
    (19, r"rank 18 already keeps 90.0%"),
    (0, "a positive int"),
    (18.0, "a positive int"),
    (True, "a positive int"),
    (129, "more than any of these matrices has"),
])
def test_rank_keeping_gain_rejects(kept_by_rank, answer, message):
    with pytest.raises(CheckFailed, match=message):
        check_rank_keeping_gain(answer, DELTA)


def test_gain_kept_measures_the_truncated_update():
    from lora_edu.checks.ch01_svd_intuition import gain_kept
    from lora_edu.gpt2 import load_tiny

    W0 = load_tiny().transformer.h[0].mlp.c_fc.weight.detach()
    name = "transformer.h.0.mlp.c_fc.weight"
    u, v = W0[:, :1], W0[:1, :]  # a rank-1 update: rank 1 keeps all of its effect, rank 0 none
    delta = {name: 0.2 * W0.norm() * (u @ v) / (u @ v).norm()}
    kept = gain_kept(delta, [0, 1, 5])
    assert kept[0] == 0.0
    assert math.isclose(kept[1], 1.0, abs_tol=1e-4) and math.isclose(kept[5], 1.0, abs_tol=1e-4)
    with pytest.raises(KeyError, match="does not have"):
        gain_kept({"no.such.weight": torch.zeros(2, 2)}, [1])
    with pytest.raises(ValueError, match="each of ranks must be a non-negative int"):
        gain_kept(delta, [-1])
