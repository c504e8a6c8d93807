"""Activation memory and what each remedy buys: checkpointing, offloading, reversible layers, S²-Attn.

Three parts, side by side in one run:

- ``counted`` (any device, seconds): what a float32 training step of the GPT-2 shapes
  (124M to 1.5B parameters, random weights on the ``meta`` device, which cost nothing)
  keeps for backward at 512 to 4096 tokens, batch 4: full fine-tuning and LoRA from
  ``lora_edu.memory.activation_bytes`` (the formula the tests check against autograd),
  checkpointing every block and every √L blocks both from the formula and measured on
  ``meta``, and MEFT measured on ``meta`` (it keeps no attention tensors, whose kernels
  differ there), at 4, 8 and 16 blocks as well to show it does not grow with depth.
- ``trained`` (a GPU; a small rehearsal on a CPU): QLoRA steps (NF4 base, bfloat16
  compute, paged AdamW over r=64 adapters) with each remedy: none, checkpointing every
  block, every √L blocks, saved tensors offloaded to host memory
  (``torch.autograd.graph.save_on_cpu``), checkpointing with the checkpoints offloaded
  (the approach of Unsloth's offloaded checkpointing), and MEFT1 on the same 4-bit base.
  Peak memory (``torch.cuda.max_memory_allocated``), tokens per second (median over the
  timed steps), the bytes saved for backward, the loss.
- ``attention``: S²-Attn (a quarter of the context a group) against full causal attention,
  forward and backward, at growing lengths: median seconds and their ratio.

    python benchmarks/activation_memory.py          # on a GPU: writes results/activation_memory.json
    python benchmarks/activation_memory.py          # on a CPU: writes results/activation_memory_cpu.json
    python benchmarks/activation_memory.py --quick  # small sizes, a smoke test; writes nothing
"""

from __future__ import annotations

import gc
import math
import time
from contextlib import nullcontext
from dataclasses import replace

import torch

from lora_edu.gpt2 import GPT2, GPT2Config
from lora_edu.long_context import shifted_sparse_attention
from lora_edu.lora import add_lora
from lora_edu.memory import activation_bytes, saved_activation_bytes
from lora_edu.qlora import QLORA_LORA, compute_dtype_for, make_optimizer, prepare_for_kbit_training, quantize_model
from lora_edu.results import RESULTS_DIR, benchmark_arguments, interleaved_medians, out_path, run_record, save
from lora_edu.reversible import add_meft

OUT = {"cuda": RESULTS_DIR / "activation_memory.json", "cpu": RESULTS_DIR / "activation_memory_cpu.json"}
PRESETS = ["gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl"]
TECHNIQUES = ("plain", "checkpoint", "checkpoint_sqrt", "offload", "checkpoint_offload", "meft1")
BATCH = 4
GPU = {"counted_lengths": [512, 1024, 2048, 4096], "trained": [("gpt2", 2048), ("gpt2-xl", 2048)],
       "attention_lengths": [512, 1024, 2048, 4096], "warmup_steps": 1, "timed_steps": 3}
CPU = {"counted_lengths": [512, 1024, 2048, 4096], "trained": [("tiny", 512)],
       "attention_lengths": [256, 512, 1024], "warmup_steps": 1, "timed_steps": 3}
QUICK = {"counted_lengths": [512], "trained": [("tiny", 128)], "attention_lengths": [128, 256],
         "warmup_steps": 1, "timed_steps": 1}
LR = 2e-4


def config_for(preset: str, length: int) -> GPT2Config:
    """The preset's shape, with room for ``length`` positions (a longer context is what Chapter 9 is about)."""
    config = GPT2Config.from_preset(preset)
    return replace(config, block_size=max(config.block_size, length))


def sqrt_schedule(n_layer: int) -> int:
    return max(1, round(math.sqrt(n_layer)))


def meta_model(config: GPT2Config, technique: str) -> torch.nn.Module:
    with torch.device("meta"):
        model = GPT2(config)
    if technique == "meft1":
        return add_meft(model, "meft1", bottleneck=QLORA_LORA["r"])
    add_lora(model, r=QLORA_LORA["r"], dropout=0.0)
    if technique == "checkpoint":
        model.gradient_checkpointing_enable()
    elif technique == "checkpoint_sqrt":
        model.gradient_checkpointing_enable(blocks_per_checkpoint=sqrt_schedule(config.n_layer))
    return model


