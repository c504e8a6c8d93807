"""Serving many LoRA (and DoRA) adapters from one base model, a different adapter for each token of a batch.

A merged adapter serves one task; a batch that mixes tasks needs each request's own
low-rank update on top of one shared base. The adapters live in a *pool*: for every
adapted layer, ``A`` of shape (n_adapters, r_max, in), ``B`` of shape (n_adapters, out,
r_max) and a ``scaling`` per adapter, adapters of lower rank zero-padded to ``r_max`` (as
vLLM's ``max_lora_rank``; S-LoRA's kernels avoid the padding, ours do not).

The kernels see a flat list of tokens, ``x`` of shape (tokens, in), and one adapter index
per token, ``indices`` of shape (tokens,), ``-1`` for none (the base model alone). A
layer flattens (batch, seq) into tokens and repeats each request's index for its tokens,
so prefill (many tokens per request) and decode (one token per request) are served by the
same call, as vLLM does.

- :func:`lora_loop`: the reference, one token at a time.
- :func:`gather_bmm`: every token gathers its own ``A`` and ``B`` from the pool into
  (tokens, r_max, in) and (tokens, out, r_max) copies, and two batched products do the
  rest: the gather-then-batched-matmul layout that Punica's evaluation compares its
  kernel with, and that S-LoRA's ablation "S-LoRA-bmm" runs (adapter weights copied to
  contiguous memory, batched products with padding; S-LoRA's Section 7.1). The BGMV
  kernel in Punica's repository (and, before its Triton ``lora_shrink``/``lora_expand``,
  vLLM's decode path) does the same arithmetic per token in one fused kernel that reads
  the pool in place and never writes the gathered copies.
- :func:`sgmv`: tokens grouped into segments by adapter, one pair of matrix products per
  segment: the layout of Punica's SGMV, the one operator of Punica's paper, which it runs
  on every token of batches that mix prefill and decode, every segment in one kernel
  launch, where ours loops over segments in Python.

DoRA adapters mix in the same batch. At inference a DoRA layer's rescaling
``g = m / ||W0 + s B A||`` (row norms of the (out, in) weight) depends on no input, so
the pool computes it once when the adapter is loaded and keeps ``g`` of shape
(n_adapters, out), ones for LoRA adapters, for adapters that do not target the layer and
for index ``-1``. A token with adapter ``i`` gets

    y = base(x) + (g_i - 1) * (W0 x) + g_i * s_i B_i A_i x,

with ``W0 x`` the base output less its bias: the bias is not rescaled, as in PEFT.

:class:`MultiAdapterModel` puts a pool in every layer that some adapter targets, on one
copy of the base model (ours or Hugging Face's GPT-2), and runs ``model(idx,
adapter_names=[...])`` with one name (or ``None``) per row.
"""

from __future__ import annotations

import os
from contextlib import contextmanager

import torch
import torch.nn as nn

from lora_edu import gpt2
from lora_edu.lora import lora_layers, select_modules
from lora_edu.lora_layer import is_conv1d, is_linear, lora_scaling
from lora_edu.peft_format import adapter_targets, read_adapter
from lora_edu.plumbing import check_int, check_tensors_fit, replace_module

__all__ = ["MultiAdapterModel", "MultiLoRALinear", "dora_scale", "gather_bmm", "lora_loop", "segments", "sgmv"]


