"""Tests of lora_edu.lora: the LoRA layer, add_lora, merging, and adapter files."""

import json
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open

from hf_models import small_hf_gpt2
from unchanged import assert_unchanged, snapshot
from lora_edu.gpt2 import GPT2, GPT2Config, load_checkpoint, save_checkpoint, state_dict_from_hf
from lora_edu.lora import add_lora, count_parameters, lora_layers, lora_state_dict, mark_only_lora_trainable, merge_lora
from lora_edu.lora_layer import LoRALinear
from lora_edu.peft_format import load_adapter, save_adapter

SMALL = GPT2Config(vocab_size=50, block_size=16, n_layer=2, n_head=2, n_embd=32)
ALL_LINEAR = [
    f"transformer.h.{i}.{m}" for i in range(2) for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
]
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


def randomize(model_or_layer, std=0.1):
    """Give every LoRA factor random values, so B A is not zero."""
    layers = [model_or_layer] if isinstance(model_or_layer, LoRALinear) else lora_layers(model_or_layer).values()
    with torch.no_grad():
        for layer in layers:
            layer.lora_A.weight.normal_(std=std)
            layer.lora_B.weight.normal_(std=std)


def small_gpt2(seed=0, config=SMALL):
    torch.manual_seed(seed)
    model = GPT2(config).eval()
    with torch.no_grad():  # GPT2 initialises biases to zero; make them count
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.normal_(std=0.1)
    return model


def tokens(n=2, T=16):
    return torch.randint(0, SMALL.vocab_size, (n, T))


def hf_gpt2():
    pytest.importorskip("transformers")
    return small_hf_gpt2()


