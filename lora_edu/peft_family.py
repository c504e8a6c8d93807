"""LoRA's relatives, on the book's GPT2: BitFit, (IA)³, prompt and prefix tuning, VeRA, serial adapters.

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
- **VeRA** (Kopiczko et al., 2024) is LoRA with A and B frozen, random and shared by every
  layer; each layer trains only two vectors, ``d`` (one per rank) and ``b`` (one per
  output), in ``b * B (d * (A x))``. Its update is a matrix like LoRA's, so it merges.
- **Serial adapters** (Houlsby et al., 2019), the method LoRA is measured against, put a
  small network ``y + up(gelu(down(y)))`` *after* a sublayer. ``up`` starts at zero, so a
  fresh adapter is the identity, as LoRA's B = 0 is. In series with the model and
  nonlinear, it cannot merge, and every forward pass waits for it: the latency the LoRA
  paper's Table 1 measures.
- **AdaMix** (Wang et al., 2022) trains several copies of each layer's LoRA A beside one
  shared B, routes every training pass through a random copy per layer, and pulls two
  routes' predictions together with a consistency loss
  (:func:`lora_edu.train.symmetric_kl`). Averaged, the copies are one LoRA adapter again
  (:func:`merge_adamix`), which merges as LoRA does.

LoRA and DoRA are :mod:`lora_edu.lora` and :mod:`lora_edu.dora`. :func:`merge_peft` merges
what can be merged and refuses the rest by name. One method per model: each ``add_*``
that adds layers refuses a model that already holds another method's (BitFit adds none).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from lora_edu.gpt2 import GPT2
from lora_edu.lora import merge_lora
from lora_edu.lora_layer import LoRALinear, is_quantized, lora_scaling
from lora_edu.plumbing import check_int, check_seed, replace_module
from lora_edu.serving import MultiLoRALinear

__all__ = [
    "BLOCK_MATRICES",
    "AdaMixLinear",
    "PrefixAttention",
    "PromptTuned",
    "ScaleInput",
    "ScaleOutput",
    "SerialAdapter",
    "VeRALinear",
    "adamix_layers",
    "adapter_parameters",
    "add_adamix",
    "add_bitfit",
    "add_ia3",
    "add_prefix_tuning",
    "add_serial_adapters",
    "add_vera",
    "check_adamix_options",
    "merge_adamix",
    "merge_peft",
    "refuse_other_methods",
    "vera_projections",
]


# The linear layers of every block, by name inside the block: what VeRA and AdaMix adapt.
BLOCK_MATRICES = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")


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
    def fold_into_base(self) -> nn.Linear:
        """Rescale the wrapped layer's rows of W (and entries of b) in place, and return that layer.

        The layer then computes alone what this wrapper computed, and the wrapper is spent:
        it would rescale twice. Unlike ``LoRALinear.merge``, nothing here can be undone.
        """
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
    def fold_into_base(self) -> nn.Linear:
        """Rescale the wrapped layer's columns of W in place, and return that layer (this wrapper is spent)."""
        self.layer.weight *= self.scale[None, :]
        return self.layer


