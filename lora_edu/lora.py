"""LoRA: a frozen linear layer plus a trainable low-rank bypass, h = W0 x + (alpha / r) B A x.

Chapter 2 builds :class:`LoRALinear` inline and then uses this one. Adapters are saved
in PEFT's format (``adapter_config.json`` + ``adapter_model.safetensors``, the same key
names), so an adapter trained here loads with ``peft.PeftModel`` on a Hugging Face
GPT-2, and a PEFT adapter loads here.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

import torch
import torch.nn as nn

from lora_edu.nf4 import NF4Linear

__all__ = [
    "LoRALinear",
    "add_lora",
    "count_parameters",
    "is_quantized",
    "load_adapter",
    "lora_layers",
    "lora_state_dict",
    "mark_only_lora_trainable",
    "merge_lora",
    "save_adapter",
]

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."  # how PEFT names the wrapped model's keys on disk


def _is_conv1d(module: nn.Module) -> bool:
    """Hugging Face's GPT-2 Conv1D: a linear layer whose weight is stored (in, out)."""
    return type(module).__name__ == "Conv1D" and getattr(module, "weight", None) is not None


def _is_linear(module: nn.Module) -> bool:
    # bitsandbytes' Linear4bit is an nn.Linear too; NF4Linear is our 4-bit layer (Chapter 4).
    return isinstance(module, (nn.Linear, NF4Linear)) or _is_conv1d(module)


def is_quantized(module: nn.Module) -> bool:
    """A 4-bit linear layer: our NF4Linear or bitsandbytes' Linear4bit (QLoRA's frozen base)."""
    return isinstance(module, NF4Linear) or type(module).__name__ == "Linear4bit"


class LoRALinear(nn.Module):
    """``base(x) + scaling * B(A(dropout(x)))`` with ``base`` frozen.

    A (r x in) starts Kaiming-uniform and B (out x r) at zero, so a fresh layer computes
    exactly what ``base`` does. ``scaling`` is alpha / r, or alpha / sqrt(r) with
    ``use_rslora``. ``fan_in_fan_out`` says the base weight is stored (in, out), as in
    GPT-2's Conv1D. ``merge()`` folds B A into the base weight for zero extra latency;
    ``unmerge()`` takes it out again. Neither happens implicitly.
    """

    def __init__(
        self,
        base_layer: nn.Module,
        r: int,
        alpha: float,
        dropout: float = 0.0,
        fan_in_fan_out: bool = False,
        use_rslora: bool = False,
    ):
        super().__init__()
        if not _is_linear(base_layer):
            raise TypeError(f"base_layer must be nn.Linear, a GPT-2 Conv1D or a 4-bit linear layer, got {type(base_layer).__name__}")
        if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
            raise ValueError(f"r must be a positive int, got {r!r}")
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 < alpha < math.inf:
            raise ValueError(f"alpha must be a finite number > 0, got {alpha!r}")
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        if _is_conv1d(base_layer) and not fan_in_fan_out:
            raise ValueError("base_layer is a Conv1D, whose weight is (in, out): pass fan_in_fan_out=True")
        if not _is_conv1d(base_layer) and fan_in_fan_out:
            kind = "an nn.Linear" if type(base_layer) is nn.Linear else f"a {type(base_layer).__name__}"
            raise ValueError(f"base_layer is {kind}, whose weight is (out, in): pass fan_in_fan_out=False")
        if is_quantized(base_layer):
            # A 4-bit weight is packed bytes: its shape is not (out, in) and its dtype is not a
            # float. A and B get their own float32 weights, as in QLoRA.
            out_features, in_features = base_layer.out_features, base_layer.in_features
            packed = base_layer.weight_packed if isinstance(base_layer, NF4Linear) else base_layer.weight
            device, dtype = packed.device, torch.float32
        else:
            weight = base_layer.weight
            if not weight.is_floating_point():  # nn.Linear(dtype=int) would fail deep in PyTorch
                raise TypeError(
                    f"base_layer's weight must be floating-point (A and B take its dtype and are trained), "
                    f"got {weight.dtype}; for a 4-bit base use NF4Linear or bitsandbytes' Linear4bit"
                )
            out_features, in_features = weight.shape[::-1] if fan_in_fan_out else weight.shape
            device, dtype = weight.device, weight.dtype
        self.base_layer = base_layer
        self.r, self.alpha, self.use_rslora = r, alpha, use_rslora
        self.fan_in_fan_out = fan_in_fan_out
        self.in_features, self.out_features = in_features, out_features
        self.scaling = alpha / math.sqrt(r) if use_rslora else alpha / r
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

    use_dora = False  # DoRALinear says True

    @property
    def dropout(self) -> float:
        return self.lora_dropout.p if isinstance(self.lora_dropout, nn.Dropout) else 0.0

    def delta_weight(self) -> torch.Tensor:
        """scaling * B A, laid out like the base weight ((in, out) with fan_in_fan_out)."""
        delta = (self.lora_B.weight @ self.lora_A.weight) * self.scaling
        return delta.T if self.fan_in_fan_out else delta

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        if self.merged:
            return out
        # The bypass runs in A's dtype (float32 beside a 4-bit base); the sum in the base's.
        x = x.to(self.lora_A.weight.dtype)
        return out + (self.lora_B(self.lora_A(self.lora_dropout(x))) * self.scaling).to(out.dtype)

    @torch.no_grad()
    def merge(self) -> None:
        """W0 <- W0 + scaling * B A. Afterwards the layer costs what the base layer costs."""
        if self.merged:
            raise RuntimeError("this LoRA layer is already merged; merging twice would add B A twice")
        _refuse_quantized(self)
        merged = self.base_layer.weight + self.delta_weight()
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

    def extra_repr(self) -> str:
        return (
            f"in={self.in_features}, out={self.out_features}, r={self.r}, alpha={self.alpha}, "
            f"scaling={self.scaling:.4g}, merged={self.merged}"
        )


