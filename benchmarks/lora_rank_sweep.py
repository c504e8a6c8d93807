"""LoRA on the tiny GPT-2, adapted to Milton: a rank sweep and a fixed-budget comparison.

The rank sweep is the question of Hu et al.'s Table 6; the fixed-budget comparison
(which matrices to adapt at a fixed parameter count) is their Table 5.

Chapter 2 plots the results; it runs only the r = 8 point itself. Every run uses
lora_edu.train.MILTON_FINE_TUNE with lr 3e-3 and alpha 16 (fixed across ranks, as in
Hu et al. 2021). About 5 minutes on 2 CPU cores.

    python benchmarks/lora_rank_sweep.py   # writes lora_edu/results/lora_rank_sweep.json
"""

from __future__ import annotations

import json
import platform
import sys
import time
from dataclasses import asdict, replace
from datetime import datetime, timezone

import torch

from lora_edu.data import load_split
from lora_edu.gpt2 import load_tiny
from lora_edu.lora import add_lora, count_parameters
from lora_edu.train import MILTON_FINE_TUNE, evaluate, seed_everything, train
from lora_edu.results import RESULTS_DIR

LORA_LR, ALPHA, SEED = 3e-3, 16, 0
ALL_KINDS = ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"]
RANKS = [1, 2, 4, 8, 16, 32, 64]
# About 8,200 trainable parameters per block each: fewer matrix kinds at a higher rank,
# or more at a lower one (the question of Hu et al.'s Table 5, at our scale; their
# Table 6 is the rank sweep). GPT-2's c_attn holds W_q, W_k and W_v in one matrix, so
# LoRA on it is one rank-r update shared by all three, not the paper's separate W_q, W_v.
BUDGET = {
    "all four, r=4": (ALL_KINDS, 4),
    "attention (c_attn, c_proj), r=11": (["attn.c_attn", "attn.c_proj"], 11),
    "MLP (c_fc, c_proj), r=6": (["mlp.c_fc", "mlp.c_proj"], 6),
    "attn.c_attn only, r=16": (["attn.c_attn"], 16),
    "mlp.c_fc only, r=13": (["mlp.c_fc"], 13),
}
OUT = RESULTS_DIR / "lora_rank_sweep.json"


def run(targets: list[str], r: int) -> dict:
    seed_everything(SEED)
    model = add_lora(load_tiny(), targets, r=r, alpha=ALPHA)
    config = replace(MILTON_FINE_TUNE, lr=LORA_LR, seed=SEED)
    history = train(model, load_split("milton", "train"), load_split("milton", "val"), config, progress=False)
    return {
        "targets": targets,
        "r": r,
        "trainable_parameters": count_parameters(model)[0],
        "milton_val_loss": evaluate(model, load_split("milton", "val"), config.block_size),
        "history": {"step": history.step, "val_loss": history.val_loss},
    }


def main() -> None:
    start = time.time()
    results = {"ranks": {}, "budget": {}}
    for r in RANKS:
        results["ranks"][str(r)] = run(ALL_KINDS, r)
        print(f"r={r}: {results['ranks'][str(r)]['milton_val_loss']:.3f}", flush=True)
    for name, (targets, r) in BUDGET.items():
        results["budget"][name] = run(targets, r)
        print(f"{name}: {results['budget'][name]['milton_val_loss']:.3f}", flush=True)
    record = {
        "benchmark": "lora_rank_sweep",
        "command": "python benchmarks/lora_rank_sweep.py",
        "config": {**asdict(MILTON_FINE_TUNE), "lr": LORA_LR, "alpha": ALPHA, "seed": SEED},
        "base_milton_val_loss": evaluate(load_tiny(), load_split("milton", "val"), MILTON_FINE_TUNE.block_size),
        "results": results,
        "device": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
        "versions": {"python": platform.python_version(), "torch": torch.__version__},
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"),
        "wall_seconds": round(time.time() - start),
    }
    OUT.parent.mkdir(exist_ok=True)
    OUT.write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {OUT}", file=sys.stderr)


if __name__ == "__main__":
    main()
