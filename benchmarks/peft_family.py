"""The PEFT family on one task: every method's held-out loss, forgetting and cost, each at its best learning rate.

Chapter 2's domain adaptation (the tiny GPT-2, pretrained on Shakespeare, fine-tuned on
Milton for 200 steps with lora_edu.train.MILTON_FINE_TUNE), with windows of 112 tokens
so that prompt tuning's 16 virtual tokens fit the model's 128 positions, for every
method: full fine-tuning, LoRA and DoRA (rank 8 on all block matrices), BitFit, (IA)³,
prompt tuning (16 virtual tokens), prefix tuning (8 keys and values per layer), serial
adapters (Houlsby's placement, bottleneck 8), VeRA (rank 256, every block matrix) and AdaMix
(8 copies of LoRA's A at rank 8 beside one shared B, the consistency loss weighted 100, as
microsoft/AdaMix's GPT-2 scripts run it; also tuned without the consistency loss, and every
AdaMix run evaluated on Milton through single random routes as well as merged).
Each method's learning rate is chosen on a grid with seed 0; seeds 1 and 2 then repeat
the best rate, and any rate within 0.002 of it on seed 0 (a near tie). Recorded per
run: held-out Milton loss, held-out Shakespeare loss (forgetting), trainable parameters;
per method: whether it merges, how many context positions it uses, and its forward
pass's time, unmerged and (where it can) merged, beside the base model's; and the time of a
training step of LoRA and of AdaMix with and without its second pass. A resumed record keeps
its timings and times only the methods added since, each beside the base model again.

Then full fine-tuning, LoRA and DoRA at smaller rates than their grids' (seed 0, PARETO_EXTRA),
for the chapter's view of learning against forgetting over every rate.

Then LoRA's hyperparameters, one at a time, from the family's LoRA at a fixed rate
(``STUDY_LR``), three seeds each: the scale alpha/r against rsLoRA's alpha/sqrt(r) as r
grows with alpha fixed; attention-only against MLP-only against every block matrix at
(about) equal trainable parameters; dropout. Then the rank study again with the rate
re-tuned for each rank and scale: a grid around STUDY_LR on seed 0 (``RANK_GRID``, grown
by factors of 3 until its best rate lies inside), then seeds 1 and 2 at the best rate and
at any rate within 0.002 of it on seed 0.

Resumable: the record is written after every run, and runs already in it are skipped (and
a resumed run keeps the record's forward-pass timings rather than measuring them again).

    python benchmarks/peft_family.py          # writes lora_edu/results/peft_family.json (about 70 minutes on 2 cores)
    python benchmarks/peft_family.py --quick  # 10 steps, one rate and seed per method: a smoke test; writes nothing
"""

from __future__ import annotations

import copy
import json
import time
from dataclasses import replace

import torch
from tqdm import tqdm

from lora_edu.data import load_split
from lora_edu.gpt2 import load_tiny
from lora_edu.lora import add_lora, count_parameters, lora_layers, merge_lora
from lora_edu.peft_family import (PromptTuned, add_adamix, add_bitfit, add_ia3, add_prefix_tuning,
                                  add_serial_adapters, add_vera, merge_adamix, merge_peft)
from lora_edu.results import RESULTS_DIR, benchmark_arguments, interleaved_medians, out_path, run_record, save
from lora_edu.train import MILTON_FINE_TUNE, evaluate, make_adamw, seed_everything, train, training_loss

OUT = RESULTS_DIR / "peft_family.json"
BLOCK_SIZE, N_VIRTUAL, N_PREFIX, RANK, BOTTLENECK, VERA_RANK = 112, 16, 8, 8, 8, 256
SEEDS = (0, 1, 2)
# AdaMix's LoRA variant as microsoft/AdaMix's NLG scripts run it: 8 copies of A, B shared, the
# consistency loss weighted 100 (its GLUE code weights it 1). At rank 8 it trains
# 66,560 numbers per block, within 2% of LoRA at rank 32 (65,536), which the rank study tunes.
ADAMIX_COPIES, ADAMIX_CONSISTENCY = 8, 100.0


