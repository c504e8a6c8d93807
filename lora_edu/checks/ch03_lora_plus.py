"""Checkers for chapter 3's exercises: LoRA+'s parameter groups, reading an optimizer, Adam's first step,
and the open experiment: the best ratio of the toy at two widths."""

from __future__ import annotations

import functools
import math
from typing import Callable

import torch
import torch.nn as nn

from lora_edu.checks.core import (CheckFailed, as_number, call_learner, expect_shape, first_changed, first_hint,
                                  is_number, learner_raised, passed, returned, seeded)
from lora_edu.gpt2 import GPT2, GPT2Config
from lora_edu.lora import add_lora, lora_layers
from lora_edu.loraplus import create_loraplus_optimizer, loraplus_param_groups, toy_lora_losses

__all__ = ["check_loraplus_groups", "check_lr_by_parameter", "check_sign_descent_step", "check_toy_best_pair"]


def _small_lora_model(targets="all-linear", r: int = 4) -> GPT2:
    """A small GPT-2 with LoRA layers, the same every time; the learner's RNG is left alone."""
    with seeded(0):
        model = GPT2(GPT2Config(vocab_size=50, block_size=16, n_layer=2, n_head=2, n_embd=32))
        return add_lora(model, targets, r=r).eval()


def _same(x: float, y: float) -> bool:
    return math.isclose(x, y, rel_tol=1e-6, abs_tol=0.0)


def _all_at(values: list[float], target: float) -> bool:
    return bool(values) and all(_same(v, target) for v in values)


# ---------------------------------------------------------------------------
# Exercise 3.1: LoRA+'s parameter groups.


def _groups_cases():
    """(setting, model, lr, ratio, weight_decay): decay first, so a dropped decay shows at once."""
    model = _small_lora_model()
    yield "GPT-2 with LoRA on every linear layer", model, 1e-3, 16, 0.1
    model = _small_lora_model(["c_attn", "c_fc"], r=2)
    for p in (*model.transformer.ln_f.parameters(), *model.transformer.h[0].ln_1.parameters(),
              model.transformer.h[0].attn.c_attn.base_layer.bias):
        p.requires_grad_(True)
    yield "GPT-2 with LoRA on c_attn and c_fc, a trainable ln_f, ln_1 and c_attn bias", model, 2e-4, 4, 0.01
    model = _small_lora_model(r=8)
    model.transformer.h[1].ln_2.requires_grad_(True)
    yield "GPT-2 with LoRA on every linear layer and a trainable ln_2", model, 5e-4, 2, 0.0


def _parse_groups(got) -> list[tuple[list, object, object]]:
    """(params, lr or None, weight_decay or None) per group, or a CheckFailed about the shape of the answer."""
    if isinstance(got, torch.optim.Optimizer):
        raise CheckFailed(
            "loraplus_groups returned an optimizer; return the list of group dicts you would pass to one."
        )
    if isinstance(got, dict):
        hint = "list(groups.values())" if got and all(isinstance(g, dict) for g in got.values()) else "[group, ...]"
        raise CheckFailed(f"loraplus_groups should return a list of group dicts, not one dict: return {hint}.")
    if not isinstance(got, (list, tuple)):
        raise CheckFailed(
            f"loraplus_groups should return a list of dicts, one per group, but it returned {returned(got)}."
        )
    parsed = []
    for i, group in enumerate(got):
        if not isinstance(group, dict) or "params" not in group:
            what = 'a dict without "params"' if isinstance(group, dict) else f"a {type(group).__name__}"
            raise CheckFailed(
                f'Group {i} is {what}: each group should be a dict with the keys "params", "lr" and "weight_decay".'
            )
        params = group["params"]
        if isinstance(params, torch.Tensor):
            raise CheckFailed(f'Group {i}\'s "params" is a single tensor: make it a list of parameters, [p, ...].')
        params = list(params)
        if not all(isinstance(p, torch.Tensor) for p in params):
            kind = next(type(p).__name__ for p in params if not isinstance(p, torch.Tensor))
            raise CheckFailed(
                f'Group {i}\'s "params" holds a {kind}: it should hold the parameters themselves (the tensors from '
                "model.parameters() or layer.lora_A.weight), not their names."
            )
        parsed.append((params, group.get("lr"), group.get("weight_decay")))
    return parsed


