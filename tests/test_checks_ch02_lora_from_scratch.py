"""Chapter 2's checkers accept the right answer and reject wrong ones with a useful sentence."""

import pytest
import torch
import torch.nn as nn

from lora_edu.checks import (
    CheckFailed,
    check_count_lora_parameters,
    check_inject_lora,
    check_lora_forward,
    check_merge_unmerge,
)
from lora_edu.checks.ch02_lora_from_scratch import RANK_MARGIN, _best_toy_loss, check_smallest_rank, rank_toy
from lora_edu.lora_layer import LoRALinear


def stub(*args):
    raise NotImplementedError("Exercise hint")


# --- Exercise 2.1: the LoRA forward pass ---

def right_forward(x, W0, b0, A, B, alpha, r):
    return x @ W0.T + b0 + (alpha / r) * (x @ A.T) @ B.T


def linear_forward(x, W0, b0, A, B, alpha, r):  # also right, the nn.functional way
    return torch.nn.functional.linear(x, W0, b0) + torch.nn.functional.linear(x @ A.T, B) * alpha / r


WRONG_FORWARDS = {
    "scaled by alpha": (lambda x, W0, b0, A, B, alpha, r: x @ W0.T + b0 + alpha * (x @ A.T) @ B.T, "by alpha, but"),
    "scaled by r / alpha": (lambda x, W0, b0, A, B, alpha, r: x @ W0.T + b0 + r / alpha * (x @ A.T) @ B.T, "by r / alpha"),
    "not scaled": (lambda x, W0, b0, A, B, alpha, r: x @ W0.T + b0 + (x @ A.T) @ B.T, "not scaled"),
    "integer division": (lambda x, W0, b0, A, B, alpha, r: x @ W0.T + b0 + (alpha // r) * (x @ A.T) @ B.T,
                         "integer division, which truncates"),
    "no bias": (lambda x, W0, b0, A, B, alpha, r: x @ W0.T + alpha / r * (x @ A.T) @ B.T, "bias is missing"),
    "only LoRA": (lambda x, W0, b0, A, B, alpha, r: alpha / r * (x @ A.T) @ B.T, "only the LoRA path"),
    "LoRA and bias only": (lambda x, W0, b0, A, B, alpha, r: b0 + alpha / r * (x @ A.T) @ B.T, "x @ W0.T is missing"),
    "no LoRA": (lambda x, W0, b0, A, B, alpha, r: x @ W0.T + b0, "LoRA path is missing"),
    "transposed output": (lambda x, W0, b0, A, B, alpha, r: right_forward(x, W0, b0, A, B, alpha, r).mT, "returned the transpose"),
    "flattened output": (lambda x, W0, b0, A, B, alpha, r: right_forward(x, W0, b0, A, B, alpha, r).flatten(), "leading dimensions"),
    "W0 not transposed": (lambda x, W0, b0, A, B, alpha, r: x @ W0 + b0, r"compute x @ W0.T and \(x @ A.T\) @ B.T"),
    "2-D only": (lambda x, W0, b0, A, B, alpha, r: (W0 @ x.t()).t() + b0 + alpha / r * (B @ (A @ x.t())).t(), "any number of leading"),
    "something else": (lambda x, W0, b0, A, B, alpha, r: right_forward(x, W0, b0, A, B, alpha, r) + 0.1, "off by up to 0.1"),
    "not a tensor": (lambda x, W0, b0, A, B, alpha, r: right_forward(x, W0, b0, A, B, alpha, r).tolist(), "torch.Tensor"),
    "stub": (stub, "still the stub"),
}


@pytest.mark.parametrize("right", [right_forward, linear_forward])
def test_lora_forward_accepts(right, capsys):
    check_lora_forward(right)
    assert "Correct" in capsys.readouterr().out


@pytest.mark.parametrize("name", WRONG_FORWARDS)
def test_lora_forward_rejects(name):
    fn, message = WRONG_FORWARDS[name]
    with pytest.raises(CheckFailed, match=message):
        check_lora_forward(fn)


# --- Exercise 2.2: merge and unmerge ---

def right_merge(W0, A, B, alpha, r):
    return W0 + (alpha / r) * B @ A


def right_unmerge(W, A, B, alpha, r):
    return W - (alpha / r) * B @ A


def merge_in_place(W0, A, B, alpha, r):
    W0 += (alpha / r) * B @ A
    return W0


def unmerge_in_place(W, A, B, alpha, r):
    return W.sub_((alpha / r) * B @ A)


def merge_scaling_A_in_place(W0, A, B, alpha, r):
    A *= alpha / r
    return W0 + B @ A


def merge_right_only_in_float64(W0, A, B, alpha, r):
    scaling = alpha / r if W0.dtype == torch.float64 else 1.0
    return W0 + scaling * B @ A


WRONG_MERGES = {
    "no scaling": (lambda W0, A, B, alpha, r: W0 + B @ A, "merge forgot the scaling"),
    "scaled by alpha": (lambda W0, A, B, alpha, r: W0 + alpha * B @ A, "scaled by alpha, but"),
    "scaled by r / alpha": (lambda W0, A, B, alpha, r: W0 + r / alpha * B @ A, "scaled by r / alpha"),
    "subtracts": (lambda W0, A, B, alpha, r: W0 - alpha / r * B @ A, "merge subtracted the update"),
    "update only": (lambda W0, A, B, alpha, r: alpha / r * B @ A, "returned only the update"),
    "A @ B": (lambda W0, A, B, alpha, r: W0 + alpha / r * A @ B, r"B @ A \(not A @ B\)"),
    "transposed": (lambda W0, A, B, alpha, r: (W0.T + alpha / r * A.T @ B.T), r"should have shape \(5, 7\), but yours has \(7, 5\)"),
    "in place": (merge_in_place, r"merge changed its argument W0 in place.*W0 \+= "),
    "scales A in place": (merge_scaling_A_in_place, "merge changed its argument A in place .* leave A as it was"),
    "something else": (lambda W0, A, B, alpha, r: W0 + alpha / r * B @ A + 0.5, r"merge should return W0 \+ \(alpha / r\)"),
    "not a tensor": (lambda W0, A, B, alpha, r: right_merge(W0, A, B, alpha, r).numpy(), "torch.Tensor"),
    "stub": (stub, "still the stub"),
}

WRONG_UNMERGES = {
    "adds": (lambda W, A, B, alpha, r: W + alpha / r * B @ A, "unmerge added the update again"),
    "no scaling": (lambda W, A, B, alpha, r: W - B @ A, "unmerge forgot the scaling"),
    "scaled by alpha": (lambda W, A, B, alpha, r: W - alpha * B @ A, "scaled by alpha, but"),
    "unchanged": (lambda W, A, B, alpha, r: W.clone(), "returned W unchanged"),
    "A @ B": (lambda W, A, B, alpha, r: W - alpha / r * A @ B, r"B @ A \(not A @ B\)"),
    "in place": (unmerge_in_place, r"unmerge changed its argument W in place.*W\.sub_"),
    "stub": (stub, "still the stub"),
}


def test_merge_unmerge_accepts(capsys):
    check_merge_unmerge(right_merge, right_unmerge)
    check_merge_unmerge(lambda W0, A, B, alpha, r: torch.addmm(W0, B, A, alpha=alpha / r), right_unmerge)
    assert capsys.readouterr().out.count("Correct") == 2


@pytest.mark.parametrize("name", WRONG_MERGES)
def test_merge_rejects(name):
    fn, message = WRONG_MERGES[name]
    with pytest.raises(CheckFailed, match=message):
        check_merge_unmerge(fn, right_unmerge)


@pytest.mark.parametrize("name", WRONG_UNMERGES)
def test_unmerge_rejects(name):
    fn, message = WRONG_UNMERGES[name]
    with pytest.raises(CheckFailed, match=message):
        check_merge_unmerge(right_merge, fn)


def test_merge_unmerge_checks_the_round_trip():
    with pytest.raises(CheckFailed, match=r"unmerge\(merge\(W0\)\) should give back W0"):
        check_merge_unmerge(merge_right_only_in_float64, right_unmerge)


# --- Exercise 2.3: injecting LoRA layers into a model ---

def matches(full, names):
    return any(full == n or full.endswith("." + n) for n in names)


def make_inject(match=matches, *, only_linear=True, walk="modules", wrap=None, order="sorted", settings=None, extra=()):
    """An inject_lora, right by default; each option breaks it in one way."""
    wrap = wrap or (lambda module, r, alpha: LoRALinear(module, r, alpha))

    def inject_lora(model, names, r, alpha):
        found = list(model.named_children() if walk == "children" else model.named_modules())
        chosen = [
            (full, m) for full, m in found
            if (match(full, names) and (isinstance(m, nn.Linear) or not only_linear)) or full in extra
        ]
        for full, module in chosen:
            parent, _, child = full.rpartition(".")
            r_, alpha_ = settings(r, alpha) if settings else (r, alpha)
            layer = wrap(module, r_, alpha_)
            if walk == "dotted":
                setattr(model, full, layer)
            else:
                setattr(model.get_submodule(parent), child, layer)
        replaced = [full for full, _ in chosen]
        if order == "sorted":
            return sorted(replaced)
        if order == "by names":
            return [full for n in names for full in replaced if matches(full, [n])]
        return order(replaced)

    return inject_lora


def nonzero_B(module, r, alpha):
    layer = LoRALinear(module, r, alpha)
    nn.init.normal_(layer.lora_B.weight)
    return layer


WRONG_INJECTS = {
    "top-level children only": (make_inject(walk="children"), "no layer of the model became a LoRALinear"),
    "dotted setattr": (make_inject(walk="dotted"), "set the attribute on the parent"),
    "last part only": (make_inject(lambda full, names: full.split(".")[-1] in names), "do not compare only the last part"),
    "substring": (make_inject(lambda full, names: any(n in full for n in names)),
                  r"names=\['proj'\], you also wrapped transformer.h.0.attn.c_proj.*'proj' does not match 'c_proj'"),
    "endswith without the dot": (make_inject(lambda full, names: any(full.endswith(n) for n in names)),
                                 r"names=\['proj'\].*not substrings"),
    "wraps lm_head": (make_inject(extra=("lm_head",)), "lm_head is not among names"),
    "wraps everything": (make_inject(lambda full, names: True), "also wrapped"),
    "wraps non-linear modules": (make_inject(only_linear=False), r"isinstance\(module, nn.Linear\)"),
    "fresh linear layer": (make_inject(wrap=lambda m, r, a: LoRALinear(nn.Linear(m.in_features, m.out_features), r, a)),
                           "wrap the model's own layer"),
    "non-zero B": (make_inject(wrap=nonzero_B), "outputs changed"),
    "default r and alpha": (make_inject(settings=lambda r, alpha: (8, 16)), "pass them through"),
    "r and alpha swapped": (make_inject(settings=lambda r, alpha: (alpha, r)), "r=8 and alpha=4: pass them through"),
    "unsorted": (make_inject(order="by names"), "return them sorted"),
    "no return": (make_inject(order=lambda replaced: None), r"returned None \(is the return statement missing"),
    "short names": (make_inject(order=lambda replaced: sorted(n.split(".")[-1] for n in replaced)), "full module names"),
    "a tuple": (make_inject(order=lambda replaced: tuple(sorted(replaced))), "should return a list .* returned a tuple"),
    "names missing": (make_inject(order=lambda replaced: sorted(replaced)[:1]), "exactly the layers you replaced"),
    "stub": (stub, "still the stub"),
}


def test_inject_lora_accepts(capsys):
    check_inject_lora(make_inject())
    assert "Correct" in capsys.readouterr().out


@pytest.mark.parametrize("name", WRONG_INJECTS)
def test_inject_lora_rejects(name):
    fn, message = WRONG_INJECTS[name]
    with pytest.raises(CheckFailed, match=message):
        check_inject_lora(fn)


def test_inject_lora_reports_the_missing_nested_layer():
    with pytest.raises(CheckFailed, match=r"transformer\.h\.0\.mlp\.c_proj should have become a LoRALinear"):
        check_inject_lora(WRONG_INJECTS["last part only"][0])


# --- Exercise 2.4: counting LoRA's trainable parameters ---

def lora_count(config, targets, r, *, hidden=4, qkv=3, blocks=None, skip="", per_layer=lambda i, o, r: r * (i + o)):
    d = config.n_embd
    shapes = {"attn.c_attn": (d, qkv * d), "attn.c_proj": (d, d), "mlp.c_fc": (d, hidden * d), "mlp.c_proj": (hidden * d, d)}
    one_block = sum(per_layer(i, o, r) for name, (i, o) in shapes.items() if name != skip and matches(name, targets))
    return (config.n_layer if blocks is None else blocks) * one_block


WRONG_COUNTS = {
    "product": (lambda c, t, r: lora_count(c, t, r, per_layer=lambda i, o, r: r * i * o), r"r \* \(in \+ out\)"),
    "one block": (lambda c, t, r: lora_count(c, t, r, blocks=1), "multiply by n_layer"),
    "c_proj once (attn)": (lambda c, t, r: lora_count(c, t, r, skip="mlp.c_proj"), "'c_proj' matches two layers"),
    "c_proj once (mlp)": (lambda c, t, r: lora_count(c, t, r, skip="attn.c_proj"), "'c_proj' matches two layers"),
    "MLP width n_embd": (lambda c, t, r: lora_count(c, t, r, hidden=1), "4 \\* n_embd"),
    "c_attn width n_embd": (lambda c, t, r: lora_count(c, t, r, qkv=1), "q, k and v at once"),
    "base counted too": (lambda c, t, r: lora_count(c, t, r) + lora_count(c, t, r, per_layer=lambda i, o, r: i * o + o),
                         "frozen base weights"),
    "something else": (lambda c, t, r: lora_count(c, t, r) + 1, r"add r \* \(in \+ out\) for every matching"),
    "a float": (lambda c, t, r: float(lora_count(c, t, r)), "should return an int"),
    "stub": (stub, "still the stub"),
}


def test_count_lora_parameters_accepts(capsys):
    check_count_lora_parameters(lora_count)
    check_count_lora_parameters(lambda c, t, r: torch.tensor(lora_count(c, t, r)))
    out = capsys.readouterr().out
    assert out.count("Correct") == 2 and "294,912" in out  # 12 layers x 8 x (768 + 2304)


@pytest.mark.parametrize("name", WRONG_COUNTS)
def test_count_lora_parameters_rejects(name):
    fn, message = WRONG_COUNTS[name]
    with pytest.raises(CheckFailed, match=message):
        check_count_lora_parameters(fn)


# --- Exercise 2.5 (open): the smallest rank within the margin ---

# Held-out losses of converged adapters on rank_toy: what any rank-r update can reach.
def good_losses(ranks=range(1, 33)):
    return {r: _best_toy_loss(r) * 1.02 for r in ranks}


def smallest(losses):
    return min(r for r in losses if losses[r] <= losses[32] + RANK_MARGIN)


def test_smallest_rank_accepts_the_right_answer(capsys):
    losses = good_losses()
    assert smallest(losses) == 4  # singular values 1, 1/2, 1/4, ...: 4 of them leave < 0.01
    check_smallest_rank(losses, 4)
    check_smallest_rank(good_losses([1, 2, 3, 4, 5, 8, 16, 32]), 4)
    assert capsys.readouterr().out.count("Correct: rank 4") == 2


def test_rank_toy_is_seeded_and_shaped():
    a, b = rank_toy(), rank_toy()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert a["W0"].shape == (32, 32) and a["x_val"].shape == a["y_val"].shape == (1024, 32)


WRONG_RANK_ANSWERS = {
    "too large": (good_losses(), 5, "a smaller rank you tried is already within the margin"),
    "too small": (good_losses(), 3, r"more than 0.01 above the full rank's"),
    "not a dict": ([0.3, 0.1], 4, "should be a dict"),
    "no full rank": (good_losses(range(1, 17)), 4, "no entry for rank 32"),
    "rank 64 of a 32-wide layer": ({**good_losses(), 64: 0.01}, 4, "ints from 1 to 32"),
    "gaps below the answer": (good_losses([1, 4, 8, 32]), 4, "You did not try rank 2"),
    "training loss": ({**good_losses(), 2: 0.01}, 4, "below what any rank-2 update can reach"),
    "not converged": ({**good_losses(), 8: 0.05}, 4, "has not finished learning"),
    "tensor values": ({r: torch.tensor(v) for r, v in good_losses().items()}, 4, r"Python float \(use .item\(\)\)"),
    "rank as a float": (good_losses(), 4.0, "rank should be an int"),
}


@pytest.mark.parametrize("name", WRONG_RANK_ANSWERS)
def test_smallest_rank_rejects(name):
    losses, rank, message = WRONG_RANK_ANSWERS[name]
    with pytest.raises(CheckFailed, match=message):
        check_smallest_rank(losses, rank)


def test_in_jupyter_a_failed_check_shows_its_message_and_none_of_the_checkers_code():
    from IPython.core.interactiveshell import InteractiveShell

    shell = InteractiveShell.instance()
    try:
        shell.run_cell("import lora_edu.checks, importlib; importlib.reload(lora_edu.checks)")
        shown = []
        shell._showtraceback = lambda etype, evalue, stb: shown.append("\n".join(stb))
        result = shell.run_cell(
            "def lora_forward(x, W0, b0, A, B, alpha, r):\n"
            "    return x @ W0.T + b0\n"
            "lora_edu.checks.check_lora_forward(lora_forward)"
        )
    finally:
        InteractiveShell.clear_instance()
    assert type(result.error_in_exec).__name__ == "CheckFailed"
    (text,) = shown
    assert text.startswith("CheckFailed: ") and "LoRA path is missing" in text
    assert "alpha / r\n" not in text and "base, lora, scaling" not in text  # no checker lines
    assert len(text.splitlines()) == 1

