"""What DoRA costs over LoRA: training step time and memory, ours and PEFT's; inference once merged.

One GPT-2 shape (124M parameters; random weights, which cost what trained ones do),
adapters of rank 8 on every block matrix (c_attn, c_proj, c_fc, the MLP's c_proj). Four
trainable models are built from one base and timed in interleaved rounds, so drift on the
machine hits each alike:

- ``lora_lora_edu`` and ``dora_lora_edu``: our GPT2 with ``add_lora(..., use_dora=)``;
- ``lora_peft`` and ``dora_peft``: Hugging Face's ``GPT2LMHeadModel`` with PEFT's
  ``LoraConfig(use_dora=...)``.

A training step is forward, backward and an AdamW step. Per model: the median step time;
the bytes autograd saves for backward (``lora_edu.memory.saved_activation_bytes``, the
same on any device); on a GPU the peak memory of a step too. The ratios that matter are
DoRA over LoRA within one implementation, and ours over PEFT's for each method.

Then inference, our GPT2 only: one forward pass of the base model, of LoRA unmerged, of
DoRA unmerged and of DoRA merged (``merge_lora``), in eval mode: merged, DoRA should cost
nothing; unmerged, what DoRA costs beyond unmerged LoRA is its norm of W0 + sBA and the
rescaling (``lora_unmerged`` was added after the first GPU run, whose record lacks it).

    python benchmarks/dora_overhead.py          # CPU: batch 1 x 256, writes results/dora_overhead_cpu.json
    python benchmarks/dora_overhead.py          # GPU: batch 8 x 512, writes results/dora_overhead.json
    python benchmarks/dora_overhead.py --quick  # the tiny model, a smoke test; writes nothing unless --out
"""

from __future__ import annotations

import copy
import gc
import time

import torch
import torch.nn as nn

from lora_edu.gpt2 import GPT2, GPT2Config
from lora_edu.lora import add_lora, merge_lora
from lora_edu.memory import saved_activation_bytes
from lora_edu.results import RESULTS_DIR, benchmark_arguments, interleaved_medians, out_path, run_record, save

OUT = {"cuda": RESULTS_DIR / "dora_overhead.json", "cpu": RESULTS_DIR / "dora_overhead_cpu.json"}
TARGETS = ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"]
R, ALPHA, LR = 8, 16, 1e-4
GPU = {"preset": "gpt2", "batch_size": 8, "seq_len": 512, "rounds": 5, "steps": 5}
CPU = {"preset": "gpt2", "batch_size": 1, "seq_len": 256, "rounds": 5, "steps": 2}
QUICK = {"preset": "tiny", "batch_size": 2, "seq_len": 64, "rounds": 2, "steps": 2}
TRAINING = ("lora_lora_edu", "dora_lora_edu", "lora_peft", "dora_peft")
INFERENCE = ("base", "lora_unmerged", "dora_unmerged", "dora_merged")


def build_ours(base: GPT2, use_dora: bool) -> nn.Module:
    return add_lora(copy.deepcopy(base), TARGETS, r=R, alpha=ALPHA, use_dora=use_dora)


def build_peft(config: GPT2Config, device: str, use_dora: bool) -> nn.Module:
    import transformers
    from peft import LoraConfig, get_peft_model

    hf_config = transformers.GPT2Config(
        vocab_size=config.vocab_size, n_positions=config.block_size, n_layer=config.n_layer,
        n_head=config.n_head, n_embd=config.n_embd, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        bos_token_id=config.vocab_size - 1, eos_token_id=config.vocab_size - 1,  # in range for the tiny vocabulary
    )
    torch.manual_seed(0)
    with torch.device(device):
        model = transformers.GPT2LMHeadModel(hf_config)
    adapters = LoraConfig(r=R, lora_alpha=ALPHA, target_modules=["c_attn", "c_proj", "c_fc"],
                          fan_in_fan_out=True, use_dora=use_dora)
    return get_peft_model(model, adapters)


def loss_of(name: str, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    if name.endswith("peft"):
        return model(input_ids=x, labels=x).loss
    return model(x[:, :-1], x[:, 1:])[1]


def time_training(models: dict, batch: torch.Tensor, plan: dict) -> dict[str, dict]:
    """Median seconds per training step, interleaved rounds; the peak memory of a step on CUDA."""
    device = batch.device.type
    optimizers = {name: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=LR)
                  for name, m in models.items()}
    peaks = {}

    def step(name: str) -> None:
        loss = loss_of(name, models[name], batch)
        optimizers[name].zero_grad(set_to_none=True)
        loss.backward()
        optimizers[name].step()

    for name in models:  # warm up; on CUDA, measure the peak of one step beyond what the model holds
        models[name].train()
        step(name)
        if device == "cuda":
            torch.cuda.synchronize(), gc.collect(), torch.cuda.empty_cache(), torch.cuda.reset_peak_memory_stats()
            held = torch.cuda.memory_allocated()
            step(name)
            torch.cuda.synchronize()
            peaks[name] = torch.cuda.max_memory_allocated() - held
    steps = {name: (lambda name=name: step(name)) for name in models}
    seconds = interleaved_medians(steps, rounds=plan["rounds"], repeats=plan["steps"], device=device,
                                  warm_up=0)  # warmed up above
    return {name: {"median_seconds": seconds[name], **({"peak_step_bytes": peaks[name]} if peaks else {})}
            for name in models}


