"""LoRA adapters on disk in PEFT's format: ``adapter_config.json`` + ``adapter_model.safetensors``.

An adapter is all that LoRA training produces: the factors A and B of every adapted layer
(and DoRA's magnitudes), a few megabytes beside a base model of gigabytes. Saved with PEFT's
file names, key names and config keys, an adapter trained here loads with
``peft.PeftModel`` on a Hugging Face GPT-2, and a PEFT adapter loads here, into our GPT2 or
Hugging Face's. :func:`load_adapter` refuses by name every PEFT option that
:class:`~lora_edu.lora_layer.LoRALinear` cannot represent, rather than load something else.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from lora_edu.dora import DoRALinear
from lora_edu.lora import add_lora, check_targets, lora_layers, lora_state_dict, select_modules
from lora_edu.lora_layer import LoRALinear
from lora_edu.plumbing import check_tensors_fit, replace_module

__all__ = ["ADAPTER_CONFIG", "ADAPTER_WEIGHTS", "PEFT_PREFIX", "adapter_targets", "load_adapter", "read_adapter",
           "save_adapter"]

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."  # how PEFT names the wrapped model's keys on disk


def save_adapter(model: nn.Module, directory: str | os.PathLike, base_model_name_or_path: str | None = None) -> Path:
    """Write the adapter in PEFT's format: adapter_config.json + adapter_model.safetensors.

    The config reads like PEFT's: ``target_modules`` as given to :func:`~lora_edu.lora.add_lora`
    (a list of names or a regex; "all-linear" as the full names it chose, as PEFT writes it),
    ``base_model_name_or_path`` from the argument or else from the model, where it knows
    its origin (``model.name_or_path``: Hugging Face models, and our GPT2 from
    ``load_pretrained`` or ``load_checkpoint``), and ``task_type`` "CAUSAL_LM" only for a
    model PEFT can wrap as one (it needs ``prepare_inputs_for_generation``; our GPT2 has
    none, and ``PeftModel.from_pretrained`` loads it as a plain PeftModel).
    """
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


def load_adapter(model: nn.Module, directory: str | os.PathLike) -> nn.Module:
    """Load a LoRA adapter (ours or PEFT's) into ``model``, adding LoRA layers if it has none.

    New LoRA layers go where the adapter's ``target_modules`` and ``exclude_modules`` say,
    by PEFT's rules, and take the train/eval mode of the layers they wrap. Loading a second
    adapter into a model that already has matching LoRA layers replaces the first: that is
    how one base model switches between adapters. PEFT options that LoRALinear cannot
    represent (``rank_pattern``, ``modules_to_save``, ``bias`` other than "none", ...) are
    refused by name; a DoRA adapter (``use_dora``) loads into DoRA layers. If the adapter
    does not fit, the model is left as it was.
    """
    directory = Path(directory)
    config, state = read_adapter(directory)
    settings = {"r": config["r"], "alpha": config["lora_alpha"], "use_rslora": config.get("use_rslora", False),
                "use_dora": bool(config.get("use_dora", False))}
    layers = lora_layers(model)
    if layers:
        _load_into_layers(model, layers, settings, state, directory)
        return model
    # No LoRA layers yet: add them as the adapter says, and take them out again if it does not fit.
    targets, exclude = adapter_targets(config)
    requires_grad = {n: p.requires_grad for n, p in model.named_parameters()}
    add_lora(model, targets, exclude=exclude, dropout=config.get("lora_dropout", 0.0), **settings)
    model.lora_targets = (config["target_modules"], config.get("exclude_modules"))
    try:
        _load_into_layers(model, lora_layers(model), settings, state, directory)
    except Exception:
        for name, layer in lora_layers(model).items():
            replace_module(model, name, layer.base_layer)
        for n, p in model.named_parameters():
            p.requires_grad_(requires_grad[n])
        raise
    return model


def read_adapter(directory: str | os.PathLike, name: str | None = None) -> tuple[dict, dict[str, torch.Tensor]]:
    """(config, tensors under our key names) of the LoRA adapter in ``directory``, checked.

    Refuses a folder without both files, an adapter of another PEFT type, and every option
    LoRALinear cannot represent, before anything else happens: so its errors say the model
    was left unchanged. ``name`` names the adapter in them (:class:`~lora_edu.serving.MultiAdapterModel`'s).
    """
    directory = Path(directory)
    for file in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
        if not (directory / file).is_file():
            raise FileNotFoundError(f"{f'adapter {name!r}: ' if name else ''}{directory / file} not found; "
                                    f"an adapter folder holds {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS}")
    adapter = f"adapter {name!r}" if name else str(directory)
    config = json.loads((directory / ADAPTER_CONFIG).read_text())
    if config.get("peft_type") != "LORA":
        raise ValueError(f"{adapter} holds a {config.get('peft_type')!r} adapter, not LORA")
    unsupported = _unsupported_options(config)
    if unsupported:
        raise ValueError(
            f"{adapter} uses {'; '.join(unsupported)}, which lora_edu does not support; the model was left unchanged"
        )
    state = {_our_key(k): v for k, v in load_file(str(directory / ADAPTER_WEIGHTS)).items()}
    return config, state


def adapter_targets(config: dict) -> tuple[str | list[str], str | list[str] | tuple[str, ...]]:
    """(targets, exclude) that choose the layers an adapter's config names, by PEFT's rules.

    "all-linear" leaves out the output head, as :func:`~lora_edu.lora.add_lora` (and PEFT
    on a Hugging Face model) expand it.
    """
    targets, exclude = config["target_modules"], config.get("exclude_modules") or ()
    check_targets(targets)
    if targets == "all-linear":
        exclude = rf"(?:{exclude})|(?:.*\.)?lm_head" if isinstance(exclude, str) else (*exclude, "lm_head")
    return targets, exclude


# --- the config and keys as PEFT writes them ---

def _setting(layer: LoRALinear, attribute: str):
    return isinstance(layer, DoRALinear) if attribute == "use_dora" else getattr(layer, attribute)


def _shared_setting(layers: dict[str, LoRALinear], attribute: str):
    values = {_setting(layer, attribute) for layer in layers.values()}
    if len(values) != 1:
        raise ValueError(f"the LoRA layers differ in {attribute} ({sorted(values)}); "
                         "one adapter file holds one setting")
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
    given = getattr(model, "lora_targets", None)
    if given is not None and given[0] != "all-linear":
        targets, exclude = given
        chosen, unmatched = select_modules(_as_before_lora(model), targets, exclude or ())
        if not unmatched and set(chosen) == set(layers):
            return targets, exclude
    return sorted(layers), None


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


# --- what a PEFT LoraConfig may say, and what of it lora_edu can load ---

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


def _load_into_layers(model: nn.Module, layers: dict[str, LoRALinear], settings: dict,
                      state: dict[str, torch.Tensor], directory: Path) -> None:
    """Put ``state`` into ``model``'s LoRA layers, once every layer and tensor is checked to fit."""
    for name, layer in layers.items():
        if layer.merged:
            raise ValueError(f"{name} is merged; unmerge it before loading another adapter")
        for key, value in settings.items():
            if _setting(layer, key) != value:
                raise ValueError(f"adapter has {key}={value} but the model's LoRA layer {name} has "
                                 f"{key}={_setting(layer, key)}")
    expected = {k: v.shape for k, v in lora_state_dict(model).items()}
    check_tensors_fit(state, expected, holder="adapter", failure=f"the adapter in {directory} does not fit this model")
    model.load_state_dict(state, strict=False)
