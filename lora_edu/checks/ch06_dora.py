"""Checkers for chapter 6's exercises: DoRA's row norms without the dense matrix, merging into a
Conv1D and unmerging from it, DoRA served with one vector per adapter, and the magnitudes alone."""

from __future__ import annotations

from typing import Callable

import torch
from torch.overrides import TorchFunctionMode

from lora_edu.checks.core import CheckFailed, call_learner, expect_shape, expect_tensor, first_hint, passed

__all__ = [
    "check_dora_merge_conv1d",
    "check_dora_serving",
    "check_dora_unmerge_conv1d",
    "check_factored_row_norms",
    "check_magnitude_only",
]


def _randn(g: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=g, dtype=torch.float64)


class _DenseWatch(TorchFunctionMode):
    """Records whether any tensor computed under it is B A, or W0 + B A, up to a scale (either layout)."""

    def __init__(self, W0: torch.Tensor, BA: torch.Tensor):
        super().__init__()
        self.candidates = [(W0, BA), (W0.T, BA.T)]
        self.formed: str | None = None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if self.formed is None and isinstance(out, torch.Tensor) and out.is_floating_point():
            for W0, BA in self.candidates:
                if out.shape != BA.shape:
                    continue
                t = out.detach().double()
                for what, rest in (("the product B A", t), ("the dense matrix W0 + s B A", t - W0)):
                    c = (rest * BA).sum() / (BA * BA).sum()
                    if c.abs() > 1e-12 and torch.allclose(rest, c * BA, atol=1e-9, rtol=1e-9):
                        self.formed = what
        return out


def check_factored_row_norms(row_norms: Callable) -> None:
    """Exercise 6.1: ``row_norms(weight, A, B, scaling, fan_in_fan_out=False)``: ||W0 + s B A|| per output
    row, shape (out,), without forming the (out, in) matrix; ``weight`` is (in, out) when ``fan_in_fan_out``."""
    g = torch.Generator().manual_seed(5)
    for out_f, in_f, r, scaling, fan_in_fan_out in [(7, 5, 2, 0.5, False), (6, 9, 3, 2.0, False),
                                                    (6, 6, 2, 0.5, True), (4, 10, 3, 1.5, True)]:
        W0, A, B = _randn(g, out_f, in_f), _randn(g, r, in_f), _randn(g, out_f, r)
        weight = W0.T.contiguous() if fan_in_fan_out else W0
        layout = (f"a Conv1D weight of shape ({in_f}, {out_f}) (in, out, fan_in_fan_out=True)" if fan_in_fan_out
                  else f"an nn.Linear weight of shape ({out_f}, {in_f}) (out, in)")
        setting = f"For {layout}, r={r}, scaling={scaling:g}"
        watch = _DenseWatch(W0, B @ A)
        with watch:
            got = call_learner(row_norms, weight.clone(), A.clone(), B.clone(), scaling, fan_in_fan_out)
        got = expect_tensor(got, "row_norms")
        V = W0 + scaling * B @ A
        want = torch.linalg.norm(V, dim=1)
        expect_shape(got, want.shape, f"{setting}, row_norms' output, one norm per output feature,",
                     {(in_f,): "that is one per input, but on a Conv1D weight the output features are its columns"})
        got = got.double()
        if not torch.allclose(got, want, atol=1e-8):
            n0, cross = (W0 * W0).sum(1), (B * (W0 @ A.T)).sum(1)
            quad = (B @ (A @ A.T) * B).sum(1)
            wrong = [
                ((n0 + 2 * scaling * cross + scaling**2 * quad), "these are the squared norms: take the square root"),
                ((n0 + scaling * cross + scaling**2 * quad).clamp(min=0).sqrt(),
                 "the cross term between a row of W0 and its update counts twice in a squared norm"),
                ((n0 + scaling**2 * quad).sqrt(), "the cross term between a row of W0 and its update is missing: "
                 "the two are not orthogonal, so the squared norm of their sum is not the sum of squared norms"),
                ((n0 + 2 * scaling * cross + scaling * quad).clamp(min=0).sqrt(),
                 "the update's own term is scaled once; it is the update times itself, so the scale enters twice"),
                ((n0 + 2 * cross + quad).clamp(min=0).sqrt(), "the scaling is missing: the update is s B A"),
                (torch.linalg.norm(W0, dim=1), "these are the norms of W0 alone: the update B A is left out"),
            ]
            hint = first_hint(wrong, lambda v: v.shape == got.shape and torch.allclose(got, v, atol=1e-8))
            if hint is None and fan_in_fan_out:
                hint = "on a fan_in_fan_out weight, W0 is the transpose of what you are given"
            hint = hint or ("it is none of the usual slips (square root, cross term, scaling, layout): expand the "
                            "squared norm of one row by hand and compare")
            raise CheckFailed(f"{setting}, your norms are off by up to {(got - want).abs().max().item():.3g}: {hint}.")
        if watch.formed is not None:
            raise CheckFailed(f"{setting}, your norms are right, but your code computes {watch.formed}, a "
                              f"({out_f}, {in_f}) matrix, which is what the exercise asks you to avoid: work with "
                              "quantities that have r on one side.")
    passed("Correct: the row norms of W0 + s B A from W0's row norms, W0 A^T and A A^T, in both layouts, "
           "without an (out, in) update anywhere.")


