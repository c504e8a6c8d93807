import math

import pytest
import torch

from lora_edu.data import CORPORA, ByteTokenizer, bigram_loss, get_batch, load_split, load_text, split_text, uniform_loss


def test_byte_tokenizer_round_trips_any_text():
    tok = ByteTokenizer()
    for text in ["To be, or not to be", "naïve café ☕", "\n\t"]:
        ids = tok.encode(text)
        assert all(0 <= i < 256 for i in ids)
        assert tok.decode(ids) == text
    assert tok.decode([0xE2, 0x98]) == "\ufffd"  # a cut multi-byte character decodes, visibly
    with pytest.raises(TypeError, match="text must be a str"):
        tok.encode(b"bytes")


def test_unknown_or_missing_corpus(tmp_path):
    with pytest.raises(ValueError, match=r"unknown corpus 'bible'.*'milton', 'shakespeare'"):
        load_text("bible")
    with pytest.raises(FileNotFoundError, match="shakespeare.txt is missing"):
        load_text("shakespeare", data_dir=tmp_path)
    with pytest.raises(ValueError, match="split must be one of"):
        load_split("milton", "test")


@pytest.mark.parametrize("name", sorted(CORPORA))
def test_splits_are_contiguous_and_cover_the_text(name):
    text = load_text(name)
    train, val = split_text(text)
    assert train + val == text
    assert train.endswith("\n")
    assert 0.89 < len(train) / len(text) < 0.91
    assert len(load_split(name, "val")) == len(val.encode())


def test_split_text_errors():
    with pytest.raises(ValueError, match=r"train_fraction must be in \(0, 1\)"):
        split_text("a\nb\n", 1.0)
    with pytest.raises(ValueError, match="too short"):
        split_text("no line break at all")


def test_the_two_domains_differ():
    # Milton has no speaker headings; Shakespeare's plays are full of them.
    assert load_text("shakespeare").count("\nHAMLET.\n") + load_text("shakespeare").count("\nHam.\n") > 100
    assert "\nHam.\n" not in load_text("milton")


def test_get_batch_targets_are_inputs_shifted_by_one():
    ids = torch.arange(100)
    x, y = get_batch(ids, 4, 8, torch.Generator().manual_seed(0))
    assert x.shape == y.shape == (4, 8)
    assert torch.equal(y, x + 1)
    x2, _ = get_batch(ids, 4, 8, torch.Generator().manual_seed(0))
    assert torch.equal(x, x2)
    with pytest.raises(ValueError, match="needs more than block_size=100"):
        get_batch(ids, 1, 100, torch.Generator())


def test_bigram_loss_by_hand():
    # Train "abab": counts a->b twice, b->a once. With smoothing 1 over 256 symbols,
    # P(b|a) = (2+1)/(2+256) and P(a|b) = (1+1)/(1+256).
    a, b = ord("a"), ord("b")
    train = torch.tensor([a, b, a, b])
    val = torch.tensor([a, b, a])
    want = -(math.log(3 / 258) + math.log(2 / 257)) / 2
    assert bigram_loss(train, val) == pytest.approx(want)


def test_bigram_loss_tends_to_uniform_with_heavy_smoothing():
    train = torch.randint(0, 256, (1000,))
    assert bigram_loss(train, train, smoothing=1e9) == pytest.approx(uniform_loss(), abs=1e-4)
    with pytest.raises(ValueError, match="smoothing must be > 0"):
        bigram_loss(train, train, smoothing=0)
