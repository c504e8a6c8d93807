"""Chapter 6's checkers accept the right answers and reject wrong ones with a useful sentence."""

import pytest
import torch

from lora_edu.checks import CheckFailed
from lora_edu.checks.ch06_dora import (
    check_dora_merge_conv1d,
    check_dora_serving,
    check_dora_unmerge_conv1d,
    check_factored_row_norms,
    check_magnitude_only,
)
from lora_edu.gpt2 import load_tiny
from lora_edu.lora import add_lora


def stub(*args):
    raise NotImplementedError("Exercise hint")


# --- Exercise 6.1: the row norms of W0 + s B A without the dense matrix ---

def squared_parts(weight, A, B, scaling, fan_in_fan_out=False):
    W0 = weight.T if fan_in_fan_out else weight
    return (W0 * W0).sum(1), (B * (W0 @ A.T)).sum(1), ((B @ (A @ A.T)) * B).sum(1)


def right_row_norms(weight, A, B, scaling, fan_in_fan_out=False):
    n0, cross, quad = squared_parts(weight, A, B, scaling, fan_in_fan_out)
    return (n0 + 2 * scaling * cross + scaling**2 * quad).sqrt()


def right_row_norms_einsum(weight, A, B, scaling, fan_in_fan_out=False):  # also right: (B A) never formed
    W0 = weight.T if fan_in_fan_out else weight
    WA = W0 @ A.T  # (out, r)
    return torch.sqrt(W0.norm(dim=1) ** 2 + 2 * scaling * torch.einsum("or,or->o", B, WA)
                      + scaling**2 * torch.einsum("or,rs,os->o", B, A @ A.T, B))


def dense_row_norms(weight, A, B, scaling, fan_in_fan_out=False):  # right values, the dense matrix formed
    W0 = weight.T if fan_in_fan_out else weight
    return torch.linalg.norm(W0 + scaling * B @ A, dim=1)


def parts_then(combine):
    return lambda weight, A, B, s, f=False: combine(*squared_parts(weight, A, B, s, f), s)


WRONG_ROW_NORMS = {
    "dense matrix": (dense_row_norms, "computes the product B A"),
    "dense matrix, summed first": (lambda w, A, B, s, f=False: ((w.T if f else w) + B @ (s * A)).norm(dim=1),
                                   "computes the product B A"),
    "dense sum from a scaled product": (lambda w, A, B, s, f=False: torch.linalg.norm(
        torch.addmm(w.T if f else w, B, A, alpha=s), dim=1), "the dense matrix W0 \\+ s B A"),
    "dense update only": (lambda w, A, B, s, f=False: ((w.T if f else w).norm(dim=1) ** 2
                                                        + 2 * s * squared_parts(w, A, B, s, f)[1]
                                                        + (s * B @ A).square().sum(1)).sqrt(),
                          "the product B A"),
    "no square root": (parts_then(lambda n0, c, q, s: n0 + 2 * s * c + s**2 * q), "square root"),
    "cross term once": (parts_then(lambda n0, c, q, s: (n0 + s * c + s**2 * q).sqrt()), "counts twice"),
    "no cross term": (parts_then(lambda n0, c, q, s: (n0 + s**2 * q).sqrt()), "cross term .* is missing"),
    "scale once on the quadratic": (parts_then(lambda n0, c, q, s: (n0 + 2 * s * c + s * q).sqrt()),
                                    "scale enters twice"),
    "no scaling": (parts_then(lambda n0, c, q, s: (n0 + 2 * c + q).sqrt()), "scaling is missing"),
    "W0 alone": (lambda w, A, B, s, f=False: (w.T if f else w).norm(dim=1), "W0 alone"),
    "layout ignored": (lambda w, A, B, s, f=False: right_row_norms(w, A, B, s, False),
                       "transpose of what you are given"),
    "one per input": (lambda w, A, B, s, f=False: right_row_norms(w, A, B, s, f) if not f else w.norm(dim=1),
                      "transpose of what you are given"),  # the square Conv1D case comes first
    "one per input, non-square": (lambda w, A, B, s, f=False: w.norm(dim=1) if f and w.shape[0] != w.shape[1]
                                  else right_row_norms(w, A, B, s, f), "one per input"),
}


