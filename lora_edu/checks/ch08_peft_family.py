"""Checkers for chapter 8's exercises: VeRA merged by hand, (IA)³ merged into c_attn, prompt tuning's forward
pass, and the exact merge of AdaMix copies that share nothing."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable

import torch
import torch.nn as nn

from lora_edu.checks.core import CheckFailed, call_learner, expect_shape, expect_tensor, first_hint, passed
from lora_edu.gpt2 import load_tiny
from lora_edu.peft_family import AdaMixLinear, PromptTuned, ScaleOutput, VeRALinear

__all__ = ["check_vera_merge", "check_ia3_merge", "check_prompt_tuned_logits", "check_adamix_exact_merge"]


@contextmanager
def _written_by_hand(exercise: str, *methods: tuple[type, str]):
    """Fail the check if the learner's code calls one of the package's own ``methods`` instead of its own."""
    used = []
    saved = [(cls, name, getattr(cls, name)) for cls, name in methods]

    def spy(cls, name, original):
        def method(self, *args, **kwargs):
            used.append(f"{cls.__name__}.{name}()")
            return original(self, *args, **kwargs)
        return method

    for cls, name, original in saved:
        setattr(cls, name, spy(cls, name, original))
    try:
        yield
    finally:
        for cls, name, original in saved:
            setattr(cls, name, original)
    if used:
        raise CheckFailed(f"Your answer calls the package's {used[0]}, which does {exercise} for you: "
                          "the exercise is to write it yourself, from the tensors.")


def check_vera_merge(merge_vera: Callable) -> None:
    """Exercise 8.1: ``merge_vera(weight, A, B, d, b)``, the weight of a plain layer computing what VeRA did."""
    g = torch.Generator().manual_seed(0)
    width, rank = 6, 5
    A_shared = torch.randn(rank, 4 * width, generator=g, dtype=torch.float64)
    B_shared = torch.randn(4 * width, rank, generator=g, dtype=torch.float64)
    # (in, out): like GPT-2's c_fc, its MLP's c_proj, and a square c_proj of the attention
    for fan_in, fan_out in ((width, 4 * width), (4 * width, width), (width, width)):
        layer = nn.Linear(fan_in, fan_out, dtype=torch.float64)
        vera = VeRALinear(layer, A_shared, B_shared)
        with torch.no_grad():
            vera.d.copy_(0.1 + torch.randn(rank, generator=g, dtype=torch.float64))
            vera.b.copy_(torch.randn(fan_out, generator=g, dtype=torch.float64))
        d, b = vera.d.detach(), vera.b.detach()
        weight = layer.weight.detach()
        x = torch.randn(7, fan_in, generator=g, dtype=torch.float64)
        with torch.no_grad():
            want = vera(x)
        with _written_by_hand("the merge", (VeRALinear, "fold_into_base"), (VeRALinear, "forward")):
            answer = call_learner(merge_vera, weight.clone(), A_shared.clone(), B_shared.clone(), d.clone(),
                                  b.clone())
        answer = expect_tensor(answer, "merge_vera")
        setting = f"a layer from {fan_in} to {fan_out} features"
        expect_shape(answer, weight.shape, f"For {setting} the merged weight", {
            (B_shared.shape[0], A_shared.shape[1]): ("that is the size of the shared matrices, drawn for the largest "
                                                     "layer: this layer uses only part of them"),
            tuple(weight.T.shape): "that is the transpose: an nn.Linear weight is (out, in), one row per output",
        }, otherwise="the merged weight replaces the layer's own, so it keeps the layer's shape")
        got = x @ answer.double().T + layer.bias.detach()
        if torch.allclose(got, want, atol=1e-10):
            continue
        A, B = A_shared[:, :fan_in], B_shared[:fan_out]
        update = (b[:, None] * B) @ (d[:, None] * A)
        wrong = [
            (update, "you returned the update alone: the merged layer must still compute the base layer's W x"),
            (weight + update.T if fan_in == fan_out else None,
             "your update is transposed: in an nn.Linear weight, rows are outputs and columns inputs"),
            (weight + B @ (d[:, None] * A), "b is missing: VeRA scales each output of B's product by b"),
            (weight + (b[:, None] * B) @ A, "d is missing: VeRA scales each of the r middle features by d"),
            (weight + B @ A, "d and b are both missing: B A alone is VeRA's frozen random part, and d and b are what it trained"),
            (weight + (b[:, None] * B_shared[-fan_out:]) @ (d[:, None] * A_shared[:, -fan_in:]),
             "you took other parts of the shared matrices than VeRALinear does: it keeps their leading "
             "columns of A and rows of B"),
            (weight, "nothing was added: the trained d and b must change the weight"),
        ]
        error = (got - want).abs().max().item()
        hint = first_hint(wrong, lambda w: torch.allclose(answer.double(), w, atol=1e-10),
                          "write VeRA's extra output as one matrix applied to x, and add that matrix to the weight")
        raise CheckFailed(f"For {setting} your merged layer's outputs are off by up to {error:.3g}: {hint}.")
    passed("Correct: VeRA's extra output is a rank-r matrix, diag(b) B diag(d) A with A and B sliced to "
           "the layer, so it adds to the weight like LoRA's B A; the three shapes all merge exactly.")


def check_ia3_merge(merge_ia3_into_qkv: Callable) -> None:
    """Exercise 8.2: ``merge_ia3_into_qkv(weight, bias, l_k, l_v)``: c_attn with (IA)³'s keys and values folded in."""
    g = torch.Generator().manual_seed(0)
    width = 6
    weight = torch.randn(3 * width, width, generator=g, dtype=torch.float64)
    bias = torch.randn(3 * width, generator=g, dtype=torch.float64)
    l_k, l_v = (1 + 0.5 * torch.randn(width, generator=g, dtype=torch.float64) for _ in range(2))
    layer = nn.Linear(width, 3 * width, dtype=torch.float64)
    with torch.no_grad():
        layer.weight.copy_(weight), layer.bias.copy_(bias)
    scaled = ScaleOutput(layer, start=width)
    with torch.no_grad():
        scaled.scale.copy_(torch.cat([l_k, l_v]))
    x = torch.randn(5, width, generator=g, dtype=torch.float64)
    want = scaled(x).detach()

    with _written_by_hand("the merge", (ScaleOutput, "fold_into_base"), (ScaleOutput, "forward")):
        answer = call_learner(merge_ia3_into_qkv, weight.clone(), bias.clone(), l_k.clone(), l_v.clone())
    if not isinstance(answer, tuple) or len(answer) != 2:
        raise CheckFailed("merge_ia3_into_qkv should return a pair (weight, bias).")
    new_weight, new_bias = (expect_tensor(t, "merge_ia3_into_qkv") for t in answer)
    if new_weight.shape != weight.shape or new_bias.shape != bias.shape:
        raise CheckFailed(f"The merged weight and bias should keep their shapes {tuple(weight.shape)} and "
                          f"{tuple(bias.shape)}, got {tuple(new_weight.shape)} and {tuple(new_bias.shape)}.")
    got = x @ new_weight.double().T + new_bias.double()
    if torch.allclose(got, want, atol=1e-10):
        passed("Correct: the keys' and values' rows of W, and their entries of b, carry (IA)³'s vectors; "
               "the queries are untouched, so the merged layer computes what (IA)³ computed.")
        return
    ones = torch.ones(width, dtype=torch.float64)
    rows = torch.cat([ones, l_k, l_v])
    candidates = [
        (weight * rows[:, None], bias, "the bias must be scaled too: (IA)³ rescales the layer's whole output"),
        (weight * torch.cat([l_k, l_v, ones])[:, None], bias * torch.cat([l_k, l_v, ones]),
         "c_attn's output is (queries, keys, values) in that order: the vectors belong to the second and "
         "third thirds, not the first two"),
        (weight * torch.cat([ones, l_v, l_k])[:, None], bias * torch.cat([ones, l_v, l_k]),
         "l_k goes with the keys (the second third) and l_v with the values (the last third)"),
        (weight, bias, "nothing was scaled: the merged layer must multiply the keys by l_k and the values by l_v"),
    ]
    hint = first_hint(((x @ w.T + b, h) for w, b, h in candidates), lambda out: torch.allclose(got, out, atol=1e-10),
                      "an nn.Linear weight is (out, in): an output feature is a row. Which rows make the keys, "
                      "and which the values?")
    raise CheckFailed(f"Your merged layer's outputs are off by up to {(got - want).abs().max().item():.3g}: {hint}.")


