"""Checkers for chapter 6's exercises: the DoRA forward pass, merging into a Conv1D, ΔM and ΔD,
DoRA's parameter count, and the magnitude alone."""

from __future__ import annotations

from typing import Callable

import torch

from lora_edu.checks._core import CheckFailed, call_learner, expect_tensor, passed
from lora_edu.dora import weight_decomposition

__all__ = [
    "check_dora_forward",
    "check_dora_merge_conv1d",
    "check_dora_parameters",
    "check_magnitude_only",
    "check_weight_decomposition",
]


def _dora_cases():
    g = torch.Generator().manual_seed(0)
    cases = []
    for x_shape, (out_f, in_f), alpha, r in [((4, 6), (5, 6), 8.0, 2), ((2, 3, 7), (3, 7), 3.0, 2)]:
        W0 = torch.randn(out_f, in_f, generator=g, dtype=torch.float64)
        b0 = torch.randn(out_f, generator=g, dtype=torch.float64)
        A = torch.randn(r, in_f, generator=g, dtype=torch.float64)
        B = torch.randn(out_f, r, generator=g, dtype=torch.float64)
        m = torch.linalg.norm(W0, dim=1) * (1 + 0.5 * torch.rand(out_f, generator=g, dtype=torch.float64))
        x = torch.randn(*x_shape[:-1], in_f, generator=g, dtype=torch.float64)
        cases.append((x, W0, b0, A, B, m, alpha, r))
    return cases


def check_dora_forward(dora_forward: Callable) -> None:
    """Exercise 6.1: ``dora_forward(x, W0, b0, A, B, m, alpha, r)``, DoRA's output without dropout."""
    for x, W0, b0, A, B, m, alpha, r in _dora_cases():
        got = call_learner(dora_forward, x.clone(), W0.clone(), b0.clone(), A.clone(), B.clone(), m.clone(), alpha, r)
        got = expect_tensor(got, "dora_forward")
        V = W0 + (alpha / r) * B @ A
        want = x @ (m[:, None] * V / torch.linalg.norm(V, dim=1, keepdim=True)).T + b0
        setting = f"x of shape {tuple(x.shape)}, W0 {tuple(W0.shape)}, alpha={alpha:g}, r={r}"
        if got.shape != want.shape:
            raise CheckFailed(f"For {setting}, the output should have shape {tuple(want.shape)} but yours has "
                              f"{tuple(got.shape)}.")
        got = got.double()
        if torch.allclose(got, want, atol=1e-8):
            continue
        unit_rows = V / torch.linalg.norm(V, dim=1, keepdim=True)
        wrong = [
            (x @ (m[:, None] * V / torch.linalg.norm(V, dim=0, keepdim=True)).T + b0,
             "the norm is taken over the wrong axis: DoRA takes one norm per output row of the (out, in) "
             "weight, over its inputs"),
            (x @ unit_rows.T + b0, "the magnitude m is missing: the direction has unit rows, and m gives each "
                                   "its length back"),
            (x @ V.T + b0, "that is LoRA: your weight's rows keep the lengths LoRA gives them, where DoRA "
                           "gives each row its own length m"),
            (m * (x @ V.T) / torch.linalg.norm(x @ V.T, dim=-1, keepdim=True) + b0,
             "you normalised the output (the activations); DoRA normalises the weight, row by row, before it "
             "meets x"),
            (x @ (m[:, None] * (W0 + B @ A) / torch.linalg.norm(W0 + B @ A, dim=1, keepdim=True)).T + b0,
             "the LoRA update is not scaled: B A enters with LoRA's scale, as in Chapter 2"),
            (x @ (m[:, None] * unit_rows).T, "the bias is missing: it is added unchanged after the rescaled weight"),
            (m * (x @ unit_rows.T + b0), "the bias must not be scaled by m: only the weight's rows are"),
        ]
        hint = next((h for variant, h in wrong if torch.allclose(got, variant, atol=1e-8)), None)
        hint = hint or ("it is none of the usual slips (axis, magnitude, scale, bias): work out one output "
                        "feature by hand and compare")
        raise CheckFailed(f"For {setting}, your output is off by up to {(got - want).abs().max().item():.3g}: {hint}.")
    _check_detached_norm(dora_forward)
    passed("Correct: your DoRA layer rescales each row of W0 + (alpha / r) B A to its magnitude m, with the "
           "norm held constant in the backward pass.")


