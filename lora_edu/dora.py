"""DoRA: weight-decomposed low-rank adaptation (Liu et al., 2024), on top of LoRA.

DoRA splits each weight into a magnitude and a direction,

    W' = m * (W0 + s B A) / ||W0 + s B A||,

trains the magnitude ``m`` directly and the direction through a LoRA update ``s B A``.
The norm is taken per **output row** of the weight, laid out (out, in) as in
``nn.Linear``: one magnitude per output feature, shape (out,). The paper writes its
weights (in, out) and calls the same thing the "column-wise norm"; PEFT and the
authors' code take ``torch.linalg.norm(W, dim=1)`` of the (out, in) weight, as we do.
GPT-2's Conv1D stores its weight (in, out), so it is transposed first.

``m`` starts at ``||W0||`` row by row and ``B`` at zero, so a fresh layer computes exactly
what its base does. Following the paper's Section 4.3, the norm is treated as a
constant in the backward pass (detached): the gradient reaches the direction only
through ``B A``, and the magnitude only through ``m``.

With dropout on the adapter's input, the layer computes what PEFT's ``use_dora=True``
computes: with ``x_d = dropout(x)`` and the bias ``b`` not rescaled,

    y = b + W0 (x - x_d) + (m / n) * (W0 + s B A) x_d,   n = ||W0 + s B A|| row by row.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from lora_edu.lora_layer import LoRALinear, is_conv1d, is_quantized
from lora_edu.nf4 import NF4Linear

__all__ = ["DoRALinear", "adapted_weight", "weight_decomposition"]


class DoRALinear(LoRALinear):
    """``LoRALinear`` with a trained magnitude per output row: ``m * (W0 + s B A) / ||W0 + s B A||``.

    Takes what :class:`~lora_edu.lora_layer.LoRALinear` takes (A, B, scaling, rsLoRA, dropout,
    ``fan_in_fan_out`` for GPT-2's Conv1D, a 4-bit base). ``magnitude`` has shape (out,).
    """

    def __init__(self, base_layer: nn.Module, r: int, alpha: float, dropout: float = 0.0,
                 fan_in_fan_out: bool = False, use_rslora: bool = False):
        super().__init__(base_layer, r, alpha, dropout, fan_in_fan_out, use_rslora)
        with torch.no_grad():
            norm = self.weight_norm()
        self.magnitude = nn.Parameter(norm.to(self.lora_A.weight.dtype))  # ||W0||: starts as the base layer
        self._merged_norm: torch.Tensor | None = None

    def base_weight(self) -> torch.Tensor:
        """W0 as (out, in), dequantized if the base is 4-bit, in the adapter's dtype."""
        base = self.base_layer
        if isinstance(base, NF4Linear):
            weight = base.dequantized_weight()
        elif is_quantized(base):  # bitsandbytes' Linear4bit
            import bitsandbytes.functional as bnb_functional

            weight = bnb_functional.dequantize_4bit(base.weight.data, base.weight.quant_state)
        else:
            weight = base.weight
        weight = weight.T if self.fan_in_fan_out else weight
        return weight.to(self.lora_A.weight.dtype)

    def weight_norm(self) -> torch.Tensor:
        """||W0 + s B A|| per output row, shape (out,)."""
        update = (self.lora_B.weight @ self.lora_A.weight) * self.scaling
        return torch.linalg.norm(self.base_weight() + update, dim=1)

    def rescaled_weight(self) -> tuple[torch.Tensor, torch.Tensor]:
        """W' = (m / n) * (W0 + s B A) as (out, in), and n, the row norms it divided by."""
        weight = self.base_weight() + (self.lora_B.weight @ self.lora_A.weight) * self.scaling
        norm = torch.linalg.norm(weight, dim=1)
        return (self.magnitude / norm)[:, None] * weight, norm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        if self.merged:
            return out
        x = x.to(self.lora_A.weight.dtype)
        with torch.no_grad():  # the norm is a constant (Section 4.3): no graph, nothing kept for backward
            norm = self.weight_norm()
        factor = self.magnitude / norm
        dropped = self.lora_dropout(x)
        lora = self.lora_B(self.lora_A(dropped)) * self.scaling
        if dropped is x or not self.training:  # no dropout: W0 x is the base output less its bias
            bias = self.base_layer.bias
            base = out.to(x.dtype) - (bias.to(x.dtype) if bias is not None else 0)
        else:
            base = F.linear(dropped, self.base_weight())  # W0 x_d, on the same dropout mask
        return out + ((factor - 1) * base + factor * lora).to(out.dtype)

    def merged_weight(self) -> torch.Tensor:
        """The weight :meth:`merge` writes, laid out like the base weight: (m / n) * (W0 + s B A)."""
        merged, _ = self.rescaled_weight()
        return (merged.T if self.fan_in_fan_out else merged).to(self.base_layer.weight.dtype)

    @torch.no_grad()
    def merge(self) -> None:
        """W0 <- (m / n) * (W0 + s B A), row by row; n is kept so that :meth:`unmerge` is exact."""
        if self.merged:
            raise RuntimeError("this DoRA layer is already merged; merging twice would rescale twice")
        if is_quantized(self.base_layer):
            raise TypeError("this DoRA layer has a 4-bit base; merge into a dequantized copy instead")
        merged, norm = self.rescaled_weight()
        if not torch.isfinite(merged).all():
            raise ValueError("merging would make the base weight non-finite (inf or nan); the adapter is broken")
        weight = self.base_layer.weight
        weight.copy_((merged.T if self.fan_in_fan_out else merged).to(weight.dtype))
        self._merged_norm = norm
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """W0 <- W' / (m / n) - s B A: undo :meth:`merge` with the norm it used."""
        if not self.merged:
            raise RuntimeError("this DoRA layer is not merged; there is nothing to unmerge")
        factor = (self.magnitude / self._merged_norm)[:, None]
        weight = self.base_layer.weight
        current = weight.T if self.fan_in_fan_out else weight
        restored = current.to(factor.dtype) / factor - (self.lora_B.weight @ self.lora_A.weight) * self.scaling
        weight.copy_((restored.T if self.fan_in_fan_out else restored).to(weight.dtype))
        self._merged_norm = None
        self.merged = False


@torch.no_grad()
def adapted_weight(layer: nn.Module) -> torch.Tensor:
    """The weight a layer computes with, (out, in), float32: what merging would store.

    A plain ``nn.Linear``: its weight. A LoRA layer: W0 + s B A. A DoRA layer:
    m * (W0 + s B A) / ||W0 + s B A||, row by row.
    """
    if isinstance(layer, DoRALinear):
        if layer.merged:
            return adapted_weight(layer.base_layer)
        return layer.rescaled_weight()[0].float()
    if isinstance(layer, LoRALinear):
        if layer.merged:
            return adapted_weight(layer.base_layer)
        delta = layer.delta_weight()
        delta = delta.T if layer.fan_in_fan_out else delta
        return (adapted_weight(layer.base_layer) + delta).float()
    if isinstance(layer, nn.Linear):
        return layer.weight.detach().float()
    if is_conv1d(layer):  # GPT-2's, stored (in, out)
        return layer.weight.detach().T.float()
    raise TypeError(f"layer must be nn.Linear, a GPT-2 Conv1D, a LoRALinear or a DoRALinear, "
                    f"got {type(layer).__name__}")


def weight_decomposition(w0: torch.Tensor, w: torch.Tensor) -> tuple[float, float]:
    """The DoRA paper's ΔM and ΔD between a pretrained weight ``w0`` and a fine-tuned ``w``.

    Both (out, in). Magnitude and direction are taken per output row (the paper's
    Equations 3-4, written for its (in, out) layout as per column): ΔM is the mean absolute
    change of the row norms, ΔD the mean of 1 - cosine similarity between corresponding rows.
    """
    for name, t in (("w0", w0), ("w", w)):
        if not isinstance(t, torch.Tensor) or t.dim() != 2 or not t.is_floating_point():
            raise ValueError(f"{name} must be a 2-D floating-point tensor (out, in), got {getattr(t, 'shape', t)!r}")
    if w0.shape != w.shape:
        raise ValueError(f"w0 and w must have the same shape, got {tuple(w0.shape)} and {tuple(w.shape)}")
    w0, w = w0.double(), w.double()
    delta_m = (torch.linalg.norm(w, dim=1) - torch.linalg.norm(w0, dim=1)).abs().mean()
    delta_d = (1 - F.cosine_similarity(w, w0, dim=1)).mean()
    return delta_m.item(), delta_d.item()
