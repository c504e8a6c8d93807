"""The GPU checks: lora_edu's NF4 against bitsandbytes' CUDA kernels, and every layer on CUDA.

Marked ``cuda``; ``scripts/gpu_check.sh`` runs them (``pytest -m cuda tests/test_cuda*.py``) on a
GPU machine, which has no Jupyter: GPU checks live in files named like this one, importing only
what that machine has (torch, bitsandbytes from the carried wheel, transformers, peft).
Without a GPU they are skipped, except in the script's CPU rehearsal
(``LORA_EDU_REHEARSE_CUDA=1``), which runs every one of them on the CPU so that they
cannot rot between the rare runs on a GPU.
"""

import copy
import os

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from lora_edu.gpt2 import GPT2, GPT2Config
from lora_edu.lora import add_lora, lora_layers
from lora_edu.lora_layer import LoRALinear
from lora_edu.nf4 import NF4Linear, dequantize_nf4, dequantize_nf4_fast, nf4_code, quantize_nf4
from lora_edu.qlora import compute_dtype_for, make_optimizer, prepare_for_kbit_training, quantize_model

pytestmark = pytest.mark.cuda
bnb = pytest.importorskip("bitsandbytes")
bnb_functional = pytest.importorskip("bitsandbytes.functional")

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SMALL = GPT2Config(vocab_size=256, block_size=64, n_layer=2, n_head=2, n_embd=64)


@pytest.fixture(scope="module")
def device():
    if torch.cuda.is_available():
        return "cuda"
    if os.environ.get("LORA_EDU_REHEARSE_CUDA") == "1":
        return "cpu"
    pytest.skip("needs a CUDA GPU: scripts/gpu_check.sh runs these there (LORA_EDU_REHEARSE_CUDA=1 runs them on the CPU)")


def weight(shape, dtype=torch.float32, seed=0, device="cpu"):
    w = torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 0.02
    return w.to(device=device, dtype=dtype)


def bnb_quantize(w, blocksize, double_quant):
    return bnb_functional.quantize_4bit(w, blocksize=blocksize, quant_type="nf4", compress_statistics=double_quant)


def assert_equal(ours, theirs, what):
    differ = (ours != theirs).sum().item() if ours.shape == theirs.shape else "all (shapes differ)"
    assert torch.equal(ours, theirs), f"{what}: {differ} of {theirs.numel()} differ"


def assert_same_state(ours, theirs, double_quant):
    (packed, state), (bnb_packed, bnb_state) = ours, theirs
    assert_equal(packed, bnb_packed, "packed 4-bit codes")
    if double_quant:
        assert_equal(state.absmax_codes, bnb_state.absmax, "8-bit absmax codes")
        assert_equal(state.absmax_scales, bnb_state.state2.absmax, "absmax scales")
        assert_equal(state.absmax_offset, bnb_state.offset, "absmax offset")
    else:
        assert_equal(state.absmax, bnb_state.absmax, "absmax")


# ---------------------------------------------------------------------------------------
# NF4 on the device against bitsandbytes' kernels there
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("blocksize", [64, 128, 4096])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_nf4_equals_bitsandbytes_on_the_device(device, dtype, blocksize, double_quant):
    w = weight((256, 4096), dtype, device=device)  # rows a multiple of every blocksize
    ours = quantize_nf4(w, blocksize, double_quant)
    theirs = bnb_quantize(w, blocksize, double_quant)
    assert ours[0].device.type == device
    assert_same_state(ours, theirs, double_quant)
    expected = bnb_functional.dequantize_4bit(*theirs).reshape(w.shape)
    assert torch.equal(dequantize_nf4(*ours), expected)
    assert torch.equal(dequantize_nf4_fast(*ours), expected)