def _gradients(forward: Callable, x, W0, b0, A, B, m, alpha, r, upstream) -> tuple:
    """The gradients of sum(upstream * forward(...)) with respect to B and m."""
    B, m = B.clone().requires_grad_(), m.clone().requires_grad_()
    out = call_learner(forward, x.clone(), W0.clone(), b0.clone(), A.clone(), B, m, alpha, r)
    if not isinstance(out, torch.Tensor) or not out.requires_grad:
        raise CheckFailed("Your output does not depend on B and m through autograd: compute it with torch "
                          "operations on the tensors you are given (no .item(), .numpy() or torch.no_grad()), "
                          "so that training can reach them.")
    (out * upstream).sum().backward()
    return B.grad, m.grad


def _check_detached_norm(dora_forward: Callable) -> None:
    """DoRA's norm is a constant in the backward pass (the paper's Section 4.3, PEFT, lora_edu)."""
    x, W0, b0, A, B, m, alpha, r = _dora_cases()[0]
    upstream = torch.randn(x.shape[0], W0.shape[0], generator=torch.Generator().manual_seed(2), dtype=torch.float64)

    def reference(x, W0, b0, A, B, m, alpha, r, detach=True):
        V = W0 + (alpha / r) * B @ A
        norm = torch.linalg.norm(V, dim=1, keepdim=True)
        return x @ (m[:, None] * V / (norm.detach() if detach else norm)).T + b0

    got = _gradients(dora_forward, x, W0, b0, A, B, m, alpha, r, upstream)
    want = _gradients(reference, x, W0, b0, A, B, m, alpha, r, upstream)
    if all(g is not None and torch.allclose(g, w, atol=1e-8) for g, w in zip(got, want)):
        return
    exact = _gradients(lambda *a: reference(*a, detach=False), x, W0, b0, A, B, m, alpha, r, upstream)
    if got[0] is not None and torch.allclose(got[0], exact[0], atol=1e-8):
        raise CheckFailed("Your output is right, but the gradient reaches B through the norm too: DoRA treats "
                          "||W0 + (alpha / r) B A|| as a constant in the backward pass (.detach() it), as the "
                          "paper's Section 4.3, PEFT and lora_edu do.")
    raise CheckFailed("Your output is right, but its gradients with respect to B or m are not DoRA's: let "
                      "autograd reach B through W0 + (alpha / r) B A, and m directly.")


def check_dora_merge_conv1d(merge: Callable) -> None:
    """Exercise 6.2: ``merge(weight, A, B, m, alpha, r)``, DoRA merged into a GPT-2 Conv1D weight (in, out)."""
    g = torch.Generator().manual_seed(3)
    for in_f, out_f, r, alpha in [(5, 5, 2, 4.0), (6, 4, 2, 8.0)]:  # square first: a wrong axis runs there
        weight = torch.randn(in_f, out_f, generator=g, dtype=torch.float64)  # Conv1D: (in, out)
        A = torch.randn(r, in_f, generator=g, dtype=torch.float64)
        B = torch.randn(out_f, r, generator=g, dtype=torch.float64)
        m = torch.linalg.norm(weight, dim=0) * (1 + 0.5 * torch.rand(out_f, generator=g, dtype=torch.float64))
        got = expect_tensor(call_learner(merge, weight.clone(), A.clone(), B.clone(), m.clone(), alpha, r), "merge")
        V = weight.T + (alpha / r) * B @ A  # (out, in), as nn.Linear would hold it
        want = (m[:, None] * V / torch.linalg.norm(V, dim=1, keepdim=True)).T
        setting = f"a Conv1D weight of shape ({in_f}, {out_f}) (in, out), r={r}"
        if got.shape != want.shape:
            hint = ("you returned (out, in), nn.Linear's layout: transpose back, Conv1D stores (in, out)"
                    if got.shape == want.T.shape else f"the merged weight has the shape of the weight, {tuple(want.shape)}")
            raise CheckFailed(f"For {setting}, your merged weight has shape {tuple(got.shape)}: {hint}.")
        got = got.double()
        if torch.allclose(got, want, atol=1e-8):
            continue
        wrong_axis = weight + (alpha / r) * (B @ A).T
        wrong = [
            (want.T, "you returned (out, in), nn.Linear's layout: transpose back, Conv1D stores (in, out)"),
            *[(magnitude * wrong_axis / torch.linalg.norm(wrong_axis, dim=1, keepdim=True) if in_f == out_f else None,
               "the norm is taken per input, over the wrong axis: in Conv1D's (in, out) layout, where do one "
               "output feature's weights lie?")
              for magnitude in (m[:, None], m[None, :])],
            ((m[:, None] * (weight + (alpha / r) * B @ A) / torch.linalg.norm(weight + (alpha / r) * B @ A, dim=1,
                                                                              keepdim=True)).T
             if in_f == out_f else None,
             "B A is (out, in): transpose it before adding it to Conv1D's (in, out) weight"),
            (V.T / torch.linalg.norm(V, dim=1), "the magnitude m is missing: each output feature's weights should "
                                                "have length m"),
            (V.T, "that merges LoRA: the output features keep LoRA's lengths, where DoRA gives each its m"),
        ]
        hint = next((h for variant, h in wrong if variant is not None and torch.allclose(got, variant, atol=1e-8)),
                    "it is none of the usual slips (layout, axis, B A's orientation, the magnitude): work out one "
                    "output feature by hand and compare")
        raise CheckFailed(f"For {setting}, your merged weight is off by up to "
                          f"{(got - want).abs().max().item():.3g}: {hint}.")
    passed("Correct: one norm per output feature, which is a column of Conv1D's (in, out) weight, and the "
           "result back in Conv1D's layout.")


