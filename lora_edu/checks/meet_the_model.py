"""Checkers for chapter 0's exercises: parameter count, cross-entropy, next-token probabilities."""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F

from lora_edu.checks._core import CheckFailed, expect_tensor, call_learner
from lora_edu.gpt2 import GPT2, GPT2Config, next_token_probs

__all__ = ["check_cross_entropy", "check_next_token_probs", "check_parameter_count"]


def _true_parameter_count(config: GPT2Config) -> int:
    with torch.device("meta"):  # shapes only: no memory, no time, even for GPT-2 XL
        return sum(p.numel() for p in GPT2(config).parameters())


def check_parameter_count(count_parameters: Callable[[GPT2Config], int]) -> None:
    """Exercise 0.1: ``count_parameters(config)`` must equal the model's parameter count."""
    configs = {
        "tiny": GPT2Config.from_preset("tiny"),
        "gpt2": GPT2Config.from_preset("gpt2"),
        "an odd one": GPT2Config(vocab_size=100, block_size=32, n_layer=3, n_head=3, n_embd=48),
    }
    for name, config in configs.items():
        got, want = call_learner(count_parameters, config), _true_parameter_count(config)
        if isinstance(got, torch.Tensor):
            got = got.item()
        if not isinstance(got, int) or isinstance(got, bool):
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
    print(f"Correct: GPT-2 124M has {_true_parameter_count(configs['gpt2']):,} parameters.")


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
        print(f"Correct: mean cross-entropy {want.item():.4f} nats per token.")
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
        hint = "for each row take log_softmax, pick the target's entry, negate, and average"
    raise CheckFailed(f"Expected {want.item():.4f} nats but got {got.item():.4f}: {hint}.")


def check_next_token_probs(
    probs_fn: Callable[[torch.Tensor, float, int | None], torch.Tensor],
) -> None:
    """Exercise 0.3: ``probs_fn(logits, temperature, top_k)`` is the sampling distribution."""
    logits = torch.tensor([[2.0, 1.0, 0.5, -1.0, 3.0, 0.0], [0.1, 0.2, 0.3, 0.4, 0.5, 0.6]])
    for temperature, top_k in [(1.0, None), (0.5, None), (2.0, None), (1.0, 2), (0.7, 3)]:
        got = expect_tensor(call_learner(probs_fn, logits.clone(), temperature, top_k), "next_token_probs")
        want = next_token_probs(logits, temperature, top_k)
        if got.shape != want.shape:
            raise CheckFailed(f"Expected shape {tuple(want.shape)} (one distribution per row), got {tuple(got.shape)}.")
        if torch.allclose(got, want, atol=1e-5):
            continue
        setting = f"temperature={temperature}, top_k={top_k}"
        if not torch.allclose(got.sum(-1), torch.ones(2), atol=1e-4):
            hint = "each row must sum to 1: renormalise after dropping tokens (softmax over the kept logits)"
        elif temperature != 1.0 and torch.allclose(got, next_token_probs(logits * temperature ** 2, temperature, top_k), atol=1e-5):
            hint = "divide the logits by the temperature; you multiplied"
        elif top_k is not None and torch.allclose(got, next_token_probs(logits, temperature, None), atol=1e-5):
            hint = "keep only the top_k largest logits (set the others to -inf before the softmax)"
        elif top_k is not None and (got > 0).sum(-1).tolist() != [top_k, top_k]:
            hint = f"exactly top_k={top_k} tokens per row should keep a non-zero probability"
        else:
            hint = "compute softmax(logits / temperature) over the top_k largest logits"
        raise CheckFailed(f"With {setting}: expected {want[0].tolist()} for the first row, got {got[0].tolist()}: {hint}.")
    print("Correct: temperature and top-k behave as in lora_edu.gpt2.next_token_probs.")
