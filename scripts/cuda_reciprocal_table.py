"""Measure the GPU's approximate float32 reciprocal, which bitsandbytes' CUDA kernels use.

bitsandbytes compiles its kernels with ``--use_fast_math``, so ``1.0f / absmax`` in its
quantize kernel is the hardware's approximate reciprocal (``rcp.approx.ftz.f32``), at most
one unit in the last place (ulp) from the exact one. To reproduce the kernel bit for bit,
``lora_edu.nf4_bitexact.cuda_reciprocal`` needs to know where it is off. The error depends
only on the 23 mantissa bits, so this script computes the reciprocal of every float in
[1, 2) on the GPU (2**23 of them), compares each with the exact one, and stores which
mantissas are one ulp up or down, bit-packed, in ``lora_edu/data/cuda_reciprocal.npz``.

    python scripts/cuda_reciprocal_table.py [--out PATH]   on a CUDA GPU, with CuPy
    python scripts/cuda_reciprocal_table.py --self-test    anywhere: the packing round trip

It then checks the table on 4 million random floats of every normal exponent. Two kernels
give the reciprocal: ``1.0f / x`` compiled with ``--use_fast_math`` (bitsandbytes' source)
and the PTX instruction itself; they must agree.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from lora_edu.nf4_bitexact import unpack_reciprocal_table  # noqa: E402  the package reads what this script writes

DEFAULT_OUT = ROOT / "lora_edu" / "data" / "cuda_reciprocal.npz"
N = 2**23

SOURCE = r"""
extern "C" __global__ void divide(const float* x, float* y, long long n) {
    long long i = (long long)blockDim.x * blockIdx.x + threadIdx.x;
    if (i < n) y[i] = 1.0f / x[i];
}
extern "C" __global__ void rcp_approx(const float* x, float* y, long long n) {
    long long i = (long long)blockDim.x * blockIdx.x + threadIdx.x;
    if (i < n) { float r; asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(x[i])); y[i] = r; }
}
"""


def pack(corrections: np.ndarray) -> dict[str, np.ndarray]:
    """int corrections in {-1, 0, 1}, one per mantissa, as two bit-packed masks."""
    return {"n": np.array(corrections.size), "differs": np.packbits(corrections != 0), "up": np.packbits(corrections > 0)}


def emulate(x: np.ndarray, corrections: np.ndarray) -> np.ndarray:
    """The exact float32 reciprocal of normal x, moved by the table's correction."""
    exact = (np.float32(1) / x).astype(np.float32)
    mantissa = x.view(np.int32) & 0x7FFFFF
    return (exact.view(np.int32) + corrections[mantissa]).view(np.float32)


def self_test() -> None:
    rng = np.random.default_rng(0)
    corrections = rng.integers(-1, 2, size=1000).astype(np.int32)
    assert np.array_equal(unpack_reciprocal_table(pack(corrections)), corrections)
    print("packing round trip: ok")


def gpu_reciprocals(x: np.ndarray) -> dict[str, np.ndarray]:
    import cupy as cp

    module = cp.RawModule(code=SOURCE, options=("--use_fast_math",))
    x_gpu = cp.asarray(x)
    out = {}
    for name in ("divide", "rcp_approx"):
        y = cp.empty_like(x_gpu)
        module.get_function(name)(((x.size + 255) // 256,), (256,), (x_gpu, y, cp.int64(x.size)))
        out[name] = cp.asnumpy(y)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--self-test", action="store_true", help="check the packing only (no GPU needed)")
    args = parser.parse_args(argv)
    self_test()
    if args.self_test:
        return 0

    ones_to_two = (np.int32(0x3F800000) + np.arange(N, dtype=np.int32)).view(np.float32)
    gpu = gpu_reciprocals(ones_to_two)
    if not np.array_equal(gpu["divide"].view(np.int32), gpu["rcp_approx"].view(np.int32)):
        print("1.0f / x under --use_fast_math is not rcp.approx.ftz.f32 here; keeping the former")
    exact = (np.float32(1) / ones_to_two).astype(np.float32)
    corrections = gpu["divide"].view(np.int32) - exact.view(np.int32)
    if np.abs(corrections).max() > 1:
        print(f"an error of {np.abs(corrections).max()} ulp: the table cannot hold it")
        return 1
    print(f"{(corrections != 0).sum():,} of {N:,} mantissas differ from the exact reciprocal "
          f"({(corrections > 0).sum():,} one ulp up, {(corrections < 0).sum():,} one ulp down)")

    # Does the error depend on the mantissa alone? Random normal floats whose reciprocal is normal.
    rng = np.random.default_rng(0)
    bits = (rng.integers(1, 253, size=4_000_000) << 23) | rng.integers(0, 2**23, size=4_000_000)
    sample = bits.astype(np.int32).view(np.float32)
    measured = gpu_reciprocals(sample)["divide"]
    wrong = (measured.view(np.int32) != emulate(sample, corrections).view(np.int32)).sum()
    print(f"emulated reciprocal on 4,000,000 random normal floats: {wrong} differ from the GPU")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(args.out, **pack(corrections))
    print(f"wrote {args.out} ({args.out.stat().st_size / 2**10:.0f} KiB)")
    return int(wrong != 0)


if __name__ == "__main__":
    sys.exit(main())