def add_ia3(model: nn.Module) -> nn.Module:
    """(IA)³ in place: learned vectors rescale each block's keys, values and MLP hidden activations.

    Keys and values are the last two thirds of ``c_attn``'s output (q, k, v); the MLP's hidden
    activations are what ``mlp.c_proj`` reads, so their vector scales its input. Only the
    vectors train: 2 n_embd + 4 n_embd numbers per block.
    """
    blocks = _blocks(model)
    refuse_other_methods(model, "(IA)³")
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
        refuse_other_methods(model, "prompt tuning")
        check_int(n_virtual, "n_virtual", below=model.config.block_size, below_name="block_size")
        check_seed(seed)
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
        check_int(n_prefix, "n_prefix")
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
    random vocabulary tokens, layer by layer: Li and Liang found that starting from real
    words' activations beats random vectors in low-data settings. They also trained the
    prefix through an MLP, since updating it directly was unstable for them; here it is
    trained directly.
    """
    blocks = _blocks(model)
    refuse_other_methods(model, "prefix tuning")
    check_int(n_prefix, "n_prefix", below=model.config.block_size, below_name="block_size")
    check_seed(seed)
    keys_values = []
    hooks = [block.attn.c_attn.register_forward_hook(lambda m, i, out: keys_values.append(out.detach()[0]))
             for block in blocks]
    tokens = torch.randint(0, model.config.vocab_size, (1, n_prefix), generator=torch.Generator().manual_seed(seed))
    modes = {m: m.training for m in model.modules()}
    model.eval()  # the starting prefix is the model's own keys and values, not dropout's noise on them
    try:
        with torch.no_grad():
            model(tokens.to(next(model.parameters()).device))
    finally:
        for hook in hooks:
            hook.remove()
        for m, training in modes.items():
            m.train(training)
    _freeze(model)
    for i, (block, kqv) in enumerate(zip(blocks, keys_values)):
        layer = PrefixAttention(block.attn, n_prefix, seed=seed + i)
        _, k, v = kqv.split(kqv.shape[-1] // 3, dim=-1)
        with torch.no_grad():
            layer.prefix_keys.copy_(k), layer.prefix_values.copy_(v)
        block.attn = layer
    return model


def vera_projections(r: int, max_in: int, max_out: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """VeRA's shared frozen A (r, max_in) and B (max_out, r): Kaiming-uniform, A first, from one
    CPU generator seeded with ``seed`` (PEFT's ``projection_prng_key``), so the same seed gives
    PEFT's matrices and an adapter need not store them."""
    generator = torch.Generator().manual_seed(seed)

    def kaiming_uniform(shape):
        bound = math.sqrt(3.0) * math.sqrt(2.0) / math.sqrt(shape[1])  # gain sqrt(2), fan_in = shape[1]
        return torch.empty(shape).uniform_(-bound, bound, generator=generator)

    A = kaiming_uniform((r, max_in))
    return A, kaiming_uniform((max_out, r))


class VeRALinear(nn.Module):
    """``layer(x) + b * B (d * (A x))`` (VeRA): A and B frozen and shared, d and b trained.

    Every layer slices the shared matrices to its own shape, ``A[:, :in]`` and ``B[:out]``;
    ``d`` starts at ``d_initial`` and ``b`` at zero, so the layer starts as ``layer``.
    """

    def __init__(self, layer: nn.Linear, A: torch.Tensor, B: torch.Tensor, d_initial: float = 0.1):
        super().__init__()
        if not isinstance(layer, nn.Linear):
            raise ValueError(f"layer must be an nn.Linear, got {type(layer).__name__}")
        if A.shape[1] < layer.in_features or B.shape[0] < layer.out_features or A.shape[0] != B.shape[1]:
            raise ValueError(f"A must be (r, >= {layer.in_features}) and B (>= {layer.out_features}, r), got "
                             f"{tuple(A.shape)} and {tuple(B.shape)}")
        if isinstance(d_initial, bool) or not isinstance(d_initial, (int, float)) or not math.isfinite(d_initial):
            raise ValueError(f"d_initial must be a finite number (VeRA starts d at it; 0.1 in the paper), "
                             f"got {d_initial!r}")
        self.layer = layer
        kw = dict(device=layer.weight.device, dtype=layer.weight.dtype)
        # not saved with the model: the seed rebuilds them (they are shared, and would be saved once per layer)
        self.register_buffer("A", A[:, : layer.in_features].to(**kw), persistent=False)
        self.register_buffer("B", B[: layer.out_features].to(**kw), persistent=False)
        self.d = nn.Parameter(torch.full((A.shape[0],), float(d_initial), **kw))
        self.b = nn.Parameter(torch.zeros(layer.out_features, **kw))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x) + self.b * F.linear(self.d * F.linear(x, self.A), self.B)

    @torch.no_grad()
    def fold_into_base(self) -> nn.Linear:
        """Add diag(b) B diag(d) A to the wrapped layer's W in place, and return that layer (this wrapper is spent)."""
        self.layer.weight += (self.b[:, None] * self.B) @ (self.d[:, None] * self.A)
        return self.layer


