"""A longer context, cheaply: position interpolation and LongLoRA's shifted sparse attention.

GPT-2 learns one position embedding per position up to its ``block_size``, so it cannot
read a longer text at all. **Position interpolation** (Chen, Wong, Chen and Tian, 2023)
stretches what the model knows over a longer range instead of extrapolating past it:
position ``p`` of a context ``s`` times longer is given the embedding of old position
``p / s``. The paper interpolates rotary positions; for a learned table the same idea is
linear interpolation between rows (:func:`interpolate_positions`).

Fine-tuning at the new length then costs attention over n² pairs. **S²-Attn** (shifted
sparse attention; Chen et al., ICLR 2024, "LongLoRA") trains with attention inside groups
of ``g`` tokens, n·g pairs, and shifts the groups of half the heads by ``g / 2`` so that
information crosses group borders; at inference the model attends to everything
(:class:`S2Attention`). LongLoRA also trains the embeddings and the norms besides LoRA
(:func:`unfreeze_embeddings_and_norms`), which its paper names "LoRA+" (not Chapter 3's
LoRA+).

The paper's PyTorch-style pseudocode shifts by rolling the sequence (``roll(-G/2)``), as
the authors' non-flash code path still does (``forward_noflashattn`` in
``llama_attn_replace.py``): the first half-group wraps round behind the last group and
attends to tokens from the end of the sequence, its future. Asked about it, the authors
first called the wrap intended (issue #15 of their repository), later agreed it can leak
and rewrote their flash-attention path to split at shifted borders without rolling (issue
#90). Here ``wrap=True`` reproduces the roll and ``wrap=False`` (the default) gives the
shifted heads a short first and last group; :func:`future_influence` measures the leak.
"""

from __future__ import annotations

import math
from dataclasses import replace

import torch
import torch.nn as nn
import torch.nn.functional as F

from lora_edu.gpt2 import GPT2, CausalSelfAttention
from lora_edu.plumbing import check_int, replace_module

__all__ = ["S2Attention", "future_influence", "interpolate_positions", "shifted_sparse_attention",
           "unfreeze_embeddings_and_norms", "use_s2_attention"]


@torch.no_grad()
def interpolate_positions(model: GPT2, factor: float) -> GPT2:
    """Stretch ``model``'s learned position embeddings over a context ``factor`` times longer (in place).

    Row ``p`` of the new table is the old table read at ``p / factor``, linearly between
    its two neighbours (the last row is held beyond the old end). ``factor`` must be at
    least 1 and make a whole number of positions; 1 keeps the table's values. The table is
    a new parameter (frozen or trainable as the old one was): build the optimizer after.
    """
    if not isinstance(model, GPT2):
        raise TypeError(f"model must be a lora_edu GPT2, got {type(model).__name__}")
    old = model.config.block_size
    if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not math.isfinite(factor) or factor < 1:
        raise ValueError(f"factor must be a number >= 1 (positions are stretched, not squeezed), got {factor!r}")
    new = round(old * factor)
    if abs(new - old * factor) > 1e-9:
        raise ValueError(f"factor ({factor}) times block_size ({old}) must be a whole number of positions")
    table = model.transformer.wpe.weight
    where = torch.arange(new, dtype=torch.float64, device=table.device) / factor  # each new position, in old ones
    below = where.floor().long().clamp(max=old - 1)
    above = (below + 1).clamp(max=old - 1)
    weight = (where - below).clamp(max=1).to(table.dtype).unsqueeze(1)
    values = (1 - weight) * table[below] + weight * table[above]
    model.transformer.wpe = nn.Embedding.from_pretrained(values, freeze=not table.requires_grad)
    model.config = replace(model.config, block_size=new)
    return model


