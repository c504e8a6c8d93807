"""LoRA's relatives: each trains only its own parameters, counts them right, and merges exactly where it claims to."""

import copy
import math

import pytest
import torch

from lora_edu.adapters import add_serial_adapters
from lora_edu.gpt2 import load_tiny
from lora_edu.lora import count_parameters
from lora_edu.peft_family import (
    PrefixAttention,
    PromptTuned,
    ScaleInput,
    ScaleOutput,
    add_bitfit,
    add_ia3,
    add_prefix_tuning,
    merge_peft,
)

IDX = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def base():
    return load_tiny().eval()


def one_step_changes(model, lr=1e-2):
    """Names of the parameters one SGD step changes."""
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    model.train()
    _, loss = model(IDX[:, :-1], IDX[:, 1:])
    loss.backward()
    with torch.no_grad():
        for p in model.parameters():
            if p.grad is not None:
                p -= lr * p.grad
    model.eval()
    return {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}


def test_bitfit_trains_the_biases_only(base):
    model = add_bitfit(copy.deepcopy(base))
    biases = [n for n, _ in model.named_parameters() if n.endswith(".bias")]
    # per block: c_attn 384, attn.c_proj 128, c_fc 512, mlp.c_proj 128, ln_1 128, ln_2 128; and ln_f 128
    assert count_parameters(model)[0] == 4 * (384 + 128 + 512 + 128 + 128 + 128) + 128
    torch.testing.assert_close(model(IDX), base(IDX), rtol=0, atol=0)
    changed = one_step_changes(model)
    assert changed and changed <= set(biases)
    out = model(IDX)
    assert merge_peft(model) is model  # the trained biases are the model's: nothing to merge
    torch.testing.assert_close(model(IDX), out, rtol=0, atol=0)


def test_ia3_starts_as_the_base_and_rescales_keys_values_and_mlp_activations(base):
    model = add_ia3(copy.deepcopy(base))
    assert count_parameters(model)[0] == 4 * (2 * 128 + 512)
    torch.testing.assert_close(model(IDX), base(IDX), rtol=0, atol=0)
    block = model.transformer.h[0]
    x = torch.randn(2, 5, 128)
    with torch.no_grad():
        block.attn.c_attn.scale.mul_(2)
    q, kv = block.attn.c_attn(x).split([128, 256], dim=-1)
    q0, kv0 = block.attn.c_attn.layer(x).split([128, 256], dim=-1)
    torch.testing.assert_close(q, q0)  # the queries are not rescaled
    torch.testing.assert_close(kv, 2 * kv0)
    changed = one_step_changes(model)
    assert changed and all(n.endswith(".scale") for n in changed)


def test_ia3_merges_exactly(base):
    model = add_ia3(copy.deepcopy(base))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=g))
        want = model(IDX)
    merged = merge_peft(model)
    assert not any(isinstance(m, (ScaleInput, ScaleOutput)) for m in merged.modules())
    assert sum(p.numel() for p in merged.parameters()) == sum(p.numel() for p in base.parameters())
    with torch.no_grad():
        torch.testing.assert_close(merged(IDX), want, rtol=1e-5, atol=1e-5)


def test_prompt_tuning_trains_its_virtual_tokens_only_and_uses_context(base):
    model = PromptTuned(copy.deepcopy(base), n_virtual=8)
    assert count_parameters(model)[0] == 8 * 128
    logits = model(IDX)
    assert logits.shape == base(IDX).shape
    assert not torch.allclose(logits, base(IDX))  # unlike LoRA, it changes the model from the start
    assert one_step_changes(model) == {"prompt"}
    with pytest.raises(ValueError, match="at most 120 tokens"):
        model(torch.zeros(1, 121, dtype=torch.long))
    with pytest.raises(TypeError, match="prompt tuning cannot be merged"):
        merge_peft(model)