def logits(model, idx):
    """The logits of our GPT2 or of a Hugging Face model."""
    out = model(idx)
    return out if isinstance(out, torch.Tensor) else out.logits


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
def test_forward_is_w0_x_plus_b_plus_scaled_b_a_x(kind, use_rslora, scaling):
    base = make_base(kind, 7, 5)
    layer = wrap(base, r=3, alpha=6, use_rslora=use_rslora)
    randomize(layer)
    assert (layer.in_features, layer.out_features, layer.r) == (7, 5, 3)
    assert layer.scaling == pytest.approx(scaling)
    A, B = layer.lora_A.weight, layer.lora_B.weight
    assert A.shape == (3, 7) and B.shape == (5, 3)
    x = torch.randn(4, 7)
    expected = x @ w0_out_in(base).T + base.bias + scaling * (x @ A.T @ B.T)
    torch.testing.assert_close(layer(x), expected)
    delta = layer.delta_weight()
    assert delta.shape == base.weight.shape  # laid out like the base weight
    torch.testing.assert_close(delta if kind == "linear" else delta.T, scaling * B @ A)


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_merge_keeps_the_outputs_and_unmerge_restores_the_weight(kind):
    base = make_base(kind, 7, 5)
    layer = wrap(base)
    randomize(layer, std=0.5)
    x = torch.randn(4, 7)
    before, w0 = layer(x), base.weight.detach().clone()
    layer.merge()
    assert layer.merged
    torch.testing.assert_close(base.weight.detach(), w0 + layer.delta_weight().detach())
    assert not torch.allclose(base.weight, w0)  # the update really went into W0
    torch.testing.assert_close(layer(x), before, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(base(x), before, atol=1e-6, rtol=1e-5)  # the base layer alone now does it
    layer.unmerge()
    assert not layer.merged
    torch.testing.assert_close(base.weight.detach(), w0, atol=1e-6, rtol=0)
    torch.testing.assert_close(layer(x), before, atol=1e-6, rtol=1e-5)


def test_merging_twice_or_unmerging_an_unmerged_layer_is_refused():
    layer = wrap(linear(7, 5))
    randomize(layer)
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


def test_eval_and_train_do_not_merge():
    base = linear(7, 5)
    layer = wrap(base)
    randomize(layer)
    w0, x = base.weight.detach().clone(), torch.randn(3, 7)
    expected = base(x) + layer.scaling * (x @ layer.lora_A.weight.T @ layer.lora_B.weight.T)
    for mode in (layer.eval, layer.train, layer.eval):
        mode()
        assert not layer.merged and torch.equal(base.weight, w0)
        torch.testing.assert_close(layer(x), expected)


def test_dropout_acts_on_the_lora_path_only_and_only_in_training():
    base = linear(7, 5)
    layer = wrap(base, dropout=0.5)
    randomize(layer)
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
def test_property_merge_unmerge_round_trip(case, std):
    base, layer, x = build(case)
    randomize(layer, std=std)
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


# --- add_lora on a model ---

def test_add_lora_freezes_the_base_and_trains_only_a_and_b():
    model = add_lora(small_gpt2(), r=4, alpha=8)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{m}.lora_{f}.weight" for m in ALL_LINEAR for f in "AB"}
    idx = tokens()
    _, loss = model.train()(idx, idx)
    loss.backward()
    for name, p in model.named_parameters():
        if name in trainable:
            assert p.grad is not None
        else:
            assert p.grad is None, name
    # With B = 0 the gradient reaches B (and through it, later, A).
    assert lora_layers(model)["transformer.h.0.attn.c_attn"].lora_B.weight.grad.abs().sum() > 0


def test_mark_only_lora_trainable_refreezes_after_unfreezing():
    model = add_lora(small_gpt2(), ["c_attn"], r=2, alpha=2)
    for p in model.parameters():
        p.requires_grad_(True)
    mark_only_lora_trainable(model)
    assert count_parameters(model)[0] == 2 * 2 * (32 + 96)


@pytest.mark.parametrize(
    "targets, expected",
    [
        (["c_attn"], ["transformer.h.0.attn.c_attn", "transformer.h.1.attn.c_attn"]),
        (["attn.c_proj", "c_fc"], [f"transformer.h.{i}.{m}" for i in range(2) for m in ("attn.c_proj", "mlp.c_fc")]),
        (("transformer.h.1.mlp.c_proj",), ["transformer.h.1.mlp.c_proj"]),
        (r"transformer\.h\.0\.(attn|mlp)\.c_proj", ["transformer.h.0.attn.c_proj", "transformer.h.0.mlp.c_proj"]),
        (r".*\.c_(attn|fc)", [f"transformer.h.{i}.{m}" for i in range(2) for m in ("attn.c_attn", "mlp.c_fc")]),
        ("all-linear", ALL_LINEAR),
    ],
)
def test_add_lora_targets(targets, expected):
    model = small_gpt2()
    idx = tokens()
    before = model(idx)
    add_lora(model, targets, r=2, alpha=4)
    assert sorted(lora_layers(model)) == sorted(expected)
    assert isinstance(model.lm_head, nn.Linear)  # never the tied output head by default
    assert torch.equal(model(idx), before)  # B = 0: the model is unchanged


def test_exclude_decides_what_all_linear_skips():
    names = sorted(lora_layers(add_lora(small_gpt2(), exclude=())))
    assert names == sorted(ALL_LINEAR + ["lm_head"])
    names = sorted(lora_layers(add_lora(small_gpt2(), exclude=["c_fc"])))
    assert names == sorted([n for n in ALL_LINEAR if not n.endswith("c_fc")] + ["lm_head"])
    names = sorted(lora_layers(add_lora(small_gpt2(), exclude=r".*c_fc")))  # a string is a regex, as in PEFT
    assert names == sorted([n for n in ALL_LINEAR if not n.endswith("c_fc")] + ["lm_head"])


def test_count_parameters_adds_r_times_in_plus_out_per_layer():
    model = small_gpt2()
    total = sum(p.numel() for p in model.parameters())  # the tied head counts once
    assert count_parameters(model) == (total, total)
    r, C = 4, SMALL.n_embd
    add_lora(model, r=r, alpha=8)
    # c_attn C -> 3C, attn.c_proj C -> C, c_fc C -> 4C, mlp.c_proj 4C -> C, in every block.
    per_block = r * ((C + 3 * C) + (C + C) + (C + 4 * C) + (4 * C + C))
    lora = SMALL.n_layer * per_block
    assert count_parameters(model) == (lora, total + lora)
    assert sum(v.numel() for v in lora_state_dict(model).values()) == lora


def test_add_lora_on_hugging_face_gpt2_wraps_its_conv1d_layers():
    hf = hf_gpt2()
    idx = tokens()
    before = hf(idx).logits
    add_lora(hf, r=4, alpha=8)
    layers = lora_layers(hf)
    assert sorted(layers) == sorted(ALL_LINEAR)
    assert all(type(layer.base_layer).__name__ == "Conv1D" and layer.fan_in_fan_out for layer in layers.values())
    assert layers["transformer.h.0.attn.c_attn"].lora_A.weight.shape == (4, 32)
    assert layers["transformer.h.0.attn.c_attn"].lora_B.weight.shape == (96, 4)
    assert isinstance(hf.lm_head, nn.Linear)
    assert torch.equal(hf(idx).logits, before)
    assert count_parameters(hf)[0] == SMALL.n_layer * 4 * (4 * 32 + 2 * 32 + 5 * 32 + 5 * 32)


# --- errors ---

@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(r=0), ValueError, "r must be a positive int, got 0"),
        (dict(r=-2), ValueError, "r must be a positive int"),
        (dict(r=2.0), ValueError, "r must be a positive int"),
        (dict(alpha=0), ValueError, "alpha must be a finite number > 0, got 0"),
        (dict(alpha=-1.5), ValueError, "alpha must be a finite number > 0"),
        (dict(alpha=float("inf")), ValueError, "alpha must be a finite number > 0"),
        (dict(dropout=1.0), ValueError, r"dropout must be in \[0, 1\), got 1.0"),
        (dict(dropout=-0.1), ValueError, r"dropout must be in \[0, 1\)"),
        (dict(targets=["ln_1"]), TypeError, r"targets are not: transformer.h.0.ln_1 \(LayerNorm\)"),
        (dict(targets=r".*\.attn"), TypeError, r"transformer.h.0.attn \(CausalSelfAttention\)"),
        (dict(targets=["q_proj"]), ValueError, r"no module matches 'q_proj'.*\['c_attn', 'c_fc', 'c_proj', 'lm_head'\]"),
        (dict(targets=["c_attn", "c_atn"]), ValueError, r"no module matches 'c_atn'; .*'c_attn'"),
        (dict(targets="c_attn"), ValueError, "no module matches 'c_attn'"),  # a string is a regex: full names
        (dict(targets=["proj"]), ValueError, "no module matches 'proj'"),  # whole name components, not substrings
        (dict(targets=[]), TypeError, "targets must be"),
        (dict(targets=3), TypeError, "targets must be"),
    ],
)
def test_add_lora_refuses_bad_arguments_and_leaves_the_model_alone(kwargs, error, message):
    model = small_gpt2()
    kwargs.setdefault("targets", "all-linear")
    with pytest.raises(error, match=message):
        add_lora(model, **kwargs)
    assert lora_layers(model) == {}
    assert all(p.requires_grad for p in model.parameters())


