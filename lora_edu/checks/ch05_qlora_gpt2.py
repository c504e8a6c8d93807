"""Checkers for chapter 5's exercises: the memory arithmetic, quantizing a GPT-2, one QLoRA training step."""

from __future__ import annotations

import copy
import math
import numbers
from typing import Callable

import torch
import torch.nn as nn

from lora_edu.checks.core import (CheckFailed, as_number, call_learner, first_hint, is_number, learner_raised, passed,
                                  refuse_dotted_attributes, returned, seeded)
from lora_edu.gpt2 import GPT2, GPT2Config
from lora_edu.lora import add_lora
from lora_edu.memory import METHODS, memory_breakdown
from lora_edu.nf4 import NF4Linear, bits_per_parameter, dequantize_nf4, quantize_nf4
from lora_edu.qlora import prepare_for_kbit_training, quantize_model

__all__ = ["check_blocksize_experiment", "check_fine_tuning_bytes", "check_quantize_and_count", "check_training_step"]


# ---------------------------------------------------------------------------
# Exercise 5.1: the bytes of weights, gradients and Adam states.

_QBITS = bits_per_parameter(64, double_quant=True)  # 4.127 bits per 4-bit weight, absmaxes included


def _reference_bytes(n_linear: int, n_other: int, n_lora: int, method: str) -> float:
    """The rules of lora_edu.memory.memory_breakdown, without its rounding of the 4-bit bytes."""
    n = n_linear + n_other
    if method == "full":
        return 16 * n
    if method == "lora":
        return 2 * n + 16 * n_lora
    return n_linear * _QBITS / 8 + 4 * n_other + 16 * n_lora


def _lora_count(model: nn.Module, r: int) -> tuple[int, int, int]:
    """(n_linear, n_other, n_lora) as memory_breakdown counts them: adapters of rank r beside every
    linear layer but the output head."""
    linear = [m for name, m in model.named_modules() if type(m) is nn.Linear and not name.endswith("lm_head")]
    n_total = sum(p.numel() for p in model.parameters())
    n_linear = sum(m.weight.numel() for m in linear)
    return n_linear, n_total - n_linear, sum(r * (m.in_features + m.out_features) for m in linear)


def _bytes_cases():
    """(description, n_linear, n_other, n_lora, {method: bytes})."""
    n_linear, n_other, n_lora = 1_000_000, 100_000, 10_000
    yield (f"n_linear={n_linear:,}, n_other={n_other:,}, n_lora={n_lora:,}", n_linear, n_other, n_lora,
           {method: _reference_bytes(n_linear, n_other, n_lora, method) for method in METHODS})
    for preset, label, r in [("gpt2", "GPT-2 124M", 64), ("gpt2", "GPT-2 124M", 8), ("tiny", "the tiny model", 8)]:
        with torch.device("meta"):  # shapes only: no memory, no time
            model = GPT2(GPT2Config.from_preset(preset))
        n_linear, n_other, n_lora = _lora_count(model, r)
        # The book's own numbers: memory_breakdown, which rounds the 4-bit bytes to a whole byte.
        want = {method: sum(memory_breakdown(model, method, r=r).values()) for method in METHODS}
        yield (f"{label} with rank-{r} adapters (n_linear={n_linear:,}, n_other={n_other:,}, n_lora={n_lora:,})",
               n_linear, n_other, n_lora, want)


