"""LoRA+ sweeps for Chapter 3: an (eta_A, eta_B) grid, and the best ratio at three widths.

Part "grid": the shipped tiny GPT-2 (width 128), LoRA r=8, alpha=16 on all 16 block
matrices, 100 steps on Milton (batch 16 x 128 bytes, warm-up 10, cosine to 0.1), AdamW
without weight decay. eta_A and eta_B each run over a ladder of rates sqrt(10) apart;
the grid starts at 3e-3 to 3e-2 and grows by a row and a column whenever the best cell
of seed 0 lies on its edge, so that the optimum ends inside it; seeds 1 and 2 then run
the best cell, its four neighbours and the best shared rate (the best cell of the
diagonal eta_A = eta_B), chosen again on the mean over seeds until they settle.

Part "width": small GPT-2s (2 layers, 4 heads, n_embd 128, 256, 512), each pretrained
from a fresh init for 150 steps on Shakespeare (the same recipe at every width), then
LoRA r=8, alpha=16 on Milton for 100 steps (batch 16 x 64 bytes) with eta_B fixed at
WIDTH_LR_B and eta_A = eta_B / lambda for lambda in WIDTH_RATIOS. The theory (LoRA+,
Section 4) says that eta_B's best value does not depend on the width and eta_A's
shrinks like 1/n, so the best lambda at a fixed eta_B should grow with the width.

Every run ends with the loss on a fixed held-out set (the first EVAL_BATCHES x 64
windows of Milton's validation split); seeds 0, 1, 2 set the LoRA init and the batch
order. The grid runs first, then the widths seed by seed; each run is saved as soon as it ends:
an interrupted sweep keeps what it measured, and running the script again resumes it.
One thread (two threads on a shared 2-core machine were 8 times slower). About 40
minutes on 2 CPU cores shared with other work.

    python benchmarks/loraplus_sweep.py           # writes lora_edu/results/loraplus_sweep.json
    python benchmarks/loraplus_sweep.py --quick   # a 2 x 2 grid, two seeds, one width, 5 steps a run; writes nothing
"""

from __future__ import annotations

import json
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch

from lora_edu.data import load_split
from lora_edu.gpt2 import GPT2, GPT2Config, load_tiny
from lora_edu.lora import add_lora, lora_layers
from lora_edu.loraplus import create_loraplus_optimizer
from lora_edu.results import RESULTS_DIR, benchmark_arguments, out_path, run_record, save
from lora_edu.train import MILTON_FINE_TUNE, TrainConfig, evaluate, seed_everything, train

RANK, ALPHA = 8, 16
SEEDS = [0, 1, 2]
LADDER = [1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1]  # sqrt(10) apart
GRID_START = (3, 6)  # LADDER[3:6], 3e-3 to 3e-2, for both eta_A and eta_B
EVAL_BATCHES = 2
# train() evaluates only at steps 0 and 100, on one batch: the real measurement is lora_run's.
GRID = replace(MILTON_FINE_TUNE, steps=100, warmup_steps=10, eval_every=100, eval_batches=1)

WIDTHS = [128, 256, 512]
WIDTH_LR_B = 1e-2
WIDTH_RATIOS = [0.25, 1, 4, 16, 64]  # 0.25: A faster than B, to see whether 1 is an edge
PRETRAIN = TrainConfig(steps=150, batch_size=16, block_size=64, lr=2e-3, weight_decay=0.1,
                       warmup_steps=30, min_lr_ratio=0.1, eval_every=150, eval_batches=4)
WIDTH = replace(PRETRAIN, steps=100, lr=1e-3, weight_decay=0.0, warmup_steps=10, eval_every=100,
                eval_batches=1)

# The sweep the chapter reads, and --quick's smoke test of each of its parts
FULL = {"seeds": SEEDS, "grid_start": GRID_START, "grow": True, "grid": GRID,
        "widths": WIDTHS, "ratios": WIDTH_RATIOS, "pretrain": PRETRAIN, "width": WIDTH}
FEW_STEPS = {"steps": 5, "warmup_steps": 1, "eval_every": 5, "eval_batches": 1}
QUICK = {"seeds": SEEDS[:2], "grid_start": (3, 5), "grow": False, "grid": replace(GRID, **FEW_STEPS),
         "widths": WIDTHS[:1], "ratios": [1, 4], "pretrain": replace(PRETRAIN, **FEW_STEPS),
         "width": replace(WIDTH, **FEW_STEPS)}

OUT = RESULTS_DIR / "loraplus_sweep.json"
CACHE = Path(tempfile.gettempdir()) / "lora_edu_loraplus_width"  # the pretrained bases, for a resumed run


