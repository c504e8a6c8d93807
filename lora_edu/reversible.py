"""Reversible fine-tuning (MEFT): a frozen GPT-2 turned into a network whose backward pass
rebuilds its activations instead of storing them.

Liao, Tan and Monz (NeurIPS 2023, "Make Pre-trained Model Reversible: From Parameter to
Memory Efficient Fine-Tuning") run two streams through the model, both starting at the
embeddings, ``x1 = x2 = h``, and make each layer a reversible coupling:

    y1 = λ·x1 + F(x2)        y2 = β·x2 + G(y1)

Given ``(y1, y2)`` the inputs come back exactly, up to rounding:

    x2 = (y2 − G(y1)) / β    x1 = (y1 − F(x2)) / λ

so backward can start from the top layer's output and rebuild each layer's inputs on its
way down: activation memory stops growing with depth. The model's output is the mean of
the two streams, ``(x1 + x2) / 2``. The paper's three variants differ in what F and G
are (the scales are those of the authors' script, ``scripts/bert_glue.sh``):

- **MEFT1**: F is the frozen layer with an adapter beside its MLP, G an adapter; λ = 0.1,
  β = 1; each layer hands its outputs on swapped, ``(y2, y1)``.
- **MEFT2**: F an adapter, G the frozen layer with its adapter; λ = 1, β = 0.1; swapped.
- **MEFT3**: F the layer's attention half, G its MLP half, each with an adapter;
  λ = β = 0.1; not swapped.

A small λ or β lets a layer's output be (nearly) what the pretrained layer would give,
which the paper argues fine-tuning needs (its "starting point hypothesis"); the price is
that reconstruction divides by it. F and G hold the residual stream's identity, so an
error in a layer's outputs comes back at least 1/λ times larger in x1 (MEFT1), or 1/β in
x2 (MEFT2); with both small (MEFT3) about 1/(λβ), a hundred times, a layer. In float32 a
few layers are fine and a dozen are not: :func:`reconstruction_errors` measures it.
"""

from __future__ import annotations

import math
from contextlib import contextmanager

import torch
import torch.nn as nn
import torch.nn.functional as F

from lora_edu.gpt2 import GPT2, Block
from lora_edu.peft_family import refuse_other_methods
from lora_edu.plumbing import check_int, check_seed

__all__ = ["VARIANTS", "Adapter", "MEFTGPT2", "ReversibleLayer", "add_meft", "reconstruction_errors",
           "reversible_stack"]

# variant: (F, G, λ, β, swap the outputs): F and G and the swap as in the authors'
# models/modeling_revbert.py, the scales as their scripts/bert_glue.sh sets them
VARIANTS: dict[str, tuple[str, str, float, float, bool]] = {
    "meft1": ("layer", "adapter", 0.1, 1.0, True),
    "meft2": ("adapter", "layer", 1.0, 0.1, True),
    "meft3": ("attention", "mlp", 0.1, 0.1, False),
}


class Adapter(nn.Module):
    """down (d → r), GELU, dropout, up (r → d), with no residual.

    Both weights start as N(0, 0.02²), as the paper's Figure 4 says, and the biases at
    zero, as the authors' code initialises every linear layer: the adapter's output starts
    small, not zero.
    """

    def __init__(self, d: int, bottleneck: int, dropout: float = 0.0, std: float = 0.02):
        super().__init__()
        self.down, self.up = nn.Linear(d, bottleneck), nn.Linear(bottleneck, d)
        self.dropout = nn.Dropout(dropout)
        for layer in (self.down, self.up):
            nn.init.normal_(layer.weight, std=std), nn.init.zeros_(layer.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.dropout(F.gelu(self.down(x))))


class LayerWithAdapter(nn.Module):
    """A frozen GPT-2 block with an adapter beside its MLP (MEFT1's F, MEFT2's G)."""

    def __init__(self, block: Block, adapter: Adapter):
        super().__init__()
        self.block, self.adapter = block, adapter

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x + self.block.attn(self.block.ln_1(x))
        u = self.block.ln_2(h)
        return h + self.block.mlp(u) + self.adapter(u)


