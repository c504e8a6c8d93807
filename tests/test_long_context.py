"""Tests of lora_edu.long_context: position interpolation, S²-Attn (with and without the
authors' wrap-round), and the refusals that leave the model as it was."""

import copy

import pytest
import torch
import torch.nn.functional as F

from lora_edu.gpt2 import GPT2, GPT2Config
from lora_edu.lora import add_lora
from lora_edu.long_context import (S2Attention, future_influence, interpolate_positions, shifted_sparse_attention,
                                   unfreeze_embeddings_and_norms, use_s2_attention)
from unchanged import assert_unchanged, snapshot


def small_gpt2(block_size=32, seed=0):
    torch.manual_seed(seed)
    return GPT2(GPT2Config(n_layer=2, n_embd=32, n_head=4, block_size=block_size))


def qkv(T=32, H=4, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2, H, T, 8, generator=g, dtype=dtype) for _ in range(3)]


def masked_attention(q, k, v, group_of):
    """Reference: full attention under a mask that keeps j <= i inside i's group."""
    T = q.size(2)
    pos = torch.arange(T)
    group = group_of(pos)
    mask = (pos[None, :] <= pos[:, None]) & (group[None, :] == group[:, None])
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def test_one_group_without_shift_is_full_causal_attention():
    q, k, v = qkv()
    full = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    torch.testing.assert_close(shifted_sparse_attention(q, k, v, 32, shift=False), full)


