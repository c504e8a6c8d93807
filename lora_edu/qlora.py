"""QLoRA: LoRA adapters on a frozen 4-bit base (Dettmers et al., 2023).

The recipe, in the order Chapter 5 applies it:

1. :func:`quantize_model` swaps the linear layers for 4-bit ones (NF4 with double
   quantization): our :class:`~lora_edu.nf4.NF4Linear` or bitsandbytes' ``Linear4bit``.
   Both backends store the same bytes.
2. :func:`prepare_for_kbit_training` freezes the model, keeps everything that is not 4-bit
   (norms, embeddings, biases) in float32, and turns on gradient checkpointing per block.
3. ``add_lora(model, "all-linear", **QLORA_LORA)`` puts float32 adapters beside every
   4-bit layer (Chapter 2's code, unchanged).
4. :func:`make_optimizer`: bitsandbytes' paged AdamW on a GPU, plain AdamW elsewhere.
5. For deployment, :func:`merge_and_dequantize` (exact) or :func:`merge_and_requantize`
   (4 bits again: the outputs change, and :func:`output_change` says by how much).

:func:`memory_breakdown` computes where the bytes go; :func:`saved_activation_bytes`
measures what autograd keeps for the backward pass, on any device.
"""

from __future__ import annotations

import weakref

import torch
import torch.nn as nn

from lora_edu.lora import lora_layers, merge_lora, name_matches as _name_matches  # public in lora
from lora_edu.lora_layer import is_conv1d as _is_conv1d, is_quantized  # public in lora_layer
from lora_edu.nf4 import NF4Linear, _check_blocksize, _check_weight, bits_per_parameter, check_compute_dtype, dequantize_nf4

__all__ = [
    "BACKENDS",
    "QLORA_LORA",
    "compute_dtype_for",
    "dequantize_layer",
    "dequantize_model",
    "LLAMA_SHAPES",
    "llama_skeleton",
    "make_optimizer",
    "memory_breakdown",
    "merge_and_dequantize",
    "merge_and_requantize",
    "output_change",
    "prepare_for_kbit_training",
    "quantize_model",
    "quantized_layers",
    "saved_activation_bytes",
]

BACKENDS = ("lora_edu", "bitsandbytes")

# The QLoRA paper's adapters: every linear layer, r = 64, alpha = 16, and dropout 0.1
# (its setting for models up to 13B parameters; 0.05 above).
QLORA_LORA = {"r": 64, "alpha": 16, "dropout": 0.1}


def compute_dtype_for(device: str | torch.device) -> torch.dtype:
    """The precision the 4-bit layers compute in: bfloat16 on GPUs that have it (A100, H100,
    RTX 30xx and newer), float16 on older ones (Colab's T4), float32 on the CPU."""
    device = torch.device(device)
    if device.type != "cuda":
        return torch.float32
    # A T4 can *emulate* bfloat16 (slowly), and is_bf16_supported() says yes to that by default.
    return torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16


# ----------------------------------------------------------------------------------------
# Quantizing a model
# ----------------------------------------------------------------------------------------


def quantized_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Every 4-bit linear layer in ``model`` (inside LoRA layers too), by module name."""
    return {name: m for name, m in model.named_modules() if is_quantized(m)}


def _linear4bit(linear: nn.Linear, blocksize: int, double_quant: bool, compute_dtype: torch.dtype) -> nn.Module:
    """bitsandbytes' Linear4bit holding ``linear``'s weight in NF4."""
    try:
        import bitsandbytes as bnb
    except ImportError:
        raise ImportError(
            "backend='bitsandbytes' needs bitsandbytes (pip install bitsandbytes); "
            "backend='lora_edu' needs nothing beyond PyTorch"
        ) from None
    layer = bnb.nn.Linear4bit(
        linear.in_features, linear.out_features, bias=linear.bias is not None, compute_dtype=compute_dtype,
        compress_statistics=double_quant, quant_type="nf4", device="meta",
    )
    layer.weight = bnb.nn.Params4bit(
        linear.weight.detach().clone(), requires_grad=False, blocksize=blocksize,
        compress_statistics=double_quant, quant_type="nf4",
    )
    if linear.bias is not None:
        layer.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
    # On a CPU with AVX512-BF16, bitsandbytes (0.50.2, at least) repacks a Linear4bit's weight in place at
    # its first inference forward (eval mode, no grad) for a faster kernel, rounding the absmax
    # to bfloat16: the stored bytes and the outputs would then no longer be NF4Linear's.
    layer.support_avx512bf16_for_cpu = False
    return layer.to(linear.weight.device)  # Params4bit quantizes when it is moved to a device


def _quantize_linear(linear: nn.Linear, backend: str, blocksize: int, double_quant: bool,
                     compute_dtype: torch.dtype) -> nn.Module:
    if backend == "bitsandbytes":
        return _linear4bit(linear, blocksize, double_quant, compute_dtype)
    return NF4Linear.from_linear(linear, blocksize, double_quant, compute_dtype)


def quantize_model(
    model: nn.Module,
    backend: str = "lora_edu",
    *,
    blocksize: int = 64,
    double_quant: bool = True,
    compute_dtype: torch.dtype = torch.float32,
    exclude: tuple[str, ...] = ("lm_head",),
) -> nn.Module:
    """Replace every ``nn.Linear`` of ``model`` (except ``exclude``) by a 4-bit NF4 layer, in place.

    ``backend="lora_edu"`` uses :class:`~lora_edu.nf4.NF4Linear`; ``"bitsandbytes"`` uses
    ``bitsandbytes.nn.Linear4bit`` with ``quant_type="nf4"`` (not its default, "fp4").
    Quantize first, then add LoRA: that is QLoRA's order. Every weight is checked before
    any layer is replaced (a NaN or inf is refused, naming the layer, by both backends), so
    a refusal leaves the model unchanged. Returns ``model``.
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {list(BACKENDS)}")
    compute_dtype = check_compute_dtype(compute_dtype)
    if isinstance(exclude, str):
        exclude = (exclude,)
    already = quantized_layers(model)
    if already:
        raise ValueError(
            f"model is already quantized ({len(already)} 4-bit layers, e.g. {next(iter(already))!r}); "
            "quantizing twice would round the rounded weights again"
        )
    if lora_layers(model):
        raise ValueError("model already has LoRA layers; quantize the base first, then add_lora (QLoRA's order)")
    if isinstance(model, nn.Linear):
        raise TypeError("model is itself a linear layer; quantize it directly: NF4Linear.from_linear(layer)")
    conv1d = [name for name, m in model.named_modules() if _is_conv1d(m)]
    if conv1d:
        raise TypeError(
            f"model has Hugging Face Conv1D layers ({conv1d[0]!r}, ...), whose weight is (in, out); "
            "load GPT-2 with lora_edu.gpt2.load_pretrained (nn.Linear throughout) before quantizing"
        )
    chosen = [
        name for name, m in model.named_modules()
        if type(m) is nn.Linear and not any(_name_matches(name, e) for e in exclude)
    ]
    if not chosen:
        raise ValueError(f"model has no nn.Linear layers to quantize (excluding {list(exclude)})")
    _check_blocksize(blocksize)
    if not isinstance(double_quant, bool):
        raise TypeError(f"double_quant must be True or False, got {double_quant!r}")
    # Check every weight, then quantize every layer, then replace them: a refusal leaves the
    # model as it was. bitsandbytes takes NaN and inf without a word, and double quantization
    # then spreads them to the whole tensor: both backends refuse them here.
    for name in chosen:
        try:
            _check_weight(model.get_submodule(name).weight, f"{name}.weight")
        except (TypeError, ValueError) as err:
            raise type(err)(f"{err}; nothing was quantized, the model was left unchanged") from None
    quantized = {
        name: _quantize_linear(model.get_submodule(name), backend, blocksize, double_quant, compute_dtype)
        for name in chosen
    }
    for name, layer in quantized.items():
        _replace(model, name, layer)
    return model


