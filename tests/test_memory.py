"""Tests of lora_edu.memory: the bytes fine-tuning keeps, computed (memory_breakdown, on GPT-2's
and Llama's shapes) and measured (saved_activation_bytes)."""

import copy
import gc
import weakref

import pytest
import torch
import torch.nn as nn

from lora_edu.gpt2 import GPT2, GPT2Config
from lora_edu.lora import add_lora
from lora_edu.memory import LLAMA_SHAPES, activation_bytes, llama_skeleton, memory_breakdown, saved_activation_bytes
from lora_edu.qlora import quantize_model
from lora_edu.nf4 import bits_per_parameter

# ---------------------------------------------------------------------------------------
# memory_breakdown
# ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gpt2_124m():
    with torch.device("meta"):  # shapes only: no memory
        return GPT2(GPT2Config.from_preset("gpt2"))


def test_full_fine_tuning_costs_16_bytes_per_parameter(gpt2_124m):
    n = sum(p.numel() for p in gpt2_124m.parameters())
    assert n == 124_439_808  # GPT-2 small, the head tied to the embedding
    full = memory_breakdown(gpt2_124m, "full")
    assert full == {"weights": 4 * n, "lora": 0, "gradients": 4 * n, "optimizer": 8 * n}
    assert sum(full.values()) == 16 * n


def test_lora_costs_a_16_bit_base_plus_float32_adapters(gpt2_124m):
    c, n_layer = 768, 12
    n = sum(p.numel() for p in gpt2_124m.parameters())
    # per block: c_attn (c -> 3c), attn.c_proj (c -> c), c_fc (c -> 4c), mlp.c_proj (4c -> c)
    in_plus_out = n_layer * ((c + 3 * c) + (c + c) + (c + 4 * c) + (4 * c + c))
    assert in_plus_out == 147_456
    lora = memory_breakdown(gpt2_124m, "lora", r=64)
    assert lora["weights"] == 2 * n
    assert lora["lora"] == 4 * 64 * in_plus_out == 4 * 9_437_184
    assert lora["gradients"] == lora["lora"] and lora["optimizer"] == 2 * lora["lora"]
    assert memory_breakdown(gpt2_124m, "lora", r=8)["lora"] == 4 * 8 * in_plus_out
    assert memory_breakdown(gpt2_124m, "lora")["lora"] == lora["lora"]  # r = 64 by default (QLoRA's)


def test_small_model_adapters_match_add_lora(small_gpt2):
    model = copy.deepcopy(small_gpt2)
    breakdown = memory_breakdown(model, "lora", r=4)
    n_lora = sum(p.numel() for n, p in add_lora(model, "all-linear", r=4).named_parameters() if "lora_" in n)
    assert breakdown["lora"] == 4 * n_lora


def test_qlora_stores_the_linear_weights_in_4_127_bits(gpt2_124m):
    c, n_layer = 768, 12
    n = sum(p.numel() for p in gpt2_124m.parameters())
    n_linear = n_layer * (c * 3 * c + c * c + c * 4 * c + 4 * c * c)
    assert n_linear == 84_934_656
    qlora, lora = memory_breakdown(gpt2_124m, "qlora"), memory_breakdown(gpt2_124m, "lora")
    bits = (qlora["weights"] - 4 * (n - n_linear)) * 8 / n_linear  # the rest in float32
    assert bits == pytest.approx(bits_per_parameter(64, True), abs=1e-6)
    assert bits_per_parameter(64, True) == pytest.approx(4.127, abs=1e-3)
    assert qlora["weights"] < lora["weights"]
    assert {k: qlora[k] for k in ("lora", "gradients", "optimizer")} == {k: lora[k] for k in ("lora", "gradients", "optimizer")}


def test_memory_breakdown_refuses_what_it_does_not_know(small_gpt2):
    with pytest.raises(ValueError, match=r"unknown method 'dora'; expected one of \['full', 'lora', 'qlora'\]"):
        memory_breakdown(small_gpt2, "dora")
    with pytest.raises(ValueError, match="no nn.Linear layers besides the output head"):
        memory_breakdown(nn.Sequential(nn.LayerNorm(4)), "full")


# ---------------------------------------------------------------------------------------
# Llama-style shapes for memory_breakdown
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("size, billions", [("7B", 6.7), ("13B", 13.0), ("33B", 32.5), ("65B", 65.2)])
def test_llama_skeleton_has_the_published_parameter_counts(size, billions):
    model = llama_skeleton(size)
    n = sum(p.numel() for p in model.parameters())
    assert abs(n / 1e9 - billions) / billions < 0.01
    assert all(p.is_meta for p in model.parameters())  # shapes only


