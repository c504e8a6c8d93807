"""Low-rank tools: the best rank-r approximation, energy, effective rank, subspace overlap.

Chapter 1 builds each of these inline; later chapters import them from here. All take
a 2-D floating-point tensor ``W`` of shape (d, k) and work in float64, so that tiny
singular values are not lost to rounding.
"""

from __future__ import annotations

import math

import torch

from lora_edu.plumbing import check_int

__all__ = [
    "effective_rank",
    "energy_curve",
    "energy_fraction",
    "low_rank_approx",
    "low_rank_parameters",
    "rank_for_energy",
    "singular_values",
    "subspace_similarity",
]


def _check_matrix(W, name: str = "W") -> torch.Tensor:
    if not isinstance(W, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(W).__name__}")
    if W.dim() != 2:
        raise ValueError(f"{name} must be a 2-D matrix, got a {W.dim()}-D tensor of shape {tuple(W.shape)}")
    if W.numel() == 0:
        raise ValueError(f"{name} must not be empty, got shape {tuple(W.shape)}")
    if not W.is_floating_point():
        raise TypeError(f"{name} must hold floating-point numbers, got {W.dtype}")
    return W.detach().to(torch.float64)


def _check_rank(r, W: torch.Tensor, name: str = "r") -> int:
    limit = min(W.shape)
    if isinstance(r, bool) or not isinstance(r, int):
        raise TypeError(f"{name} must be an int, got {type(r).__name__}")
    if not 1 <= r <= limit:
        raise ValueError(f"{name} must be between 1 and min{tuple(W.shape)} = {limit}, got {r}")
    return r


def singular_values(W: torch.Tensor) -> torch.Tensor:
    """The singular values of ``W``, largest first (float64)."""
    return torch.linalg.svdvals(_check_matrix(W))


def low_rank_approx(W: torch.Tensor, r: int) -> torch.Tensor:
    """The best rank-``r`` approximation of ``W`` (Eckart-Young-Mirsky): its truncated SVD.

    Returned in ``W``'s dtype. Its Frobenius error is the root-sum-square of the
    singular values it drops.
    """
    W64 = _check_matrix(W)
    r = _check_rank(r, W64)
    U, S, Vh = torch.linalg.svd(W64, full_matrices=False)
    return ((U[:, :r] * S[:r]) @ Vh[:r]).to(W.dtype)


def energy_curve(W: torch.Tensor) -> torch.Tensor:
    """Entry r-1 is the fraction of ``W``'s energy, ||W||_F^2, in its top r singular values."""
    squared = singular_values(W) ** 2
    total = squared.sum()
    if total == 0:
        raise ValueError("W is all zeros: it has no energy to divide")
    return squared.cumsum(0) / total


def energy_fraction(W: torch.Tensor, r: int) -> float:
    """Fraction of ``W``'s squared Frobenius norm captured by its top ``r`` singular values."""
    r = _check_rank(r, _check_matrix(W))
    return float(energy_curve(W)[r - 1])


def rank_for_energy(W: torch.Tensor, energy: float = 0.9) -> int:
    """The smallest rank r whose top r singular values hold at least ``energy`` of ||W||_F^2."""
    if isinstance(energy, bool) or not isinstance(energy, (int, float)) or not 0 < energy <= 1:
        raise ValueError(f"energy must be a number in (0, 1], got {energy!r}")
    curve = energy_curve(W)
    # Rounding can leave the full curve a hair under 1; the full rank always reaches it.
    reached = (curve >= energy - 1e-12).nonzero()
    return int(reached[0]) + 1 if len(reached) else len(curve)


def effective_rank(W: torch.Tensor) -> float:
    """Roy and Vetterli's effective rank: exp of the entropy of the normalised singular values.

    Equals r for a matrix with r equal non-zero singular values, and lies between 1 and
    min(d, k) for any non-zero matrix.
    """
    s = singular_values(W)
    if s.sum() == 0:
        raise ValueError("W is all zeros: its effective rank is undefined")
    p = s / s.sum()
    p = p[p > 0]
    return math.exp(float(-(p * p.log()).sum()))


def subspace_similarity(W1: torch.Tensor, W2: torch.Tensor, i: int, j: int | None = None, side: str = "left") -> float:
    """How much the top-i singular directions of W1 overlap the top-j of W2, in [0, 1].

    Hu et al. (2021), Section 7.2: phi = ||U1[:, :i]^T U2[:, :j]||_F^2 / min(i, j), with U
    the left singular vectors (``side="left"``, the column space, where the update writes)
    or the right ones (``side="right"``, the row space, what it reads). 1 means one
    subspace contains the other; two random subspaces of R^n give about max(i, j) / n.
    """
    j = i if j is None else j
    if side not in ("left", "right"):
        raise ValueError(f"side must be 'left' or 'right', got {side!r}")
    A, B = _check_matrix(W1, "W1"), _check_matrix(W2, "W2")
    if side == "right":
        A, B = A.T, B.T
    if A.shape[0] != B.shape[0]:
        raise ValueError(
            f"W1 and W2 must share their {side} dimension to compare {side} singular vectors: "
            f"got shapes {tuple(W1.shape)} and {tuple(W2.shape)}"
        )
    i, j = _check_rank(i, A, "i"), _check_rank(j, B, "j")
    U1 = torch.linalg.svd(A, full_matrices=False).U[:, :i]
    U2 = torch.linalg.svd(B, full_matrices=False).U[:, :j]
    return float((U1.T @ U2).pow(2).sum() / min(i, j))


def low_rank_parameters(d: int, k: int, r: int) -> int:
    """Parameters of a rank-r factorisation B (d x r) times A (r x k): r (d + k), against d k."""
    for name, value in (("d", d), ("k", k), ("r", r)):
        check_int(value, name)
    if r > min(d, k):
        raise ValueError(f"r must be at most min(d, k) = {min(d, k)}, got {r}")
    return r * (d + k)
