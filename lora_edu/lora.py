"""LoRA on a whole model: choose the linear layers, wrap them, train only the adapters, merge them away.

:func:`add_lora` puts a :class:`~lora_edu.lora_layer.LoRALinear` (or, with ``use_dora``,
a :class:`~lora_edu.dora.DoRALinear`) around every linear layer that ``targets`` names,
in place, and freezes everything else: training then moves only A and B. The layers are
chosen by PEFT's rules for ``target_modules`` and ``exclude_modules``, so an adapter
file (:mod:`lora_edu.peft_format`) names the same layers here and in PEFT.
:func:`merge_lora` folds every adapter into its base weight and hands back a plain model.
"""

from __future__ import annotations

import re

import torch
import torch.nn as nn

from lora_edu.dora import DoRALinear
from lora_edu.lora_layer import LoRALinear, check_not_quantized, is_conv1d, is_linear
from lora_edu.plumbing import replace_module

__all__ = [
    "add_lora",
    "check_targets",
    "count_parameters",
    "lora_layers",
    "lora_state_dict",
    "mark_only_lora_trainable",
    "merge_lora",
    "name_matches",
    "select_modules",
]


def add_lora(
    model: nn.Module,
    targets: str | list[str] = "all-linear",
    r: int = 8,
    alpha: float = 16,
    dropout: float = 0.0,
    use_rslora: bool = False,
    exclude: str | list[str] | tuple[str, ...] | None = None,
    use_dora: bool = False,
) -> nn.Module:
    """Wrap the target linear layers of ``model`` in :class:`LoRALinear`, in place.

    ``targets`` is a list of module names (``["c_attn", "mlp.c_fc"]`` matches every module
    whose name ends with one of them, and each must match something), a regular expression
    matched against full names (``r".*\\.h\\.[01]\\.attn\\.c_attn"``), or ``"all-linear"``:
    every nn.Linear and Conv1D. ``exclude`` leaves out modules from any ``targets``, by
    PEFT's rule for ``exclude_modules`` (a list of names, or a regex); left at ``None`` it
    excludes the output head from "all-linear" (GPT-2 ties it to the embedding) and
    nothing from other targets. Afterwards only the LoRA parameters are trainable.
    The new layers take the train/eval mode of the layers they wrap. ``use_dora=True``
    makes them :class:`~lora_edu.dora.DoRALinear` (PEFT's ``use_dora``), whose magnitudes
    train too. Returns ``model``; if it refuses, the model is left unchanged.
    """
    exclude = _checked_exclude(exclude, targets)
    if not isinstance(use_dora, bool):
        raise TypeError(f"use_dora must be True or False, got {use_dora!r}")
    check_targets(targets)
    if lora_layers(model):
        raise ValueError("model already has LoRA layers; add_lora once (or merge_lora first)")
    if is_linear(model):  # add_lora replaces children; it cannot replace the model itself
        raise TypeError("model is itself a linear layer; wrap it directly: LoRALinear(layer, r, alpha)")
    modules = {n: m for n, m in model.named_modules() if n}  # "" is the model itself
    chosen = _chosen_linear_layers(modules, targets, exclude)
    # Build every layer before replacing any, so that a refusal leaves the model as it was
    # (LoRALinear freezes its base: those flags are put back too).
    layer_class = DoRALinear if use_dora else LoRALinear
    requires_grad = [(p, p.requires_grad) for p in model.parameters()]
    wrapped = {}
    for name in chosen:
        base = modules[name]
        try:
            wrapped[name] = layer_class(base, r, alpha, dropout, fan_in_fan_out=is_conv1d(base), use_rslora=use_rslora)
        except TypeError as err:
            for p, flag in requires_grad:
                p.requires_grad_(flag)
            raise TypeError(f"{name}: {err}; the model was left unchanged") from None
    for name, layer in wrapped.items():
        replace_module(model, name, layer)
    mark_only_lora_trainable(model)
    # model.lora_targets: what was asked for, which lora_edu.peft_format.save_adapter writes as
    # target_modules and exclude_modules ("all-linear" is saved as the names it chose).
    saved_exclude = None
    if exclude and targets != "all-linear":
        saved_exclude = exclude if isinstance(exclude, str) else list(exclude)
    model.lora_targets = (targets, saved_exclude)
    return model


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    """Every :class:`LoRALinear` in ``model``, by module name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def mark_only_lora_trainable(model: nn.Module) -> None:
    """Freeze every parameter except the LoRA factors A and B (and DoRA's magnitudes)."""
    for p in model.parameters():
        p.requires_grad_(False)
    for p in _adapter_parameters(model).values():
        p.requires_grad_(True)


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only the adapter: ``<module>.lora_A.weight``, ``<module>.lora_B.weight`` (and DoRA's ``<module>.magnitude``)."""
    return {name: p.detach() for name, p in _adapter_parameters(model).items()}


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameters; a tied weight counts once."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def merge_lora(model: nn.Module) -> nn.Module:
    """Merge every LoRA layer and put its base layer back: a plain model, in place.

    Checks every layer before touching any, so a refusal leaves the model as it was.
    """
    layers = lora_layers(model)
    owners: dict[int, list[str]] = {}
    for pname, p in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(p), []).append(pname)
    for name, layer in layers.items():
        if layer.merged:
            continue
        check_not_quantized(layer, name or "the model")
        # A tied weight (GPT-2's lm_head is wte) would take B A into the other module too.
        own = f"{name}.base_layer." if name else "base_layer."
        others = [n for n in owners[id(layer.base_layer.weight)] if not n.startswith(own)]
        if others:
            raise ValueError(f"cannot merge {name}: its weight is shared with {others[0]}, which would change too")
        with torch.no_grad():
            if not torch.isfinite(layer.merged_weight()).all():
                raise ValueError(f"merging {name or 'the model'} would make its weight non-finite (inf or nan); "
                                 "nothing was merged")
    for name, layer in layers.items():
        if not layer.merged:
            layer.merge()
        if not name:  # the model is itself a LoRALinear
            return layer.base_layer
        replace_module(model, name, layer.base_layer)
    return model


# --- choosing the layers, by PEFT's rules ---

def name_matches(name: str, target: str) -> bool:
    """PEFT's rule for a listed name: the full module name or its last components."""
    return name == target or name.endswith("." + target)


def check_targets(targets) -> None:
    """Refuse ``targets`` that are not a non-empty list of names, a regex string or "all-linear"."""
    if not (targets == "all-linear" or isinstance(targets, str) or (
        isinstance(targets, (list, tuple)) and targets and all(isinstance(t, str) for t in targets)
    )):
        raise TypeError(f"targets must be a list of module names, a regex string, or 'all-linear'; got {targets!r}")


def select_modules(modules: dict[str, nn.Module], targets, exclude) -> tuple[list[str], list[str]]:
    """(names chosen by ``targets`` less ``exclude``, the targets that match nothing)."""
    if targets == "all-linear":
        found = [n for n, m in modules.items() if is_linear(m)]
        unmatched = []
    elif isinstance(targets, str):
        found = [n for n in modules if re.fullmatch(targets, n)]
        unmatched = [] if found else [targets]
    else:
        found = [n for n in modules if any(name_matches(n, t) for t in targets)]
        # Every listed name must match: one that matches nothing is almost always a typo.
        unmatched = [t for t in targets if not any(name_matches(n, t) for n in modules)]
    chosen = [n for n in found if not (exclude and _matches(n, exclude))]
    if targets == "all-linear" and not chosen:
        unmatched = [targets]
    return chosen, unmatched


def _matches(name: str, patterns: str | list[str] | tuple[str, ...]) -> bool:
    """PEFT's rule for ``target_modules`` and ``exclude_modules``: a string is a regular
    expression over the full name; a list holds full names or their last components."""
    if isinstance(patterns, str):
        return re.fullmatch(patterns, name) is not None
    return any(name_matches(name, p) for p in patterns)


def _checked_exclude(exclude, targets) -> str | list[str] | tuple[str, ...]:
    """``exclude`` checked, or its default: the output head for "all-linear", else nothing."""
    if exclude is None:
        return ("lm_head",) if targets == "all-linear" else ()
    if not (isinstance(exclude, str) or (
        isinstance(exclude, (list, tuple)) and all(isinstance(e, str) for e in exclude)
    )):
        raise TypeError(f"exclude must be None, a list of module names or a regex string, got {exclude!r}")
    if isinstance(exclude, str):
        try:
            re.compile(exclude)
        except re.error as err:
            raise ValueError(f"exclude is not a valid regular expression ({err}): {exclude!r}") from None
    return exclude


def _chosen_linear_layers(modules: dict[str, nn.Module], targets, exclude) -> list[str]:
    """The names :func:`select_modules` chooses, refused by name if any is missing or not linear."""
    linear = [n for n, m in modules.items() if is_linear(m)]
    chosen, unmatched = select_modules(modules, targets, exclude)
    if unmatched:
        available = sorted({n.split(".")[-1] for n in linear})
        example = f" (full names like {linear[0]!r})" if linear else ""
        raise ValueError(
            f"no module matches {', '.join(map(repr, unmatched))}; "
            f"the linear layers of this model are named {available}{example}"
        )
    if not chosen:
        raise ValueError(f"every module that {targets!r} matches is excluded by {exclude!r}")
    not_linear = [f"{n} ({type(modules[n]).__name__})" for n in chosen if not is_linear(modules[n])]
    if not_linear:
        raise TypeError(f"LoRA wraps linear layers, but these targets are not: {', '.join(not_linear)}")
    return chosen


def _adapter_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """Every LoRA layer's own parameters (A, B, DoRA's magnitude), by full name: all but its base layer's."""
    return {
        f"{name}.{key}" if name else key: p
        for name, layer in lora_layers(model).items()
        for key, p in layer.named_parameters()
        if not key.startswith("base_layer.")
    }