def _bytes_variants(method: str) -> list[tuple[Callable[[int, int, int], float], str]]:
    """Wrong formulas for ``method`` and what each one forgot, as (bytes(n_linear, n_other, n_lora), hint)."""
    q = _QBITS
    two_states = ("Adam keeps two states per trained parameter (a running mean of the gradient and one of its "
                  "square), 4 bytes each: 8 bytes of optimizer state, so 4 + 4 + 8 = 16 bytes per trained "
                  "parameter, not 12")
    frozen = ("the base is frozen: it gets no gradient and no Adam states; only the n_lora adapter parameters "
              "are trained, at 16 bytes each")
    lora_fp32 = ("each adapter parameter is trained in float32: weight 4 + gradient 4 + two Adam states 8 = 16 "
                 "bytes")
    if method == "full":
        return [
            (lambda nl, no, nr: 12 * (nl + no), two_states),
            (lambda nl, no, nr: 16 * (nl + no) + 16 * nr,
             "full fine-tuning trains the weights themselves and has no adapters: leave n_lora out"),
            (lambda nl, no, nr: 4 * (nl + no),
             "that is the weights only; each parameter also has a float32 gradient (4 bytes) and two float32 "
             "Adam states (8): 16 bytes per parameter"),
            (lambda nl, no, nr: 8 * (nl + no),
             "that is the weights and their gradients; add Adam's two float32 states (8 bytes): 16 bytes per "
             "parameter"),
            (lambda nl, no, nr: 16 * nl,
             "every parameter is trained in full fine-tuning, n_other too: 16 * (n_linear + n_other)"),
        ]
    base_variants = []
    if method == "lora":
        base = lambda nl, no: 2 * (nl + no)  # noqa: E731
        base_variants = [
            (lambda nl, no, nr: 4 * (nl + no) + 16 * nr,
             "LoRA's frozen base costs 2 bytes per parameter, its bfloat16 weights and nothing else: frozen, it has "
             "no gradient and no Adam states (4 bytes would be a float32 base, or a gradient on top of bfloat16)"),
        ]
    else:
        base = lambda nl, no: nl * q / 8 + 4 * no  # noqa: E731
        base_variants = [
            (lambda nl, no, nr: nl * 4 / 8 + 4 * no + 16 * nr,
             "a 4-bit weight costs more than 4 bits: each block of 64 weights also stores its absmax, which "
             "double quantization brings down to 8 bits (plus a float32 per 256 blocks): "
             f"bits_per_parameter(64, double_quant=True) = {q:.4f} bits, divided by 8 for bytes"),
            (lambda nl, no, nr: nl * 4.5 / 8 + 4 * no + 16 * nr,
             "4.5 bits is NF4 with float32 absmaxes; QLoRA double-quantizes them: "
             f"bits_per_parameter(64, double_quant=True) = {q:.4f} bits"),
            (lambda nl, no, nr: (nl + no) * q / 8 + 16 * nr,
             "only the linear layers' weights are 4-bit; the n_other parameters (embeddings, norms, biases) stay "
             "in float32, 4 bytes each"),
            (lambda nl, no, nr: nl * q / 8 + 2 * no + 16 * nr,
             "prepare_for_kbit_training keeps the n_other parameters (embeddings, norms, biases) in float32: 4 "
             "bytes each, not 2"),
            (lambda nl, no, nr: nl * q / 8 + 16 * nr,
             "the n_other parameters (embeddings, norms, biases) are not quantized, but they are still there, in "
             "float32: add 4 * n_other"),
            (lambda nl, no, nr: nl * q + 4 * no + 16 * nr,
             "bits_per_parameter is in bits: divide by 8 for bytes"),
            (lambda nl, no, nr: nl * q / 8 + 4 * no + 4 * no + 16 * nr,
             "the n_other parameters are frozen too (prepare_for_kbit_training freezes the whole base): they get "
             "no gradient; only the n_lora adapter parameters are trained"),
        ]
    variants = [(lambda nl, no, nr, f=f: base(nl, no) + f * nr, h) for f, h in [
        (12, two_states),
        (2, f"{lora_fp32}, not 2"),
        (4, f"{lora_fp32}; you counted only their weights"),
        (14, "the adapters are float32, not bfloat16 like LoRA's base: weight 4 + gradient 4 + two Adam states 8 "
             "= 16 bytes each"),
        (0, "the adapters are missing: each of the n_lora parameters costs 16 bytes (float32 weight 4, gradient "
            "4, two Adam states 8)"),
    ]]
    grads = (4, 12, 14) if method == "lora" else (2, 4, 12, 14)  # lora's 2 is among base_variants
    variants += [(lambda nl, no, nr, g=g: base(nl, no) + g * (nl + no) + 16 * nr, frozen) for g in grads]
    return base_variants + variants


def _number(value, setting: str, method: str) -> float:
    value = as_number(value)
    if not is_number(value, numbers.Real):
        raise CheckFailed(
            f"For {setting} and method={method!r}, fine_tuning_bytes should return a number of bytes, but it "
            f"returned {returned(value)}."
        )
    return float(value)