@pytest.mark.parametrize("right", [right_row_norms, right_row_norms_einsum])
def test_factored_row_norms_accepts(right, capsys):
    check_factored_row_norms(right)
    assert capsys.readouterr().out.startswith("Correct")


@pytest.mark.parametrize("name", WRONG_ROW_NORMS)
def test_factored_row_norms_rejects(name):
    fn, message = WRONG_ROW_NORMS[name]
    with pytest.raises(CheckFailed, match=message):
        check_factored_row_norms(fn)


def test_factored_row_norms_stub():
    with pytest.raises(CheckFailed, match="still the stub"):
        check_factored_row_norms(stub)


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


# --- Exercise 6.3: DoRA served with one vector per adapter ---

def right_vector(W0, A, B, m, scaling):
    return m / torch.linalg.norm(W0 + scaling * B @ A, dim=1)


def right_serve(x, W0, b0, A, B, g, scaling, index):
    base = x @ W0.T
    lora = torch.einsum("bor,bri,bi->bo", B[index], A[index], x) * scaling[index, None]
    gi = g[index]
    return base + b0 + (gi - 1) * base + gi * lora


def serve_by_rows(x, W0, b0, A, B, g, scaling, index):  # also right: one row at a time
    rows = []
    for i, k in enumerate(index.tolist()):
        w = W0 + scaling[k] * B[k] @ A[k]
        rows.append(g[k] * (w @ x[i]) + b0)
    return torch.stack(rows)


WRONG_VECTORS = {
    "norm of W0": (lambda W0, A, B, m, s: m / W0.norm(dim=1), "norms of W0 alone"),
    "m itself": (lambda W0, A, B, m, s: m, "magnitude m itself"),
    "upside down": (lambda W0, A, B, m, s: 1 / right_vector(W0, A, B, m, s), "upside down"),
    "unscaled update": (lambda W0, A, B, m, s: m / (W0 + B @ A).norm(dim=1), "not scaled"),
    "multiplied by the norm": (lambda W0, A, B, m, s: m * (W0 + s * B @ A).norm(dim=1),
                               "usual slips: once the weights are fixed, work out what the layer multiplies"),
    "norm per input": (lambda W0, A, B, m, s: m[: W0.shape[1]] / (W0 + s * B @ A).norm(dim=0)[: W0.shape[0]]
                       if W0.shape[1] >= W0.shape[0] else (W0 + s * B @ A).norm(dim=0), "shape|usual slips"),
}


def base_not_rescaled(x, W0, b0, A, B, g, scaling, index):
    lora = torch.einsum("bor,bri,bi->bo", B[index], A[index], x) * scaling[index, None]
    return x @ W0.T + b0 + g[index] * lora


def bias_rescaled(x, W0, b0, A, B, g, scaling, index):
    lora = torch.einsum("bor,bri,bi->bo", B[index], A[index], x) * scaling[index, None]
    return g[index] * (x @ W0.T + lora + b0)


WRONG_SERVES = {
    "base not rescaled": (base_not_rescaled, "base output W0 x is not rescaled"),
    "bias rescaled": (bias_rescaled, "bias is rescaled"),
    "no scaling": (lambda x, W0, b0, A, B, g, s, i: right_serve(x, W0, b0, A, B, g, torch.ones_like(s), i),
                   "not scaled by its adapter"),
    "adapter 0 for all": (lambda x, W0, b0, A, B, g, s, i: right_serve(x, W0, b0, A, B, g, s, torch.zeros_like(i)),
                          "every row used adapter 0"),
    "adapters shifted": (lambda x, W0, b0, A, B, g, s, i: right_serve(x, W0, b0, A, B, g, s, (i + 1) % len(s)),
                         "rows .* are wrong"),
    "wrong shape": (lambda *args: right_serve(*args).sum(-1), "should have shape"),
}


def test_dora_serving_accepts(capsys):
    for serve in (right_serve, serve_by_rows):
        check_dora_serving(right_vector, serve)
        assert capsys.readouterr().out.startswith("Correct")


@pytest.mark.parametrize("name", WRONG_VECTORS)
def test_dora_serving_rejects_vector(name):
    fn, message = WRONG_VECTORS[name]
    with pytest.raises(CheckFailed, match=message):
        check_dora_serving(fn, right_serve)


@pytest.mark.parametrize("name", WRONG_SERVES)
def test_dora_serving_rejects_serve(name):
    fn, message = WRONG_SERVES[name]
    with pytest.raises(CheckFailed, match=message):
        check_dora_serving(right_vector, fn)