def check_loraplus_groups(loraplus_groups: Callable) -> None:
    """Exercise 3.1: ``loraplus_groups(model, lr, ratio, weight_decay)``: A at lr, B at ratio * lr, both decayed."""
    for setting, model, lr, ratio, weight_decay in _groups_cases():
        names = {id(p): n for n, p in model.named_parameters()}
        requires_grad = {n: p.requires_grad for n, p in model.named_parameters()}
        want = {id(p): (g["lr"], g["weight_decay"]) for g in loraplus_param_groups(model, lr, ratio, weight_decay)
                for p in g["params"]}  # the package's LoRA+ groups: the reference
        kind = {id(layer.lora_A.weight): "A" for layer in lora_layers(model).values()}
        kind |= {id(layer.lora_B.weight): "B" for layer in lora_layers(model).values()}
        groups = _parse_groups(call_learner(loraplus_groups, model, lr, ratio, weight_decay))
        setting = f"For {setting}, lr={lr:g}, ratio={ratio:g} and weight_decay={weight_decay:g}"
        changed = next((n for n, p in model.named_parameters() if p.requires_grad != requires_grad[n]), None)
        if changed is not None:
            raise CheckFailed(
                f"{setting}, loraplus_groups changed whether {changed} is trainable: only read p.requires_grad, do "
                "not set it (mark_only_lora_trainable would freeze the LayerNorms this model trains)."
            )
        seen: dict[int, tuple] = {}
        for params, group_lr, group_wd in groups:
            for p in params:
                if id(p) in seen:
                    raise CheckFailed(
                        f"{setting}, {names.get(id(p), 'a parameter')} is in two groups (or twice in one): PyTorch "
                        "refuses that, so put every trainable parameter in exactly one group."
                    )
                seen[id(p)] = (group_lr, group_wd)
        foreign = next((i for i in seen if i not in names), None)
        if foreign is not None:
            raise CheckFailed(
                f"{setting}, a group holds a tensor that is not one of the model's parameters (a copy, or p.data / "
                "p.detach()): put the parameters themselves in \"params\", or the optimizer trains the copy."
            )
        frozen = next((names[i] for i in seen if not requires_grad[names[i]]), None)
        if frozen is not None:
            raise CheckFailed(
                f"{setting}, you included the frozen parameter {frozen}: keep only the parameters with "
                "p.requires_grad, the ones being trained."
            )
        missing = [i for i in want if i not in seen]
        if missing:
            name = names[missing[0]]
            if missing[0] in kind:
                hint = "every lora_A.weight and lora_B.weight goes in a group (A at lr, B at ratio * lr)"
            else:
                hint = ("any other trainable parameter goes in too, at lr, and with weight_decay 0 when it is 1-D "
                        "like this one")
            raise CheckFailed(f"{setting}, {name} is trainable but in no group: {hint}.")
        _check_lrs(setting, names, kind, seen, want, lr, ratio)
        _check_decay(setting, names, kind, seen, want, weight_decay)
    passed("Correct: A trains at lr, B at ratio * lr, both with the weight decay you ask for, and 1-D parameters without.")


def _group_number(value, name: str, key: str, setting: str) -> float:
    if not is_number(value):
        raise CheckFailed(f'{setting}, the group holding {name} has "{key}" = {value!r}: it should be a number.')
    return float(value)