def _close_bytes(got: float, want: float) -> bool:
    return math.isclose(got, want, rel_tol=1e-9, abs_tol=1.0)  # memory_breakdown rounds to a whole byte


def check_fine_tuning_bytes(fine_tuning_bytes: Callable[[int, int, int, str], float]) -> None:
    """Exercise 5.1: ``fine_tuning_bytes(n_linear, n_other, n_lora, method)``, the bytes of weights, gradients
    and Adam states to fine-tune with ``method`` in "full", "lora", "qlora" (as lora_edu.memory.memory_breakdown)."""
    cases = list(_bytes_cases())
    for method in METHODS:
        got = []
        for setting, n_linear, n_other, n_lora, want in cases:
            try:
                value = call_learner(fine_tuning_bytes, n_linear, n_other, n_lora, method)
            except (KeyError, ValueError) as err:
                raise learner_raised(
                    f"For method={method!r}, fine_tuning_bytes", err,
                    "handle the three methods 'full', 'lora' and 'qlora', spelled in lower case",
                ) from err
            got.append(_number(value, setting, method))
        if all(_close_bytes(g, case[4][method]) for g, case in zip(got, cases)):
            continue

        def matches(formula: Callable[[int, int, int], float]) -> bool:
            return all(_close_bytes(g, formula(*case[1:4])) for g, case in zip(got, cases))

        right = [lambda nl, no, nr, m=m: _reference_bytes(nl, no, nr, m) for m in METHODS]
        other_methods = [(formula, f"that is what method={other!r} takes: check which branch handles which "
                                   "name (the 'lora' base is bfloat16, the 'qlora' base 4-bit, and 'full' trains "
                                   "everything)")
                         for other, formula in zip(METHODS, right) if other != method]
        hint = first_hint(other_methods, matches)
        if hint is None:
            hint = first_hint(_bytes_variants(method), matches)
        if hint is None:
            hint = {
                "full": "every parameter is trained in float32: 16 * (n_linear + n_other)",
                "lora": "a bfloat16 base and float32 adapters: 2 * (n_linear + n_other) + 16 * n_lora",
                "qlora": ("4-bit linear weights, float32 others, float32 adapters: "
                          "n_linear * bits_per_parameter(64, double_quant=True) / 8 + 4 * n_other + 16 * n_lora"),
            }[method]
        i = next(i for i, (g, case) in enumerate(zip(got, cases)) if not _close_bytes(g, case[4][method]))
        setting, want = cases[i][0], cases[i][4][method]
        raise CheckFailed(
            f"For {setting} and method={method!r}, you returned {got[i]:,.0f} bytes but it takes {want:,.0f}: {hint}."
        )
    gpt2 = cases[1][4]
    passed(f"Correct: fine-tuning GPT-2 124M (rank-64 adapters) takes {gpt2['full'] / 2**30:.2f} GiB in full, "
          f"{gpt2['lora'] / 2**30:.2f} GiB with LoRA and {gpt2['qlora'] / 2**30:.2f} GiB with QLoRA, "
          "before activations.")


# ---------------------------------------------------------------------------
# Exercise 5.2: quantizing a GPT-2 and counting what stays in full precision.

_QUANT_CONFIG = GPT2Config(n_layer=2, n_head=2, n_embd=64, block_size=32)
_COUNT_CONFIGS = (_QUANT_CONFIG, GPT2Config(vocab_size=100, block_size=16, n_layer=3, n_head=3, n_embd=48))


def _seeded_model(config: GPT2Config, seed: int = 0) -> GPT2:
    """A GPT2 with random biases and norms too (GPT-2 starts them at 0 and 1), the learner's RNG untouched."""
    with seeded(seed):
        model = GPT2(config).eval()
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("bias") or ".ln_" in name:
                    p.add_(0.05 * torch.randn_like(p))
    return model


def _block_linears(model: nn.Module) -> list[str]:
    return [name for name, m in model.named_modules() if type(m) is nn.Linear and name != "lm_head"]


