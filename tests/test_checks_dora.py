"""Chapter 6's checkers accept the right answers and reject wrong ones with a useful sentence."""

import pytest
import torch
import torch.nn.functional as F

from lora_edu.checks import CheckFailed
from lora_edu.checks.dora import (
    check_dora_forward,
    check_dora_merge_conv1d,
    check_dora_parameters,
    check_magnitude_only,
    check_weight_decomposition,
)
from lora_edu.gpt2 import load_tiny
from lora_edu.lora import add_lora


def stub(*args):
    raise NotImplementedError("Exercise hint")


# --- Exercise 6.1: the DoRA forward pass ---

def right_forward(x, W0, b0, A, B, m, alpha, r):
    V = W0 + (alpha / r) * B @ A
    return x @ (m[:, None] * V / V.norm(dim=1, keepdim=True).detach()).T + b0


def linear_forward(x, W0, b0, A, B, m, alpha, r):  # also right: scale the output columns
    V = W0 + alpha / r * (B @ A)
    return F.linear(x, V) * (m / torch.linalg.norm(V, dim=1).detach()) + b0


def undetached_forward(x, W0, b0, A, B, m, alpha, r):  # the right values, the norm differentiated
    V = W0 + (alpha / r) * B @ A
    return x @ (m[:, None] * V / V.norm(dim=1, keepdim=True)).T + b0


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
    "norm not detached": (undetached_forward, "through the norm too"),
    "no autograd": (lambda *args: right_forward(*args).detach(), "through autograd"),
    "m not trained": (lambda x, W0, b0, A, B, m, alpha, r: right_forward(x, W0, b0, A, B, m.detach(), alpha, r),
                      "gradients with respect to B or m are not DoRA's"),
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


# --- Exercise 6.2: merging into a Conv1D weight (in, out) ---

def right_merge(weight, A, B, m, alpha, r):
    V = weight.T + (alpha / r) * B @ A
    return (m[:, None] * V / V.norm(dim=1, keepdim=True)).T


def right_merge_in_place(weight, A, B, m, alpha, r):  # also right: stay in (in, out), columns are outputs
    V = weight + (alpha / r) * (B @ A).T
    return V * (m / V.norm(dim=0))


def linear_style_merge(weight, A, B, m, alpha, r):  # nn.Linear's code on Conv1D's weight
    V = weight + (alpha / r) * (B @ A).T
    return m[:, None] * V / V.norm(dim=1, keepdim=True)


WRONG_MERGES = {
    "returned (out, in)": (lambda *args: right_merge(*args).T, "transpose back"),
    "norm per input": (linear_style_merge, "wrong axis"),
    "norm per input, m on columns": (lambda weight, A, B, m, alpha, r: m * (weight + (alpha / r) * (B @ A).T)
                                     / (weight + (alpha / r) * (B @ A).T).norm(dim=1, keepdim=True), "wrong axis"),
    "B A not transposed": (lambda weight, A, B, m, alpha, r: (m[:, None] * (weight + (alpha / r) * B @ A)
                                                             / (weight + (alpha / r) * B @ A).norm(dim=1, keepdim=True)).T,
                           "transpose it"),
    "no magnitude": (lambda weight, A, B, m, alpha, r: right_merge(weight, A, B, torch.ones_like(m), alpha, r),
                     "magnitude m is missing"),
    "merges LoRA": (lambda weight, A, B, m, alpha, r: weight + (alpha / r) * (B @ A).T, "merges LoRA"),
    "wrong shape": (lambda *args: right_merge(*args)[:2], "shape"),
}


@pytest.mark.parametrize("right", [right_merge, right_merge_in_place])
def test_dora_merge_conv1d_accepts(right, capsys):
    check_dora_merge_conv1d(right)
    assert capsys.readouterr().out.startswith("Correct")


@pytest.mark.parametrize("name", WRONG_MERGES)
def test_dora_merge_conv1d_rejects(name):
    fn, message = WRONG_MERGES[name]
    with pytest.raises(CheckFailed, match=message):
        check_dora_merge_conv1d(fn)


# --- Exercise 6.3: ΔM and ΔD ---

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


# --- Exercise 6.4: DoRA's parameters ---

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


# --- Exercise 6.5 (open): the magnitudes alone ---

def magnitude_only_model():
    model = add_lora(load_tiny(), "all-linear", r=8, alpha=16, use_dora=True)
    for name, p in model.named_parameters():
        if "lora_" in name:
            p.requires_grad_(False)
    return model


def scale_magnitudes(model, factor):
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("magnitude"):
                p.mul_(factor)
    return model


def test_magnitude_only_accepts_a_trained_model(capsys):
    from dataclasses import replace

    from lora_edu.data import load_split
    from lora_edu.train import MILTON_FINE_TUNE, seed_everything, train

    seed_everything(0)
    model = magnitude_only_model()
    config = replace(MILTON_FINE_TUNE, steps=60, warmup_steps=6, lr=3e-2, eval_every=60, eval_batches=1)
    train(model, load_split("milton", "train"), load_split("milton", "val"), config, progress=False)
    check_magnitude_only(model)
    assert capsys.readouterr().out.startswith("Correct")


def test_magnitude_only_rejects_an_untrained_model():
    with pytest.raises(CheckFailed, match="not been trained"):
        check_magnitude_only(magnitude_only_model())


def test_magnitude_only_rejects_a_model_that_learned_too_little():
    with pytest.raises(CheckFailed, match="Try other learning rates"):
        check_magnitude_only(scale_magnitudes(magnitude_only_model(), 1.0001))


def test_magnitude_only_rejects_moved_b():
    model = magnitude_only_model()
    with torch.no_grad():
        next(p for n, p in model.named_parameters() if "lora_B" in n).add_(0.01)
    with pytest.raises(CheckFailed, match="B has moved"):
        check_magnitude_only(scale_magnitudes(model, 1.01))


def test_magnitude_only_rejects_other_trainable_parameters():
    model = scale_magnitudes(magnitude_only_model(), 1.01)
    next(p for n, p in model.named_parameters() if "lora_A" in n).requires_grad_(True)
    with pytest.raises(CheckFailed, match="only the magnitude vectors"):
        check_magnitude_only(model)


def test_magnitude_only_rejects_plain_lora():
    with pytest.raises(CheckFailed, match="no DoRA layers"):
        check_magnitude_only(add_lora(load_tiny(), "all-linear", r=8, alpha=16))
