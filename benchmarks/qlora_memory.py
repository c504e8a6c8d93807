"""Peak memory and training throughput: full fine-tuning, LoRA and QLoRA on GPT-2 shapes.

For each GPT-2 shape (124M, 355M, 774M, 1.5B parameters; random weights, which cost the
same memory and time as trained ones) and sequence length 512, one run trains a few
steps of each method and records what it cost:

- ``full``: every parameter trainable, float32 weights, bf16 autocast, AdamW.
- ``lora_bf16``: a bfloat16 base, float32 LoRA adapters (r=64, alpha=16, dropout 0.1)
  on every linear layer, AdamW.
- ``qlora_lora_edu``: lora_edu's QLoRA: NF4 + double quantization (``NF4Linear``),
  norms in float32, gradient checkpointing per block, the same adapters, paged AdamW.
- ``qlora_lora_edu_bnb``: the same, with bitsandbytes' ``Linear4bit`` as the 4-bit layer.
- ``qlora_peft``: the same recipe built the way most people build it: transformers'
  ``GPT2LMHeadModel`` loaded with ``BitsAndBytesConfig``, ``prepare_model_for_kbit_training``,
  PEFT's ``get_peft_model``, bitsandbytes' paged AdamW.

Measured per method: peak GPU memory during training (``torch.cuda.max_memory_allocated``,
after the model is built), training tokens per second (median over timed steps), and,
on every device, the bytes of the weights (parameters, buffers and bitsandbytes'
quantization state), of optimizer states, and of activations saved for backward. Ratios are lora_edu / PEFT.

    python benchmarks/qlora_memory.py           # on a GPU: all four sizes, writes results/qlora_memory.json
    python benchmarks/qlora_memory.py           # on a CPU: the 124M shape, batch 1, writes results/qlora_memory_cpu.json
    python benchmarks/qlora_memory.py --quick   # the tiny model on this machine, a smoke test; writes nothing

Without a GPU there is no peak memory to read, but the bytes of every tensor that
training keeps (weights, optimizer states, saved activations) are the same numbers a GPU
would hold, so the CPU run measures those.
"""

from __future__ import annotations

import gc
import tempfile
import time
from pathlib import Path

import torch
import torch.nn as nn

from lora_edu.gpt2 import GPT2, GPT2Config
from lora_edu.lora import add_lora, lora_layers
from lora_edu.memory import saved_activation_bytes
from lora_edu.qlora import (
    QLORA_LORA,
    compute_dtype_for,
    make_optimizer,
    prepare_for_kbit_training,
    quantize_model,
)
from lora_edu.results import RESULTS_DIR, benchmark_arguments, interleaved_medians, out_path, run_record, save

OUT = {"cuda": RESULTS_DIR / "qlora_memory.json", "cpu": RESULTS_DIR / "qlora_memory_cpu.json"}
METHODS = ("full", "lora_bf16", "qlora_lora_edu", "qlora_lora_edu_bnb", "qlora_peft")
GPU = {"presets": ["gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl"], "seq_len": 512, "batch_size": 4,
       "warmup_steps": 2, "timed_steps": 10}
CPU = {"presets": ["gpt2"], "seq_len": 512, "batch_size": 1, "warmup_steps": 1, "timed_steps": 2}
QUICK = {"presets": ["tiny"], "seq_len": 64, "batch_size": 2, "warmup_steps": 1, "timed_steps": 2}
LR = 2e-4  # QLoRA's learning rate for small models; the value does not change memory or speed
MAX_GRAD_NORM = 0.3  # QLoRA's


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def quant_state_bytes(model: nn.Module) -> int:
    """bitsandbytes keeps a Linear4bit's absmax constants in ``weight.quant_state``, which
    is neither a parameter nor a buffer; NF4Linear's are buffers, already counted."""
    total = 0
    for module in model.modules():
        state = getattr(getattr(module, "weight", None), "quant_state", None)
        if state is not None:
            nested = [state.state2.absmax, state.state2.code] if state.nested else []
            total += tensor_bytes(t for t in (state.absmax, state.code, state.offset, *nested) if torch.is_tensor(t))
    return total


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    return tensor_bytes(v for state in optimizer.state.values() for v in state.values() if torch.is_tensor(v))


