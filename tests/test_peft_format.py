"""Tests of lora_edu.peft_format: adapters saved and loaded in PEFT's format; every option it cannot load refused."""

import json
import re

import pytest
import torch
from safetensors import safe_open

from hf_models import small_hf_gpt2
from lora_edu.gpt2 import load_checkpoint, save_checkpoint
from lora_edu.lora import add_lora, count_parameters, lora_layers, lora_state_dict
from lora_edu.lora_layer import LoRALinear
from lora_edu.peft_format import adapter_targets, load_adapter, read_adapter, save_adapter

ALL_LINEAR = [
    f"transformer.h.{i}.{m}" for i in range(2) for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
]


def tokens(n=2, T=16):
    return torch.randint(0, 50, (n, T))


def logits(model, idx):
    """The logits of our GPT2 or of a Hugging Face model."""
    out = model(idx)
    return out if isinstance(out, torch.Tensor) else out.logits


@pytest.fixture
def adapted(make_gpt2, randomize_lora):
    """A builder, ``adapted(seed=1, targets="all-linear", r=4, alpha=8, **add_lora_kwargs)``: make_gpt2's model
    (base weights from seed 0) with a random adapter drawn from ``seed``."""

    def build(seed=1, targets="all-linear", r=4, alpha=8, **kwargs):
        model = add_lora(make_gpt2(0), targets, r=r, alpha=alpha, **kwargs)
        torch.manual_seed(seed)
        randomize_lora(model)
        return model

    return build


# --- adapter files ---


def test_save_and_load_adapter_round_trip(tmp_path, adapted, make_gpt2):
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

    fresh = make_gpt2(0)
    idx = tokens()
    assert not torch.allclose(fresh(idx), model.eval()(idx), atol=1e-3)
    load_adapter(fresh, tmp_path / "a")
    assert sorted(lora_layers(fresh)) == sorted(ALL_LINEAR)
    layer = lora_layers(fresh)["transformer.h.0.attn.c_attn"]
    assert (layer.r, layer.alpha, layer.use_rslora, layer.dropout) == (4, 8, True, 0.1)
    assert count_parameters(fresh) == count_parameters(model)
    assert torch.equal(fresh.eval()(idx), model(idx))


def test_one_base_model_switches_between_adapters(tmp_path, adapted, make_gpt2):
    save_adapter(adapted(seed=1), tmp_path / "one")
    save_adapter(adapted(seed=2), tmp_path / "two")
    idx = tokens()
    expected_one, expected_two = adapted(seed=1)(idx), adapted(seed=2)(idx)
    assert not torch.allclose(expected_one, expected_two, atol=1e-3)
    model = make_gpt2(0)
    for name, expected in [("one", expected_one), ("two", expected_two), ("one", expected_one)]:
        load_adapter(model, tmp_path / name)
        assert torch.equal(model(idx), expected)
    assert len(lora_layers(model)) == len(ALL_LINEAR)  # reused, not wrapped again


