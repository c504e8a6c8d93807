"""Chapter 8's checkers accept the right answers and reject wrong ones with a useful sentence."""

import pytest
import torch
import torch.nn as nn

from lora_edu.checks import CheckFailed
from lora_edu.checks.ch08_peft_family import (check_adamix_exact_merge, check_ia3_merge, check_prompt_tuned_logits,
                                              check_vera_merge)
from lora_edu.peft_family import AdaMixLinear, PromptTuned, ScaleOutput, VeRALinear


def stub(*args):
    raise NotImplementedError("Exercise hint")


def expect(check, fn, message):
    with pytest.raises(CheckFailed, match=message):
        check(fn)


# --- Exercise 8.1: VeRA merged by hand ---

def vera_right(weight, A, B, d, b):
    out, fan_in = weight.shape
    return weight + (b[:, None] * B[:out]) @ (d[:, None] * A[:, :fan_in])


def vera_by_the_package(weight, A, B, d, b):
    layer = nn.Linear(weight.shape[1], weight.shape[0], dtype=weight.dtype)
    vera = VeRALinear(layer, A, B)
    with torch.no_grad():
        layer.weight.copy_(weight), vera.d.copy_(d), vera.b.copy_(b)
    return vera.fold_into_base().weight.detach()


def vera_in_place(weight, A, B, d, b):
    weight += (b[:, None] * B[:weight.shape[0]]) @ (d[:, None] * A[:, :weight.shape[1]])
    return weight


def vera_wrong(update):
    def merge(weight, A, B, d, b):
        out, fan_in = weight.shape
        return update(weight, A[:, :fan_in], B[:out], d, b)
    return merge


WRONG_VERA = {
    "the update alone": (vera_wrong(lambda w, A, B, d, b: (b[:, None] * B) @ (d[:, None] * A)), "update alone"),
    "transposed": (vera_wrong(lambda w, A, B, d, b: (w + (b[:, None] * B) @ (d[:, None] * A)).T),
                          "a layer from 6 to 24 features.*transpose"),
    "transposed update, square layer": (
        lambda w, A, B, d, b: vera_right(w, A, B, d, b) if w.shape[0] != w.shape[1]
        else w + ((b[:, None] * B[:6]) @ (d[:, None] * A[:, :6])).T, "from 6 to 6 features.*transposed"),
    "b left out": (vera_wrong(lambda w, A, B, d, b: w + B @ (d[:, None] * A)), "b is missing"),
    "d left out": (vera_wrong(lambda w, A, B, d, b: w + (b[:, None] * B) @ A), "d is missing"),
    "both left out": (vera_wrong(lambda w, A, B, d, b: w + B @ A), "both missing"),
    "nothing added": (lambda w, A, B, d, b: w, "nothing was added"),
    "unsliced": (lambda w, A, B, d, b: (b[:w.shape[0], None] * B) @ (d[:, None] * A), "size of the shared"),
    "the trailing slices": (lambda w, A, B, d, b: w + (b[:, None] * B[-w.shape[0]:]) @ (d[:, None] * A[:, -w.shape[1]:]),
                            "other parts of the shared matrices"),
    "scales by d twice": (vera_wrong(lambda w, A, B, d, b: w + (b[:, None] * B) @ (d[:, None] ** 2 * A)),
                          "one matrix applied to x"),
    "wrong shape": (lambda w, A, B, d, b: w[:, :1], "keeps the layer's shape"),
    "not a tensor": (lambda w, A, B, d, b: w.tolist(), "torch.Tensor"),
    "stub": (stub, "still the stub"),
    "the package's merge": (vera_by_the_package, r"calls the package's VeRALinear\.fold_into_base\(\)"),
}


@pytest.mark.parametrize("right", [vera_right, vera_in_place])
def test_vera_merge_accepts(right, capsys):
    check_vera_merge(right)
    assert capsys.readouterr().out.startswith("Correct")


@pytest.mark.parametrize("name", WRONG_VERA)
def test_vera_merge_rejects(name):
    expect(check_vera_merge, *WRONG_VERA[name])