def test_dora_serving_matches_lora_edu_serving_formula():
    """The checker's reference is the DoRA layer itself; the formula the chapter gives agrees with it."""
    from lora_edu.checks.ch06_dora import _dora_layer_output, _serving_case

    W0, b0, A, B, m, scaling = _serving_case(torch.Generator().manual_seed(0), 5, 7, 2, 3)
    x = torch.randn(4, 7, dtype=torch.float64)
    g = torch.stack([right_vector(W0, A[k], B[k], m[k], float(scaling[k])) for k in range(3)])
    index = torch.tensor([2, 2, 2, 2])
    want = _dora_layer_output(x, W0, b0, A[2], B[2], m[2], scaling[2])
    assert torch.allclose(right_serve(x, W0, b0, A, B, g, scaling, index), want, atol=1e-10)


# --- Exercise 6.4: unmerging DoRA from a Conv1D weight (in, out) ---

def right_unmerge(merged, A, B, m, norm, alpha, r):
    return merged / (m / norm) - (alpha / r) * (B @ A).T


def right_unmerge_linear_layout(merged, A, B, m, norm, alpha, r):  # also right: via (out, in)
    V = merged.T / (m / norm)[:, None]
    return (V - (alpha / r) * B @ A).T


WRONG_UNMERGES = {
    "rows divided (PEFT #3531)": (lambda M, A, B, m, n, a, r: M / (m / n)[:, None] - (a / r) * (B @ A).T,
                                  "each row of the \\(in, out\\) weight|shape"),
    "update kept": (lambda M, A, B, m, n, a, r: M / (m / n), "still in it"),
    "rescaling kept": (lambda M, A, B, m, n, a, r: M - (a / r) * (B @ A).T, "not undone first"),
    "multiplied again": (lambda M, A, B, m, n, a, r: M * (m / n) - (a / r) * (B @ A).T, "dividing"),
    "unscaled update": (lambda M, A, B, m, n, a, r: M / (m / n) - (B @ A).T, "not scaled"),
    "B A not transposed": (lambda M, A, B, m, n, a, r: M / (m / n) - (a / r) * (B @ A) if M.shape[0] == M.shape[1]
                           else M, "transpose it"),
    "norm recomputed": (lambda M, A, B, m, n, a, r: M / (m / M.norm(dim=0)) - (a / r) * (B @ A).T,
                        "not undone first \\(if you recomputed that norm from the merged"),
    "returned (out, in)": (lambda *args: right_unmerge(*args).T, "transpose back"),
}


@pytest.mark.parametrize("right", [right_unmerge, right_unmerge_linear_layout])
def test_dora_unmerge_conv1d_accepts(right, capsys):
    check_dora_unmerge_conv1d(right)
    assert capsys.readouterr().out.startswith("Correct")


@pytest.mark.parametrize("name", WRONG_UNMERGES)
def test_dora_unmerge_conv1d_rejects(name):
    fn, message = WRONG_UNMERGES[name]
    with pytest.raises(CheckFailed, match=message):
        check_dora_unmerge_conv1d(fn)


def test_dora_unmerge_inverts_lora_edu_merge():
    """The checker's merged weight is what DoRALinear.merge stores on a fan_in_fan_out layer."""
    from lora_edu.dora import DoRALinear

    g = torch.Generator().manual_seed(0)
    base = torch.nn.Linear(6, 4, dtype=torch.float64)
    conv = torch.nn.Module()
    conv.weight = torch.nn.Parameter(base.weight.detach().T.clone())  # (in, out)
    conv.bias = torch.nn.Parameter(base.bias.detach().clone())
    layer = DoRALinear(base, r=2, alpha=8.0).double()
    with torch.no_grad():
        layer.lora_B.weight.normal_(generator=g)
        layer.magnitude.mul_(1.3)
    w0 = layer.base_layer.weight.detach().clone()
    norm = layer.weight_norm().detach()
    layer.merge()
    merged = layer.base_layer.weight.detach().T  # (in, out), as Conv1D would hold it
    got = right_unmerge(merged, layer.lora_A.weight.detach(), layer.lora_B.weight.detach(),
                        layer.magnitude.detach(), norm, 8.0, 2)
    assert torch.allclose(got.T, w0, atol=1e-10)


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