def test_llama_skeleton_uses_llamas_names_and_an_untied_head():
    model = llama_skeleton("7B")
    linear = {name.rpartition(".")[2] for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    assert linear == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"}
    assert model.lm_head.weight is not model.model.embed_tokens.weight
    assert model.get_submodule("model.layers.31.mlp.down_proj").weight.shape == (4096, 11008)
    with pytest.raises(ValueError, match="size must be one of"):
        llama_skeleton("70B")
    for bad in (0, True, 32_000.0):
        with pytest.raises(ValueError, match="vocab_size must be a positive int"):
            llama_skeleton("7B", vocab_size=bad)


def test_memory_breakdown_of_llama_65b_adapts_every_block_linear_layer():
    model = llama_skeleton("65B")
    d, hidden, n_layer = LLAMA_SHAPES["65B"]
    qlora = memory_breakdown(model, "qlora")
    n_lora = n_layer * 64 * (4 * 2 * d + 3 * (d + hidden))  # q, k, v, o; gate, up, down
    assert qlora["lora"] == 4 * n_lora and qlora["optimizer"] == 8 * n_lora
    n_total = sum(p.numel() for p in model.parameters())
    assert memory_breakdown(model, "full")["weights"] == 4 * n_total
    assert 30 * 2**30 < qlora["weights"] < 36 * 2**30  # 64.8B weights at 4.127 bits + 0.5B in float32


# ---------------------------------------------------------------------------------------
# saved_activation_bytes
# ---------------------------------------------------------------------------------------


def test_saved_activation_bytes_keeps_nothing_alive(small_gpt2, small_batch):
    # Its hooks once returned each saved tensor, tying outputs to their own graph through C++:
    # every model measured then stayed in memory, and a GPU benchmark's peaks grew run by run.
    model = copy.deepcopy(small_gpt2)
    parameters = [weakref.ref(p) for p in model.parameters()]
    assert saved_activation_bytes(model, *small_batch) > 0
    del model
    gc.collect()
    assert not [p for p in parameters if p() is not None]


class _DetachedSum(nn.Module):
    """sin(x) * sum(exp(x)), the sum a constant: exp's output is saved by a graph dropped at once."""

    def forward(self, x):
        return torch.sin(x) * torch.exp(x).sum().detach()


def test_saved_activation_bytes_counts_what_the_graph_still_holds():
    x = torch.randn(64, 32, requires_grad=True)
    # sin keeps x, the product keeps n (one float); exp(x)'s saved output was freed with its graph
    assert saved_activation_bytes(_DetachedSum(), x) == x.numel() * 4 + 4


def test_saved_activation_bytes_leaves_the_model_as_it_was(small_gpt2, small_batch):
    model = copy.deepcopy(small_gpt2).eval()
    assert saved_activation_bytes(model, small_batch[0]) > 0  # without targets too
    assert not model.training
    assert all(p.grad is None for p in model.parameters())


# ---------------------------------------------------------------------------------------
# Gradient checkpointing in runs of k blocks (Chen et al., 2016)
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("k", [1, 2, 3, 8])
def test_checkpointing_every_k_blocks_keeps_one_input_per_run_and_the_same_gradients(k):
    torch.manual_seed(0)
    model = GPT2(GPT2Config(n_layer=8, block_size=64))
    add_lora(model, r=4)
    model.train()
    g = torch.Generator().manual_seed(1)
    x, y = (torch.randint(0, 256, (2, 64), generator=g) for _ in range(2))

    def grads():
        model.zero_grad()
        model(x, y)[1].backward()
        return [p.grad.clone() for p in model.parameters() if p.requires_grad]

    plain = grads()
    model.gradient_checkpointing_enable(blocks_per_checkpoint=1)
    one_per_block = saved_activation_bytes(model, x, y)
    model.gradient_checkpointing_enable(blocks_per_checkpoint=k)
    runs = -(-8 // k)
    block_input = 2 * 64 * model.config.n_embd * 4  # one (B, T, C) float32 tensor
    assert saved_activation_bytes(model, x, y) == one_per_block - (8 - runs) * block_input
    for a, b in zip(grads(), plain):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_blocks_per_checkpoint_must_be_a_positive_int():
    model = GPT2(GPT2Config(n_layer=2))
    with pytest.raises(ValueError, match="blocks_per_checkpoint must be a positive int"):
        model.gradient_checkpointing_enable(blocks_per_checkpoint=0)
    assert not model.gradient_checkpointing


@pytest.mark.parametrize("method", ["full", "lora", "qlora"])
@pytest.mark.parametrize("blocks_per_checkpoint", [None, 2])
@pytest.mark.parametrize("config, batch, length", [
    (GPT2Config(n_layer=3), 2, 64),
    (GPT2Config(n_layer=2, n_embd=64, n_head=8, block_size=96, vocab_size=300), 3, 96),
])
def test_the_activation_formula_is_what_autograd_keeps(method, blocks_per_checkpoint, config, batch, length):
    torch.manual_seed(0)
    model = GPT2(config)
    if method == "qlora":
        quantize_model(model)
    if method != "full":
        add_lora(model, r=4)
    if blocks_per_checkpoint:
        model.gradient_checkpointing_enable(blocks_per_checkpoint=blocks_per_checkpoint)
    g = torch.Generator().manual_seed(1)
    x, y = (torch.randint(0, config.vocab_size, (batch, length), generator=g) for _ in range(2))
    predicted = activation_bytes(config, batch, length, method, r=4, blocks_per_checkpoint=blocks_per_checkpoint)
    assert predicted["total"] == predicted["blocks"] + predicted["head"]
    assert saved_activation_bytes(model, x, y) == predicted["total"]


def test_the_activation_formula_refuses_what_it_does_not_know():
    config = GPT2Config()
    with pytest.raises(ValueError, match="unknown method 'dora'"):
        activation_bytes(config, 2, 64, "dora")
    with pytest.raises(ValueError, match="length must be a positive int"):
        activation_bytes(config, 2, 0)
    with pytest.raises(ValueError, match="blocks_per_checkpoint must be None or a positive int"):
        activation_bytes(config, 2, 64, blocks_per_checkpoint=0)
