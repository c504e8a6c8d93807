"""The LoRA layer: a frozen linear layer plus a trainable low-rank bypass, h = W0 x + (alpha / r) B A x.

Hu et al. (2021) keep the pretrained weight W0 (out x in) frozen and learn its update as
the product of two thin matrices, B (out x r) and A (r x in), so a layer trains
r (in + out) numbers instead of in x out. B starts at zero: a fresh layer computes what
its base layer does, and training moves it away from there. After training, B A folds
into W0 (:meth:`LoRALinear.merge`) and the layer costs what the base layer costs.

Chapter 2 builds this layer inline and then uses this one. :mod:`lora_edu.lora` puts it
into a model, :mod:`lora_edu.dora` builds DoRA on it, and :mod:`lora_edu.peft_format`
saves it as PEFT does.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from lora_edu.nf4 import NF4Linear
from lora_edu.plumbing import check_int

__all__ = ["LoRALinear", "check_not_quantized", "is_conv1d", "is_linear", "is_quantized", "lora_scaling"]


class LoRALinear(nn.Module):
    """``base(x) + scaling * B(A(dropout(x)))`` with ``base`` frozen.

    A (r x in) starts Kaiming-uniform and B (out x r) at zero, so a fresh layer computes
    exactly what ``base`` does. ``scaling`` is alpha / r, or alpha / sqrt(r) with
    ``use_rslora``. ``fan_in_fan_out`` says the base weight is stored (in, out), as in
    GPT-2's Conv1D. ``merge()`` folds B A into the base weight for zero extra latency;
    ``unmerge()`` takes it out again. Neither happens implicitly.
    """

    def __init__(self, base_layer: nn.Module, r: int, alpha: float, dropout: float = 0.0,
                 fan_in_fan_out: bool = False, use_rslora: bool = False):
        super().__init__()
        out_features, in_features, device, dtype = _shape_of(base_layer, fan_in_fan_out)
        check_int(r, "r")
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 < alpha < math.inf:
            raise ValueError(f"alpha must be a finite number > 0, got {alpha!r}")
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        self.base_layer = base_layer
        self.r, self.alpha, self.use_rslora = r, alpha, use_rslora
        self.fan_in_fan_out = fan_in_fan_out
        self.in_features, self.out_features = in_features, out_features
        self.scaling = lora_scaling(alpha, r, use_rslora)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        kw = dict(bias=False, device=device, dtype=dtype)
        self.lora_A = nn.Linear(in_features, r, **kw)
        self.lora_B = nn.Linear(r, out_features, **kw)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))  # nn.Linear's own init, as in PEFT
        nn.init.zeros_(self.lora_B.weight)  # B = 0: the layer starts as the base layer
        for p in base_layer.parameters():
            p.requires_grad_(False)
        self.merged = False
        # Born in the mode of the layer it wraps: a LoRA layer added to a model in eval() must
        # not apply dropout (PEFT's from_pretrained also returns a model in eval mode).
        self.train(base_layer.training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        if self.merged:
            return out
        # The bypass runs in A's dtype (float32 beside a 4-bit base); the sum in the base's.
        x = x.to(self.lora_A.weight.dtype)
        return out + (self.lora_B(self.lora_A(self.lora_dropout(x))) * self.scaling).to(out.dtype)

    def delta_weight(self) -> torch.Tensor:
        """scaling * B A, laid out like the base weight ((in, out) with fan_in_fan_out)."""
        delta = (self.lora_B.weight @ self.lora_A.weight) * self.scaling
        return delta.T if self.fan_in_fan_out else delta

    def merged_weight(self) -> torch.Tensor:
        """The weight :meth:`merge` writes, laid out like the base weight: W0 + scaling * B A."""
        return self.base_layer.weight + self.delta_weight()

    @torch.no_grad()
    def merge(self) -> None:
        """W0 <- W0 + scaling * B A. Afterwards the layer costs what the base layer costs."""
        if self.merged:
            raise RuntimeError("this LoRA layer is already merged; merging twice would add B A twice")
        check_not_quantized(self)
        merged = self.merged_weight()
        if not torch.isfinite(merged).all():
            raise ValueError("merging would make the base weight non-finite (inf or nan); the adapter is broken")
        self.base_layer.weight.copy_(merged)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """W0 <- W0 - scaling * B A: undo :meth:`merge` (exact up to float rounding)."""
        if not self.merged:
            raise RuntimeError("this LoRA layer is not merged; there is nothing to unmerge")
        self.base_layer.weight.sub_(self.delta_weight())
        self.merged = False

    @property
    def dropout(self) -> float:
        return self.lora_dropout.p if isinstance(self.lora_dropout, nn.Dropout) else 0.0

    def extra_repr(self) -> str:
        return (
            f"in={self.in_features}, out={self.out_features}, r={self.r}, alpha={self.alpha}, "
            f"scaling={self.scaling:.4g}, merged={self.merged}"
        )


def lora_scaling(alpha: float, r: int, use_rslora: bool = False) -> float:
    """What B A is multiplied by: alpha / r, or rsLoRA's alpha / sqrt(r) (Kalajdzievski, 2023)."""
    return alpha / math.sqrt(r) if use_rslora else alpha / r


