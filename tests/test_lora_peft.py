"""lora_edu.lora and lora_edu.peft_format against Hugging Face PEFT: the same adapter files, the same numbers."""

import copy
import json
import warnings

import pytest
import torch

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from hf_models import small_hf_gpt2  # noqa: E402
from lora_edu.lora import add_lora, lora_layers  # noqa: E402
from lora_edu.peft_format import load_adapter, save_adapter  # noqa: E402

def randomize(params, seed):
    """Random values for A and B (PEFT and we both start B at zero, which would prove nothing)."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.normal_(std=0.2)


def peft_lora_params(peft_model):
    return [p for n, p in peft_model.named_parameters() if ".lora_A." in n or ".lora_B." in n]


def logits(model, idx):
    out = model(idx)
    return out if isinstance(out, torch.Tensor) else out.logits


@pytest.fixture
def idx():
    return torch.randint(0, 50, (2, 16))


@pytest.fixture(autouse=True)
def _quiet():
    # PEFT warns that it turns fan_in_fan_out on for GPT-2's Conv1D: expected, and harmless.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="fan_in_fan_out is set to False")
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated")  # PEFT calls it
        yield


@pytest.mark.parametrize(
    "kwargs", [dict(r=4, alpha=8), dict(r=3, alpha=5, use_rslora=True, targets=["c_attn", "mlp.c_proj"])]
)
def test_our_adapter_loads_in_peft_with_the_same_logits(tmp_path, idx, kwargs, ours_and_hf):
    ours, hf = ours_and_hf
    base_logits = logits(hf, idx)
    add_lora(ours, **kwargs)
    randomize([p for layer in lora_layers(ours).values() for p in (layer.lora_A.weight, layer.lora_B.weight)], seed=1)
    expected = ours(idx)
    assert not torch.allclose(expected, base_logits, atol=1e-3)  # the adapter changes something
    save_adapter(ours, tmp_path, base_model_name_or_path="gpt2")

    peft_model = peft.PeftModel.from_pretrained(hf, tmp_path).eval()
    wrapped = {
        n.removeprefix("base_model.model.")
        for n, m in peft_model.named_modules()
        if isinstance(m, peft.tuners.lora.LoraLayer)
    }
    assert wrapped == set(lora_layers(ours))
    torch.testing.assert_close(logits(peft_model, idx), expected, atol=1e-5, rtol=1e-5)


def test_a_peft_adapter_loads_here_with_the_same_logits(tmp_path, idx, ours_and_hf):
    ours, hf = ours_and_hf
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True)
    peft_model = peft.get_peft_model(hf, config).eval()
    randomize(peft_lora_params(peft_model), seed=2)
    expected = logits(peft_model, idx)
    peft_model.save_pretrained(tmp_path)

    load_adapter(ours, tmp_path)
    assert sorted(lora_layers(ours)) == sorted(
        f"transformer.h.{i}.{m}" for i in range(2) for m in ("attn.c_attn", "attn.c_proj", "mlp.c_proj")
    )
    torch.testing.assert_close(ours(idx), expected, atol=1e-5, rtol=1e-5)


def test_add_lora_on_hf_gpt2_matches_peft_for_the_same_a_and_b(tmp_path, idx):
    ours = add_lora(small_hf_gpt2(), ["c_attn", "c_fc"], r=2, alpha=3)  # Conv1D layers, fan_in_fan_out
    peft_model = peft.get_peft_model(
        small_hf_gpt2(), peft.LoraConfig(r=2, lora_alpha=3, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True)
    ).eval()
    randomize(peft_lora_params(peft_model), seed=3)
    peft_modules = dict(peft_model.base_model.model.named_modules())
    with torch.no_grad():  # copy PEFT's A and B into our layers, by name
        for name, layer in lora_layers(ours).items():
            layer.lora_A.weight.copy_(peft_modules[name].lora_A["default"].weight)
            layer.lora_B.weight.copy_(peft_modules[name].lora_B["default"].weight)
    torch.testing.assert_close(logits(ours, idx), logits(peft_model, idx), atol=1e-5, rtol=1e-5)
    for name, layer in lora_layers(ours).items():  # B A laid out like the Conv1D weight, as PEFT's
        torch.testing.assert_close(layer.delta_weight(), peft_modules[name].get_delta_weight("default"))

    # Saved by us from the HF model, loaded by PEFT into another: same logits again.
    save_adapter(ours, tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["fan_in_fan_out"] is True
    reloaded = peft.PeftModel.from_pretrained(small_hf_gpt2(), tmp_path).eval()
    torch.testing.assert_close(logits(reloaded, idx), logits(ours, idx), atol=1e-5, rtol=1e-5)


# PEFT guesses from the name "lm_head" in target_modules that embeddings might need saving,
# then finds none on a model that is not a transformers one: both warnings are harmless here.
@pytest.mark.filterwarnings("ignore:Setting `save_embedding_layers`", "ignore:Could not identify embedding layer")
@pytest.mark.parametrize("exclude_modules", [["lm_head"], ["lm_head", "h.0.mlp.c_fc"], r"lm_head|.*\.0\.attn\..*"])
def test_a_peft_all_linear_adapter_with_exclude_modules_loads_here(tmp_path, idx, exclude_modules, ours_and_hf):
    """PEFT's all-linear spares the output head only on a Hugging Face model; on ours it is
    listed in target_modules and left out by exclude_modules, which load_adapter must honour."""
    ours, _ = ours_and_hf
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", exclude_modules=exclude_modules)
    peft_model = peft.get_peft_model(copy.deepcopy(ours), config).eval()
    randomize(peft_lora_params(peft_model), seed=4)
    expected = logits(peft_model, idx)
    peft_model.save_pretrained(tmp_path)
    assert "lm_head" in json.loads((tmp_path / "adapter_config.json").read_text())["target_modules"]

    load_adapter(ours, tmp_path)
    wrapped = {
        n.removeprefix("base_model.model.")
        for n, m in peft_model.named_modules()
        if isinstance(m, peft.tuners.lora.LoraLayer)
    }
    assert set(lora_layers(ours)) == wrapped
    torch.testing.assert_close(ours(idx), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("targets", ["all-linear", ["c_attn", "mlp.c_proj"], r".*\.1\.mlp\.c_fc"])
def test_an_adapter_of_our_gpt2_loads_in_peft_on_our_gpt2(tmp_path, idx, targets, ours_and_hf):
    """Our GPT2 is no transformers model: PEFT wraps it as a plain PeftModel, which a
    task_type of CAUSAL_LM would break (it needs prepare_inputs_for_generation)."""
    ours, _ = ours_and_hf
    base = copy.deepcopy(ours)
    add_lora(ours, targets, r=4, alpha=8)
    randomize([p for layer in lora_layers(ours).values() for p in (layer.lora_A.weight, layer.lora_B.weight)], seed=5)
    save_adapter(ours, tmp_path)
    peft_model = peft.PeftModel.from_pretrained(base, tmp_path)
    assert not any(m.training for m in peft_model.modules())
    wrapped = {
        n.removeprefix("base_model.model.")
        for n, m in peft_model.named_modules()
        if isinstance(m, peft.tuners.lora.LoraLayer)
    }
    assert wrapped == set(lora_layers(ours))
    torch.testing.assert_close(peft_model(idx), ours(idx), atol=1e-5, rtol=1e-5)
