"""Checkers for chapter 0's exercises: parameter count, cross-entropy, next-token probabilities, temperature."""

from __future__ import annotations

import functools
import math
from typing import Callable

import torch
import torch.nn.functional as F

from lora_edu.checks.core import (CheckFailed, as_number, call_learner, counting_configs, expect_shape, expect_tensor,
                                  is_number, passed)
from lora_edu.gpt2 import GPT2, GPT2Config, next_token_probs
from lora_edu.plumbing import check_int

__all__ = [
    "check_best_temperature",
    "check_cross_entropy",
    "check_next_token_probs",
    "check_parameter_count",
    "held_out_logits",
]


def _true_parameter_count(config: GPT2Config) -> int:
    with torch.device("meta"):  # shapes only: no memory, no time, even for GPT-2 XL
        return sum(p.numel() for p in GPT2(config).parameters())


def check_parameter_count(count_parameters: Callable[[GPT2Config], int]) -> None:
    """Exercise 0.1: ``count_parameters(config)`` must equal the model's parameter count."""
    configs = counting_configs()
    for name, config in configs.items():
        got, want = as_number(call_learner(count_parameters, config)), _true_parameter_count(config)
        if not is_number(got, int):
            raise CheckFailed(f"count_parameters should return an int, got {type(got).__name__}.")
        if got == want:
            continue
        d, L = config.n_embd, config.n_layer
        diagnoses = {
            config.vocab_size * d: "you counted the output head lm_head separately; GPT-2 ties it to the token embedding wte",
            -config.block_size * d: "you left out the position embedding wpe (block_size x n_embd)",
            -L * 4 * d: "you left out the LayerNorms ln_1 and ln_2 in each block (a weight and a bias each)",
            -2 * d: "you left out the final LayerNorm ln_f",
            -L * 9 * d: "you left out the biases of the four linear layers in each block",
        }
        hint = diagnoses.get(got - want, "count each matrix and bias of one block, then the embeddings and ln_f")
        raise CheckFailed(
            f"For the {name} config ({config.n_layer} layers, n_embd={d}) you counted {got:,} "
            f"parameters but the model has {want:,} (off by {got - want:+,}): {hint}."
        )
    passed(f"Correct: GPT-2 124M has {_true_parameter_count(configs['gpt2']):,} parameters.")