def check_weight_decomposition(decompose: Callable) -> None:
    """Exercise 6.3: ``delta_m, delta_d = decompose(W0, W)``, the DoRA paper's ΔM and ΔD."""
    g = torch.Generator().manual_seed(1)
    for shape in [(6, 4), (3, 8)]:
        W0 = torch.randn(*shape, generator=g, dtype=torch.float64)
        W = W0 * (1 + 0.3 * torch.randn(shape[0], 1, generator=g, dtype=torch.float64)) \
            + 0.2 * torch.randn(*shape, generator=g, dtype=torch.float64)
        got = call_learner(decompose, W0.clone(), W.clone())
        if not isinstance(got, tuple) or len(got) != 2:
            raise CheckFailed(f"decompose should return a pair (delta_m, delta_d), got {type(got).__name__}.")
        delta_m, delta_d = (float(v) for v in got)
        want_m, want_d = weight_decomposition(W0, W)
        if abs(delta_m - want_m) < 1e-6 and abs(delta_d - want_d) < 1e-6:
            continue
        row_change = torch.linalg.norm(W, dim=1) - torch.linalg.norm(W0, dim=1)
        if abs(delta_m - row_change.mean().item()) < 1e-6 and abs(delta_m - want_m) > 1e-6:
            hint = "ΔM is the mean of the absolute changes of the row norms; a signed mean lets them cancel"
        elif abs(delta_m - (torch.linalg.norm(W, dim=0) - torch.linalg.norm(W0, dim=0)).abs().mean().item()) < 1e-6:
            hint = "take the norms per output row (dim=1 of an (out, in) weight), not per column"
        elif abs(delta_d - (1 - torch.nn.functional.cosine_similarity(W, W0, dim=0)).mean().item()) < 1e-6:
            hint = "compare each output row of W with the same row of W0 (cosine over dim=1), not the columns"
        elif abs(delta_d - torch.nn.functional.cosine_similarity(W, W0, dim=1).mean().item()) < 1e-6:
            hint = "ΔD is 1 minus the cosine similarity, so that unchanged directions give 0"
        elif abs(delta_m - want_m) > 1e-6:
            hint = "ΔM: the mean over rows of | ||W row|| - ||W0 row|| |"
        else:
            hint = "ΔD: the mean over rows of 1 - cos(W row, W0 row)"
        raise CheckFailed(f"For a {shape[0]} x {shape[1]} weight you give ΔM={delta_m:.4f}, ΔD={delta_d:.4f}; "
                          f"expected ΔM={want_m:.4f}, ΔD={want_d:.4f}: {hint}.")
    passed("Correct: ΔM measures how far the rows' lengths moved, ΔD how far their directions turned.")


