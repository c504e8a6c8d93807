"""NF4 quantize and dequantize throughput: lora_edu.nf4 (plain PyTorch) against bitsandbytes.

Both run side by side in one process on the same tensors: weights of 2^20 and 2^24
values (256 x 4096 and 4096 x 4096), float32 and bfloat16, blocksize 64, with and without
double quantization. Each timing is the median of several repeats after a warm-up.
Reported per operation: elements per second, bytes moved per second (what the operation
must read and write: the weight, the packed bytes and the absmax statistics), and the
ratio lora_edu / bitsandbytes (above 1: ours is faster). Every configuration also checks
that the two produced the same bytes. On the CPU always; on CUDA too when a GPU is there.

    python benchmarks/nf4_throughput.py           # writes benchmarks/results/nf4_throughput.json
    python benchmarks/nf4_throughput.py --quick   # tiny sizes, a smoke test; writes nothing unless --out
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from lora_edu.nf4 import dequantize_nf4, quantize_nf4

OUT = Path(__file__).resolve().parent / "results" / "nf4_throughput.json"
COMMAND = "python benchmarks/nf4_throughput.py"
BLOCKSIZE = 64
FULL = {"shapes": [(256, 4096), (4096, 4096)], "repeats": 7}
QUICK = {"shapes": [(16, 256), (64, 256)], "repeats": 3}


def timed(fn, device: str, repeats: int) -> float:
    """Median seconds of ``fn()`` over ``repeats`` runs, after one warm-up run."""
    fn()
    times = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bytes_moved(numel: int, dtype: torch.dtype, double_quant: bool) -> int:
    """The weight (read or written), its packed 4-bit form, and the absmax statistics."""
    n_blocks = -(-numel // BLOCKSIZE)
    stats = n_blocks + 4 * -(-n_blocks // 256) + 4 if double_quant else 4 * n_blocks
    return numel * dtype.itemsize + -(-numel // 2) + stats


def same_bytes(ours, theirs, double_quant: bool) -> bool:
    (packed, state), (bnb_packed, bnb_state) = ours, theirs
    if not torch.equal(packed, bnb_packed):
        return False
    if double_quant:
        return (
            torch.equal(state.absmax_codes, bnb_state.absmax)
            and torch.equal(state.absmax_scales, bnb_state.state2.absmax)
            and torch.equal(state.absmax_offset, bnb_state.offset)
        )
    return torch.equal(state.absmax, bnb_state.absmax)


def measure(device: str, shape: tuple[int, int], dtype: torch.dtype, double_quant: bool, repeats: int) -> list[dict]:
    import bitsandbytes.functional as bnb

    numel = shape[0] * shape[1]
    w = (torch.randn(shape, generator=torch.Generator().manual_seed(0)) * 0.02).to(device=device, dtype=dtype)
    ours = quantize_nf4(w, BLOCKSIZE, double_quant)
    theirs = bnb.quantize_4bit(w, blocksize=BLOCKSIZE, quant_type="nf4", compress_statistics=double_quant)
    exact = same_bytes(ours, theirs, double_quant)
    dequantized_equal = torch.equal(dequantize_nf4(*ours), bnb.dequantize_4bit(*theirs).reshape(shape))
    def bnb_quantize():
        return bnb.quantize_4bit(w, blocksize=BLOCKSIZE, quant_type="nf4", compress_statistics=double_quant)

    ops = {
        "quantize": (lambda: quantize_nf4(w, BLOCKSIZE, double_quant), bnb_quantize),
        "dequantize": (lambda: dequantize_nf4(*ours), lambda: bnb.dequantize_4bit(*theirs)),
    }
    moved = bytes_moved(numel, dtype, double_quant)
    rows = []
    for op, (ours_fn, theirs_fn) in ops.items():
        row = {
            "device": device, "op": op, "shape": list(shape), "numel": numel, "dtype": str(dtype).removeprefix("torch."),
            "blocksize": BLOCKSIZE, "double_quant": double_quant, "bytes_moved": moved,
        }
        for name, fn in (("lora_edu", ours_fn), ("bitsandbytes", theirs_fn)):
            seconds = timed(fn, device, repeats)
            row[name] = {
                "median_seconds": seconds, "elements_per_second": numel / seconds, "bytes_per_second": moved / seconds,
            }
        ratio = row["lora_edu"]["elements_per_second"] / row["bitsandbytes"]["elements_per_second"]
        row["speed_ratio_lora_edu_over_bitsandbytes"] = ratio
        row["same_packed_bytes_and_absmax"] = exact
        row["same_dequantized_values"] = dequantized_equal
        rows.append(row)
        print(f"{device} {op:10s} {numel:>9,d} {row['dtype']:8s} dq={double_quant!s:5s} "
              f"lora_edu {row['lora_edu']['elements_per_second'] / 1e6:9.1f} M/s  "
              f"bitsandbytes {row['bitsandbytes']['elements_per_second'] / 1e6:9.1f} M/s  "
              f"ratio {ratio:.2f}  exact={exact and dequantized_equal}", flush=True)
    return rows


def device_description(devices: list[str]) -> str:
    cpu = f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    if "cuda" in devices:
        return f"{torch.cuda.get_device_name()}; CPU {cpu}"
    return cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes and few repeats, a smoke test")
    parser.add_argument(
        "--out", type=Path, default=None, help=f"where to write the results (default {OUT}; --quick writes nothing)"
    )
    args = parser.parse_args()
    plan = QUICK if args.quick else FULL
    out = args.out if args.out is not None else (None if args.quick else OUT)

    import bitsandbytes

    start = time.time()
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    results = []
    for device in devices:
        for shape in plan["shapes"]:
            for dtype in (torch.float32, torch.bfloat16):
                for double_quant in (False, True):
                    results += measure(device, shape, dtype, double_quant, plan["repeats"])
    record = {
        "benchmark": "nf4_throughput",
        "command": COMMAND,
        "config": {
            "quick": args.quick, "blocksize": BLOCKSIZE, "repeats": plan["repeats"], "shapes": plan["shapes"],
            "statistic": "median", "bytes_moved": "weight + packed 4-bit bytes + absmax statistics",
        },
        "results": results,
        "device": device_description(devices),
        "versions": {
            "python": platform.python_version(), "torch": torch.__version__, "bitsandbytes": bitsandbytes.__version__,
        },
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"),
        "wall_seconds": round(time.time() - start),
    }
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(record, indent=1) + "\n")
        print(f"wrote {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