def test_add_lora_twice_is_refused():
    model = add_lora(small_gpt2(), ["c_attn"])
    with pytest.raises(ValueError, match="already has LoRA layers"):
        add_lora(model, ["c_fc"])
    assert sorted(lora_layers(model)) == ["transformer.h.0.attn.c_attn", "transformer.h.1.attn.c_attn"]


def test_layer_refuses_the_wrong_fan_in_fan_out_and_non_linear_bases():
    with pytest.raises(ValueError, match="Conv1D, whose weight is \\(in, out\\): pass fan_in_fan_out=True"):
        LoRALinear(conv1d(7, 5), r=2, alpha=2)
    with pytest.raises(ValueError, match="nn.Linear, whose weight is \\(out, in\\): pass fan_in_fan_out=False"):
        LoRALinear(linear(7, 5), r=2, alpha=2, fan_in_fan_out=True)
    with pytest.raises(TypeError, match="must be nn.Linear, a GPT-2 Conv1D or a 4-bit linear layer, got LayerNorm"):
        LoRALinear(nn.LayerNorm(7), r=2, alpha=2)
    with pytest.raises(TypeError, match="itself a linear layer"):
        add_lora(linear(7, 5))


def test_an_integer_weight_gets_a_clear_error_and_the_model_is_left_alone():
    """Not PyTorch's "Only Tensors of floating point ... can require gradients"."""
    int_layer = nn.Linear(4, 4)
    int_layer.weight = nn.Parameter(torch.ones(4, 4, dtype=torch.int8), requires_grad=False)
    with pytest.raises(TypeError, match="base_layer's weight must be floating-point .*got torch.int8"):
        LoRALinear(int_layer, r=2, alpha=2)
    model = nn.Sequential(nn.Linear(4, 4), int_layer)  # the float layer comes first
    with pytest.raises(TypeError, match=r"^1: base_layer's weight must be .*int8.*the model was left unchanged"):
        add_lora(model, "all-linear", exclude=())
    assert lora_layers(model) == {} and type(model[0]) is nn.Linear
    assert model[0].weight.requires_grad