def build_ours(method: str, config: GPT2Config, device: str, dtype: torch.dtype) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    with torch.device(device):
        model = GPT2(config)
    if method == "full":
        return model, make_optimizer(model, LR, paged=False)
    if method == "lora_bf16":
        model.to(dtype)  # bfloat16 on a GPU; float32 on the CPU, where bf16 matmuls are slow
        add_lora(model, "all-linear", **QLORA_LORA)
        for layer in lora_layers(model).values():  # adapters in float32, as in QLoRA
            layer.lora_A.float(), layer.lora_B.float()
        return model, make_optimizer(model, LR, paged=False)
    backend = "bitsandbytes" if method == "qlora_lora_edu_bnb" else "lora_edu"
    quantize_model(model, backend, compute_dtype=dtype)
    prepare_for_kbit_training(model)
    add_lora(model, "all-linear", **QLORA_LORA)
    return model, make_optimizer(model, LR)  # paged on CUDA


def build_peft(config: GPT2Config, device: str, dtype: torch.dtype, folder: Path) -> tuple[nn.Module, torch.optim.Optimizer]:
    import transformers
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    hf_config = transformers.GPT2Config(
        vocab_size=config.vocab_size, n_positions=config.block_size, n_layer=config.n_layer,
        n_head=config.n_head, n_embd=config.n_embd, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )
    if not (folder / "config.json").is_file():  # from_pretrained is where transformers quantizes
        torch.manual_seed(0)
        transformers.GPT2LMHeadModel(hf_config).save_pretrained(folder)
    quantization = transformers.BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype,
    )
    model = transformers.GPT2LMHeadModel.from_pretrained(
        folder, quantization_config=quantization, device_map={"": device}, attn_implementation="sdpa",
    )
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
    lora = LoraConfig(
        r=QLORA_LORA["r"], lora_alpha=QLORA_LORA["alpha"], lora_dropout=QLORA_LORA["dropout"],
        target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True, task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, lora)
    return model, make_optimizer(model, LR)


def loss_of(method: str, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    if method == "qlora_peft":
        return model(input_ids=x, labels=x).loss
    return model(x[:, :-1], x[:, 1:])[1]


def measure(method: str, preset: str, device: str, plan: dict, folder: Path) -> dict:
    config = GPT2Config.from_preset(preset)
    dtype = compute_dtype_for(device)
    amp = dtype if dtype != torch.float32 else None
    row = {"preset": preset, "method": method, "device": device, "seq_len": plan["seq_len"],
           "batch_size": plan["batch_size"], "compute_dtype": str(dtype).removeprefix("torch.")}
    try:
        if method == "qlora_peft":
            model, optimizer = build_peft(config, device, dtype, folder)
        else:
            model, optimizer = build_ours(method, config, device, dtype)
    except Exception as err:  # e.g. transformers' 4-bit loading needs a GPU on some versions
        row["skipped"] = f"{type(err).__name__}: {err}".splitlines()[0][:300]
        print(f"{device} {preset:12s} {method:20s} skipped: {row['skipped']}", flush=True)
        return row
    trainable = [p for p in model.parameters() if p.requires_grad]
    generator = torch.Generator().manual_seed(0)
    seq = min(plan["seq_len"], config.block_size)
    batches = [torch.randint(0, config.vocab_size, (plan["batch_size"], seq + 1), generator=generator).to(device)
               for _ in range(plan["warmup_steps"] + plan["timed_steps"])]
    remaining, last = iter(batches), {}

    def train_step() -> None:  # on the next batch
        with torch.autocast(device, dtype=amp, enabled=amp is not None):
            loss = loss_of(method, model, next(remaining))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, MAX_GRAD_NORM)
        optimizer.step()
        last["loss"] = loss

    model.train()
    if device == "cuda":
        gc.collect(), torch.cuda.empty_cache(), torch.cuda.reset_peak_memory_stats()
    seconds = interleaved_medians({method: train_step}, rounds=plan["timed_steps"], device=device,
                                  warm_up=plan["warmup_steps"])[method]
    tokens = plan["batch_size"] * seq
    row.update({
        "trainable_parameters": sum(p.numel() for p in trainable),
        "weight_bytes": tensor_bytes([*model.parameters(), *model.buffers()]) + quant_state_bytes(model),
        "optimizer_state_bytes": optimizer_state_bytes(optimizer),
        "tokens_per_second": tokens / seconds,
        "final_loss": last["loss"].item(),
    })
    with torch.autocast(device, dtype=amp, enabled=amp is not None):
        x = batches[0]  # the loss included: it keeps the log-probabilities for backward
        if method == "qlora_peft":
            row["saved_activation_bytes"] = saved_activation_bytes(model, input_ids=x, labels=x)
        else:
            row["saved_activation_bytes"] = saved_activation_bytes(model, x[:, :-1], x[:, 1:])
    if device == "cuda":
        row["peak_allocated_bytes"] = torch.cuda.max_memory_allocated()
    peak = row.get("peak_allocated_bytes")
    print(f"{device} {preset:12s} {method:20s} {row['tokens_per_second']:10.0f} tok/s  "
          f"peak {peak / 2**30 if peak else float('nan'):6.2f} GiB  "
          f"activations {row['saved_activation_bytes'] / 2**20:8.1f} MiB", flush=True)
    del model, optimizer
    return row