def _serving_case(g: torch.Generator, out_f: int, in_f: int, r: int, n: int) -> tuple:
    W0, b0 = _randn(g, out_f, in_f), _randn(g, out_f)
    A, B = _randn(g, n, r, in_f), 0.5 * _randn(g, n, out_f, r)
    m = torch.linalg.norm(W0, dim=1) * (1 + 0.5 * torch.rand(n, out_f, generator=g, dtype=torch.float64))
    scaling = torch.tensor([2.0, 0.5, 1.0, 4.0][:n], dtype=torch.float64)
    return W0, b0, A, B, m, scaling


def _dora_layer_output(x, W0, b0, A, B, m, scaling) -> torch.Tensor:
    """lora_edu's DoRALinear with these weights, applied to x: the reference."""
    from lora_edu.dora import DoRALinear

    base = torch.nn.Linear(W0.shape[1], W0.shape[0], dtype=torch.float64)
    with torch.no_grad():
        base.weight.copy_(W0)
        base.bias.copy_(b0)
        layer = DoRALinear(base, r=A.shape[0], alpha=float(scaling) * A.shape[0]).double()
        layer.lora_A.weight.copy_(A)
        layer.lora_B.weight.copy_(B)
        layer.magnitude.copy_(m)
        return layer.eval()(x)


