"""Tests of lora_edu.lora: add_lora chooses, wraps and freezes by PEFT's rules; merge_lora gives a plain model."""

import pytest
import torch
import torch.nn as nn

from hf_models import small_hf_gpt2
from unchanged import assert_unchanged, snapshot
from lora_edu.lora import add_lora, count_parameters, lora_layers, lora_state_dict, mark_only_lora_trainable, merge_lora
from lora_edu.lora_layer import LoRALinear

ALL_LINEAR = [
    f"transformer.h.{i}.{m}" for i in range(2) for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
]


def tokens(n=2, T=16):
    return torch.randint(0, 50, (n, T))


# --- add_lora on a model ---

def test_add_lora_freezes_the_base_and_trains_only_a_and_b(make_gpt2):
    model = add_lora(make_gpt2(), r=4, alpha=8)
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


def test_mark_only_lora_trainable_refreezes_after_unfreezing(make_gpt2):
    model = add_lora(make_gpt2(), ["c_attn"], r=2, alpha=2)
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
def test_add_lora_targets(targets, expected, make_gpt2):
    model = make_gpt2()
    idx = tokens()
    before = model(idx)
    add_lora(model, targets, r=2, alpha=4)
    assert sorted(lora_layers(model)) == sorted(expected)
    assert isinstance(model.lm_head, nn.Linear)  # never the tied output head by default
    assert torch.equal(model(idx), before)  # B = 0: the model is unchanged


def test_exclude_decides_what_all_linear_skips(make_gpt2):
    names = sorted(lora_layers(add_lora(make_gpt2(), exclude=())))
    assert names == sorted(ALL_LINEAR + ["lm_head"])
    names = sorted(lora_layers(add_lora(make_gpt2(), exclude=["c_fc"])))
    assert names == sorted([n for n in ALL_LINEAR if not n.endswith("c_fc")] + ["lm_head"])
    names = sorted(lora_layers(add_lora(make_gpt2(), exclude=r".*c_fc")))  # a string is a regex, as in PEFT
    assert names == sorted([n for n in ALL_LINEAR if not n.endswith("c_fc")] + ["lm_head"])


def test_count_parameters_adds_r_times_in_plus_out_per_layer(make_gpt2):
    model = make_gpt2()
    total = sum(p.numel() for p in model.parameters())  # the tied head counts once
    assert count_parameters(model) == (total, total)
    r, C = 4, 32
    add_lora(model, r=r, alpha=8)
    # c_attn C -> 3C, attn.c_proj C -> C, c_fc C -> 4C, mlp.c_proj 4C -> C, in every block.
    per_block = r * ((C + 3 * C) + (C + C) + (C + 4 * C) + (4 * C + C))
    lora = 2 * per_block  # 2 blocks
    assert count_parameters(model) == (lora, total + lora)
    assert sum(v.numel() for v in lora_state_dict(model).values()) == lora


def test_add_lora_on_hugging_face_gpt2_wraps_its_conv1d_layers():
    pytest.importorskip("transformers")
    hf = small_hf_gpt2()
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
    assert count_parameters(hf)[0] == 2 * 4 * (4 * 32 + 2 * 32 + 5 * 32 + 5 * 32)


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_the_adapter_is_what_each_lora_layer_holds_beside_its_base(make_gpt2, use_dora):
    """lora_state_dict and the trainable parameters: A, B and DoRA's magnitude, nothing of the base."""
    model = add_lora(make_gpt2(), ["c_attn"], r=2, alpha=2, use_dora=use_dora)
    own = (["magnitude"] if use_dora else []) + ["lora_A.weight", "lora_B.weight"]
    names = [f"transformer.h.{i}.attn.c_attn.{key}" for i in range(2) for key in own]
    assert list(lora_state_dict(model)) == names
    assert [n for n, p in model.named_parameters() if p.requires_grad] == names
    assert list(lora_state_dict(LoRALinear(nn.Linear(3, 2), r=1, alpha=1))) == ["lora_A.weight", "lora_B.weight"]


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
def test_add_lora_refuses_bad_arguments_and_leaves_the_model_alone(kwargs, error, message, make_gpt2):
    model = make_gpt2()
    kwargs.setdefault("targets", "all-linear")
    with pytest.raises(error, match=message):
        add_lora(model, **kwargs)
    assert lora_layers(model) == {}
    assert all(p.requires_grad for p in model.parameters())


def test_add_lora_twice_is_refused(make_gpt2):
    model = add_lora(make_gpt2(), ["c_attn"])
    with pytest.raises(ValueError, match="already has LoRA layers"):
        add_lora(model, ["c_fc"])
    assert sorted(lora_layers(model)) == ["transformer.h.0.attn.c_attn", "transformer.h.1.attn.c_attn"]