def shifted_sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group_size: int,
                             shift: bool = True, wrap: bool = False, dropout_p: float = 0.0) -> torch.Tensor:
    """Causal attention inside groups of ``group_size`` tokens; half the heads' groups shifted by half a group.

    ``q``, ``k``, ``v`` are (B, H, T, head size) with T a multiple of ``group_size``. With
    ``shift`` the second half of the heads is grouped from position ``group_size // 2``
    on: ``wrap=True`` rolls the sequence to do it, as the authors' non-flash code does
    (the first half-group then attends to the end of the sequence), ``wrap=False`` gives
    those heads a first and a last group of half the size. One group of the whole
    sequence without shift is ordinary causal attention.
    """
    if q.dim() != 4 or k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"q, k and v must share one shape (batch, heads, time, head size), got "
                         f"{tuple(q.shape)}, {tuple(k.shape)} and {tuple(v.shape)}")
    B, H, T, D = q.shape
    check_int(group_size, "group_size")
    if T % group_size:
        raise ValueError(f"group_size ({group_size}) must divide the sequence length ({T})")
    if shift:
        _check_shiftable(H, group_size)
    if not 0 <= dropout_p < 1:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p!r}")
    if not shift:
        return _grouped(q, k, v, group_size, dropout_p)
    half, offset = H // 2, group_size // 2
    plain = _grouped(q[:, :half], k[:, :half], v[:, :half], group_size, dropout_p)
    if wrap:
        rolled = [t[:, half:].roll(-offset, dims=2) for t in (q, k, v)]
        shifted = _grouped(*rolled, group_size, dropout_p).roll(offset, dims=2)
    else:
        # pad half a group in front and half behind, so the groups fall at shifted borders;
        # the padding is masked out as keys (each pad query sees only itself, so no row is empty)
        padded = [F.pad(t[:, half:], (0, 0, offset, group_size - offset)) for t in (q, k, v)]
        n = T + group_size
        real = torch.zeros(n, dtype=torch.bool, device=q.device)
        real[offset:offset + T] = True
        causal = torch.ones(group_size, group_size, dtype=torch.bool, device=q.device).tril()
        keys_real = real.view(n // group_size, 1, group_size)
        mask = (causal & keys_real) | torch.eye(group_size, dtype=torch.bool, device=q.device)
        shifted = _grouped(*padded, group_size, dropout_p, mask=mask)[:, :, offset:offset + T]
    return torch.cat([plain, shifted], dim=1)


def _check_shiftable(n_head, group_size) -> None:
    """Half the heads, shifted by half a group: both must halve evenly."""
    if n_head < 2 or n_head % 2 or group_size < 2 or group_size % 2:
        raise ValueError(f"S²-Attn shifts half the heads by half a group: it needs an even number of heads "
                         f"and an even group_size, got {n_head} heads and group_size {group_size}")


def _grouped(q, k, v, group_size, dropout_p, mask=None):
    """Causal attention within consecutive groups of the time axis (or under ``mask``, per group)."""
    B, H, T, D = q.shape
    groups = [t.reshape(B, H, T // group_size, group_size, D) for t in (q, k, v)]
    y = F.scaled_dot_product_attention(*groups, attn_mask=mask, is_causal=mask is None, dropout_p=dropout_p)
    return y.reshape(B, H, T, D)


class S2Attention(nn.Module):
    """A GPT-2 attention layer that trains with S²-Attn and attends to everything in eval.

    It keeps the layer's own ``c_attn`` and ``c_proj`` (so ``attn.c_attn`` keeps its name and
    any LoRA inside it) and its ``n_head``; ``group_size`` tokens a group in training.
    """

    def __init__(self, attn: CausalSelfAttention, group_size: int, wrap: bool = False):
        super().__init__()
        if not isinstance(attn, (CausalSelfAttention, S2Attention)):
            raise TypeError(f"attn must be a lora_edu CausalSelfAttention, got {type(attn).__name__}")
        check_int(group_size, "group_size")
        _check_shiftable(attn.n_head, group_size)
        if not isinstance(wrap, bool):
            raise ValueError(f"wrap must be True (roll, as the authors' code) or False (split), got {wrap!r}")
        self.c_attn, self.c_proj, self.n_head, self.dropout = attn.c_attn, attn.c_proj, attn.n_head, attn.dropout
        self.group_size, self.wrap = group_size, wrap

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in self.c_attn(x).split(C, dim=2))
        dropout_p = self.dropout if self.training else 0.0
        if self.training:
            y = shifted_sparse_attention(q, k, v, self.group_size, wrap=self.wrap, dropout_p=dropout_p)
        else:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C))

    def extra_repr(self) -> str:
        return f"group_size={self.group_size}, wrap={self.wrap}"


def use_s2_attention(model: GPT2, group_size: int, wrap: bool = False) -> GPT2:
    """Give every block of ``model`` S²-Attn for training (in place); eval attends in full."""
    if not isinstance(model, GPT2):
        raise TypeError(f"model must be a lora_edu GPT2, got {type(model).__name__}")
    check_int(group_size, "group_size", below=model.config.block_size + 1, below_name="block_size + 1")
    blocks = model.transformer.h
    if not all(isinstance(block.attn, (CausalSelfAttention, S2Attention)) for block in blocks):
        raise TypeError("use_s2_attention knows lora_edu's CausalSelfAttention; the model was left unchanged")
    replacements = [S2Attention(block.attn, group_size, wrap) for block in blocks]  # every check before any change
    for block, attention in zip(blocks, replacements):
        replace_module(block, "attn", attention)
    return model


def unfreeze_embeddings_and_norms(model: GPT2) -> GPT2:
    """Make the embeddings and every LayerNorm trainable too (LongLoRA's "LoRA+"), in place.

    Two differences from LongLoRA's Llama: GPT-2 ties its output layer to the token
    embedding, so training ``wte`` trains the output projection too (Llama's head is a
    separate matrix, which the recipe leaves frozen); and GPT-2 has a learned position
    table, ``wpe``, which is trained too, since the stretched positions are what the
    longer context needs to learn.
    """
    if not isinstance(model, GPT2):
        raise TypeError(f"model must be a lora_edu GPT2, got {type(model).__name__}")
    for module in (model.transformer.wte, model.transformer.wpe):
        module.weight.requires_grad_(True)
    for module in model.modules():
        if isinstance(module, nn.LayerNorm):
            for p in module.parameters():
                p.requires_grad_(True)
    return model


def future_influence(layer: nn.Module, x: torch.Tensor) -> float:
    """How much ``layer``'s outputs depend on later positions: max |∂(r_t · y_t) / ∂x_s| over s > t.

    ``x`` is (B, T, C); ``layer`` maps it to (B, T, C). Each position's output is read
    through a fixed random direction r_t (seeded), so that no two channels can cancel. A
    causal layer gives exactly 0. One backward pass per position, so keep T small.
    """
    if x.dim() != 3:
        raise ValueError(f"x must be (batch, time, channels), got shape {tuple(x.shape)}")
    x = x.detach().requires_grad_()
    y = layer(x)
    directions = torch.randn(y.shape, generator=torch.Generator().manual_seed(0)).to(y.device, y.dtype)
    worst = 0.0
    T = x.size(1)
    for t in range(T - 1):
        (grad,) = torch.autograd.grad((y[:, t] * directions[:, t]).sum(), x, retain_graph=True)
        worst = max(worst, grad[:, t + 1:].abs().max().item())
    return worst