# --- merge_lora ---

@pytest.mark.parametrize("make_model", [small_gpt2, hf_gpt2], ids=["ours", "hf"])
def test_merge_lora_gives_a_plain_model_with_the_same_outputs(make_model):
    idx = tokens()

    def run(m):
        out = m(idx)
        return out if isinstance(out, torch.Tensor) else out.logits

    model = make_model()
    plain_types = {n: type(m) for n, m in model.named_modules()}
    plain_keys = set(model.state_dict())
    add_lora(model, r=4, alpha=8)
    randomize(model)
    with_lora = run(model)
    assert not torch.allclose(with_lora, run(make_model()), atol=1e-3)  # the adapter matters
    merged = merge_lora(model)
    assert merged is model and lora_layers(merged) == {}
    assert {n: type(m) for n, m in merged.named_modules()} == plain_types
    assert set(merged.state_dict()) == plain_keys
    torch.testing.assert_close(run(merged), with_lora, atol=1e-5, rtol=1e-5)


def test_merge_lora_refuses_a_tied_weight_and_a_broken_layer_without_merging_anything():
    model = add_lora(small_gpt2(), exclude=())  # lm_head too: its weight is the embedding's
    randomize(model)
    with pytest.raises(ValueError, match="lm_head: its weight is shared with transformer.wte.weight"):
        merge_lora(model)
    assert len(lora_layers(model)) == 9 and not any(layer.merged for layer in lora_layers(model).values())

    model = add_lora(small_gpt2())
    randomize(model)
    weights = {n: layer.base_layer.weight.detach().clone() for n, layer in lora_layers(model).items()}
    with torch.no_grad():
        lora_layers(model)["transformer.h.1.mlp.c_proj"].lora_B.weight.fill_(float("inf"))
    with pytest.raises(ValueError, match="merging transformer.h.1.mlp.c_proj would make its weight non-finite"):
        merge_lora(model)
    for name, layer in lora_layers(model).items():  # the earlier layers were not merged either
        assert not layer.merged and torch.equal(layer.base_layer.weight, weights[name])


def test_merge_lora_on_a_single_layer_returns_its_base_layer():
    layer = wrap(linear(7, 5))
    randomize(layer)
    x = torch.randn(3, 7)
    expected = layer(x)
    base = merge_lora(layer)
    assert type(base) is nn.Linear
    torch.testing.assert_close(base(x), expected)


def test_merge_lora_accepts_layers_already_merged():
    model = add_lora(small_gpt2(), r=2, alpha=2)
    randomize(model)
    idx = tokens()
    before = model(idx)
    lora_layers(model)["transformer.h.0.attn.c_attn"].merge()
    torch.testing.assert_close(merge_lora(model)(idx), before, atol=1e-5, rtol=1e-5)


# --- adapter files ---

def adapted(seed=1, targets="all-linear", r=4, alpha=8, config=SMALL, **kwargs):
    """Our GPT-2 (base weights from seed 0) with a random adapter drawn from ``seed``."""
    model = add_lora(small_gpt2(0, config), targets, r=r, alpha=alpha, **kwargs)
    torch.manual_seed(seed)
    randomize(model)
    return model


def test_save_and_load_adapter_round_trip(tmp_path):
    model = adapted(r=4, alpha=8, dropout=0.1, use_rslora=True)
    assert save_adapter(model, tmp_path / "a") == tmp_path / "a"
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]

    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["task_type"] is None  # see the adapter_config tests
    assert (config["r"], config["lora_alpha"], config["lora_dropout"]) == (4, 8, 0.1)
    assert config["use_rslora"] is True and config["fan_in_fan_out"] is False and config["bias"] == "none"
    assert config["target_modules"] == sorted(ALL_LINEAR)

    with safe_open(str(tmp_path / "a" / "adapter_model.safetensors"), framework="pt") as f:
        keys = set(f.keys())
        saved_a = f.get_tensor("base_model.model.transformer.h.1.mlp.c_fc.lora_A.weight")
    assert keys == {f"base_model.model.{m}.lora_{f}.weight" for m in ALL_LINEAR for f in "AB"}
    assert torch.equal(saved_a, lora_layers(model)["transformer.h.1.mlp.c_fc"].lora_A.weight)

    fresh = small_gpt2(0)
    idx = tokens()
    assert not torch.allclose(fresh(idx), model.eval()(idx), atol=1e-3)
    load_adapter(fresh, tmp_path / "a")
    assert sorted(lora_layers(fresh)) == sorted(ALL_LINEAR)
    layer = lora_layers(fresh)["transformer.h.0.attn.c_attn"]
    assert (layer.r, layer.alpha, layer.use_rslora, layer.dropout) == (4, 8, True, 0.1)
    assert count_parameters(fresh) == count_parameters(model)
    assert torch.equal(fresh.eval()(idx), model(idx))