def _check_lrs(setting, names, kind, seen, want, lr, ratio) -> None:
    for i, (group_lr, _) in seen.items():
        if group_lr is None:
            raise CheckFailed(
                f'{setting}, the group holding {names[i]} has no "lr", so the optimizer would give it its default: '
                'give every group its own "lr" (A\'s is lr, B\'s is ratio * lr, any other parameter\'s is lr).'
            )
    got = {i: _group_number(seen[i][0], names[i], "lr", setting) for i in seen}
    if all(_same(got[i], want[i][0]) for i in want):
        return
    a_lrs = [got[i] for i in want if kind.get(i) == "A"]
    b_lrs = [got[i] for i in want if kind.get(i) == "B"]
    if _all_at(a_lrs, ratio * lr) and _all_at(b_lrs, lr):
        hint = "A and B are swapped: A trains at lr and B, which starts at zero, at ratio * lr"
    elif _all_at(a_lrs, lr) and _all_at(b_lrs, lr):
        hint = "B trains at lr like A, so the ratio is not applied: give B's group ratio * lr"
    elif _all_at(a_lrs, ratio * lr) and _all_at(b_lrs, ratio * lr):
        hint = "A should stay at lr; only B gets ratio * lr"
    elif _all_at(b_lrs, lr / ratio):
        hint = "you divided by ratio: B's learning rate is ratio * lr, larger than A's"
    else:
        wrong = next(i for i in want if not _same(got[i], want[i][0]))
        rule = {"A": "an A matrix trains at lr", "B": "a B matrix trains at ratio * lr"}.get(
            kind.get(wrong), "a parameter that is neither A nor B trains at lr")
        hint = f"{names[wrong]} has lr {got[wrong]:g} but {rule}, here {want[wrong][0]:g}"
    raise CheckFailed(f"{setting}, {hint}.")


def _check_decay(setting, names, kind, seen, want, weight_decay) -> None:
    lora = [i for i in want if i in kind]
    dropped = next((i for i in lora if seen[i][1] is None), None)
    if dropped is not None:
        raise CheckFailed(
            f'{setting}, the group holding {names[dropped]} has no "weight_decay", so the optimizer falls back to its '
            "own default instead of the weight_decay you were given: leaving it out of custom groups is the bug that "
            'silently turns weight decay off, so put "weight_decay": weight_decay in the A and B groups.'
        )
    got = {i: _group_number(seen[i][1], names[i], "weight_decay", setting) for i in lora}
    if weight_decay > 0 and all(got[i] == 0 for i in lora):
        raise CheckFailed(
            f"{setting}, the A and B matrices get weight decay 0: dropping the decay from custom groups is the bug "
            f'that silently turns weight decay off, so give the A and B groups "weight_decay": weight_decay.'
        )
    wrong = next((i for i in lora if not _same(got[i], weight_decay)), None)
    if wrong is not None:
        raise CheckFailed(
            f"{setting}, {names[wrong]} gets weight decay {got[wrong]:g}: the A and B groups get exactly the "
            "weight_decay you were given."
        )
    for i in want:
        if i in kind:
            continue
        value = seen[i][1]
        if value is None:
            raise CheckFailed(
                f'{setting}, the group holding {names[i]} has no "weight_decay", so the optimizer would decay this '
                'vector with its default (AdamW\'s is 0.01): give it "weight_decay": 0.0.'
            )
        if not _same(_group_number(value, names[i], "weight_decay", setting), want[i][1]):
            raise CheckFailed(
                f"{setting}, {names[i]} gets weight decay {value:g}: 1-D parameters such as biases and LayerNorm "
                "weights are not decayed, so put them in a group with weight_decay 0."
            )


# ---------------------------------------------------------------------------
# Exercise 3.2: which learning rate each parameter gets.


def _zero_init_model() -> nn.Module:
    """A LoRA layer followed by a zero-initialised trainable projection: it holds the same values as B."""
    with seeded(0):
        model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))
        with torch.no_grad():
            model[1].weight.zero_()
            model[1].bias.zero_()
        add_lora(model, ["0"], r=8)
    model[1].requires_grad_(True)
    return model