def test_load_adapter_needs_both_files(tmp_path, adapted, make_gpt2):
    with pytest.raises(FileNotFoundError, match="adapter_config.json not found"):
        load_adapter(make_gpt2(), tmp_path)
    save_adapter(adapted(), tmp_path / "a")
    (tmp_path / "a" / "adapter_model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="adapter_model.safetensors not found"):
        load_adapter(make_gpt2(), tmp_path / "a")


def edit_config(directory, **changes):
    path = directory / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def assert_untouched(model, reference):
    """``model`` has no LoRA layers, its usual trainable flags, and reference's outputs."""
    assert lora_layers(model) == {}
    assert all(p.requires_grad for p in model.parameters())
    idx = tokens()
    assert torch.equal(model(idx), reference(idx))


def test_read_adapter_gives_the_config_and_the_tensors_under_our_names(tmp_path, adapted):
    model = adapted(targets=["c_attn"], use_dora=True)
    save_adapter(model, tmp_path)
    config, state = read_adapter(tmp_path)
    assert config == json.loads((tmp_path / "adapter_config.json").read_text())
    expected = lora_state_dict(model)
    assert state.keys() == expected.keys()
    assert all(torch.equal(state[k], expected[k]) for k in expected)


def test_read_adapter_names_the_adapter_it_was_given(tmp_path, adapted):
    with pytest.raises(FileNotFoundError, match=r"^adapter 'poetry': .*adapter_config.json not found"):
        read_adapter(tmp_path, "poetry")
    save_adapter(adapted(), tmp_path)
    edit_config(tmp_path, peft_type="IA3")
    with pytest.raises(ValueError, match=r"^adapter 'poetry' holds a 'IA3' adapter, not LORA"):
        read_adapter(tmp_path, "poetry")
    with pytest.raises(ValueError, match="^" + re.escape(str(tmp_path)) + " holds a 'IA3' adapter"):
        read_adapter(tmp_path)


@pytest.mark.parametrize(
    "targets, exclude, expected",
    [
        ("all-linear", None, ("lm_head",)),
        ("all-linear", ["c_fc"], ("c_fc", "lm_head")),
        ("all-linear", "c_fc", r"(?:c_fc)|(?:.*\.)?lm_head"),
        (["c_attn"], None, ()),
        (r".*c_attn", ["h.0.attn.c_attn"], ["h.0.attn.c_attn"]),
    ],
)
def test_adapter_targets_leave_the_head_out_of_all_linear_only(targets, exclude, expected):
    assert adapter_targets({"target_modules": targets, "exclude_modules": exclude}) == (targets, expected)
    with pytest.raises(TypeError, match="targets must be"):
        adapter_targets({"target_modules": []})


def test_a_misfitting_adapter_is_refused_and_the_model_left_as_it_was(tmp_path, adapted, make_gpt2):
    save_adapter(adapted(r=4), tmp_path / "a")
    # A model of another size: same names, other shapes.
    model = make_gpt2(0, n_embd=64)
    with pytest.raises(ValueError, match=r"c_attn.lora_A.weight: adapter has shape \(4, 32\), model expects \(4, 64\)"):
        load_adapter(model, tmp_path / "a")
    assert_untouched(model, make_gpt2(0, n_embd=64))
    # A config that does not match its own weights (here r).
    edit_config(tmp_path / "a", r=8)
    model = make_gpt2(0)
    with pytest.raises(ValueError, match=r"adapter has shape \(4, 32\), model expects \(8, 32\)"):
        load_adapter(model, tmp_path / "a")
    assert_untouched(model, make_gpt2(0))
    # Target names this model does not have.
    edit_config(tmp_path / "a", r=4, target_modules=["q_proj", "v_proj"])
    model = make_gpt2(0)
    with pytest.raises(ValueError, match=r"no module matches 'q_proj', 'v_proj'; .*c_attn"):
        load_adapter(model, tmp_path / "a")
    assert_untouched(model, make_gpt2(0))


def test_an_adapter_must_match_the_lora_layers_already_there(tmp_path, adapted):
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


def test_merged_models_neither_save_nor_load(tmp_path, adapted, make_gpt2):
    save_adapter(adapted(), tmp_path / "a")
    model = adapted(seed=3)
    lora_layers(model)["transformer.h.1.attn.c_attn"].merge()
    with pytest.raises(ValueError, match="unmerge the LoRA layers before saving"):
        save_adapter(model, tmp_path / "b")
    with pytest.raises(ValueError, match="transformer.h.1.attn.c_attn is merged; unmerge it"):
        load_adapter(model, tmp_path / "a")
    assert not (tmp_path / "b").exists()
    with pytest.raises(ValueError, match="no LoRA layers to save"):
        save_adapter(make_gpt2(), tmp_path / "c")


def test_load_adapter_refuses_what_lora_linear_cannot_represent(tmp_path, adapted, make_gpt2):
    save_adapter(adapted(), tmp_path / "a")
    for changes, message in [
        (dict(peft_type="PREFIX_TUNING"), "holds a 'PREFIX_TUNING' adapter, not LORA"),
        (dict(alpha_pattern={"c_attn": 32}), "uses alpha_pattern"),
        (dict(rank_pattern={"c_fc": 2}), "uses rank_pattern"),
        (dict(use_dora=True), "does not fit this model: missing .*magnitude"),  # DoRA without magnitudes
    ]:
        original = (tmp_path / "a" / "adapter_config.json").read_text()
        edit_config(tmp_path / "a", **changes)
        model = make_gpt2(0)
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
def test_every_unsupported_peft_option_is_named_and_the_model_left_unchanged(tmp_path, changes, message, adapted,
                                                                            make_gpt2):
    save_adapter(adapted(), tmp_path)
    edit_config(tmp_path, **changes)
    idx = tokens()
    for model in (make_gpt2(0), adapted(seed=5)):  # without and with LoRA layers already there
        before = model(idx)
        with pytest.raises(ValueError, match=message + ".*which lora_edu does not support; the model was left unchanged"):
            load_adapter(model, tmp_path)
        assert torch.equal(model(idx), before)
    assert_untouched(make_gpt2(0), make_gpt2(0))


@pytest.mark.parametrize("init", [True, False, "gaussian", "eva", "orthogonal"])
def test_initialisations_that_leave_the_base_alone_load(tmp_path, init, adapted, make_gpt2):
    save_adapter(adapted(), tmp_path)
    edit_config(tmp_path, init_lora_weights=init, layers_pattern=None, qalora_group_size=16,
                megatron_core="megatron.core", loftq_config={}, modules_to_save=None, bias="none")
    idx = tokens()
    assert torch.equal(load_adapter(make_gpt2(0), tmp_path)(idx), adapted()(idx))


@pytest.mark.parametrize(
    "exclude_modules, expected_out",
    [
        (["lm_head"], []),
        (["lm_head", "h.1.mlp.c_fc"], ["transformer.h.1.mlp.c_fc"]),
        ("lm_head|.*\\.attn\\.c_proj", ["transformer.h.0.attn.c_proj", "transformer.h.1.attn.c_proj"]),
    ],
)
def test_load_adapter_honours_exclude_modules(tmp_path, exclude_modules, expected_out, make_gpt2, randomize_lora):
    """PEFT's all-linear on a model that is not a Hugging Face one lists lm_head too and
    leaves it out with exclude_modules: the adapter has no lm_head factors."""
    source = add_lora(make_gpt2(0), sorted(set(ALL_LINEAR) - set(expected_out)), r=4, alpha=8)
    randomize_lora(source)
    save_adapter(source, tmp_path)
    edit_config(tmp_path, target_modules=[*ALL_LINEAR, "lm_head"], exclude_modules=exclude_modules)
    model = load_adapter(make_gpt2(0), tmp_path)
    assert sorted(lora_layers(model)) == sorted(set(ALL_LINEAR) - set(expected_out))
    idx = tokens()
    assert torch.equal(model(idx), source(idx))


def test_an_exclude_modules_that_leaves_nothing_is_refused(tmp_path, adapted, make_gpt2):
    save_adapter(adapted(targets=["c_attn"]), tmp_path)
    edit_config(tmp_path, target_modules=["c_attn"], exclude_modules=["attn.c_attn"])
    model = make_gpt2(0)
    with pytest.raises(ValueError, match=r"every module that \['c_attn'\] matches is excluded by \['attn.c_attn'\]"):
        load_adapter(model, tmp_path)
    assert_untouched(model, make_gpt2(0))


def test_an_adapter_from_hf_gpt2_loads_into_our_gpt2(tmp_path, ours_and_hf, randomize_lora):
    """Conv1D (fan_in_fan_out) on one side, nn.Linear on the other: A and B are the same."""
    ours, hf = ours_and_hf
    add_lora(hf, r=4, alpha=8)
    randomize_lora(hf)
    save_adapter(hf, tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["fan_in_fan_out"] is True
    load_adapter(ours, tmp_path)
    idx = tokens()
    torch.testing.assert_close(ours(idx), hf(idx).logits, atol=1e-5, rtol=1e-5)


# --- the mode of new layers (issue 13) ---

def test_new_lora_layers_take_the_mode_of_the_model(tmp_path, make_either_gpt2, randomize_lora):
    """add_lora and load_adapter on a model in eval(): no dropout, the same output each call."""
    model = add_lora(make_either_gpt2(), ["c_proj"], dropout=0.1)  # make_either_gpt2() is in eval mode
    randomize_lora(model)  # B = 0 would hide the dropout
    assert not any(m.training for m in model.modules())
    idx = tokens()
    assert torch.equal(logits(model, idx), logits(model, idx))
    save_adapter(model, tmp_path)
    loaded = load_adapter(make_either_gpt2(), tmp_path)
    assert not any(m.training for m in loaded.modules())
    assert torch.equal(logits(loaded, idx), logits(model, idx))
    # ... and a model in training mode gets layers in training mode.
    training = add_lora(make_either_gpt2().train(), ["c_proj"], dropout=0.1)
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
def test_target_modules_are_written_as_given(tmp_path, targets, written, adapted, make_gpt2):
    model = adapted(targets=targets)
    config = saved_config(model, tmp_path)
    assert config["target_modules"] == written and config["exclude_modules"] is None
    # ... and choose the same layers when loaded.
    idx = tokens()
    reloaded = load_adapter(make_gpt2(0), tmp_path)
    assert sorted(lora_layers(reloaded)) == sorted(lora_layers(model))
    assert torch.equal(reloaded(idx), model(idx))


def test_targets_that_no_longer_describe_the_layers_are_written_as_full_names(tmp_path, adapted):
    model = adapted(targets=["c_attn"])
    block = model.transformer.h[0]
    block.mlp.c_fc = LoRALinear(block.mlp.c_fc, r=4, alpha=8)  # wrapped by hand, after add_lora
    config = saved_config(model, tmp_path)
    assert config["target_modules"] == sorted(lora_layers(model))


def test_a_loaded_adapter_is_saved_again_with_its_own_targets(tmp_path, adapted, make_gpt2):
    save_adapter(adapted(), tmp_path / "a")
    edit_config(tmp_path / "a", target_modules=[*ALL_LINEAR, "lm_head"], exclude_modules=["lm_head"])
    config = saved_config(load_adapter(make_gpt2(0), tmp_path / "a"), tmp_path / "b")
    assert config["target_modules"] == [*ALL_LINEAR, "lm_head"] and config["exclude_modules"] == ["lm_head"]


def test_task_type_and_base_model_name_or_path(tmp_path, adapted, make_gpt2):
    """CAUSAL_LM only for a model PEFT can wrap as one (ours has no prepare_inputs_for_generation);
    the base model's origin when the model knows it."""
    ours = adapted()
    assert saved_config(ours, tmp_path / "a")["task_type"] is None
    assert saved_config(ours, tmp_path / "a")["base_model_name_or_path"] is None  # built, not loaded
    assert saved_config(ours, tmp_path / "a", base_model_name_or_path="x")["base_model_name_or_path"] == "x"
    save_checkpoint(make_gpt2(0), tmp_path / "base.safetensors")
    loaded = add_lora(load_checkpoint(tmp_path / "base.safetensors"))
    assert saved_config(loaded, tmp_path / "b")["base_model_name_or_path"] == str(tmp_path / "base.safetensors")

    pytest.importorskip("transformers")
    hf = add_lora(small_hf_gpt2())
    assert saved_config(hf, tmp_path / "c")["task_type"] == "CAUSAL_LM"
    hf.name_or_path = "openai-community/gpt2"  # what from_pretrained records (and PEFT reads)
    assert saved_config(hf, tmp_path / "c")["base_model_name_or_path"] == "openai-community/gpt2"


# --- exclude_modules, saved and loaded ---

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
def test_exclude_applies_to_any_targets_as_peft_exclude_modules_does(tmp_path, targets, exclude, expected, make_gpt2):
    model = add_lora(make_gpt2(), targets, exclude=exclude)
    assert sorted(lora_layers(model)) == sorted(expected)
    save_adapter(model, tmp_path)  # the adapter file chooses the same layers again
    assert sorted(lora_layers(load_adapter(make_gpt2(), tmp_path))) == sorted(expected)


def test_peft_auto_class_loads_an_adapter_saved_from_a_base_loaded_from_a_folder(tmp_path, randomize_lora):
    """base_model_name_or_path is the folder the base came from, and AutoPeftModel follows it."""
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    small_hf_gpt2().save_pretrained(tmp_path / "base")
    model = add_lora(transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "base").eval(), ["c_attn"])
    torch.manual_seed(1)
    randomize_lora(model)
    idx = torch.randint(0, 50, (2, 8))
    expected = logits(model, idx)
    save_adapter(model, tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(tmp_path / "base")
    loaded = peft.AutoPeftModelForCausalLM.from_pretrained(str(tmp_path / "adapter")).eval()
    assert torch.allclose(logits(loaded, idx), expected, atol=1e-5)