def _full_precision_count(model: GPT2) -> int:
    """The answer, from the unquantized model: every parameter (a tied one once) less the block linears' weights."""
    return sum(p.numel() for p in model.parameters()) - sum(
        model.get_submodule(name).weight.numel() for name in _block_linears(model))


def _quantize_hint_for_state(name: str, layer: NF4Linear, want: NF4Linear) -> str | None:
    if layer.blocksize != want.blocksize:
        return (f"{name} was quantized in blocks of {layer.blocksize}; use NF4Linear.from_linear's default "
                f"blocksize, {want.blocksize}")
    if layer.absmax_codes is None:
        return (f"{name} was quantized without double quantization (its absmaxes are float32); QLoRA "
                "double-quantizes them: NF4Linear.from_linear's default, double_quant=True")
    if layer.compute_dtype != want.compute_dtype:
        return (f"{name} computes in {layer.compute_dtype}; keep NF4Linear.from_linear's default compute_dtype, "
                f"{want.compute_dtype}")
    if (layer.bias is None) != (want.bias is None):
        return (f"{name} lost its bias: quantize the whole layer with NF4Linear.from_linear(layer), which keeps "
                "the bias in float32")
    if layer.bias is not None and not torch.equal(layer.bias, want.bias):
        return f"{name}'s bias changed; NF4Linear.from_linear(layer) keeps it as it was"
    for buffer in ("weight_packed", "absmax", "absmax_codes", "absmax_scales", "absmax_offset"):
        mine, theirs = getattr(layer, buffer), getattr(want, buffer)
        if (mine is None) != (theirs is None) or (mine is not None and not torch.equal(mine, theirs)):
            return (f"{name}'s {buffer} differs from NF4Linear.from_linear of the original layer: quantize each "
                    "layer's own weights once, with NF4Linear.from_linear(layer) and its defaults")
    return None


def _check_quantized(model: GPT2, original: GPT2, got) -> None:
    refuse_dotted_attributes(model)
    names = _block_linears(original)
    modules = dict(model.named_modules())
    done = [n for n in names if isinstance(modules.get(n), NF4Linear)]
    if not done:
        if isinstance(got, nn.Module) and got is not model and any(isinstance(m, NF4Linear) for m in got.modules()):
            raise CheckFailed(
                "You returned a new, quantized model and left the one passed in as it was: replace the layers in "
                "place, on the model you were given (setattr on each layer's parent), and return that model."
            )
        raise CheckFailed(
            f"None of the linear layers in the blocks became an NF4Linear: they sit deep inside the model (like "
            f"{names[0]}), so walk model.named_modules(), not named_children(), and replace each on its parent "
            "module with NF4Linear.from_linear(layer)."
        )
    missing = [n for n in names if n not in done]
    if missing:
        raise CheckFailed(
            f"{missing[0]} should have become an NF4Linear but is {type(modules.get(missing[0])).__name__}: "
            "replace every nn.Linear of the model except lm_head."
        )
    if isinstance(model.lm_head, NF4Linear) or not isinstance(model.lm_head, nn.Linear):
        raise CheckFailed(
            f"You replaced lm_head too (it is now {type(model.lm_head).__name__}): leave the output head alone, "
            "as quantize_model does (exclude=('lm_head',)); its weight is the token embedding "
            "transformer.wte.weight (tied), which stays in float."
        )
    if model.lm_head.weight is not model.transformer.wte.weight:
        raise CheckFailed(
            "lm_head.weight is no longer the very tensor transformer.wte.weight (GPT-2 ties them): leave lm_head "
            "as it was."
        )
    for name in names:
        hint = _quantize_hint_for_state(name, modules[name], NF4Linear.from_linear(original.get_submodule(name)))
        if hint is not None:
            raise CheckFailed(f"{hint}.")
    params = dict(model.named_parameters())
    block_weights = {f"{n}.weight" for n in names}
    for name, p in original.named_parameters():
        if name in block_weights:
            continue
        if name not in params:
            raise CheckFailed(f"The parameter {name} disappeared from the model: replace only the linear layers.")
        if params[name].dtype != p.dtype or not torch.equal(params[name].detach(), p.detach()):
            raise CheckFailed(f"The parameter {name} changed: quantizing replaces the linear layers and leaves "
                              "embeddings, norms and lm_head as they were.")
    if got is None:
        raise CheckFailed("quantize_linears quantized the model but returned None: end with `return model`.")
    if got is not model:
        raise CheckFailed(
            f"quantize_linears should return the model it was given (changed in place), but it returned "
            f"{returned(got)}."
        )


