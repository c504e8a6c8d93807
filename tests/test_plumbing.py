"""The shared checks name the argument and what was expected; replace_module swaps one module."""

import pytest
import torch
from torch import nn

from lora_edu.plumbing import check_int, check_seed, check_tensors_fit, replace_module


@pytest.mark.parametrize("value, kwargs, message", [
    (0, {}, "r must be a positive int, got 0"),
    (True, {}, "r must be a positive int, got True"),
    (2.0, {}, "r must be a positive int, got 2.0"),
    (-1, {"minimum": 0}, "r must be a non-negative int, got -1"),
    (8, {"below": 8, "below_name": "block_size"}, r"r must be a positive int below block_size \(8\), got 8"),
    ("4", {"optional": True}, "r must be None or a positive int, got '4'"),
])
def test_check_int_names_the_argument_and_the_expectation(value, kwargs, message):
    with pytest.raises(ValueError, match=message):
        check_int(value, "r", **kwargs)


def test_check_int_returns_what_passes():
    assert check_int(3, "r") == 3 and check_int(0, "r", minimum=0) == 0
    assert check_int(None, "r", optional=True) is None and check_int(7, "r", below=8) == 7


def test_check_seed():
    assert check_seed(0) == 0
    for bad in (1.5, "0", False):
        with pytest.raises(TypeError, match="seed must be an int"):
            check_seed(bad)


def test_check_tensors_fit_names_every_problem():
    expected = {"a": (2, 3), "b": (4,), "c": (1,)}
    state = {"a": torch.zeros(3, 2), "b": torch.zeros(4), "d": torch.zeros(1)}
    check_tensors_fit({"a": torch.zeros(2, 3), "b": torch.zeros(4), "c": torch.zeros(1)}, expected,
                      holder="file", failure="x")
    with pytest.raises(ValueError) as error:
        check_tensors_fit(state, expected, holder="file", failure="the file does not fit")
    assert str(error.value) == ("the file does not fit: missing c; unexpected d; "
                                "a: file has shape (3, 2), model expects (2, 3)")
    with pytest.raises(ValueError, match=r"missing c; \.\.\.$"):
        check_tensors_fit(state, expected, holder="file", failure="f", shown=1)


def test_replace_module_swaps_one_child_and_returns_the_old():
    model = nn.Sequential(nn.Linear(2, 2), nn.Sequential(nn.ReLU(), nn.Tanh()))
    relu = model[1][0]
    assert replace_module(model, "1.0", nn.GELU()) is relu
    assert isinstance(model[1][0], nn.GELU) and isinstance(model[1][1], nn.Tanh)
    top = model[0]
    assert replace_module(model, "0", nn.Identity()) is top and isinstance(model[0], nn.Identity)
    with pytest.raises(ValueError, match="name must be the dotted name of a submodule"):
        replace_module(model, "", nn.Identity())