def make_optimizer(model: torch.nn.Module, lr_a: float, lr_b: float) -> torch.optim.Optimizer:
    if lr_b >= lr_a:
        return create_loraplus_optimizer(model, torch.optim.AdamW, lr=lr_a, ratio=lr_b / lr_a)
    layers = lora_layers(model).values()  # below the diagonal, which LoRA+ (ratio >= 1) refuses
    return torch.optim.AdamW([
        {"params": [layer.lora_A.weight for layer in layers], "lr": lr_a, "weight_decay": 0.0},
        {"params": [layer.lora_B.weight for layer in layers], "lr": lr_b, "weight_decay": 0.0},
    ])


def lora_run(base: dict, config: GPT2Config | None, lr_a: float, lr_b: float, seed: int, run_config: TrainConfig,
             data: dict) -> float:
    """LoRA from the base weights at (lr_a, lr_b); the final loss on the whole held-out split."""
    seed_everything(seed)
    model = load_tiny() if config is None else GPT2(config)
    if config is not None:
        model.load_state_dict(base)
    model = add_lora(model, "all-linear", r=RANK, alpha=ALPHA)
    run_config = replace(run_config, lr=lr_a, seed=seed)
    short_val = data["val"][: run_config.block_size + 1]  # train()'s own evaluations: keep them cheap
    train(model, data["train"], short_val, run_config, make_optimizer(model, lr_a, lr_b), progress=False)
    return evaluate(model, data["val"], run_config.block_size, max_batches=EVAL_BATCHES)


def width_base(width: int, pretrain: TrainConfig) -> tuple[GPT2Config, dict]:
    """A small GPT-2 of this width, pretrained briefly on Shakespeare (cached on disk)."""
    config = GPT2Config(block_size=pretrain.block_size, n_layer=2, n_head=4, n_embd=width)
    path = CACHE / f"base_{width}_{pretrain.steps}_steps.pt"
    if path.exists():
        return config, torch.load(path)
    seed_everything(0)
    model = GPT2(config)
    history = train(model, load_split("shakespeare", "train"), load_split("shakespeare", "val"), pretrain,
                    progress=False)
    print(f"width {width}: pretrained, Shakespeare val loss {history.final_val_loss:.3f}", flush=True)
    CACHE.mkdir(exist_ok=True)
    torch.save(model.state_dict(), path)
    return config, model.state_dict()


def mean(values: list[float]) -> float:
    """The mean; a diverged run (a non-finite loss) makes its cell infinitely bad."""
    if not all(v == v and abs(v) != float("inf") for v in values):
        return float("inf")
    return sum(values) / len(values)


def stderr(values: list[float]) -> float | None:
    n = len(values)
    if n < 2:
        return None
    m = mean(values)
    return (sum((v - m) ** 2 for v in values) / (n - 1) / n) ** 0.5


def cells(runs: list[dict], *keys: str) -> dict[tuple, list[float]]:
    out: dict[tuple, list[float]] = {}
    for run in runs:
        out.setdefault(tuple(run[k] for k in keys), []).append(run["loss"])
    return out


def grow(span: dict[str, list[int]], best: tuple[float, float]) -> bool:
    """Widen ``span`` by a row or a column of ``LADDER`` where ``best`` lies on its edge; whether it did."""
    grown = False
    for key, value in zip(("lr_a", "lr_b"), best):
        lo, hi = span[key]
        if LADDER.index(value) == lo and lo > 0:
            span[key][0] -= 1
            grown = True
        elif LADDER.index(value) == hi - 1 and hi < len(LADDER):
            span[key][1] += 1
            grown = True
    return grown


def summarize(runs: dict) -> dict:
    summary: dict = {}
    grid = runs["grid"]
    if grid:
        table = cells(grid, "lr_a", "lr_b")
        (lr_a, lr_b), losses = min(table.items(), key=lambda kv: mean(kv[1]))
        diagonal = {k: v for k, v in table.items() if k[0] == k[1]}
        (lr_d, _), d_losses = min(diagonal.items(), key=lambda kv: mean(kv[1]))
        summary["grid"] = {
            "best": {"lr_a": lr_a, "lr_b": lr_b, "mean": mean(losses), "stderr": stderr(losses), "n": len(losses)},
            "best_shared": {"lr": lr_d, "mean": mean(d_losses), "stderr": stderr(d_losses), "n": len(d_losses)},
        }
    widths = {}
    for width in sorted({r["width"] for r in runs["width"]}):
        table = cells([r for r in runs["width"] if r["width"] == width], "ratio")
        by_ratio = {str(k[0]): {"mean": mean(v), "stderr": stderr(v), "n": len(v)} for k, v in sorted(table.items())}
        best = min(by_ratio, key=lambda k: by_ratio[k]["mean"])
        widths[str(width)] = {"best_ratio": float(best), "by_ratio": by_ratio}
    summary["width"] = widths
    return summary


