"""How far the book's numbers move when only the CPU's arithmetic changes.

Runs the book's fine-tunes on Milton (Chapter 2's full fine-tuning and LoRA r = 8 for
200 steps, Chapter 7's 100-step LoRA, and the runs at the book's largest learning rates:
Chapter 3's LoRA+ at lambda = 32, Exercise 6.5's DoRA magnitudes at 0.1, Exercise 8.4's
prompt tuning at 0.1) and the pretrained model's held-out loss (no training: one forward
pass per window), once under each kernel
path of lora_edu.numerics.KERNEL_PATHS, each path in a fresh process, since PyTorch and
MKL read their environment when they load. Records every final loss to full precision
and, per run, the spread: the largest difference between two paths. Also trains the
LoRA run with seeds 1 and 2 on the native path, for the spread a seed makes.

lora_edu.numerics.loss_tolerance reads the spreads; the README says what they mean for
a reader's own machine. About 15 minutes on 2 CPU cores.

    python benchmarks/kernel_paths.py           # writes lora_edu/results/kernel_paths.json
    python benchmarks/kernel_paths.py --quick   # 10 steps, two paths, writes nothing
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import replace

from tqdm import tqdm

from lora_edu.numerics import KERNEL_PATHS
from lora_edu.results import RESULTS_DIR, benchmark_arguments, out_path, run_record, save

# id: (what it is, what is trained, steps, recipe changes); every run starts from the tiny
# GPT-2 and its recipe is MILTON_FINE_TUNE's with these changes.
RUNS = {
    "pretrained": ("the pretrained model, no training", "none", 0, {}),
    "full": ("full fine-tuning, Chapter 2", "full", 200, {}),
    "lora": ("LoRA r=8, Chapter 2", "lora", 200, {"lr": 3e-3}),
    "lora-100": ("LoRA r=8 for 100 steps, Chapter 7", "lora", 100, {"lr": 3e-3, "warmup_steps": 10}),
    "loraplus": ("LoRA+ at lambda=32, Chapter 3", "lora+", 100, {"lr": 1e-3, "warmup_steps": 10}),
    "magnitudes": ("DoRA's magnitudes at lr 0.1, Exercise 6.5", "magnitudes", 100, {"lr": 0.1, "warmup_steps": 10}),
    "prompt": ("prompt tuning at lr 0.1, Exercise 8.4", "prompt", 100,
               {"lr": 0.1, "warmup_steps": 10, "block_size": 80}),
}
LORAPLUS_RATIO = 32
SEEDS_ON_NATIVE = (1, 2)  # the LoRA run again, for the spread a seed makes


def final_loss(kind: str, steps: int, changes: dict, seed: int) -> float:
    """Train one run in this process and return its held-out Milton loss."""
    from lora_edu.data import load_split
    from lora_edu.gpt2 import load_tiny
    import torch

    from lora_edu.lora import add_lora
    from lora_edu.loraplus import create_loraplus_optimizer
    from lora_edu.peft_family import PromptTuned
    from lora_edu.train import MILTON_FINE_TUNE, evaluate, seed_everything, train

    train_ids, val_ids = load_split("milton", "train"), load_split("milton", "val")
    recipe = replace(MILTON_FINE_TUNE, steps=max(steps, 1), eval_every=max(steps, 1), seed=seed, **changes)
    seed_everything(seed)
    optimizer = None
    if kind in ("none", "full"):
        model = load_tiny()
    elif kind == "prompt":
        model = PromptTuned(load_tiny(), 16, seed=seed)
    else:
        model = add_lora(load_tiny(), "all-linear", r=8, alpha=16, use_dora=kind == "magnitudes")
    if kind == "lora+":
        optimizer = create_loraplus_optimizer(model, torch.optim.AdamW, lr=recipe.lr, ratio=LORAPLUS_RATIO)
    if kind == "magnitudes":  # Exercise 6.5: the directions stay the pretrained ones
        for name, p in model.named_parameters():
            p.requires_grad_(p.requires_grad and "lora_A" not in name and "lora_B" not in name)
    if steps:
        train(model, train_ids, val_ids, recipe, optimizer=optimizer, progress=False)
    return evaluate(model, val_ids, recipe.block_size)


def child(plan: list[tuple[str, int]]) -> None:
    """The worker: run each (name, seed) of ``plan`` and print the losses as JSON."""
    import torch

    losses = [final_loss(*RUNS[run][1:], seed=seed) for run, seed in plan]
    print(json.dumps({"losses": losses, "capability": torch.backends.cpu.get_cpu_capability(),
                      "threads": torch.get_num_threads()}))


def run_path(path: str, plan: list[tuple[str, int]], steps: int | None) -> dict:
    """Run ``plan`` in a fresh process under kernel path ``path``."""
    env = dict(os.environ, **KERNEL_PATHS[path])
    command = [sys.executable, __file__, "--child", json.dumps(plan)]
    if steps is not None:
        command += ["--steps", str(steps)]
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"kernel path {path!r} failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = benchmark_arguments(__doc__, quick="10 steps each, on two paths; writes nothing")
    parser.add_argument("--child", help=argparse.SUPPRESS)  # the worker's plan, from run_path
    parser.add_argument("--steps", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:
        args.steps = 10
    if args.steps is not None:  # every run shortened alike
        for run, (what, kind, steps, changes) in RUNS.items():
            RUNS[run] = (what, kind, min(steps, args.steps), changes)
    if args.child:
        child([tuple(item) for item in json.loads(args.child)])
        return

    start = time.time()
    paths = ["native", "avx2-1-thread"] if args.quick else list(KERNEL_PATHS)
    plan = [(run, 0) for run in RUNS]
    measured = {}
    for path in tqdm(paths, desc="kernel paths", unit="path"):
        extra = [("lora", s) for s in SEEDS_ON_NATIVE] if path == "native" else []
        measured[path] = run_path(path, plan + extra, args.steps)
    results = []
    for i, (run, (what, _, steps, _)) in enumerate(RUNS.items()):
        by_path = {path: measured[path]["losses"][i] for path in paths}
        results.append({"run": run, "what": what, "steps": steps, "final_loss": by_path,
                        "spread": max(by_path.values()) - min(by_path.values())})
    native = measured["native"]["losses"]
    lora_seeds = [native[list(RUNS).index("lora")], *native[len(RUNS):]]
    for row in results:
        print(f"{row['what']:44s} {row['steps']:4d} steps: spread {row['spread']:.1e}")
    print(f"LoRA r=8 over seeds 0, 1, 2 (native): spread {max(lora_seeds) - min(lora_seeds):.1e}")
    config = {"paths": {p: {**KERNEL_PATHS[p], "capability": measured[p]["capability"],
                            "threads": measured[p]["threads"]} for p in paths},
              "runs": {run: {"trained": kind, "steps": steps, **changes} for run, (_, kind, steps, changes) in RUNS.items()}}
    record = run_record("kernel_paths", config, results, device="cpu", start=start,
                        lora_seeds={"seeds": [0, *SEEDS_ON_NATIVE], "final_loss": lora_seeds,
                                    "spread": max(lora_seeds) - min(lora_seeds)})
    save(record, out_path(args, RESULTS_DIR / "kernel_paths.json"))


if __name__ == "__main__":
    main()
