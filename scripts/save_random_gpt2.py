"""Save a GPT-2 124M-shaped checkpoint with random weights, and a tokenizer, in one folder.

The GPU machine cannot reach the Hugging Face Hub, so Chapter 5's GPU branch (GPT-2 124M
through ``load_pretrained``, a 16-bit compute dtype, a GradScaler with float16, paged
AdamW) would fall back to the tiny model there. This folder stands in for the Hub's
``gpt2``: Chapter 5 loads it when ``LORA_EDU_GPT2_PATH`` names it (the chapter's
"The model and the data" says so), through the same ``load_pretrained`` and
``load_tokenizer`` calls, and ``scripts/gpu_check.sh`` runs the chapter that way.

    python scripts/save_random_gpt2.py --out /tmp/gpt2_random            # GPT-2 124M's shape
    python scripts/save_random_gpt2.py --out /tmp/gpt2_small --small     # 4 layers, 128 wide

What the folder holds, all written offline:

- ``config.json`` and ``model.safetensors``: ``transformers.GPT2LMHeadModel`` with
  ``GPT2Config()``'s defaults (12 layers, 768 wide, 12 heads, vocabulary 50,257, 1,024
  positions), seeded, saved with ``save_pretrained`` as the Hub's checkpoint is. The
  config carries ``"lora_edu_random_weights": true``; ``load_pretrained`` reads it into
  ``model.random_weights``, so the chapter skips, by name, the claims that need
  pretrained weights. ``--small`` keeps GPT-2's architecture and code path at the tiny
  model's size (4 layers, 128 wide) and the tokenizer's vocabulary, for the CPU rehearsal.
- the tokenizer: GPT-2's own (``vocab.json``, ``merges.txt``) needs a download, so this
  is a byte-level BPE of the same kind (GPT-2's pre-tokenizer and byte alphabet, an
  ``<|endoftext|>`` token), trained here on the chapter's Milton training text with
  ``tokenizers`` (``--vocab`` tokens: 4,096, or 1,024 with ``--small``) and saved as a
  ``GPT2TokenizerFast``. Its ids are a subset of the model's 50,257.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SMALL = {"n_layer": 4, "n_embd": 128, "n_head": 4, "n_positions": 256}


def train_tokenizer(vocab_size: int):
    """A byte-level BPE like GPT-2's, learnt from Milton's training text."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import GPT2TokenizerFast

    from lora_edu.data import load_text, split_text

    train_text, _ = split_text(load_text("milton"))
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(
        [train_text], vocab_size=vocab_size, min_frequency=2, special_tokens=["<|endoftext|>"], show_progress=False
    )
    return GPT2TokenizerFast(
        tokenizer_object=bpe._tokenizer,
        bos_token="<|endoftext|>",
        eos_token="<|endoftext|>",
        unk_token="<|endoftext|>",
        model_max_length=1024,
    )


def save(out: Path, small: bool, vocab_size: int, seed: int = 0) -> dict:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    tokenizer = train_tokenizer(vocab_size)
    overrides = {**SMALL, "vocab_size": len(tokenizer)} if small else {}
    end = tokenizer.eos_token_id  # <|endoftext|>, as in GPT-2 (there id 50256)
    config = GPT2Config(**overrides, bos_token_id=end, eos_token_id=end, lora_edu_random_weights=True)
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(config)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    saved = json.loads((out / "config.json").read_text())
    return {
        "folder": str(out),
        "parameters": sum(p.numel() for p in model.parameters()),
        **{k: saved[k] for k in ("n_layer", "n_embd", "n_head", "vocab_size", "lora_edu_random_weights")},
        "tokenizer_vocabulary": len(tokenizer),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="the folder to write")
    parser.add_argument("--small", action="store_true", help="4 layers, 128 wide: the CPU rehearsal's size")
    parser.add_argument("--vocab", type=int, default=None, help="the tokenizer's vocabulary (4096; 1024 with --small)")
    args = parser.parse_args(argv)
    if args.vocab is None:
        args.vocab = 1024 if args.small else 4096
    if not 257 < args.vocab <= 50257:
        parser.error(f"--vocab must be between 258 and 50257 (GPT-2's), got {args.vocab}")
    start = time.time()
    summary = save(args.out, args.small, args.vocab)
    print(json.dumps(summary), f"({time.time() - start:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
