"""One small training loop shared by every chapter.

AdamW (or an optimizer you build, for LoRA+'s parameter groups), gradient clipping,
a held-out evaluation every ``eval_every`` steps, a tqdm progress bar, and a
returned :class:`History` to plot.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn
from tqdm import tqdm  # the text bar: it works in a terminal, Jupyter and Colab alike

from lora_edu.data import get_batch
from lora_edu.plumbing import check_int

__all__ = [
    "MILTON_FINE_TUNE",
    "History",
    "TrainConfig",
    "default_device",
    "evaluate",
    "make_adamw",
    "seed_everything",
    "symmetric_kl",
    "train",
    "training_loss",
    "weight_decay_groups",
]


def default_device() -> str:
    """``"cuda"`` when a GPU is visible, else ``"cpu"``: every notebook's device choice."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and PyTorch's random generators."""
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@dataclass
class TrainConfig:
    steps: int = 200
    batch_size: int = 32
    block_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.1
    grad_clip: float | None = 1.0
    warmup_steps: int = 0
    min_lr_ratio: float = 1.0  # < 1 decays the learning rate on a cosine to lr * min_lr_ratio
    eval_every: int = 50
    eval_batches: int | None = 8  # None evaluates on the whole held-out set
    seed: int = 0
    # Mixed precision: run the forward pass under torch.autocast in this dtype (bfloat16, or
    # float16 on GPUs without bf16, which also scales the loss so small gradients survive).
    amp_dtype: torch.dtype | None = None
    # > 0: every step runs a second forward pass and adds this weight times the symmetric KL
    # between the two passes' predictions (AdaMix's consistency loss: the passes take different
    # random routes, as R-Drop's take different dropout masks). Each step then costs two passes.
    consistency_weight: float = 0.0

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "block_size", "eval_every"):
            check_int(getattr(self, name), name)
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr!r}")
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise ValueError(f"grad_clip must be None or > 0, got {self.grad_clip!r}")
        if not 0 < self.min_lr_ratio <= 1:
            raise ValueError(f"min_lr_ratio must be in (0, 1], got {self.min_lr_ratio!r}")
        weight = self.consistency_weight
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not 0 <= weight < math.inf:
            raise ValueError(f"consistency_weight must be a finite number >= 0 (0 turns the second pass off), "
                             f"got {weight!r}")
        if self.amp_dtype not in (None, torch.bfloat16, torch.float16):
            raise ValueError(f"amp_dtype must be None, torch.bfloat16 or torch.float16, got {self.amp_dtype!r}")

    def lr_at(self, step: int) -> float:
        """Linear warm-up, then a cosine from ``lr`` down to ``lr * min_lr_ratio``."""
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        progress = (step - self.warmup_steps) / max(1, self.steps - self.warmup_steps)
        cosine = 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
        return self.lr * (self.min_lr_ratio + (1 - self.min_lr_ratio) * cosine)


# The book's domain adaptation: the tiny GPT-2 on Milton, 200 steps of 16 x 128 bytes.
# Chapters 1-3 and the benchmarks start from it (LoRA with its own, larger lr).
MILTON_FINE_TUNE = TrainConfig(
    steps=200, batch_size=16, block_size=128, lr=3e-4, weight_decay=0.0,
    warmup_steps=20, min_lr_ratio=0.1, eval_every=50, eval_batches=4,
)


@dataclass
class History:
    """What happened during :func:`train`: losses in nats per token."""

    step: list[int] = field(default_factory=list)  # steps at which val_loss was measured
    val_loss: list[float] = field(default_factory=list)
    train_loss: list[float] = field(default_factory=list)  # one per step

    @property
    def final_val_loss(self) -> float:
        return self.val_loss[-1]


def make_adamw(model: nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW over the trainable parameters; matrices decay, biases and LayerNorms do not."""
    return torch.optim.AdamW(weight_decay_groups(model, weight_decay), lr=lr)