@pytest.mark.parametrize("group_size", [4, 8, 16])
def test_each_half_of_the_heads_attends_inside_its_groups(group_size):
    q, k, v = qkv()
    out = shifted_sparse_attention(q, k, v, group_size)
    plain = masked_attention(q[:, :2], k[:, :2], v[:, :2], lambda p: p // group_size)
    shifted = masked_attention(q[:, 2:], k[:, 2:], v[:, 2:], lambda p: (p + group_size // 2) // group_size)
    torch.testing.assert_close(out[:, :2], plain)
    torch.testing.assert_close(out[:, 2:], shifted)


def test_the_rolled_shift_is_what_the_authors_code_computes():
    """Roll the shifted heads by -g/2, attend in groups, roll back (llama_attn_replace.py)."""
    q, k, v = qkv()
    g = 8
    out = shifted_sparse_attention(q, k, v, g, wrap=True)
    rolled = [t[:, 2:].roll(-g // 2, dims=2) for t in (q, k, v)]
    expected = masked_attention(*rolled, lambda p: p // g).roll(g // 2, dims=2)
    torch.testing.assert_close(out[:, 2:], expected)


def test_the_roll_leaks_the_future_and_the_split_does_not():
    model = small_gpt2()
    x = torch.randn(1, 32, 32, generator=torch.Generator().manual_seed(0))
    attention = model.transformer.h[0].attn
    assert future_influence(attention, x) == 0
    leaky = S2Attention(attention, 8, wrap=True).train()
    sealed = S2Attention(attention, 8, wrap=False).train()
    assert future_influence(leaky, x) > 1e-3
    assert future_influence(sealed, x) == 0


def test_s2_attention_trains_in_groups_and_evaluates_in_full():
    model = small_gpt2()
    idx = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(1))
    full = copy.deepcopy(model).eval()
    use_s2_attention(model, 8)
    assert all(isinstance(b.attn, S2Attention) for b in model.transformer.h)
    model.eval()
    torch.testing.assert_close(model(idx), full(idx))
    model.train()
    assert not torch.allclose(model(idx), full(idx))  # groups see less than everything


def test_lora_keeps_its_names_and_works_under_s2_attention():
    model = small_gpt2()
    use_s2_attention(model, 8)
    add_lora(model, targets=["attn.c_attn"], r=2)
    assert "transformer.h.0.attn.c_attn.lora_A.weight" in dict(model.named_parameters())
    model.train()
    _, loss = model(*[torch.randint(0, 256, (2, 32)) for _ in range(2)])
    loss.backward()
    assert model.transformer.h[0].attn.c_attn.lora_B.weight.grad.abs().max() > 0


def test_interpolation_by_one_changes_nothing_and_by_four_keeps_the_old_rows():
    model = small_gpt2()
    table = model.transformer.wpe.weight.detach().clone()
    interpolate_positions(model, 1)
    assert torch.equal(model.transformer.wpe.weight, table)
    interpolate_positions(model, 4)
    stretched = model.transformer.wpe.weight
    assert model.config.block_size == 128 and stretched.shape == (128, 32)
    assert torch.equal(stretched[::4], table)  # position 4p reads old position p
    torch.testing.assert_close(stretched[2], (table[0] + table[1]) / 2)  # halfway between
    assert torch.equal(stretched[-1], table[-1])  # held beyond the old end
    model(torch.zeros(1, 128, dtype=torch.long))  # the longer context runs


def test_interpolation_keeps_the_table_frozen_or_trainable_as_it_was():
    model = small_gpt2()
    model.transformer.wpe.weight.requires_grad_(False)
    interpolate_positions(model, 2)
    assert not model.transformer.wpe.weight.requires_grad


def test_a_context_longer_than_the_interpolated_table_is_refused():
    model = interpolate_positions(small_gpt2(), 2)
    with pytest.raises(ValueError, match="sequence length must be in 1..64"):
        model(torch.zeros(1, 65, dtype=torch.long))


@pytest.mark.parametrize("factor, message", [
    (0.5, "factor must be a number >= 1"),
    (float("nan"), "factor must be"),
    (True, "factor must be"),
    (1.01, "must be a whole number of positions"),
])
def test_bad_factors_are_refused_unchanged(factor, message):
    model = small_gpt2()
    before = snapshot(model)
    with pytest.raises(ValueError, match=message):
        interpolate_positions(model, factor)
    assert_unchanged(model, before)
    assert model.config.block_size == 32


def test_group_sizes_that_do_not_divide_the_context_are_refused():
    q, k, v = qkv(T=30)
    with pytest.raises(ValueError, match=r"group_size \(8\) must divide the sequence length \(30\)"):
        shifted_sparse_attention(q, k, v, 8)
    with pytest.raises(ValueError, match="group_size must be a positive int"):
        shifted_sparse_attention(q, k, v, 0)


def test_use_s2_attention_refuses_bad_options_unchanged():
    model = small_gpt2()
    before = snapshot(model)
    for kwargs, message in (({"group_size": 0}, "group_size must be a positive int"),
                            ({"group_size": 1}, "an even group_size"),
                            ({"group_size": 64}, "below block_size"),
                            ({"group_size": 8, "wrap": "no"}, "wrap must be True")):
        with pytest.raises(ValueError, match=message):
            use_s2_attention(model, **kwargs)
        assert_unchanged(model, before)
    with pytest.raises(TypeError, match="model must be a lora_edu GPT2"):
        use_s2_attention(torch.nn.Linear(2, 2), 8)
    with pytest.raises(TypeError, match="attn must be a lora_edu CausalSelfAttention"):
        S2Attention(torch.nn.Linear(2, 2), 8)


def test_unfreezing_embeddings_and_norms_touches_nothing_else():
    model = small_gpt2()
    for p in model.parameters():
        p.requires_grad_(False)
    unfreeze_embeddings_and_norms(model)
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "transformer.wte.weight" in trained and "transformer.wpe.weight" in trained
    assert "transformer.h.0.ln_1.weight" in trained and "transformer.ln_f.bias" in trained
    assert not any("attn" in n or "mlp" in n for n in trained)
    assert model.lm_head.weight is model.transformer.wte.weight  # tied: the output layer trains with wte


def test_interpolation_runs_where_the_table_lives():
    with torch.device("meta"):
        model = small_gpt2()
    interpolate_positions(model, 2)
    assert model.transformer.wpe.weight.device.type == "meta" and model.config.block_size == 64


def test_interpolation_draws_nothing_from_the_global_generator():
    model = small_gpt2()
    torch.manual_seed(5)
    expected = torch.rand(1)
    torch.manual_seed(5)
    interpolate_positions(model, 2)
    assert torch.equal(torch.rand(1), expected)


@pytest.mark.parametrize("heads, group_size", [(3, 8), (4, 7)])
def test_odd_heads_or_groups_cannot_be_halved_and_are_refused(heads, group_size):
    q, k, v = qkv(T=56, H=heads)
    with pytest.raises(ValueError, match="even number of heads and an even group_size"):
        shifted_sparse_attention(q, k, v, group_size)


def test_shifted_sparse_attention_checks_its_tensors():
    q, k, v = qkv()
    with pytest.raises(ValueError, match="q, k and v must share one shape"):
        shifted_sparse_attention(q, k[:, :2], v, 8)
    with pytest.raises(ValueError, match="q, k and v must share one shape"):
        shifted_sparse_attention(q[0], k[0], v[0], 8)
    with pytest.raises(ValueError, match=r"dropout_p must be in \[0, 1\)"):
        shifted_sparse_attention(q, k, v, 8, dropout_p=1.0)


def test_future_influence_wants_a_sequence():
    with pytest.raises(ValueError, match=r"x must be \(batch, time, channels\)"):
        future_influence(torch.nn.Identity(), torch.zeros(3, 4))