def test_add_lora_refuses_a_model_that_is_itself_a_linear_layer():
    with pytest.raises(TypeError, match="itself a linear layer"):
        add_lora(nn.Linear(7, 5))


def test_an_integer_weight_is_refused_by_the_layers_name_and_the_model_left_alone():
    int_layer = nn.Linear(4, 4)
    int_layer.weight = nn.Parameter(torch.ones(4, 4, dtype=torch.int8), requires_grad=False)
    model = nn.Sequential(nn.Linear(4, 4), int_layer)  # the float layer comes first
    with pytest.raises(TypeError, match=r"^1: base_layer's weight must be .*int8.*the model was left unchanged"):
        add_lora(model, "all-linear", exclude=())
    assert lora_layers(model) == {} and type(model[0]) is nn.Linear
    assert model[0].weight.requires_grad


# --- merge_lora ---

def test_merge_lora_gives_a_plain_model_with_the_same_outputs(make_either_gpt2, randomize_lora):
    idx = tokens()

    def run(m):
        out = m(idx)
        return out if isinstance(out, torch.Tensor) else out.logits

    model = make_either_gpt2()
    plain_types = {n: type(m) for n, m in model.named_modules()}
    plain_keys = set(model.state_dict())
    add_lora(model, r=4, alpha=8)
    randomize_lora(model)
    with_lora = run(model)
    assert not torch.allclose(with_lora, run(make_either_gpt2()), atol=1e-3)  # the adapter matters
    merged = merge_lora(model)
    assert merged is model and lora_layers(merged) == {}
    assert {n: type(m) for n, m in merged.named_modules()} == plain_types
    assert set(merged.state_dict()) == plain_keys
    torch.testing.assert_close(run(merged), with_lora, atol=1e-5, rtol=1e-5)


def test_merge_lora_refuses_a_tied_weight_and_a_broken_layer_without_merging_anything(make_gpt2, randomize_lora):
    model = add_lora(make_gpt2(), exclude=())  # lm_head too: its weight is the embedding's
    randomize_lora(model)
    with pytest.raises(ValueError, match="lm_head: its weight is shared with transformer.wte.weight"):
        merge_lora(model)
    assert len(lora_layers(model)) == 9 and not any(layer.merged for layer in lora_layers(model).values())

    model = add_lora(make_gpt2())
    randomize_lora(model)
    weights = {n: layer.base_layer.weight.detach().clone() for n, layer in lora_layers(model).items()}
    with torch.no_grad():
        lora_layers(model)["transformer.h.1.mlp.c_proj"].lora_B.weight.fill_(float("inf"))
    with pytest.raises(ValueError, match="merging transformer.h.1.mlp.c_proj would make its weight non-finite"):
        merge_lora(model)
    for name, layer in lora_layers(model).items():  # the earlier layers were not merged either
        assert not layer.merged and torch.equal(layer.base_layer.weight, weights[name])


def test_merge_lora_on_a_single_layer_returns_its_base_layer(randomize_lora):
    layer = LoRALinear(nn.Linear(7, 5), r=3, alpha=6)
    randomize_lora(layer)
    x = torch.randn(3, 7)
    expected = layer(x)
    base = merge_lora(layer)
    assert type(base) is nn.Linear
    torch.testing.assert_close(base(x), expected)


def test_merge_lora_accepts_layers_already_merged(make_gpt2, randomize_lora):
    model = add_lora(make_gpt2(), r=2, alpha=2)
    randomize_lora(model)
    idx = tokens()
    before = model(idx)
    lora_layers(model)["transformer.h.0.attn.c_attn"].merge()
    torch.testing.assert_close(merge_lora(model)(idx), before, atol=1e-5, rtol=1e-5)


# --- refusals that leave the model as it was (issue 26) ---

def test_merge_lora_refuses_a_dora_layer_whose_rescaled_weight_is_not_finite_before_merging_any(make_gpt2):
    """W0 + sBA is finite here; only DoRA's m / ||W0 + sBA|| (W0 + sBA) of the last layer is not."""
    model = add_lora(make_gpt2(), r=4, alpha=8, use_dora=True)
    last_name, last = list(lora_layers(model).items())[-1]
    with torch.no_grad():
        last.magnitude[0] = float("nan")
    before = snapshot(model)
    with pytest.raises(ValueError, match=rf"merging {last_name} would make its weight non-finite.*nothing was merged"):
        merge_lora(model)
    assert_unchanged(model, before)


def test_exclude_that_leaves_nothing_is_refused_and_the_model_unchanged(make_gpt2):
    model = make_gpt2()
    before = snapshot(model)
    with pytest.raises(ValueError, match="excluded"):
        add_lora(model, ["c_attn"], exclude=["c_attn"])
    assert_unchanged(model, before)

