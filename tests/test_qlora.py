"""Tests of lora_edu.qlora (QLoRA: LoRA on a frozen 4-bit base) and what it needs elsewhere:
LoRALinear over a 4-bit layer, NF4Linear's memory-saving backward, GPT-2's gradient
checkpointing. A test that compares with bitsandbytes skips alone where it is missing."""

import copy
import json
import math
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from hf_models import small_hf_gpt2
from lora_edu.gpt2 import GPT2Config
from lora_edu.lora import add_lora, lora_layers, merge_lora
from lora_edu.lora_layer import LoRALinear, is_quantized
from lora_edu.memory import saved_activation_bytes
from lora_edu.nf4 import NF4Linear, nf4_code
from lora_edu.qlora import (
    QLORA_LORA,
    compute_dtype_for,
    dequantize_layer,
    dequantize_model,
    make_optimizer,
    merge_and_dequantize,
    merge_and_requantize,
    output_change,
    prepare_for_kbit_training,
    quantize_model,
    quantized_layers,
)

try:  # importorskip, for its quiet import; only the tests that compare with bitsandbytes need it
    bnb = pytest.importorskip("bitsandbytes")
    bnbf = pytest.importorskip("bitsandbytes.functional")
except pytest.skip.Exception:
    bnb = bnbf = None
needs_bnb = pytest.mark.skipif(bnb is None, reason="compares with bitsandbytes (pip install bitsandbytes)")