def main(argv: list[str] | None = None) -> dict:
    """Resumable: the record is written after every run, and runs already in it are kept."""
    parser = benchmark_arguments(__doc__, "a 2 x 2 grid, two seeds, one width, 5 steps a run: a smoke test")
    args = parser.parse_args(argv)
    out = out_path(args, OUT)
    plan = QUICK if args.quick else FULL
    torch.set_num_threads(1)
    earlier = json.loads(out.read_text()) if out is not None and out.exists() else {}
    if earlier.get("results", {}).keys() != {"grid", "width"}:  # none yet, or an older layout: start afresh
        earlier = {"results": {"grid": [], "width": []}}
    runs = earlier["results"]
    start = time.time() - earlier.get("wall_seconds", 0)  # the record's seconds count every resumed run
    config = {
        "rank": RANK, "alpha": ALPHA, "seeds": plan["seeds"], "ladder": LADDER,
        "grid": asdict(plan["grid"]),
        "eval_batches": EVAL_BATCHES,
        "width": {"widths": plan["widths"], "lr_b": WIDTH_LR_B, "ratios": plan["ratios"], "n_layer": 2, "n_head": 4,
                  "pretrain": asdict(plan["pretrain"]), "lora": asdict(plan["width"])},
        "quick": args.quick,
    }

    def save_record(complete: bool = False) -> dict:
        record = run_record("loraplus_sweep", config, runs, device="cpu", start=start, complete=complete,
                            summary=summarize(runs))
        save(record, out)
        return record

    milton = {"train": load_split("milton", "train"), "val": load_split("milton", "val")}
    grid_runs, width_runs = runs["grid"], runs["width"]
    seeds = plan["seeds"]
    span = {"lr_a": list(plan["grid_start"]), "lr_b": list(plan["grid_start"])}  # [lo, hi) indices into LADDER
    for key in span:  # resume with the grid as it had grown
        if grid_runs:
            span[key] = [min(LADDER.index(r[key]) for r in grid_runs), max(LADDER.index(r[key]) for r in grid_runs) + 1]

    def run_grid(lr_a: float, lr_b: float, seed: int) -> None:
        t = time.time()
        loss = lora_run({}, None, lr_a, lr_b, seed, plan["grid"], milton)
        grid_runs.append({"lr_a": lr_a, "lr_b": lr_b, "seed": seed, "loss": loss, "seconds": round(time.time() - t, 1)})
        save_record()
        print(f"grid seed {seed} lr_a {lr_a:g} lr_b {lr_b:g}: {loss:.4f} ({time.time() - t:.0f} s)", flush=True)

    def best_cell() -> tuple[float, float]:
        table = cells(grid_runs, "lr_a", "lr_b")
        return min(table, key=lambda k: mean(table[k]))

    while True:  # seed 0 over the whole grid, grown (not with --quick) until its best cell is inside
        have = {(r["lr_a"], r["lr_b"], r["seed"]) for r in grid_runs}
        for lr_a in LADDER[slice(*span["lr_a"])]:
            for lr_b in LADDER[slice(*span["lr_b"])]:
                if (lr_a, lr_b, seeds[0]) not in have:
                    run_grid(lr_a, lr_b, seeds[0])
        if not plan["grow"] or not grow(span, best_cell()):
            break
    while True:  # the other seeds on the best cell, its four neighbours and the best shared rate, until it settles
        best = best_cell()
        table = cells(grid_runs, "lr_a", "lr_b")
        shared = min((k for k in table if k[0] == k[1]), key=lambda k: mean(table[k]))
        block = [best, shared]
        for axis in (0, 1):
            for step in (-1, 1):
                i = LADDER.index(best[axis]) + step
                key = ("lr_a", "lr_b")[axis]
                if span[key][0] <= i < span[key][1]:
                    block.append(tuple(LADDER[i] if k == axis else best[k] for k in (0, 1)))
        have = {(r["lr_a"], r["lr_b"], r["seed"]) for r in grid_runs}
        missing = [(a, b, s) for s in seeds[1:] for a, b in block if (a, b, s) not in have]
        if not missing:
            break
        run_grid(*missing[0])

    for seed in seeds:
        for width in plan["widths"]:
            architecture, base = width_base(width, plan["pretrain"])
            have = {(r["width"], r["ratio"], r["seed"]) for r in width_runs}
            for ratio in plan["ratios"]:
                if (width, ratio, seed) in have:
                    continue
                t = time.time()
                lr_a = WIDTH_LR_B / ratio
                loss = lora_run(base, architecture, lr_a, WIDTH_LR_B, seed, plan["width"], milton)
                width_runs.append({"width": width, "lr_a": lr_a, "lr_b": WIDTH_LR_B, "ratio": ratio, "seed": seed,
                                   "loss": loss, "seconds": round(time.time() - t, 1)})
                save_record()
                print(f"width {width} seed {seed} ratio {ratio}: {loss:.4f} ({time.time() - t:.0f} s)", flush=True)
    return save_record(complete=True)


if __name__ == "__main__":
    main()