def check_cross_entropy(cross_entropy: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> None:
    """Exercise 0.2: ``cross_entropy(logits (N, V), targets (N,))`` is the mean loss in nats."""
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(12, 7, generator=generator) * 3
    targets = torch.randint(0, 7, (12,), generator=generator)
    got = expect_tensor(call_learner(cross_entropy, logits.clone(), targets.clone()), "cross_entropy")
    want = F.cross_entropy(logits, targets)
    if got.numel() != 1:
        raise CheckFailed(f"cross_entropy should return a single number (the mean), got shape {tuple(got.shape)}.")
    got = got.reshape(()).double()
    want = want.double()
    if torch.isclose(got, want, rtol=1e-4, atol=1e-6):
        passed(f"Correct: mean cross-entropy {want.item():.4f} nats per token.")
        return
    if not torch.isfinite(got):
        hint = "take log_softmax (or logsumexp) rather than log(softmax), which underflows"
    elif torch.isclose(got, -want, rtol=1e-4):
        hint = "the loss is the *negative* log-probability of the target; check the sign"
    elif torch.isclose(got, want / math.log(2), rtol=1e-4):
        hint = "that is in bits (log base 2); the book measures nats (natural log)"
    elif torch.isclose(got, want * len(targets), rtol=1e-4):
        hint = "that is the sum over tokens; take the mean"
    elif torch.isclose(got, F.cross_entropy(logits, logits.argmax(-1)).double(), rtol=1e-4):
        hint = "you scored the most likely token, not the target token"
    else:
        hint = "the loss is the average surprise at the right answer: how unlikely the model found each row's target"
    raise CheckFailed(f"Expected {want.item():.4f} nats but got {got.item():.4f}: {hint}.")


def check_next_token_probs(
    probs_fn: Callable[[torch.Tensor, float, int | None], torch.Tensor],
) -> None:
    """Exercise 0.3: ``probs_fn(logits, temperature, top_k)`` is the sampling distribution."""
    logits = torch.tensor([[2.0, 1.0, 0.5, -1.0, 3.0, 0.0], [0.1, 0.2, 0.3, 0.4, 0.5, 0.6]])
    for temperature, top_k in [(1.0, None), (0.5, None), (2.0, None), (1.0, 2), (0.7, 3)]:
        got = expect_tensor(call_learner(probs_fn, logits.clone(), temperature, top_k), "next_token_probs")
        want = next_token_probs(logits, temperature, top_k)
        expect_shape(got, want.shape, "The probabilities", otherwise="one distribution per row")
        if torch.allclose(got, want, atol=1e-5):
            continue
        setting = f"temperature={temperature}, top_k={top_k}"
        if not torch.allclose(got.sum(-1), torch.ones(2), atol=1e-4):
            hint = "each row must sum to 1: renormalise after dropping tokens (softmax over the kept logits)"
        elif temperature != 1.0 and torch.allclose(got, next_token_probs(logits * temperature ** 2, temperature, top_k), atol=1e-5):
            hint = "divide the logits by the temperature; you multiplied"
        elif top_k is not None and torch.allclose(got, next_token_probs(logits, temperature, None), atol=1e-5):
            hint = "keep only the top_k likeliest tokens: every other token must get probability 0"
        elif top_k is not None and (got > 0).sum(-1).tolist() != [top_k, top_k]:
            hint = f"exactly top_k={top_k} tokens per row should keep a non-zero probability"
        else:
            hint = "check the order: the temperature reshapes the logits, top-k removes tokens, and only then come probabilities"
        raise CheckFailed(f"With {setting}: expected {want[0].tolist()} for the first row, got {got[0].tolist()}: {hint}.")
    passed("Correct: temperature and top-k behave as in lora_edu.gpt2.next_token_probs.")


# ---------------------------------------------------------------------------
# Exercise 0.4 (open): the temperature that fits held-out text best.

_CORPORA = ("shakespeare", "milton")


def held_out_logits(corpus: str, windows: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """The tiny GPT-2's logits (N, 256) and the targets (N,) on the first ``windows`` held-out windows of 128 bytes.

    Exercise 0.4 and its checker score the same bytes, so that they agree on which temperature is best.
    """
    if corpus not in _CORPORA:
        raise ValueError(f"corpus must be one of {_CORPORA}, got {corpus!r}")
    logits, targets = _held_out_logits(corpus, check_int(windows, "windows"))
    return logits.clone(), targets.clone()  # the cached copy stays the checker's


@functools.lru_cache(maxsize=4)
def _held_out_logits(corpus: str, windows: int) -> tuple[torch.Tensor, torch.Tensor]:
    from lora_edu.data import load_split
    from lora_edu.gpt2 import load_tiny

    model = load_tiny("cpu").eval()
    val = load_split(corpus, "val")
    block = model.config.block_size
    n = min(windows, (len(val) - 1) // block)
    x, y = val[: n * block].view(n, block), val[1 : n * block + 1].view(n, block)
    with torch.no_grad():
        logits = torch.cat([model(x[i : i + 64]) for i in range(0, n, 64)])
    return logits.reshape(-1, logits.shape[-1]), y.reshape(-1)


def _loss_at(logits: torch.Tensor, targets: torch.Tensor, temperature: float) -> float:
    return F.cross_entropy(logits / temperature, targets).item()


def _lowest_loss(logits: torch.Tensor, targets: torch.Tensor) -> tuple[float, float]:
    """(temperature, loss) at the bottom of the loss curve: a grid of step 0.05 over [0.5, 2], then 0.005 around."""
    coarse = min((0.5 + 0.05 * i for i in range(31)), key=lambda t: _loss_at(logits, targets, t))
    fine = [coarse - 0.05 + 0.005 * i for i in range(21)]
    return min(((t, _loss_at(logits, targets, t)) for t in fine), key=lambda pair: pair[1])


@functools.lru_cache(maxsize=None)
def _best_temperature(corpus: str) -> tuple[float, float]:
    return _lowest_loss(*_held_out_logits(corpus, 256))


def check_best_temperature(best: dict) -> None:
    """Exercise 0.4: ``best[corpus]`` is a temperature whose held-out loss is within 0.002 nats of the lowest."""
    if not isinstance(best, dict) or set(best) != set(_CORPORA):
        got = sorted(best) if isinstance(best, dict) else type(best).__name__
        raise CheckFailed(f"Give a dict with one temperature per corpus, keys {list(_CORPORA)}; got {got}.")
    for corpus in _CORPORA:
        t = as_number(best[corpus])
        if not is_number(t) or not math.isfinite(t) or t <= 0:
            raise CheckFailed(f"The temperature for {corpus} should be a positive number, got {t!r}.")
        logits, targets = held_out_logits(corpus)
        t_best, lowest = _best_temperature(corpus)
        yours = _loss_at(logits, targets, t)
        if yours - lowest <= 2e-3:
            continue
        side = "higher" if t < t_best else "lower"
        if t == 1.0:
            hint = "1 is where the model was trained, but it need not be best on this text: look on both sides of it"
        else:
            hint = f"some {side} temperature fits better: scan a wider range, then a finer grid around the best"
        raise CheckFailed(
            f"For {corpus}, T={t:g} gives a held-out loss of {yours:.4f} nats per byte, {yours - lowest:.4f} above "
            f"the best the checker finds: {hint}."
        )
    passed("Correct: your temperatures fit the held-out text as well as the best ones (within 0.002 nats).")