def add_vera(model: nn.Module, r: int = 256, d_initial: float = 0.1, seed: int = 0,
             targets: tuple[str, ...] = BLOCK_MATRICES) -> nn.Module:
    """VeRA in place on every block's ``targets``: one pair of random matrices for all of them.

    Trains ``r + out_features`` numbers per adapted layer. ``seed`` fixes the shared matrices
    (PEFT's ``projection_prng_key``); with the same seed and targets this is PEFT's ``VeraConfig``.
    """
    blocks = _blocks(model)
    check_int(r, "r")
    targets = _checked_targets(targets)
    check_seed(seed)
    refuse_other_methods(model, "VeRA")
    layers = [(block, name) for block in blocks for name in targets]
    shapes = [block.get_submodule(name).weight.shape for block, name in layers]
    A, B = vera_projections(r, max(s[1] for s in shapes), max(s[0] for s in shapes), seed)
    # VeRALinear checks d_initial: every layer is built before any is put in
    vera = [VeRALinear(block.get_submodule(name), A, B, d_initial) for block, name in layers]
    _freeze(model)
    for (block, name), layer in zip(layers, vera):
        replace_module(block, name, layer)
    return model


# ----------------------------------------------------------------------------------------
# Serial adapters
# ----------------------------------------------------------------------------------------

# Houlsby et al. put one adapter after the attention and one after the MLP of every block
# (the LoRA paper's Adapter^H); Lin et al. (2020) one after the MLP only (Adapter^L).
ADAPTER_SUBLAYERS = ("attn", "mlp")


class SerialAdapter(nn.Module):
    """``sublayer`` followed by a bottleneck adapter: y + up(gelu(down(y))), y = sublayer(x)."""

    def __init__(self, sublayer: nn.Module, d: int, bottleneck: int):
        super().__init__()
        check_int(d, "d")
        check_int(bottleneck, "bottleneck")
        self.sublayer, self.down, self.up = sublayer, nn.Linear(d, bottleneck), nn.Linear(bottleneck, d)
        nn.init.zeros_(self.up.weight), nn.init.zeros_(self.up.bias)  # starts as the identity, like B = 0

    def forward(self, x):
        y = self.sublayer(x)
        return y + self.up(F.gelu(self.down(y)))


def add_serial_adapters(model: nn.Module, bottleneck: int,
                        sublayers: tuple[str, ...] = ADAPTER_SUBLAYERS) -> nn.Module:
    """Wrap the named sublayers of every block of a lora_edu GPT2 in adapters (in place).

    ``sublayers=("attn", "mlp")`` is Houlsby's placement (Adapter^H), ``("mlp",)`` Lin et
    al.'s (Adapter^L, without its extra LayerNorm). Only the adapters are left trainable.
    """
    blocks = _blocks(model)
    check_int(bottleneck, "bottleneck")
    if isinstance(sublayers, str) or not sublayers or any(name not in ADAPTER_SUBLAYERS for name in sublayers):
        raise ValueError(f"sublayers must be a non-empty list of names from {ADAPTER_SUBLAYERS}, got {sublayers!r}")
    if len(set(sublayers)) != len(sublayers):
        raise ValueError(f"sublayers names a sublayer twice: {sublayers!r}; name each once")
    refuse_other_methods(model, "serial adapters")
    width = model.config.n_embd
    adapters = {}
    for i, block in enumerate(blocks):  # every adapter built before any is put in
        for name in sublayers:
            sublayer = getattr(block, name)
            param = next(sublayer.parameters())
            adapters[i, name] = SerialAdapter(sublayer, width, bottleneck).to(param.device, param.dtype)
    _freeze(model)
    for (i, name), adapter in adapters.items():
        replace_module(blocks[i], name, adapter)
    return model