def counted(lengths: list[int], presets: list[str]) -> list[dict]:
    rows = []
    for preset in presets:
        for length in lengths:
            config = config_for(preset, length)
            with torch.device("meta"):
                idx = torch.zeros(BATCH, length, dtype=torch.long)
            row = {"part": "counted", "preset": preset, "seq_len": length, "batch_size": BATCH,
                   "n_layer": config.n_layer, "bytes": {}}
            for method in ("full", "lora"):
                row["bytes"][method] = activation_bytes(config, BATCH, length, method, r=QLORA_LORA["r"])["total"]
            for technique, k in (("checkpoint", 1), ("checkpoint_sqrt", sqrt_schedule(config.n_layer))):
                formula = activation_bytes(config, BATCH, length, "lora", r=QLORA_LORA["r"], blocks_per_checkpoint=k)
                measured = saved_activation_bytes(meta_model(config, technique), idx, idx + 1)
                row["bytes"][technique] = measured
                row[f"{technique}_formula_equals_measured"] = measured == formula["total"]
            row["bytes"]["meft1"] = saved_activation_bytes(meta_model(config, "meft1"), idx, idx + 1)
            row["meft1_below_lora"] = 1 - row["bytes"]["meft1"] / row["bytes"]["lora"]
            rows.append(row)
            print(f"counted {preset:12s} {length:5d} tokens  LoRA {row['bytes']['lora'] / 2**30:7.2f} GiB  "
                  f"checkpointed {row['bytes']['checkpoint'] / 2**30:6.2f}  MEFT {row['bytes']['meft1'] / 2**30:6.2f}",
                  flush=True)
    return rows


def meft_depths(length: int) -> dict:
    """MEFT's saved bytes at GPT-2 124M's width with 4, 8 and 16 blocks: the same at every depth."""
    with torch.device("meta"):
        idx = torch.zeros(BATCH, length, dtype=torch.long)
    saved = {}
    for n_layer in (4, 8, 16):
        config = replace(config_for("gpt2", length), n_layer=n_layer)
        saved[str(n_layer)] = saved_activation_bytes(meta_model(config, "meft1"), idx, idx + 1)
    return {"part": "meft_depth", "preset": "gpt2", "seq_len": length, "batch_size": BATCH, "bytes": saved,
            "spread": max(saved.values()) / min(saved.values()) - 1}


def build(technique: str, config: GPT2Config, device: str, dtype: torch.dtype):
    """A QLoRA model of ``config``'s shape (random weights) set up for ``technique``, and its optimizer."""
    torch.manual_seed(0)
    with torch.device(device):
        model = GPT2(config)
    quantize_model(model, "lora_edu", compute_dtype=dtype)
    reentrant = technique == "checkpoint_offload"  # the reentrant variant saves its inputs through the offload hooks
    prepare_for_kbit_training(model, gradient_checkpointing=technique.startswith("checkpoint"), use_reentrant=reentrant)
    if technique == "checkpoint_sqrt":
        model.gradient_checkpointing_enable(blocks_per_checkpoint=sqrt_schedule(config.n_layer))
    if technique == "meft1":
        model = add_meft(model, "meft1", bottleneck=QLORA_LORA["r"])
    else:
        add_lora(model, "all-linear", **QLORA_LORA)
    return model, make_optimizer(model, LR)