def _settings(layer: nn.Module) -> dict:
    """The backend and quantization settings of a 4-bit layer, to quantize a new weight alike."""
    if isinstance(layer, NF4Linear):
        return dict(backend="lora_edu", blocksize=layer.blocksize, double_quant=layer.absmax_codes is not None,
                    compute_dtype=layer.compute_dtype)
    return dict(backend="bitsandbytes", blocksize=layer.weight.blocksize,
                double_quant=layer.weight.compress_statistics, compute_dtype=layer.compute_dtype)


def dequantize_layer(layer: nn.Module, dtype: torch.dtype = torch.float32) -> nn.Linear:
    """A plain ``nn.Linear`` holding the weight a 4-bit layer computes with."""
    if not is_quantized(layer):
        raise TypeError(f"layer must be a 4-bit layer (NF4Linear or Linear4bit), got {type(layer).__name__}")
    if isinstance(layer, NF4Linear):
        weight = dequantize_nf4(layer.weight_packed, layer.quant_state, dtype=torch.float32)
        device = layer.weight_packed.device
    else:
        import bitsandbytes.functional as bnbf

        if getattr(layer.weight.quant_state, "packing_format_for_cpu", False):
            # Repacked for bitsandbytes' AVX512-BF16 CPU kernel (see _linear4bit): restore the
            # standard layout first, as bitsandbytes' own state_dict() does.
            layer.weight.data, layer.weight.quant_state = bnbf._convert_weight_packed_for_cpu_inverse(
                layer.weight.data, layer.weight.quant_state
            )
        weight = bnbf.dequantize_4bit(layer.weight.data, layer.weight.quant_state).float()
        device = layer.weight.device
    linear = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, device=device, dtype=dtype)
    with torch.no_grad():
        linear.weight.copy_(weight.reshape(layer.out_features, layer.in_features))
        if layer.bias is not None:
            linear.bias.copy_(layer.bias)
    linear.requires_grad_(False)
    return linear


def _replace(model: nn.Module, name: str, module: nn.Module) -> nn.Module:
    if not name:
        return module
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name), child, module)
    return model


def dequantize_model(model: nn.Module, dtype: torch.dtype = torch.float32) -> nn.Module:
    """Replace every 4-bit layer by its dequantized ``nn.Linear``, in place (LoRA layers stay)."""
    layers = quantized_layers(model)
    if not layers:
        raise ValueError("model has no 4-bit layers to dequantize")
    for name, layer in layers.items():
        model = _replace(model, name, dequantize_layer(layer, dtype))
    return model


def merge_and_dequantize(model: nn.Module, dtype: torch.dtype = torch.float32) -> nn.Module:
    """A plain model: every 4-bit base dequantized, then every adapter merged into it.

    Exact (up to float rounding): the merged layer computes W0' + (alpha/r) B A where W0'
    is the very weight the 4-bit layer computed with. The price is memory: the result is
    no longer 4-bit. In place; returns the model.
    """
    if not lora_layers(model):
        raise ValueError("model has no LoRA layers to merge; call add_lora first")
    return merge_lora(dequantize_model(model, dtype))


def merge_and_requantize(model: nn.Module) -> nn.Module:
    """Merge each adapter into its 4-bit base and quantize the sum again, in place.

    Keeps the model 4-bit, but W0' + (alpha/r) B A is rounded onto the NF4 grid once more,
    so the outputs change: typically the update B A is smaller than a quantization step
    and much of it is rounded away. Measure it with :func:`output_change` before shipping.
    """
    layers = lora_layers(model)
    if not layers:
        raise ValueError("model has no LoRA layers to merge; call add_lora first")
    plain = [name for name, layer in layers.items() if not is_quantized(layer.base_layer)]
    if plain:
        raise ValueError(f"{plain[0]} has a full-precision base; merge it with lora_edu.lora.merge_lora")
    for name, layer in layers.items():
        if layer.merged:
            raise ValueError(f"{name} is marked merged, which a 4-bit base cannot be")
        settings = _settings(layer.base_layer)
        linear = dequantize_layer(layer.base_layer, torch.float32)
        with torch.no_grad():
            linear.weight += layer.delta_weight().float()
        quantized = _quantize_linear(linear, **settings)
        model = _replace(model, name, quantized)
    return model


