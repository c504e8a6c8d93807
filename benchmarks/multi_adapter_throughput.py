"""Throughput of one batch whose rows use different LoRA adapters, as the number of distinct adapters grows:
prefill (whole prompts) and decode (one new token per request).

Punica's experiment at our scale: a pool of 64 LoRA adapters (rank 8 on every block
matrix, random weights: speed does not depend on what they hold) over one base model;
batches of ``batch_size`` rows of ``seq_len`` tokens whose rows use ``n`` distinct adapters,
for n = 1, 2, 4, ... up to the batch size, in two request layouts of our own: ``uniform``
(each of the n adapters takes the same share of rows) and ``zipf`` (shares following a
Zipf law, exponent 1.5, at least one row each). They borrow the names of Punica's
workloads, not their definitions: ours set the number n of distinct adapters directly.
n = 1 is Punica's ``identical`` layout and n = the batch size its
``distinct`` one. One forward pass of the batch, in eval mode, per method,
in two phases:

- ``prefill``: every request's ``seq_len`` prompt tokens at once (both layouts);
- ``decode``: one token per request (``seq_len`` = 1, uniform layout). Our GPT2 has no KV
  cache, so this is the forward pass of a one-token batch without attention over past
  tokens: the linear layers, where every LoRA cost lives, do exactly a decode step's work
  (a (batch, in) input), and the attention over the cache, the same for every method and
  part of the base model's cost, is left out. The ratio to the base model is therefore an
  upper bound on a real decode step's LoRA overhead.

The methods:

- ``base``: our GPT2 with no adapter (the ceiling);
- ``merge_swap``: our GPT2; for each distinct adapter, merge it, run its rows, unmerge;
- ``gather_bmm`` and ``sgmv``: ``lora_edu.serving.MultiAdapterModel`` with either kernel
  (per-token gathered copies and batched products; segments of tokens);
- ``base_hf`` and ``peft_mixed``: Hugging Face's GPT-2 alone, and with PEFT's mixed-batch
  inference (``adapter_names=``), which loops over the distinct adapters in each layer.

Tokens per second is ``batch_size * seq_len`` (``batch_size`` in decode) over the median time of a forward pass, timed
in interleaved rounds. Ratios to the base model of the same implementation are what
compare across methods.

    python benchmarks/multi_adapter_throughput.py          # CPU: tiny and GPT-2 124M shapes, writes results/multi_adapter_throughput_cpu.json
    python benchmarks/multi_adapter_throughput.py          # GPU: the same, larger batches, writes results/multi_adapter_throughput.json
    python benchmarks/multi_adapter_throughput.py --quick  # a smoke test; writes nothing unless --out
"""

from __future__ import annotations

import copy
import tempfile
import time
from pathlib import Path

import torch

from lora_edu.gpt2 import GPT2, GPT2Config
from lora_edu.lora import add_lora, lora_layers
from lora_edu.peft_format import load_adapter, save_adapter
from lora_edu.results import RESULTS_DIR, benchmark_arguments, interleaved_medians, out_path, run_record, save
from lora_edu.serving import MultiAdapterModel

OUT = {"cuda": RESULTS_DIR / "multi_adapter_throughput.json", "cpu": RESULTS_DIR / "multi_adapter_throughput_cpu.json"}
TARGETS = ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"]
R, ALPHA, POOL, ZIPF = 8, 16, 64, 1.5
CPU = {"shapes": {"tiny": {"batch_size": 64, "seq_len": 32, "adapters": [1, 2, 4, 8, 16, 32, 64]},
                  "gpt2": {"batch_size": 32, "seq_len": 8, "adapters": [1, 4, 16, 32]}},
       "rounds": 3}
GPU = {"shapes": {"tiny": {"batch_size": 64, "seq_len": 128, "adapters": [1, 2, 4, 8, 16, 32, 64]},
                  "gpt2": {"batch_size": 64, "seq_len": 128, "adapters": [1, 2, 4, 8, 16, 32, 64]}},
       "rounds": 3}  # about a minute on one H100: it fits the GPU run (scripts/gpu_check.sh)
LAYOUTS_ALL = ("uniform", "zipf")
QUICK = {"shapes": {"tiny": {"batch_size": 8, "seq_len": 8, "adapters": [1, 2, 8]}}, "rounds": 2}
METHODS = ("base", "merge_swap", "gather_bmm", "sgmv", "base_hf", "peft_mixed")
PHASES = {"prefill": LAYOUTS_ALL, "decode": ("uniform",)}