def _refuse_quantized(layer: LoRALinear, name: str = "this LoRA layer") -> None:
    if is_quantized(layer.base_layer):
        raise TypeError(
            f"{name} has a 4-bit base ({type(layer.base_layer).__name__}): adding B A to packed 4-bit "
            "codes is meaningless. Use lora_edu.qlora.merge_and_dequantize (exact) or "
            "lora_edu.qlora.merge_and_requantize (4 bits again, outputs change)"
        )


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    """Every :class:`LoRALinear` in ``model``, by module name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def _name_matches(name: str, target: str) -> bool:
    """PEFT's rule for a listed name: the full module name or its last components."""
    return name == target or name.endswith("." + target)


def _is_lora_key(key: str) -> bool:
    parts = key.split(".")
    return "lora_A" in parts or "lora_B" in parts or parts[-1] == "magnitude"  # DoRA's magnitudes too


def _matches(name: str, patterns: str | list[str] | tuple[str, ...]) -> bool:
    """PEFT's rule for ``target_modules`` and ``exclude_modules``: a string is a regular
    expression over the full name; a list holds full names or their last components."""
    if isinstance(patterns, str):
        return re.fullmatch(patterns, name) is not None
    return any(_name_matches(name, p) for p in patterns)


def _select(modules: dict[str, nn.Module], targets, exclude) -> tuple[list[str], list[str]]:
    """(names chosen by ``targets`` less ``exclude``, the targets that match nothing)."""
    if targets == "all-linear":
        found = [n for n, m in modules.items() if _is_linear(m)]
        unmatched = []
    elif isinstance(targets, str):
        found = [n for n in modules if re.fullmatch(targets, n)]
        unmatched = [] if found else [targets]
    else:
        found = [n for n in modules if any(_name_matches(n, t) for t in targets)]
        # Every listed name must match: one that matches nothing is almost always a typo.
        unmatched = [t for t in targets if not any(_name_matches(n, t) for n in modules)]
    chosen = [n for n in found if not (exclude and _matches(n, exclude))]
    if targets == "all-linear" and not chosen:
        unmatched = [targets]
    return chosen, unmatched


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
    if exclude is None:
        exclude = ("lm_head",) if targets == "all-linear" else ()
    elif not (isinstance(exclude, str) or (
        isinstance(exclude, (list, tuple)) and all(isinstance(e, str) for e in exclude)
    )):
        raise TypeError(f"exclude must be None, a list of module names or a regex string, got {exclude!r}")
    if isinstance(exclude, str):
        try:
            re.compile(exclude)
        except re.error as err:
            raise ValueError(f"exclude is not a valid regular expression ({err}): {exclude!r}") from None
    if not isinstance(use_dora, bool):
        raise TypeError(f"use_dora must be True or False, got {use_dora!r}")
    _check_targets(targets)
    exclude = exclude if isinstance(exclude, str) else tuple(exclude)
    _add_lora(model, targets, exclude, r, alpha, dropout, use_rslora, use_dora)
    # for save_adapter's target_modules and exclude_modules ("all-linear" is saved as names)
    saved_exclude = None
    if exclude and targets != "all-linear":
        saved_exclude = exclude if isinstance(exclude, str) else list(exclude)
    model._lora_targets = (targets, saved_exclude)
    return model