def build_adamix(model):
    # the copies' start and every route from the run's seed (seed_everything has just set it)
    return add_adamix(model, r=RANK, alpha=2 * RANK, copies=ADAMIX_COPIES, seed=torch.initial_seed())


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
    "vera": (lambda m: add_vera(m, r=VERA_RANK), [3e-3, 1e-2, 3e-2], True, 0),
    "adamix": (build_adamix, [1e-3, 3e-3, 1e-2], True, 0),
}
# what a method changes in the training recipe (MILTON_FINE_TUNE's fields)
TRAINING = {"adamix": {"consistency_weight": ADAMIX_CONSISTENCY}}
# AdaMix without its consistency loss (one pass per step), tuned on its own grid. Every AdaMix run
# is also evaluated on Milton through single routes (ROUTE_SEEDS: one random copy per layer each).
ADAMIX_VARIANTS = {"no_consistency": {"consistency_weight": 0.0}}
ROUTE_SEEDS = (0, 1, 2, 3)
# LoRA's hyperparameters: add_lora's arguments per variant, each trained at STUDY_LR with every seed.
# "r8" is the family's LoRA; the targets variants match its 16,384 parameters per block within 2%
# (attention: 21 x (128 + 384 + 128 + 128) = 16,128; MLP: 13 x (128 + 512 + 512 + 128) = 16,640).
STUDY_LR = 1e-2
NEAR = 0.002  # nats: rates this close to the best on seed 0 are repeated with every seed too
ATTENTION, MLP = ["attn.c_attn", "attn.c_proj"], ["mlp.c_fc", "mlp.c_proj"]
VARIANTS = {
    "r8": dict(targets="all-linear", r=8, alpha=16),
    # alpha/r with alpha 16 against rsLoRA's alpha/sqrt(r) with alpha 16/sqrt(8): both scale by 2 at r = 8,
    # where STUDY_LR is LoRA's best, and part as r grows (to 0.125 and 0.5 at r = 128).
    **{f"r{r}": dict(targets="all-linear", r=r, alpha=16) for r in (2, 32, 128)},
    **{f"r{r}_rslora": dict(targets="all-linear", r=r, alpha=16 / 8**0.5, use_rslora=True) for r in (2, 8, 32, 128)},
    "attention_r21": dict(targets=ATTENTION, r=21, alpha=42),
    "mlp_r13": dict(targets=MLP, r=13, alpha=26),
    "dropout0.05": dict(targets="all-linear", r=8, alpha=16, dropout=0.05),
    "dropout0.1": dict(targets="all-linear", r=8, alpha=16, dropout=0.1),
}
# Smaller rates for the learning-forgetting (Pareto) view, seed 0 only: does LoRA at smaller rates reach
# the frontier that full fine-tuning's small rates draw?
PARETO_EXTRA = {"full": [3e-5], "lora": [1e-4, 3e-4], "dora": [1e-4, 3e-4]}
# The rank study with the rate re-tuned per rank and scale: the grid each variant starts from on seed 0.
RANK_VARIANTS = [f"r{r}{scale}" for scale in ("", "_rslora") for r in (2, 8, 32, 128)]
RANK_GRID = [3e-3, 1e-2, 3e-2]
# where the two scales part most, the grid refined by half-steps (factors of sqrt(3)) around each best rate
RANK_REFINED = ["r128", "r128_rslora"]
LATENCY_SHAPE, LATENCY_REPEATS = (8, BLOCK_SIZE), 30