def _check_count(count_full_precision: Callable[[nn.Module], int]) -> None:
    for config in _COUNT_CONFIGS:
        original = _seeded_model(config, seed=1)
        want = _full_precision_count(original)
        model = quantize_model(copy.deepcopy(original))
        got = as_number(call_learner(count_full_precision, model))
        if not is_number(got, numbers.Integral):
            raise CheckFailed(f"count_full_precision should return an int, but it returned {returned(got)}.")
        got = int(got)
        if got == want:
            continue
        layers = [m for m in model.modules() if isinstance(m, NF4Linear)]
        buffers = sum(b.numel() for b in model.buffers())
        packed = sum(m.weight_packed.numel() for m in layers)
        float_buffers = sum(b.numel() for b in model.buffers() if b.is_floating_point())
        biases = sum(m.bias.numel() for m in layers if m.bias is not None)
        weights = sum(m.in_features * m.out_features for m in layers)
        tied = model.transformer.wte.weight.numel()
        hints = {
            tied: ("lm_head.weight is the very tensor transformer.wte.weight (tied): count it once, as "
                   "model.parameters() does"),
            **{extra: ("the 4-bit weights and their absmaxes are buffers (weight_packed, absmax_codes, ...), not "
                       "parameters: count model.parameters() only, not model.buffers()")
               for extra in (buffers, packed, 2 * packed, float_buffers, buffers + tied)},
            -biases: ("the 4-bit layers keep their biases as float32 parameters (NF4Linear.bias, frozen: "
                      "requires_grad=False): count every parameter, trainable or not"),
            weights: ("the block linears' weights are 4-bit now and no longer parameters: count what "
                      "model.parameters() holds after quantizing"),
        }
        hint = hints.get(got - want, "count the parameters the quantized model still holds, each tensor once")
        raise CheckFailed(
            f"For a quantized GPT2 with {config.n_layer} layers and n_embd={config.n_embd}, you counted {got:,} "
            f"parameters in full precision but it holds {want:,} (off by {got - want:+,}): {hint}."
        )