def _check_pool(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, indices: torch.Tensor,
                scaling: torch.Tensor) -> None:
    for name, t in (("x", x), ("A", A), ("B", B), ("scaling", scaling)):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {type(t).__name__}"
                            + (f" of {t.dtype}" if isinstance(t, torch.Tensor) else ""))
    for name, t in (("A", A), ("B", B), ("scaling", scaling)):
        if t.dtype != x.dtype or t.device != x.device:
            raise TypeError(f"{name} must have x's dtype and device ({x.dtype} on {x.device}), got {t.dtype} on "
                            f"{t.device}; cast the pool or the input first")
    if A.dim() != 3 or B.dim() != 3:
        raise ValueError(f"A must be (n_adapters, r_max, in) and B (n_adapters, out, r_max), got A "
                         f"{tuple(A.shape)} and B {tuple(B.shape)}")
    n, r_max, in_features = A.shape
    if B.shape[0] != n or B.shape[2] != r_max:
        raise ValueError(f"B must be (n_adapters, out, r_max) = ({n}, out, {r_max}) to match A {tuple(A.shape)}, "
                         f"got {tuple(B.shape)}")
    if scaling.shape != (n,):
        raise ValueError(f"scaling must have one entry per adapter, shape ({n},), got {tuple(scaling.shape)}")
    if x.dim() != 2 or x.shape[-1] != in_features:
        raise ValueError(f"x must be a flat list of tokens, (tokens, in) with in = {in_features}, got "
                         f"{tuple(x.shape)}; flatten (batch, seq, in) and repeat each row's index per token")
    if isinstance(indices, torch.Tensor) and indices.device != x.device:
        raise ValueError(f"indices must be on x's device ({x.device}), got {indices.device}")
    if not isinstance(indices, torch.Tensor) or indices.dtype != torch.long or indices.shape != (x.shape[0],):
        raise ValueError(f"indices must be a long tensor with one adapter index per token of x, shape "
                         f"({x.shape[0]},), got {getattr(indices, 'dtype', type(indices).__name__)} "
                         f"{tuple(getattr(indices, 'shape', ()))}")
    if len(indices) and (indices.min() < -1 or indices.max() >= n):
        raise ValueError(f"indices must lie in [-1, {n - 1}] (-1: no adapter), got values from "
                         f"{indices.min().item()} to {indices.max().item()}")


def lora_loop(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, indices: torch.Tensor,
              scaling: torch.Tensor) -> torch.Tensor:
    """The reference: token by token, ``scaling[i] * B[i] A[i] x`` for the token's adapter ``i``; 0 where ``i = -1``.

    x (tokens, in); A (n_adapters, r_max, in); B (n_adapters, out, r_max); indices
    (tokens,) long, ``-1`` for no adapter; scaling (n_adapters,). Returns (tokens, out).
    """
    _check_pool(x, A, B, indices, scaling)
    out = x.new_zeros(x.shape[0], B.shape[1])
    for token, adapter in enumerate(indices.tolist()):
        if adapter >= 0:
            out[token] = (x[token] @ A[adapter].T) @ B[adapter].T * scaling[adapter]
    return out


def gather_bmm(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, indices: torch.Tensor,
               scaling: torch.Tensor) -> torch.Tensor:
    """The LoRA delta of every token with its own adapter, by gathering copies and two batched products.

    Takes what :func:`lora_loop` takes. Each token gathers its adapter's ``A`` and ``B``
    into (tokens, r_max, in) and (tokens, out, r_max) copies, then ``einsum`` does one
    matrix-vector product per token, all at once. That is the arithmetic of BGMV (one
    gathered matrix-vector product per token; a kernel of Punica's repository, not of its
    paper, and what S-LoRA's decode kernel MBGMV was built from), but BGMV is one fused
    kernel that reads each token's slice of the pool in place and never writes the
    copies; this is the gather-then-batched-matmul layout of Punica's baseline and of
    S-LoRA's "S-LoRA-bmm" ablation. Its memory traffic grows with the number of tokens, so
    it suits decode (one token per request) far better than prefill.
    """
    _check_pool(x, A, B, indices, scaling)
    active = indices >= 0
    if not active.any():  # every token -1 (the pool may even be empty): nothing to gather
        return x.new_zeros(x.shape[0], B.shape[1])
    # -1 gathers adapter 0 (any would do) and the token is zeroed below. Gathering A[-1], as
    # an indexing shortcut would, silently gives the token the *last* adapter instead.
    gathered = indices.clamp(min=0)
    shrink = torch.einsum("ti,tri->tr", x, A[gathered])  # (tokens, r_max)
    expand = torch.einsum("tr,tor->to", shrink, B[gathered])  # (tokens, out)
    per_token = torch.where(active, scaling[gathered], 0)[:, None]
    return torch.where(per_token != 0, expand * per_token, 0)


def segments(indices: torch.Tensor) -> tuple[torch.Tensor, list[int], list[int]]:
    """Tokens grouped by adapter: (the stable order that sorts them, each segment's adapter, its length)."""
    order = torch.argsort(indices, stable=True)
    adapters, counts = torch.unique_consecutive(indices[order], return_counts=True)
    return order, adapters.tolist(), counts.tolist()