# --- Exercise 8.2: (IA)³ merged into c_attn ---

def ia3_right(weight, bias, l_k, l_v):
    rows = torch.cat([torch.ones_like(l_k), l_k, l_v])
    return weight * rows[:, None], bias * rows


def ia3_in_place(weight, bias, l_k, l_v):
    width = l_k.numel()
    weight[width:2 * width] *= l_k[:, None]
    weight[2 * width:] *= l_v[:, None]
    bias[width:2 * width] *= l_k
    bias[2 * width:] *= l_v
    return weight, bias


def ia3_by_the_package(weight, bias, l_k, l_v):
    layer = nn.Linear(weight.shape[1], weight.shape[0], dtype=weight.dtype)
    with torch.no_grad():
        layer.weight.copy_(weight), layer.bias.copy_(bias)
    scaled = ScaleOutput(layer, start=l_k.numel())
    with torch.no_grad():
        scaled.scale.copy_(torch.cat([l_k, l_v]))
    merged = scaled.fold_into_base()
    return merged.weight.detach(), merged.bias.detach()


def scaled_rows(first, second, third, bias_too=True):
    def merge(weight, bias, l_k, l_v):
        parts = {"1": torch.ones_like(l_k), "k": l_k, "v": l_v}
        rows = torch.cat([parts[first], parts[second], parts[third]])
        return weight * rows[:, None], bias * rows if bias_too else bias
    return merge


WRONG_IA3 = {
    "bias not scaled": (scaled_rows("1", "k", "v", bias_too=False), "bias must be scaled"),
    "queries and keys": (scaled_rows("k", "v", "1"), "second and third thirds"),
    "keys and values swapped": (scaled_rows("1", "v", "k"), "l_k goes with the keys"),
    "nothing scaled": (lambda w, b, k, v: (w, b), "nothing was scaled"),
    "columns": (lambda w, b, k, v: (w * k[None, :], b), "an output feature is a row. Which rows"),
    "the package's merge": (ia3_by_the_package, r"calls the package's ScaleOutput\.fold_into_base\(\)"),
    "transposed": (lambda w, b, k, v: (ia3_right(w, b, k, v)[0].T, b), "keep their shapes"),
    "one tensor": (lambda w, b, k, v: w, "pair"),
    "stub": (stub, "still the stub"),
}


@pytest.mark.parametrize("right", [ia3_right, ia3_in_place])
def test_ia3_accepts(right, capsys):
    check_ia3_merge(right)
    assert capsys.readouterr().out.startswith("Correct")


@pytest.mark.parametrize("name", WRONG_IA3)
def test_ia3_rejects(name):
    expect(check_ia3_merge, *WRONG_IA3[name])


# --- Exercise 8.3: prompt tuning's forward pass ---

def prompt_right(model, prompt, idx):
    n, T = prompt.shape[0], idx.shape[1]
    x = torch.cat([prompt.expand(idx.shape[0], -1, -1), model.transformer.wte(idx)], dim=1)
    x = x + model.transformer.wpe(torch.arange(n + T))
    for block in model.transformer.h:
        x = block(x)
    return model.lm_head(model.transformer.ln_f(x[:, n:]))


def prompt_by_the_package(model, prompt, idx):
    tuned = PromptTuned(model, prompt.shape[0])
    with torch.no_grad():
        tuned.prompt.copy_(prompt)
    return tuned(idx)


def prompt_variant(keep, restart_positions=False, after=False):
    def forward(model, prompt, idx):
        n, T = prompt.shape[0], idx.shape[1]
        virtual, tokens = prompt.expand(idx.shape[0], -1, -1), model.transformer.wte(idx)
        wpe = model.transformer.wpe
        if restart_positions:
            x = torch.cat([virtual + wpe(torch.arange(n)), tokens + wpe(torch.arange(T))], dim=1)
        else:
            x = torch.cat([tokens, virtual] if after else [virtual, tokens], dim=1) + wpe(torch.arange(n + T))
        for block in model.transformer.h:
            x = block(x)
        logits = model.lm_head(model.transformer.ln_f(x))
        return {"all": logits, "first": logits[:, :T], "last": logits[:, n:]}[keep]
    return forward