def check_dora_parameters(extra: Callable, smallest_lora_rank: int) -> None:
    """Exercise 6.4: ``extra(in_features, out_features, r)`` and the LoRA rank that matches DoRA r=8."""
    for in_f, out_f, r in [(128, 384, 8), (128, 128, 4), (512, 128, 16)]:
        got = call_learner(extra, in_f, out_f, r)
        want = r * (in_f + out_f) + out_f
        if got == want:
            continue
        if got == out_f:
            hint = "that is only the magnitude; count A and B too"
        elif got == r * (in_f + out_f):
            hint = "that is plain LoRA; DoRA adds one magnitude per output row"
        elif got == r * (in_f + out_f) + in_f:
            hint = "the magnitude has one entry per output row (out_features), not per input"
        else:
            hint = "A is r x in, B is out x r, and the magnitude has out entries"
        raise CheckFailed(f"For in={in_f}, out={out_f}, r={r} you count {got} trainable parameters: {hint}.")
    # The tiny GPT-2's block matrices, 4 of each kind: c_attn 128->384, c_proj 128->128, c_fc 128->512, c_proj 512->128.
    shapes = [(128, 384), (128, 128), (128, 512), (512, 128)]
    dora8 = sum(8 * (i + o) + o for i, o in shapes)
    want = next(r for r in range(8, 64) if sum(r * (i + o) for i, o in shapes) >= dora8)
    if not isinstance(smallest_lora_rank, int) or smallest_lora_rank != want:
        raise CheckFailed(f"DoRA r=8 trains {4 * dora8:,} parameters in the tiny GPT-2's blocks; the smallest LoRA rank "
                          f"with at least as many is not {smallest_lora_rank!r}: compare the totals rank by rank.")
    passed(f"Correct: DoRA adds one parameter per output row; LoRA needs r={want} to train as many as DoRA r=8.")


# Exercise 6.5 trains the tiny GPT-2's magnitudes alone; a run that learned something gets at
# least this far below the pretrained model's held-out loss (nats, Milton, 4 batches).
MAGNITUDE_ONLY_MIN_GAIN = 0.1


def check_magnitude_only(model: torch.nn.Module) -> None:
    """Exercise 6.5 (open): a tiny GPT-2 with DoRA in which only the magnitudes were trained."""
    from lora_edu.data import load_split
    from lora_edu.dora import DoRALinear
    from lora_edu.gpt2 import load_tiny
    from lora_edu.train import evaluate

    layers = {name: m for name, m in model.named_modules() if isinstance(m, DoRALinear)}
    if not layers:
        raise CheckFailed("The model has no DoRA layers: add them with add_lora(model, ..., use_dora=True).")
    moved_b = [name for name, layer in layers.items() if layer.lora_B.weight.detach().abs().max() > 0]
    if moved_b:
        raise CheckFailed(f"B has moved in {len(moved_b)} of {len(layers)} DoRA layers (e.g. {moved_b[0]}): freeze "
                          "lora_A and lora_B (requires_grad_(False)) so that only the magnitudes train.")
    if any(layer.merged for layer in layers.values()):
        raise CheckFailed("Some DoRA layers are merged: pass the model unmerged.")
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    magnitudes = sum(layer.magnitude.numel() for layer in layers.values())
    if trainable != magnitudes:
        raise CheckFailed(f"The model has {trainable:,} trainable parameters, but its magnitudes are {magnitudes:,}: "
                          "only the magnitude vectors should train.")
    base_norms = [torch.linalg.norm(layer.base_weight(), dim=1) for layer in layers.values()]
    moved = max((layer.magnitude.detach() - n).abs().max().item() for layer, n in zip(layers.values(), base_norms))
    if moved == 0:
        raise CheckFailed("The magnitudes are still ||W0||: the model has not been trained.")
    device = next(model.parameters()).device
    val = load_split("milton", "val")
    loss = evaluate(model, val, block_size=128, max_batches=4)
    base = evaluate(load_tiny(device), val, block_size=128, max_batches=4)
    if not loss < base - MAGNITUDE_ONLY_MIN_GAIN:
        raise CheckFailed(f"Held-out loss {loss:.3f} against the pretrained model's {base:.3f}: the magnitudes alone "
                          f"can get at least {MAGNITUDE_ONLY_MIN_GAIN} nats lower. Try other learning rates: a "
                          "vector of lengths is not a LoRA factor, and its best rate need not be LoRA's.")
    passed(f"Correct: training only the {magnitudes:,} magnitudes lowers the held-out loss from {base:.3f} to "
           f"{loss:.3f} (4 batches).")
