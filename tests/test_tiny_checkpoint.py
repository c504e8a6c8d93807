"""The shipped tiny GPT-2: the file its log describes, and as good as the log says."""

import hashlib
import json

import pytest

from lora_edu.data import CORPORA, DATA_DIR, bigram_loss, load_split
from lora_edu.gpt2 import TINY_CHECKPOINT, load_checkpoint
from lora_edu.train import evaluate

LOG = json.loads(TINY_CHECKPOINT.with_suffix(".log.json").read_text())


def sha256(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_checkpoint_is_small_and_is_the_file_the_log_describes():
    assert TINY_CHECKPOINT.stat().st_size <= 10 * 2**20
    assert TINY_CHECKPOINT.stat().st_size == LOG["checkpoint_bytes"]
    assert sha256(TINY_CHECKPOINT) == LOG["checkpoint_sha256"]


def test_corpora_are_the_ones_it_was_trained_on():
    for name, file in CORPORA.items():
        assert sha256(DATA_DIR / file) == LOG["corpus_sha256"][name], name


def test_parameter_count_matches_the_log(tiny):
    assert sum(p.numel() for p in tiny.parameters()) == LOG["parameters"]


@pytest.mark.parametrize("corpus", sorted(CORPORA))
def test_held_out_loss_is_the_logged_one(tiny, corpus):
    # The whole held-out split, as the log measured it; other CPUs round differently.
    loss = evaluate(tiny, load_split(corpus, "val"), LOG["model_config"]["block_size"])
    assert loss == pytest.approx(LOG["final_val_loss"][corpus], abs=2e-3)


def test_it_beats_a_bigram_model_by_a_clear_margin():
    train_ids = load_split("shakespeare", "train")
    for corpus in CORPORA:
        bigram = bigram_loss(train_ids, load_split(corpus, "val"))
        assert bigram == pytest.approx(LOG["bigram_val_loss"][corpus], abs=1e-9)
        assert LOG["final_val_loss"][corpus] < bigram - 0.5, corpus


def test_milton_is_a_new_domain_for_it():
    # The gap the later chapters close by fine-tuning: Milton is clearly harder.
    assert LOG["final_val_loss"]["milton"] > LOG["final_val_loss"]["shakespeare"] + 0.2


def test_load_checkpoint_names_a_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.safetensors"):
        load_checkpoint(tmp_path / "nowhere.safetensors")