WRONG_PROMPT = {
    "every position": (prompt_variant("all"), "real tokens only"),
    "the first T": (prompt_variant("first"), "which positions hold the real tokens"),
    "positions restart": (prompt_variant("last", restart_positions=True), "follow the virtual ones"),
    "prompt after the input": (prompt_variant("first", after=True), "before the input"),
    "no prompt": (lambda model, prompt, idx: model(idx), "off by"),
    "stub": (stub, "still the stub"),
    "the package's forward": (prompt_by_the_package, r"calls the package's PromptTuned\.forward\(\)"),
}


@pytest.mark.parametrize("right", [prompt_right])
def test_prompt_accepts(right, capsys):
    check_prompt_tuned_logits(right)
    assert capsys.readouterr().out.startswith("Correct")


@pytest.mark.parametrize("name", WRONG_PROMPT)
def test_prompt_rejects(name):
    expect(check_prompt_tuned_logits, *WRONG_PROMPT[name])


# --- Exercise 8.5: the exact merge of AdaMix copies that share nothing ---

def exact_right(A, B, scaling):
    return scaling * torch.einsum("kor,kri->oi", B, A) / A.shape[0]


def exact_loop(A, B, scaling):
    return sum(b @ a for a, b in zip(A, B)) * scaling / len(A)


def rank_right(copies, r, in_features, out_features):
    return min(copies * r, in_features, out_features)


def exact_by_the_package(A, B, scaling):
    copies, r, fan_in = A.shape
    layer = AdaMixLinear(nn.Linear(fan_in, B.shape[1], dtype=A.dtype), r=r, alpha=scaling * r, copies=copies,
                         share_b=False)
    with torch.no_grad():
        for k in range(copies):
            layer.lora_A[k].weight.copy_(A[k]), layer.lora_B[k].weight.copy_(B[k])
    lora = layer.to_lora()
    return lora.delta_weight().detach()


WRONG_EXACT = {
    "averaged apart": (lambda A, B, s: B.mean(0) @ A.mean(0) * s, "averages the A's and the B's apart"),
    "summed": (lambda A, B, s: torch.einsum("kor,kri->oi", B, A) * s, "times too large"),
    "no scaling": (lambda A, B, s: torch.einsum("kor,kri->oi", B, A) / len(A), "scaling is missing"),
    "first copy": (lambda A, B, s: B[0] @ A[0] * s, "first copy alone"),
    "transposed": (lambda A, B, s: exact_right(A, B, s).T, "transpose"),
    "other": (lambda A, B, s: exact_right(A, B, s) + 1e-3, "average those matrices"),
    "stub": (stub, "still the stub"),
    "the package's merge": (exact_by_the_package, r"calls the package's AdaMixLinear\.to_lora\(\)"),
}
WRONG_RANK = {
    "one copy's": (lambda M, r, i, o: r, "one copy's rank"),
    "unbounded": (lambda M, r, i, o: M * r, "bounded by its own shape"),
    "the shape's": (lambda M, r, i, o: min(i, o), "the copies bound it too"),
    "other": (lambda M, r, i, o: M + r, "count the directions"),
}


@pytest.mark.parametrize("right", [exact_right, exact_loop])
def test_adamix_exact_merge_accepts(right, capsys):
    check_adamix_exact_merge(right, rank_right)
    assert capsys.readouterr().out.startswith("Correct")


@pytest.mark.parametrize("name", WRONG_EXACT)
def test_adamix_exact_merge_rejects(name):
    fn, message = WRONG_EXACT[name]
    with pytest.raises(CheckFailed, match=message):
        check_adamix_exact_merge(fn, rank_right)


@pytest.mark.parametrize("name", WRONG_RANK)
def test_adamix_largest_rank_rejects(name):
    fn, message = WRONG_RANK[name]
    with pytest.raises(CheckFailed, match=message):
        check_adamix_exact_merge(exact_right, fn)