def rows_per_adapter(layout: str, n: int, batch_size: int) -> list[int]:
    """How many of the batch's rows each of the n adapters gets (every adapter at least one)."""
    if layout == "uniform":
        return [batch_size // n + (i < batch_size % n) for i in range(n)]
    weights = [1 / (i + 1) ** ZIPF for i in range(n)]
    counts = [1] * n
    for _ in range(batch_size - n):  # hand out the other rows one by one, where the law is most behind
        i = max(range(n), key=lambda j: weights[j] / sum(weights) * batch_size - counts[j])
        counts[i] += 1
    return counts


def adapter_names(layout: str, n: int, batch_size: int, seed: int = 0) -> list[str]:
    names = [f"adapter{i}" for i, count in enumerate(rows_per_adapter(layout, n, batch_size)) for _ in range(count)]
    order = torch.randperm(batch_size, generator=torch.Generator().manual_seed(seed)).tolist()
    return [names[i] for i in order]  # requests arrive in no particular order


def hf_copy(base: GPT2):
    """Hugging Face's GPT2LMHeadModel with the same weights (its Conv1D stores them transposed)."""
    import transformers

    from lora_edu.gpt2 import CONV1D_WEIGHTS

    config = base.config
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=config.vocab_size, n_positions=config.block_size, n_layer=config.n_layer, n_head=config.n_head,
        n_embd=config.n_embd, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        bos_token_id=config.vocab_size - 1, eos_token_id=config.vocab_size - 1,
    ))
    state = {k: v.t().contiguous() if k.endswith(CONV1D_WEIGHTS) else v
             for k, v in base.state_dict().items() if k != "lm_head.weight"}
    hf.load_state_dict(state, strict=False)
    return hf.eval()


def make_adapters(base: GPT2, folder: Path) -> dict[str, Path]:
    """POOL adapters in PEFT's format; the module names are the same in Hugging Face's GPT-2."""
    folders = {}
    for i in range(POOL):
        model = add_lora(copy.deepcopy(base), TARGETS, r=R, alpha=ALPHA)
        g = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for layer in lora_layers(model).values():
                layer.lora_B.weight.copy_(0.02 * torch.randn(layer.lora_B.weight.shape, generator=g))
        folders[f"adapter{i}"] = save_adapter(model, folder / f"adapter{i}")
    return folders


class MergeSwap:
    """One LoRA model whose adapter is swapped in by merging, group by group of rows."""

    def __init__(self, base: GPT2, folders: dict[str, Path]):
        self.model = add_lora(copy.deepcopy(base), TARGETS, r=R, alpha=ALPHA).eval()
        self.states = {}
        for name, folder in folders.items():
            load_adapter(self.model, folder)
            self.states[name] = {k: v.clone() for k, v in self.model.state_dict().items() if "lora_" in k}

    @torch.inference_mode()
    def __call__(self, idx: torch.Tensor, names: list[str]) -> torch.Tensor:
        out = None
        for name in dict.fromkeys(names):
            rows = torch.tensor([i for i, n in enumerate(names) if n == name])
            self.model.load_state_dict(self.states[name], strict=False)
            layers = lora_layers(self.model).values()
            for layer in layers:
                layer.merge()
            logits = self.model(idx[rows])
            for layer in layers:
                layer.unmerge()
            out = logits.new_empty(idx.shape[0], *logits.shape[1:]) if out is None else out
            out[rows] = logits
        return out