@torch.no_grad()
def output_change(before: nn.Module, after: nn.Module, idx: torch.Tensor) -> dict[str, float]:
    """How much two models' next-token predictions differ on ``idx`` (B, T).

    ``max_abs_logit``: the largest logit difference; ``kl``: mean KL(before || after) of the
    next-token distributions, in nats; ``top1_agreement``: the fraction of positions whose
    most likely next token is the same.
    """
    was = before.training, after.training
    before.eval(), after.eval()
    a, b = before(idx).float(), after(idx).float()
    before.train(was[0]), after.train(was[1])
    log_p, log_q = a.log_softmax(-1), b.log_softmax(-1)
    return {
        "max_abs_logit": (a - b).abs().max().item(),
        "kl": (log_p.exp() * (log_p - log_q)).sum(-1).mean().item(),
        "top1_agreement": (a.argmax(-1) == b.argmax(-1)).float().mean().item(),
    }


# ----------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------


def _input_embeddings(model: nn.Module) -> nn.Module:
    if hasattr(model, "get_input_embeddings"):  # Hugging Face models
        return model.get_input_embeddings()
    try:
        return model.transformer.wte  # our GPT-2
    except AttributeError:
        raise TypeError(
            f"cannot find the input embedding of a {type(model).__name__}; "
            "prepare_for_kbit_training knows lora_edu's GPT2 and Hugging Face models"
        ) from None


def _require_grad_hook(module: nn.Module, inputs, output: torch.Tensor) -> torch.Tensor:
    return output.requires_grad_(True)


def prepare_for_kbit_training(
    model: nn.Module, gradient_checkpointing: bool = True, use_reentrant: bool = True
) -> nn.Module:
    """Make a quantized model ready for adapters, as QLoRA (and PEFT) do. In place.

    - Freezes every parameter (the adapters, added next, are the only trainable ones).
    - Casts every parameter that is not 4-bit to float32: LayerNorms, embeddings and biases
      are few, and 16-bit norms are a known source of unstable training.
    - Turns on gradient checkpointing per transformer block. With ``use_reentrant=True``
      (PEFT's default) a checkpointed block only back-propagates if its input requires
      grad; the embedding is frozen, so its output is made to require grad.
    """
    if not quantized_layers(model):
        raise ValueError("model has no 4-bit layers; call quantize_model first")
    for p in model.parameters():
        p.requires_grad_(False)
        if p.dtype in (torch.float16, torch.bfloat16):
            p.data = p.data.float()
    if gradient_checkpointing:
        if not hasattr(model, "gradient_checkpointing_enable"):
            raise TypeError(f"a {type(model).__name__} has no gradient_checkpointing_enable(); pass gradient_checkpointing=False")
        if hasattr(model, "activation_checkpointing_enable"):  # Hugging Face 5.x's name; the old one is deprecated
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": use_reentrant})
        elif hasattr(model, "get_input_embeddings"):  # Hugging Face before the rename
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
        else:
            model.gradient_checkpointing_enable(use_reentrant=use_reentrant)
        if use_reentrant and not getattr(model, "_input_grad_hook", None):
            model._input_grad_hook = _input_embeddings(model).register_forward_hook(_require_grad_hook)
    return model