@pytest.mark.parametrize("double_quant", [False, True])
def test_nf4_equals_bitsandbytes_on_zero_blocks_ties_and_a_partial_block(device, double_quant):
    # The cases where a kernel's choices show: an all-zero block, values exactly on the
    # midpoint between two levels (which must take the lower level), the largest value of
    # a block (exactly +-1 after scaling), and a last block that is only partly full.
    code = nf4_code()
    midpoints = (code[:-1] + code[1:]) / 2
    w = torch.cat([
        torch.zeros(64),
        torch.cat([midpoints, -midpoints, torch.ones(1), torch.zeros(64 - 31)]),
        weight(64 + 37, seed=1),
    ]).to(device)
    ours = quantize_nf4(w, 64, double_quant)
    theirs = bnb_quantize(w, 64, double_quant)
    assert_same_state(ours, theirs, double_quant)
    assert torch.equal(dequantize_nf4_fast(*ours), bnb_functional.dequantize_4bit(*theirs).reshape(w.shape))


def test_8bit_blockwise_equals_bitsandbytes_on_the_device(device):
    # Double quantization's 8-bit step on its own, with the edges of the dynamic map:
    # exact zeros, values on and next to its levels, and the tiny ones near 0 where the
    # CPU's grid and the CUDA kernel's binary search part ways.
    from lora_edu.nf4 import dynamic_map, quantize_8bit_blockwise

    levels = dynamic_map()
    x = torch.cat([
        torch.zeros(256), levels, (levels[:-1] + levels[1:]) / 2, levels * 1e-3, torch.full((256,), 0.5),
        weight(4096, seed=2) * 50,
    ]).to(device)
    codes, absmax = quantize_8bit_blockwise(x, 256)
    bnb_codes, bnb_state = bnb_functional.quantize_blockwise(x, blocksize=256)
    assert_equal(codes, bnb_codes, "8-bit codes")
    assert_equal(absmax, bnb_state.absmax, "absmax")


def test_the_cuda_rounding_is_the_same_computed_on_the_cpu(device):
    # quantize_nf4(kernel="cuda") is plain PyTorch: on the CPU it gives the CUDA kernel's bytes.
    kernel = "cuda" if device == "cuda" else "cpu"
    w = weight((512, 768), seed=3)
    on_device = quantize_nf4(w.to(device), 64, True)
    on_cpu = quantize_nf4(w, 64, True, kernel=kernel)
    assert_equal(on_cpu[0], on_device[0].cpu(), "packed 4-bit codes")
    assert_equal(on_cpu[1].absmax_codes, on_device[1].absmax_codes.cpu(), "8-bit absmax codes")


def test_fast_dequantize_equals_the_teaching_version_on_the_device(device):
    for shape in [(7,), (17, 129), (600, 1000)]:
        for dtype in DTYPES:
            packed, state = quantize_nf4(weight(shape, dtype, device=device), 64, True)
            for out_dtype in (None, torch.float32, torch.bfloat16):
                assert torch.equal(dequantize_nf4_fast(packed, state, out_dtype), dequantize_nf4(packed, state, out_dtype))


# ---------------------------------------------------------------------------------------
# The layers, forward and backward, on the device
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("compute_dtype", [torch.float32, torch.bfloat16], ids=str)
def test_nf4_linear_forward_and_backward_on_the_device(device, compute_dtype):
    torch.manual_seed(0)
    linear = nn.Linear(256, 96).to(device)
    layer = NF4Linear.from_linear(linear, compute_dtype=compute_dtype)
    assert layer.weight_packed.device.type == device
    x = torch.randn(4, 10, 256, device=device, requires_grad=True)
    out = layer(x)
    assert out.dtype == compute_dtype and out.device.type == device
    w = layer.dequantized_weight()
    expected = F.linear(x.detach().to(compute_dtype), w, linear.bias.detach().to(compute_dtype))
    # In bfloat16 the two round differently (the bias added apart or fused into the product).
    tolerance = {} if compute_dtype == torch.float32 else {"atol": 1e-3, "rtol": 0.02}
    torch.testing.assert_close(out, expected, **tolerance)
    upstream = torch.randn_like(out)  # one output gradient for both, so only the layers can differ
    out.backward(upstream)
    x_ref = x.detach().clone().requires_grad_(True)
    F.linear(x_ref.to(compute_dtype), w, linear.bias.detach().to(compute_dtype)).backward(upstream)
    torch.testing.assert_close(x.grad, x_ref.grad, **tolerance)


