"""LoRA+ on the tiny GPT-2 adapted to Milton: a sweep of the ratio and an (eta_A, eta_B) grid.

Chapter 3 plots the results and runs a shorter ratio sweep itself. Every run is LoRA
r=8, alpha=16 on all 16 block matrices, lora_edu.train.MILTON_FINE_TUNE's schedule
(200 steps), AdamW without weight decay, seed 0. About 8 minutes on 2 CPU cores.

    python benchmarks/loraplus_sweep.py   # writes benchmarks/results/loraplus_sweep.json
"""

from __future__ import annotations

import json
import platform
import sys
import time
from dataclasses import asdict, replace
from datetime import datetime, timezone
from pathlib import Path

import torch

from lora_edu.data import load_split
from lora_edu.gpt2 import load_tiny
from lora_edu.lora import add_lora, lora_layers
from lora_edu.loraplus import create_loraplus_optimizer
from lora_edu.train import MILTON_FINE_TUNE, evaluate, seed_everything, train

RANK, ALPHA, SEED = 8, 16, 0
LR_A = 1e-3
RATIOS = [1, 2, 4, 8, 16, 32]
GRID = [3e-4, 1e-3, 3e-3, 1e-2]  # both eta_A and eta_B
CONFIG = replace(MILTON_FINE_TUNE, eval_every=10, eval_batches=2, seed=SEED)
OUT = Path(__file__).resolve().parent / "results" / "loraplus_sweep.json"


def run(lr_a: float, lr_b: float) -> dict:
    seed_everything(SEED)
    model = add_lora(load_tiny(), "all-linear", r=RANK, alpha=ALPHA)
    if lr_b >= lr_a:
        optimizer = create_loraplus_optimizer(model, torch.optim.AdamW, lr=lr_a, ratio=lr_b / lr_a)
    else:  # the grid's lower triangle, which LoRA+ (ratio >= 1) refuses: plain groups
        layers = lora_layers(model).values()
        optimizer = torch.optim.AdamW([
            {"params": [layer.lora_A.weight for layer in layers], "lr": lr_a, "weight_decay": 0.0},
            {"params": [layer.lora_B.weight for layer in layers], "lr": lr_b, "weight_decay": 0.0},
        ])
    milton_val = load_split("milton", "val")
    history = train(model, load_split("milton", "train"), milton_val, replace(CONFIG, lr=lr_a), optimizer, progress=False)
    return {
        "lr_a": lr_a,
        "lr_b": lr_b,
        "milton_val_loss": evaluate(model, milton_val, CONFIG.block_size),
        "history": {"step": history.step, "val_loss": history.val_loss},
    }


def main() -> None:
    start = time.time()
    ratios = {}
    for ratio in RATIOS:
        ratios[str(ratio)] = run(LR_A, ratio * LR_A)
        print(f"ratio {ratio}: {ratios[str(ratio)]['milton_val_loss']:.3f}", flush=True)
    grid = []
    for lr_a in GRID:
        for lr_b in GRID:
            grid.append(run(lr_a, lr_b))
            print(f"lr_a {lr_a:g} lr_b {lr_b:g}: {grid[-1]['milton_val_loss']:.3f}", flush=True)
    record = {
        "benchmark": "loraplus_sweep",
        "command": "python benchmarks/loraplus_sweep.py",
        "config": {**asdict(CONFIG), "rank": RANK, "alpha": ALPHA, "lr_a": LR_A},
        "results": {"ratios": ratios, "grid": grid},
        "device": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
        "versions": {"python": platform.python_version(), "torch": torch.__version__},
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"),
        "wall_seconds": round(time.time() - start),
    }
    OUT.write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {OUT}", file=sys.stderr)


if __name__ == "__main__":
    main()
