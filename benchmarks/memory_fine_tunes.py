"""Chapter 9's fine-tunes: MEFT against LoRA and serial adapters, and LongLoRA's recipe at 4x context.

Two parts, both on Chapter 2's task (the tiny GPT-2, pretrained on Shakespeare, fine-tuned
on Milton for 200 steps with lora_edu.train.MILTON_FINE_TUNE's schedule), three seeds:

- ``meft``: LoRA (rank 8 on every block matrix, 65,536 trained numbers), serial adapters
  (Houlsby's placement, bottleneck 32) and the three MEFT variants (two adapters a layer,
  bottleneck 32: 66,816 numbers each, as many as the serial adapters). Each method's
  learning rate is chosen on a grid with seed 0, grown by factors of 3 until its best rate
  lies inside; seeds 1 and 2 then repeat the best rate (and any rate within 0.002 of it). Recorded: held-out Milton loss, held-out Shakespeare
  loss (forgetting), and for MEFT the held-out loss before training (its starting point).
- ``long_context``: the model's 128 learned positions interpolated to 512
  (lora_edu.long_context.interpolate_positions), then fine-tuned on Milton windows of
  512 bytes (batch 4, as many bytes a step as Chapter 2's 16 x 128) by LoRA, by LoRA with
  trainable embeddings and norms (LongLoRA's "LoRA+"), and by full fine-tuning, each
  with S²-Attn (groups of 128, half the heads shifted) and with full attention, and LoRA
  also with the authors' rolled shift; every model evaluated with full attention on
  held-out Milton at 512. LoRA at Chapter 8's best rate (3e-3; with trainable
  embeddings and norms tuned on seed 0 over 3e-4, 1e-3, 3e-3), full fine-tuning at
  Chapter 2's (3e-4).

Resumable: the record is written after every run, and runs already in it are skipped.

    python benchmarks/memory_fine_tunes.py          # writes lora_edu/results/memory_fine_tunes.json (about 40 minutes on 2 cores)
    python benchmarks/memory_fine_tunes.py --quick  # 5 steps, one seed: a smoke test; writes nothing
"""

from __future__ import annotations

import json
import time
from dataclasses import replace

from tqdm import tqdm

from lora_edu.data import load_split
from lora_edu.gpt2 import load_tiny
from lora_edu.long_context import interpolate_positions, unfreeze_embeddings_and_norms, use_s2_attention
from lora_edu.lora import add_lora, count_parameters
from lora_edu.peft_family import add_serial_adapters
from lora_edu.results import RESULTS_DIR, benchmark_arguments, out_path, run_record, save
from lora_edu.reversible import add_meft
from lora_edu.train import MILTON_FINE_TUNE, evaluate, seed_everything, train

OUT = RESULTS_DIR / "memory_fine_tunes.json"
SEEDS = (0, 1, 2)
RANK, BOTTLENECK = 8, 32
NEAR = 0.002  # a rate within this of the best on seed 0 is repeated too (a near tie)
MEFT_GRIDS = {"lora": [1e-3, 3e-3, 1e-2], "adapters": [1e-3, 3e-3, 1e-2],
              "meft1": [1e-3, 3e-3, 1e-2], "meft2": [1e-3, 3e-3, 1e-2], "meft3": [1e-3, 3e-3, 1e-2]}
FACTOR, GROUP = 4, 128  # 128 positions stretched to 512; S²-Attn groups of a quarter of that
LONG = {"lora": 3e-3, "full": 3e-4}  # learning rates (LoRA with embeddings and norms: tuned, see the docstring)
LONG_EMBED_NORM_GRID = [3e-4, 1e-3, 3e-3]
ATTENTIONS = ("s2", "full")


def meft_model(method: str, seed: int):
    seed_everything(seed)
    model = load_tiny()
    if method == "lora":
        add_lora(model, "all-linear", r=RANK, alpha=2 * RANK)
    elif method == "adapters":
        add_serial_adapters(model, BOTTLENECK)
    else:
        model = add_meft(model, method, bottleneck=BOTTLENECK, seed=seed)
    return model


def long_model(method: str, attention: str, seed: int):
    seed_everything(seed)
    model = interpolate_positions(load_tiny(), FACTOR)
    if attention != "full":
        use_s2_attention(model, GROUP, wrap=attention == "s2_rolled")
    if method == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        return model
    add_lora(model, "all-linear", r=RANK, alpha=2 * RANK)
    if method == "lora_embed_norm":
        unfreeze_embeddings_and_norms(model)
    return model


def fine_tune(model, config, data, block_size: int) -> dict:
    train(model, data["milton_train"], data["milton_val"], config, progress=False)
    return {"milton_val_loss": evaluate(model, data["milton_val"], block_size),
            "shakespeare_val_loss": evaluate(model, data["shakespeare_val"], block_size),
            "trainable_parameters": count_parameters(model)[0]}


