"""DoRA on the tiny GPT-2, adapted to Milton: the paper's weight-decomposition analysis, and DoRA against LoRA.

1. The analysis of Liu et al. (2024), Section 3.2 and Figure 2: fine-tune with full
   fine-tuning, LoRA and DoRA; at several steps, split each query matrix's change into a
   magnitude part ΔM and a direction part ΔD (lora_edu.dora.weight_decomposition), one
   point per layer and step, and correlate the two. The paper (VL-BART, query matrices)
   found a negative correlation for full fine-tuning (-0.62) and DoRA (-0.31), a positive
   one for LoRA (0.83). Each of the three methods is run and analysed in seeds 0, 1 and 2.
2. DoRA against LoRA, held-out loss over 3 seeds: DoRA r=8 adds one magnitude per output
   row, so LoRA r=9 (a few more parameters than DoRA r=8) is run beside LoRA r=8.

Every run is Chapter 2's Milton fine-tune (lora_edu.train.MILTON_FINE_TUNE) on all four
kinds of block matrices; LoRA and DoRA at Chapter 2's learning rate 3e-3 and alpha 16,
full fine-tuning at 3e-4. About 10 minutes on 2 CPU cores; it writes its record after every
run and skips the runs already there (a run that should have been analysed and was not is
run again), so an interrupted run resumes. Chapter 6 plots the
results and re-runs the seed-0 LoRA and DoRA fine-tunes to check them.

    python benchmarks/dora_analysis.py           # writes lora_edu/results/dora_analysis.json
    python benchmarks/dora_analysis.py --quick   # one seed, 6 steps a run; writes nothing
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import asdict, replace

import torch
from tqdm import tqdm

from lora_edu.data import load_split
from lora_edu.dora import adapted_weight, weight_decomposition
from lora_edu.gpt2 import load_tiny
from lora_edu.lora import add_lora, count_parameters
from lora_edu.results import RESULTS_DIR, benchmark_arguments, out_path, run_record, save
from lora_edu.train import MILTON_FINE_TUNE, TrainConfig, evaluate, make_adamw, seed_everything, train

LORA_LR, FULL_LR, ALPHA = 3e-3, 3e-4, 16
TARGETS = ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"]
METHODS = {  # name: (adapter, rank); None is full fine-tuning
    "full": (None, None),
    "lora_r8": ("lora", 8),
    "dora_r8": ("dora", 8),
    "lora_r9": ("lora", 9),
}
# The fine-tune, the steps after which ΔM and ΔD are recorded, the seeds
FULL = {"fine_tune": MILTON_FINE_TUNE, "snapshot_steps": (50, 100, 150, 200), "seeds": (0, 1, 2)}
QUICK = {"fine_tune": replace(MILTON_FINE_TUNE, steps=6, warmup_steps=1, eval_every=6, eval_batches=1),
         "snapshot_steps": (3, 6), "seeds": (0,)}
OUT = RESULTS_DIR / "dora_analysis.json"


def query_weights(model: torch.nn.Module) -> list[torch.Tensor]:
    """Each block's query matrix, (n_embd, n_embd): the first third of c_attn's output rows."""
    weights = []
    for block in model.transformer.h:
        w = adapted_weight(block.attn.c_attn)
        weights.append(w[: w.shape[1]].clone())
    return weights


def run(method: str, seed: int, fine_tune: TrainConfig, snapshot_steps: tuple[int, ...]) -> dict:
    """One fine-tune; after each of ``snapshot_steps`` (none: not analysed), ΔM and ΔD of every query matrix."""
    adapter, r = METHODS[method]
    seed_everything(seed)
    model = load_tiny()
    pretrained = query_weights(model)
    if adapter is not None:
        add_lora(model, TARGETS, r=r, alpha=ALPHA, use_dora=adapter == "dora")
    config = replace(fine_tune, lr=FULL_LR if adapter is None else LORA_LR, seed=seed)
    optimizer = make_adamw(model, config.lr, config.weight_decay)
    points = []
    if snapshot_steps:  # after the optimizer's step number s, record ΔM and ΔD of every query matrix
        step, steps_done = optimizer.step, [0]

        def step_and_record(*args, **kwargs):
            result = step(*args, **kwargs)
            steps_done[0] += 1
            if steps_done[0] in snapshot_steps:
                for layer, (w0, w) in enumerate(zip(pretrained, query_weights(model))):
                    delta_m, delta_d = weight_decomposition(w0, w)
                    points.append({"step": steps_done[0], "layer": layer, "delta_m": delta_m, "delta_d": delta_d})
            return result

        optimizer.step = step_and_record
    train(model, load_split("milton", "train"), load_split("milton", "val"), config, optimizer=optimizer,
          progress=False)
    return {
        "method": method, "seed": seed, "trainable_parameters": count_parameters(model)[0],
        "milton_val_loss": evaluate(model, load_split("milton", "val"), config.block_size),
        "points": points,
    }


def correlation(points: list[dict]) -> float:
    return statistics.correlation([p["delta_d"] for p in points], [p["delta_m"] for p in points])


def demeaned_correlation(points: list[dict]) -> float:
    """The correlation left once each checkpoint's mean is subtracted: how the layers differ."""
    def centred(key):
        means = {s: statistics.mean(p[key] for p in points if p["step"] == s) for s in {p["step"] for p in points}}
        return [p[key] - means[p["step"]] for p in points]

    return statistics.correlation(centred("delta_d"), centred("delta_m"))


