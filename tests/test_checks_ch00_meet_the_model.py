"""Chapter 0's checkers accept the right answer and reject wrong ones with a useful sentence."""

import math

import pytest
import torch
import torch.nn.functional as F

from lora_edu.checks import (
    CheckFailed,
    check_best_temperature,
    check_cross_entropy,
    check_next_token_probs,
    check_parameter_count,
)


def stub(*args):
    raise NotImplementedError("Exercise hint")


# --- Exercise 0.1: parameter count ---

def right_count(c):
    d = c.n_embd
    return c.vocab_size * d + c.block_size * d + c.n_layer * (12 * d * d + 13 * d) + 2 * d


WRONG_COUNTS = {
    "lm_head separately": (lambda c: right_count(c) + c.vocab_size * c.n_embd, "ties it to the token embedding"),
    "no wpe": (lambda c: right_count(c) - c.block_size * c.n_embd, "position embedding wpe"),
    "no biases": (lambda c: right_count(c) - c.n_layer * 9 * c.n_embd, "biases"),
    "no block LayerNorms": (lambda c: right_count(c) - c.n_layer * 4 * c.n_embd, "ln_1 and ln_2"),
    "no ln_f": (lambda c: right_count(c) - 2 * c.n_embd, "ln_f"),
    "something else": (lambda c: 12 * c.n_layer * c.n_embd**2, "off by"),
    "a float": (lambda c: float(right_count(c)), "should return an int"),
}


def test_parameter_count_accepts_the_right_formula(capsys):
    check_parameter_count(right_count)
    assert "124,439,808" in capsys.readouterr().out


@pytest.mark.parametrize("name", WRONG_COUNTS)
def test_parameter_count_rejects(name):
    fn, message = WRONG_COUNTS[name]
    with pytest.raises(CheckFailed, match=message):
        check_parameter_count(fn)


# --- Exercise 0.2: cross-entropy ---

def right_ce(logits, targets):
    return -F.log_softmax(logits, -1)[torch.arange(len(targets)), targets].mean()


WRONG_CE = {
    "sign": (lambda l, t: -right_ce(l, t), "negative"),
    "bits": (lambda l, t: right_ce(l, t) / math.log(2), "bits"),
    "sum": (lambda l, t: right_ce(l, t) * len(t), "sum over tokens"),
    "argmax": (lambda l, t: right_ce(l, l.argmax(-1)), "most likely token"),
    "per token": (lambda l, t: -F.log_softmax(l, -1)[torch.arange(len(t)), t], "single number"),
    "log of softmax": (lambda l, t: -torch.log(torch.softmax(l * 1e4, -1))[torch.arange(len(t)), t].mean(), "log_softmax"),
    "not a tensor": (lambda l, t: 1.5, "torch.Tensor"),
    "other": (lambda l, t: right_ce(l, t) + 0.1, "average surprise"),
}


def test_cross_entropy_accepts_the_right_answer(capsys):
    check_cross_entropy(right_ce)
    assert "Correct" in capsys.readouterr().out


@pytest.mark.parametrize("name", WRONG_CE)
def test_cross_entropy_rejects(name):
    fn, message = WRONG_CE[name]
    with pytest.raises(CheckFailed, match=message):
        check_cross_entropy(fn)


# --- Exercise 0.3: temperature and top-k ---

def right_probs(logits, temperature, top_k):
    logits = logits / temperature
    if top_k is not None:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.softmax(logits, -1)


def no_renormalise(logits, temperature, top_k):
    probs = torch.softmax(logits / temperature, -1)
    if top_k is not None:
        kth = probs.topk(top_k, dim=-1).values[..., -1:]
        probs = probs.masked_fill(probs < kth, 0.0)
    return probs


WRONG_PROBS = {
    "multiplies": (lambda l, t, k: right_probs(l * t * t, t, k), "you multiplied"),
    "ignores top_k": (lambda l, t, k: right_probs(l, t, None), "keep only the top_k"),
    "no renormalise": (no_renormalise, "sum to 1"),
    "keeps k+1": (lambda l, t, k: right_probs(l, t, None if k is None else k + 1), "exactly top_k"),
    "flattens": (lambda l, t, k: right_probs(l, t, k).flatten(), "one distribution per row"),
}


def test_next_token_probs_accepts_the_right_answer(capsys):
    check_next_token_probs(right_probs)
    assert "Correct" in capsys.readouterr().out


@pytest.mark.parametrize("name", WRONG_PROBS)
def test_next_token_probs_rejects(name):
    fn, message = WRONG_PROBS[name]
    with pytest.raises(CheckFailed, match=message):
        check_next_token_probs(fn)


@pytest.mark.parametrize("checker", [check_parameter_count, check_cross_entropy, check_next_token_probs])
def test_an_unanswered_exercise_gets_told_to_replace_the_stub(checker):
    with pytest.raises(CheckFailed, match="still the stub"):
        checker(stub)


# --- Exercise 0.4 (open): the best temperature ---

def test_best_temperature_accepts_the_optimum_and_its_flat_neighbourhood(capsys):
    from lora_edu.checks.ch00_meet_the_model import _loss_at, held_out_logits

    best = {}
    for corpus in ("shakespeare", "milton"):
        logits, targets = held_out_logits(corpus)
        grid = [0.8 + 0.05 * i for i in range(13)]
        best[corpus] = min(grid, key=lambda t: _loss_at(logits, targets, t))
    check_best_temperature(best)
    check_best_temperature({k: torch.tensor(v) for k, v in best.items()})
    assert capsys.readouterr().out.count("Correct") == 2
    # The model is overconfident on the new domain: its best temperature there is above 1, and above Shakespeare's.
    assert best["milton"] > 1.1 and best["milton"] > best["shakespeare"]


@pytest.mark.parametrize("answer, message", [
    ({"shakespeare": 1.05, "milton": 1.0}, "For milton, T=1 .*look on both sides"),
    ({"shakespeare": 1.05, "milton": 0.8}, "some higher temperature fits better"),
    ({"shakespeare": 1.05, "milton": 3.0}, "some lower temperature fits better"),
    ({"shakespeare": 0.5, "milton": 1.25}, "For shakespeare, T=0.5 .*higher"),
    ({"milton": 1.25}, "one temperature per corpus"),
    ([1.0, 1.2], "one temperature per corpus"),
    ({"shakespeare": -1.0, "milton": 1.25}, "positive number"),
    ({"shakespeare": "1.0", "milton": 1.25}, "positive number"),
])
def test_best_temperature_rejects(answer, message):
    with pytest.raises(CheckFailed, match=message):
        check_best_temperature(answer)


def test_held_out_logits_hands_out_copies_and_names_bad_arguments():
    from lora_edu.checks.ch00_meet_the_model import held_out_logits

    logits, targets = held_out_logits("milton", windows=2)
    assert logits.shape == (256, 256) and targets.shape == (256,)
    logits.zero_()
    assert held_out_logits("milton", windows=2)[0].abs().sum() > 0
    with pytest.raises(ValueError, match="corpus must be one of"):
        held_out_logits("wikipedia")
    with pytest.raises(ValueError, match="windows must be a positive int"):
        held_out_logits("milton", windows=0)