def sgmv(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, indices: torch.Tensor,
         scaling: torch.Tensor) -> torch.Tensor:
    """The same delta as :func:`gather_bmm`, one pair of matrix products per segment of tokens: SGMV's layout.

    Tokens are grouped into contiguous segments by adapter (sorted if they are not
    already), so each adapter's A and B are read once per call, not once per token: the
    prefill case, where a request brings many tokens. Punica's SGMV does every segment in
    one kernel launch (and runs on every token of a batch that mixes prefill and decode);
    this loops over the segments in Python, one launch each.
    """
    _check_pool(x, A, B, indices, scaling)
    order, adapters, counts = segments(indices)
    out = x.new_zeros(x.shape[0], B.shape[1])
    start = 0
    for adapter, count in zip(adapters, counts):
        tokens = order[start:start + count]
        start += count
        if adapter >= 0:
            out[tokens] = (x[tokens] @ A[adapter].T) @ B[adapter].T * scaling[adapter]
    return out


KERNELS = {"gather_bmm": gather_bmm, "sgmv": sgmv, "loop": lora_loop}


def dora_scale(weight: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scaling: float,
               magnitude: torch.Tensor) -> torch.Tensor:
    """DoRA's inference-time rescaling of one adapter on one layer: ``m / ||W0 + s B A||``, shape (out,).

    ``weight`` is W0 laid out (out, in) (transpose a GPT-2 Conv1D's first); the norm is
    taken per output row, as PEFT and :class:`~lora_edu.dora.DoRALinear` take it.
    """
    return magnitude / torch.linalg.norm(weight + (B @ A) * scaling, dim=1)


