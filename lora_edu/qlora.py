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

Where the bytes go, computed and measured, is :mod:`lora_edu.memory`.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from lora_edu.lora import lora_layers, merge_lora, name_matches
from lora_edu.lora_layer import is_conv1d, is_quantized
from lora_edu.nf4 import NF4Linear, check_blocksize, check_compute_dtype, check_weight, dequantize_nf4
from lora_edu.plumbing import replace_module
from lora_edu.train import weight_decay_groups

__all__ = [
    "BACKENDS",
    "QLORA_LORA",
    "compute_dtype_for",
    "dequantize_layer",
    "dequantize_model",
    "make_optimizer",
    "merge_and_dequantize",
    "merge_and_requantize",
    "output_change",
    "prepare_for_kbit_training",
    "quantize_model",
    "quantized_layers",
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
    conv1d = [name for name, m in model.named_modules() if is_conv1d(m)]
    if conv1d:
        raise TypeError(
            f"model has Hugging Face Conv1D layers ({conv1d[0]!r}, ...), whose weight is (in, out); "
            "load GPT-2 with lora_edu.gpt2.load_pretrained (nn.Linear throughout) before quantizing"
        )
    chosen = [
        name for name, m in model.named_modules()
        if type(m) is nn.Linear and not any(name_matches(name, e) for e in exclude)
    ]
    if not chosen:
        raise ValueError(f"model has no nn.Linear layers to quantize (excluding {list(exclude)})")
    check_blocksize(blocksize)
    if not isinstance(double_quant, bool):
        raise TypeError(f"double_quant must be True or False, got {double_quant!r}")
    # Check every weight, then quantize every layer, then replace them: a refusal leaves the
    # model as it was. bitsandbytes takes NaN and inf without a word, and double quantization
    # then spreads them to the whole tensor: both backends refuse them here.
    for name in chosen:
        try:
            check_weight(model.get_submodule(name).weight, f"{name}.weight")
        except (TypeError, ValueError) as err:
            raise type(err)(f"{err}; nothing was quantized, the model was left unchanged") from None
    quantized = {
        name: _quantize_linear(model.get_submodule(name), backend, blocksize, double_quant, compute_dtype)
        for name in chosen
    }
    for name, layer in quantized.items():
        replace_module(model, name, layer)
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


def dequantize_model(model: nn.Module, dtype: torch.dtype = torch.float32) -> nn.Module:
    """Replace every 4-bit layer by its dequantized ``nn.Linear``, in place (LoRA layers stay)."""
    layers = quantized_layers(model)
    if not layers:
        raise ValueError("model has no 4-bit layers to dequantize")
    for name, layer in layers.items():
        model = _swapped(model, name, dequantize_layer(layer, dtype))
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
        model = _swapped(model, name, quantized)
    return model


def _swapped(model: nn.Module, name: str, new: nn.Module) -> nn.Module:
    """``model`` with its submodule ``name`` replaced by ``new``; ``new`` itself where ``model`` is that layer."""
    if not name:
        return new
    replace_module(model, name, new)
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
            raise TypeError(f"a {type(model).__name__} has no gradient_checkpointing_enable(); "
                            "pass gradient_checkpointing=False")
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
    groups = weight_decay_groups(model, weight_decay)  # as train's AdamW: matrices decay, vectors do not
    if paged:
        import bitsandbytes as bnb

        return bnb.optim.PagedAdamW32bit(groups, lr=lr)  # QLoRA's "paged_adamw_32bit"
    return torch.optim.AdamW(groups, lr=lr)