def run(method: str, lr: float, seed: int, steps: int, data: dict, variant: str | None = None) -> dict:
    if variant in ADAMIX_VARIANTS:
        build, training = build_adamix, ADAMIX_VARIANTS[variant]
    elif variant is not None:
        build, training = (lambda m: add_lora(m, **VARIANTS[variant])), {}
    else:
        build, training = METHODS[method][0], TRAINING.get(method, {})
    seed_everything(seed)
    model = build(load_tiny())
    config = replace(MILTON_FINE_TUNE, steps=steps, warmup_steps=max(1, steps // 10), lr=lr, seed=seed,
                     block_size=BLOCK_SIZE, eval_every=steps, **training)
    train(model, data["milton_train"], data["milton_val"], config, progress=False)
    result = {"method": method, **({"variant": variant} if variant else {}), "lr": lr, "seed": seed,
              "trainable_parameters": count_parameters(model)[0], **losses(model, data)}
    if method == "adamix":  # evaluated (in eval mode) through the average of the copies; here one copy each
        result["single_route"] = [{"route_seed": s, "milton_val_loss": evaluate(
            merge_adamix(copy.deepcopy(model), route_seed=s), data["milton_val"], BLOCK_SIZE)} for s in ROUTE_SEEDS]
    return result


def losses(model, data: dict) -> dict:
    return {"milton_val_loss": evaluate(model, data["milton_val"], BLOCK_SIZE),
            "shakespeare_val_loss": evaluate(model, data["shakespeare_val"], BLOCK_SIZE)}


def merged(model):
    """The plain model a method merges into, or None where it cannot merge."""
    try:
        return merge_lora(model) if lora_layers(model) else merge_peft(model)
    except TypeError:
        return None


def latency(repeats: int, methods: list[str] | None = None) -> dict:
    """Median seconds per forward pass of each method's model (untrained: the time does not
    depend on the values), unmerged and merged, beside the base model, in interleaved rounds.
    ``methods`` (default: all but full fine-tuning) chooses which are timed beside the base."""
    tokens = torch.randint(0, load_tiny().config.vocab_size, LATENCY_SHAPE, generator=torch.Generator().manual_seed(0))
    models = {"base": load_tiny()}
    for method in methods or [m for m in METHODS if m != "full"]:
        build = METHODS[method][0]
        seed_everything(0)
        models[method] = build(load_tiny())
        seed_everything(0)
        plain = merged(build(load_tiny()))
        if plain is not None:
            models[method + "_merged"] = plain
    calls = {}
    for name, model in models.items():
        model.eval()
        calls[name] = lambda model=model: model(tokens)
    with torch.inference_mode():
        seconds = interleaved_medians(calls, rounds=repeats)
    return {"batch_size": LATENCY_SHAPE[0], "seq_len": LATENCY_SHAPE[1], "repeats": repeats,
            "median_seconds": seconds, "over_base": {k: v / seconds["base"] for k, v in seconds.items()}}


def with_latency_of_new_methods(timing: dict, repeats: int) -> dict:
    """A resumed record's timings, plus those of methods added since, each timed beside the base
    model again (its ratio to that base is what compares across the two sessions)."""
    missing = [m for m in METHODS if m != "full" and m not in timing["over_base"]]
    if not missing:
        return timing
    added = latency(repeats, missing)
    timing = copy.deepcopy(timing)
    for name in added["over_base"]:
        if name != "base":
            timing["median_seconds"][name], timing["over_base"][name] = added["median_seconds"][name], added["over_base"][name]
    timing.setdefault("timed_apart", {})[", ".join(missing)] = {"base_median_seconds": added["median_seconds"]["base"],
                                                              "date": time.strftime("%Y-%m-%d")}
    return timing


def step_cost(repeats: int, data: dict) -> dict:
    """Median seconds per training step (forward, backward, AdamW) of LoRA r8 and of AdaMix with and
    without its consistency loss, in interleaved rounds, on the benchmark's batch."""
    generator = torch.Generator().manual_seed(0)
    windows = torch.randint(0, len(data["milton_train"]) - BLOCK_SIZE - 1, (MILTON_FINE_TUNE.batch_size,),
                            generator=generator)
    x = torch.stack([data["milton_train"][i: i + BLOCK_SIZE] for i in windows])
    y = torch.stack([data["milton_train"][i + 1: i + BLOCK_SIZE + 1] for i in windows])
    setups = {"lora": (METHODS["lora"][0], 0.0), "adamix": (build_adamix, ADAMIX_CONSISTENCY),
              "adamix_no_consistency": (build_adamix, 0.0)}
    calls = {}
    for name, (build, weight) in setups.items():
        seed_everything(0)
        model = build(load_tiny()).train()
        optimizer = make_adamw(model, lr=1e-3, weight_decay=0.0)

        def step(model=model, optimizer=optimizer, weight=weight):
            optimizer.zero_grad(set_to_none=True)
            training_loss(model, x, y, weight).backward()
            optimizer.step()

        calls[name] = step
    seconds = interleaved_medians(calls, rounds=repeats)
    return {"batch_size": MILTON_FINE_TUNE.batch_size, "seq_len": BLOCK_SIZE, "repeats": repeats,
            "median_seconds": seconds, "over_lora": {k: v / seconds["lora"] for k, v in seconds.items()},
            "date": time.strftime("%Y-%m-%d")}


def record_of(runs: list[dict], base: dict, start: float, quick: bool, timing: dict | None = None,
              steps: dict | None = None) -> dict:
    config = {"block_size": BLOCK_SIZE, "steps": MILTON_FINE_TUNE.steps, "n_virtual": N_VIRTUAL,
              "n_prefix": N_PREFIX, "rank": RANK, "bottleneck": BOTTLENECK, "vera_rank": VERA_RANK,
              "seeds": list(SEEDS), "quick": quick,
              "methods": {m: {"lr_grid": grid, "mergeable": merges, "context_positions_used": positions}
                          for m, (_, grid, merges, positions) in METHODS.items()},
              "study_lr": STUDY_LR, "variants": VARIANTS,
              "pareto_extra": PARETO_EXTRA,
              "rank_study": {"variants": RANK_VARIANTS, "lr_grid": RANK_GRID, "near": NEAR,
                             "refined": RANK_REFINED},
              "adamix": {"copies": ADAMIX_COPIES, "rank": RANK, "alpha": 2 * RANK, "share_b": True,
                         "consistency_weight": ADAMIX_CONSISTENCY, "variants": ADAMIX_VARIANTS,
                         "route_seeds": list(ROUTE_SEEDS)}}
    return run_record("peft_family", config, runs, device="cpu", start=start, base_model=base, latency=timing,
                      step_cost=steps)


def main(argv: list[str] | None = None) -> dict:
    args = benchmark_arguments(__doc__, "10 steps, one rate and one seed per method").parse_args(argv)
    out = out_path(args, OUT)
    start = time.time()
    data = {"milton_train": load_split("milton", "train"), "milton_val": load_split("milton", "val"),
            "shakespeare_val": load_split("shakespeare", "val")}
    pretrained = load_tiny()
    base = {"milton_val_loss": evaluate(pretrained, data["milton_val"], BLOCK_SIZE),
            "shakespeare_val_loss": evaluate(pretrained, data["shakespeare_val"], BLOCK_SIZE)}
    previous = None if args.quick or out is None or not out.is_file() else json.loads(out.read_text())
    runs = [] if previous is None else previous["results"]
    start -= 0 if previous is None else previous.get("wall_seconds", 0)  # a resumed run adds to the time
    done = {(r["method"], r.get("variant"), r["lr"], r["seed"]) for r in runs}
    steps = 10 if args.quick else MILTON_FINE_TUNE.steps
    repeats = 3 if args.quick else LATENCY_REPEATS
    timing = previous.get("latency") if previous else None
    timing = latency(repeats) if timing is None else with_latency_of_new_methods(timing, repeats)
    print("forward pass over the base model's: " + ", ".join(f"{k} {v:.2f}" for k, v in timing["over_base"].items()))
    steps_timed = (previous or {}).get("step_cost") or step_cost(repeats, data)
    print("training step over LoRA's: " + ", ".join(f"{k} {v:.2f}" for k, v in steps_timed["over_lora"].items()))

    def measure(method: str, lr: float, seed: int, variant: str | None = None) -> None:
        if (method, variant, lr, seed) in done:
            return
        began = time.time()
        runs.append(run(method, lr, seed, steps, data, variant))
        done.add((method, variant, lr, seed))
        r = runs[-1]
        print(f"{method:8s} {variant or '':14s} lr {lr:<7g} seed {seed}: Milton {r['milton_val_loss']:.4f}, "
              f"Shakespeare {r['shakespeare_val_loss']:.4f}, {r['trainable_parameters']:,} trained, "
              f"{time.time() - began:.0f} s", flush=True)
        save(record_of(runs, base, start, args.quick, timing, steps_timed), out)

    def seed0(method: str, variant: str | None) -> dict:
        return {r["lr"]: r["milton_val_loss"] for r in runs
                if r["method"] == method and r.get("variant") == variant and r["seed"] == SEEDS[0]}

    def repeat_near_best(method: str, variant: str | None, rates: list[float]) -> None:
        tried = seed0(method, variant)
        best = min(rates, key=tried.get)
        for lr in rates:  # the best rate, and any within NEAR of it on seed 0, with the other seeds
            if tried[lr] <= tried[best] + NEAR:
                for seed in SEEDS[1:]:
                    measure(method, lr, seed, variant)

    def tune(method: str, grid: list[float], variant: str | None = None) -> None:
        grid = list(grid)
        while True:  # the grid on seed 0, grown (by factors of 3) until its best rate lies inside it
            for lr in grid:
                measure(method, lr, SEEDS[0], variant)
            tried = seed0(method, variant)
            best = min(grid, key=tried.get)
            if best == grid[0] and len(grid) < 7:
                grid.insert(0, float(f"{grid[0] / 3:.1g}"))
            elif best == grid[-1] and len(grid) < 7:
                grid.append(float(f"{grid[-1] * 3:.1g}"))
            else:
                break
        repeat_near_best(method, variant, grid)

    for method, (_, grid, _, _) in METHODS.items():
        if args.quick:
            measure(method, grid[0], SEEDS[0])
            continue
        tune(method, grid)
    for variant in ADAMIX_VARIANTS:
        if args.quick:
            measure("adamix", METHODS["adamix"][1][0], SEEDS[0], variant)
            continue
        tune("adamix", METHODS["adamix"][1], variant)
    for method, rates in ({} if args.quick else PARETO_EXTRA).items():
        for lr in rates:
            measure(method, lr, SEEDS[0])
    for variant in VARIANTS:
        for seed in SEEDS[:1] if args.quick else SEEDS:
            measure("lora", STUDY_LR, seed, variant)
    if args.quick:  # one re-tuned rate of one rank, as a smoke test
        measure("lora", RANK_GRID[0], SEEDS[0], RANK_VARIANTS[0])
    else:
        for variant in tqdm(RANK_VARIANTS, desc="rank study, rate per rank"):
            tune("lora", RANK_GRID, variant)
        for variant in tqdm(RANK_REFINED, desc="rank study, half-steps"):
            tried = seed0("lora", variant)
            best = min(tried, key=tried.get)
            for lr in (best / 3**0.5, best * 3**0.5):
                measure("lora", float(f"{lr:.1g}"), SEEDS[0], variant)
            repeat_near_best("lora", variant, sorted(seed0("lora", variant)))
    record = record_of(runs, base, start, args.quick, timing, steps_timed)
    save(record, out)
    return record


if __name__ == "__main__":
    main()