def measure_shape(shape: str, plan: dict, rounds: int, device: str, folder: Path) -> list[dict]:
    torch.manual_seed(0)
    config = GPT2Config.from_preset(shape)
    base = GPT2(config).eval()
    hf = hf_copy(base)
    ours = make_adapters(base, folder / shape)
    from peft import PeftModel

    peft_model = PeftModel.from_pretrained(copy.deepcopy(hf), ours["adapter0"], adapter_name="adapter0")
    for name, path in list(ours.items())[1:]:
        peft_model.load_adapter(path, adapter_name=name)
    models = {"gather_bmm": MultiAdapterModel(copy.deepcopy(base), ours, kernel="gather_bmm"),
              "sgmv": MultiAdapterModel(copy.deepcopy(base), ours, kernel="sgmv"),
              "merge_swap": MergeSwap(base, ours), "peft_mixed": peft_model.eval()}
    for model in (base, hf, *models.values()):
        if isinstance(model, torch.nn.Module):
            model.to(device)
    if device != "cpu":
        models["merge_swap"].model.to(device)
    batch_size, prompt_len = plan["batch_size"], min(plan["seq_len"], config.block_size)
    prompt = torch.randint(0, config.vocab_size, (batch_size, prompt_len),
                           generator=torch.Generator().manual_seed(1)).to(device)
    rows = []
    for phase, layouts in PHASES.items():
        idx = prompt if phase == "prefill" else prompt[:, -1:]  # decode: one token per request
        seq_len = idx.shape[1]
        # First, that every method computes the same thing: each row with its own adapter.
        names = adapter_names("uniform", min(batch_size, POOL), batch_size)
        with torch.inference_mode():
            want = models["gather_bmm"](idx, names)
            differences = {"sgmv": models["sgmv"](idx, names), "merge_swap": models["merge_swap"](idx, names),
                           "peft_mixed": models["peft_mixed"](input_ids=idx, adapter_names=names).logits}
        rows.append({"shape": shape, "phase": phase, "method": "check", "distinct_adapters": len(set(names)),
                     "max_abs_logit_difference_from_gather_bmm": {m: (v - want).abs().max().item()
                                                                  for m, v in differences.items()}})
        for layout in layouts:
            for n in plan["adapters"]:
                if n > batch_size or (layout == "zipf" and n in (1, batch_size)):
                    continue  # n = 1 and n = batch size are the same batch in either layout
                names = adapter_names(layout, n, batch_size)
                with torch.inference_mode():
                    calls = {
                        "base": lambda: base(idx),
                        "merge_swap": lambda: models["merge_swap"](idx, names),
                        "gather_bmm": lambda: models["gather_bmm"](idx, names),
                        "sgmv": lambda: models["sgmv"](idx, names),
                        "base_hf": lambda: hf(input_ids=idx),
                        "peft_mixed": lambda: models["peft_mixed"](input_ids=idx, adapter_names=names),
                    }
                    seconds = interleaved_medians(calls, rounds=rounds, device=device)
                for method in METHODS:
                    reference = seconds["base_hf" if method in ("base_hf", "peft_mixed") else "base"]
                    rows.append({"shape": shape, "phase": phase, "layout": layout, "distinct_adapters": n,
                                 "method": method, "batch_size": batch_size, "seq_len": seq_len,
                                 "median_seconds": seconds[method],
                                 "tokens_per_second": batch_size * seq_len / seconds[method],
                                 "relative_to_base": reference / seconds[method]})
                print(f"{device} {shape:5s} {phase:7s} {layout:7s} n={n:2d}  " + "  ".join(
                    f"{m} {batch_size * seq_len / seconds[m]:8.0f}" for m in METHODS) + " tok/s", flush=True)
    rows.append({"shape": shape, "method": "pool", "adapters": POOL, "rank": R,
                 "pool_bytes": models["gather_bmm"].pool_bytes(),
                 "kv_cache_bytes": 2 * config.n_layer * batch_size * prompt_len * config.n_embd * 4})
    return rows


def main(argv: list[str] | None = None) -> dict:
    parser = benchmark_arguments(__doc__, "the tiny model, small batches: a smoke test")
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    plan = QUICK if args.quick else GPU if device == "cuda" else CPU
    out = out_path(args, OUT[device])
    start = time.time()
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for shape, shape_plan in plan["shapes"].items():
            rows += measure_shape(shape, shape_plan, plan["rounds"], device, Path(folder))
    config = {**plan, "quick": args.quick, "pool_adapters": POOL, "r": R, "alpha": ALPHA, "targets": TARGETS,
              "zipf_exponent": ZIPF, "dtype": "float32",
              "phases": {"prefill": "the batch's whole prompts, both layouts",
                         "decode": "one token per request (the prompt's last), uniform layout, no KV cache: the "
                                   "linear layers do a decode step's work; attention over past tokens is left out"},
              "statistic": "median seconds per forward pass of the batch, torch.inference_mode, interleaved"}
    record = run_record("multi_adapter_throughput", config, rows, device=device, start=start,
                        libraries=("peft", "transformers"))
    save(record, out)
    return record


if __name__ == "__main__":
    main()