# ----------------------------------------------------------------------------------------
# AdaMix: a mixture of LoRA copies that merges back into one
# ----------------------------------------------------------------------------------------


class AdaMixLinear(nn.Module):
    """``layer(x) + scaling * B_k A_k x``, with one of ``copies`` LoRA copies picked per forward pass.

    AdaMix (Wang et al., 2022) trains several copies of a layer's adaptation and routes
    every forward pass in training through a random one of them (the whole batch takes the
    same copy; each layer draws its own). With ``share_b`` (the paper's LoRA variant) the
    copies are ``copies`` matrices A_k and one shared B; otherwise each copy has its own B.
    The copies start equal, as one LoRA layer starts (microsoft/AdaMix deep-copies one), and
    part as each is trained only on the passes routed through it.
    Each copy is its own parameter, so an unrouted one gets no gradient at all (None), and
    AdamW leaves it exactly as it was that step. In eval mode the layer computes with the
    average of the copies, what :func:`merge_adamix` makes permanent: with B shared that is
    exactly the average of the copies' outputs, since B (mean_k A_k) x = mean_k B A_k x.
    Routes come from ``generator``, so a seed fixes them; ``last_route`` is the copy the
    latest training pass took.
    """

    def __init__(self, layer: nn.Linear, r: int, alpha: float, copies: int, share_b: bool = True,
                 generator: torch.Generator | None = None):
        super().__init__()
        if not isinstance(layer, nn.Linear) or is_quantized(layer):
            raise TypeError(f"layer must be an nn.Linear (AdaMix here averages float A matrices into one "
                            f"LoRALinear), got {type(layer).__name__}")
        check_adamix_options(r, alpha, copies, share_b)
        self.layer, self.r, self.alpha, self.scaling = layer, r, alpha, lora_scaling(alpha, r)
        self.generator = torch.Generator().manual_seed(0) if generator is None else generator
        kw = dict(bias=False, device=layer.weight.device, dtype=layer.weight.dtype)
        self.lora_A = nn.ModuleList(nn.Linear(layer.in_features, r, **kw) for _ in range(copies))
        self.lora_B = nn.ModuleList(nn.Linear(r, layer.out_features, **kw) for _ in range(1 if share_b else copies))
        with torch.no_grad():  # every copy starts as one LoRA layer starts (A Kaiming-uniform, B = 0), as
            start = nn.init.kaiming_uniform_(torch.empty(r, layer.in_features), a=math.sqrt(5),
                                             generator=self.generator)  # the reference code's deepcopy
            for a in self.lora_A:
                a.weight.copy_(start)
            for b in self.lora_B:
                nn.init.zeros_(b.weight)
        layer.requires_grad_(False)
        self.last_route: int | None = None
        self.train(layer.training)

    @property
    def copies(self) -> int:
        return len(self.lora_A)

    @property
    def share_b(self) -> bool:
        return len(self.lora_B) == 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            k = int(torch.randint(self.copies, (1,), generator=self.generator))
            self.last_route = k
            A, B = self.lora_A[k].weight, self.lora_B[0 if self.share_b else k].weight
        else:
            A, B = self.averaged()
        return self.layer(x) + F.linear(F.linear(x, A), B) * self.scaling

    def averaged(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, B) of the merged adapter: the mean of the copies' A, and of their B unless it is shared."""
        A = torch.stack([a.weight for a in self.lora_A]).mean(0)
        return A, torch.stack([b.weight for b in self.lora_B]).mean(0)

    @torch.no_grad()
    def to_lora(self, route: int | None = None) -> LoRALinear:
        """One LoRALinear around the same base layer: the average of the copies, or copy ``route`` alone."""
        if route is None:
            A, B = self.averaged()
        else:
            check_int(route, "route", minimum=0, below=self.copies, below_name="copies")
            A, B = self.lora_A[route].weight, self.lora_B[0 if self.share_b else route].weight
        lora = LoRALinear(self.layer, self.r, self.alpha)
        lora.lora_A.weight.copy_(A), lora.lora_B.weight.copy_(B)
        return lora.train(self.training)

    def extra_repr(self) -> str:
        return f"copies={self.copies}, r={self.r}, alpha={self.alpha}, share_b={self.share_b}"