def check_prompt_tuned_logits(prompt_tuned_logits: Callable) -> None:
    """Exercise 8.3: ``prompt_tuned_logits(model, prompt, idx)``, prompt tuning's forward pass."""
    model = load_tiny().eval()
    g = torch.Generator().manual_seed(0)
    for n_virtual, shape in [(4, (2, 9)), (16, (3, 20))]:
        reference = PromptTuned(model, n_virtual).eval()
        with torch.no_grad():
            reference.prompt.copy_(0.3 * torch.randn(n_virtual, model.config.n_embd, generator=g))
        idx = torch.randint(0, model.config.vocab_size, shape, generator=g)
        with torch.no_grad():
            want = reference(idx)
            with _written_by_hand("the forward pass", (PromptTuned, "forward")):
                got = call_learner(prompt_tuned_logits, model, reference.prompt.detach().clone(), idx)
            got = expect_tensor(got, "prompt_tuned_logits")
        setting = f"{n_virtual} virtual tokens before {shape[1]} real ones"
        with_virtual = got.dim() > 1 and got.shape[1] == shape[1] + n_virtual
        expect_shape(got, want.shape, f"With {setting} the logits",
                     otherwise=("return the logits of the real tokens only: the virtual tokens' own predictions are "
                                "dropped" if with_virtual else "one row of logits per real token"))
        if torch.allclose(got, want, atol=1e-4):
            continue
        with torch.no_grad():
            full = _forward(model, reference.prompt, idx, shift_positions=True, prompt_first=True)
            restarted = _forward(model, reference.prompt, idx, shift_positions=False, prompt_first=True)
            after = _forward(model, reference.prompt, idx, shift_positions=True, prompt_first=False)
        wrong = [
            (full[:, :shape[1]], "you kept the first positions' logits, which are the virtual tokens' and the "
                                 "first real ones': which positions hold the real tokens?"),
            (restarted[:, n_virtual:], "the real tokens' positions must follow the virtual ones (n_virtual, ..., "
                                       "n_virtual + T - 1): the prompt takes the first positions of the context"),
            (after[:, :shape[1]], "the virtual tokens go before the input, not after it"),
        ]
        hint = first_hint(wrong, lambda w: w.shape == got.shape and torch.allclose(got, w, atol=1e-4),
                          "put the prompt before the tokens' embeddings, add position embeddings 0 .. n_virtual + T "
                          "- 1, run every block, ln_f and lm_head, and keep the real tokens' logits")
        raise CheckFailed(f"With {setting} your logits are off by up to {(got - want).abs().max().item():.3g}: "
                          f"{hint}.")
    passed("Correct: the learned embeddings come first, take the first positions, and only the real tokens' "
           "logits are kept.")


