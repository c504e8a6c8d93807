"""The checkers' scaffolding: each step says what the learner gave and leaves their state alone."""

import numbers

import pytest
import torch
from torch import nn

from lora_edu.checks.core import (CheckFailed, as_number, call_learner, counting_configs, expect_shape, expect_tensor,
                                  first_changed, first_hint, first_line, is_number, learner_raised, name_of, passed,
                                  refuse_dotted_attributes, returned, seeded)


def test_passed_prints_within_the_books_column(capsys):
    passed("Correct: " + "word " * 40)
    assert all(len(line) <= 79 for line in capsys.readouterr().out.splitlines())


def test_call_learner_names_the_stub():
    def lora_forward(x):
        raise NotImplementedError("Exercise 2.1")

    assert call_learner(lambda x: x + 1, 1) == 2
    with pytest.raises(CheckFailed, match=r"lora_forward is still the stub: replace the `raise NotImplementedError"):
        call_learner(lora_forward, 1)
    assert name_of(lora_forward) == "lora_forward" and name_of(object()) == "your function"


def test_learner_raised_quotes_the_first_line_of_the_error():
    failure = learner_raised("For an odd count, pack", RuntimeError("shape mismatch\nmore detail"), "pad first")
    assert isinstance(failure, CheckFailed)
    assert str(failure) == "For an odd count, pack raised RuntimeError (shape mismatch): pad first."
    assert first_line(KeyError()) == "KeyError" and first_line(ValueError("  one\ntwo")) == "one"


def test_returned_asks_about_a_missing_return():
    assert returned(None) == "None (is the return statement missing?)"
    assert returned([1]) == "a list"
    assert expect_tensor(torch.ones(1), "f").shape == (1,)
    with pytest.raises(CheckFailed, match="f should return a torch.Tensor, got list"):
        expect_tensor([1.0], "f")


def test_a_number_may_come_as_a_one_element_tensor_but_never_as_a_bool():
    assert as_number(torch.tensor(3)) == 3 and isinstance(as_number(torch.tensor(2.5)), float)
    many = torch.ones(2)
    assert as_number(many) is many and as_number("3") == "3"
    assert is_number(3) and is_number(2.5) and not is_number(True) and not is_number("3")
    assert is_number(3, int) and not is_number(3.0, int)
    assert is_number(3, numbers.Integral) and not is_number(False, numbers.Integral)


def test_expect_shape_says_what_the_wrong_shape_means():
    expect_shape(torch.zeros(2, 3), (2, 3), "The output")  # the right shape passes silently
    transposed = r"^The output should have shape \(2, 3\), but yours has \(3, 2\): the transpose\.$"
    with pytest.raises(CheckFailed, match=transposed):
        expect_shape(torch.zeros(3, 2), torch.Size([2, 3]), "The output", {(3, 2): "the transpose"}, otherwise="no")
    with pytest.raises(CheckFailed, match=r"but yours has \(6,\): one row per token\.$"):
        expect_shape(torch.zeros(6), (2, 3), "The output", {(3, 2): "the transpose"}, otherwise="one row per token")
    with pytest.raises(CheckFailed, match=r"but yours has \(6,\)\.$"):
        expect_shape(torch.zeros(6), (2, 3), "The output")


def test_first_hint_takes_the_first_match_and_skips_slips_the_case_cannot_show():
    wrong = [(None, "impossible here"), (2, "doubled"), (2, "also doubled"), (3, "tripled")]
    assert first_hint(wrong, lambda v: v == 2) == "doubled"
    assert first_hint(wrong, lambda v: v == 5) is None
    assert first_hint(wrong, lambda v: v == 5, "look again") == "look again"
    assert first_hint(iter(wrong), lambda v: v == 3) == "tripled"  # any iterable of pairs


def test_first_changed_names_the_argument_changed_in_place():
    originals = {"a": torch.zeros(2), "b": torch.ones(2)}
    given = {k: v.clone() for k, v in originals.items()}
    assert first_changed(given, originals) is None
    given["b"].mul_(2)
    assert first_changed(given, originals) == "b"


def test_refuse_dotted_attributes_points_to_the_parent():
    model = nn.Sequential(nn.Sequential(nn.Linear(2, 2)))
    refuse_dotted_attributes(model)
    setattr(model, "0.0", nn.Linear(2, 2))  # the slip: a new attribute, not the nested layer
    with pytest.raises(CheckFailed, match=r"attribute named '0\.0'.*setattr\(model\.get_submodule\(parent_name\)"):
        refuse_dotted_attributes(model)


def test_seeded_repeats_its_draws_and_leaves_the_learners_random_state_alone():
    torch.manual_seed(123)
    state = torch.random.get_rng_state()
    with seeded(5):
        first = torch.randn(3)
    assert torch.equal(torch.random.get_rng_state(), state)
    with seeded(5):
        assert torch.equal(torch.randn(3), first)


def test_counting_configs_hold_the_tiny_model_gpt2_and_an_odd_one():
    configs = counting_configs()
    assert list(configs) == ["tiny", "gpt2", "an odd one"]
    assert configs["gpt2"].n_embd == 768 and configs["an odd one"].n_head == 3