def analysed(method: str) -> bool:
    return method != "lora_r9"


def record_of(runs: list[dict], plan: dict, base_loss: float, start: float, quick: bool) -> dict:
    correlations = {r["method"]: correlation(r["points"]) for r in runs if r["points"] and r["seed"] == 0}
    per_seed = {}
    for r in runs:
        if r["points"]:
            per_seed.setdefault(r["method"], {})[str(r["seed"])] = {
                "correlation": correlation(r["points"]), "demeaned": demeaned_correlation(r["points"])}
    config = {**asdict(plan["fine_tune"]), "lora_lr": LORA_LR, "full_lr": FULL_LR, "alpha": ALPHA,
              "targets": TARGETS, "snapshot_steps": list(plan["snapshot_steps"]), "seeds": list(plan["seeds"]),
              "analysed": "query rows of every block's c_attn", "quick": quick}
    return run_record("dora_analysis", config, runs, device="cpu", start=start, base_milton_val_loss=base_loss,
                      correlations=correlations, correlations_per_seed=per_seed,
                      paper_correlations={"full": -0.62, "dora": -0.31, "lora": 0.83})


def main(argv: list[str] | None = None) -> dict:
    """Resumable: the record is written after every run, and runs already in it are kept."""
    args = benchmark_arguments(__doc__, "one seed, 6 steps a run: a smoke test").parse_args(argv)
    out = out_path(args, OUT)
    plan = QUICK if args.quick else FULL
    earlier = json.loads(out.read_text()) if out is not None and out.is_file() else {"results": [], "wall_seconds": 0}
    runs = earlier["results"]
    start = time.time() - earlier["wall_seconds"]  # the record's seconds count every resumed run
    base_loss = evaluate(load_tiny(), load_split("milton", "val"), plan["fine_tune"].block_size)
    recorded_loss = {(r["method"], r["seed"]): r["milton_val_loss"] for r in runs}
    # a run is done if it is there, with its points where it is analysed
    done = {(r["method"], r["seed"]) for r in runs if r["points"] or not analysed(r["method"])}
    todo = [(method, seed) for method in METHODS for seed in plan["seeds"] if (method, seed) not in done]
    for method, seed in tqdm(todo, desc="runs"):
        new = run(method, seed, plan["fine_tune"], plan["snapshot_steps"] if analysed(method) else ())
        runs = [r for r in runs if (r["method"], r["seed"]) != (method, seed)] + [new]
        before = recorded_loss.get((method, seed))  # a run re-done to analyse it should not move
        tqdm.write(f"{method:8s} seed {seed}: loss {new['milton_val_loss']:.4f}, "
                   f"{new['trainable_parameters']:,} trained"
                   + ("" if before is None else f" (recorded before without its points: {before:.4f})"))
        save(record_of(runs, plan, base_loss, start, args.quick), out)  # after every run: an interrupted one resumes
    record = record_of(runs, plan, base_loss, start, args.quick)
    for method, seeds in record["correlations_per_seed"].items():
        for seed, rho in seeds.items():
            print(f"{method:8s} seed {seed}: correlation of ΔD and ΔM {rho['correlation']:+.2f}, "
                  f"demeaned {rho['demeaned']:+.2f}")
    save(record, out)
    return record


if __name__ == "__main__":
    main()
