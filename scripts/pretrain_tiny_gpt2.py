"""Pretrain the tiny GPT-2 that lora_edu ships, on Shakespeare's plays.

Deterministic on a given machine: every random draw comes from the seeds below.
Writes lora_edu/checkpoints/tiny_gpt2.safetensors and, beside it,
tiny_gpt2.log.json: the configs, the versions, the corpus and checkpoint hashes,
and the loss history. About 20 minutes on 2 CPU cores.

    python scripts/pretrain_tiny_gpt2.py
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import time
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path

import torch

from lora_edu.data import CORPORA, DATA_DIR, bigram_loss, load_split
from lora_edu.gpt2 import GPT2, TINY_CHECKPOINT, GPT2Config, save_checkpoint
from lora_edu.train import TrainConfig, evaluate, seed_everything, train

TRAIN = TrainConfig(
    steps=4000, batch_size=32, block_size=128, lr=2e-3, weight_decay=0.1, grad_clip=1.0,
    warmup_steps=200, min_lr_ratio=0.1, eval_every=250, eval_batches=8, seed=1234,
)
INIT_SEED = 1234


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=TINY_CHECKPOINT)
    parser.add_argument("--steps", type=int, default=TRAIN.steps, help="fewer for a quick trial")
    args = parser.parse_args()
    config = TrainConfig(**{**asdict(TRAIN), "steps": args.steps})

    seed_everything(INIT_SEED)
    model = GPT2(GPT2Config.from_preset("tiny"))
    train_ids, val_ids = load_split("shakespeare", "train"), load_split("shakespeare", "val")
    start = time.time()
    history = train(model, train_ids, val_ids, config)
    seconds = time.time() - start

    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_checkpoint(model, args.out)
    val_loss = {name: evaluate(model, load_split(name, "val"), config.block_size) for name in CORPORA}
    log = {
        "model_config": asdict(model.config),
        "train_config": asdict(config),
        "init_seed": INIT_SEED,
        "parameters": sum(p.numel() for p in model.parameters()),
        "corpus_sha256": {name: sha256(DATA_DIR / file) for name, file in CORPORA.items()},
        "checkpoint_sha256": sha256(args.out),
        "checkpoint_bytes": args.out.stat().st_size,
        "final_val_loss": val_loss,  # nats per byte over the whole held-out split
        "bigram_val_loss": {
            name: bigram_loss(load_split("shakespeare", "train"), load_split(name, "val")) for name in CORPORA
        },
        "history": {"step": history.step, "val_loss": history.val_loss, "train_loss": history.train_loss},
        "wall_seconds": round(seconds),
        "device": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
        "versions": {"python": platform.python_version(), "torch": torch.__version__},
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"),
    }
    log_path = args.out.with_suffix(".log.json")
    log_path.write_text(json.dumps(log, indent=1) + "\n")
    print(json.dumps({k: log[k] for k in ("parameters", "final_val_loss", "bigram_val_loss", "wall_seconds")}))


if __name__ == "__main__":
    main()