def test_one_base_model_switches_between_adapters(tmp_path):
    save_adapter(adapted(seed=1), tmp_path / "one")
    save_adapter(adapted(seed=2), tmp_path / "two")
    idx = tokens()
    expected_one, expected_two = adapted(seed=1)(idx), adapted(seed=2)(idx)
    assert not torch.allclose(expected_one, expected_two, atol=1e-3)
    model = small_gpt2(0)
    for name, expected in [("one", expected_one), ("two", expected_two), ("one", expected_one)]:
        load_adapter(model, tmp_path / name)
        assert torch.equal(model(idx), expected)
    assert len(lora_layers(model)) == len(ALL_LINEAR)  # reused, not wrapped again


def test_load_adapter_needs_both_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="adapter_config.json not found"):
        load_adapter(small_gpt2(), tmp_path)
    save_adapter(adapted(), tmp_path / "a")
    (tmp_path / "a" / "adapter_model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="adapter_model.safetensors not found"):
        load_adapter(small_gpt2(), tmp_path / "a")


def edit_config(directory, **changes):
    path = directory / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def assert_untouched(model, reference):
    """``model`` has no LoRA layers, its usual trainable flags, and reference's outputs."""
    assert lora_layers(model) == {}
    assert all(p.requires_grad for p in model.parameters())
    idx = tokens()
    assert torch.equal(model(idx), reference(idx))


def test_a_misfitting_adapter_is_refused_and_the_model_left_as_it_was(tmp_path):
    save_adapter(adapted(r=4), tmp_path / "a")
    # A model of another size: same names, other shapes.
    wide = GPT2Config(vocab_size=50, block_size=16, n_layer=2, n_head=2, n_embd=64)
    model = small_gpt2(0, wide)
    with pytest.raises(ValueError, match=r"c_attn.lora_A.weight: adapter has shape \(4, 32\), model expects \(4, 64\)"):
        load_adapter(model, tmp_path / "a")
    assert_untouched(model, small_gpt2(0, wide))
    # A config that does not match its own weights (here r).
    edit_config(tmp_path / "a", r=8)
    model = small_gpt2(0)
    with pytest.raises(ValueError, match=r"adapter has shape \(4, 32\), model expects \(8, 32\)"):
        load_adapter(model, tmp_path / "a")
    assert_untouched(model, small_gpt2(0))
    # Target names this model does not have.
    edit_config(tmp_path / "a", r=4, target_modules=["q_proj", "v_proj"])
    model = small_gpt2(0)
    with pytest.raises(ValueError, match=r"no module matches 'q_proj', 'v_proj'; .*c_attn"):
        load_adapter(model, tmp_path / "a")
    assert_untouched(model, small_gpt2(0))


def test_an_adapter_must_match_the_lora_layers_already_there(tmp_path):
    save_adapter(adapted(r=4, alpha=8), tmp_path / "all")
    save_adapter(adapted(targets=["c_attn"], r=4, alpha=8), tmp_path / "c_attn")
    idx = tokens()
    cases = [
        (adapted(seed=5, r=8, alpha=8), "all", "adapter has r=4 but the model's LoRA layer .* has r=8"),
        (adapted(seed=5, r=4, alpha=4), "all", "adapter has alpha=8 but .* has alpha=4"),
        (adapted(seed=5, r=4, alpha=8, use_rslora=True), "all", "adapter has use_rslora=False"),
        (adapted(seed=5), "c_attn", "missing transformer.h.0.attn.c_proj.lora_A.weight"),
        (adapted(seed=5, targets=["c_attn"]), "all", "unexpected transformer.h.0.attn.c_proj.lora_A.weight"),
    ]
    for model, adapter, message in cases:
        before = model(idx)
        with pytest.raises(ValueError, match=message):
            load_adapter(model, tmp_path / adapter)
        assert torch.equal(model(idx), before)  # the old adapter is still in place


def test_merged_models_neither_save_nor_load(tmp_path):
    save_adapter(adapted(), tmp_path / "a")
    model = adapted(seed=3)
    lora_layers(model)["transformer.h.1.attn.c_attn"].merge()
    with pytest.raises(ValueError, match="unmerge the LoRA layers before saving"):
        save_adapter(model, tmp_path / "b")
    with pytest.raises(ValueError, match="transformer.h.1.attn.c_attn is merged; unmerge it"):
        load_adapter(model, tmp_path / "a")
    assert not (tmp_path / "b").exists()
    with pytest.raises(ValueError, match="no LoRA layers to save"):
        save_adapter(small_gpt2(), tmp_path / "c")


def test_load_adapter_refuses_what_lora_linear_cannot_represent(tmp_path):
    save_adapter(adapted(), tmp_path / "a")
    for changes, message in [
        (dict(peft_type="PREFIX_TUNING"), "holds a 'PREFIX_TUNING' adapter, not LORA"),
        (dict(alpha_pattern={"c_attn": 32}), "uses alpha_pattern"),
        (dict(rank_pattern={"c_fc": 2}), "uses rank_pattern"),
        (dict(use_dora=True), "does not fit this model: missing .*magnitude"),  # DoRA without magnitudes
    ]:
        original = (tmp_path / "a" / "adapter_config.json").read_text()
        edit_config(tmp_path / "a", **changes)
        model = small_gpt2(0)
        with pytest.raises(ValueError, match=message):
            load_adapter(model, tmp_path / "a")
        assert lora_layers(model) == {}
        (tmp_path / "a" / "adapter_config.json").write_text(original)


@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(layers_to_transform=[0]), r"layers_to_transform=\[0\] \(LoRA on some layers only\)"),
        (dict(layers_to_transform=1, layers_pattern="h"), r"layers_to_transform=1 "),
        (dict(modules_to_save=["lm_head"]), r"modules_to_save=\['lm_head'\]"),
        (dict(bias="lora_only"), r"bias='lora_only' \(trained biases\)"),
        (dict(bias="all"), r"bias='all'"),
        (dict(init_lora_weights="pissa"), r"init_lora_weights='pissa' \(an initialisation that changes"),
        (dict(lora_bias=True), r"lora_bias=True"),
        (dict(trainable_token_indices=[1, 2]), r"trainable_token_indices=\[1, 2\]"),
        (dict(some_future_option={"on": 1}), r"some_future_option=\{'on': 1\}"),
        (dict(rank_pattern={"c_fc": 2}, lora_bias=True), r"rank_pattern=.*; lora_bias=True"),
    ],
)
def test_every_unsupported_peft_option_is_named_and_the_model_left_unchanged(tmp_path, changes, message):
    save_adapter(adapted(), tmp_path)
    edit_config(tmp_path, **changes)
    idx = tokens()
    for model in (small_gpt2(0), adapted(seed=5)):  # without and with LoRA layers already there
        before = model(idx)
        with pytest.raises(ValueError, match=message + ".*which lora_edu does not support; the model was left unchanged"):
            load_adapter(model, tmp_path)
        assert torch.equal(model(idx), before)
    assert_untouched(small_gpt2(0), small_gpt2(0))