def check_quantize_and_count(quantize_linears: Callable[[nn.Module], nn.Module],
                             count_full_precision: Callable[[nn.Module], int]) -> None:
    """Exercise 5.2: ``quantize_linears(model)`` puts NF4Linear.from_linear(layer) in place of every nn.Linear but
    lm_head and returns the model; ``count_full_precision(model)`` counts the parameters left in floating point."""
    original = _seeded_model(_QUANT_CONFIG)
    model = copy.deepcopy(original)
    got = call_learner(quantize_linears, model)
    _check_quantized(model, original, got)
    reference = quantize_model(copy.deepcopy(original))
    idx = torch.randint(0, _QUANT_CONFIG.vocab_size, (2, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        if not torch.allclose(model(idx), reference(idx), rtol=1e-5, atol=1e-6):
            raise CheckFailed(
                "Your quantized model computes other logits than quantize_model's: replace each linear layer by "
                "NF4Linear.from_linear(layer) and change nothing else."
            )
    _check_count(count_full_precision)
    n_float = _full_precision_count(original)
    n_all = sum(p.numel() for p in original.parameters())
    passed(f"Correct: {len(_block_linears(original))} linear layers in 4 bits, lm_head tied and untouched, and "
          f"{n_float:,} of the model's {n_all:,} parameters left in float32.")


# ---------------------------------------------------------------------------
# Exercise 5.3: one QLoRA training step.

_MAX_NORM = 0.3
_LR = 1e-2


def _qlora_model() -> GPT2:
    """A small GPT2 with a 4-bit base and rank-4 adapters, the same every time, the learner's RNG untouched."""
    with seeded(0):
        model = GPT2(GPT2Config(n_layer=2, n_head=2, n_embd=64, block_size=32))
        quantize_model(model)
        prepare_for_kbit_training(model, gradient_checkpointing=False)
        add_lora(model, "all-linear", r=4, alpha=8)
    return model


def _is_lora(name: str) -> bool:
    return ".lora_A." in name or ".lora_B." in name


def _setup() -> tuple[GPT2, torch.optim.Optimizer]:
    model = _qlora_model()
    return model, torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=_LR)


def _batches() -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    """Two batches whose gradient norms (about 2.0, then 0.9) both exceed 0.3, one above 1 and one below."""
    g = torch.Generator().manual_seed(5)
    x1, y1 = torch.full((4, 32), 97), torch.full((4, 32), 98)  # "aaa..." -> "bbb...": a large gradient
    x2 = torch.randint(0, 256, (4, 32), generator=g)
    return [("the first step", x1, y1), ("the second step", x2, torch.full((4, 32), 7))]


def _trainable(model: nn.Module) -> list[torch.Tensor]:
    return [p for p in model.parameters() if p.requires_grad]


def _reference_step(model, optimizer, x, y, variant: str = "right") -> tuple[float, float]:
    """One step (loss before it, gradient norm before clipping), right or wrong in one way."""
    if variant != "no zero_grad":
        optimizer.zero_grad()
    _, loss = model(x, y)
    if variant == "step before backward":
        optimizer.step()
    loss.backward()
    max_norm = {"no clipping": math.inf, "clip at 1.0": 1.0}.get(variant, _MAX_NORM)
    norm = torch.nn.utils.clip_grad_norm_(_trainable(model), max_norm)
    if variant != "step before backward":
        optimizer.step()
    return loss.item(), norm.item()


_STEP_VARIANTS = {
    "step before backward": ("optimizer.step() came before loss.backward(), so it stepped on no gradients (or last "
                             "step's): back-propagate first, clip, then step"),
    "no zero_grad": ("the gradients of the first step were still there: loss.backward() adds to .grad, so call "
                     "optimizer.zero_grad() at the start of each step"),
    "no clipping": ("the gradients were not clipped: call torch.nn.utils.clip_grad_norm_(trainable_params, 0.3) "
                    "between loss.backward() and optimizer.step()"),
    "clip at 1.0": ("you clipped the gradient norm at 1.0, the usual default; QLoRA clips at max_grad_norm=0.3: "
                    "torch.nn.utils.clip_grad_norm_(trainable_params, 0.3)"),
}


def _lora_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if _is_lora(n)}


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max((a[n].double() - b[n].double()).abs().max().item() for n in a)


def _close_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return all(torch.allclose(a[n], b[n], rtol=1e-5, atol=1e-7) for n in a)


def _diagnose_parameters(k: int, got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], batches) -> str:
    if _close_state(got, _lora_state(_qlora_model())):
        return ("they have not changed at all: call optimizer.step(), on the optimizer passed in, after "
                "loss.backward(), since it steps on the gradients that backward computes")
    for variant, hint in _STEP_VARIANTS.items():
        model, optimizer = _setup()
        for _, x, y in batches[:k + 1]:
            _reference_step(model, optimizer, x, y, variant)
        state = _lora_state(model)
        if _close_state(got, state) and not _close_state(state, want):
            return hint
    return ("the step is optimizer.zero_grad(); _, loss = model(x, y); loss.backward(); "
            "torch.nn.utils.clip_grad_norm_(trainable_params, 0.3); optimizer.step(), with the optimizer passed in")


def _check_gradients(step: str, model: nn.Module, unclipped: float) -> None:
    grads = [p.grad for n, p in model.named_parameters() if _is_lora(n) and p.grad is not None]
    if not grads or all(not g.any() for g in grads):
        return  # zeroed after the step: nothing to see, and nothing wrong
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.double()) for g in grads])).item()
    want = min(unclipped, _MAX_NORM)
    if math.isclose(norm, want, rel_tol=1e-4):
        return
    if math.isclose(norm, unclipped, rel_tol=1e-4):
        hint = _STEP_VARIANTS["no clipping"]
    elif math.isclose(norm, 1.0, rel_tol=1e-4):
        hint = _STEP_VARIANTS["clip at 1.0"]
    else:
        return  # gradients of another kind (accumulated, say): the parameters will tell
    raise CheckFailed(
        f"After {step}, the adapters' gradients have norm {norm:.4f}, but clipped at 0.3 they should have norm "
        f"{want:.4f} (the raw gradient's norm is {unclipped:.4f}): {hint}."
    )