def _forward(model: nn.Module, prompt: torch.Tensor, idx: torch.Tensor, shift_positions: bool,
             prompt_first: bool) -> torch.Tensor:
    """Prompt tuning's forward pass, right or with one of the usual mistakes; all positions' logits."""
    n, T = prompt.shape[0], idx.shape[1]
    tokens = model.transformer.wte(idx)
    virtual = prompt.expand(idx.shape[0], -1, -1)
    wpe = model.transformer.wpe
    if shift_positions:
        x = torch.cat([virtual, tokens] if prompt_first else [tokens, virtual], dim=1) + wpe(torch.arange(n + T))
    else:
        x = torch.cat([virtual + wpe(torch.arange(n)), tokens + wpe(torch.arange(T))], dim=1)
    for block in model.transformer.h:
        x = block(x)
    return model.lm_head(model.transformer.ln_f(x))


def check_adamix_exact_merge(exact_merge: Callable, largest_rank: Callable) -> None:
    """Exercise 8.5: ``exact_merge(A, B, scaling)``, the one weight update that computes the average of
    ``M`` unshared LoRA copies (A: (M, r, in), B: (M, out, r)); ``largest_rank(copies, r, in_features,
    out_features)``, the largest rank that update can have."""
    g = torch.Generator().manual_seed(0)
    for copies, r, fan_in, fan_out in ((4, 2, 6, 9), (3, 3, 10, 5)):
        layer = AdaMixLinear(nn.Linear(fan_in, fan_out, dtype=torch.float64), r=r, alpha=2 * r, copies=copies,
                             share_b=False)
        with torch.no_grad():
            for p in (*layer.lora_A.parameters(), *layer.lora_B.parameters()):
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64))
        A = torch.stack([a.weight.detach() for a in layer.lora_A])
        B = torch.stack([b.weight.detach() for b in layer.lora_B])
        x = torch.randn(7, fan_in, generator=g, dtype=torch.float64)
        with torch.no_grad():
            routed = torch.stack([layer.to_lora(route=k)(x) - layer.layer(x) for k in range(copies)])
        want = routed.mean(0)  # the average of the copies' extra outputs
        with _written_by_hand("the merge", (AdaMixLinear, "averaged"), (AdaMixLinear, "to_lora"),
                              (AdaMixLinear, "forward")):
            answer = call_learner(exact_merge, A.clone(), B.clone(), layer.scaling)
        answer = expect_tensor(answer, "exact_merge")
        setting = f"{copies} copies of rank {r} on a layer from {fan_in} to {fan_out} features"
        expect_shape(answer, (fan_out, fan_in), f"For {setting} the update", {
            (fan_in, fan_out): "that is the transpose: an nn.Linear weight is (out, in), one row per output",
        }, otherwise="the update is added to the layer's weight, so it has the weight's shape")
        got = x @ answer.double().T
        if not torch.allclose(got, want, atol=1e-10):
            products = torch.einsum("kor,kri->koi", B, A)
            wrong = [
                (B.mean(0) @ A.mean(0) * layer.scaling,
                 "that averages the A's and the B's apart, the merge the chapter showed is not exact without "
                 "sharing: what does each copy add to the weight on its own?"),
                (products.sum(0) * layer.scaling, f"that is {copies} times too large: the copies' outputs are "
                                                  "averaged, not added"),
                (products.mean(0), "the scaling is missing: each copy's extra output is multiplied by alpha / r"),
                (products[0] * layer.scaling, "that is the first copy alone: the merge keeps every copy"),
            ]
            hint = first_hint(wrong, lambda w: torch.allclose(answer.double(), w, atol=1e-10),
                              "write what one copy adds to the layer's output as a matrix applied to x, then "
                              "average those matrices")
            raise CheckFailed(f"For {setting} your update's outputs are off by up to "
                              f"{(got - want).abs().max().item():.3g}: {hint}.")
    for copies, r, fan_in, fan_out, want in ((4, 2, 64, 64, 8), (8, 8, 128, 384, 64), (8, 8, 128, 48, 48),
                                             (3, 4, 10, 128, 10)):
        got = call_learner(largest_rank, copies, r, fan_in, fan_out)
        if got == want:
            continue
        setting = f"{copies} copies of rank {r} on a layer from {fan_in} to {fan_out} features"
        wrong = [
            (r, "that is one copy's rank: a sum of several rank-r matrices can have a larger one"),
            (copies * r, "a matrix's rank is also bounded by its own shape: how many rows and columns has it?"),
            (min(fan_in, fan_out), "the copies bound it too, when they are few: how many directions can "
                                   f"{copies} rank-{r} matrices add up to?"),
        ]
        hint = first_hint(wrong, lambda w: got == w, "count the directions the copies' updates can span, "
                                                     "and the directions a matrix of this shape has room for")
        raise CheckFailed(f"For {setting} you said {got!r}, but the update can have rank {want}: {hint}.")
    passed("Correct: the average of the copies' products B_k A_k is one weight update, exact, but its rank can "
           "reach copies x r (and the layer's own limit): merged this way, unshared copies are no longer one "
           "rank-r adapter, which is what sharing B keeps.")