class MultiLoRALinear(nn.Module):
    """A frozen linear layer plus a pool of LoRA (and DoRA) adapters; each token uses its own.

    ``indices`` (one adapter index per row of the batch, or per token: shape x.shape[:-1];
    -1 for none) is set by :class:`MultiAdapterModel` for the length of one call. The pool
    holds A (n_adapters, r_max, in), B (n_adapters, out, r_max) and scaling (n_adapters,)
    as buffers: served, not trained. A layer that some DoRA adapter targets also holds
    ``g`` (n_adapters, out), each adapter's ``m / ||W0 + s B A||``, ones for the others.
    """

    def __init__(self, base_layer: nn.Module, n_adapters: int, r_max: int, kernel: str = "gather_bmm",
                 dora: bool = False):
        super().__init__()
        if not is_linear(base_layer):
            raise TypeError(f"base_layer must be nn.Linear or a GPT-2 Conv1D, got {type(base_layer).__name__}")
        weight = base_layer.weight
        conv1d = is_conv1d(base_layer)
        out_features, in_features = weight.shape[::-1] if conv1d else weight.shape
        self.base_layer = base_layer
        self.in_features, self.out_features = in_features, out_features
        kw = dict(device=weight.device, dtype=weight.dtype)
        self.register_buffer("A", torch.zeros(n_adapters, r_max, in_features, **kw))
        self.register_buffer("B", torch.zeros(n_adapters, out_features, r_max, **kw))
        self.register_buffer("scaling", torch.zeros(n_adapters, **kw))
        self.register_buffer("g", torch.ones(n_adapters, out_features, **kw) if dora else None)
        self.kernel = kernel
        self.indices: torch.Tensor | None = None

    def base_weight(self) -> torch.Tensor:
        """W0 as (out, in), in the pool's dtype."""
        weight = self.base_layer.weight
        return (weight.T if is_conv1d(self.base_layer) else weight).to(self.A.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        if self.indices is None:
            raise RuntimeError("a MultiLoRALinear runs inside MultiAdapterModel(idx, adapter_names=...), "
                               "which says which adapter each row uses")
        lead = x.shape[:-1]
        indices = self.indices
        if indices.shape != lead and indices.shape != lead[:1]:
            raise ValueError(f"indices must hold one adapter index per row ({lead[0]},) or per token "
                             f"{tuple(lead)} of x, got shape {tuple(indices.shape)}")
        if indices.shape != lead:  # one index per row: repeat it for each of the row's tokens
            indices = indices.view(-1, *[1] * (len(lead) - 1)).expand(lead)
        tokens = x.reshape(-1, x.shape[-1]).to(self.A.dtype)
        indices = indices.reshape(-1)
        delta = KERNELS[self.kernel](tokens, self.A, self.B, indices, self.scaling)
        if self.g is not None:  # DoRA: (g - 1) * W0 x + g * s B A x, the bias not rescaled
            g = torch.where((indices >= 0)[:, None], self.g[indices.clamp(min=0)], 1)
            base = out.reshape(-1, self.out_features).to(self.A.dtype)
            bias = self.base_layer.bias
            if bias is not None:
                base = base - bias.to(self.A.dtype)
            delta = (g - 1) * base + g * delta
        return out + delta.view(*lead, self.out_features).to(out.dtype)

    def extra_repr(self) -> str:
        n, r_max, _ = self.A.shape
        return (f"in={self.in_features}, out={self.out_features}, adapters={n}, r_max={r_max}, kernel={self.kernel}"
                + (", dora" if self.g is not None else ""))


class MultiAdapterModel(nn.Module):
    """One base model and many LoRA and DoRA adapters, a different one for each row of a batch.

    ``adapters`` maps a name to an adapter folder in PEFT's format (ours or PEFT's, plain
    LoRA, rsLoRA or DoRA: ``use_dora`` adapters get their ``g`` computed here). Every
    layer that some adapter targets gets a :class:`MultiLoRALinear` pool, in place: the
    base model is held once, and an adapter that does not target a layer contributes zero
    there. Ranks may differ; the pool pads them with zeros to the largest (or to
    ``max_rank``, which refuses any adapter above it). ``kernel`` picks ``"gather_bmm"``,
    ``"sgmv"`` or ``"loop"``. Every check runs before the base model is touched.

    ``model(idx, adapter_names)`` with one name or ``None`` (the base model alone) per row
    returns what each row would get from its adapter loaded alone; keyword arguments go to
    the base model. :meth:`generate` samples the same way.
    """

    def __init__(self, base_model: nn.Module, adapters: dict[str, str | os.PathLike], max_rank: int | None = None,
                 kernel: str = "gather_bmm"):
        super().__init__()
        if not isinstance(adapters, dict) or not adapters or not all(isinstance(n, str) and n for n in adapters):
            raise ValueError(f"adapters must be a non-empty dict of name -> adapter folder, got {adapters!r}")
        if kernel not in KERNELS:
            raise ValueError(f"kernel must be one of {sorted(KERNELS)}, got {kernel!r}")
        check_int(max_rank, "max_rank", optional=True)
        if lora_layers(base_model) or any(isinstance(m, MultiLoRALinear) for m in base_model.modules()):
            raise ValueError("base_model already has LoRA layers; serve adapters on the plain base model")
        modules = {n: m for n, m in base_model.named_modules() if n}
        read = {name: read_adapter(directory, name) for name, directory in adapters.items()}

        plans = {}  # adapter name -> {module name: (A, B, magnitude)}, every check passed before anything changes
        for name, (config, state) in read.items():
            chosen, unmatched = select_modules(modules, *adapter_targets(config))
            if unmatched:
                raise ValueError(f"adapter {name!r} targets {', '.join(map(repr, unmatched))}, which this model does "
                                 "not have: was it made for another base model?")
            plans[name] = self._plan(name, config, state, {m: modules[m] for m in chosen})
        ranks = {name: config["r"] for name, (config, _) in read.items()}
        r_max = max(ranks.values()) if max_rank is None else max_rank
        too_big = {name: r for name, r in ranks.items() if r > r_max}
        if too_big:
            raise ValueError(f"adapters {too_big} have a rank above the pool's max_rank={r_max}")

        self.base_model = base_model
        self.names = list(adapters)
        self.r_max = r_max
        layers = sorted({m for plan in plans.values() for m in plan})
        for module_name in layers:
            dora = any(plans[name].get(module_name, (None,) * 3)[2] is not None for name in self.names)
            pool = MultiLoRALinear(modules[module_name], len(self.names), r_max, kernel, dora=dora)
            with torch.no_grad():
                for i, name in enumerate(self.names):
                    if module_name not in plans[name]:
                        continue  # not targeted by this adapter: its slot stays zero (and its g one)
                    a, b, magnitude = plans[name][module_name]
                    config = read[name][0]
                    pool.A[i, : a.shape[0]] = a
                    pool.B[i, :, : b.shape[1]] = b
                    pool.scaling[i] = lora_scaling(config["lora_alpha"], config["r"], config.get("use_rslora", False))
                    if magnitude is not None:  # DoRA: g = m / ||W0 + s B A||, once, at load
                        pool.g[i] = dora_scale(pool.base_weight(), pool.A[i], pool.B[i], pool.scaling[i],
                                               magnitude.to(pool.g.dtype))
            replace_module(base_model, module_name, pool)
        for p in base_model.parameters():
            p.requires_grad_(False)

    @staticmethod
    def _plan(name: str, config: dict, state: dict, chosen: dict[str, nn.Module]) -> dict:
        r = config["r"]
        expected = {}
        for module_name, module in chosen.items():
            conv1d = is_conv1d(module)
            out_f, in_f = module.weight.shape[::-1] if conv1d else module.weight.shape
            expected[f"{module_name}.lora_A.weight"] = (r, in_f)
            expected[f"{module_name}.lora_B.weight"] = (out_f, r)
            if config.get("use_dora"):
                expected[f"{module_name}.magnitude"] = (out_f,)
        check_tensors_fit(state, expected, holder="adapter", shown=3,
                          failure=f"adapter {name!r} does not fit this model (made for another base model?)")
        return {m: (state[f"{m}.lora_A.weight"], state[f"{m}.lora_B.weight"], state.get(f"{m}.magnitude"))
                for m in chosen}

    def pools(self) -> dict[str, MultiLoRALinear]:
        return {n: m for n, m in self.base_model.named_modules() if isinstance(m, MultiLoRALinear)}

    def pool_bytes(self) -> int:
        """Bytes of every adapter in every pool (A, B, scaling and DoRA's g), padding included."""
        return sum(t.numel() * t.element_size() for pool in self.pools().values() for t in pool.buffers())

    def indices_for(self, adapter_names, batch_size: int) -> torch.Tensor:
        """One pool index per row: the adapter's position in ``names``, -1 for ``None``."""
        if (not isinstance(adapter_names, (list, tuple)) or len(adapter_names) != batch_size
                or not all(n is None or isinstance(n, str) for n in adapter_names)):
            raise ValueError(f"adapter_names must be a list with one name (a str, or None for the base model) per "
                             f"row, {batch_size} rows, got {adapter_names!r}")
        unknown = sorted({n for n in adapter_names if n is not None and n not in self.names})
        if unknown:
            raise ValueError(f"unknown adapter names {unknown}; this model serves {self.names} (and None for the "
                             "base model)")
        return torch.tensor([-1 if n is None else self.names.index(n) for n in adapter_names], dtype=torch.long)

    @contextmanager
    def serving(self, adapter_names, batch_size: int):
        indices = self.indices_for(adapter_names, batch_size)
        pools = self.pools().values()
        for pool in pools:
            pool.indices = indices.to(pool.A.device)
        try:
            yield
        finally:
            for pool in pools:
                pool.indices = None

    def forward(self, idx: torch.Tensor, adapter_names, **kwargs):
        with self.serving(adapter_names, idx.shape[0]):
            return self.base_model(idx, **kwargs)

    @torch.no_grad()
    def generate(self, idx: torch.Tensor, adapter_names, max_new_tokens: int, **kwargs) -> torch.Tensor:
        """Sample continuations of ``idx``, each row with its own adapter.

        Our GPT2 samples with :func:`lora_edu.gpt2.generate` (``temperature``, ``top_k``,
        ``seed``); a Hugging Face model with its own ``generate`` (its keyword arguments).
        Hugging Face's ``generate`` repeats each row for its beams and returned sequences
        (``max(num_beams, num_return_sequences)`` copies, side by side); each copy keeps
        its row's adapter, as PEFT does for beams.
        """
        if isinstance(self.base_model, gpt2.GPT2):
            with self.serving(adapter_names, idx.shape[0]):
                return gpt2.generate(self.base_model, idx, max_new_tokens, **kwargs)
        self.indices_for(adapter_names, idx.shape[0])  # checked against the rows as given, before copying
        config = kwargs.get("generation_config") or self.base_model.generation_config
        expand = max(check_int(kwargs.get(option, getattr(config, option, None) or 1), option)
                     for option in ("num_beams", "num_return_sequences"))
        per_copy = [name for name in adapter_names for _ in range(expand)]
        with self.serving(per_copy, idx.shape[0] * expand):
            return self.base_model.generate(idx, max_new_tokens=max_new_tokens, **kwargs)