@pytest.mark.parametrize("init", [True, False, "gaussian", "eva", "orthogonal"])
def test_initialisations_that_leave_the_base_alone_load(tmp_path, init):
    save_adapter(adapted(), tmp_path)
    edit_config(tmp_path, init_lora_weights=init, layers_pattern=None, qalora_group_size=16,
                megatron_core="megatron.core", loftq_config={}, modules_to_save=None, bias="none")
    idx = tokens()
    assert torch.equal(load_adapter(small_gpt2(0), tmp_path)(idx), adapted()(idx))


@pytest.mark.parametrize(
    "exclude_modules, expected_out",
    [
        (["lm_head"], []),
        (["lm_head", "h.1.mlp.c_fc"], ["transformer.h.1.mlp.c_fc"]),
        ("lm_head|.*\\.attn\\.c_proj", ["transformer.h.0.attn.c_proj", "transformer.h.1.attn.c_proj"]),
    ],
)
def test_load_adapter_honours_exclude_modules(tmp_path, exclude_modules, expected_out):
    """PEFT's all-linear on a model that is not a Hugging Face one lists lm_head too and
    leaves it out with exclude_modules: the adapter has no lm_head factors."""
    source = add_lora(small_gpt2(0), sorted(set(ALL_LINEAR) - set(expected_out)), r=4, alpha=8)
    randomize(source)
    save_adapter(source, tmp_path)
    edit_config(tmp_path, target_modules=[*ALL_LINEAR, "lm_head"], exclude_modules=exclude_modules)
    model = load_adapter(small_gpt2(0), tmp_path)
    assert sorted(lora_layers(model)) == sorted(set(ALL_LINEAR) - set(expected_out))
    idx = tokens()
    assert torch.equal(model(idx), source(idx))