def weight_decay_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """The trainable parameters as optimizer groups: matrices with ``weight_decay``, vectors
    (biases, norms) without; an empty group is left out."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("model has no trainable parameters (all have requires_grad=False)")
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    return [g for g in groups if g["params"]]


def symmetric_kl(logits: torch.Tensor, other_logits: torch.Tensor) -> torch.Tensor:
    """½ (KL(q ‖ p) + KL(p ‖ q)) per token, averaged over tokens, between two passes' predictions.

    ``p`` and ``q`` are the softmaxes of ``logits`` and ``other_logits`` (..., vocab). As in
    microsoft/AdaMix's ``symmetric_KL_loss``, each KL treats its target as fixed (detached):
    the term pulls each pass towards the other, not the other towards it. Zero when the two
    passes agree.
    """
    if logits.shape != other_logits.shape:
        raise ValueError(f"logits and other_logits must have one shape, got {tuple(logits.shape)} and "
                         f"{tuple(other_logits.shape)}")
    log_p = torch.log_softmax(logits.float().flatten(0, -2), dim=-1)
    log_q = torch.log_softmax(other_logits.float().flatten(0, -2), dim=-1)
    # kl_div(input, target) is KL(target ‖ input), with input as log-probabilities
    kl_q_p = torch.nn.functional.kl_div(log_p, log_q.detach(), reduction="batchmean", log_target=True)
    kl_p_q = torch.nn.functional.kl_div(log_q, log_p.detach(), reduction="batchmean", log_target=True)
    return 0.5 * (kl_q_p + kl_p_q)


def training_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, consistency_weight: float = 0.0) -> torch.Tensor:
    """The loss a training step backpropagates: the cross-entropy of one forward pass, plus,
    with ``consistency_weight`` > 0, that weight times :func:`symmetric_kl` between this pass's
    predictions and a second pass's (which takes other random routes, or dropout masks)."""
    logits, loss = model(x, y)
    if consistency_weight > 0:
        other_logits, _ = model(x, y)
        loss = loss + consistency_weight * symmetric_kl(logits, other_logits)
    return loss


@torch.no_grad()
def evaluate(
    model: nn.Module,
    ids: torch.Tensor,
    block_size: int,
    batch_size: int = 64,
    max_batches: int | None = None,
) -> float:
    """Mean cross-entropy (nats per token) over consecutive windows of ``ids``.

    Deterministic: the windows tile ``ids`` from the start, so the same model and
    data always give the same number. ``max_batches`` caps the cost.
    """
    n_windows = (len(ids) - 1) // block_size
    if n_windows == 0:
        raise ValueError(f"ids has {len(ids)} tokens, needs more than block_size={block_size}")
    if max_batches is not None:
        n_windows = min(n_windows, max_batches * batch_size)
    device = next(model.parameters()).device
    x_all = ids[: n_windows * block_size].view(n_windows, block_size)
    y_all = ids[1 : n_windows * block_size + 1].view(n_windows, block_size)
    was_training = model.training
    model.eval()
    total = 0.0
    for start in range(0, n_windows, batch_size):
        x = x_all[start : start + batch_size].to(device)
        y = y_all[start : start + batch_size].to(device)
        _, loss = model(x, y)
        total += loss.item() * len(x)
    model.train(was_training)
    return total / n_windows


def train(
    model: nn.Module,
    train_ids: torch.Tensor,
    val_ids: torch.Tensor,
    config: TrainConfig,
    optimizer: torch.optim.Optimizer | None = None,
    progress: bool = True,
) -> History:
    """Train ``model`` (its trainable parameters) on next-token prediction.

    ``optimizer`` defaults to :func:`make_adamw`; pass your own to set parameter
    groups (LoRA+). The learning rate of every group follows ``config.lr_at`` scaled
    by the ratio of that group's initial lr to ``config.lr``. ``history.train_loss`` is
    the loss trained on, consistency term included.
    """
    if optimizer is None:
        optimizer = make_adamw(model, config.lr, config.weight_decay)
    base_lrs = [group["lr"] for group in optimizer.param_groups]
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(config.seed)
    trainable = [p for p in model.parameters() if p.requires_grad]
    history = History()
    # A disabled scaler is a pass-through: scale(loss) is loss and step() is optimizer.step().
    scaler = torch.amp.GradScaler(device.type, enabled=config.amp_dtype == torch.float16)

    def record_eval(step: int) -> None:
        history.step.append(step)
        history.val_loss.append(evaluate(model, val_ids, config.block_size, max_batches=config.eval_batches))

    model.train()
    record_eval(0)
    # ncols: the bar and its postfix fit the book's 79-column text, as the printed output does
    bar = tqdm(range(1, config.steps + 1), disable=not progress, desc="training", unit="step", ncols=79)
    for step in bar:
        scale = config.lr_at(step - 1) / config.lr
        for group, base_lr in zip(optimizer.param_groups, base_lrs):
            group["lr"] = base_lr * scale
        x, y = get_batch(train_ids, config.batch_size, config.block_size, generator)
        with torch.autocast(device.type, dtype=config.amp_dtype, enabled=config.amp_dtype is not None):
            loss = training_loss(model, x.to(device), y.to(device), config.consistency_weight)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if config.grad_clip is not None:
            scaler.unscale_(optimizer)  # clip the true gradients, not the scaled ones
            torch.nn.utils.clip_grad_norm_(trainable, config.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        history.train_loss.append(loss.item())
        if step % config.eval_every == 0 or step == config.steps:
            record_eval(step)
            bar.set_postfix(val_loss=f"{history.val_loss[-1]:.3f}")
    model.eval()
    return history