def is_conv1d(module: nn.Module) -> bool:
    """Hugging Face's GPT-2 Conv1D: a linear layer whose weight is stored (in, out)."""
    return type(module).__name__ == "Conv1D" and getattr(module, "weight", None) is not None


def is_linear(module: nn.Module) -> bool:
    """A layer LoRA can wrap: nn.Linear, GPT-2's Conv1D or a 4-bit linear layer."""
    # bitsandbytes' Linear4bit is an nn.Linear too; NF4Linear is our 4-bit layer (Chapter 4).
    return isinstance(module, (nn.Linear, NF4Linear)) or is_conv1d(module)


def is_quantized(module: nn.Module) -> bool:
    """A 4-bit linear layer: our NF4Linear or bitsandbytes' Linear4bit (QLoRA's frozen base)."""
    return isinstance(module, NF4Linear) or type(module).__name__ == "Linear4bit"


def check_not_quantized(layer: LoRALinear, name: str = "this LoRA layer") -> None:
    """Refuse to merge into a 4-bit base (``TypeError`` naming ``name``): its weight is packed codes."""
    if is_quantized(layer.base_layer):
        raise TypeError(
            f"{name} has a 4-bit base ({type(layer.base_layer).__name__}): adding B A to packed 4-bit "
            "codes is meaningless. Use lora_edu.qlora.merge_and_dequantize (exact) or "
            "lora_edu.qlora.merge_and_requantize (4 bits again, outputs change)"
        )


def _shape_of(base_layer: nn.Module, fan_in_fan_out: bool) -> tuple[int, int, torch.device, torch.dtype]:
    """(out, in, device, dtype) for A and B beside ``base_layer``, once it is known to be one LoRA can wrap."""
    if not is_linear(base_layer):
        raise TypeError(f"base_layer must be nn.Linear, a GPT-2 Conv1D or a 4-bit linear layer, got "
                        f"{type(base_layer).__name__}")
    if is_conv1d(base_layer) and not fan_in_fan_out:
        raise ValueError("base_layer is a Conv1D, whose weight is (in, out): pass fan_in_fan_out=True")
    if not is_conv1d(base_layer) and fan_in_fan_out:
        kind = "an nn.Linear" if type(base_layer) is nn.Linear else f"a {type(base_layer).__name__}"
        raise ValueError(f"base_layer is {kind}, whose weight is (out, in): pass fan_in_fan_out=False")
    if is_quantized(base_layer):
        # A 4-bit weight is packed bytes: its shape is not (out, in) and its dtype is not a
        # float. A and B get their own float32 weights, as in QLoRA.
        packed = base_layer.weight_packed if isinstance(base_layer, NF4Linear) else base_layer.weight
        return base_layer.out_features, base_layer.in_features, packed.device, torch.float32
    weight = base_layer.weight
    if not weight.is_floating_point():  # nn.Linear(dtype=int) would fail deep in PyTorch
        raise TypeError(
            f"base_layer's weight must be floating-point (A and B take its dtype and are trained), "
            f"got {weight.dtype}; for a 4-bit base use NF4Linear or bitsandbytes' Linear4bit"
        )
    out_features, in_features = weight.shape[::-1] if fan_in_fan_out else weight.shape
    return out_features, in_features, weight.device, weight.dtype
