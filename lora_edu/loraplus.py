"""LoRA+: train B faster than A, eta_B = ratio * eta_A (Hayou, Ghosh and Yu, 2024).

``loraplus_param_groups`` sorts a LoRA model's trainable parameters into optimizer
groups; ``create_loraplus_optimizer`` builds any torch optimizer from them. Weight
decay goes exactly where you ask for it: every group that holds matrices gets it, and
biases and norms never do.

Against PEFT's ``create_loraplus_optimizer`` (and the LoRA+ reference code it comes
from): A, B and any other trainable matrix get the same rates and decay. Trainable
vectors (biases, norms) differ on purpose: PEFT puts every 1-D parameter in B's group,
at ratio * lr; here they stay at lr (see :func:`loraplus_param_groups`).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from lora_edu.lora import lora_layers
from lora_edu.plumbing import check_int

__all__ = ["create_loraplus_optimizer", "loraplus_param_groups", "toy_lora_losses"]


def _check_positive(name: str, value, allow_zero: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < 0 or (value == 0 and not allow_zero):
        expected = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name} must be a finite number {expected}, got {value!r}")


def loraplus_param_groups(
    model: nn.Module,
    lr: float,
    ratio: float,
    weight_decay: float = 0.0,
    embedding_lr: float = 1e-6,
) -> list[dict]:
    """Optimizer parameter groups for LoRA+; each group is named under ``"name"``.

    - ``lora_A``: every A matrix, at ``lr``, with ``weight_decay``;
    - ``lora_B``: every B matrix, at ``ratio * lr`` (eta_B = lambda eta_A), with ``weight_decay``;
    - ``other``: any other trainable matrix, an unfrozen ``nn.Embedding`` included, at
      ``lr``, with ``weight_decay``;
    - ``no_decay``: trainable vectors (biases, LayerNorms), at ``lr``, without decay.

    ``ratio`` has no default: the LoRA+ authors suggest 2 to 2^4 for their models, but the
    right value depends on the model and the task. It must be >= 1 (B learns faster).

    ``embedding_lr`` means what PEFT's ``loraplus_lr_embedding`` means: the rate of the
    LoRA factors of a LoRA-*wrapped* embedding. lora_edu wraps only linear layers, so here
    it applies to no parameter; it is accepted (and checked) so that calls written for
    PEFT run unchanged. An embedding you unfreeze yourself is not LoRA and trains at ``lr``
    in ``other``, as in PEFT, not at the tiny ``embedding_lr``.

    Biases and norms: PEFT (and the LoRA+ reference code) put every trainable 1-D
    parameter in B's group, at ``ratio * lr``. We keep them at ``lr``: the LoRA+ argument
    is about the two factors of the product B A (B reads A's r features and starts at
    zero, so it needs the larger steps); a bias or a norm gain is no factor of a product,
    and the paper's analysis gives no reason to train it ``ratio`` times faster than the
    rest of the model (16 times, at the authors' default). With trainable biases or norms
    our steps on them are therefore ``ratio`` times smaller than PEFT's.
    """
    _check_positive("lr", lr)
    _check_positive("ratio", ratio)
    if ratio < 1:
        raise ValueError(f"ratio must be >= 1 (B learns at ratio * lr, at least as fast as A), got {ratio!r}")
    _check_positive("weight_decay", weight_decay, allow_zero=True)
    _check_positive("embedding_lr", embedding_lr)  # no LoRA-wrapped embeddings here: checked, unused
    layers = lora_layers(model)
    if not layers:
        raise ValueError("model has no LoRA layers; call lora_edu.lora.add_lora first")

    a_params = {id(layer.lora_A.weight) for layer in layers.values()}
    b_params = {id(layer.lora_B.weight) for layer in layers.values()}
    groups = {
        "lora_A": {"params": [], "lr": lr, "weight_decay": weight_decay},
        "lora_B": {"params": [], "lr": ratio * lr, "weight_decay": weight_decay},
        "other": {"params": [], "lr": lr, "weight_decay": weight_decay},
        "no_decay": {"params": [], "lr": lr, "weight_decay": 0.0},
    }
    for p in model.parameters():
        if not p.requires_grad:
            continue
        if id(p) in a_params:
            name = "lora_A"
        elif id(p) in b_params:
            name = "lora_B"
        elif p.dim() >= 2:
            name = "other"
        else:
            name = "no_decay"
        groups[name]["params"].append(p)
    if not groups["lora_A"]["params"] and not groups["lora_B"]["params"]:  # one frozen is a choice (LoRA-FA freezes A)
        raise ValueError("no LoRA parameter is trainable; call mark_only_lora_trainable(model)")
    return [{"name": name, **group} for name, group in groups.items() if group["params"]]


def create_loraplus_optimizer(
    model: nn.Module,
    optimizer_cls: type[torch.optim.Optimizer],
    lr: float,
    ratio: float,
    weight_decay: float = 0.0,
    embedding_lr: float = 1e-6,
    **kwargs,
) -> torch.optim.Optimizer:
    """``optimizer_cls`` (AdamW, say) over :func:`loraplus_param_groups`; ``kwargs`` go to it.

    ``embedding_lr`` is PEFT's ``loraplus_lr_embedding``, for LoRA-wrapped embeddings
    (none in lora_edu); see :func:`loraplus_param_groups`.
    """
    if "params" in kwargs:
        raise TypeError("create_loraplus_optimizer builds the parameter groups itself; do not pass params")
    groups = loraplus_param_groups(model, lr, ratio, weight_decay, embedding_lr)
    optimizer = optimizer_cls(groups, lr=lr, **kwargs)
    # An optimizer without weight decay (Rprop, say) ignores the groups' "weight_decay" without a word.
    if weight_decay > 0 and "weight_decay" not in optimizer.defaults:
        raise ValueError(
            f"{optimizer_cls.__name__} has no weight decay, so weight_decay={weight_decay!r} would be silently "
            "ignored; pass weight_decay=0 or use an optimizer that decays (AdamW)"
        )
    return optimizer


def toy_lora_losses(
    n: int,
    lrs_a: list[float],
    lrs_b: list[float],
    steps: int = 50,
    batch_size: int = 8,
    seed: int = 0,
) -> torch.Tensor:
    """Chapter 3's toy LoRA trained by Adam at every (eta_A, eta_B): the final losses, shape (len(lrs_a), len(lrs_b)).

    The model is f(x) = b (a . x), a in R^n started at N(0, 1/n) entries and b at zero (the
    rank-1, one-output LoRA of the LoRA+ paper's Section 3). The target is t . x with
    t = (a0 + u) / sqrt(2), u an independent N(0, 1/n) vector: half of the feature to learn
    is new, so A has to move. Each step draws ``batch_size`` fresh inputs x ~ N(0, I_n) and
    takes one Adam step (PyTorch's defaults: betas 0.9, 0.999, eps 1e-8) on
    0.5 (f(x) - t . x)^2, averaged over the batch, every pair of rates at once. The loss
    returned is the expected one over fresh inputs, 0.5 |b a - t|^2; a run that diverged
    gives inf. Every pair sees the same inputs (the same ``seed``). float64 throughout.
    """
    for name, value in (("n", n), ("steps", steps), ("batch_size", batch_size)):
        check_int(value, name)
    for name, rates in (("lrs_a", lrs_a), ("lrs_b", lrs_b)):
        if len(rates) == 0:
            raise ValueError(f"{name} must be a non-empty list of learning rates, got {rates!r}")
        for value in rates:
            _check_positive(name, value)
    g = torch.Generator().manual_seed(seed)
    a0 = torch.randn(n, generator=g, dtype=torch.float64) / math.sqrt(n)
    u = torch.randn(n, generator=g, dtype=torch.float64) / math.sqrt(n)
    target = (a0 + u) / math.sqrt(2)
    lr_a = torch.tensor(lrs_a, dtype=torch.float64).repeat_interleave(len(lrs_b))[:, None]  # (P, 1)
    lr_b = torch.tensor(lrs_b, dtype=torch.float64).repeat(len(lrs_a))  # (P,)
    a = a0.repeat(len(lr_b), 1)  # (P, n): one toy per pair of rates
    b = torch.zeros(len(lr_b), dtype=torch.float64)
    moments = [[torch.zeros_like(a), torch.zeros_like(a)], [torch.zeros_like(b), torch.zeros_like(b)]]
    beta1, beta2, eps = 0.9, 0.999, 1e-8
    for step in range(1, steps + 1):
        x = torch.randn(batch_size, n, generator=g, dtype=torch.float64)  # (batch, n)
        z = a @ x.T  # (P, batch): the feature
        residual = b[:, None] * z - x @ target  # (P, batch)
        grad_b = (residual * z).mean(1)
        grad_a = (residual * b[:, None]) @ x / batch_size  # (P, n); zero while b is zero
        for param, grad, (m, v), lr in ((a, grad_a, moments[0], lr_a), (b, grad_b, moments[1], lr_b)):
            m.mul_(beta1).add_(grad, alpha=1 - beta1)
            v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
            m_hat, v_hat = m / (1 - beta1**step), v / (1 - beta2**step)
            param.sub_(lr * m_hat / (v_hat.sqrt() + eps))
    loss = 0.5 * ((b[:, None] * a - target) ** 2).sum(1)
    loss = torch.where(torch.isfinite(loss), loss, torch.full_like(loss, math.inf))
    return loss.view(len(lrs_a), len(lrs_b))
