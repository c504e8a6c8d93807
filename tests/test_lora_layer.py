"""Tests of lora_edu.lora_layer: LoRALinear computes W0 x + b + (alpha / r) B A x, merges and unmerges."""

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lora_edu.lora_layer import LoRALinear, is_conv1d, is_linear, is_quantized, lora_scaling
from lora_edu.nf4 import NF4Linear

PROPERTY = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


# --- helpers ---

def conv1d(in_features, out_features):
    """HF GPT-2's Conv1D (weight stored (in, out)), with a non-zero bias."""
    Conv1D = pytest.importorskip("transformers.pytorch_utils").Conv1D
    layer = Conv1D(out_features, in_features)  # Conv1D(nf=out, nx=in)
    with torch.no_grad():
        layer.bias.normal_()
    return layer


def linear(in_features, out_features):
    return nn.Linear(in_features, out_features)  # PyTorch initialises the bias non-zero


def make_base(kind, in_features=7, out_features=5):
    return conv1d(in_features, out_features) if kind == "conv1d" else linear(in_features, out_features)


def wrap(base, **kwargs):
    kwargs.setdefault("r", 3)
    kwargs.setdefault("alpha", 6)
    return LoRALinear(base, fan_in_fan_out=not isinstance(base, nn.Linear), **kwargs)


def w0_out_in(base):
    """The base weight as (out, in), whatever its storage."""
    return base.weight if isinstance(base, nn.Linear) else base.weight.T


# --- the layer ---

