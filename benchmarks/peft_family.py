"""The PEFT family on one task: every method's held-out loss, forgetting and cost, each at its best learning rate.

Chapter 2's domain adaptation (the tiny GPT-2, pretrained on Shakespeare, fine-tuned on
Milton for 200 steps with lora_edu.train.MILTON_FINE_TUNE), with windows of 112 tokens
so that prompt tuning's 16 virtual tokens fit the model's 128 positions, for every
method: full fine-tuning, LoRA and DoRA (rank 8 on all block matrices), BitFit, (IA)³,
prompt tuning (16 virtual tokens), prefix tuning (8 keys and values per layer) and serial
adapters (Houlsby's placement, bottleneck 8). Each method's learning rate is chosen on a
grid with seed 0; seeds 1 and 2 then repeat the best rate. Recorded per run: held-out
Milton loss, held-out Shakespeare loss (forgetting), trainable parameters; per method:
whether it merges and how many context positions it uses.

Resumable: the record is written after every run, and runs already in it are skipped.

    python benchmarks/peft_family.py          # writes lora_edu/results/peft_family.json (about an hour on 2 cores)
    python benchmarks/peft_family.py --quick  # 10 steps, one rate and seed per method: a smoke test; writes nothing
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path

import torch

from lora_edu.adapters import add_serial_adapters
from lora_edu.data import load_split
from lora_edu.gpt2 import load_tiny
from lora_edu.lora import add_lora, count_parameters
from lora_edu.peft_family import PromptTuned, add_bitfit, add_ia3, add_prefix_tuning
from lora_edu.results import RESULTS_DIR, describe_device, save
from lora_edu.train import MILTON_FINE_TUNE, evaluate, seed_everything, train

OUT = RESULTS_DIR / "peft_family.json"
COMMAND = "python benchmarks/peft_family.py"
BLOCK_SIZE, N_VIRTUAL, N_PREFIX, RANK, BOTTLENECK = 112, 16, 8, 8, 8
SEEDS = (0, 1, 2)
# name: (how to build it from the pretrained model, learning-rate grid, mergeable, context positions used)
METHODS = {
    "full": (lambda m: m, [1e-4, 3e-4, 1e-3], True, 0),
    "lora": (lambda m: add_lora(m, "all-linear", r=RANK, alpha=2 * RANK), [1e-3, 3e-3, 1e-2], True, 0),
    "dora": (lambda m: add_lora(m, "all-linear", r=RANK, alpha=2 * RANK, use_dora=True), [1e-3, 3e-3, 1e-2], True, 0),
    "bitfit": (add_bitfit, [1e-3, 3e-3, 1e-2, 3e-2], True, 0),
    "ia3": (add_ia3, [3e-3, 1e-2, 3e-2, 1e-1], True, 0),
    "prompt": (lambda m: PromptTuned(m, N_VIRTUAL), [1e-2, 3e-2, 1e-1], False, N_VIRTUAL),
    "prefix": (lambda m: add_prefix_tuning(m, N_PREFIX), [1e-3, 1e-2, 3e-2], False, 0),
    "adapters": (lambda m: add_serial_adapters(m, BOTTLENECK), [1e-3, 3e-3, 1e-2], False, 0),
}


def run(method: str, lr: float, seed: int, steps: int, data: dict) -> dict:
    build = METHODS[method][0]
    seed_everything(seed)
    model = build(load_tiny())
    config = replace(MILTON_FINE_TUNE, steps=steps, warmup_steps=max(1, steps // 10), lr=lr, seed=seed,
                     block_size=BLOCK_SIZE, eval_every=steps)
    train(model, data["milton_train"], data["milton_val"], config, progress=False)
    return {"method": method, "lr": lr, "seed": seed, "trainable_parameters": count_parameters(model)[0],
            "milton_val_loss": evaluate(model, data["milton_val"], BLOCK_SIZE),
            "shakespeare_val_loss": evaluate(model, data["shakespeare_val"], BLOCK_SIZE)}


def record_of(runs: list[dict], base: dict, start: float, quick: bool) -> dict:
    return {
        "benchmark": "peft_family",
        "command": COMMAND,
        "config": {"block_size": BLOCK_SIZE, "steps": MILTON_FINE_TUNE.steps, "n_virtual": N_VIRTUAL,
                   "n_prefix": N_PREFIX, "rank": RANK, "bottleneck": BOTTLENECK, "seeds": list(SEEDS), "quick": quick,
                   "methods": {m: {"lr_grid": grid, "mergeable": merges, "context_positions_used": positions}
                               for m, (_, grid, merges, positions) in METHODS.items()}},
        "base_model": base,
        "results": runs,
        "device": describe_device("cpu"),
        "versions": {"python": platform.python_version(), "torch": torch.__version__},
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"),
        "wall_seconds": round(time.time() - start),
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="10 steps, one rate and one seed per method")
    parser.add_argument("--out", type=Path, default=None, help="where to write results (--quick writes nothing by default)")
    args = parser.parse_args(argv)
    out = args.out if args.out is not None else (None if args.quick else OUT)
    start = time.time()
    data = {"milton_train": load_split("milton", "train"), "milton_val": load_split("milton", "val"),
            "shakespeare_val": load_split("shakespeare", "val")}
    pretrained = load_tiny()
    base = {"milton_val_loss": evaluate(pretrained, data["milton_val"], BLOCK_SIZE),
            "shakespeare_val_loss": evaluate(pretrained, data["shakespeare_val"], BLOCK_SIZE)}
    runs = [] if args.quick or out is None or not out.is_file() else json.loads(out.read_text())["results"]
    done = {(r["method"], r["lr"], r["seed"]) for r in runs}
    steps = 10 if args.quick else MILTON_FINE_TUNE.steps

    def measure(method: str, lr: float, seed: int) -> None:
        if (method, lr, seed) in done:
            return
        runs.append(run(method, lr, seed, steps, data))
        done.add((method, lr, seed))
        r = runs[-1]
        print(f"{method:8s} lr {lr:<7g} seed {seed}: Milton {r['milton_val_loss']:.4f}, "
              f"Shakespeare {r['shakespeare_val_loss']:.4f}, {r['trainable_parameters']:,} trained", flush=True)
        save(record_of(runs, base, start, args.quick), out)

    for method, (_, grid, _, _) in METHODS.items():
        if args.quick:
            measure(method, grid[0], SEEDS[0])
            continue
        grid = list(grid)
        while True:  # the grid on seed 0, grown (by factors of 3) until its best rate lies inside it
            for lr in grid:
                measure(method, lr, SEEDS[0])
            tried = {r["lr"]: r["milton_val_loss"] for r in runs if r["method"] == method and r["seed"] == SEEDS[0]}
            best = min(grid, key=tried.get)
            if best == grid[0] and len(grid) < 7:
                grid.insert(0, float(f"{grid[0] / 3:.1g}"))
            elif best == grid[-1] and len(grid) < 7:
                grid.append(float(f"{grid[-1] * 3:.1g}"))
            else:
                break
        for seed in SEEDS[1:]:  # the best rate, again
            measure(method, best, seed)
    return record_of(runs, base, start, args.quick)


if __name__ == "__main__":
    main()