def test_an_exclude_modules_that_leaves_nothing_is_refused(tmp_path):
    save_adapter(adapted(targets=["c_attn"]), tmp_path)
    edit_config(tmp_path, target_modules=["c_attn"], exclude_modules=["attn.c_attn"])
    model = small_gpt2(0)
    with pytest.raises(ValueError, match=r"every module that \['c_attn'\] matches is excluded by \['attn.c_attn'\]"):
        load_adapter(model, tmp_path)
    assert_untouched(model, small_gpt2(0))


def test_an_adapter_from_hf_gpt2_loads_into_our_gpt2(tmp_path):
    """Conv1D (fan_in_fan_out) on one side, nn.Linear on the other: A and B are the same."""
    hf = add_lora(hf_gpt2(), r=4, alpha=8)
    randomize(hf)
    save_adapter(hf, tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["fan_in_fan_out"] is True
    ours = GPT2(SMALL)
    ours.load_state_dict(state_dict_from_hf(hf_gpt2().state_dict()), strict=False)
    load_adapter(ours.eval(), tmp_path)
    idx = tokens()
    torch.testing.assert_close(ours(idx), hf(idx).logits, atol=1e-5, rtol=1e-5)


# --- the mode of new layers (issue 13) ---

@pytest.mark.parametrize("make_model", [small_gpt2, hf_gpt2], ids=["ours", "hf"])
def test_new_lora_layers_take_the_mode_of_the_model(tmp_path, make_model):
    """add_lora and load_adapter on a model in eval(): no dropout, the same output each call."""
    model = add_lora(make_model(), ["c_proj"], dropout=0.1)  # make_model() is in eval mode
    randomize(model)  # B = 0 would hide the dropout
    assert not any(m.training for m in model.modules())
    idx = tokens()
    assert torch.equal(logits(model, idx), logits(model, idx))
    save_adapter(model, tmp_path)
    loaded = load_adapter(make_model(), tmp_path)
    assert not any(m.training for m in loaded.modules())
    assert torch.equal(logits(loaded, idx), logits(model, idx))
    # ... and a model in training mode gets layers in training mode.
    training = add_lora(make_model().train(), ["c_proj"], dropout=0.1)
    assert all(m.training for m in training.modules())


# --- adapter_config.json reads like PEFT's (issue 13) ---

def saved_config(model, directory, **kwargs):
    save_adapter(model, directory, **kwargs)
    return json.loads((directory / "adapter_config.json").read_text())


@pytest.mark.parametrize(
    "targets, written",
    [
        (["c_attn", "mlp.c_proj"], ["c_attn", "mlp.c_proj"]),
        (r".*\.h\.1\..*c_fc", r".*\.h\.1\..*c_fc"),
        ("all-linear", sorted(ALL_LINEAR)),  # PEFT too writes all-linear as the names it chose
    ],
)
def test_target_modules_are_written_as_given(tmp_path, targets, written):
    model = adapted(targets=targets)
    config = saved_config(model, tmp_path)
    assert config["target_modules"] == written and config["exclude_modules"] is None
    # ... and choose the same layers when loaded.
    idx = tokens()
    reloaded = load_adapter(small_gpt2(0), tmp_path)
    assert sorted(lora_layers(reloaded)) == sorted(lora_layers(model))
    assert torch.equal(reloaded(idx), model(idx))


def test_targets_that_no_longer_describe_the_layers_are_written_as_full_names(tmp_path):
    model = adapted(targets=["c_attn"])
    block = model.transformer.h[0]
    block.mlp.c_fc = LoRALinear(block.mlp.c_fc, r=4, alpha=8)  # wrapped by hand, after add_lora
    config = saved_config(model, tmp_path)
    assert config["target_modules"] == sorted(lora_layers(model))


def test_a_loaded_adapter_is_saved_again_with_its_own_targets(tmp_path):
    save_adapter(adapted(), tmp_path / "a")
    edit_config(tmp_path / "a", target_modules=[*ALL_LINEAR, "lm_head"], exclude_modules=["lm_head"])
    config = saved_config(load_adapter(small_gpt2(0), tmp_path / "a"), tmp_path / "b")
    assert config["target_modules"] == [*ALL_LINEAR, "lm_head"] and config["exclude_modules"] == ["lm_head"]


def test_task_type_and_base_model_name_or_path(tmp_path):
    """CAUSAL_LM only for a model PEFT can wrap as one (ours has no prepare_inputs_for_generation);
    the base model's origin when the model knows it."""
    ours = adapted()
    assert saved_config(ours, tmp_path / "a")["task_type"] is None
    assert saved_config(ours, tmp_path / "a")["base_model_name_or_path"] is None  # built, not loaded
    assert saved_config(ours, tmp_path / "a", base_model_name_or_path="x")["base_model_name_or_path"] == "x"
    save_checkpoint(small_gpt2(0), tmp_path / "base.safetensors")
    loaded = add_lora(load_checkpoint(tmp_path / "base.safetensors"))
    assert saved_config(loaded, tmp_path / "b")["base_model_name_or_path"] == str(tmp_path / "base.safetensors")

    hf = add_lora(hf_gpt2())
    assert saved_config(hf, tmp_path / "c")["task_type"] == "CAUSAL_LM"
    hf.name_or_path = "openai-community/gpt2"  # what from_pretrained records (and PEFT reads)
    assert saved_config(hf, tmp_path / "c")["base_model_name_or_path"] == "openai-community/gpt2"


# --- refusals that leave the model as it was (issue 26) ---

def test_merge_lora_refuses_a_dora_layer_whose_rescaled_weight_is_not_finite_before_merging_any():
    """W0 + sBA is finite here; only DoRA's m / ||W0 + sBA|| (W0 + sBA) of the last layer is not."""
    model = adapted(use_dora=True)
    last_name, last = list(lora_layers(model).items())[-1]
    with torch.no_grad():
        last.magnitude[0] = float("nan")
    before = snapshot(model)
    with pytest.raises(ValueError, match=rf"merging {last_name} would make its weight non-finite.*nothing was merged"):
        merge_lora(model)
    assert_unchanged(model, before)


@pytest.mark.parametrize(
    "targets, exclude, expected",
    [
        (["c_attn", "c_fc"], ["transformer.h.0.attn.c_attn"],
         ["transformer.h.0.mlp.c_fc", "transformer.h.1.attn.c_attn", "transformer.h.1.mlp.c_fc"]),
        (["c_attn", "c_fc"], r".*\.h\.1\..*", ["transformer.h.0.attn.c_attn", "transformer.h.0.mlp.c_fc"]),
        ("all-linear", ["c_proj"], [n for n in ALL_LINEAR if not n.endswith("c_proj")] + ["lm_head"]),
        (r".*\.c_(attn|fc)", ["mlp.c_fc"], ["transformer.h.0.attn.c_attn", "transformer.h.1.attn.c_attn"]),
    ],
)
def test_exclude_applies_to_any_targets_as_peft_exclude_modules_does(tmp_path, targets, exclude, expected):
    model = add_lora(small_gpt2(), targets, exclude=exclude)
    assert sorted(lora_layers(model)) == sorted(expected)
    save_adapter(model, tmp_path)  # the adapter file chooses the same layers again
    assert sorted(lora_layers(load_adapter(small_gpt2(), tmp_path))) == sorted(expected)


def test_exclude_that_leaves_nothing_is_refused_and_the_model_unchanged():
    model = small_gpt2()
    before = snapshot(model)
    with pytest.raises(ValueError, match="excluded"):
        add_lora(model, ["c_attn"], exclude=["c_attn"])
    assert_unchanged(model, before)


def test_peft_auto_class_loads_an_adapter_saved_from_a_base_loaded_from_a_folder(tmp_path):
    """base_model_name_or_path is the folder the base came from, and AutoPeftModel follows it."""
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    hf_gpt2().save_pretrained(tmp_path / "base")
    model = add_lora(transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "base").eval(), ["c_attn"])
    torch.manual_seed(1)
    randomize(model)
    idx = torch.randint(0, 50, (2, 8))
    expected = logits(model, idx)
    save_adapter(model, tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(tmp_path / "base")
    loaded = peft.AutoPeftModelForCausalLM.from_pretrained(str(tmp_path / "adapter")).eval()
    assert torch.allclose(logits(loaded, idx), expected, atol=1e-5)