def check_dora_serving(serving_vector: Callable, serve: Callable) -> None:
    """Exercise 6.3: ``g = serving_vector(W0, A, B, m, scaling)`` for one adapter, shape (out,), and
    ``serve(x, W0, b0, A, B, g, scaling, index)`` for a batch whose row i uses adapter ``index[i]`` of the
    stacked A (n, r, in), B (n, out, r), g (n, out), scaling (n,)."""
    g = torch.Generator().manual_seed(7)
    for out_f, in_f, r, n in [(5, 7, 2, 3), (6, 4, 3, 4)]:
        W0, b0, A, B, m, scaling = _serving_case(g, out_f, in_f, r, n)
        setting = f"For W0 of shape ({out_f}, {in_f}) and r={r}"
        for k in range(n):
            s = float(scaling[k])
            got = expect_tensor(call_learner(serving_vector, W0.clone(), A[k].clone(), B[k].clone(), m[k].clone(),
                                             s), "serving_vector")
            V = W0 + s * B[k] @ A[k]
            want = m[k] / torch.linalg.norm(V, dim=1)
            expect_shape(got, want.shape, f"{setting}, serving_vector's output, one number per output feature,")
            got = got.double()
            if torch.allclose(got, want, atol=1e-8):
                continue
            wrong = [
                (m[k] / torch.linalg.norm(W0, dim=1), "you divided by the norms of W0 alone; the layer divides by "
                                                      "the norms of the adapted weight W0 + s B A"),
                (m[k], "that is the magnitude m itself: the vector the layer multiplies by is m over a norm"),
                (torch.linalg.norm(V, dim=1) / m[k], "that is upside down: the norm divides m"),
                (m[k] / torch.linalg.norm(W0 + B[k] @ A[k], dim=1), "the update in the norm is not scaled: it is "
                                                                   "s B A"),
            ]
            hint = first_hint(wrong, lambda v: torch.allclose(got, v, atol=1e-8),
                              "it is none of the usual slips: once the weights are fixed, work out what the layer "
                              "multiplies output feature i by, and compare one entry of yours with it")
            raise CheckFailed(f"{setting}, adapter {k}: your vector is off by up to "
                              f"{(got - want).abs().max().item():.3g}: {hint}.")
        gs = torch.stack([m[k] / torch.linalg.norm(W0 + scaling[k] * B[k] @ A[k], dim=1) for k in range(n)])
        index = torch.tensor([0, n - 1, 1, 0, n - 1, 2 % n, 1], dtype=torch.long)
        x = _randn(g, len(index), in_f)
        got = expect_tensor(call_learner(serve, x.clone(), W0.clone(), b0.clone(), A.clone(), B.clone(), gs.clone(),
                                         scaling.clone(), index.clone()), "serve")
        want = torch.stack([_dora_layer_output(x[i], W0, b0, A[k], B[k], m[k], scaling[k])
                            for i, k in enumerate(index.tolist())])
        setting = f"{setting}, a batch of {len(index)} rows using {n} adapters (index {index.tolist()})"
        expect_shape(got, want.shape, f"{setting}, serve's output")
        got = got.double()
        if torch.allclose(got, want, atol=1e-8):
            continue
        base = x @ W0.T
        lora = torch.einsum("bo,bor,bri,bi->bo", scaling[index, None].expand(-1, out_f), B[index], A[index], x)
        gi = gs[index]
        wrong = [
            (base + b0 + gi * lora, "the base output W0 x is not rescaled: DoRA multiplies the whole adapted "
                                    "weight's output by g, W0 x included"),
            (gi * (base + lora + b0), "the bias is rescaled too: the layer adds it after the rescaled weight, "
                                      "unchanged"),
            (base + b0 + (gi - 1) * base + gi * lora / scaling[index, None],
             "the low-rank part is not scaled by its adapter's s"),
            (base + b0 + (gs[0] - 1) * base + gs[0] * torch.einsum("or,ri,bi->bo", B[0], A[0], x) * scaling[0],
             "every row used adapter 0: row i should use adapter index[i]"),
        ]
        hint = first_hint(wrong, lambda v: torch.allclose(got, v, atol=1e-8))
        rows = [i for i in range(len(index)) if not torch.allclose(got[i], want[i], atol=1e-8)]
        hint = hint or (f"rows {rows} are wrong (adapters {[index[i].item() for i in rows]}): check which adapter's "
                        "g, A, B and s each row picks up")
        raise CheckFailed(f"{setting}, your output is off by up to {(got - want).abs().max().item():.3g}: {hint}.")
    passed("Correct: with g = m / ||W0 + s B A|| computed once per adapter, a mixed batch is the base output "
           "plus per-row corrections, and it matches the DoRA layer row by row.")


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
        _expect_conv1d_shape(got, want.shape, f"For {setting}, your merged weight")
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
        hint = first_hint(wrong, lambda variant: torch.allclose(got, variant, atol=1e-8),
                          "it is none of the usual slips (layout, axis, B A's orientation, the magnitude): work out "
                          "one output feature by hand and compare")
        raise CheckFailed(f"For {setting}, your merged weight is off by up to "
                          f"{(got - want).abs().max().item():.3g}: {hint}.")
    passed("Correct: one norm per output feature, which is a column of Conv1D's (in, out) weight, and the "
           "result back in Conv1D's layout.")


