"""LoRA's relatives, on the book's GPT2: BitFit, (IA)³, prompt tuning and prefix tuning.

Each is small enough to read, and each says whether it can be merged into the model's
weights (then serving costs nothing extra) or not:

- **BitFit** (Ben Zaken et al., 2022) trains only the bias terms. The trained biases *are*
  the model's, so there is nothing to merge.
- **(IA)³** (Liu et al., 2022, T-Few) learns three vectors per block that rescale the
  keys, the values and the MLP's hidden activations, all starting at 1. A rescaled
  output of a linear layer is a rescaled weight, so it merges exactly.
- **Prompt tuning** (Lester et al., 2021) learns ``n_virtual`` input embeddings put before
  every input. They are extra *inputs*, not a change of any weight: nothing to merge
  into, and they take positions of the model's context.
- **Prefix tuning** (Li and Liang, 2021) learns ``n_prefix`` keys and values for every
  attention layer, which every real token can attend to. Again not a weight: it cannot
  merge, and the model starts changed (attention is shared with the prefix).

Serial adapters are :mod:`lora_edu.adapters`; LoRA and DoRA are :mod:`lora_edu.lora`
and :mod:`lora_edu.dora`. :func:`merge_peft` merges what can be merged and refuses the
rest by name.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from lora_edu.adapters import SerialAdapter

__all__ = [
    "PrefixAttention",
    "PromptTuned",
    "ScaleInput",
    "ScaleOutput",
    "add_bitfit",
    "add_ia3",
    "add_prefix_tuning",
    "merge_peft",
]


def _blocks(model: nn.Module) -> nn.ModuleList:
    blocks = getattr(getattr(model, "transformer", None), "h", None)
    if blocks is None:
        raise TypeError(f"model must be a lora_edu GPT2 (with transformer.h blocks), got {type(model).__name__}")
    return blocks


def _freeze(model: nn.Module) -> None:
    for p in model.parameters():
        p.requires_grad_(False)


def add_bitfit(model: nn.Module) -> nn.Module:
    """Train the bias terms only (every linear layer's and every LayerNorm's), in place."""
    _blocks(model)
    _freeze(model)
    for name, p in model.named_parameters():
        if name.endswith(".bias"):
            p.requires_grad_(True)
    return model


class ScaleOutput(nn.Module):
    """``layer(x)``, its output features from ``start`` on multiplied by a learned vector (starting at 1)."""

    def __init__(self, layer: nn.Linear, start: int):
        super().__init__()
        if not isinstance(layer, nn.Linear) or not 0 <= start < layer.out_features:
            raise ValueError(f"layer must be an nn.Linear and start in [0, out_features), got "
                             f"{type(layer).__name__} and start={start!r}")
        self.layer, self.start = layer, start
        self.scale = nn.Parameter(torch.ones(layer.out_features - start, device=layer.weight.device,
                                             dtype=layer.weight.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.layer(x)
        return torch.cat([out[..., : self.start], out[..., self.start:] * self.scale], dim=-1)

    @torch.no_grad()
    def merged(self) -> nn.Linear:
        """The plain layer that computes the same: rows of W (and entries of b) rescaled."""
        layer = self.layer
        layer.weight[self.start:] *= self.scale[:, None]
        if layer.bias is not None:
            layer.bias[self.start:] *= self.scale
        return layer


class ScaleInput(nn.Module):
    """``layer(x * scale)``: the input features rescaled by a learned vector (starting at 1)."""

    def __init__(self, layer: nn.Linear):
        super().__init__()
        if not isinstance(layer, nn.Linear):
            raise ValueError(f"layer must be an nn.Linear, got {type(layer).__name__}")
        self.layer = layer
        self.scale = nn.Parameter(torch.ones(layer.in_features, device=layer.weight.device, dtype=layer.weight.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x * self.scale)

    @torch.no_grad()
    def merged(self) -> nn.Linear:
        """The plain layer that computes the same: columns of W rescaled."""
        self.layer.weight *= self.scale[None, :]
        return self.layer


def add_ia3(model: nn.Module) -> nn.Module:
    """(IA)³ in place: learned vectors rescale each block's keys, values and MLP hidden activations.

    Keys and values are the last two thirds of ``c_attn``'s output (q, k, v); the MLP's hidden
    activations are what ``mlp.c_proj`` reads, so their vector scales its input. Only the
    vectors train: 2 n_embd + 4 n_embd numbers per block.
    """
    blocks = _blocks(model)
    if any(isinstance(block.attn.c_attn, ScaleOutput) for block in blocks):
        raise ValueError("model already has (IA)³ vectors; build them on a fresh copy of the model")
    _freeze(model)
    for block in blocks:
        width = block.attn.c_attn.in_features
        block.attn.c_attn = ScaleOutput(block.attn.c_attn, start=width)  # not the queries
        block.mlp.c_proj = ScaleInput(block.mlp.c_proj)
    return model


class PromptTuned(nn.Module):
    """A GPT2 that reads ``n_virtual`` learned embeddings before every input (prompt tuning).

    The virtual tokens take the first positions of the context, so an input may be at most
    ``block_size - n_virtual`` tokens long; their own outputs are dropped. They start as the
    embeddings of ``n_virtual`` random vocabulary tokens, as Lester et al. suggest.
    """

    def __init__(self, model: nn.Module, n_virtual: int, seed: int = 0):
        super().__init__()
        _blocks(model)
        if isinstance(n_virtual, bool) or not isinstance(n_virtual, int) or not 0 < n_virtual < model.config.block_size:
            raise ValueError(f"n_virtual must be an int in [1, block_size), got {n_virtual!r}")
        _freeze(model)
        self.model, self.n_virtual = model, n_virtual
        tokens = torch.randint(0, model.config.vocab_size, (n_virtual,), generator=torch.Generator().manual_seed(seed))
        self.prompt = nn.Parameter(model.transformer.wte.weight[tokens].detach().clone())

    @property
    def config(self):
        return self.model.config

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None):
        model, n = self.model, self.n_virtual
        T = idx.size(1)
        if T + n > model.config.block_size:
            raise ValueError(f"with {n} virtual tokens an input may have at most {model.config.block_size - n} tokens "
                             f"(block_size {model.config.block_size}), got {T}")
        tokens = model.transformer.wte(idx)
        x = torch.cat([self.prompt.expand(idx.size(0), -1, -1).to(tokens.dtype), tokens], dim=1)
        x = model.transformer.drop(x + model.transformer.wpe(torch.arange(T + n, device=idx.device)))
        for block in model.transformer.h:
            x = block(x)
        logits = model.lm_head(model.transformer.ln_f(x[:, n:]))
        if targets is None:
            return logits
        return logits, F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1))


class PrefixAttention(nn.Module):
    """A GPT2 attention layer whose keys and values begin with ``n_prefix`` learned ones (prefix tuning).

    Every real token may attend to the whole prefix, and causally to the tokens before it.
    The prefix starts as small random vectors; :func:`add_prefix_tuning` starts it from real
    tokens' keys and values instead. (Li and Liang also train it through an MLP for
    stability; that reparameterization is dropped after training and left out here.)
    """

    def __init__(self, attn: nn.Module, n_prefix: int, seed: int = 0):
        super().__init__()
        if isinstance(n_prefix, bool) or not isinstance(n_prefix, int) or n_prefix <= 0:
            raise ValueError(f"n_prefix must be a positive int, got {n_prefix!r}")
        self.attn, self.n_prefix = attn, n_prefix
        width = attn.c_proj.in_features
        g = torch.Generator().manual_seed(seed)
        kw = dict(device=attn.c_proj.weight.device, dtype=attn.c_proj.weight.dtype)
        self.prefix_keys = nn.Parameter(0.02 * torch.randn(n_prefix, width, generator=g).to(**kw))
        self.prefix_values = nn.Parameter(0.02 * torch.randn(n_prefix, width, generator=g).to(**kw))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        attn, n = self.attn, self.n_prefix
        B, T, C = x.shape
        q, k, v = attn.c_attn(x).split(C, dim=2)
        k = torch.cat([self.prefix_keys.expand(B, -1, -1), k], dim=1)
        v = torch.cat([self.prefix_values.expand(B, -1, -1), v], dim=1)
        heads = attn.n_head
        q = q.view(B, T, heads, C // heads).transpose(1, 2)
        k, v = (t.view(B, n + T, heads, C // heads).transpose(1, 2) for t in (k, v))
        visible = torch.ones(T, n + T, dtype=torch.bool, device=x.device).tril(diagonal=n)  # prefix + causal
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=visible,
                                           dropout_p=attn.dropout if self.training else 0.0)
        return attn.c_proj(y.transpose(1, 2).contiguous().view(B, T, C))


def add_prefix_tuning(model: nn.Module, n_prefix: int, seed: int = 0) -> nn.Module:
    """Prefix tuning in place: ``n_prefix`` learned keys and values in every attention layer.

    The prefixes start as the keys and values the model itself computes for ``n_prefix``
    random vocabulary tokens, layer by layer (Li and Liang found initialising from real
    words' activations far better than random vectors).
    """
    blocks = _blocks(model)
    if any(isinstance(block.attn, PrefixAttention) for block in blocks):
        raise ValueError("model already has prefixes; build them on a fresh copy of the model")
    if isinstance(n_prefix, bool) or not isinstance(n_prefix, int) or not 0 < n_prefix < model.config.block_size:
        raise ValueError(f"n_prefix must be a positive int below block_size, got {n_prefix!r}")
    _freeze(model)
    keys_values = []
    hooks = [block.attn.c_attn.register_forward_hook(lambda m, i, out: keys_values.append(out.detach()[0]))
             for block in blocks]
    tokens = torch.randint(0, model.config.vocab_size, (1, n_prefix), generator=torch.Generator().manual_seed(seed))
    try:
        with torch.no_grad():
            model(tokens.to(next(model.parameters()).device))
    finally:
        for hook in hooks:
            hook.remove()
    for i, (block, kqv) in enumerate(zip(blocks, keys_values)):
        layer = PrefixAttention(block.attn, n_prefix, seed=seed + i)
        _, k, v = kqv.split(kqv.shape[-1] // 3, dim=-1)
        with torch.no_grad():
            layer.prefix_keys.copy_(k), layer.prefix_values.copy_(v)
        block.attn = layer
    return model


def merge_peft(model: nn.Module) -> nn.Module:
    """Merge (IA)³ vectors into the weights, in place; BitFit needs nothing. Refuses what cannot merge.

    Prompt tuning, prefix tuning and serial adapters add inputs, attention entries or layers
    that no change of the existing weights can reproduce: they raise a TypeError that says so.
    """
    if isinstance(model, PromptTuned):
        raise TypeError("prompt tuning cannot be merged: its virtual tokens are extra inputs, which no change of "
                        "the model's weights reproduces (and they use context positions)")
    for module in model.modules():
        if isinstance(module, PrefixAttention):
            raise TypeError("prefix tuning cannot be merged: its learned keys and values are extra entries that "
                            "every token attends to, not a change of any weight")
        if isinstance(module, SerialAdapter):
            raise TypeError("serial adapters cannot be merged: each is a small network with a nonlinearity, in "
                            "series with the model")
    for block in _blocks(model):
        if isinstance(block.attn.c_attn, ScaleOutput):
            block.attn.c_attn = block.attn.c_attn.merged()
        if isinstance(block.mlp.c_proj, ScaleInput):
            block.mlp.c_proj = block.mlp.c_proj.merged()
    return model