def time_inference(models: dict, tokens: torch.Tensor, plan: dict) -> dict[str, float]:
    """Median seconds per forward pass in eval mode, interleaved rounds."""
    for model in models.values():
        model.eval()
    forward = {name: (lambda model=model: model(tokens)) for name, model in models.items()}
    with torch.inference_mode():
        return interleaved_medians(forward, rounds=plan["rounds"], repeats=plan["steps"] * 2,
                                   device=tokens.device.type)


def main(argv: list[str] | None = None) -> dict:
    parser = benchmark_arguments(__doc__, "the tiny model, a few steps: a smoke test")
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    plan = QUICK if args.quick else GPU if device == "cuda" else CPU
    out = out_path(args, OUT[device])
    start = time.time()
    config = GPT2Config.from_preset(plan["preset"])
    torch.manual_seed(0)
    with torch.device(device):
        base = GPT2(config)
    for p in base.parameters():
        p.requires_grad_(False)
    seq = min(plan["seq_len"], config.block_size - 1)
    batch = torch.randint(0, config.vocab_size, (plan["batch_size"], seq + 1),
                          generator=torch.Generator().manual_seed(0)).to(device)

    models = {"lora_lora_edu": build_ours(base, False), "dora_lora_edu": build_ours(base, True),
              "lora_peft": build_peft(config, device, False), "dora_peft": build_peft(config, device, True)}
    training = time_training(models, batch, plan)
    rows = []
    for name in TRAINING:
        model = models[name]
        if name.endswith("peft"):
            saved = saved_activation_bytes(model, input_ids=batch, labels=batch)
        else:
            saved = saved_activation_bytes(model, batch[:, :-1], batch[:, 1:])
        rows.append({"part": "training", "method": name, **training[name], "saved_activation_bytes": saved,
                     "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad)})
    del models
    gc.collect()

    dora, lora = build_ours(base, True), build_ours(base, False)
    for model in (dora, lora):  # as if trained: merging changes weights, and B = 0 might be skipped
        for layer in (m for m in model.modules() if hasattr(m, "lora_B")):
            nn.init.normal_(layer.lora_B.weight, std=0.02)
    inference = time_inference({"base": base, "lora_unmerged": lora, "dora_unmerged": dora,
                                "dora_merged": merge_lora(copy.deepcopy(dora))}, batch[:, :-1], plan)
    rows += [{"part": "inference", "method": name, "median_seconds": inference[name]} for name in INFERENCE]

    training = {r["method"]: r for r in rows if r["part"] == "training"}

    def ratio(key: str, top: str, bottom: str) -> float:
        return training[top][key] / training[bottom][key]

    ratios = {
        "dora_over_lora_step_time_lora_edu": ratio("median_seconds", "dora_lora_edu", "lora_lora_edu"),
        "dora_over_lora_step_time_peft": ratio("median_seconds", "dora_peft", "lora_peft"),
        "ours_over_peft_step_time_lora": ratio("median_seconds", "lora_lora_edu", "lora_peft"),
        "ours_over_peft_step_time_dora": ratio("median_seconds", "dora_lora_edu", "dora_peft"),
        "dora_over_lora_saved_bytes_lora_edu": ratio("saved_activation_bytes", "dora_lora_edu", "lora_lora_edu"),
        "dora_over_lora_saved_bytes_peft": ratio("saved_activation_bytes", "dora_peft", "lora_peft"),
        "unmerged_over_base_inference": inference["dora_unmerged"] / inference["base"],
        "merged_over_base_inference": inference["dora_merged"] / inference["base"],
        "lora_unmerged_over_base_inference": inference["lora_unmerged"] / inference["base"],
        "dora_over_lora_unmerged_inference": inference["dora_unmerged"] / inference["lora_unmerged"],
    }
    for row in rows:
        extra = f"  saved {row['saved_activation_bytes'] / 2**20:7.1f} MiB" if "saved_activation_bytes" in row else ""
        print(f"{device} {row['part']:9s} {row['method']:14s} {row['median_seconds'] * 1e3:9.1f} ms{extra}")
    for key, value in ratios.items():
        print(f"{key:38s} {value:.3f}")
    config = {**plan, "quick": args.quick, "r": R, "alpha": ALPHA, "targets": TARGETS, "dtype": "float32",
              "statistic": "median seconds per training step (forward, backward, AdamW) or per forward "
                           "pass (inference_mode), over interleaved rounds"}
    record = run_record("dora_overhead", config, rows, device=device, start=start,
                        libraries=("peft", "transformers"), ratios=ratios)
    save(record, out)
    return record


if __name__ == "__main__":
    main()