def _expect_conv1d_shape(got: torch.Tensor, shape: torch.Size, what: str) -> None:
    """Refuse a result in nn.Linear's (out, in) layout, or of any other wrong shape, saying which."""
    linear_layout = "you returned (out, in), nn.Linear's layout: transpose back, Conv1D stores (in, out)"
    expect_shape(got, shape, what, {tuple(shape)[::-1]: linear_layout})


def check_dora_unmerge_conv1d(unmerge: Callable) -> None:
    """Exercise 6.4: ``unmerge(merged, A, B, m, norm, alpha, r)``: W0 back, in Conv1D's (in, out) layout, from
    a DoRA merge into it and the row norms ``norm`` (out,) of W0 + s B A that the merge divided by."""
    g = torch.Generator().manual_seed(11)
    for in_f, out_f, r, alpha in [(5, 5, 2, 4.0), (6, 4, 2, 8.0)]:  # square first: a wrong axis runs there
        weight = _randn(g, in_f, out_f)  # W0 in Conv1D's layout
        A, B = _randn(g, r, in_f), _randn(g, out_f, r)
        m = torch.linalg.norm(weight, dim=0) * (1 + 0.5 * torch.rand(out_f, generator=g, dtype=torch.float64))
        V = weight.T + (alpha / r) * B @ A  # (out, in)
        norm = torch.linalg.norm(V, dim=1)
        merged = ((m / norm)[:, None] * V).T.contiguous()  # (in, out), as merging stores it
        got = expect_tensor(call_learner(unmerge, merged.clone(), A.clone(), B.clone(), m.clone(), norm.clone(),
                                         alpha, r), "unmerge")
        setting = f"For a Conv1D weight of shape ({in_f}, {out_f}) (in, out), r={r}"
        _expect_conv1d_shape(got, weight.shape, f"{setting}, your W0")
        got = got.double()
        if torch.allclose(got, weight, atol=1e-8):
            continue
        update = (alpha / r) * (B @ A).T  # (in, out)
        factor = m / norm  # one per output feature: a column of the (in, out) weight
        wrong = [
            (merged / factor[:, None] - update if in_f == out_f else None,
             "you divided each row of the (in, out) weight by a factor; each factor belongs to an output feature, "
             "which is a column here (PEFT's unmerge made this slip, silently on square weights: its issue #3531)"),
            (merged / factor, "the rescaled weight is unscaled, but the update s B A is still in it: subtract it"),
            (weight.T, "you returned (out, in), nn.Linear's layout: transpose back, Conv1D stores (in, out)"),
            (merged - update, "the update is subtracted, but the rescaling by m / norm that the merge applied "
                              "is not undone first (if you recomputed that norm from the merged weight, work out "
                              "what m / norm comes to there)"),
            (merged * factor - update, "you multiplied by m / norm again; undo the rescaling by dividing"),
            (merged / factor - (B @ A).T, "the update you subtract is not scaled: it is (alpha / r) B A"),
            (merged / factor - (alpha / r) * (B @ A) if in_f == out_f else None,
             "B A is (out, in): transpose it before subtracting it from the (in, out) weight"),
        ]
        hint = first_hint(wrong, lambda v: torch.allclose(got, v, atol=1e-8),
                          "it is none of the usual slips (axis, order, scale, layout): undo the merge of one output "
                          "feature by hand and compare")
        raise CheckFailed(f"{setting}, your W0 is off by up to {(got - weight).abs().max().item():.3g}: {hint}.")
    passed("Correct: each output feature, a column of Conv1D's weight, divided by its m / norm, and then the "
           "update s B A taken away, in Conv1D's layout.")


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