def _lr_cases():
    """(setting, model, optimizer), each with parameters of equal values in it."""
    model = _small_lora_model()
    optimizer = create_loraplus_optimizer(model, torch.optim.AdamW, lr=1e-3, ratio=8)
    yield "a fresh GPT-2 with LoRA on every linear layer (every B still zero) and AdamW at lr=1e-3, ratio=8", model, optimizer
    model = _small_lora_model(["c_attn", "c_proj"], r=2)
    for p in (*model.transformer.ln_f.parameters(), model.transformer.wpe.weight):
        p.requires_grad_(True)
    optimizer = create_loraplus_optimizer(model, torch.optim.SGD, lr=0.05, ratio=4, momentum=0.9)
    optimizer.param_groups[1]["lr"] = 0.3  # changed by hand, as a scheduler would
    optimizer.param_groups[-1]["lr"] = 0.01
    yield "GPT-2 with a trainable ln_f and wpe, SGD at lr=0.05, ratio=4, and two groups' lr changed by hand", model, optimizer
    model = _zero_init_model()
    optimizer = create_loraplus_optimizer(model, torch.optim.AdamW, lr=2e-4, ratio=16)
    yield "a LoRA layer next to a zero-initialised trainable linear layer (zero like B), AdamW at ratio=16", model, optimizer


