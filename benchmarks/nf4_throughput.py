"""NF4 quantize and dequantize throughput: lora_edu.nf4 (plain PyTorch) against bitsandbytes.

All run side by side in one process on the same tensors: weights of 2^20 and 2^24
values (256 x 4096 and 4096 x 4096), float32 and bfloat16, blocksize 64, with and without
double quantization. Dequantizing is timed three ways: ``dequantize_nf4`` (the chapter's
teaching version), ``dequantize_nf4_fast`` (what ``NF4Linear`` runs) and bitsandbytes'
kernel. Timings are interleaved (one run of each in turn, then again) and each is the
median over the repeats, so a busy machine slows all alike. Reported per operation:
elements per second, bytes moved per second (what the operation must read and write:
the weight, the packed bytes and the absmax statistics) beside the device's copy
bandwidth measured in the same run, and the ratios to bitsandbytes (above 1: ours is
faster). Every configuration also checks that all produced the same bytes and values,
and the zero-block, tie and partial-block cases are compared on every device.

    python benchmarks/nf4_throughput.py                  # CPU: writes results/nf4_throughput.json
    python benchmarks/nf4_throughput.py --devices cuda   # GPU: writes results/nf4_throughput_cuda.json
    python benchmarks/nf4_throughput.py --quick          # tiny sizes, a smoke test; writes nothing unless --out
"""

from __future__ import annotations

import statistics
import time

import torch

from lora_edu.nf4 import dequantize_nf4, dequantize_nf4_fast, nf4_code, quantize_nf4
from lora_edu.results import RESULTS_DIR, benchmark_arguments, interleaved_medians, out_path, run_record, save

OUT = {"cpu": RESULTS_DIR / "nf4_throughput.json", "cuda": RESULTS_DIR / "nf4_throughput_cuda.json"}
BLOCKSIZE = 64
FULL = {"shapes": [(256, 4096), (4096, 4096)], "repeats": 7}
QUICK = {"shapes": [(16, 256), (64, 256)], "repeats": 3}


def copy_bandwidth(device: str, numel: int, repeats: int) -> float:
    """Bytes per second of a float32 copy into an existing buffer (read + write counted)."""
    src = torch.randn(numel, device=device)
    dst = torch.empty_like(src)
    seconds = interleaved_medians({"copy": lambda: dst.copy_(src)}, rounds=repeats, device=device)["copy"]
    return 2 * src.numel() * src.element_size() / seconds


def edge_cases(device: str) -> list[dict]:
    """Do our bytes and values equal bitsandbytes' on its kernel for this device, case by case?"""
    import bitsandbytes.functional as bnb

    code = nf4_code()
    midpoints = (code[:-1] + code[1:]) / 2
    cases = {
        "all-zero block": torch.zeros(128),
        "midpoint ties": torch.cat([midpoints, -midpoints, torch.ones(1), torch.zeros(33)]),
        "partial last block": torch.randn(64 + 37, generator=torch.Generator().manual_seed(1)),
        "zeros in a partial last block": torch.cat([torch.randn(64), torch.zeros(10)]),
    }
    rows = []
    for name, w in cases.items():
        for double_quant in (False, True):
            w = w.to(device)
            ours = quantize_nf4(w, BLOCKSIZE, double_quant)
            theirs = bnb.quantize_4bit(w, blocksize=BLOCKSIZE, quant_type="nf4", compress_statistics=double_quant)
            values = dequantize_nf4_fast(*ours), bnb.dequantize_4bit(*theirs).reshape(w.shape)
            rows.append({
                "device": device, "case": name, "double_quant": double_quant,
                "same_packed_bytes_and_absmax": same_bytes(ours, theirs, double_quant),
                "differing_bytes": int((ours[0] != theirs[0]).sum()),
                "same_dequantized_values": torch.equal(*values),
            })
    return rows


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


