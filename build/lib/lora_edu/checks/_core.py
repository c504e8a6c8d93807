"""What every checker shares: the failure type and a friendly call of the learner's function."""

from __future__ import annotations

import textwrap
from typing import Callable

import torch

WIDTH = 79  # the book's text column shows about 77 characters of code and output


class CheckFailed(AssertionError):
    """Your answer is not right yet; the message says why."""


def passed(message: str) -> None:
    """Tell the learner their answer is right, in lines that fit the book's column."""
    print(textwrap.fill(message, WIDTH))


def call_learner(fn: Callable, *args):
    """Call the learner's function, turning the exercise stub into a friendly message."""
    try:
        return fn(*args)
    except NotImplementedError:
        raise CheckFailed(
            f"{getattr(fn, '__name__', 'your function')} is still the stub: replace the "
            "`raise NotImplementedError(...)` line with your code."
        ) from None


def expect_tensor(value, what: str) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise CheckFailed(f"{what} should return a torch.Tensor, got {type(value).__name__}.")
    return value