@pytest.mark.parametrize("backend", ["lora_edu", "bitsandbytes"])
def test_lora_over_a_4bit_base_trains_only_the_adapter_on_the_device(device, backend):
    torch.manual_seed(0)
    linear = nn.Linear(128, 64).to(device)
    model = quantize_model(nn.Sequential(linear), backend, compute_dtype=compute_dtype_for(device))
    layer = LoRALinear(model[0], r=8, alpha=16)
    with torch.no_grad():
        layer.lora_B.weight.normal_(std=0.02)
    x = torch.randn(8, 128, device=device)
    layer(x).float().square().mean().backward()
    assert layer.lora_A.weight.grad is not None and layer.lora_B.weight.grad.abs().sum() > 0
    assert not [n for n, p in layer.named_parameters() if p.requires_grad and "lora_" not in n]


def test_both_backends_agree_on_a_gpt2_forward_and_backward_on_the_device(device):
    torch.manual_seed(0)
    base = GPT2(SMALL).to(device).eval()
    dtype = compute_dtype_for(device)
    idx = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(1)).to(device)
    models = {}
    for backend in ("lora_edu", "bitsandbytes"):
        model = prepare_for_kbit_training(quantize_model(copy.deepcopy(base), backend, compute_dtype=dtype))
        torch.manual_seed(3)
        add_lora(model, "all-linear", r=8, alpha=16, dropout=0.0)
        models[backend] = model.train()
    ours, theirs = models["lora_edu"], models["bitsandbytes"]
    packed = [m.base_layer.weight_packed.flatten() for m in lora_layers(ours).values()]
    assert all(torch.equal(a, b.base_layer.weight.data.flatten()) for a, b in zip(packed, lora_layers(theirs).values()))
    with torch.autocast(device, dtype=dtype, enabled=dtype != torch.float32):
        (logits_ours, loss_ours), (logits_theirs, loss_theirs) = ours(idx, idx), theirs(idx, idx)
    loss_ours.backward(), loss_theirs.backward()
    tolerance = 1e-4 if dtype == torch.float32 else 3e-2
    assert (logits_ours.float() - logits_theirs.float()).abs().max().item() < tolerance
    theirs_by_name = dict(theirs.named_parameters())
    grads = [(p.grad, theirs_by_name[n].grad) for n, p in ours.named_parameters() if p.requires_grad]
    assert len(grads) == 2 * len(lora_layers(ours)) and all(g is not None and h is not None for g, h in grads)
    assert all(torch.allclose(g.float(), h.float(), atol=tolerance, rtol=0.05) for g, h in grads)


def test_one_qlora_training_step_with_the_default_optimizer_on_the_device(device):
    # On CUDA, make_optimizer pages (bitsandbytes' PagedAdamW32bit); on the CPU it is AdamW.
    torch.manual_seed(0)
    model = prepare_for_kbit_training(quantize_model(GPT2(SMALL).to(device), compute_dtype=compute_dtype_for(device)))
    add_lora(model, "all-linear", r=8, alpha=16, dropout=0.0)
    optimizer = make_optimizer(model, lr=1e-2)
    assert ("Paged" in type(optimizer).__name__) == (device == "cuda")
    idx = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(1)).to(device)
    before = [m.base_layer.weight_packed.clone() for m in lora_layers(model).values()]
    losses = []
    for _ in range(5):
        with torch.autocast(device, dtype=compute_dtype_for(device), enabled=device == "cuda"):
            _, loss = model(idx, idx)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]  # the same batch five times: the loss must fall
    assert all(torch.equal(b, m.base_layer.weight_packed) for b, m in zip(before, lora_layers(model).values()))
