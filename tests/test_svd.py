"""lora_edu.svd: what chapter 1 claims about low-rank approximation, tested."""

import math

import pytest
import torch

from lora_edu.svd import (
    effective_rank,
    energy_curve,
    energy_fraction,
    low_rank_approx,
    low_rank_parameters,
    rank_for_energy,
    singular_values,
    subspace_similarity,
)


def random_matrix(d=30, k=20, seed=0):
    return torch.randn(d, k, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_low_rank_approx_has_rank_r_and_the_tail_as_its_error():
    W = random_matrix()
    s = singular_values(W)
    for r in (1, 5, 19, 20):
        approx = low_rank_approx(W, r)
        assert torch.linalg.matrix_rank(approx) == r
        assert torch.linalg.norm(W - approx) == pytest.approx(float(s[r:].pow(2).sum().sqrt()), abs=1e-9)


def test_low_rank_approx_beats_random_rank_r_matrices():
    # Eckart-Young: no rank-r matrix is closer, in particular no projection onto random directions.
    W = random_matrix()
    best = torch.linalg.norm(W - low_rank_approx(W, 4))
    g = torch.Generator().manual_seed(1)
    for _ in range(20):
        Q, _ = torch.linalg.qr(torch.randn(30, 4, generator=g, dtype=torch.float64))
        assert torch.linalg.norm(W - Q @ (Q.T @ W)) > best


def test_low_rank_approx_keeps_the_dtype():
    assert low_rank_approx(random_matrix().float(), 3).dtype == torch.float32


def test_energy_of_an_exactly_low_rank_matrix():
    W = random_matrix(30, 3) @ random_matrix(3, 20, seed=1)
    assert energy_fraction(W, 3) == pytest.approx(1.0, abs=1e-12)
    assert energy_fraction(W, 1) < 1.0
    assert rank_for_energy(W, 1.0) == 3
    curve = energy_curve(W)
    assert len(curve) == 20 and torch.all(curve[1:] >= curve[:-1])


def test_rank_for_energy_is_the_smallest_rank_that_reaches_it():
    W = torch.diag(torch.tensor([3.0, 2.0, 1.0, 1.0]))  # energies 9, 4, 1, 1 of 15
    assert rank_for_energy(W, 9 / 15) == 1
    assert rank_for_energy(W, 9 / 15 + 1e-6) == 2
    assert rank_for_energy(W, 0.9) == 3
    assert rank_for_energy(W, 1.0) == 4


def test_effective_rank_counts_equal_directions():
    assert effective_rank(torch.eye(7)) == pytest.approx(7)
    assert effective_rank(torch.diag(torch.tensor([1.0, 1.0, 0.0, 0.0]))) == pytest.approx(2)
    assert 1 < effective_rank(torch.diag(torch.tensor([10.0, 1.0, 1.0]))) < 3


def test_subspace_similarity_of_a_matrix_with_itself_and_with_its_complement():
    W = random_matrix()
    assert subspace_similarity(W, W, 5) == pytest.approx(1.0)
    assert subspace_similarity(W, 2 * W, 3, 5) == pytest.approx(1.0)  # top 3 lie inside top 5
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    complement = U[:, 5:10] @ Vh[5:10]
    assert subspace_similarity(W, complement, 5) == pytest.approx(0.0, abs=1e-12)


def test_subspace_similarity_of_random_matrices_is_near_chance():
    # Two random 4-dim subspaces of R^400 overlap by about 4 / 400.
    values = [subspace_similarity(random_matrix(400, 10, s), random_matrix(400, 10, s + 100), 4) for s in range(10)]
    assert 0.0 < sum(values) / len(values) < 3 * 4 / 400


def test_subspace_similarity_right_side_compares_rows():
    W = random_matrix()
    assert subspace_similarity(W, W[:10], 4, side="right") < 1.0
    assert subspace_similarity(W, W.clone(), 4, side="right") == pytest.approx(1.0)


def test_low_rank_parameters():
    assert low_rank_parameters(768, 2304, 8) == 8 * (768 + 2304)
    assert low_rank_parameters(10, 10, 10) == 200  # more than the 100 of the full matrix


@pytest.mark.parametrize("call, error, message", [
    (lambda: low_rank_approx(random_matrix(), 0), ValueError, "r must be between 1 and min"),
    (lambda: low_rank_approx(random_matrix(), 21), ValueError, r"min\(30, 20\) = 20, got 21"),
    (lambda: low_rank_approx(random_matrix(), 2.0), TypeError, "r must be an int"),
    (lambda: low_rank_approx(torch.randn(5), 1), ValueError, "W must be a 2-D matrix, got a 1-D"),
    (lambda: low_rank_approx(torch.randn(0, 3), 1), ValueError, "must not be empty"),
    (lambda: low_rank_approx(torch.ones(3, 3, dtype=torch.long), 1), TypeError, "floating-point"),
    (lambda: low_rank_approx([[1.0]], 1), TypeError, "W must be a torch.Tensor"),
    (lambda: energy_fraction(random_matrix(), -1), ValueError, "r must be between"),
    (lambda: rank_for_energy(random_matrix(), 0.0), ValueError, r"energy must be a number in \(0, 1\]"),
    (lambda: rank_for_energy(random_matrix(), 1.5), ValueError, "energy must be"),
    (lambda: rank_for_energy(torch.zeros(3, 3)), ValueError, "all zeros"),
    (lambda: effective_rank(torch.zeros(3, 3)), ValueError, "all zeros"),
    (lambda: subspace_similarity(random_matrix(30, 20), random_matrix(20, 30), 2), ValueError, "share their left"),
    (lambda: subspace_similarity(random_matrix(), random_matrix(), 2, side="up"), ValueError, "side must be"),
    (lambda: subspace_similarity(random_matrix(), random_matrix(30, 3), 2, 4), ValueError, "j must be between"),
    (lambda: low_rank_parameters(10, 0, 1), ValueError, "k must be a positive int"),
    (lambda: low_rank_parameters(10, 5, 6), ValueError, "r must be at most min"),
])
def test_bad_input_gets_a_clear_error(call, error, message):
    with pytest.raises(error, match=message):
        call()


def test_effective_rank_is_between_one_and_full():
    W = random_matrix()
    assert 1 <= effective_rank(W) <= 20
    assert math.isclose(effective_rank(torch.ones(4, 4)), 1.0)
