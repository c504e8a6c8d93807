"""LoRA on the tiny GPT-2, adapted to Milton: a rank sweep and a fixed-budget comparison.

The rank sweep is the question of Hu et al.'s Table 6; the fixed-budget comparison
(which matrices to adapt at a fixed parameter count) is their Table 5.

Chapter 2 plots the results; it runs only the r = 8 point itself. Every run uses
lora_edu.train.MILTON_FINE_TUNE with lr 3e-3 and alpha 16 (fixed across ranks, as in
Hu et al. 2021). About 5 minutes on 2 CPU cores.

    python benchmarks/lora_rank_sweep.py           # writes lora_edu/results/lora_rank_sweep.json
    python benchmarks/lora_rank_sweep.py --quick   # two ranks and one budget, 5 steps each; writes nothing
"""

from __future__ import annotations

import time
from dataclasses import asdict, replace

from lora_edu.data import load_split
from lora_edu.gpt2 import load_tiny
from lora_edu.lora import add_lora, count_parameters
from lora_edu.results import RESULTS_DIR, benchmark_arguments, out_path, run_record, save
from lora_edu.train import MILTON_FINE_TUNE, TrainConfig, evaluate, seed_everything, train

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
FULL = {"fine_tune": MILTON_FINE_TUNE, "ranks": RANKS, "budget": BUDGET}
QUICK = {"fine_tune": replace(MILTON_FINE_TUNE, steps=5, warmup_steps=1, eval_every=5, eval_batches=1),
         "ranks": RANKS[:2], "budget": dict(list(BUDGET.items())[:1])}  # a smoke test
OUT = RESULTS_DIR / "lora_rank_sweep.json"


def run(targets: list[str], r: int, fine_tune: TrainConfig) -> dict:
    seed_everything(SEED)
    model = add_lora(load_tiny(), targets, r=r, alpha=ALPHA)
    config = replace(fine_tune, lr=LORA_LR, seed=SEED)
    history = train(model, load_split("milton", "train"), load_split("milton", "val"), config, progress=False)
    return {
        "targets": targets,
        "r": r,
        "trainable_parameters": count_parameters(model)[0],
        "milton_val_loss": evaluate(model, load_split("milton", "val"), config.block_size),
        "history": {"step": history.step, "val_loss": history.val_loss},
    }


def main(argv: list[str] | None = None) -> dict:
    args = benchmark_arguments(__doc__, "ranks 1 and 2 and one budget, 5 steps each: a smoke test").parse_args(argv)
    out = out_path(args, OUT)
    plan = QUICK if args.quick else FULL
    fine_tune = plan["fine_tune"]
    start = time.time()
    results = {"ranks": {}, "budget": {}}
    for r in plan["ranks"]:
        results["ranks"][str(r)] = run(ALL_KINDS, r, fine_tune)
        print(f"r={r}: {results['ranks'][str(r)]['milton_val_loss']:.3f}", flush=True)
    for name, (targets, r) in plan["budget"].items():
        results["budget"][name] = run(targets, r, fine_tune)
        print(f"{name}: {results['budget'][name]['milton_val_loss']:.3f}", flush=True)
    config = {**asdict(fine_tune), "lr": LORA_LR, "alpha": ALPHA, "seed": SEED, "quick": args.quick}
    base_loss = evaluate(load_tiny(), load_split("milton", "val"), fine_tune.block_size)
    record = run_record("lora_rank_sweep", config, results, device="cpu", start=start, base_milton_val_loss=base_loss)
    save(record, out)
    return record


if __name__ == "__main__":
    main()