def main(argv: list[str] | None = None) -> dict:
    args = benchmark_arguments(__doc__, "5 steps, one rate and one seed per run").parse_args(argv)
    out = out_path(args, OUT)
    start = time.time()
    data = {"milton_train": load_split("milton", "train"), "milton_val": load_split("milton", "val"),
            "shakespeare_val": load_split("shakespeare", "val")}
    steps = 5 if args.quick else MILTON_FINE_TUNE.steps
    seeds = SEEDS[:1] if args.quick else SEEDS
    previous = None if args.quick or out is None or not out.is_file() else json.loads(out.read_text())
    runs = [] if previous is None else previous["results"]
    start -= 0 if previous is None else previous.get("wall_seconds", 0)  # a resumed run adds to the time
    done = {(r["part"], r["method"], r.get("attention"), r["lr"], r["seed"]) for r in runs}
    base = load_tiny()
    long_base = interpolate_positions(load_tiny(), FACTOR)
    reference = {"milton_val_loss": evaluate(base, data["milton_val"], MILTON_FINE_TUNE.block_size),
                 "milton_val_loss_at_512_interpolated": evaluate(long_base, data["milton_val"], 128 * FACTOR),
                 "shakespeare_val_loss": evaluate(base, data["shakespeare_val"], MILTON_FINE_TUNE.block_size)}
    config = {"steps": steps, "seeds": list(seeds), "rank": RANK, "bottleneck": BOTTLENECK, "near": NEAR,
              "meft_grids": MEFT_GRIDS, "factor": FACTOR, "group_size": GROUP, "long_lrs": LONG,
              "long_embed_norm_grid": LONG_EMBED_NORM_GRID, "quick": args.quick,
              "schedule": "MILTON_FINE_TUNE (warm-up 20, cosine to 0.1x, no weight decay)"}
    bar = tqdm(desc="runs", unit="run")

    def record(complete: bool = False) -> dict:
        return run_record("memory_fine_tunes", config, runs, device="cpu", start=start, base_model=reference,
                          complete=complete)

    def measure(part: str, method: str, lr: float, seed: int, attention: str | None = None) -> None:
        if (part, method, attention, lr, seed) in done:
            return
        began = time.time()
        if part == "meft":
            model = meft_model(method, seed)
            block = MILTON_FINE_TUNE.block_size
            run_config = replace(MILTON_FINE_TUNE, lr=lr, seed=seed, steps=steps)
            row = {"part": part, "method": method, "lr": lr, "seed": seed}
            if method.startswith("meft"):
                row["milton_val_loss_before"] = evaluate(model, data["milton_val"], block)
        else:
            model = long_model(method, attention, seed)
            block = 128 * FACTOR
            run_config = replace(MILTON_FINE_TUNE, lr=lr, seed=seed, steps=steps, block_size=block, batch_size=4)
            row = {"part": part, "method": method, "attention": attention, "lr": lr, "seed": seed}
        row.update(fine_tune(model, run_config, data, block))
        row["seconds"] = time.time() - began
        runs.append(row)
        done.add((part, method, attention, lr, seed))
        bar.update()
        print(f"{part:12s} {method:16s} {attention or '':9s} lr {lr:<7g} seed {seed}: "
              f"Milton {row['milton_val_loss']:.4f}, {row['trainable_parameters']:,} trained, "
              f"{row['seconds']:.0f} s", flush=True)
        save(record(), out)

    def seed0(part: str, method: str, attention: str | None = None) -> dict:
        return {r["lr"]: r["milton_val_loss"] for r in runs if (r["part"], r["method"], r.get("attention"),
                                                                  r["seed"]) == (part, method, attention, seeds[0])}

    def tune(part: str, method: str, grid: list[float], attention: str | None = None) -> list[float]:
        """The grid on seed 0, grown by factors of 3 until its best rate lies inside; the rates near the best."""
        grid = list(grid[:1] if args.quick else grid)
        while True:
            for lr in grid:
                measure(part, method, lr, seeds[0], attention)
            tried = seed0(part, method, attention)
            best = min(grid, key=tried.get)
            if args.quick or len(grid) >= 7 or grid[0] < best < grid[-1]:
                break
            if best == grid[0]:
                grid.insert(0, float(f"{grid[0] / 3:.1g}"))
            else:
                grid.append(float(f"{grid[-1] * 3:.1g}"))
        return [lr for lr in grid if tried[lr] <= tried[best] + NEAR]

    for method, grid in MEFT_GRIDS.items():
        for lr in tune("meft", method, grid):
            for seed in seeds[1:]:
                measure("meft", method, lr, seed)
    long_lrs = dict(LONG)
    near_best = tune("long_context", "lora_embed_norm", LONG_EMBED_NORM_GRID, "s2")
    long_lrs["lora_embed_norm"] = min(near_best, key=seed0("long_context", "lora_embed_norm", "s2").get)
    config["long_lrs"] = long_lrs
    for method, lr in long_lrs.items():
        for attention in ATTENTIONS:
            for seed in seeds:
                measure("long_context", method, lr, seed, attention)
    for seed in seeds:
        measure("long_context", "lora", long_lrs["lora"], seed, "s2_rolled")
    bar.close()
    final = record(complete=True)
    save(final, out)
    return final


if __name__ == "__main__":
    main()
