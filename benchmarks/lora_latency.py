"""Inference latency of one forward pass: base model, LoRA merged and unmerged, serial adapters.

The LoRA paper's Table 1 setting: GPT-2 medium (355M), one forward pass at batch size
32, 16 and 1 with sequence lengths 512, 256 and 128; LoRA r = 4 on the attention input
projection (GPT-2's fused ``c_attn``: q, k and v share one update), merged and
unmerged; and serial bottleneck adapters with about 0.5M parameters, one per block after
the MLP (Adapter^L) or two, after attention and MLP (Adapter^H). Random weights: speed
does not depend on what they hold. Each latency is the median over interleaved rounds, so
drift on the machine hits every model alike; ratios are to the base model in the same run.

    python benchmarks/lora_latency.py          # GPU: the Table 1 setting, writes results/lora_latency.json
    python benchmarks/lora_latency.py          # CPU: 124M shape, batch 1, writes results/lora_latency_cpu.json
    python benchmarks/lora_latency.py --quick  # the tiny model, a smoke test; writes nothing unless --out
"""

from __future__ import annotations

import copy
import time

import torch

from lora_edu.gpt2 import GPT2, GPT2Config
from lora_edu.lora import add_lora, count_parameters, merge_lora
from lora_edu.peft_family import adapter_parameters, add_serial_adapters
from lora_edu.results import RESULTS_DIR, benchmark_arguments, interleaved_medians, out_path, run_record, save

OUT = {"cuda": RESULTS_DIR / "lora_latency.json", "cpu": RESULTS_DIR / "lora_latency_cpu.json"}
GPU = {"preset": "gpt2-medium", "settings": [(32, 512), (16, 256), (1, 128)], "rounds": 5, "repeats": 20,
       "lora_r": 4, "bottleneck": {"adapter_l": 10, "adapter_h": 5}}
CPU = {"preset": "gpt2", "settings": [(1, 128)], "rounds": 5, "repeats": 5,
       "lora_r": 4, "bottleneck": {"adapter_l": 13, "adapter_h": 7}}
QUICK = {"preset": "tiny", "settings": [(1, 32), (4, 64)], "rounds": 2, "repeats": 3,
         "lora_r": 4, "bottleneck": {"adapter_l": 8, "adapter_h": 4}}
METHODS = ("base", "lora_merged", "lora_unmerged", "adapter_l", "adapter_h")


def build_models(plan: dict, device: str, dtype: torch.dtype) -> dict[str, torch.nn.Module]:
    """The five models, from one base model, in eval mode on ``device``."""
    torch.manual_seed(0)
    with torch.device(device):
        base = GPT2(GPT2Config.from_preset(plan["preset"])).to(dtype).eval()
    lora = add_lora(copy.deepcopy(base), ["attn.c_attn"], r=plan["lora_r"], alpha=plan["lora_r"])
    for name, p in lora.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.02)  # as if trained, so merging changes the weights
    models = {"base": base, "lora_merged": merge_lora(copy.deepcopy(lora)), "lora_unmerged": lora}
    models["adapter_l"] = add_serial_adapters(copy.deepcopy(base), plan["bottleneck"]["adapter_l"], ("mlp",))
    models["adapter_h"] = add_serial_adapters(copy.deepcopy(base), plan["bottleneck"]["adapter_h"], ("attn", "mlp"))
    return {name: model.eval() for name, model in models.items()}


def trainable_parameters(name: str, model: torch.nn.Module) -> int:
    if name.startswith("adapter"):
        return adapter_parameters(model)
    if name == "lora_unmerged":
        return count_parameters(model)[0]
    return 0


def main(argv: list[str] | None = None) -> dict:
    parser = benchmark_arguments(__doc__, "the tiny model, a few repeats: a smoke test")
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    plan = QUICK if args.quick else GPU if device == "cuda" else CPU
    dtype = torch.float16 if device == "cuda" else torch.float32  # the paper's GPT-2 runs in fp16
    out = out_path(args, OUT[device])
    start = time.time()
    models = build_models(plan, device, dtype)
    vocab = models["base"].config.vocab_size
    rows = []
    for batch_size, seq_len in plan["settings"]:
        tokens = torch.randint(0, vocab, (batch_size, seq_len), generator=torch.Generator().manual_seed(0)).to(device)
        forward = {name: (lambda model=model: model(tokens)) for name, model in models.items()}
        with torch.inference_mode():  # each turn after an untimed pass: the model before it filled the caches
            latency = interleaved_medians(forward, rounds=plan["rounds"], repeats=plan["repeats"], device=device,
                                          warm_each_turn=True)
        for name in METHODS:
            rows.append({
                "batch_size": batch_size, "seq_len": seq_len, "method": name,
                "trainable_parameters": trainable_parameters(name, models[name]),
                "median_seconds": latency[name], "ratio_to_base": latency[name] / latency["base"],
            })
            print(f"{device} batch {batch_size:2d} x {seq_len:3d}  {name:14s} {latency[name] * 1e3:8.2f} ms  "
                  f"{latency[name] / latency['base']:.3f} x base", flush=True)
    config = {**plan, "quick": args.quick, "dtype": str(dtype).removeprefix("torch."),
              "statistic": "median seconds per forward pass over interleaved rounds, torch.inference_mode"}
    record = run_record("lora_latency", config, rows, device=device, start=start)
    save(record, out)
    return record


if __name__ == "__main__":
    main()