def make_optimizer(
    model: nn.Module, lr: float, weight_decay: float = 0.0, paged: bool | None = None
) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters: bitsandbytes' paged AdamW (32-bit states) if
    ``paged``, else ``torch.optim.AdamW``. ``paged=None`` pages exactly when the parameters
    live on a CUDA GPU.

    Paging moves optimizer states to CPU memory only when the GPU runs out (unified
    memory), so it costs nothing until it saves a crash; it needs CUDA.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("model has no trainable parameters; add_lora first")
    on_cuda = all(p.is_cuda for p in params)
    if paged is None:
        paged = on_cuda
    if paged and not on_cuda:
        raise ValueError(
            "paged=True needs the parameters on a CUDA GPU: bitsandbytes pages optimizer states "
            "between GPU and CPU memory. Here, use paged=False (torch.optim.AdamW), "
            "the fallback paged=None picks"
        )
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    groups = [g for g in groups if g["params"]]
    if paged:
        import bitsandbytes as bnb

        return bnb.optim.PagedAdamW32bit(groups, lr=lr)  # QLoRA's "paged_adamw_32bit"
    return torch.optim.AdamW(groups, lr=lr)


# ----------------------------------------------------------------------------------------
# Where the memory goes
# ----------------------------------------------------------------------------------------

METHODS = ("full", "lora", "qlora")


