"""Checkers for chapter 2's exercises: the LoRA forward pass, merging, injecting, counting."""

from __future__ import annotations

from functools import lru_cache
from typing import Callable

import torch
import torch.nn as nn

from lora_edu.checks.core import (CheckFailed, as_number, call_learner, counting_configs, expect_shape, expect_tensor,
                                  first_changed, first_hint, is_number, learner_raised, name_of, passed,
                                  refuse_dotted_attributes, returned, seeded)
from lora_edu.gpt2 import GPT2, GPT2Config
from lora_edu.lora import add_lora, count_parameters, name_matches
from lora_edu.lora_layer import LoRALinear

__all__ = [
    "RANK_MARGIN",
    "check_count_lora_parameters",
    "check_inject_lora",
    "check_lora_forward",
    "check_merge_unmerge",
    "check_smallest_rank",
    "rank_toy",
]


def _call_with_shapes(fn: Callable, hint: str, *args):
    """Like call_learner, but a shape error inside the learner's code becomes a hint."""
    try:
        return call_learner(fn, *args)
    except RuntimeError as err:
        raise learner_raised(name_of(fn), err, hint) from err


def _close(got: torch.Tensor, want: torch.Tensor) -> bool:
    return got.shape == want.shape and torch.allclose(got.double(), want.double(), rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------
# Exercise 2.1: the forward pass of a LoRA layer.


def _lora_forward_cases():
    g = torch.Generator().manual_seed(0)
    in_f, out_f = 6, 4
    cases = []
    for x_shape, alpha, r in [((5, in_f), 16.0, 4), ((2, 3, in_f), 3.0, 2)]:
        x = torch.randn(*x_shape, generator=g, dtype=torch.float64)
        W0 = torch.randn(out_f, in_f, generator=g, dtype=torch.float64)
        b0 = torch.randn(out_f, generator=g, dtype=torch.float64)
        A = torch.randn(r, in_f, generator=g, dtype=torch.float64)
        B = torch.randn(out_f, r, generator=g, dtype=torch.float64)  # non-zero, so the LoRA path shows
        cases.append((x, W0, b0, A, B, alpha, r))
    return cases


def check_lora_forward(lora_forward: Callable) -> None:
    """Exercise 2.1: ``lora_forward(x, W0, b0, A, B, alpha, r)`` is x W0^T + b0 + (alpha / r) (x A^T) B^T."""
    for x, W0, b0, A, B, alpha, r in _lora_forward_cases():
        args = (x, W0, b0, A, B)
        got = _call_with_shapes(
            lora_forward,
            "W0 is (out, in), A is (r, in) and B is (out, r), so compute x @ W0.T and (x @ A.T) @ B.T, "
            "which work for any number of leading dimensions of x",
            *(t.clone() for t in args), alpha, r,
        )
        got = expect_tensor(got, "lora_forward")
        base, lora, scaling = x @ W0.T, (x @ A.T) @ B.T, alpha / r
        want = base + b0 + scaling * lora
        setting = f"x of shape {tuple(x.shape)}, alpha={alpha:g} and r={r}"
        expect_shape(
            got, want.shape, f"For {setting}, the output",
            {tuple(want.transpose(-1, -2).shape):
             "you returned the transpose; multiply x on the left, x @ W0.T and (x @ A.T) @ B.T"},
            otherwise="keep x's leading dimensions and end with out_features: x @ W0.T and (x @ A.T) @ B.T do that",
        )
        if _close(got, want):
            continue
        wrong = [
            *([(base + b0 + (alpha // r) * lora,
                f"alpha // r is integer division, which truncates ({alpha:g} // {r} is {alpha // r:g}, "
                f"not {alpha / r:.3g}); use alpha / r")] if alpha % r else []),
            (base + b0 + alpha * lora, "you scaled the LoRA path by alpha, but the scaling is alpha / r"),
            (base + b0 + (r / alpha) * lora, "you scaled the LoRA path by r / alpha, but the scaling is alpha / r"),
            (base + b0 + lora, "the LoRA path is not scaled; multiply (x @ A.T) @ B.T by alpha / r"),
            (base + scaling * lora, "the bias is missing; the frozen layer computes x @ W0.T + b0"),
            (scaling * lora, "you return only the LoRA path; add the frozen layer's output x @ W0.T + b0 to it"),
            (b0 + scaling * lora, "the frozen weight's path x @ W0.T is missing; LoRA adds its update to it"),
            (base + b0, "the LoRA path is missing; add (alpha / r) * (x @ A.T) @ B.T to the frozen layer's output"),
        ]
        hint = first_hint(wrong, lambda variant: _close(got, variant),
                          "compute x @ W0.T + b0 + (alpha / r) * (x @ A.T) @ B.T")
        error = (got.double() - want).abs().max().item()
        raise CheckFailed(f"For {setting}, your output is off by up to {error:.3g}: {hint}.")
    passed("Correct: your LoRA layer computes x W0^T + b0 + (alpha / r) (x A^T) B^T.")


# ---------------------------------------------------------------------------
# Exercise 2.2: merging the update into the weight, and taking it out again.

_MATMUL_HINT = (
    "B is (out, r) and A is (r, in), so the update is B @ A (not A @ B), an (out, in) matrix like the weight"
)


def _check_weight_function(fn: Callable, name: str, first: str, args: dict, alpha, r, want, wrong) -> None:
    originals = {k: v.clone() for k, v in args.items()}
    given = {k: v.clone() for k, v in args.items()}
    got = expect_tensor(_call_with_shapes(fn, _MATMUL_HINT, *given.values(), alpha, r), name)
    setting = f"a {want.shape[0]} x {want.shape[1]} {first}, alpha={alpha:g} and r={r}"
    op = "+" if name == "merge" else "-"
    expect_shape(got, want.shape, f"For {setting}, {name}'s result",
                 otherwise=_MATMUL_HINT.replace("not A @ B", "with no transpose"))
    if not _close(got, want):
        hint = first_hint(wrong, lambda variant: _close(got, variant),
                          f"{name} should return {first} {op} (alpha / r) * B @ A")
        error = (got.double() - want).abs().max().item()
        raise CheckFailed(f"For {setting}, {name}'s result is off by up to {error:.3g}: {hint}.")
    changed = first_changed(given, originals)
    if changed == first:
        raise CheckFailed(
            f"{name} changed its argument {first} in place; leave the inputs alone and return a new tensor "
            f"(write {first} {op} ..., not {first} {op}= ... or {first}.{'add_' if op == '+' else 'sub_'}(...))."
        )
    if changed is not None:
        raise CheckFailed(
            f"{name} changed its argument {changed} in place (with *= or a method such as mul_); compute the "
            f"scaled update as a new tensor and leave {changed} as it was."
        )


def check_merge_unmerge(merge: Callable, unmerge: Callable) -> None:
    """Exercise 2.2: ``merge(W0, A, B, alpha, r)`` is W0 + (alpha / r) B A; ``unmerge(W, A, B, alpha, r)`` undoes it."""
    g = torch.Generator().manual_seed(1)
    out_f, in_f = 5, 7
    for alpha, r in [(16.0, 4), (3.0, 2)]:
        W0 = torch.randn(out_f, in_f, generator=g, dtype=torch.float64)
        A = torch.randn(r, in_f, generator=g, dtype=torch.float64)
        B = torch.randn(out_f, r, generator=g, dtype=torch.float64)
        BA, scaling = B @ A, alpha / r
        merged = W0 + scaling * BA
        _check_weight_function(merge, "merge", "W0", {"W0": W0, "A": A, "B": B}, alpha, r, merged, [
            (W0 + BA, "merge forgot the scaling; add (alpha / r) * B @ A, not B @ A"),
            (W0 + alpha * BA, "you scaled by alpha, but the scaling is alpha / r"),
            (W0 + (r / alpha) * BA, "you scaled by r / alpha, but the scaling is alpha / r"),
            (W0 - scaling * BA, "merge subtracted the update; it should add (alpha / r) * B @ A to W0"),
            (scaling * BA, "merge returned only the update; add it to W0"),
        ])
        _check_weight_function(unmerge, "unmerge", "W", {"W": merged, "A": A, "B": B}, alpha, r, W0, [
            (merged + scaling * BA, "unmerge added the update again; subtract it, W - (alpha / r) * B @ A"),
            (merged - BA, "unmerge forgot the scaling; subtract (alpha / r) * B @ A, not B @ A"),
            (merged - alpha * BA, "you scaled by alpha, but the scaling is alpha / r"),
            (merged - (r / alpha) * BA, "you scaled by r / alpha, but the scaling is alpha / r"),
            (merged, "unmerge returned W unchanged; subtract (alpha / r) * B @ A from it"),
        ])
    # The round trip, on a weight the size of a real layer, in float32 as in a model.
    W0 = torch.randn(64, 48, generator=g) * 0.02
    A, B = torch.randn(8, 48, generator=g), torch.randn(64, 8, generator=g)
    back = expect_tensor(call_learner(unmerge, call_learner(merge, W0.clone(), A, B, 16.0, 8), A, B, 16.0, 8), "unmerge")
    if back.shape != W0.shape or not torch.allclose(back.double(), W0.double(), atol=1e-5):
        raise CheckFailed(
            "unmerge(merge(W0)) should give back W0 (up to float rounding) but does not: unmerge must subtract "
            "exactly the (alpha / r) * B @ A that merge adds, for any sizes, alpha and r."
        )
    passed("Correct: merge adds (alpha / r) B A to W0 and unmerge takes it out again.")


# ---------------------------------------------------------------------------
# Exercise 2.3: putting LoRA layers into a model.

_INJECT_CASES = [(["c_attn", "mlp.c_proj"], 4, 8), (["c_fc"], 2, 3.0), (["c_proj"], 1, 1), (["proj"], 4, 8), (["attn"], 4, 8)]


def _small_model() -> GPT2:
    return GPT2(GPT2Config(vocab_size=50, block_size=16, n_layer=2, n_head=2, n_embd=32)).eval()


def _matches(name: str, names: list[str]) -> bool:
    return any(name_matches(name, t) for t in names)


def check_inject_lora(inject_lora: Callable) -> None:
    """Exercise 2.3: ``inject_lora(model, names, r, alpha)`` wraps the matching nn.Linear layers in place."""
    for names, r, alpha in _INJECT_CASES:
        with seeded(0):  # the same model every time, and the learner's RNG untouched
            model = _small_model()
            before = dict(model.named_modules())
            expected = sorted(n for n, m in before.items() if isinstance(m, nn.Linear) and _matches(n, names))
            idx = torch.randint(0, 50, (2, 8))
            with torch.no_grad():
                logits = model(idx)
            try:
                got = call_learner(inject_lora, model, list(names), r, alpha)
            except TypeError as err:
                if "base_layer must be nn.Linear" not in str(err):
                    raise
                raise CheckFailed(
                    f"For names={names}, you tried to wrap a module that is not a linear layer ({err}): "
                    "wrap a module only if isinstance(module, nn.Linear) and its name matches."
                ) from err
            _check_injected(model, names, r, alpha, before, expected)
            with torch.no_grad():
                changed = not torch.allclose(model(idx), logits, atol=1e-6)
        if changed:
            layers = {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}
            if any(layer.base_layer is not before[n] for n, layer in layers.items()):
                hint = "wrap the model's own layer, LoRALinear(module, r, alpha), so that its pretrained weights stay"
            else:
                hint = "B starts at zero (LoRALinear does that) so the model computes what it did before; do not re-initialise A and B"
            raise CheckFailed(f"For names={names}, the model's outputs changed right after injecting LoRA: {hint}.")
        _check_returned(got, names, expected)
    passed("Correct: inject_lora wraps exactly the matching linear layers and returns their names.")


def _check_injected(model: nn.Module, names, r, alpha, before: dict[str, nn.Module], expected: list[str]) -> None:
    refuse_dotted_attributes(model)
    actual = sorted(n for n, m in model.named_modules() if isinstance(m, LoRALinear))
    missing = [n for n in expected if n not in actual]
    extra = [n for n in actual if n not in expected]
    if expected and not actual:
        raise CheckFailed(
            f"For names={names}, no layer of the model became a LoRALinear: the targets sit deep inside the model "
            f"(like {expected[0]}), so walk model.named_modules(), not named_children(), and replace each match "
            "on its parent module."
        )
    if missing:
        if all(any("." in t and n.endswith("." + t) for t in names) for n in missing):
            hint = (
                "a name can have several parts, like 'mlp.c_proj': a module matches when its full name equals "
                "a name or ends with '.' + name, so do not compare only the last part"
            )
        else:
            hint = "replace every nn.Linear whose full name equals one of names or ends with '.' + name"
        raise CheckFailed(
            f"For names={names}, {missing[0]} should have become a LoRALinear but is still "
            f"{type(model.get_submodule(missing[0])).__name__}: {hint}."
        )
    if extra:
        first = extra[0]
        if first == "lm_head" or first.endswith(".lm_head"):
            hint = "lm_head is not among names; wrap only the layers whose names match"
        elif any(t in first for t in names):
            t = next(t for t in names if t in first)
            hint = (
                f"a module matches only when its full name equals a name or ends with '.' + name, so {t!r} does "
                f"not match {first.rpartition('.')[2]!r}: compare whole parts of the name, not substrings"
            )
        else:
            hint = "wrap only the layers whose full name equals a name or ends with '.' + name"
        raise CheckFailed(f"For names={names}, you also wrapped {first}, which should not be wrapped: {hint}.")
    for name, module in before.items():
        if name and name not in expected and model.get_submodule(name) is not module:
            raise CheckFailed(
                f"For names={names}, {name} was replaced by a {type(model.get_submodule(name)).__name__} though it "
                "is not a target: leave every other module as it is."
            )
    for name in expected:
        layer = model.get_submodule(name)
        if (layer.r, layer.alpha) != (r, alpha):
            raise CheckFailed(
                f"inject_lora was called with r={r} and alpha={alpha:g} but {name} has r={layer.r} and "
                f"alpha={layer.alpha:g}: pass them through, LoRALinear(module, r, alpha)."
            )


def _check_returned(got, names, expected: list[str]) -> None:
    if not isinstance(got, list):
        raise CheckFailed(
            f"inject_lora should return a list of the full names it replaced, but it returned {returned(got)}."
        )
    if got == expected:
        return
    if sorted(got) == expected:
        hint = "return them sorted, sorted(replaced)"
    elif sorted(got) == sorted(n.split(".")[-1] for n in expected) or (
        expected and all(isinstance(n, str) and "." not in n for n in got)
    ):
        hint = f"return full module names like {expected[0]!r}, not the last part only"
    else:
        hint = "return the full names of exactly the layers you replaced"
    raise CheckFailed(f"For names={names}, inject_lora returned {got} but should return {expected}: {hint}.")


# ---------------------------------------------------------------------------
# Exercise 2.4: how many parameters LoRA trains.


@lru_cache(maxsize=None)
def _true_lora_count(config: GPT2Config, targets: tuple[str, ...], r: int) -> int:
    with torch.device("meta"):  # shapes only: GPT-2 costs no memory and no time
        model = add_lora(GPT2(config), list(targets), r=r)
    return count_parameters(model)[0]


def _block_layers(config: GPT2Config, targets, hidden: int = 4, qkv: int = 3, skip: str = "") -> list[tuple[int, int]]:
    """(in, out) of the matching linear layers in one block, for the wrong answers below."""
    d = config.n_embd
    shapes = {"attn.c_attn": (d, qkv * d), "attn.c_proj": (d, d), "mlp.c_fc": (d, hidden * d), "mlp.c_proj": (hidden * d, d)}
    return [shape for name, shape in shapes.items() if name != skip and _matches(name, targets)]


def check_count_lora_parameters(count_lora_parameters: Callable[[GPT2Config, list, int], int]) -> None:
    """Exercise 2.4: ``count_lora_parameters(config, targets, r)`` is what add_lora makes trainable."""
    configs = counting_configs()
    for name, config in configs.items():
        for targets in (["c_attn"], ["c_proj"], ["c_attn", "c_fc"]):
            for r in (1, 8):
                got = as_number(call_learner(count_lora_parameters, config, list(targets), r))
                if not is_number(got, int):
                    raise CheckFailed(f"count_lora_parameters should return an int, got {type(got).__name__}.")
                want = _true_lora_count(config, tuple(targets), r)
                if got == want:
                    continue
                L, layers = config.n_layer, _block_layers(config, targets)
                lora = lambda shapes: L * sum(r * (i + o) for i, o in shapes)  # noqa: E731
                wrong = [
                    (L * sum(r * i * o for i, o in layers),
                     "A (r x in) and B (out x r) hold r * (in + out) parameters, not r * in * out"),
                    (lora(layers) // L,
                     f"that is one block's worth; each of the {L} blocks gets its own LoRA layers, so multiply by n_layer"),
                    (lora(_block_layers(config, targets, skip="attn.c_proj")),
                     "'c_proj' matches two layers in every block, attn.c_proj and mlp.c_proj; count both"),
                    (lora(_block_layers(config, targets, skip="mlp.c_proj")),
                     "'c_proj' matches two layers in every block, attn.c_proj and mlp.c_proj; count both"),
                    (lora(_block_layers(config, targets, hidden=1)),
                     "the MLP is 4 times wider, as c_fc maps n_embd to 4 * n_embd and mlp.c_proj maps 4 * n_embd back"),
                    (lora(_block_layers(config, targets, qkv=1)),
                     "c_attn computes q, k and v at once, so it maps n_embd to 3 * n_embd"),
                    (want + L * sum(i * o + o for i, o in layers),
                     "only A and B are trainable; do not count the frozen base weights and biases"),
                ]
                hint = first_hint(wrong, lambda value: value == got and value != want,
                                  "add r * (in + out) for every matching linear layer in every block")
                raise CheckFailed(
                    f"For the {name} config ({L} layers, n_embd={config.n_embd}), targets={targets} and r={r} you "
                    f"counted {got:,} trainable parameters but add_lora creates {want:,}: {hint}."
                )
    gpt2 = _true_lora_count(configs["gpt2"], ("c_attn",), 8)
    passed(f"Correct: LoRA with r=8 on GPT-2's c_attn trains {gpt2:,} parameters.")


# ---------------------------------------------------------------------------
# Exercise 2.5 (open): the smallest rank that is good enough.

RANK_MARGIN = 0.01  # in the toy's loss: squared error summed over the outputs, per example
_TOY_D, _TOY_NOISE = 32, 0.01


def rank_toy(seed: int = 0) -> dict[str, torch.Tensor]:
    """A linear layer to adapt: y = (W0 + dW) x + noise, with dW's singular values 1, 1/2, 1/4, ...

    Returns ``W0`` (32 x 32, frozen), ``x_train``, ``y_train`` (1,024 rows each) and
    ``x_val``, ``y_val`` (1,024 held-out rows). The inputs are standard normal, so the
    held-out loss, mean over rows of the squared error summed over the 32 outputs, is
    the error left in the update, squared Frobenius norm, plus the noise.
    """
    g = torch.Generator().manual_seed(seed)
    d = _TOY_D
    U, _ = torch.linalg.qr(torch.randn(d, d, generator=g))
    V, _ = torch.linalg.qr(torch.randn(d, d, generator=g))
    delta = U @ torch.diag(0.5 ** torch.arange(d, dtype=torch.float32)) @ V.T
    W0 = torch.randn(d, d, generator=g) / d**0.5
    x_train, x_val = torch.randn(1024, d, generator=g), torch.randn(1024, d, generator=g)
    y_train = x_train @ (W0 + delta).T + _TOY_NOISE * torch.randn(1024, d, generator=g)
    y_val = x_val @ (W0 + delta).T + _TOY_NOISE * torch.randn(1024, d, generator=g)
    return {"W0": W0, "x_train": x_train, "y_train": y_train, "x_val": x_val, "y_val": y_val}


def _best_toy_loss(r: int) -> float:
    """The lowest held-out loss any rank-r update can reach on rank_toy (Eckart-Young), noise included."""
    singular = 0.5 ** torch.arange(_TOY_D, dtype=torch.float64)
    return float((singular[r:] ** 2).sum()) + _TOY_D * _TOY_NOISE**2


def check_smallest_rank(losses: dict, rank) -> None:
    """Exercise 2.5: ``losses`` maps each rank tried to its held-out loss on :func:`rank_toy`;
    ``rank`` is the smallest rank whose loss is within RANK_MARGIN of the full rank's (32)."""
    if not isinstance(losses, dict) or not losses:
        raise CheckFailed(f"losses should be a dict from each rank you tried to its held-out loss, got {returned(losses)}.")
    bad = next((k for k in losses if not is_number(k, int) or not 1 <= k <= _TOY_D), None)
    if bad is not None:
        raise CheckFailed(f"losses has the key {bad!r}: the keys should be the ranks you tried, ints from 1 to {_TOY_D}.")
    if any(not is_number(v) or v != v for v in losses.values()):
        raise CheckFailed("every value of losses should be a held-out loss as a Python float (use .item()).")
    if _TOY_D not in losses:
        raise CheckFailed(
            f"losses has no entry for rank {_TOY_D}: the margin is measured from the full rank's loss, so train "
            f"that one too."
        )
    for r in sorted(losses):
        best = _best_toy_loss(r)
        if losses[r] < best * 0.8 - 1e-4:
            raise CheckFailed(
                f"Your rank-{r} loss, {losses[r]:.4f}, is below what any rank-{r} update can reach on held-out "
                f"data ({best:.4f}): measure the loss on x_val and y_val, not on the training rows, and check "
                "that the adapter really has the rank you say."
            )
        if losses[r] > best * 1.3 + 2e-3:
            raise CheckFailed(
                f"Your rank-{r} loss, {losses[r]:.4f}, is well above what a rank-{r} update can reach "
                f"({best:.4f}): the adapter has not finished learning. Train for more steps or with a larger "
                "learning rate, and check that only the adapter is trained and the loss is the one described."
            )
    good_enough = [r for r in sorted(losses) if losses[r] <= losses[_TOY_D] + RANK_MARGIN]
    answer = good_enough[0]
    tried_below = set(range(1, answer)) <= set(losses)
    if not is_number(rank, int):
        raise CheckFailed(f"rank should be an int, got {returned(rank)}.")
    if not tried_below:
        missing = min(set(range(1, answer)) - set(losses))
        raise CheckFailed(
            f"You did not try rank {missing}, so you cannot know that it is not good enough: to find the "
            "smallest rank, try every rank below the one you pick."
        )
    if rank != answer:
        if rank in losses and losses[rank] > losses[_TOY_D] + RANK_MARGIN:
            hint = (f"its loss, {losses[rank]:.4f}, is more than {RANK_MARGIN} above the full rank's "
                    f"({losses[_TOY_D]:.4f}), so it is not good enough")
        else:
            hint = "a smaller rank you tried is already within the margin"
        raise CheckFailed(f"You picked rank {rank}, but {hint}: read your own measurements again.")
    passed(
        f"Correct: rank {answer} is the smallest within {RANK_MARGIN} of the full rank's loss; it trains "
        f"{answer * 2 * _TOY_D:,} parameters where the full rank trains {_TOY_D * 2 * _TOY_D:,}."
    )