def check_adamix_options(r, alpha, copies, share_b) -> None:
    """AdaMix's options, checked before anything is built (``ValueError`` or ``TypeError`` naming the argument)."""
    check_int(r, "r")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 < alpha < math.inf:
        raise ValueError(f"alpha must be a finite number > 0, got {alpha!r}")
    check_int(copies, "copies", minimum=2)  # one copy is LoRA: nothing to mix
    if not isinstance(share_b, bool):
        raise TypeError(f"share_b must be True or False, got {share_b!r}")


def add_adamix(model: nn.Module, r: int = 8, alpha: float = 16, copies: int = 4, share_b: bool = True,
               seed: int = 0, targets: tuple[str, ...] = BLOCK_MATRICES) -> nn.Module:
    """AdaMix with LoRA copies, in place, on every block's ``targets``: ``copies`` A per layer, B shared.

    Only the copies train: ``r * (copies * in + out)`` numbers per layer with ``share_b``
    (``copies * r * (in + out)`` without), against LoRA's ``r * (in + out)``; once merged
    (:func:`merge_adamix`) the model holds a plain LoRA adapter of rank ``r``. The layers
    share one generator seeded with ``seed``, drawn in forward order: the same seed and
    the same passes give the same routes. Train with ``TrainConfig(consistency_weight=...)``
    for the paper's consistency loss between two routes.
    """
    blocks = _blocks(model)
    check_adamix_options(r, alpha, copies, share_b)
    targets = _checked_targets(targets)
    check_seed(seed)
    refuse_other_methods(model, "AdaMix")
    generator = torch.Generator().manual_seed(seed)  # the copies' starting A, then every route
    built = {}  # every layer built (or refused) before any is put in
    requires_grad = [(p, p.requires_grad) for p in model.parameters()]  # AdaMixLinear freezes its layer
    for i, block in enumerate(blocks):
        for name in targets:
            try:
                built[i, name] = AdaMixLinear(block.get_submodule(name), r, alpha, copies, share_b, generator)
            except TypeError as err:
                for p, flag in requires_grad:
                    p.requires_grad_(flag)
                raise TypeError(f"transformer.h.{i}.{name}: {err}; the model was left unchanged") from None
    _freeze(model)
    for (i, name), layer in built.items():
        replace_module(blocks[i], name, layer)
        for p in (*layer.lora_A.parameters(), *layer.lora_B.parameters()):
            p.requires_grad_(True)
    return model


