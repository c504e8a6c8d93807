"""Serial bottleneck adapters (Houlsby et al., 2019): the method LoRA is measured against.

An adapter is a small two-layer network inserted *after* a sublayer of the frozen model:
``y + up(gelu(down(y)))``, with ``down`` mapping the width d to a bottleneck b and ``up``
back to d. ``up`` starts at zero, so a fresh adapter is the identity, as LoRA's B = 0
makes a fresh LoRA layer the base model. Unlike LoRA, an adapter sits in series with the
model: it cannot be merged into a weight, and every forward pass waits for it. That is
the latency the LoRA paper's Table 1 measures.

Houlsby et al. put one adapter after the attention and one after the MLP of every block
(the LoRA paper's Adapter^H); Lin et al. (2020) one after the MLP only (Adapter^L).
"""

from __future__ import annotations

import torch.nn as nn
import torch.nn.functional as F

__all__ = ["SerialAdapter", "add_serial_adapters", "adapter_parameters"]

SUBLAYERS = ("attn", "mlp")


class SerialAdapter(nn.Module):
    """``sublayer`` followed by a bottleneck adapter: y + up(gelu(down(y))), y = sublayer(x)."""

    def __init__(self, sublayer: nn.Module, d: int, bottleneck: int):
        super().__init__()
        for name, value in (("d", d), ("bottleneck", bottleneck)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        self.sublayer, self.down, self.up = sublayer, nn.Linear(d, bottleneck), nn.Linear(bottleneck, d)
        nn.init.zeros_(self.up.weight), nn.init.zeros_(self.up.bias)  # starts as the identity, like B = 0

    def forward(self, x):
        y = self.sublayer(x)
        return y + self.up(F.gelu(self.down(y)))


def add_serial_adapters(model: nn.Module, bottleneck: int, sublayers: tuple[str, ...] = SUBLAYERS) -> nn.Module:
    """Wrap the named sublayers of every block of a lora_edu GPT2 in adapters (in place).

    ``sublayers=("attn", "mlp")`` is Houlsby's placement (Adapter^H), ``("mlp",)`` Lin et
    al.'s (Adapter^L, without its extra LayerNorm). Only the adapters are left trainable.
    """
    from lora_edu.peft_family import _blocks, _refuse_other_methods  # the family's checks, shared

    blocks = _blocks(model)
    if isinstance(bottleneck, bool) or not isinstance(bottleneck, int) or bottleneck <= 0:
        raise ValueError(f"bottleneck must be a positive int, got {bottleneck!r}")
    if isinstance(sublayers, str) or not sublayers or any(name not in SUBLAYERS for name in sublayers):
        raise ValueError(f"sublayers must be a non-empty list of names from {SUBLAYERS}, got {sublayers!r}")
    if len(set(sublayers)) != len(sublayers):
        raise ValueError(f"sublayers names a sublayer twice: {sublayers!r}; name each once")
    _refuse_other_methods(model, "serial adapters")
    width = model.config.n_embd
    adapters = {}
    for i, block in enumerate(blocks):  # every adapter built before any is put in
        for name in sublayers:
            sublayer = getattr(block, name)
            param = next(sublayer.parameters())
            adapters[i, name] = SerialAdapter(sublayer, width, bottleneck).to(param.device, param.dtype)
    for p in model.parameters():
        p.requires_grad_(False)
    for (i, name), adapter in adapters.items():
        setattr(blocks[i], name, adapter)
    return model


def adapter_parameters(model: nn.Module) -> int:
    """How many parameters the serial adapters in ``model`` hold."""
    return sum(
        p.numel() for m in model.modules() if isinstance(m, SerialAdapter) for p in (*m.down.parameters(), *m.up.parameters())
    )