def check_training_step(training_step: Callable) -> None:
    """Exercise 5.3: ``training_step(model, optimizer, x, y)`` zeroes the gradients, back-propagates the loss, clips
    the gradient norm of the trainable parameters to 0.3, steps, and returns the loss before the step as a float."""
    batches = _batches()
    model, optimizer = _setup()
    reference, ref_optimizer = _setup()
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not _is_lora(n)}
    frozen.update({f"buffer {n}": b.clone() for n, b in model.named_buffers()})
    for k, (step, x, y) in enumerate(batches):
        got = call_learner(training_step, model, optimizer, x.clone(), y.clone())
        want_loss, unclipped = _reference_step(reference, ref_optimizer, x, y)
        if isinstance(got, torch.Tensor):
            raise CheckFailed(
                "training_step returned a tensor: return loss.item(), a Python float (a loss tensor kept for logging "
                "keeps the whole graph of its step alive, and a detached one its memory on the device)."
            )
        if not is_number(got, numbers.Real):
            raise CheckFailed(f"training_step should return the loss as a float, but it returned {returned(got)}.")
        unfrozen = next((n for n, p in model.named_parameters() if p.requires_grad and not _is_lora(n)), None)
        if unfrozen is not None:
            raise CheckFailed(
                f"After {step}, {unfrozen} requires grad: the base is frozen in QLoRA, and only the adapters train; "
                "do not call requires_grad_(True) (or model.requires_grad_()) in the step."
            )
        refrozen = next((n for n, p in model.named_parameters() if _is_lora(n) and not p.requires_grad), None)
        if refrozen is not None:
            raise CheckFailed(f"After {step}, {refrozen} no longer requires grad: leave the adapters trainable.")
        params, buffers = dict(model.named_parameters()), dict(model.named_buffers())
        for name, before in frozen.items():
            now = buffers[name[len("buffer "):]] if name.startswith("buffer ") else params[name]
            if not torch.equal(now.detach(), before):
                raise CheckFailed(f"After {step}, {name} of the frozen base changed: only the adapters may change.")
        _check_gradients(step, model, unclipped)
        got_state, want_state = _lora_state(model), _lora_state(reference)
        if not _close_state(got_state, want_state):
            hint = _diagnose_parameters(k, got_state, want_state, batches)
            off = _max_diff(got_state, want_state)
            raise CheckFailed(f"After {step}, the adapters differ from one right step by up to {off:.3g}: {hint}.")
        got = float(got)
        if not math.isclose(got, want_loss, rel_tol=1e-5, abs_tol=1e-6):
            with torch.no_grad():
                _, after = model(x, y)
            if math.isclose(got, after.item(), rel_tol=1e-5, abs_tol=1e-6):
                hint = ("that is the loss after the step, computed again; return the loss of the forward pass you "
                        "back-propagated, loss.item(), from before optimizer.step()")
            else:
                hint = "return loss.item() of the loss that _, loss = model(x, y) gives"
            raise CheckFailed(f"For {step}, you returned the loss {got:.6f} but it is {want_loss:.6f}: {hint}.")
    passed("Correct: zero the gradients, back-propagate, clip to norm 0.3, step; only the adapters change and the "
          "4-bit base stays as it was.")


# ---------------------------------------------------------------------------
# Exercise 5.4 (open): how the round-trip error depends on the block size.

ERROR_TOLERANCE = 1.1  # "about as good as blocksize 64": at most 10% more squared error


def _roundtrip_mse(w: torch.Tensor, blocksize: int) -> float:
    packed, state = quantize_nf4(w, blocksize)
    return float(((dequantize_nf4(packed, state).float() - w.float()) ** 2).mean())


def _dq_mse(w: torch.Tensor, blocksize: int) -> float:
    packed, state = quantize_nf4(w, blocksize, double_quant=True)
    return float(((dequantize_nf4(packed, state).float() - w.float()) ** 2).mean())