def _check_targets(targets) -> None:
    if not (targets == "all-linear" or isinstance(targets, str) or (
        isinstance(targets, (list, tuple)) and targets and all(isinstance(t, str) for t in targets)
    )):
        raise TypeError(f"targets must be a list of module names, a regex string, or 'all-linear'; got {targets!r}")


def _add_lora(model: nn.Module, targets, exclude, r, alpha, dropout, use_rslora, use_dora=False) -> None:
    """add_lora with PEFT's ``exclude_modules`` (names or a regex, for any ``targets``)."""
    if lora_layers(model):
        raise ValueError("model already has LoRA layers; add_lora once (or merge_lora first)")
    if _is_linear(model):  # add_lora replaces children; it cannot replace the model itself
        raise TypeError("model is itself a linear layer; wrap it directly: LoRALinear(layer, r, alpha)")
    modules = {n: m for n, m in model.named_modules() if n}  # "" is the model itself
    linear = [n for n, m in modules.items() if _is_linear(m)]
    chosen, unmatched = _select(modules, targets, exclude)
    if unmatched:
        available = sorted({n.split(".")[-1] for n in linear})
        example = f" (full names like {linear[0]!r})" if linear else ""
        raise ValueError(
            f"no module matches {', '.join(map(repr, unmatched))}; "
            f"the linear layers of this model are named {available}{example}"
        )
    if not chosen:
        raise ValueError(f"every module that {targets!r} matches is excluded by {exclude!r}")
    not_linear = [f"{n} ({type(modules[n]).__name__})" for n in chosen if not _is_linear(modules[n])]
    if not_linear:
        raise TypeError(f"LoRA wraps linear layers, but these targets are not: {', '.join(not_linear)}")
    # Build every layer before replacing any, so that a refusal leaves the model as it was
    # (LoRALinear freezes its base: those flags are put back too).
    requires_grad = [(p, p.requires_grad) for p in model.parameters()]
    if use_dora:
        from lora_edu.dora import DoRALinear  # dora builds on this module

        layer_class = DoRALinear
    else:
        layer_class = LoRALinear
    wrapped = {}
    for name in chosen:
        base = modules[name]
        try:
            wrapped[name] = layer_class(base, r, alpha, dropout, fan_in_fan_out=_is_conv1d(base), use_rslora=use_rslora)
        except TypeError as err:
            for p, flag in requires_grad:
                p.requires_grad_(flag)
            raise TypeError(f"{name}: {err}; the model was left unchanged") from None
    for name, layer in wrapped.items():
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, layer)
    mark_only_lora_trainable(model)


