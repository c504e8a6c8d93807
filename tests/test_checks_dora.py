"""Chapter 6's checkers accept the right answers and reject wrong ones with a useful sentence."""

import pytest
import torch
import torch.nn.functional as F

from lora_edu.checks import CheckFailed
from lora_edu.checks.dora import check_dora_forward, check_dora_parameters, check_weight_decomposition


def stub(*args):
    raise NotImplementedError("Exercise hint")


# --- Exercise 6.1: the DoRA forward pass ---

def right_forward(x, W0, b0, A, B, m, alpha, r):
    V = W0 + (alpha / r) * B @ A
    return x @ (m[:, None] * V / V.norm(dim=1, keepdim=True)).T + b0


def linear_forward(x, W0, b0, A, B, m, alpha, r):  # also right: scale the output columns
    V = W0 + alpha / r * (B @ A)
    return F.linear(x, V) * (m / torch.linalg.norm(V, dim=1)) + b0


def unit(V, dim=1):
    return V / V.norm(dim=dim, keepdim=True)


WRONG_FORWARDS = {
    "norm over columns": (lambda x, W0, b0, A, B, m, alpha, r: x @ (m[:, None] * (W0 + alpha / r * B @ A)
                          / (W0 + alpha / r * B @ A).norm(dim=0, keepdim=True)).T + b0, "wrong axis"),
    "no magnitude": (lambda x, W0, b0, A, B, m, alpha, r: x @ unit(W0 + alpha / r * B @ A).T + b0, "magnitude m is missing"),
    "plain LoRA": (lambda x, W0, b0, A, B, m, alpha, r: x @ (W0 + alpha / r * B @ A).T + b0, "that is LoRA"),
    "normalised activations": (lambda x, W0, b0, A, B, m, alpha, r: m * F.normalize(x @ (W0 + alpha / r * B @ A).T, dim=-1) + b0,
                               "normalised the output"),
    "unscaled update": (lambda x, W0, b0, A, B, m, alpha, r: x @ (m[:, None] * unit(W0 + B @ A)).T + b0, "not scaled"),
    "no bias": (lambda x, W0, b0, A, B, m, alpha, r: x @ (m[:, None] * unit(W0 + alpha / r * B @ A)).T, "bias is missing"),
    "scaled bias": (lambda x, W0, b0, A, B, m, alpha, r: m * (x @ unit(W0 + alpha / r * B @ A).T + b0), "bias must not be scaled"),
    "wrong shape": (lambda x, W0, b0, A, B, m, alpha, r: right_forward(x, W0, b0, A, B, m, alpha, r).sum(-1), "should have shape"),
}


@pytest.mark.parametrize("right", [right_forward, linear_forward])
def test_dora_forward_accepts(right, capsys):
    check_dora_forward(right)
    assert capsys.readouterr().out.startswith("Correct")


@pytest.mark.parametrize("name", WRONG_FORWARDS)
def test_dora_forward_rejects(name):
    fn, message = WRONG_FORWARDS[name]
    with pytest.raises(CheckFailed, match=message):
        check_dora_forward(fn)


def test_dora_forward_stub():
    with pytest.raises(CheckFailed, match="still the stub"):
        check_dora_forward(stub)


# --- Exercise 6.2: ΔM and ΔD ---

def right_decompose(W0, W):
    delta_m = (W.norm(dim=1) - W0.norm(dim=1)).abs().mean()
    delta_d = (1 - F.cosine_similarity(W, W0, dim=1)).mean()
    return delta_m.item(), delta_d.item()


WRONG_DECOMPOSE = {
    "signed magnitude change": (lambda W0, W: ((W.norm(dim=1) - W0.norm(dim=1)).mean().item(), right_decompose(W0, W)[1]),
                                "signed mean"),
    "column norms": (lambda W0, W: ((W.norm(dim=0) - W0.norm(dim=0)).abs().mean().item(), right_decompose(W0, W)[1]),
                     "per output row"),
    "column cosines": (lambda W0, W: (right_decompose(W0, W)[0], (1 - F.cosine_similarity(W, W0, dim=0)).mean().item()),
                       "not the columns"),
    "cosine, not 1 - cosine": (lambda W0, W: (right_decompose(W0, W)[0], F.cosine_similarity(W, W0, dim=1).mean().item()),
                               "1 minus the cosine"),
    "not a pair": (lambda W0, W: right_decompose(W0, W)[0], "should return a pair"),
}


def test_weight_decomposition_accepts(capsys):
    check_weight_decomposition(right_decompose)
    assert capsys.readouterr().out.startswith("Correct")


@pytest.mark.parametrize("name", WRONG_DECOMPOSE)
def test_weight_decomposition_rejects(name):
    fn, message = WRONG_DECOMPOSE[name]
    with pytest.raises(CheckFailed, match=message):
        check_weight_decomposition(fn)


# --- Exercise 6.3: DoRA's parameters ---

def right_extra(in_features, out_features, r):
    return r * (in_features + out_features) + out_features


def test_dora_parameters_accepts(capsys):
    check_dora_parameters(right_extra, 9)
    assert "r=9" in capsys.readouterr().out


@pytest.mark.parametrize("fn, rank, message", [
    (lambda i, o, r: r * (i + o), 9, "plain LoRA"),
    (lambda i, o, r: o, 9, "only the magnitude"),
    (lambda i, o, r: r * (i + o) + i, 9, "not per input"),
    (right_extra, 8, "not 8"),
    (right_extra, 10, "not 10"),
])
def test_dora_parameters_rejects(fn, rank, message):
    with pytest.raises(CheckFailed, match=message):
        check_dora_parameters(fn, rank)