def _judge_error(got, want: float, where: str, w: torch.Tensor, blocksize: int) -> None:
    got = as_number(got)
    if not is_number(got):
        raise CheckFailed(f"roundtrip_error should return a Python float, got {returned(got)}.")
    if math.isclose(got, want, rel_tol=1e-4, abs_tol=1e-12):
        return
    packed, state = quantize_nf4(w, blocksize)
    diff = dequantize_nf4(packed, state).float() - w.float()
    absmax = state.block_absmax().repeat_interleave(blocksize)[: w.numel()].view_as(w).float()
    variants = [
        (float(diff.abs().mean()), "that is the mean absolute error; the exercise asks for the mean squared error"),
        (float(diff.pow(2).mean().sqrt()), "that is the root of the mean squared error; report the mean squared "
                                           "error itself"),
        (float(diff.pow(2).sum()), "that is a sum over all the weights; a mean makes weights of any size comparable"),
        (float((diff / absmax).pow(2).mean()), "you measured the error of the normalised values (divided by each "
                                               "block's absmax); measure it on the weight as the model uses it"),
        (_dq_mse(w, blocksize), "you used double quantization; measure NF4 with float32 absmaxes "
                                "(double_quant=False), so that the block size is the only thing that changes"),
        (0.0, "the error is exactly zero: did you compare the weight with itself instead of with its "
              "quantize-then-dequantize copy?"),
    ]
    hint = first_hint(variants, lambda value: math.isclose(got, value, rel_tol=1e-4, abs_tol=1e-12),
                      "quantize the weight with the given block size, dequantize it, and average the squared "
                      "differences from the original")
    raise CheckFailed(f"For {where} at blocksize {blocksize}, roundtrip_error gave {got:.4g} but the mean squared "
                      f"round-trip error is {want:.4g}: {hint}.")


def check_blocksize_experiment(roundtrip_error: Callable, w: torch.Tensor, errors: dict, largest_ok) -> None:
    """Exercise 5.4: ``roundtrip_error(w, blocksize)`` is NF4's mean squared round-trip error of ``w``;
    ``errors`` maps block sizes to it on ``w``; ``largest_ok`` is the largest block size tried whose
    error is at most ERROR_TOLERANCE times blocksize 64's."""
    g = torch.Generator().manual_seed(5)
    probe = torch.randn(96, 64, generator=g) * 0.02
    probe[3, 7] = 0.5  # one outlier: it sets its block's absmax
    for blocksize in (64, 256):
        got = call_learner(roundtrip_error, probe.clone(), blocksize)
        _judge_error(got, _roundtrip_mse(probe, blocksize), "a 96 x 64 test weight", probe, blocksize)
    if not isinstance(errors, dict) or not errors:
        raise CheckFailed(f"errors should be a dict from block size to error, got {returned(errors)}.")
    sizes = sorted(errors)
    if 64 not in errors:
        raise CheckFailed("errors has no entry for blocksize 64, the size every other one is compared with.")
    if len(sizes) < 4:
        raise CheckFailed(f"You tried only {sizes}: try at least four block sizes, from 32 up to a few thousand, to "
                          "see the trend.")
    for blocksize in sizes:
        _judge_error(errors[blocksize], _roundtrip_mse(w, blocksize), "your weight w", w, blocksize)
    answer = max(b for b in sizes if errors[b] <= ERROR_TOLERANCE * errors[64])
    if largest_ok != answer:
        if isinstance(largest_ok, int) and largest_ok in errors and errors[largest_ok] > ERROR_TOLERANCE * errors[64]:
            hint = (f"its error is {errors[largest_ok] / errors[64]:.2f} times blocksize 64's, more than "
                    f"{ERROR_TOLERANCE:g} times")
        else:
            hint = "a larger block size you measured still stays within the tolerance"
        raise CheckFailed(f"largest_ok is {largest_ok!r}, but {hint}: read your own measurements again.")
    saved = bits_per_parameter(64) - bits_per_parameter(answer)
    passed(f"Correct: up to blocksize {answer} the error stays within {ERROR_TOLERANCE:g}x blocksize 64's, and "
          f"the absmaxes cost {saved:.2f} bits per weight less than at 64 (without double quantization).")