@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_a_fresh_layer_computes_exactly_what_its_base_layer_does(kind):
    base = make_base(kind)
    layer = wrap(base, dropout=0.5)
    assert torch.count_nonzero(layer.lora_A.weight) == layer.lora_A.weight.numel()  # A is random...
    assert torch.count_nonzero(layer.lora_B.weight) == 0  # ...and B is zero
    assert not any(p.requires_grad for p in base.parameters())  # W0 and b are frozen
    assert layer.lora_A.weight.requires_grad and layer.lora_B.weight.requires_grad
    x = torch.randn(4, 3, 7)
    expected = base(x)
    assert torch.equal(layer.eval()(x), expected)
    assert torch.equal(layer.train()(x), expected)  # dropout on the LoRA path meets B = 0


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
@pytest.mark.parametrize("use_rslora, scaling", [(False, 6 / 3), (True, 6 / math.sqrt(3))])
def test_forward_is_w0_x_plus_b_plus_scaled_b_a_x(kind, use_rslora, scaling, randomize_lora):
    base = make_base(kind, 7, 5)
    layer = wrap(base, r=3, alpha=6, use_rslora=use_rslora)
    randomize_lora(layer)
    assert (layer.in_features, layer.out_features, layer.r) == (7, 5, 3)
    assert layer.scaling == pytest.approx(scaling) and layer.scaling == lora_scaling(6, 3, use_rslora)
    A, B = layer.lora_A.weight, layer.lora_B.weight
    assert A.shape == (3, 7) and B.shape == (5, 3)
    x = torch.randn(4, 7)
    expected = x @ w0_out_in(base).T + base.bias + scaling * (x @ A.T @ B.T)
    torch.testing.assert_close(layer(x), expected)
    delta = layer.delta_weight()
    assert delta.shape == base.weight.shape  # laid out like the base weight
    torch.testing.assert_close(delta if kind == "linear" else delta.T, scaling * B @ A)


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_merge_keeps_the_outputs_and_unmerge_restores_the_weight(kind, randomize_lora):
    base = make_base(kind, 7, 5)
    layer = wrap(base)
    randomize_lora(layer, std=0.5)
    x = torch.randn(4, 7)
    before, w0, merged = layer(x), base.weight.detach().clone(), layer.merged_weight().detach().clone()
    layer.merge()
    assert layer.merged and torch.equal(base.weight, merged)  # merged_weight says what merge writes
    torch.testing.assert_close(base.weight.detach(), w0 + layer.delta_weight().detach())
    assert not torch.allclose(base.weight, w0)  # the update really went into W0
    torch.testing.assert_close(layer(x), before, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(base(x), before, atol=1e-6, rtol=1e-5)  # the base layer alone now does it
    layer.unmerge()
    assert not layer.merged
    torch.testing.assert_close(base.weight.detach(), w0, atol=1e-6, rtol=0)
    torch.testing.assert_close(layer(x), before, atol=1e-6, rtol=1e-5)


def test_merging_twice_or_unmerging_an_unmerged_layer_is_refused(randomize_lora):
    layer = wrap(linear(7, 5))
    randomize_lora(layer)
    with pytest.raises(RuntimeError, match="not merged; there is nothing to unmerge"):
        layer.unmerge()
    layer.merge()
    merged_weight = layer.base_layer.weight.detach().clone()
    with pytest.raises(RuntimeError, match="already merged"):
        layer.merge()
    assert torch.equal(layer.base_layer.weight, merged_weight)  # B A was not added twice


@pytest.mark.parametrize("bad", [1e30, float("nan")])
def test_a_merge_that_would_overflow_is_refused_and_changes_nothing(bad):
    layer = wrap(linear(7, 5))
    with torch.no_grad():
        layer.lora_A.weight.fill_(1e30)  # B A = 1e60 * r: inf in float32
        layer.lora_B.weight.fill_(bad)
    w0 = layer.base_layer.weight.detach().clone()
    with pytest.raises(ValueError, match="non-finite"):
        layer.merge()
    assert torch.equal(layer.base_layer.weight, w0) and not layer.merged


def test_eval_and_train_do_not_merge(randomize_lora):
    base = linear(7, 5)
    layer = wrap(base)
    randomize_lora(layer)
    w0, x = base.weight.detach().clone(), torch.randn(3, 7)
    expected = base(x) + layer.scaling * (x @ layer.lora_A.weight.T @ layer.lora_B.weight.T)
    for mode in (layer.eval, layer.train, layer.eval):
        mode()
        assert not layer.merged and torch.equal(base.weight, w0)
        torch.testing.assert_close(layer(x), expected)


def test_dropout_acts_on_the_lora_path_only_and_only_in_training(randomize_lora):
    base = linear(7, 5)
    layer = wrap(base, dropout=0.5)
    randomize_lora(layer)
    assert layer.dropout == 0.5
    x = torch.randn(8, 7)
    A, B, s = layer.lora_A.weight, layer.lora_B.weight, layer.scaling
    layer.eval()
    torch.testing.assert_close(layer(x), base(x) + s * (x @ A.T @ B.T))
    layer.train()
    torch.manual_seed(1)
    y = layer(x)
    torch.manual_seed(1)
    kept = F.dropout(torch.ones_like(x), 0.5, training=True)  # the same mask, scaled by 1/(1-p)
    assert 0 < torch.count_nonzero(kept) < x.numel()
    torch.testing.assert_close(y, base(x) + s * ((x * kept) @ A.T @ B.T))  # base(x) itself is not dropped
    assert not torch.allclose(layer(x), y)  # a new mask each call


# --- property tests ---

@st.composite
def layer_cases(draw):
    return dict(
        in_features=draw(st.integers(1, 40)),
        out_features=draw(st.integers(1, 40)),
        r=draw(st.integers(1, 8)),
        alpha=draw(st.floats(0.1, 64)),
        dtype=draw(st.sampled_from([torch.float32, torch.float64])),
        kind=draw(st.sampled_from(["linear", "conv1d"])),
        use_rslora=draw(st.booleans()),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


def build(case):
    torch.manual_seed(case["seed"])
    base = make_base(case["kind"], case["in_features"], case["out_features"]).to(case["dtype"])
    layer = wrap(base, r=case["r"], alpha=case["alpha"], use_rslora=case["use_rslora"])
    x = torch.randn(3, case["in_features"], dtype=case["dtype"])
    return base, layer, x


@PROPERTY
@given(layer_cases())
def test_property_b_zero_leaves_the_outputs_unchanged(case):
    base, layer, x = build(case)
    assert layer.lora_A.weight.dtype == case["dtype"]
    assert torch.equal(layer(x), base(x))


@PROPERTY
@given(layer_cases(), st.floats(1e-3, 10.0))
def test_property_merge_unmerge_round_trip(randomize_lora, case, std):
    base, layer, x = build(case)
    randomize_lora(layer, std=std)
    eps = torch.finfo(case["dtype"]).eps
    w0 = base.weight.detach().clone()
    A, B = layer.lora_A.weight.detach(), layer.lora_B.weight.detach()
    delta, delta_size = layer.scaling * B @ A, layer.scaling * B.abs() @ A.abs()  # (out, in), by hand
    if case["kind"] == "conv1d":
        delta, delta_size = delta.T, delta_size.T
    before = layer(x).detach()

    layer.merge()
    # B A rounds each of its r products and sums, the merge adds once: a few eps of the sizes.
    weight_tol = 4 * eps * (case["r"] + 1) * (w0.abs() + delta_size)
    assert ((base.weight - (w0 + delta)).abs() <= weight_tol).all()
    # Both forms accumulate in + r products: bound their difference the same way.
    magnitude = x.abs() @ w0_out_in(base).abs().T + layer.scaling * (x.abs() @ A.abs().T @ B.abs().T) + base.bias.abs()
    output_tol = 8 * eps * (case["in_features"] + case["r"] + 2) * magnitude
    assert ((layer(x) - before).abs() <= output_tol).all()

    layer.unmerge()
    assert ((base.weight - w0).abs() <= weight_tol).all()


# --- refusals ---

def test_layer_refuses_the_wrong_fan_in_fan_out_and_non_linear_bases():
    with pytest.raises(ValueError, match="Conv1D, whose weight is \\(in, out\\): pass fan_in_fan_out=True"):
        LoRALinear(conv1d(7, 5), r=2, alpha=2)
    with pytest.raises(ValueError, match="nn.Linear, whose weight is \\(out, in\\): pass fan_in_fan_out=False"):
        LoRALinear(linear(7, 5), r=2, alpha=2, fan_in_fan_out=True)
    with pytest.raises(TypeError, match="must be nn.Linear, a GPT-2 Conv1D or a 4-bit linear layer, got LayerNorm"):
        LoRALinear(nn.LayerNorm(7), r=2, alpha=2)


def test_an_integer_weight_gets_a_clear_error():
    """Not PyTorch's "Only Tensors of floating point ... can require gradients"."""
    int_layer = nn.Linear(4, 4)
    int_layer.weight = nn.Parameter(torch.ones(4, 4, dtype=torch.int8), requires_grad=False)
    with pytest.raises(TypeError, match="base_layer's weight must be floating-point .*got torch.int8"):
        LoRALinear(int_layer, r=2, alpha=2)


def test_the_predicates_say_what_lora_can_wrap():
    Conv1D = pytest.importorskip("transformers.pytorch_utils").Conv1D
    linear_, conv, nf4 = nn.Linear(64, 32), Conv1D(32, 64), NF4Linear.from_linear(nn.Linear(64, 32))
    assert all(is_linear(m) for m in (linear_, conv, nf4))
    assert not any(is_linear(m) for m in (nn.LayerNorm(4), nn.Embedding(4, 4), nn.Conv1d(4, 4, 1)))
    assert is_conv1d(conv) and not is_conv1d(linear_) and not is_conv1d(nn.Conv1d(4, 4, 1))
    assert is_quantized(nf4) and not is_quantized(linear_) and not is_quantized(conv)
