"""What every checker shares: the failure, a friendly call of the learner's function, and the
small steps each check repeats (what was returned, a number, a shape, the first hint that fits).

A checker module opens on its exercises; the scaffolding lives here, so that each check reads
as the questions it asks. The names are public because every checker module imports them;
learners import the checkers from :mod:`lora_edu.checks`, not from here.
"""

from __future__ import annotations

import textwrap
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager

import torch
from torch import nn

from lora_edu.gpt2 import GPT2Config

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
            f"{name_of(fn)} is still the stub: replace the `raise NotImplementedError(...)` line with your code."
        ) from None


def name_of(fn: Callable) -> str:
    """The learner's function's name, for a message."""
    return getattr(fn, "__name__", "your function")


def learner_raised(what: str, err: Exception, hint: str) -> CheckFailed:
    """The failure for an error the learner's code raised: ``what`` raised it (its type and first line): ``hint``.

    ``what`` opens the sentence (``"For an odd count, pack"``); raise the result ``from err``.
    """
    return CheckFailed(f"{what} raised {type(err).__name__} ({first_line(err)}): {hint}.")


def first_line(err: Exception) -> str:
    """The first line of an error's message, or its type's name when it has none."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def returned(value) -> str:
    """What the learner's function gave, for a message: ``a list``, or a question when it gave None."""
    return "None (is the return statement missing?)" if value is None else f"a {type(value).__name__}"


def expect_tensor(value, what: str) -> torch.Tensor:
    """``value``, if it is a tensor; a failure saying what ``what`` should return otherwise."""
    if not isinstance(value, torch.Tensor):
        raise CheckFailed(f"{what} should return a torch.Tensor, got {type(value).__name__}.")
    return value


def as_number(value):
    """A one-element tensor as its Python number, anything else as it is: either is a fair answer."""
    return value.item() if isinstance(value, torch.Tensor) and value.numel() == 1 else value


def is_number(value, kind: type | tuple[type, ...] = (int, float)) -> bool:
    """Whether ``value`` is a number of ``kind`` (``int`` for a count, ``numbers.Real`` for numpy's too).

    A bool is never one: Python counts True as 1, but no exercise's answer is True.
    """
    return isinstance(value, kind) and not isinstance(value, bool)


def expect_shape(got: torch.Tensor, shape: Iterable[int], what: str, hints: Mapping[tuple, str] | None = None,
                 otherwise: str | None = None) -> None:
    """Refuse ``got`` unless it has ``shape``, saying what ``what`` should have been.

    ``hints`` maps a wrong shape to what it means (the transpose, one value per input, ...);
    ``otherwise`` is said for any other wrong shape.
    """
    shape, have = tuple(shape), tuple(got.shape)
    if have == shape:
        return
    hint = (hints or {}).get(have, otherwise)
    raise CheckFailed(f"{what} should have shape {shape}, but yours has {have}" + (f": {hint}." if hint else "."))


def first_hint(wrong: Iterable[tuple[object, str]], matches: Callable[[object], bool],
               otherwise: str | None = None) -> str | None:
    """The hint of the first wrong answer that ``matches`` the learner's, or ``otherwise``.

    ``wrong`` is a catalogue of (variant, hint) pairs, most telling first; a variant of None
    stands for a slip that this case cannot show, and is skipped.
    """
    return next((hint for variant, hint in wrong if variant is not None and matches(variant)), otherwise)


def first_changed(given: Mapping[str, torch.Tensor], originals: Mapping[str, torch.Tensor]) -> str | None:
    """The name of the first argument the learner changed in place, if any.

    ``given`` are the tensors the learner was passed, ``originals`` copies of them kept aside.
    """
    return next((name for name, t in given.items() if not torch.equal(t, originals[name])), None)


def refuse_dotted_attributes(model: nn.Module) -> None:
    """Fail if the learner swapped a layer with ``setattr(model, "a.b", ...)``, which adds a new attribute instead."""
    dotted = next((k for m in model.modules() for k in m._modules if "." in k), None)
    if dotted is not None:
        raise CheckFailed(
            f"You gave a module an attribute named {dotted!r}, which does not reach the nested layer: set the "
            "attribute on the parent instead, setattr(model.get_submodule(parent_name), child_name, ...)."
        )


def counting_configs() -> dict[str, GPT2Config]:
    """GPT-2 shapes to count parameters on: the tiny model, GPT-2 124M, and an odd one no guess was tuned to."""
    return {
        "tiny": GPT2Config.from_preset("tiny"),
        "gpt2": GPT2Config.from_preset("gpt2"),
        "an odd one": GPT2Config(vocab_size=100, block_size=32, n_layer=3, n_head=3, n_embd=48),
    }


@contextmanager
def seeded(seed: int = 0) -> Iterator[None]:
    """Run the block from ``torch.manual_seed(seed)``, leaving the learner's random state as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield
