"""What every chapter's code shares: argument checks and module surgery.

A check names the argument and says what was expected, so that a reader's slip reads as
one; it returns the value, so a constructor checks and keeps it in one line. Every
method in this package first checks all it is given and only then changes the model:
these helpers never change anything themselves, except :func:`replace_module`.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

__all__ = ["check_int", "check_seed", "check_tensors_fit", "replace_module"]


def check_int(value, name: str, *, minimum: int = 1, below: int | None = None,
              below_name: str | None = None, optional: bool = False) -> int | None:
    """``value``, if it is an int (not a bool) of at least ``minimum`` and under ``below``.

    Raises ``ValueError`` naming ``name`` otherwise; ``optional`` lets ``None`` through.
    ``below_name`` says what the bound is, e.g. ``"block_size"``.
    """
    if optional and value is None:
        return None
    kind = {1: "a positive int", 0: "a non-negative int"}.get(minimum, f"an int >= {minimum}")
    if below is not None:
        kind += f" below {below_name} ({below})" if below_name else f" below {below}"
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum or (below is not None and value >= below):
        raise ValueError(f"{name} must be {'None or ' if optional else ''}{kind}, got {value!r}")
    return value


def check_seed(seed) -> int:
    """``seed``, if it is an int (not a bool); ``TypeError`` otherwise."""
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {seed!r}")
    return seed


def check_tensors_fit(state: Mapping[str, torch.Tensor], expected: Mapping[str, tuple], *,
                      holder: str, failure: str, shown: int = 5) -> None:
    """Raise ``ValueError`` naming every missing, unexpected or misshapen tensor of ``state``.

    ``expected`` maps each name to its shape; ``holder`` names what ``state`` came from
    (``"checkpoint"``, ``"adapter"``) and ``failure`` opens the message. The first
    ``shown`` problems are listed, so a wrong file does not flood the screen.
    """
    problems = [f"missing {k}" for k in expected if k not in state]
    problems += [f"unexpected {k}" for k in state if k not in expected]
    problems += [
        f"{k}: {holder} has shape {tuple(state[k].shape)}, model expects {tuple(shape)}"
        for k, shape in expected.items()
        if k in state and tuple(state[k].shape) != tuple(shape)
    ]
    if problems:
        listed = "; ".join(problems[:shown]) + ("; ..." if len(problems) > shown else "")
        raise ValueError(f"{failure}: {listed}")


def replace_module(model: nn.Module, name: str, new: nn.Module) -> nn.Module:
    """Put ``new`` where ``model``'s submodule ``name`` is, and return the one it replaced.

    ``name`` is a dotted name from ``model.named_modules()``, not ``""``: the model itself
    has no parent to hold a replacement.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"name must be the dotted name of a submodule of model, got {name!r}")
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name)  # "" is the model itself
    old = getattr(parent, child)
    setattr(parent, child, new)
    return old