def measure(device: str, shape: tuple[int, int], dtype: torch.dtype, double_quant: bool, repeats: int,
            copy_bytes_per_second: float) -> list[dict]:
    import bitsandbytes.functional as bnb

    numel = shape[0] * shape[1]
    w = (torch.randn(shape, generator=torch.Generator().manual_seed(0)) * 0.02).to(device=device, dtype=dtype)
    ours = quantize_nf4(w, BLOCKSIZE, double_quant)
    theirs = bnb.quantize_4bit(w, blocksize=BLOCKSIZE, quant_type="nf4", compress_statistics=double_quant)
    exact = same_bytes(ours, theirs, double_quant)
    bnb_values = bnb.dequantize_4bit(*theirs).reshape(shape)
    dequantized_equal = torch.equal(dequantize_nf4(*ours), bnb_values) and torch.equal(dequantize_nf4_fast(*ours), bnb_values)

    def bnb_quantize():
        return bnb.quantize_4bit(w, blocksize=BLOCKSIZE, quant_type="nf4", compress_statistics=double_quant)

    ops = {
        "quantize": {"lora_edu": lambda: quantize_nf4(w, BLOCKSIZE, double_quant), "bitsandbytes": bnb_quantize},
        "dequantize": {"lora_edu": lambda: dequantize_nf4(*ours), "lora_edu_fast": lambda: dequantize_nf4_fast(*ours),
                       "bitsandbytes": lambda: bnb.dequantize_4bit(*theirs)},
    }
    moved = bytes_moved(numel, dtype, double_quant)
    rows = []
    for op, fns in ops.items():
        row = {
            "device": device, "op": op, "shape": list(shape), "numel": numel, "dtype": str(dtype).removeprefix("torch."),
            "blocksize": BLOCKSIZE, "double_quant": double_quant, "bytes_moved": moved,
            "copy_bytes_per_second": copy_bytes_per_second,
        }
        for name, seconds in interleaved_medians(fns, rounds=repeats, device=device).items():
            row[name] = {
                "median_seconds": seconds, "elements_per_second": numel / seconds, "bytes_per_second": moved / seconds,
            }
        theirs_speed = row["bitsandbytes"]["elements_per_second"]
        row["speed_ratio_lora_edu_over_bitsandbytes"] = row["lora_edu"]["elements_per_second"] / theirs_speed
        if "lora_edu_fast" in row:
            row["speed_ratio_lora_edu_fast_over_bitsandbytes"] = row["lora_edu_fast"]["elements_per_second"] / theirs_speed
        row["same_packed_bytes_and_absmax"] = exact
        row["same_dequantized_values"] = dequantized_equal
        rows.append(row)
        fast = row.get("speed_ratio_lora_edu_fast_over_bitsandbytes")
        print(f"{device} {op:10s} {numel:>9,d} {row['dtype']:8s} dq={double_quant!s:5s} "
              f"bitsandbytes {row['bitsandbytes']['bytes_per_second'] / 1e9:6.2f} GB/s  "
              f"ours/bnb {row['speed_ratio_lora_edu_over_bitsandbytes']:.2f}"
              + (f"  fast/bnb {fast:.2f}" if fast is not None else "")
              + f"  exact={exact and dequantized_equal}", flush=True)
    return rows


def summary(rows: list[dict]) -> list[dict]:
    """Per device, the fast dequantize path's speed ratio to bitsandbytes: worst and median."""
    out = []
    for device in dict.fromkeys(r["device"] for r in rows):
        ratios = [r["speed_ratio_lora_edu_fast_over_bitsandbytes"] for r in rows
                  if r["device"] == device and r["op"] == "dequantize"]
        out.append({"device": device, "op": "dequantize", "ours": "lora_edu_fast",
                    "min_speed_ratio": min(ratios), "median_speed_ratio": statistics.median(ratios)})
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = benchmark_arguments(__doc__, "tiny sizes and few repeats, a smoke test")
    parser.add_argument("--devices", nargs="+", choices=["cpu", "cuda"], default=None,
                        help="where to measure (default: cpu, and cuda when a GPU is there)")
    args = parser.parse_args(argv)
    plan = QUICK if args.quick else FULL
    devices = args.devices or ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    if "cuda" in devices and not torch.cuda.is_available():
        parser.error("--devices cuda needs a CUDA GPU")
    default_out = OUT["cuda"] if "cuda" in devices else OUT["cpu"]
    out = out_path(args, default_out)

    import bitsandbytes  # noqa: F401  (missing: fail before measuring, not after)

    start = time.time()
    results, cases, bandwidth = [], [], {}
    for device in devices:
        bandwidth[device] = copy_bandwidth(device, max(r * c for r, c in plan["shapes"]), plan["repeats"])
        print(f"{device} copy bandwidth {bandwidth[device] / 1e9:.1f} GB/s (float32, read + write)", flush=True)
        cases += edge_cases(device)
        for shape in plan["shapes"]:
            for dtype in (torch.float32, torch.bfloat16):
                for double_quant in (False, True):
                    results += measure(device, shape, dtype, double_quant, plan["repeats"], bandwidth[device])
    config = {
        "quick": args.quick, "blocksize": BLOCKSIZE, "repeats": plan["repeats"], "shapes": plan["shapes"],
        "statistic": "median of interleaved runs",
        "bytes_moved": "weight + packed 4-bit bytes + absmax statistics",
        "copy_bandwidth": "float32 copy into an existing buffer, bytes read + written per second",
    }
    record = run_record("nf4_throughput", config, results, device="cuda" if "cuda" in devices else "cpu",
                        start=start, libraries=("bitsandbytes",), summary=summary(results),
                        copy_bytes_per_second=bandwidth, edge_cases=cases)
    for row in record["summary"]:
        print(f"{row['device']}: dequantize_nf4_fast / bitsandbytes: worst {row['min_speed_ratio']:.2f}, "
              f"median {row['median_speed_ratio']:.2f}")
    save(record, out)
    return record


if __name__ == "__main__":
    main()