class AttentionHalf(nn.Module):
    """A block's attention with its residual, an adapter after the attention (MEFT3's F)."""

    def __init__(self, block: Block, adapter: Adapter):
        super().__init__()
        self.ln_1, self.attn, self.adapter = block.ln_1, block.attn, adapter

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.attn(self.ln_1(x))
        return x + a + self.adapter(a)


class MLPHalf(nn.Module):
    """A block's MLP with its residual, an adapter beside the MLP (MEFT3's G)."""

    def __init__(self, block: Block, adapter: Adapter):
        super().__init__()
        self.ln_2, self.mlp, self.adapter = block.ln_2, block.mlp, adapter

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        u = self.ln_2(h)
        return h + self.mlp(u) + self.adapter(u)


class _RandomState:
    """The random state before a call, to replay that call's dropout when backward reruns it."""

    def __init__(self, device: torch.device):
        self.device = device
        self.cpu = torch.get_rng_state()
        self.cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None

    @contextmanager
    def replayed(self):
        with torch.random.fork_rng(devices=[self.device] if self.cuda is not None else []):
            torch.set_rng_state(self.cpu)
            if self.cuda is not None:
                torch.cuda.set_rng_state(self.cuda, self.device)
            yield


class ReversibleLayer(nn.Module):
    """y1 = λ·x1 + F(x2), y2 = β·x2 + G(y1); hands on ``(y2, y1)`` if ``swap``, else ``(y1, y2)``."""

    def __init__(self, f: nn.Module, g: nn.Module, lam: float, beta: float, swap: bool):
        super().__init__()
        self.f, self.g, self.swap = f, g, bool(swap)
        self.lam, self.beta = _check_scale(lam, "lam"), _check_scale(beta, "beta")

    def forward(self, x1: torch.Tensor, x2: torch.Tensor, random_states: list | None = None):
        """The outputs; given a list ``random_states``, append the random states before F and G to it
        (for backward to replay their dropout)."""
        if random_states is not None:
            random_states.append(_RandomState(x2.device))
        y1 = self.lam * x1 + self.f(x2)
        if random_states is not None:
            random_states.append(_RandomState(y1.device))
        y2 = self.beta * x2 + self.g(y1)
        return (y2, y1) if self.swap else (y1, y2)

    def inverse(self, out1: torch.Tensor, out2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The inputs ``(x1, x2)`` that gave the outputs ``(out1, out2)``."""
        y1, y2 = (out2, out1) if self.swap else (out1, out2)
        x2 = (y2 - self.g(y1)) / self.beta
        return (y1 - self.f(x2)) / self.lam, x2

    def backward_step(self, out1, out2, d_out1, d_out2, states=(None, None)):
        """Rebuild this layer's inputs from its outputs and carry the gradients through it.

        ``states`` are the random states forward kept before F and G (``None``: draw anew).
        Returns the inputs, their gradients, and (parameter, gradient) pairs for the
        trainable parameters of F and G. Only one layer's graph exists at a time.
        """
        (y1, y2), (dy1, dy2) = ((out2, out1), (d_out2, d_out1)) if self.swap else ((out1, out2), (d_out1, d_out2))
        f_state, g_state = states
        # G first: y2 = β·x2 + G(y1) gives x2, and G's share of y1's gradient
        y1 = y1.detach().requires_grad_()
        g_params = [p for p in self.g.parameters() if p.requires_grad]
        with torch.enable_grad(), (g_state.replayed() if g_state else _nothing()):
            g_y1 = self.g(y1)
        dy1_from_g, *g_grads = torch.autograd.grad(g_y1, [y1, *g_params], dy2, allow_unused=True)
        with torch.no_grad():
            x2 = (y2 - g_y1) / self.beta
            if dy1_from_g is not None:
                dy1 = dy1 + dy1_from_g
        # then F: y1 = λ·x1 + F(x2) gives x1, and F's share of x2's gradient
        x2 = x2.detach().requires_grad_()
        f_params = [p for p in self.f.parameters() if p.requires_grad]
        with torch.enable_grad(), (f_state.replayed() if f_state else _nothing()):
            f_x2 = self.f(x2)
        dx2_from_f, *f_grads = torch.autograd.grad(f_x2, [x2, *f_params], dy1, allow_unused=True)
        with torch.no_grad():
            x1 = (y1 - f_x2) / self.lam
            dx1 = self.lam * dy1
            dx2 = self.beta * dy2 if dx2_from_f is None else self.beta * dy2 + dx2_from_f
        grads = list(zip(g_params, g_grads)) + list(zip(f_params, f_grads))
        return x1.detach(), x2.detach(), dx1, dx2, grads

    def extra_repr(self) -> str:
        return f"lam={self.lam}, beta={self.beta}, swap={self.swap}"


@contextmanager
def _nothing():
    yield


class _ReversibleFunction(torch.autograd.Function):
    """The layers' forward without a graph; backward rebuilds each layer's inputs from the top."""

    @staticmethod
    def forward(ctx, x1, x2, layers, *params):
        states = []  # on the context, not the layers: a second forward before backward keeps its own
        for layer in layers:  # grad mode is off in here: nothing is saved but what we save
            layer_states = []
            x1, x2 = layer(x1, x2, layer_states)
            states.append(tuple(layer_states))
        ctx.layers, ctx.params, ctx.random_states = layers, params, states
        # backward must recompute F and G as forward computed them, in the same autocast dtype
        device = x1.device.type
        ctx.autocast = None  # the meta device, which counts shapes, has no autocast
        if torch.amp.is_autocast_available(device):
            ctx.autocast = (device, torch.get_autocast_dtype(device), torch.is_autocast_enabled(device))
        ctx.save_for_backward(x1, x2)  # the top layer's output: all backward needs
        return x1, x2

    @staticmethod
    def backward(ctx, d1, d2):
        out1, out2 = ctx.saved_tensors
        d1 = torch.zeros_like(out1) if d1 is None else d1
        d2 = torch.zeros_like(out2) if d2 is None else d2
        position = {id(p): i for i, p in enumerate(ctx.params)}
        grads: list[torch.Tensor | None] = [None] * len(ctx.params)
        device, dtype, enabled = ctx.autocast or ("cpu", torch.bfloat16, False)
        with torch.autocast(device, dtype=dtype, enabled=enabled):
            for layer, states in zip(reversed(ctx.layers), reversed(ctx.random_states)):
                out1, out2, d1, d2, layer_grads = layer.backward_step(out1, out2, d1, d2, states)
                for p, grad in layer_grads:
                    if grad is not None:
                        i = position[id(p)]
                        grads[i] = grad if grads[i] is None else grads[i] + grad
        return (d1, d2, None, *grads)


def reversible_stack(x1: torch.Tensor, x2: torch.Tensor, layers: nn.ModuleList) -> tuple[torch.Tensor, torch.Tensor]:
    """Run ``layers`` (ReversibleLayers) on the two streams, keeping only the top output for backward."""
    params = [p for p in layers.parameters() if p.requires_grad]
    return _ReversibleFunction.apply(x1, x2, layers, *params)


class MEFTGPT2(nn.Module):
    """A frozen lora_edu GPT2 made reversible, with trainable adapters: see :func:`add_meft`.

    Called as a GPT2 is: ``model(idx)`` gives logits, ``model(idx, targets)`` (logits, loss).
    In training, backward rebuilds activations (``reversible = True``); set ``reversible =
    False`` to run the same network through ordinary autograd, which stores them.
    """

    def __init__(self, base: GPT2, variant: str, layers: nn.ModuleList):
        super().__init__()
        self.base, self.variant, self.layers = base, variant, layers
        self.config = base.config
        self.reversible = True

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None):
        h = self.base.embed(idx)
        x1, x2 = self.streams(h)
        return self.base.head((x1 + x2) / 2, targets)

    def streams(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The two streams at the top, both started at ``h``."""
        if self.reversible and self.training and torch.is_grad_enabled():
            return reversible_stack(h, h, self.layers)
        x1, x2 = h, h
        for layer in self.layers:
            x1, x2 = layer(x1, x2)
        return x1, x2

    def adapters(self) -> list[Adapter]:
        return [m for m in self.layers.modules() if isinstance(m, Adapter)]


def add_meft(model: GPT2, variant: str = "meft1", bottleneck: int = 8, lam: float | None = None,
             beta: float | None = None, seed: int = 0) -> MEFTGPT2:
    """The reversible model of ``variant`` ("meft1", "meft2", "meft3") around a lora_edu GPT2.

    The base model is frozen (it is the wrapper's ``base``; nothing else about it changes),
    and adapters of ``bottleneck`` hidden units go where the variant puts them, two a
    layer: MEFT1 and MEFT2 one beside the MLP and one as F or G, MEFT3 one after the
    attention and one beside the MLP. ``lam`` and ``beta`` default to the variant's scales
    (:data:`VARIANTS`). ``seed`` draws the adapters' weights (:class:`Adapter`).
    """
    if not isinstance(model, GPT2):
        raise TypeError(f"model must be a lora_edu GPT2 (add_meft knows its blocks), got {type(model).__name__}")
    unknown = [i for i, block in enumerate(model.transformer.h) if type(block) is not Block]
    if unknown:
        raise TypeError(f"add_meft knows lora_edu's gpt2.Block, but block {unknown[0]} is "
                        f"{type(model.transformer.h[unknown[0]]).__name__}; the model was left unchanged")
    if not isinstance(variant, str) or variant not in VARIANTS:
        raise ValueError(f"variant must be one of {list(VARIANTS)}, got {variant!r}")
    check_int(bottleneck, "bottleneck")
    check_seed(seed)
    f_kind, g_kind, default_lam, default_beta, swap = VARIANTS[variant]
    lam = _check_scale(default_lam if lam is None else lam, "lam")
    beta = _check_scale(default_beta if beta is None else beta, "beta")
    refuse_other_methods(model, "MEFT")

    d, dropout = model.config.n_embd, model.config.dropout
    stream = model.transformer.wte.weight  # the adapters live where the streams do, in their dtype
    layers = nn.ModuleList()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for block in model.transformer.h:
            parts = {kind: _part(kind, block, Adapter(d, bottleneck, dropout).to(stream.device, stream.dtype))
                     for kind in (f_kind, g_kind)}
            layers.append(ReversibleLayer(parts[f_kind], parts[g_kind], lam, beta, swap))
    for p in model.parameters():
        p.requires_grad_(False)
    return MEFTGPT2(model, variant, layers).train(model.training)  # in the base model's mode


def _part(kind: str, block: Block, adapter: Adapter) -> nn.Module:
    """F or G of one layer: the adapter alone, or a part of the frozen block with its adapter."""
    if kind == "adapter":
        return adapter
    return {"layer": LayerWithAdapter, "attention": AttentionHalf, "mlp": MLPHalf}[kind](block, adapter)


def _check_scale(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value == 0:
        raise ValueError(f"{name} must be a finite non-zero number (backward divides by it), got {value!r}")
    return float(value)


@torch.no_grad()
def reconstruction_errors(model: MEFTGPT2, idx: torch.Tensor) -> list[float]:
    """How far backward's rebuilt inputs are from the true ones, layer by layer (max |error|).

    Runs the forward pass keeping every layer's inputs, then rebuilds them from the top
    output as backward does, each layer from the one above's rebuilt inputs; entry ``i``
    is the largest error in layer ``i``'s rebuilt inputs. Errors start at the top and grow
    on the way down.
    """
    if not isinstance(model, MEFTGPT2):
        raise TypeError(f"model must be an MEFTGPT2 (from add_meft), got {type(model).__name__}")
    h = model.base.embed(idx)  # checks idx before anything changes
    was_training = model.training
    model.eval()  # no dropout: the inverse must see the same F and G
    try:
        x1 = x2 = h
        inputs = []
        for layer in model.layers:
            inputs.append((x1, x2))
            x1, x2 = layer(x1, x2)
        errors = [0.0] * len(inputs)
        for i in reversed(range(len(inputs))):
            x1, x2 = model.layers[i].inverse(x1, x2)
            true1, true2 = inputs[i]
            errors[i] = max((x1 - true1).abs().max().item(), (x2 - true2).abs().max().item())
    finally:
        model.train(was_training)
    return errors
