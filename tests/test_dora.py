"""DoRA: a fresh layer is its base, it equals PEFT's use_dora=True, merges exactly, and ΔM/ΔD are right."""

import copy
import json

import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from hf_models import small_hf_gpt2
from lora_edu.dora import DoRALinear, adapted_weight, weight_decomposition
from lora_edu.gpt2 import load_tiny
from lora_edu.lora import add_lora, lora_layers, merge_lora
from lora_edu.lora_layer import LoRALinear
from lora_edu.nf4 import NF4Linear
from lora_edu.peft_format import load_adapter, save_adapter


def base_layer(conv1d: bool, in_features: int, out_features: int) -> nn.Module:
    """nn.Linear(in, out), or Hugging Face's GPT-2 Conv1D of the same shape (skipped without transformers)."""
    if not conv1d:
        return nn.Linear(in_features, out_features)
    return pytest.importorskip("transformers.pytorch_utils").Conv1D(out_features, in_features)


def trained(layer: DoRALinear, seed: int = 1) -> DoRALinear:
    """As if trained: random B and a magnitude moved away from ||W0||."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        layer.lora_B.weight.copy_(torch.randn(layer.lora_B.weight.shape, generator=g) * 0.1)
        layer.magnitude.mul_(1 + 0.2 * torch.rand(layer.magnitude.shape, generator=g))
    return layer


@pytest.mark.parametrize("conv1d", [False, True], ids=["Linear", "Conv1D"])
def test_a_fresh_dora_layer_is_its_base_and_the_magnitude_is_the_row_norm(conv1d):
    torch.manual_seed(0)
    base = base_layer(conv1d, 7, 5)
    layer = DoRALinear(copy.deepcopy(base), r=2, alpha=4, fan_in_fan_out=conv1d)
    x = torch.randn(3, 7)
    torch.testing.assert_close(layer(x), base(x), rtol=0, atol=1e-6)
    w = base.weight.T if conv1d else base.weight  # (out, in)
    assert layer.magnitude.shape == (5,)
    torch.testing.assert_close(layer.magnitude.detach(), torch.linalg.norm(w, dim=1).detach())


@pytest.mark.parametrize("dropout", [0.0, 0.3])
@pytest.mark.parametrize("train", [False, True])
def test_dora_equals_peft_use_dora_on_hf_gpt2(dropout, train):
    peft = pytest.importorskip("peft")
    hf = small_hf_gpt2()
    config = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, use_dora=True,
                             target_modules=["c_attn", "c_proj"], fan_in_fan_out=True)
    theirs = peft.get_peft_model(copy.deepcopy(hf), config)
    ours = copy.deepcopy(hf)
    for name, module in theirs.named_modules():
        if isinstance(module, peft.tuners.lora.LoraLayer):
            g = torch.Generator().manual_seed(len(name))
            with torch.no_grad():
                module.lora_B["default"].weight.normal_(generator=g)
                magnitude = module.lora_magnitude_vector["default"].weight
                magnitude.mul_(1 + 0.1 * torch.rand(magnitude.shape, generator=g))
            path = name.removeprefix("base_model.model.")
            parent, child = path.rsplit(".", 1)
            layer = DoRALinear(ours.get_submodule(path), r=4, alpha=8, dropout=dropout, fan_in_fan_out=True)
            with torch.no_grad():
                layer.lora_A.weight.copy_(module.lora_A["default"].weight)
                layer.lora_B.weight.copy_(module.lora_B["default"].weight)
                layer.magnitude.copy_(magnitude)
            setattr(ours.get_submodule(parent), child, layer)
    theirs.train(train), ours.train(train)
    idx = torch.randint(0, 50, (2, 16), generator=torch.Generator().manual_seed(3))
    torch.manual_seed(7)
    want = theirs(idx).logits
    torch.manual_seed(7)
    got = ours(idx).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # Gradients too: the norm is detached in both (the paper's Section 4.3).
    want.square().mean().backward(), got.square().mean().backward()
    peft_grads = {n.removeprefix("base_model.model."): p.grad for n, p in theirs.named_parameters() if p.requires_grad}
    for name, p in ours.named_parameters():
        if "lora_" in name or "magnitude" in name:
            peft_name = (name.replace("lora_A.weight", "lora_A.default.weight")
                         .replace("lora_B.weight", "lora_B.default.weight")
                         .replace("magnitude", "lora_magnitude_vector.default.weight"))
            torch.testing.assert_close(p.grad, peft_grads[peft_name], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("conv1d", [False, True], ids=["Linear", "Conv1D"])
def test_merge_and_unmerge_are_exact_inverses_on_a_non_square_weight(conv1d):
    torch.manual_seed(0)
    base = base_layer(conv1d, 5, 12)
    original = base.weight.detach().clone()
    layer = trained(DoRALinear(base, r=3, alpha=6, fan_in_fan_out=conv1d))
    x = torch.randn(4, 5)
    before, merged = layer(x), layer.merged_weight().detach().clone()
    layer.merge()
    assert torch.equal(base.weight, merged)  # merged_weight says what merge writes
    torch.testing.assert_close(layer(x), before, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(base(x), before, rtol=1e-5, atol=1e-6)  # the base layer alone now
    with pytest.raises(RuntimeError, match="already merged"):
        layer.merge()
    layer.unmerge()
    torch.testing.assert_close(base.weight, original, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(layer(x), before, rtol=1e-5, atol=1e-6)


def test_weight_decomposition_separates_magnitude_from_direction():
    torch.manual_seed(0)
    w0 = torch.randn(6, 4)
    delta_m, delta_d = weight_decomposition(w0, 3 * w0)  # rows longer, same directions
    assert delta_m == pytest.approx(2 * torch.linalg.norm(w0, dim=1).mean().item()) and delta_d == pytest.approx(0, abs=1e-12)
    rotation = torch.linalg.qr(torch.randn(4, 4))[0]
    delta_m, delta_d = weight_decomposition(w0, w0 @ rotation)  # same lengths, new directions
    assert delta_m == pytest.approx(0, abs=1e-5) and delta_d > 0.1
    with pytest.raises(ValueError, match="same shape"):
        weight_decomposition(w0, w0.T)
    with pytest.raises(ValueError, match="2-D floating-point"):
        weight_decomposition(w0[0], w0[0])


def test_a_dora_adapter_round_trips_with_peft_in_both_directions(tmp_path):
    peft = pytest.importorskip("peft")
    hf = small_hf_gpt2()
    idx = torch.randint(0, 50, (2, 16), generator=torch.Generator().manual_seed(3))
    ours = add_lora(copy.deepcopy(hf), ["c_attn", "c_proj"], r=4, alpha=8, use_dora=True)
    for layer in lora_layers(ours).values():
        trained(layer, seed=layer.out_features)
    assert all(layer.magnitude.requires_grad for layer in lora_layers(ours).values())
    save_adapter(ours, tmp_path / "ours")
    config = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    keys = load_file(str(tmp_path / "ours" / "adapter_model.safetensors"))
    assert config["use_dora"] is True
    assert "base_model.model.transformer.h.0.attn.c_attn.lora_magnitude_vector" in keys  # PEFT's name, no .weight
    want = ours(idx).logits
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(hf), tmp_path / "ours").eval()
    torch.testing.assert_close(theirs(idx).logits, want, rtol=1e-5, atol=1e-5)

    theirs.save_pretrained(tmp_path / "theirs")  # and back: PEFT's file into a fresh model here
    back = load_adapter(copy.deepcopy(hf), tmp_path / "theirs")
    torch.testing.assert_close(back(idx).logits, want, rtol=1e-5, atol=1e-5)

    merged = merge_lora(back)  # DoRA merges away like LoRA
    assert not lora_layers(merged)
    torch.testing.assert_close(merged(idx).logits, want, rtol=1e-4, atol=1e-5)


def test_add_lora_use_dora_must_be_a_bool(make_gpt2):
    with pytest.raises(TypeError, match="use_dora must be True or False"):
        add_lora(make_gpt2(), ["c_attn"], use_dora="yes")


def test_qdora_takes_the_norm_of_the_dequantized_weight():
    torch.manual_seed(0)
    linear = nn.Linear(64, 32)
    quantized = NF4Linear.from_linear(linear)
    dequantized = nn.Linear(64, 32)
    with torch.no_grad():
        dequantized.weight.copy_(quantized.dequantized_weight())
        dequantized.bias.copy_(linear.bias)
    qdora = trained(DoRALinear(quantized, r=4, alpha=8))
    dora = DoRALinear(dequantized, r=4, alpha=8)
    dora.load_state_dict({k: v for k, v in qdora.state_dict().items() if not k.startswith("base_layer")}, strict=False)
    x = torch.randn(5, 64)
    torch.testing.assert_close(qdora(x), dora(x), rtol=1e-5, atol=1e-5)
    with pytest.raises(TypeError, match="4-bit base"):
        qdora.merge()


@pytest.mark.parametrize("conv1d", [False, True], ids=["Linear", "Conv1D"])
def test_adapted_weight_is_what_each_layer_computes_with(conv1d):
    torch.manual_seed(0)
    x = torch.randn(4, 6)
    base = base_layer(conv1d, 6, 5)
    for layer in (copy.deepcopy(base),
                  LoRALinear(copy.deepcopy(base), r=2, alpha=4, fan_in_fan_out=conv1d),
                  trained(DoRALinear(copy.deepcopy(base), r=2, alpha=4, fan_in_fan_out=conv1d))):
        if isinstance(layer, LoRALinear) and not isinstance(layer, DoRALinear):
            with torch.no_grad():
                layer.lora_B.weight.normal_()
        torch.testing.assert_close(x @ adapted_weight(layer).T + base.bias, layer(x), rtol=1e-5, atol=1e-5)
    with pytest.raises(TypeError, match="layer must be"):
        adapted_weight(nn.ReLU())


def test_the_norm_keeps_nothing_for_backward():
    """Detached, the norm of W0 + s B A costs no memory in the backward pass: DoRA keeps two
    activations more than LoRA (the base and LoRA outputs it rescales), never a dense (out, in)
    matrix, which a norm that gradients pass through would keep."""
    from lora_edu.memory import saved_activation_bytes

    torch.manual_seed(0)
    base = torch.nn.Linear(96, 48)
    x = torch.randn(2, 3, 96)
    lora = saved_activation_bytes(LoRALinear(copy.deepcopy(base), r=4, alpha=8), x)
    dora = saved_activation_bytes(DoRALinear(copy.deepcopy(base), r=4, alpha=8), x)
    activation, dense = 2 * 3 * 48 * 4, 48 * 96 * 4
    assert lora < dora <= lora + 2 * activation + 2 * 48 * 4  # plus the factor m / n, (out,)
    assert dora - lora < dense


def test_a_peft_dora_adapter_whose_magnitude_does_not_fit_is_refused_and_changes_nothing(tmp_path, make_gpt2):
    """Under PEFT's key for it (lora_magnitude_vector), a magnitude one output feature short."""
    save_adapter(add_lora(make_gpt2(), ["c_attn"], r=4, alpha=8, use_dora=True), tmp_path)
    path = tmp_path / "adapter_model.safetensors"
    state = load_file(str(path))
    key = "base_model.model.transformer.h.0.attn.c_attn.lora_magnitude_vector"
    state[key] = state[key][:-1]  # one output feature short
    save_file(state, str(path))
    model = make_gpt2()
    with pytest.raises(ValueError, match=r"h\.0\.attn\.c_attn\.magnitude: adapter has shape"):
        load_adapter(model, tmp_path)
    assert not lora_layers(model)
    assert all(p.requires_grad for p in model.parameters())


def test_dora_on_a_layer_it_cannot_wrap_is_refused_and_changes_nothing():
    model = load_tiny()
    with pytest.raises(TypeError, match=r"not: transformer\.wte \(Embedding\)"):
        add_lora(model, ["transformer.wte", "c_attn"], r=4, alpha=8, use_dora=True)
    assert not lora_layers(model)
    assert all(p.requires_grad for p in model.parameters())