def mark_only_lora_trainable(model: nn.Module) -> None:
    """Freeze every parameter except the LoRA factors A and B (and DoRA's magnitudes)."""
    for p in model.parameters():
        p.requires_grad_(False)
    for layer in lora_layers(model).values():
        for p in (*layer.lora_A.parameters(), *layer.lora_B.parameters()):
            p.requires_grad_(True)
        if hasattr(layer, "magnitude"):
            layer.magnitude.requires_grad_(True)


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameters; a tied weight counts once."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def _merged_weight(layer: LoRALinear) -> torch.Tensor:
    """The weight ``layer.merge()`` would write: W0 + sBA, or DoRA's m / ||W0 + sBA|| (W0 + sBA)."""
    if layer.use_dora:
        return layer.rescaled_weight()[0]
    return layer.base_layer.weight + layer.delta_weight()


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
        _refuse_quantized(layer, name or "the model")
        # A tied weight (GPT-2's lm_head is wte) would take B A into the other module too.
        own = f"{name}.base_layer." if name else "base_layer."
        others = [n for n in owners[id(layer.base_layer.weight)] if not n.startswith(own)]
        if others:
            raise ValueError(f"cannot merge {name}: its weight is shared with {others[0]}, which would change too")
        with torch.no_grad():
            if not torch.isfinite(_merged_weight(layer)).all():
                raise ValueError(f"merging {name or 'the model'} would make its weight non-finite (inf or nan); "
                                 "nothing was merged")
    for name, layer in layers.items():
        if not layer.merged:
            layer.merge()
        if not name:  # the model is itself a LoRALinear
            return layer.base_layer
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, layer.base_layer)
    return model


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only the adapter: ``<module>.lora_A.weight``, ``<module>.lora_B.weight`` (and DoRA's ``<module>.magnitude``)."""
    return {k: v for k, v in model.state_dict().items() if _is_lora_key(k)}


def _shared_setting(layers: dict[str, LoRALinear], attribute: str):
    values = {getattr(layer, attribute) for layer in layers.values()}
    if len(values) != 1:
        raise ValueError(f"the LoRA layers differ in {attribute} ({sorted(values)}); one adapter file holds one setting")
    return values.pop()


def _as_before_lora(model: nn.Module) -> dict[str, nn.Module]:
    """The modules as add_lora saw them: each LoRA layer stands for its base, insides hidden."""
    modules, inside = {}, None
    for name, m in model.named_modules():  # parents come before their children
        if not name or (inside and name.startswith(inside)):
            continue
        inside = name + "." if isinstance(m, LoRALinear) else inside
        modules[name] = m.base_layer if isinstance(m, LoRALinear) else m
    return modules


def _targets_to_save(model: nn.Module, layers: dict[str, LoRALinear]) -> tuple[list[str] | str, object]:
    """``target_modules`` and ``exclude_modules`` for adapter_config.json.

    As the user gave them to add_lora (or as the loaded adapter had them), as PEFT writes
    them, if they still choose exactly these layers; else the full names of the layers.
    "all-linear" is written as the full names, as PEFT does: on a Hugging Face model PEFT
    also leaves out the output head, on others not, so the names are the safe form.
    """
    given = getattr(model, "_lora_targets", None)
    if given is not None and given[0] != "all-linear":
        targets, exclude = given
        chosen, unmatched = _select(_as_before_lora(model), targets, exclude or ())
        if not unmatched and set(chosen) == set(layers):
            return targets, exclude
    return sorted(layers), None


def save_adapter(model: nn.Module, directory: str | os.PathLike, base_model_name_or_path: str | None = None) -> Path:
    """Write the adapter in PEFT's format: adapter_config.json + adapter_model.safetensors.

    The config reads like PEFT's: ``target_modules`` as given to :func:`add_lora` (a list
    of names or a regex; "all-linear" as the full names it chose, as PEFT writes it),
    ``base_model_name_or_path`` from the argument or else from the model, where it knows
    its origin (``model.name_or_path``: Hugging Face models, and our GPT2 from
    ``load_pretrained`` or ``load_checkpoint``), and ``task_type`` "CAUSAL_LM" only for a
    model PEFT can wrap as one (it needs ``prepare_inputs_for_generation``; our GPT2 has
    none, and ``PeftModel.from_pretrained`` loads it as a plain PeftModel).
    """
    from safetensors.torch import save_file

    layers = lora_layers(model)
    if not layers:
        raise ValueError("model has no LoRA layers to save; call add_lora first")
    if any(layer.merged for layer in layers.values()):
        raise ValueError("unmerge the LoRA layers before saving: a merged adapter lives in the base weights")
    targets, exclude = _targets_to_save(model, layers)
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM" if hasattr(model, "prepare_inputs_for_generation") else None,
        "base_model_name_or_path": base_model_name_or_path or getattr(model, "name_or_path", None) or None,
        "r": _shared_setting(layers, "r"),
        "lora_alpha": _shared_setting(layers, "alpha"),
        "lora_dropout": _shared_setting(layers, "dropout"),
        "use_rslora": _shared_setting(layers, "use_rslora"),
        "use_dora": _shared_setting(layers, "use_dora"),
        "fan_in_fan_out": _shared_setting(layers, "fan_in_fan_out"),
        "target_modules": targets,
        "exclude_modules": exclude,
        "bias": "none",
        "modules_to_save": None,
        "init_lora_weights": True,
        "inference_mode": True,
    }
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    tensors = {PEFT_PREFIX + _peft_key(k): v.detach().contiguous().cpu() for k, v in lora_state_dict(model).items()}
    save_file(tensors, str(directory / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    return directory


def _peft_key(key: str) -> str:
    """Our state-dict key as PEFT writes it: DoRA's magnitude is ``<module>.lora_magnitude_vector``."""
    return key.removesuffix(".magnitude") + ".lora_magnitude_vector" if key.endswith(".magnitude") else key


def _our_key(key: str) -> str:
    """A PEFT key (on disk or in memory) as ours."""
    key = key.removeprefix(PEFT_PREFIX).replace(".default.weight", ".weight")
    for peft_name in (".lora_magnitude_vector.weight", ".lora_magnitude_vector"):
        if key.endswith(peft_name):
            return key.removesuffix(peft_name) + ".magnitude"
    return key


# What load_adapter reads from adapter_config.json.
_ADAPTER_SETTINGS = (
    "peft_type", "r", "lora_alpha", "lora_dropout", "use_rslora", "use_dora", "target_modules", "exclude_modules",
)
# Keys that change nothing here: where the adapter came from, how PEFT ran, the layout of
# the base weight (fan_in_fan_out: lora_edu reads it from the layer), and settings used only
# together with an option refused below (layers_pattern, qalora_group_size, megatron_core).
_ADAPTER_IGNORED = (
    "task_type", "base_model_name_or_path", "revision", "auto_mapping", "inference_mode", "peft_version",
    "fan_in_fan_out", "runtime_config", "layers_pattern", "qalora_group_size", "megatron_core",
)
# init_lora_weights values that only choose the starting A and B, which the file replaces;
# PiSSA, OLoRA, CorDA, LoftQ, ... also change the base weights, which lora_edu cannot redo.
_PLAIN_INITS = (True, False, "gaussian", "eva", "orthogonal")
_OPTION_MEANS = {
    "layers_to_transform": "LoRA on some layers only",
    "rank_pattern": "per-layer ranks",
    "alpha_pattern": "per-layer alphas",
    "modules_to_save": "fully trained copies of other modules",
    "bias": "trained biases",
    "init_lora_weights": "an initialisation that changes the base weights",
    "lora_bias": "a trained bias beside lora_B",
    "trainable_token_indices": "trained embedding rows",
    "layer_replication": "replicated layers",
    "target_parameters": "LoRA on parameters, not modules",
}


def _unsupported_options(config: dict) -> list[str]:
    """Every option of a PEFT LoraConfig that is set to something LoRALinear cannot represent."""
    unsupported = []
    for key, value in config.items():
        if key in _ADAPTER_SETTINGS or key in _ADAPTER_IGNORED:
            continue
        if key == "bias":
            ok = value == "none"
        elif key == "init_lora_weights":
            ok = any(value == v and type(value) is type(v) for v in _PLAIN_INITS)
        else:  # any other option, known or newer than this code, must be off
            ok = value is None or value is False or value in ("", {}, [])
        if not ok:
            means = f" ({_OPTION_MEANS[key]})" if key in _OPTION_MEANS else ""
            unsupported.append(f"{key}={value!r}{means}")
    return unsupported


def load_adapter(model: nn.Module, directory: str | os.PathLike) -> nn.Module:
    """Load a LoRA adapter (ours or PEFT's) into ``model``, adding LoRA layers if it has none.

    New LoRA layers go where the adapter's ``target_modules`` and ``exclude_modules`` say,
    by PEFT's rules, and take the train/eval mode of the layers they wrap. Loading a second
    adapter into a model that already has matching LoRA layers replaces the first: that is
    how one base model switches between adapters. PEFT options that LoRALinear cannot
    represent (``rank_pattern``, ``modules_to_save``, ``bias`` other than "none", ...) are
    refused by name; a DoRA adapter (``use_dora``) loads into DoRA layers. If the adapter does not fit, the model is left as it was.
    """
    directory = Path(directory)
    for file in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
        if not (directory / file).is_file():
            raise FileNotFoundError(f"{directory / file} not found; an adapter folder holds {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS}")
    config = json.loads((directory / ADAPTER_CONFIG).read_text())
    if config.get("peft_type") != "LORA":
        raise ValueError(f"{directory} holds a {config.get('peft_type')!r} adapter, not LORA")
    unsupported = _unsupported_options(config)
    if unsupported:
        raise ValueError(
            f"{directory} uses {'; '.join(unsupported)}, which lora_edu does not support; "
            "the model was left unchanged"
        )
    settings = {"r": config["r"], "alpha": config["lora_alpha"], "use_rslora": config.get("use_rslora", False),
                "use_dora": bool(config.get("use_dora", False))}
    layers = lora_layers(model)
    if layers:
        _load_into_layers(model, layers, settings, directory)
        return model
    # No LoRA layers yet: add them as the adapter says, and take them out again if it does not fit.
    targets, exclude = config["target_modules"], config.get("exclude_modules") or ()
    _check_targets(targets)
    if targets == "all-linear":  # as add_lora (and PEFT on a Hugging Face model) expand it: not the head
        exclude = rf"(?:{exclude})|(?:.*\.)?lm_head" if isinstance(exclude, str) else (*exclude, "lm_head")
    requires_grad = {n: p.requires_grad for n, p in model.named_parameters()}
    _add_lora(model, targets, exclude, dropout=config.get("lora_dropout", 0.0), **settings)
    model._lora_targets = (config["target_modules"], config.get("exclude_modules"))
    try:
        _load_into_layers(model, lora_layers(model), settings, directory)
    except Exception:
        for name, layer in lora_layers(model).items():
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name), child, layer.base_layer)
        for n, p in model.named_parameters():
            p.requires_grad_(requires_grad[n])
        raise
    return model


def _load_into_layers(model: nn.Module, layers: dict[str, LoRALinear], settings: dict, directory: Path) -> None:
    from safetensors.torch import load_file

    for name, layer in layers.items():
        if layer.merged:
            raise ValueError(f"{name} is merged; unmerge it before loading another adapter")
        for key, value in settings.items():
            if getattr(layer, key) != value:
                raise ValueError(f"adapter has {key}={value} but the model's LoRA layer {name} has {key}={getattr(layer, key)}")
    state = {_our_key(k): v for k, v in load_file(str(directory / ADAPTER_WEIGHTS)).items()}
    expected = lora_state_dict(model)
    problems = [f"missing {k}" for k in expected if k not in state]
    problems += [f"unexpected {k}" for k in state if k not in expected]
    problems += [
        f"{k}: adapter has shape {tuple(state[k].shape)}, model expects {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    if problems:
        shown = "; ".join(problems[:5]) + ("; ..." if len(problems) > 5 else "")
        raise ValueError(f"the adapter in {directory} does not fit this model: {shown}")
    model.load_state_dict(state, strict=False)