def _by_value(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[dict[str, float]]:
    """What matching tensors by value (torch.equal) instead of identity gives, done a few natural ways."""
    groups = optimizer.param_groups
    named = list(model.named_parameters())
    trainable = [(n, p) for n, p in named if p.requires_grad]
    results = []
    for order in (groups, groups[::-1]):  # for each name, the first (or last) group holding an equal tensor
        result = {}
        for n, p in named:
            lr = next((g["lr"] for g in order if any(torch.equal(p, q) for q in g["params"])), None)
            if lr is not None:
                result[n] = lr
        results.append(result)
    for candidates in (named, trainable):  # for each tensor in a group, the first name holding an equal one
        result = {}
        for g in groups:
            for q in g["params"]:
                n = next((n for n, p in candidates if torch.equal(p, q)), None)
                if n is not None:
                    result[n] = g["lr"]
        results.append(result)
    return results


_IDENTITY_HINT = "match parameters by identity, p is q or id(p), which the names from model.named_parameters() share"


def check_lr_by_parameter(lr_by_parameter: Callable) -> None:
    """Exercise 3.2: ``lr_by_parameter(optimizer, model)`` maps each held parameter's name to its group's lr."""
    for setting, model, optimizer in _lr_cases():
        group_of = {id(p): k for k, g in enumerate(optimizer.param_groups) for p in g["params"]}
        named = dict(model.named_parameters())
        want = {n: optimizer.param_groups[group_of[id(p)]]["lr"] for n, p in named.items() if id(p) in group_of}
        by_value = _by_value(model, optimizer)
        try:
            got = call_learner(lr_by_parameter, optimizer, model)
        except RuntimeError as err:
            raise learner_raised(
                f"For {setting}, lr_by_parameter", err,
                f"`p in group['params']` compares tensors with ==, element by element, so {_IDENTITY_HINT}",
            ) from err
        if not isinstance(got, dict):
            raise CheckFailed(
                f"lr_by_parameter should return a dict from parameter names to learning rates, got {returned(got)}."
            )
        bad_key = next((k for k in got if not isinstance(k, str)), None)
        if bad_key is not None:
            raise CheckFailed(
                f"lr_by_parameter's keys should be the parameter names from model.named_parameters(), like "
                f"{next(iter(want))!r}, not {type(bad_key).__name__}s."
            )
        bad_value = next((n for n, v in got.items() if not is_number(v)), None)
        if bad_value is not None:
            raise CheckFailed(
                f"For {setting}, {bad_value} maps to a {type(got[bad_value]).__name__}: give the group's learning "
                "rate, the float group['lr']."
            )
        if got == want:
            continue
        if any(got == result for result in by_value):
            raise CheckFailed(
                f"For {setting}, some parameters got another parameter's group: you matched tensors by value "
                f"(torch.equal or ==), but different parameters can hold equal values (a fresh B is all zeros), so "
                f"{_IDENTITY_HINT}."
            )
        extra = [n for n in got if n not in want]
        if extra:
            if extra[0] in named:
                hint = ("the optimizer does not hold it (it is frozen): list only the parameters in "
                        "optimizer.param_groups")
            else:
                hint = "it is not a name from model.named_parameters()"
            raise CheckFailed(f"For {setting}, your dict has {extra[0]!r}, but {hint}.")
        missing = [n for n in want if n not in got]
        if missing:
            raise CheckFailed(
                f"For {setting}, {missing[0]} is held by the optimizer but missing from your dict: give every "
                "parameter in optimizer.param_groups its name and lr."
            )
        if all(got[n] == group_of[id(named[n])] for n in want):
            hint = "you gave each parameter the index of its group; give the group's learning rate, group['lr']"
        elif all(_same(got[n], optimizer.defaults["lr"]) for n in want):
            hint = ("you gave every parameter optimizer.defaults['lr'], which is only the fallback for groups that "
                    "set no lr of their own; read the lr of the group holding the parameter, group['lr']")
        else:
            n = next(n for n in want if not _same(got[n], want[n]))
            hint = f"{n} is in a group with lr {want[n]:g}, but you gave {got[n]:g}"
        raise CheckFailed(f"For {setting}, {hint}.")
    passed("Correct: you read each parameter's learning rate from the group that holds it, matched by identity.")


# ---------------------------------------------------------------------------
# Exercise 3.3: one step of sign descent on f(x) = b (a . x), what Adam's first step does.


def _sign_cases():
    g = torch.Generator().manual_seed(3)
    a = torch.randn(6, generator=g, dtype=torch.float64)
    x = torch.randn(6, generator=g, dtype=torch.float64)
    cases = []
    for b, y, lr_a, lr_b in [(0.7, 3.0, 0.01, 0.04), (0.0, -0.8, 0.02, 0.1), (-1.2, 0.5, 0.005, 0.08)]:
        cases.append((a.clone(), torch.tensor(b, dtype=torch.float64), x.clone(),
                      torch.tensor(y, dtype=torch.float64), lr_a, lr_b))
        a = torch.randn(6, generator=g, dtype=torch.float64)
    return cases


def _grads(a, b, x, y) -> tuple[torch.Tensor, torch.Tensor]:
    """dL/da and dL/db for L = 0.5 (b (a . x) - y)^2, by autograd."""
    a, b = a.clone().requires_grad_(), b.clone().requires_grad_()
    loss = 0.5 * (b * (a @ x) - y) ** 2
    return torch.autograd.grad(loss, (a, b))


def _pair_close(got: tuple, want: tuple) -> bool:
    return all(g.shape == w.shape and torch.allclose(g.double(), w.double(), rtol=1e-6, atol=1e-9)
               for g, w in zip(got, want))


def _unpack_step(got, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if not isinstance(got, (tuple, list)) or len(got) != 2:
        raise CheckFailed(f"sign_descent_step should return a pair (a_new, b_new), but it returned {returned(got)}.")
    for value, name, like in zip(got, ("a_new", "b_new"), ("a 1-D tensor like a", "a 0-d tensor like b")):
        if not isinstance(value, torch.Tensor):
            raise CheckFailed(f"{name} should be {like}, but it is a {type(value).__name__}.")
    a_new, b_new = got
    if a_new.shape == () and b_new.shape == a.shape:
        raise CheckFailed("You returned (b_new, a_new); return them in the order (a_new, b_new).")
    expect_shape(a_new, a.shape, "a_new, like a,")
    if b_new.shape != ():
        raise CheckFailed(
            f"b_new should be a 0-d tensor like b, but it has shape {tuple(b_new.shape)}: b's gradient is the "
            "number (f - y) * (a @ x), so do not broadcast b against a vector."
        )
    return a_new.detach(), b_new.detach()


def check_sign_descent_step(sign_descent_step: Callable) -> None:
    """Exercise 3.3: ``sign_descent_step(a, b, x, y, lr_a, lr_b)`` moves a by -lr_a sign(dL/da), b by -lr_b sign(dL/db)."""
    for a, b, x, y, lr_a, lr_b in _sign_cases():
        inputs = {"a": a, "b": b, "x": x, "y": y}
        given = {k: v.clone() for k, v in inputs.items()}
        got = call_learner(sign_descent_step, *given.values(), lr_a, lr_b)
        changed = first_changed(given, inputs)
        if changed is not None:
            how = (f"write {changed} - lr_{changed} * ..., not {changed} -= ... or {changed}.sub_(...)"
                   if changed in ("a", "b") else "the data x and y are only read")
            raise CheckFailed(
                f"sign_descent_step changed its argument {changed} in place; leave the inputs alone and return new "
                f"tensors ({how})."
            )
        a_new, b_new = _unpack_step(got, a)
        grad_a, grad_b = _grads(a, b, x, y)
        sa, sb = grad_a.sign(), grad_b.sign()
        want = (a - lr_a * sa, b - lr_b * sb)
        if _pair_close((a_new, b_new), want):
            continue
        residual = b * (a @ x) - y
        setting = f"For b={b.item():g}, y={y.item():g}, lr_a={lr_a:g} and lr_b={lr_b:g}"
        if b == 0 and not torch.allclose(a_new.double(), a):
            hint = first_hint(
                [(a - lr_a, "sign(0) is 0, not 1: a coordinate with zero gradient does not move, so use torch.sign"),
                 (a + lr_a, "sign(0) is 0, not -1: a coordinate with zero gradient does not move, so use torch.sign")],
                lambda variant: torch.allclose(a_new.double(), variant),
                "a's gradient passes through b (the chain rule through f = b (a . x)), so B = 0 means A gets no "
                "gradient and, as sign(0) = 0, a must not move on this step",
            )
            raise CheckFailed(f"{setting}, a moved though b = 0: {hint}.")
        wrong = [
            ((a - lr_a * sa, b - lr_a * sb), "you used lr_a for b too; b's step is lr_b * sign(grad_b)"),
            ((a - lr_b * sa, b - lr_b * sb), "you used lr_b for a too; a's step is lr_a * sign(grad_a)"),
            ((a - lr_b * sa, b - lr_a * sb), "lr_a and lr_b are swapped: a moves by lr_a, b by lr_b"),
            ((a - lr_a * grad_a, b - lr_b * grad_b),
             "that is a plain gradient step; sign descent moves every coordinate by exactly its lr, lr * sign(grad)"),
            ((a + lr_a * sa, b + lr_b * sb), "you climbed the loss; descent subtracts, a - lr_a * sign(grad_a)"),
            ((a - lr_a * (residual * x).sign(), want[1]),
             "a's gradient lost a factor: the chain rule through f = b (a . x) passes through b, which is how "
             "B = 0 keeps A from moving"),
            ((want[0], b - lr_b * residual.sign()),
             "b's gradient lost a factor: the chain rule through f = b (a . x) passes through the feature a . x"),
        ]
        hint = first_hint(
            wrong, lambda variant: _pair_close((a_new, b_new), variant) and not _pair_close(variant, want),
            "your step is wrong: derive dL/da and dL/db by the chain rule through f = b (a . x), then move each "
            "coordinate by its own learning rate against the sign of its gradient",
        )
        raise CheckFailed(f"{setting}, {hint}.")
    passed("Correct: one sign-descent step moves every coordinate by exactly its learning rate, as Adam's first step does.")


# ---------------------------------------------------------------------------
# Exercise 3.4 (open): the best pair (eta_A, eta_B) of the toy at two widths.

TOY_WIDTHS = (64, 1024)
TOY_LRS_A = [2.0**k for k in range(-14, -1)]  # the reference sweep, powers of 2: both optima lie inside
TOY_LRS_B = [2.0**k for k in range(-10, 1)]
TOY_SEEDS = (0, 1, 2)
TOY_SLACK = 1.15  # a pair is good when its loss is within 15% of the reference sweep's best


def _toy_mean_losses(n: int, lrs_a: list[float], lrs_b: list[float]) -> torch.Tensor:
    return sum(toy_lora_losses(n, lrs_a, lrs_b, seed=seed) for seed in TOY_SEEDS) / len(TOY_SEEDS)


@functools.lru_cache(maxsize=None)
def toy_best_loss(n: int) -> float:
    """The reference: the lowest toy loss (mean over TOY_SEEDS) over the powers-of-2 sweep."""
    losses = _toy_mean_losses(n, TOY_LRS_A, TOY_LRS_B)
    i, j = divmod(int(losses.argmin()), len(TOY_LRS_B))
    if i in (0, len(TOY_LRS_A) - 1) or j in (0, len(TOY_LRS_B) - 1):  # a guard on the reference itself
        raise RuntimeError(f"the reference sweep's optimum at n={n} is on its edge; widen TOY_LRS_A or TOY_LRS_B")
    return losses.min().item()


def _as_pair(value, n: int) -> tuple[float, float]:
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        raise CheckFailed(f"best_pair[{n}] should be a pair (eta_A, eta_B), got {value!r}.")
    pair = []
    for name, v in zip(("eta_A", "eta_B"), value):
        v = as_number(v)
        if not is_number(v) or not math.isfinite(v) or v <= 0:
            raise CheckFailed(f"best_pair[{n}]'s {name} should be a positive learning rate, got {v!r}.")
        pair.append(float(v))
    return pair[0], pair[1]


def check_toy_best_pair(best_pair) -> None:
    """Exercise 3.4: ``best_pair`` maps 64 and 1024 to the toy's best (eta_A, eta_B) at that width.

    A pair is judged by what it achieves: its toy loss, averaged over seeds 0, 1 and 2, must be
    within 15% of the best pair of a powers-of-2 sweep. Prints the ratios eta_B / eta_A.
    """
    if not isinstance(best_pair, dict):
        what = "None (did you assign it?)" if best_pair is None else f"a {type(best_pair).__name__}"
        raise CheckFailed(f"best_pair should be a dict {{width: (eta_A, eta_B)}} for the widths 64 and 1024, got {what}.")
    if sorted(best_pair) != sorted(TOY_WIDTHS):
        raise CheckFailed(
            f"best_pair should have exactly the keys 64 and 1024 (the widths, as ints), got {sorted(best_pair)!r}."
        )
    pairs = {n: _as_pair(best_pair[n], n) for n in TOY_WIDTHS}
    for n, (lr_a, lr_b) in pairs.items():
        best = toy_best_loss(n)
        mine, swapped = _toy_mean_losses(n, [lr_a, lr_b], [lr_b, lr_a]).diagonal().tolist()
        if mine <= TOY_SLACK * best:
            continue
        if swapped <= TOY_SLACK * best:
            raise CheckFailed(
                f"At n={n} your pair works only the other way round: the first number is A's rate, the second B's "
                "(B is the factor that starts at zero)."
            )
        if math.isclose(lr_a, lr_b):
            hint = ("one shared rate is not enough at this width: let the two rates differ, and sweep them "
                    "independently")
        else:
            hint = ("sweep eta_A and eta_B independently and widely enough that the best pair is not on the edge "
                    "of your grid, and average the losses over the seeds before taking the minimum")
        raise CheckFailed(
            f"At n={n} your pair reaches a mean loss of {mine:.3g} (or diverges), more than 15% above what a sweep "
            f"of powers of 2 finds ({best:.3g}): {hint}."
        )
    ratios = {n: lr_b / lr_a for n, (lr_a, lr_b) in pairs.items()}
    passed(f"Correct: both pairs are within 15% of the best loss; your ratios eta_B / eta_A are "
          f"{ratios[64]:.3g} at n=64 and {ratios[1024]:.3g} at n=1024.")