def test_prompt_tuning_is_the_base_model_reading_its_virtual_tokens_first(base):
    model = PromptTuned(copy.deepcopy(base), n_virtual=3)
    tokens = torch.tensor([[5, 17, 99]])  # make the virtual tokens real ones: the base model must agree
    with torch.no_grad():
        model.prompt.copy_(base.transformer.wte.weight[tokens[0]])
        want = base(torch.cat([tokens.expand(2, -1), IDX], dim=1))[:, 3:]
        torch.testing.assert_close(model(IDX), want, rtol=1e-5, atol=1e-5)


def reference_prefix_attention(layer: PrefixAttention, x: torch.Tensor) -> torch.Tensor:
    """Softmax attention written out: every token sees the whole prefix and itself and the tokens before it."""
    attn, n = layer.attn, layer.n_prefix
    B, T, C = x.shape
    h = attn.n_head
    q, k, v = attn.c_attn(x).split(C, dim=2)
    k = torch.cat([layer.prefix_keys.expand(B, -1, -1), k], dim=1)
    v = torch.cat([layer.prefix_values.expand(B, -1, -1), v], dim=1)
    q, k, v = (t.view(B, -1, h, C // h).transpose(1, 2) for t in (q, k, v))
    scores = q @ k.transpose(-1, -2) / math.sqrt(C // h)  # (B, h, T, n + T)
    allowed = torch.cat([torch.ones(T, n, dtype=torch.bool), torch.ones(T, T, dtype=torch.bool).tril()], dim=1)
    y = scores.masked_fill(~allowed, float("-inf")).softmax(-1) @ v
    return attn.c_proj(y.transpose(1, 2).reshape(B, T, C))


def test_prefix_tuning_attends_to_the_prefix_and_causally_to_the_rest(base):
    model = add_prefix_tuning(copy.deepcopy(base), n_prefix=4)
    assert count_parameters(model)[0] == 4 * 2 * 4 * 128
    layer = model.transformer.h[1].attn
    x = torch.randn(2, 6, 128)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), reference_prefix_attention(layer, x), rtol=1e-5, atol=1e-5)
    changed = one_step_changes(model)
    assert changed and all("prefix_" in n for n in changed)
    with pytest.raises(TypeError, match="prefix tuning cannot be merged"):
        merge_peft(model)


def test_the_prefix_starts_as_real_tokens_keys_and_values(base):
    """Initialised from the model's own keys and values for real tokens: reading them as a prefix
    is reading those tokens first, in the first layer."""
    model = add_prefix_tuning(copy.deepcopy(base), n_prefix=3, seed=5)
    tokens = torch.randint(0, 256, (1, 3), generator=torch.Generator().manual_seed(5))
    layer = model.transformer.h[0].attn
    x = base.transformer.wte(tokens) + base.transformer.wpe(torch.arange(3))
    _, k, v = layer.attn.c_attn(base.transformer.h[0].ln_1(x)).split(128, dim=-1)
    torch.testing.assert_close(layer.prefix_keys, k[0].detach())
    torch.testing.assert_close(layer.prefix_values, v[0].detach())


def test_adapters_are_refused_by_merge_peft(base):
    with pytest.raises(TypeError, match="serial adapters cannot be merged"):
        merge_peft(add_serial_adapters(copy.deepcopy(base), bottleneck=4))


@pytest.mark.parametrize("build, message", [
    (lambda m: add_ia3(add_ia3(m)), "already has"),
    (lambda m: add_prefix_tuning(add_prefix_tuning(m, 2), 2), "already has"),
    (lambda m: add_prefix_tuning(m, 0), "n_prefix must be a positive int"),
    (lambda m: add_prefix_tuning(m, 128), "below block_size"),
    (lambda m: PromptTuned(m, 128), r"n_virtual must be an int in \[1, block_size\)"),
    (lambda m: add_bitfit(torch.nn.Linear(2, 2)), "must be a lora_edu GPT2"),
])
def test_bad_requests_are_refused(base, build, message):
    with pytest.raises((ValueError, TypeError), match=message):
        build(copy.deepcopy(base))