def trained(preset: str, length: int, device: str, plan: dict) -> list[dict]:
    config = config_for(preset, length)
    dtype = compute_dtype_for(device)
    amp = dtype if dtype != torch.float32 else None
    generator = torch.Generator().manual_seed(0)
    steps = plan["warmup_steps"] + plan["timed_steps"]
    rows = []
    for technique in TECHNIQUES:
        row = {"part": "trained", "preset": preset, "technique": technique, "device": device, "seq_len": length,
               "batch_size": BATCH, "compute_dtype": str(dtype).removeprefix("torch.")}
        batches = [torch.randint(0, config.vocab_size, (BATCH, length + 1), generator=generator).to(device)
                   for _ in range(steps)]
        remaining, last = iter(batches), {}
        offload = technique in ("offload", "checkpoint_offload")
        try:
            model, optimizer = build(technique, config, device, dtype)
            model.train()
            if device == "cuda":
                gc.collect(), torch.cuda.empty_cache(), torch.cuda.reset_peak_memory_stats()

            def step() -> None:
                x = next(remaining)
                hooks = torch.autograd.graph.save_on_cpu(pin_memory=device == "cuda") if offload else nullcontext()
                with hooks, torch.autocast(device, dtype=amp, enabled=amp is not None):
                    _, loss = model(x[:, :-1], x[:, 1:])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                last["loss"] = loss.item()

            seconds = interleaved_medians({technique: step}, rounds=plan["timed_steps"], device=device,
                                          warm_up=plan["warmup_steps"])[technique]
            row["tokens_per_second"] = BATCH * length / seconds
            row["final_loss"] = last["loss"]
            if device == "cuda":
                row["peak_allocated_bytes"] = torch.cuda.max_memory_allocated()
            if not offload:  # offloaded tensors are saved on the host: what the device keeps is the point there
                x = batches[0]
                with torch.autocast(device, dtype=amp, enabled=amp is not None):
                    row["saved_activation_bytes"] = saved_activation_bytes(model, x[:, :-1], x[:, 1:])
            del model, optimizer
        except torch.cuda.OutOfMemoryError:
            row["out_of_memory"] = True
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()
        peak = row.get("peak_allocated_bytes")
        print(f"trained {device} {preset:8s} {length:5d} {technique:19s} "
              + ("out of memory" if row.get("out_of_memory") else
                 f"{row['tokens_per_second']:9.0f} tok/s  peak {peak / 2**30 if peak else float('nan'):6.2f} GiB"),
              flush=True)
        rows.append(row)
    return rows


def attention(lengths: list[int], device: str, plan: dict) -> list[dict]:
    """Forward and backward of causal attention over the whole context, and of S²-Attn with groups of a quarter."""
    dtype = compute_dtype_for(device)
    rows = []
    for length in lengths:
        generator = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(BATCH, 12, length, 64, generator=generator).to(device, dtype).requires_grad_()
                   for _ in range(3))
        grad = torch.randn(BATCH, 12, length, 64, generator=generator).to(device, dtype)
        group = length // 4

        def full() -> None:
            torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True).backward(grad)

        def s2(wrap: bool) -> None:
            shifted_sparse_attention(q, k, v, group, wrap=wrap).backward(grad)

        seconds = interleaved_medians({"full": full, "s2_attn": lambda: s2(False), "s2_attn_rolled": lambda: s2(True)},
                                      rounds=max(3, plan["timed_steps"]), device=device, warm_up=1)
        rows.append({"part": "attention", "device": device, "seq_len": length, "group_size": group,
                     "batch_size": BATCH, "heads": 12, "head_size": 64, "dtype": str(dtype).removeprefix("torch."),
                     "median_seconds": seconds, "s2_over_full": seconds["s2_attn"] / seconds["full"]})
        print(f"attention {device} {length:5d} tokens  S2-Attn / full {rows[-1]['s2_over_full']:.2f}", flush=True)
    return rows


def main(argv: list[str] | None = None) -> dict:
    parser = benchmark_arguments(__doc__, "small sizes, one timed step: a smoke test")
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    plan = QUICK if args.quick else GPU if device == "cuda" else CPU
    out = out_path(args, OUT[device])
    start = time.time()
    config = {**plan, "batch_size": BATCH, "lora": QLORA_LORA, "lr": LR, "quick": args.quick,
              "statistic": "median seconds per step over the timed steps",
              "peak_memory": "torch.cuda.max_memory_allocated after building the model, over all steps",
              "counted": "float32 bytes autograd keeps at the end of the forward pass, loss included"}
    rows: list[dict] = []

    def record() -> dict:
        return run_record("activation_memory", config, rows, device=device, start=start)

    presets = PRESETS[:1] if args.quick else PRESETS
    rows += counted(plan["counted_lengths"], presets)
    rows.append(meft_depths(plan["counted_lengths"][0]))
    save(record(), out)
    for preset, length in plan["trained"]:
        rows += trained(preset, length, device, plan)
        save(record(), out)  # after every part: a run cut short keeps what it measured
    rows += attention(plan["attention_lengths"], device, plan)
    save(record(), out)
    return record()


if __name__ == "__main__":
    main()