# small_gpt2 (conftest.py): 2 blocks of these four layers
BLOCK_LINEAR = [f"transformer.h.{i}.{m}" for i in range(2) for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")]
BACKENDS = ["lora_edu", pytest.param("bitsandbytes", marks=needs_bnb)]


# --- helpers ---


def quantized(model, backend="lora_edu", **kwargs):
    return quantize_model(copy.deepcopy(model), backend, **kwargs)


def packed(layer):
    """The stored 4-bit codes, two per byte, flattened."""
    return (layer.weight_packed if isinstance(layer, NF4Linear) else layer.weight.data).flatten()


def settings(layer):
    """(type, blocksize, double quantization, compute dtype) of a 4-bit layer."""
    if isinstance(layer, NF4Linear):
        return NF4Linear, layer.blocksize, layer.absmax_codes is not None, layer.compute_dtype
    return type(layer), layer.weight.blocksize, layer.weight.compress_statistics, layer.compute_dtype


def with_random_b(model, std=0.05, seed=2):
    """Pretend training happened: B (which starts at zero) gets random values."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B.weight.copy_(torch.randn(layer.lora_B.weight.shape, generator=g) * std)
    return model


def qlora_model(base, backend="lora_edu", prepare=False, checkpoint_reentrant=None, **lora):
    """Quantize, optionally prepare, add LoRA (dropout 0 unless asked), B random."""
    model = quantized(base, backend)
    if prepare:
        prepare_for_kbit_training(model)
    elif checkpoint_reentrant is not None:
        model.gradient_checkpointing_enable(use_reentrant=checkpoint_reentrant)
    torch.manual_seed(3)  # the same A in every model built here
    add_lora(model, "all-linear", **{"r": 8, "alpha": 16, "dropout": 0.0, **lora})
    return with_random_b(model)


def trainable_grads(model, idx, targets):
    model.train()
    _, loss = model(idx, targets)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


class FixedLogits(nn.Module):
    """A 'model' that returns the given logits whatever the input."""

    def __init__(self, logits):
        super().__init__()
        self.logits = logits

    def forward(self, idx):
        return self.logits


class NaiveNF4(nn.Module):
    """NF4Linear without _MatmulNF4: F.linear on the dequantized weight, which autograd keeps."""

    def __init__(self, layer):
        super().__init__()
        self.layer = layer

    def forward(self, x):
        return F.linear(x, self.layer.dequantized_weight(), self.layer.bias)


# ---------------------------------------------------------------------------------------
# quantize_model: both backends
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_quantize_model_replaces_every_block_linear_and_leaves_the_tied_head(small_gpt2, backend):
    model = copy.deepcopy(small_gpt2)
    assert quantize_model(model, backend) is model  # in place
    layers = quantized_layers(model)
    assert sorted(layers) == sorted(BLOCK_LINEAR)
    layer_type = NF4Linear if backend == "lora_edu" else bnb.nn.Linear4bit
    assert all(type(layer) is layer_type for layer in layers.values())
    assert [n for n, m in model.named_modules() if type(m) is nn.Linear] == ["lm_head"]
    assert model.lm_head.weight is model.transformer.wte.weight  # still tied
    for name, layer in layers.items():  # the biases stay full precision, unchanged
        assert torch.equal(layer.bias, small_gpt2.get_submodule(name).bias)
        assert (layer.in_features, layer.out_features) == (small_gpt2.get_submodule(name).in_features,
                                                           small_gpt2.get_submodule(name).out_features)


@needs_bnb
@pytest.mark.parametrize("blocksize, double_quant", [(64, True), (32, False)])
def test_both_backends_store_the_same_bytes_and_dequantize_alike(small_gpt2, blocksize, double_quant):
    ours = quantized_layers(quantized(small_gpt2, "lora_edu", blocksize=blocksize, double_quant=double_quant))
    theirs = quantized_layers(quantized(small_gpt2, "bitsandbytes", blocksize=blocksize, double_quant=double_quant))
    assert ours.keys() == theirs.keys()
    for name in ours:
        a, b = ours[name], theirs[name]
        assert a.weight_packed.dtype == b.weight.dtype == torch.uint8
        assert a.weight_packed.numel() == a.in_features * a.out_features // 2  # 4 bits per value
        assert torch.equal(a.weight_packed.flatten(), b.weight.data.flatten())
        state = b.weight.quant_state
        assert state.blocksize == a.blocksize == blocksize
        if double_quant:
            assert state.nested and a.absmax is None
            assert torch.equal(a.absmax_codes, state.absmax) and torch.equal(a.absmax_offset, state.offset)
        else:
            assert not state.nested and a.absmax_codes is None
            assert torch.equal(a.absmax, state.absmax)
        da, db = dequantize_layer(a), dequantize_layer(b)
        assert type(da) is type(db) is nn.Linear
        assert torch.equal(da.weight, db.weight) and torch.equal(da.bias, db.bias)
        assert not da.weight.requires_grad
        w0 = small_gpt2.get_submodule(name).weight.detach()
        half_gap = nf4_code().diff().max() / 2  # the largest rounding error, in units of a block's absmax
        assert 0 < (da.weight - w0).abs().max() <= 1.01 * half_gap * w0.abs().max()
        x = torch.randn(3, a.in_features)
        torch.testing.assert_close(a(x), da(x), rtol=1e-5, atol=1e-6)  # the weight it computes with


@needs_bnb
def test_the_logits_of_the_two_backends_agree_in_training_and_inference(small_gpt2, small_batch):
    ours, theirs = quantized(small_gpt2, "lora_edu"), quantized(small_gpt2, "bitsandbytes")
    before = {n: packed(layer).clone() for n, layer in quantized_layers(theirs).items()}
    idx = small_batch[0]
    for model in (ours, theirs):
        model.train()
    assert (ours(idx) - theirs(idx)).abs().max() < 1e-4  # the training path
    change = output_change(ours, theirs, idx)  # eval mode, no grad: bitsandbytes' inference path
    assert change["max_abs_logit"] < 1e-4 and change["top1_agreement"] == 1.0
    # On an AVX512-BF16 CPU bitsandbytes would have repacked the weights for its own kernel
    # (bfloat16 absmax); quantize_model turns that off, so the bytes are still NF4Linear's.
    for name, layer in quantized_layers(theirs).items():
        assert torch.equal(packed(layer), before[name])
        assert not getattr(layer.weight.quant_state, "packing_format_for_cpu", False)


@needs_bnb
@pytest.mark.skipif(bnbf is not None and not bnbf.has_avx512bf16(),
                    reason="bitsandbytes repacks 4-bit weights only on AVX512-BF16 CPUs")
def test_dequantize_layer_reads_a_linear4bit_repacked_for_the_cpu(small_gpt2):
    layer = quantized_layers(quantized(small_gpt2, "bitsandbytes"))["transformer.h.0.attn.c_attn"]
    want = dequantize_layer(layer).weight
    layer.support_avx512bf16_for_cpu = True  # what a Linear4bit built elsewhere does
    layer.eval()
    with torch.no_grad():
        layer(torch.randn(2, 64))
    assert layer.weight.quant_state.packing_format_for_cpu  # repacked: the old layout is gone
    got = dequantize_layer(layer).weight
    # Only the absmaxes changed (they went through bfloat16 and were double-quantized anew):
    # every weight is off by under 1% of itself.
    assert ((got - want).abs() <= 0.01 * want.abs()).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_bitsandbytes_is_asked_for_nf4_and_double_quantization_is_on_by_default(small_gpt2, backend):
    if backend == "bitsandbytes":
        assert bnb.nn.Linear4bit(64, 64).weight.quant_type == "fp4"  # bitsandbytes' own default
    for layer in quantized_layers(quantized(small_gpt2, backend)).values():
        if backend == "bitsandbytes":
            assert layer.weight.quant_type == "nf4" and layer.weight.quant_state.quant_type == "nf4"
            assert layer.weight.compress_statistics and layer.weight.quant_state.nested
        else:
            assert layer.absmax_codes is not None and layer.absmax is None
        assert settings(layer)[1:] == (64, True, torch.float32)
    for layer in quantized_layers(quantized(small_gpt2, backend, double_quant=False)).values():
        assert settings(layer)[2] is False


@pytest.mark.parametrize("backend", BACKENDS)
def test_compute_dtype_is_respected(small_gpt2, backend):
    full = quantized_layers(quantized(small_gpt2, backend))["transformer.h.0.mlp.c_fc"].train()
    half = quantized_layers(quantized(small_gpt2, backend, compute_dtype=torch.bfloat16))["transformer.h.0.mlp.c_fc"].train()
    assert full.compute_dtype == torch.float32 and half.compute_dtype == torch.bfloat16
    assert torch.equal(packed(full), packed(half))  # the storage does not depend on it
    x = torch.randn(4, 64)
    if backend == "lora_edu":
        assert half(x).dtype == torch.bfloat16 and half.dequantized_weight().dtype == torch.bfloat16
    want = full(x)
    got = half(x).float()
    assert not torch.equal(got, want)  # computed in bfloat16 ...
    torch.testing.assert_close(got, want, rtol=0.02, atol=0.02)  # ... to bfloat16's precision


def test_compute_dtype_for_the_cpu_is_float32():
    assert compute_dtype_for("cpu") == torch.float32
    assert compute_dtype_for(torch.device("cpu")) == torch.float32


@pytest.mark.parametrize("native_bf16, expected", [(True, torch.bfloat16), (False, torch.float16)])
def test_compute_dtype_for_a_gpu_takes_bfloat16_only_where_it_is_native(monkeypatch, native_bf16, expected):
    # A T4 only emulates bfloat16, and torch.cuda.is_bf16_supported() counts emulation by default.
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation or native_bf16)
    assert compute_dtype_for("cuda") == expected


# ---------------------------------------------------------------------------------------
# The refusals
# ---------------------------------------------------------------------------------------


def test_quantize_model_refuses_what_it_cannot_quantize(small_gpt2):
    with pytest.raises(ValueError, match=r"unknown backend 'gptq'; expected one of \['lora_edu', 'bitsandbytes'\]"):
        quantized(small_gpt2, "gptq")
    with pytest.raises(ValueError, match="no nn.Linear layers to quantize"):
        quantize_model(nn.Sequential(nn.LayerNorm(4)))
    with pytest.raises(ValueError, match="no nn.Linear layers to quantize"):  # the only one is excluded
        quantize_model(nn.Sequential(nn.LayerNorm(4), nn.Linear(4, 4)), exclude=("1",))
    with pytest.raises(ValueError, match="already quantized .*quantizing twice"):
        quantize_model(quantized(small_gpt2))
    with pytest.raises(ValueError, match="already has LoRA layers; quantize the base first"):
        quantize_model(add_lora(copy.deepcopy(small_gpt2)))
    with pytest.raises(TypeError, match="model is itself a linear layer"):
        quantize_model(nn.Linear(64, 64))
    for bad in (torch.int8, "bfloat16", None):
        with pytest.raises(TypeError, match="compute_dtype must be a floating-point torch.dtype"):
            quantized(small_gpt2, compute_dtype=bad)


def test_a_hugging_face_gpt2_is_refused_for_its_conv1d_layers():
    pytest.importorskip("transformers")
    with pytest.raises(TypeError, match="Conv1D.*load_pretrained"):
        quantize_model(small_hf_gpt2())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_non_finite_weight_is_refused_by_name_and_nothing_is_quantized(small_gpt2, backend, bad):
    """Both backends (bitsandbytes alone would take it, and double quantization would then
    dequantize the whole tensor to NaN); before any layer is replaced, so a retry works."""
    model = copy.deepcopy(small_gpt2)
    weight = model.transformer.h[1].mlp.c_fc.weight  # a late layer: the earlier ones come first
    with torch.no_grad():
        weight[3, 5] = bad
    message = r"^transformer.h.1.mlp.c_fc.weight has 1 NaN or infinite .*the model was left unchanged"
    with pytest.raises(ValueError, match=message):
        quantize_model(model, backend)
    assert quantized_layers(model) == {}
    with torch.no_grad():
        weight[3, 5] = 0.0
    quantize_model(model, backend)  # fixed, and quantized after all
    assert sorted(quantized_layers(model)) == BLOCK_LINEAR


def test_quantize_model_checks_blocksize_and_weights_before_anything(small_gpt2):
    model = copy.deepcopy(small_gpt2)
    with pytest.raises(ValueError, match="blocksize must be a power of two from 32 to 4096"):
        quantize_model(model, "bitsandbytes", blocksize=48)
    model.transformer.h[1].attn.c_proj.weight = nn.Parameter(torch.ones(64, 64, dtype=torch.int8), requires_grad=False)
    with pytest.raises(TypeError, match=r"^transformer.h.1.attn.c_proj.weight must hold floating-point .*int8"):
        quantize_model(model)
    assert quantized_layers(model) == {}


def test_the_other_refusals(small_gpt2):
    with pytest.raises(ValueError, match="no 4-bit layers; call quantize_model first"):
        prepare_for_kbit_training(copy.deepcopy(small_gpt2))
    frozen = quantized(small_gpt2).requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters; add_lora first"):
        make_optimizer(frozen, 1e-3)
    for merge in (merge_and_dequantize, merge_and_requantize):
        with pytest.raises(ValueError, match="no LoRA layers to merge; call add_lora first"):
            merge(quantized(small_gpt2))
    with pytest.raises(ValueError, match="full-precision base; merge it with lora_edu.lora.merge_lora"):
        merge_and_requantize(add_lora(copy.deepcopy(small_gpt2)))
    with pytest.raises(ValueError, match="model has no 4-bit layers to dequantize"):
        dequantize_model(copy.deepcopy(small_gpt2))
    with pytest.raises(TypeError, match="must be a 4-bit layer .* got Linear"):
        dequantize_layer(nn.Linear(4, 4))


def test_a_paged_optimizer_needs_cuda_and_names_the_fallback(small_gpt2):
    model = add_lora(quantized(small_gpt2), "all-linear", **QLORA_LORA)
    with pytest.raises(ValueError, match=r"paged=True needs the parameters on a CUDA GPU.*use paged=False"):
        make_optimizer(model, 1e-3, paged=True)


def test_make_optimizer_on_the_cpu_is_adamw_over_exactly_the_lora_parameters(small_gpt2):
    model = add_lora(quantized(small_gpt2), "all-linear", **QLORA_LORA)
    optimizer = make_optimizer(model, 2e-4, weight_decay=0.01)  # paged=None
    assert type(optimizer) is torch.optim.AdamW
    got = [p for group in optimizer.param_groups for p in group["params"]]
    want = [p for layer in lora_layers(model).values() for p in (layer.lora_A.weight, layer.lora_B.weight)]
    assert len(got) == len(want) == 16 and {id(p) for p in got} == {id(p) for p in want}
    assert all(group["lr"] == 2e-4 and group["weight_decay"] == 0.01 for group in optimizer.param_groups)
    assert type(make_optimizer(model, 1e-3, paged=False)) is torch.optim.AdamW


# ---------------------------------------------------------------------------------------
# LoRALinear over a 4-bit base
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_lora_layer_over_a_4bit_base(small_gpt2, backend):
    base_layer = quantized_layers(quantized(small_gpt2, backend, compute_dtype=torch.bfloat16))["transformer.h.0.mlp.c_fc"]
    assert is_quantized(base_layer) and not is_quantized(nn.Linear(4, 4))
    assert not is_quantized(small_gpt2.transformer.h[0].mlp.c_fc)
    layer = with_random_b(nn.Sequential(LoRALinear(base_layer, r=4, alpha=8)))[0].train()
    assert (layer.in_features, layer.out_features) == (64, 256)
    assert layer.lora_A.weight.dtype == layer.lora_B.weight.dtype == torch.float32  # beside a bfloat16 compute
    assert layer.lora_A.weight.shape == (4, 64) and layer.lora_B.weight.shape == (256, 4)
    x = torch.randn(3, 64)
    out, base_out = layer(x), base_layer(x)
    assert out.dtype == base_out.dtype  # the sum in the base's dtype (bfloat16 for NF4Linear)
    bypass = x @ layer.lora_A.weight.T @ layer.lora_B.weight.T * (8 / 4)
    assert bypass.abs().max() > 0.1  # B is not zero: the bypass shows
    torch.testing.assert_close(out.float(), base_out.float() + bypass, rtol=1e-2, atol=1e-2)
    out.float().sum().backward()
    assert layer.lora_A.weight.grad.dtype == torch.float32 and layer.lora_B.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match=f"a {type(base_layer).__name__}, whose weight is \\(out, in\\)"):
        LoRALinear(base_layer, r=4, alpha=8, fan_in_fan_out=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_merging_into_a_4bit_base_is_refused_and_points_at_qlora(small_gpt2, backend):
    model = qlora_model(small_gpt2, backend)
    snapshot = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(TypeError, match="4-bit base .*merge_and_dequantize .*merge_and_requantize"):
        next(iter(lora_layers(model).values())).merge()
    with pytest.raises(TypeError, match="transformer.h.0.attn.c_attn has a 4-bit base.*merge_and_dequantize"):
        merge_lora(model)
    assert len(lora_layers(model)) == 8 and not any(layer.merged for layer in lora_layers(model).values())
    state = model.state_dict()
    assert state.keys() == snapshot.keys() and all(torch.equal(state[k], snapshot[k]) for k in state)


# ---------------------------------------------------------------------------------------
# prepare_for_kbit_training, the trainable set, and why the input-grad hook exists
# ---------------------------------------------------------------------------------------


def test_prepare_freezes_everything_and_casts_16_bit_parameters_to_float32(small_gpt2):
    model = quantized(small_gpt2)
    model.transformer.ln_f.to(torch.bfloat16)
    model.transformer.wpe.to(torch.float16)
    model.transformer.h[0].mlp.c_fc.bias.data = model.transformer.h[0].mlp.c_fc.bias.data.bfloat16()
    assert prepare_for_kbit_training(model) is model
    assert model.gradient_checkpointing and model._checkpoint_reentrant  # PEFT's default
    assert not any(p.requires_grad for p in model.parameters())
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert all(b.dtype == torch.uint8 for n, b in model.named_buffers() if n.endswith("weight_packed"))
    assert torch.equal(model.transformer.ln_f.weight, small_gpt2.transformer.ln_f.weight.bfloat16().float())
    hook = model._input_grad_hook
    prepare_for_kbit_training(model)  # again: still one hook
    assert model._input_grad_hook is hook
    plain = prepare_for_kbit_training(quantized(small_gpt2), use_reentrant=False)
    assert plain.gradient_checkpointing and not plain._checkpoint_reentrant
    assert getattr(plain, "_input_grad_hook", None) is None  # not needed without reentrant checkpoints
    off = prepare_for_kbit_training(quantized(small_gpt2), gradient_checkpointing=False)
    assert not off.gradient_checkpointing


@pytest.mark.parametrize("backend", BACKENDS)
def test_only_the_adapters_train_and_the_4bit_weights_never_change(small_gpt2, small_batch, backend):
    model = prepare_for_kbit_training(quantized(small_gpt2, backend))
    add_lora(model, "all-linear", **QLORA_LORA)
    lora_names = {n for n, _ in model.named_parameters() if ".lora_A." in n or ".lora_B." in n}
    assert len(lora_names) == 16
    assert {n for n, p in model.named_parameters() if p.requires_grad} == lora_names
    assert all(p.dtype == torch.float32 for n, p in model.named_parameters() if n in lora_names)
    frozen = {k: v.clone() for k, v in model.state_dict().items() if "lora_" not in k}
    lora_before = {n: p.detach().clone() for n, p in model.named_parameters() if n in lora_names}
    optimizer = make_optimizer(model, 1e-2)
    model.train()
    _, loss = model(*small_batch)
    loss.backward()
    assert {n for n, p in model.named_parameters() if p.grad is not None} == lora_names
    optimizer.step()
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in frozen.items())  # packed codes, absmaxes, norms, biases
    assert any(k.endswith("weight_packed") or k.endswith(".weight") for k in frozen)
    changed = {n for n, p in model.named_parameters() if n in lora_names and not torch.equal(p, lora_before[n])}
    assert {n for n in changed if ".lora_B." in n} == {n for n in lora_names if ".lora_B." in n}


def test_reentrant_checkpointing_without_the_hook_trains_nothing(small_gpt2, small_batch):
    model = qlora_model(small_gpt2, checkpoint_reentrant=True)  # no prepare_for_kbit_training
    model.train()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _, loss = model(*small_batch)
    # Every block's input is the frozen embedding's output: no block records a graph.
    assert not loss.requires_grad
    assert any("None of the inputs have requires_grad=True" in str(w.message) for w in caught)
    with pytest.raises(RuntimeError, match="does not require grad"):
        loss.backward()
    assert all(layer.lora_B.weight.grad is None for layer in lora_layers(model).values())


def test_prepare_makes_reentrant_checkpointing_give_the_gradients_of_no_checkpointing(small_gpt2, small_batch):
    reference_loss, reference = trainable_grads(qlora_model(small_gpt2), *small_batch)
    model = qlora_model(small_gpt2, prepare=True)
    assert model.gradient_checkpointing and model._checkpoint_reentrant
    loss, grads = trainable_grads(model, *small_batch)
    assert torch.equal(loss, reference_loss)
    assert grads.keys() == reference.keys() and len(grads) == 16
    for name in grads:
        assert grads[name].abs().sum() > 0
        torch.testing.assert_close(grads[name], reference[name], rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------------------------------
# Activation memory: gradient checkpointing and _MatmulNF4
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_gradient_checkpointing_saves_activations_and_changes_no_gradient(small_gpt2, small_batch, use_reentrant):
    plain, checkpointed = copy.deepcopy(small_gpt2), copy.deepcopy(small_gpt2)
    checkpointed.gradient_checkpointing_enable(use_reentrant=use_reentrant)
    assert checkpointed._checkpoint_reentrant is use_reentrant
    full, reduced = saved_activation_bytes(plain, *small_batch), saved_activation_bytes(checkpointed, *small_batch)
    assert 0 < reduced < full / 3
    loss_a, grads_a = trainable_grads(plain, *small_batch)
    loss_b, grads_b = trainable_grads(checkpointed, *small_batch)
    torch.testing.assert_close(loss_b, loss_a, rtol=0, atol=0)
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], rtol=1e-5, atol=1e-7)
    checkpointed.gradient_checkpointing_disable()
    assert saved_activation_bytes(checkpointed, *small_batch) == full
    checkpointed.gradient_checkpointing_enable()
    checkpointed.eval()
    with torch.no_grad():  # no checkpointing (and no graph) in inference
        torch.testing.assert_close(checkpointed(small_batch[0]), plain.eval()(small_batch[0]))


def test_gradient_checkpointing_also_saves_memory_for_qlora(small_gpt2, small_batch):
    plain = qlora_model(small_gpt2)
    prepared = qlora_model(small_gpt2, prepare=True)
    assert saved_activation_bytes(prepared, *small_batch) < saved_activation_bytes(plain, *small_batch) / 3


@pytest.mark.parametrize("compute_dtype", [torch.float32, torch.bfloat16])
def test_nf4_linear_backward_gives_the_input_gradient_of_f_linear(small_gpt2, compute_dtype):
    layer = quantized_layers(quantized(small_gpt2, compute_dtype=compute_dtype))["transformer.h.1.mlp.c_proj"]
    x = torch.randn(2, 5, 256, requires_grad=True)
    g = torch.randn(2, 5, 64)
    (layer(x).float() * g).sum().backward()
    x2 = x.detach().clone().requires_grad_(True)
    weight = layer.dequantized_weight()
    (F.linear(x2.to(compute_dtype), weight, layer.bias.to(compute_dtype)).float() * g).sum().backward()
    assert x.grad.dtype == torch.float32
    tol = dict(rtol=1e-5, atol=1e-6) if compute_dtype == torch.float32 else dict(rtol=0.02, atol=0.02)
    torch.testing.assert_close(x.grad, x2.grad, **tol)
    assert all(not p.requires_grad for p in layer.parameters())


def test_nf4_linear_does_not_keep_its_dequantized_weight_for_backward(small_gpt2, small_batch):
    model = quantized(small_gpt2)
    naive = copy.deepcopy(model)
    for name, layer in list(quantized_layers(naive).items()):
        parent, _, child = name.rpartition(".")
        setattr(naive.get_submodule(parent), child, NaiveNF4(layer))
    with torch.no_grad():  # the same function ...
        assert torch.equal(model.eval()(small_batch[0]), naive.eval()(small_batch[0]))
    dequantized_bytes = sum(4 * m.in_features * m.out_features for m in quantized_layers(model).values())
    ours, theirs = saved_activation_bytes(model, *small_batch), saved_activation_bytes(naive, *small_batch)
    assert theirs - ours >= dequantized_bytes  # ... minus a float32 copy of every 4-bit weight


# ---------------------------------------------------------------------------------------
# Merging for deployment
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_merge_and_dequantize_is_exact(small_gpt2, small_batch, backend):
    model = qlora_model(small_gpt2, backend)
    merged = merge_and_dequantize(copy.deepcopy(model))
    assert not quantized_layers(merged) and not lora_layers(merged)
    assert sorted(n for n, m in merged.named_modules() if type(m) is nn.Linear) == sorted(BLOCK_LINEAR + ["lm_head"])
    assert all(p.dtype == torch.float32 for p in merged.parameters())
    change = output_change(model, merged, small_batch[0])
    assert change["max_abs_logit"] < 1e-5 and change["top1_agreement"] == 1.0
    # and B A is in there: the merged model is not the bare 4-bit base
    assert output_change(dequantize_model(quantized(small_gpt2, backend)), merged, small_batch[0])["max_abs_logit"] > 1e-2


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("options", [{}, dict(blocksize=32, double_quant=False, compute_dtype=torch.bfloat16)])
def test_merge_and_requantize_stays_4bit_and_changes_the_outputs(small_gpt2, small_batch, backend, options):
    model = quantized(small_gpt2, backend, **options)
    torch.manual_seed(3)
    with_random_b(add_lora(model, "all-linear", r=8, alpha=16))
    before = {n: (settings(layer.base_layer), packed(layer.base_layer).clone()) for n, layer in lora_layers(model).items()}
    requantized = merge_and_requantize(copy.deepcopy(model))
    assert not lora_layers(requantized)
    layers = quantized_layers(requantized)
    assert sorted(layers) == sorted(BLOCK_LINEAR)
    for name, layer in layers.items():
        assert settings(layer) == before[name][0]  # same backend, blocksize, double quantization, dtype
    assert any(not torch.equal(packed(layer), before[name][1]) for name, layer in layers.items())
    change = output_change(model, requantized, small_batch[0])
    assert change["max_abs_logit"] > 0 and change["kl"] > 0
    if "compute_dtype" not in options:  # in float32, far more than merge_and_dequantize's rounding
        exact = output_change(model, merge_and_dequantize(copy.deepcopy(model)), small_batch[0])
        assert change["max_abs_logit"] > 100 * max(exact["max_abs_logit"], 1e-7)


@pytest.mark.parametrize("backend", BACKENDS)
def test_requantizing_an_unchanged_weight_gives_back_its_4bit_codes(small_gpt2, small_batch, backend):
    # Dequantized NF4 values lie on the grid (the block's largest is exactly +-absmax), so they
    # round to the same codes. Only the double-quantized absmaxes can move: their mean shifts.
    for double_quant in (True, False):
        model = add_lora(quantized(small_gpt2, backend, double_quant=double_quant), "all-linear", r=8, alpha=16)  # B = 0
        before = {n: packed(layer.base_layer).clone() for n, layer in lora_layers(model).items()}
        requantized = merge_and_requantize(copy.deepcopy(model))
        for name, layer in quantized_layers(requantized).items():
            assert torch.equal(packed(layer), before[name])
        change = output_change(model, requantized, small_batch[0])
        if double_quant:
            assert change["max_abs_logit"] < 1e-3 and change["top1_agreement"] == 1.0
        else:  # the float32 absmaxes come back exactly, and with them the outputs
            assert change == {"max_abs_logit": 0.0, "kl": 0.0, "top1_agreement": 1.0}


# ---------------------------------------------------------------------------------------
# output_change
# ---------------------------------------------------------------------------------------


def test_output_change_of_identical_models_is_nothing(small_gpt2, small_batch):
    change = output_change(small_gpt2, copy.deepcopy(small_gpt2), small_batch[0])
    assert change == {"max_abs_logit": 0.0, "kl": 0.0, "top1_agreement": 1.0}


def test_output_change_measures_known_differences():
    # Position 0: the same logits. Position 1: p = (1/2, 1/2) before, q = (1/4, 3/4) after.
    before = FixedLogits(torch.tensor([[[1.0, 0.0], [0.0, 0.0]]]))
    after = FixedLogits(torch.tensor([[[1.0, 0.0], [0.0, math.log(3)]]]))
    before.train()
    after.eval()
    change = output_change(before, after, torch.zeros(1, 2, dtype=torch.long))
    assert change["max_abs_logit"] == pytest.approx(math.log(3))
    kl_p_q = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)  # KL(before || after), not the reverse
    assert change["kl"] == pytest.approx(kl_p_q / 2, rel=1e-5)
    assert change["kl"] != pytest.approx((0.25 * math.log(0.5) + 0.75 * math.log(1.5)) / 2, rel=1e-3)
    assert change["top1_agreement"] == 0.5
    assert before.training and not after.training  # modes restored


# --- the random-weight stand-in for the Hub's gpt2 (scripts/save_random_gpt2.py) ---


def test_the_stand_in_has_gpt2_124m_shape_by_default():
    """GPT2Config()'s defaults, which the GPU run saves, are the Hub's GPT-2 124M."""
    transformers = pytest.importorskip("transformers")
    from lora_edu.gpt2 import PRESETS

    assert GPT2Config.from_hf_config(transformers.GPT2Config().to_dict()) == PRESETS["gpt2"]


def test_the_stand_in_loads_through_load_pretrained_and_says_its_weights_are_random(tmp_path):
    pytest.importorskip("transformers")
    from save_random_gpt2 import SMALL as STAND_IN, save  # scripts/, on the path by conftest.py

    from lora_edu.data import load_text
    from lora_edu.gpt2 import load_pretrained, load_tokenizer

    summary = save(tmp_path / "gpt2_random", small=True, vocab_size=300)
    model = load_pretrained(str(tmp_path / "gpt2_random"))
    assert model.random_weights is True and summary["lora_edu_random_weights"] is True
    assert (model.config.n_layer, model.config.n_embd) == (STAND_IN["n_layer"], STAND_IN["n_embd"])
    # its tokenizer, read offline through the same call as GPT-2's, fits the model
    tokenizer = load_tokenizer(str(tmp_path / "gpt2_random"))
    text = load_text("milton")[:2000]
    ids = tokenizer.encode(text)
    assert tokenizer.decode(ids) == text and max(ids) < model.config.vocab_size == 300
    assert len(ids) < 0.8 * len(text.encode())  # merges learnt: fewer tokens than bytes


def test_a_hub_style_folder_has_pretrained_weights(tmp_path):
    pytest.importorskip("transformers")
    small_hf_gpt2().save_pretrained(tmp_path)  # no lora_edu_random_weights in its config
    from lora_edu.gpt2 import load_pretrained

    assert load_pretrained(str(tmp_path)).random_weights is False
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "lora_edu_random_weights": "yes"}))
    assert load_pretrained(str(tmp_path)).random_weights is False  # only a JSON true says so