def memory_breakdown(model: nn.Module, method: str, r: int = QLORA_LORA["r"], dq_blocksize: int = 256) -> dict[str, int]:
    """Bytes of weights, LoRA parameters, gradients and Adam states to fine-tune ``model``.

    ``model`` is a plain model (its shapes are what count; a model on the ``meta`` device
    costs nothing to build). The recipes, as this book trains them:

    - ``"full"``: every parameter in float32, with a float32 gradient and two float32 Adam
      states: 16 bytes per parameter.
    - ``"lora"``: a bfloat16 base (2 bytes per parameter), float32 adapters of rank ``r`` on
      every linear layer but the output head, each with gradient and Adam states.
    - ``"qlora"``: the linear layers in NF4 with double quantization (4.127 bits), the
      other parameters in float32 (as :func:`prepare_for_kbit_training` leaves them),
      adapters as in ``"lora"``.

    Activations depend on batch, length and checkpointing: measure them with
    :func:`saved_activation_bytes`.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; expected one of {list(METHODS)}")
    linear = [m for name, m in model.named_modules() if type(m) is nn.Linear and not name.endswith("lm_head")]
    if not linear:
        raise ValueError("model has no nn.Linear layers besides the output head")
    n_total = sum(p.numel() for p in model.parameters())
    n_linear = sum(m.weight.numel() for m in linear)
    n_other = n_total - n_linear
    if method == "full":
        return {"weights": 4 * n_total, "lora": 0, "gradients": 4 * n_total, "optimizer": 8 * n_total}
    n_lora = sum(r * (m.in_features + m.out_features) for m in linear)
    if method == "lora":
        weights = 2 * n_total
    else:
        weights = round(n_linear * bits_per_parameter(64, True, dq_blocksize) / 8) + 4 * n_other
    return {"weights": weights, "lora": 4 * n_lora, "gradients": 4 * n_lora, "optimizer": 8 * n_lora}


# The shapes of Llama 1 (Touvron et al., 2023, Table 2; vocabulary 32,000): width, MLP
# width (SwiGLU), blocks. Attention is multi-head, so q, k, v and o are all d x d.
LLAMA_SHAPES: dict[str, tuple[int, int, int]] = {
    "7B": (4096, 11008, 32),
    "13B": (5120, 13824, 40),
    "33B": (6656, 17920, 60),
    "65B": (8192, 22016, 80),
}


class _LlamaBlock(nn.Module):
    def __init__(self, d: int, hidden: int):
        super().__init__()
        self.input_layernorm = nn.RMSNorm(d)
        self.self_attn = nn.Module()
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            setattr(self.self_attn, name, nn.Linear(d, d, bias=False))
        self.post_attention_layernorm = nn.RMSNorm(d)
        self.mlp = nn.Module()
        self.mlp.gate_proj = nn.Linear(d, hidden, bias=False)
        self.mlp.up_proj = nn.Linear(d, hidden, bias=False)
        self.mlp.down_proj = nn.Linear(hidden, d, bias=False)


def llama_skeleton(size: str, vocab_size: int = 32_000) -> nn.Module:
    """A Llama-style model's parameters on the ``meta`` device: shapes only, no memory.

    ``size`` is a key of :data:`LLAMA_SHAPES` ("7B", "13B", "33B", "65B"). The module
    names follow Hugging Face's ``LlamaForCausalLM`` (``model.layers.0.self_attn.q_proj``,
    ``mlp.gate_proj``, ...; linear layers without bias; RMSNorm weights; an untied
    ``lm_head``), so :func:`memory_breakdown` and ``add_lora`` see what they would see on
    the real model. It has no ``forward``: it is for counting, not for running.
    """
    if size not in LLAMA_SHAPES:
        raise ValueError(f"size must be one of {list(LLAMA_SHAPES)}, got {size!r}")
    if not isinstance(vocab_size, int) or vocab_size < 1:
        raise ValueError(f"vocab_size must be a positive int, got {vocab_size!r}")
    d, hidden, n_layer = LLAMA_SHAPES[size]
    with torch.device("meta"):
        skeleton = nn.Module()
        skeleton.model = nn.Module()
        skeleton.model.embed_tokens = nn.Embedding(vocab_size, d)
        skeleton.model.layers = nn.ModuleList(_LlamaBlock(d, hidden) for _ in range(n_layer))
        skeleton.model.norm = nn.RMSNorm(d)
        skeleton.lm_head = nn.Linear(d, vocab_size, bias=False)
    return skeleton


class _SavedToken:
    """What the autograd graph holds in place of a tensor while saved_activation_bytes measures."""

    __slots__ = ("__weakref__",)


def saved_activation_bytes(model: nn.Module, *inputs, **kwargs) -> int:
    """Bytes autograd keeps for the backward pass of ``model(*inputs, **kwargs)``, weights excluded.

    Measured, not estimated: every tensor saved for backward passes through a
    ``saved_tensors_hooks`` pair, and each distinct storage that the graph still holds
    when the forward pass ends is counted once. Tensors saved by a graph that was dropped
    on the way (a norm computed with gradients, then detached) are not counted: they
    were freed. Parameters and buffers (the weights) are left out, since they are in
    memory anyway. Runs the forward pass in training mode (so checkpointing is on if
    enabled) and discards it. Pass the targets too (``saved_activation_bytes(model, x, y)``,
    or ``labels=`` for a Hugging Face model): the loss keeps the log-probabilities, often
    the largest tensor.
    """
    weights = {t.untyped_storage()._cdata for t in (*model.parameters(), *model.buffers())}
    storages: dict[int, torch.UntypedStorage] = {}  # held here, so no address is reused while we count
    held: list[tuple[weakref.ref, int]] = []  # (the graph's token, its storage): alive while the graph is

    def pack(t: torch.Tensor) -> _SavedToken:
        # Give the graph a token, never t itself: returning t would tie an output to its own
        # grad_fn, a reference cycle through C++ that Python's garbage collector cannot break
        # (the model's parameters would leak). The graph is discarded unused, never unpacked.
        token = _SavedToken()
        storage = t.untyped_storage()
        if storage._cdata not in weights:
            storages[storage._cdata] = storage
            held.append((weakref.ref(token), storage._cdata))
        return token

    def unpack(_) -> torch.Tensor:
        raise RuntimeError("saved_activation_bytes measures a forward pass; its graph cannot run backward")

    was_training = model.training
    model.train()
    with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        out = model(*inputs, **kwargs)
    model.train(was_training)
    alive = {key for token, key in held if token() is not None}
    del out
    return sum(storages[key].nbytes() for key in alive)