def adamix_layers(model: nn.Module) -> dict[str, AdaMixLinear]:
    """Every :class:`AdaMixLinear` in ``model``, by module name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, AdaMixLinear)}


def merge_adamix(model: nn.Module, route_seed: int | None = None) -> nn.Module:
    """Replace every AdaMix layer by one LoRALinear, in place: the average of its copies (the paper's merge).

    ``route_seed`` instead keeps one random copy per layer, drawn from that seed: a single
    route, the ablation that asks what averaging adds. Either way the result is a LoRA model,
    which :func:`lora_edu.lora.merge_lora` folds into the base weights and
    :func:`lora_edu.peft_format.save_adapter` saves as PEFT does.
    """
    layers = adamix_layers(model)
    if not layers:
        raise ValueError("model has no AdaMix layers (add_adamix puts them in); there is nothing to merge")
    if route_seed is not None:
        check_seed(route_seed)
        g = torch.Generator().manual_seed(route_seed)
        routes = {name: int(torch.randint(layer.copies, (1,), generator=g)) for name, layer in layers.items()}
    for name, layer in layers.items():
        replace_module(model, name, layer.to_lora(None if route_seed is None else routes[name]))
    return model


def adapter_parameters(model: nn.Module) -> int:
    """How many parameters the serial adapters in ``model`` hold."""
    adapters = [m for m in model.modules() if isinstance(m, SerialAdapter)]
    return sum(p.numel() for m in adapters for p in (*m.down.parameters(), *m.up.parameters()))


def merge_peft(model: nn.Module) -> nn.Module:
    """Merge (IA)³ vectors, VeRA and AdaMix into the weights, in place; BitFit needs nothing. Refuses what cannot merge.

    AdaMix is first averaged into one LoRA adapter (:func:`merge_adamix`), which merges as LoRA does.
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
    _blocks(model)
    mergeable = [(name, module) for name, module in model.named_modules()
                 if isinstance(module, (ScaleOutput, ScaleInput, VeRALinear))]
    for name, module in mergeable:  # each wraps a linear layer, which it rewrites and hands back
        replace_module(model, name, module.fold_into_base())
    if adamix_layers(model):
        merge_lora(merge_adamix(model))
    return model


# ----------------------------------------------------------------------------------------
# What every method checks first
# ----------------------------------------------------------------------------------------


def _blocks(model: nn.Module) -> nn.ModuleList:
    """The blocks of the book's GPT2; anything else is refused before it is touched."""
    if not isinstance(model, GPT2):
        hint = (" (a Hugging Face GPT-2, whose layers are Conv1D: use PEFT's IA3Config, PromptTuningConfig, "
                "PrefixTuningConfig or VeraConfig there)" if hasattr(getattr(model, "config", None), "n_embd") else "")
        raise TypeError(f"model must be a lora_edu GPT2, got {type(model).__name__}{hint}")
    return model.transformer.h


def _checked_targets(targets) -> tuple[str, ...]:
    """``targets`` as a tuple, if it names block matrices, each once; ``ValueError`` otherwise."""
    if isinstance(targets, str) or not targets or any(t not in BLOCK_MATRICES for t in targets):
        raise ValueError(f"targets must be a non-empty list of names from {BLOCK_MATRICES}, got {targets!r}")
    twice = sorted({t for t in targets if list(targets).count(t) > 1})
    if twice:
        raise ValueError(f"targets names {', '.join(map(repr, twice))} twice; name each layer once")
    return tuple(targets)


def _method_layers(model: nn.Module) -> dict[str, list[str]]:
    """Which fine-tuning method's layers the model already holds, by method: {method: [module names]}."""
    kinds = ((LoRALinear, "LoRA"), (MultiLoRALinear, "a multi-adapter pool"), (ScaleOutput, "(IA)³"),
             (ScaleInput, "(IA)³"), (VeRALinear, "VeRA"), (PrefixAttention, "prefix tuning"),
             (SerialAdapter, "serial adapters"), (AdaMixLinear, "AdaMix"))
    found: dict[str, list[str]] = {}
    for name, module in model.named_modules():
        for kind, method in kinds:
            if isinstance(module, kind):
                found.setdefault(method, []).append(name)
    return found


def refuse_other_methods(model: nn.Module, method: str) -> None:
    """One method per model: a second one would wrap (and freeze) the first one's layers."""
    found = _method_layers(model)
    if found:
        described = "; ".join(f"{kind} ({names[0]}{', ...' if len(names) > 1 else ''})"
                              for kind, names in found.items())
        raise ValueError(f"model already has fine-tuning layers: {described}; add {method} to a fresh copy of "
                         "the base model (or merge the others first); the model was left unchanged")


def _freeze(model: nn.Module) -> None:
    for p in model.parameters():
        p.requires_grad_(False)