def ratios(rows: list[dict]) -> list[dict]:
    """lora_edu's QLoRA over PEFT's, per preset: peak memory and tokens per second."""
    out = []
    for preset in dict.fromkeys(r["preset"] for r in rows):
        by_method = {r["method"]: r for r in rows if r["preset"] == preset and "skipped" not in r}
        if "qlora_peft" not in by_method:
            continue
        peft = by_method["qlora_peft"]
        for ours in ("qlora_lora_edu", "qlora_lora_edu_bnb"):
            if ours not in by_method:
                continue
            row = {"preset": preset, "ours": ours,
                   "tokens_per_second_ratio": by_method[ours]["tokens_per_second"] / peft["tokens_per_second"]}
            if "peak_allocated_bytes" in peft:
                row["peak_memory_ratio"] = by_method[ours]["peak_allocated_bytes"] / peft["peak_allocated_bytes"]
            out.append(row)
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = benchmark_arguments(__doc__, "the tiny model, a few steps: a smoke test")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--presets", nargs="+", default=None, help="GPT-2 presets to run (default: all four sizes)")
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    plan = dict(QUICK if args.quick else GPU if device == "cuda" else CPU)
    if args.presets:
        plan["presets"] = args.presets
    out = out_path(args, OUT[device])
    start = time.time()
    rows = []

    config = {**plan, "quick": args.quick, "lora": QLORA_LORA, "lr": LR, "max_grad_norm": MAX_GRAD_NORM,
              "statistic": "median seconds per step over the timed steps",
              "peak_memory": "torch.cuda.max_memory_allocated after building the model, over all steps"}

    def record_of(rows: list[dict]) -> dict:
        return run_record("qlora_memory", config, rows, device=device, start=start,
                          libraries=("bitsandbytes", "peft", "transformers"), ratios_lora_edu_over_peft=ratios(rows))

    with tempfile.TemporaryDirectory() as tmp:
        for preset in plan["presets"]:
            folder = Path(tmp) / preset
            for method in args.methods:
                rows.append(measure(method, preset, device, plan, folder))
                gc.collect()
                if device == "cuda":
                    torch.cuda.empty_cache()
                save(record_of(rows), out)  # after every row: a run cut short by a time limit keeps what it measured
    record = record_of(rows)
    for r in record["ratios_lora_edu_over_peft"]:
        print(f"{r['preset']:12s} {r['ours']:20s} tokens/s ratio {r['tokens_per_second_ratio']:.2f}"
              + (f"  peak memory ratio {r['peak_memory_ratio']:.2f}" if "peak_memory_ratio" in r else ""))
    save(record, out)
    return record


if __name__ == "__main__":
    main()
