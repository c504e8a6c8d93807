"""The two text domains of the book, a byte-level tokenizer, batches, and a bigram baseline.

``shakespeare`` (plays) is what the tiny GPT-2 is pretrained on; ``milton``
(*Paradise Lost*) is the new domain the later chapters adapt it to. Where the
texts come from and how they were cleaned is in ``README.md`` beside this file.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

__all__ = [
    "CORPORA",
    "ByteTokenizer",
    "bigram_loss",
    "get_batch",
    "load_split",
    "load_text",
    "split_text",
    "uniform_loss",
]

DATA_DIR = Path(__file__).resolve().parent
CORPORA = {"shakespeare": "shakespeare.txt", "milton": "milton.txt"}
SPLITS = ("train", "val")
TRAIN_FRACTION = 0.9


class ByteTokenizer:
    """Text <-> UTF-8 bytes. Every string encodes; the vocabulary is the 256 byte values."""

    vocab_size = 256

    def encode(self, text: str) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        return list(text.encode("utf-8"))

    def decode(self, ids) -> str:
        # A sampled byte sequence need not be valid UTF-8; show the gaps rather than fail.
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")


def load_text(name: str, data_dir: str | Path = DATA_DIR) -> str:
    """The whole cleaned text of corpus ``name``."""
    if name not in CORPORA:
        raise ValueError(f"unknown corpus {name!r}; expected one of {sorted(CORPORA)}")
    path = Path(data_dir) / CORPORA[name]
    if not path.is_file():
        raise FileNotFoundError(
            f"corpus file {path} is missing; it ships with lora_edu "
            "(re-create it with scripts/prepare_data.py)"
        )
    return path.read_text(encoding="utf-8")


def split_text(text: str, train_fraction: float = TRAIN_FRACTION) -> tuple[str, str]:
    """Cut ``text`` at the first line break after ``train_fraction`` of it: (train, val).

    A contiguous cut keeps the held-out part unseen: no sentence straddles the two.
    """
    if not 0.0 < train_fraction < 1.0:
        raise ValueError(f"train_fraction must be in (0, 1), got {train_fraction!r}")
    cut = text.find("\n", int(len(text) * train_fraction))
    if cut <= 0 or cut == len(text) - 1:
        raise ValueError("text is too short to split into train and val")
    return text[: cut + 1], text[cut + 1 :]


def load_split(name: str, split: str, data_dir: str | Path = DATA_DIR) -> torch.Tensor:
    """Token ids (1-D ``torch.long``) of the ``"train"`` or ``"val"`` part of a corpus."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    train, val = split_text(load_text(name, data_dir))
    text = train if split == "train" else val
    return torch.tensor(ByteTokenizer().encode(text), dtype=torch.long)


def get_batch(
    ids: torch.Tensor, batch_size: int, block_size: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random windows of ``ids``: inputs x (B, T) and targets y (B, T), y shifted by one."""
    if ids.dim() != 1:
        raise ValueError(f"ids must be 1-D, got shape {tuple(ids.shape)}")
    if len(ids) <= block_size:
        raise ValueError(f"ids has {len(ids)} tokens, needs more than block_size={block_size}")
    starts = torch.randint(len(ids) - block_size, (batch_size,), generator=generator)
    x = torch.stack([ids[s : s + block_size] for s in starts.tolist()])
    y = torch.stack([ids[s + 1 : s + 1 + block_size] for s in starts.tolist()])
    return x, y


def bigram_loss(train_ids: torch.Tensor, val_ids: torch.Tensor, smoothing: float = 1.0) -> float:
    """Held-out cross-entropy (nats per token) of a bigram model counted on ``train_ids``.

    P(b | a) = (count(a, b) + smoothing) / (count(a) + 256 * smoothing): add-k smoothing,
    so byte pairs never seen in training still get a probability.
    """
    if smoothing <= 0:
        raise ValueError(f"smoothing must be > 0, got {smoothing!r}")
    V = ByteTokenizer.vocab_size
    counts = torch.zeros(V, V, dtype=torch.float64)
    counts.index_put_((train_ids[:-1], train_ids[1:]), torch.ones(len(train_ids) - 1, dtype=torch.float64), accumulate=True)
    log_probs = (counts + smoothing).log() - (counts.sum(1, keepdim=True) + V * smoothing).log()
    return float(-log_probs[val_ids[:-1], val_ids[1:]].mean())


def uniform_loss(vocab_size: int = ByteTokenizer.vocab_size) -> float:
    """Cross-entropy of guessing uniformly: ln(vocab_size) nats per token."""
    return math.log(vocab_size)
