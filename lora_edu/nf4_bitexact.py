"""How bitsandbytes rounds, copied so that :mod:`lora_edu.nf4` equals it byte for byte, on the CPU and on CUDA.

:func:`lora_edu.nf4.quantize_nf4` follows QLoRA's recipe; to give the same bytes as
bitsandbytes 0.50.2 it also copies choices a textbook would not make. bitsandbytes has two
implementations that round differently at the edges, its pure-PyTorch CPU path and its
CUDA kernel, and ``quantize_nf4(..., kernel="cpu" | "cuda")`` copies either (by default
the one for the weight's device; :data:`ROUNDINGS`). Chapter 4 teaches the recipe; this
module holds what equalling the library took:

* The CPU path multiplies a full block by ``1 / absmax`` and divides the last, partial
  block by its absmax; the two can differ in the last bit, which moves a value that lies
  on a boundary between two levels. The CUDA kernel, compiled with ``--use_fast_math``,
  multiplies every block by the GPU's *approximate* reciprocal (one mantissa in eight is
  one unit in the last place off; :func:`cuda_reciprocal` reproduces it from a table
  measured on the GPU).
* A value exactly on the midpoint between two levels takes the lower level (index i, not
  i + 1). The CPU path computes the midpoints in float32; the CUDA kernel's are decimal
  literals, and four of them round to a float32 one unit away from the CPU's
  (:func:`cuda_nf4_thresholds`).
* An all-zero block: the CPU path stores the index of 0.0 (7) with absmax 0 (1e-38 in a
  partial last block, where it clamps); the CUDA kernel gets 0 * (1/0) = NaN, which its
  decision tree sends to index 0 (-1.0), with absmax 0. All dequantize to 0.
* Double quantization: the CPU 8-bit kernel does not search the dynamic map directly: it
  rounds each scaled value to one of 65,536 evenly spaced points in [-1, 1] and takes the
  level nearest that point (:func:`grid_lookup_8bit`). Near zero, where the map's levels
  are closer together than those points, that is not the nearest level (an exact 0 is
  stored as level 131, 2.1e-5, not level 127, 0.0). The CUDA kernel binary-searches the
  map and takes the nearer neighbour (:func:`binary_search_8bit`).

On real weights the two kernels almost never differ: in the tiny GPT-2's 16 linear
layers, one value of 786,432 sits on a threshold where they disagree.

One exception, a bitsandbytes bug: its AVX-512 CPU dequantize kernel gives wrong values
for a 2-D weight whose rows are a multiple of 16 long but not a multiple of the blocksize
(4 x 80 or 256 x 80 with blocksize 64, say); it appears to restart the block count at
every row. For other row lengths that are not a multiple of the blocksize (17 x 129, say)
its ``Linear4bit`` crashes at inference instead. Its quantize, and its own pure-PyTorch
dequantize, count blocks over the flattened tensor, as :mod:`lora_edu.nf4` does. Rows that
are a multiple of the blocksize (768 or 4096 wide with the default 64) never meet either.

The imports run one way: :mod:`lora_edu.nf4` imports this module, and this module imports
nothing from it. The few functions that need a code table (the dynamic map) take it as an
argument, so the rounding rules sit below the quantizer and its module opens on NF4.
"""

from __future__ import annotations

import functools
import math
from fractions import Fraction

import numpy as np
import torch

from lora_edu.data import DATA_DIR

__all__ = [
    "CUDA_NF4_THRESHOLDS",
    "RECIPROCAL_TABLE",
    "ROUNDINGS",
    "binary_search_8bit",
    "check_rounding",
    "cuda_nf4_thresholds",
    "cuda_reciprocal",
    "float32_literal",
    "grid_lookup_8bit",
    "unpack_reciprocal_table",
]

ROUNDINGS = ("cpu", "cuda")  # whose rounding quantize_nf4(kernel=...) copies: bitsandbytes' CPU path or CUDA kernel


def check_rounding(kernel, device: torch.device) -> str:
    """Whose rounding to copy: bitsandbytes' CPU path or its CUDA kernel (default: the tensor's device)."""
    if kernel is None:
        return "cuda" if device.type == "cuda" else "cpu"
    if kernel not in ROUNDINGS:
        raise ValueError(f"kernel must be one of {ROUNDINGS} or None (the tensor's device), got {kernel!r}")
    return kernel


# ----------------------------------------------------------------------------------------
# The GPU's approximate reciprocal
# ----------------------------------------------------------------------------------------
#
# The CUDA kernel is compiled with --use_fast_math, so it scales a block by an
# *approximate* reciprocal of its absmax (the GPU's rcp.approx instruction, at most 1 unit
# in the last place off), then multiplies. The approximation depends only on the 23
# mantissa bits of its input, so one table of 2**23 corrections, measured on the GPU by
# scripts/cuda_reciprocal_table.py, turns PyTorch's exact reciprocal into the kernel's.

RECIPROCAL_TABLE = DATA_DIR / "cuda_reciprocal.npz"


@functools.cache
def _reciprocal_corrections(device: torch.device) -> torch.Tensor:
    """int8 tensor of 2**23 values in {-1, 0, 1} on ``device``: rcp.approx minus the exact reciprocal, in ulps."""
    if not RECIPROCAL_TABLE.exists():
        raise FileNotFoundError(
            f"{RECIPROCAL_TABLE} is missing: kernel='cuda' needs the GPU's reciprocal table, "
            "which scripts/cuda_reciprocal_table.py measures on a CUDA GPU"
        )
    with np.load(RECIPROCAL_TABLE, allow_pickle=False) as table:
        return torch.from_numpy(unpack_reciprocal_table(table).astype(np.int8)).to(device)


def unpack_reciprocal_table(table) -> np.ndarray:
    """The corrections (int32, -1/0/+1 per mantissa) from the table's two bit-packed masks."""
    n = int(table["n"])
    differs = np.unpackbits(table["differs"])[:n].astype(bool)
    up = np.unpackbits(table["up"])[:n].astype(bool)
    return np.where(differs, np.where(up, 1, -1), 0).astype(np.int32)


def cuda_reciprocal(x: torch.Tensor) -> torch.Tensor:
    """``1 / x`` in float32 as bitsandbytes' CUDA kernel computes it (``--use_fast_math``).

    Exact IEEE reciprocals, then the GPU's error added back from the measured table; zero
    and subnormal inputs give inf, and results too small to be normal give 0 (fast math
    flushes subnormals to zero).
    """
    x = x.float()
    exact = 1.0 / x
    mantissa = (x.view(torch.int32) & 0x7FFFFF).long()
    bits = exact.view(torch.int32) + _reciprocal_corrections(x.device)[mantissa]
    result = torch.where(torch.isfinite(exact) & (exact != 0), bits.view(torch.float32), exact)
    tiny = torch.finfo(torch.float32).tiny
    result = torch.where(x.abs() < tiny, torch.full_like(x, math.inf).copysign(x), result)
    return torch.where(result.abs() < tiny, torch.zeros_like(result).copysign(result), result)


# ----------------------------------------------------------------------------------------
# The CUDA kernel's NF4 thresholds
# ----------------------------------------------------------------------------------------

# The kernel's decision tree for NF4 (dQuantizeNF4) compares a scaled value with these
# literals: strictly above one goes up, and NaN (an all-zero block, 0 * 1/0) fails every
# test and lands on level 0. They are the midpoints between neighbouring levels, but the
# compiler rounds each once, straight to float32, and four of them then sit one unit in
# the last place from the float32 midpoints that the CPU path computes.
CUDA_NF4_THRESHOLDS = (
    "-0.8480964004993439", "-0.6106329262256622", "-0.4599952697753906", "-0.33967943489551544",
    "-0.23460740596055984", "-0.13791173323988914", "-0.045525018125772476", "0.03979014977812767",
    "0.1202552504837513", "0.2035212516784668", "0.2920137718319893", "0.3893125355243683",
    "0.5016634166240692", "0.6427869200706482", "0.8614784181118011",
)


def float32_literal(text: str) -> float:
    """The float32 nearest the decimal ``text``, rounded once, as a C compiler rounds ``1.5f``.

    ``float(text)`` would round to float64 first and then to float32, which can land one
    unit in the last place away.
    """
    exact = Fraction(text)
    near = torch.tensor(float(exact), dtype=torch.float32)
    neighbours = [torch.nextafter(near, torch.tensor(step, dtype=torch.float32)) for step in (-math.inf, math.inf)]
    return min([near, *neighbours], key=lambda c: abs(Fraction(c.item()) - exact)).item()


@functools.cache
def _cuda_nf4_thresholds() -> torch.Tensor:
    return torch.tensor([float32_literal(t) for t in CUDA_NF4_THRESHOLDS], dtype=torch.float32)


def cuda_nf4_thresholds() -> torch.Tensor:
    """The 15 float32 thresholds between NF4 levels that the CUDA kernel compares with ``>``, sorted."""
    return _cuda_nf4_thresholds().clone()


# ----------------------------------------------------------------------------------------
# How each kernel finds an 8-bit code (double quantization)
# ----------------------------------------------------------------------------------------


def binary_search_8bit(x: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """The CUDA kernel's dQuantize: a 7-step binary search of the 256 sorted levels, then the nearer neighbour.

    Vectorised, step for step, including its edges: the search ends on levels 0 ... 254,
    and NaN compares false everywhere, so it becomes level 0.
    """
    pivot = torch.full(x.shape, 127, dtype=torch.long, device=x.device)
    lower_pivot, upper_pivot = torch.zeros_like(pivot), torch.full_like(pivot, 255)
    lower, upper = torch.full_like(x, -1.0), torch.full_like(x, 1.0)
    value = code[pivot]
    for step in (64, 32, 16, 8, 4, 2, 1):
        up = x > value
        lower_pivot, lower = torch.where(up, pivot, lower_pivot), torch.where(up, value, lower)
        upper_pivot, upper = torch.where(up, upper_pivot, pivot), torch.where(up, upper, value)
        pivot = torch.where(up, pivot + step, pivot - step)
        value = code[pivot]
    upper = torch.where(upper_pivot == 255, code[255], upper)
    lower = torch.where(lower_pivot == 0, code[0], lower)
    up = x > value
    to_upper = torch.where(x > (upper + value) * 0.5, upper_pivot, pivot)
    to_lower = torch.where(x < (lower + value) * 0.5, lower_pivot, pivot)
    return torch.where(up, to_upper, to_lower).to(torch.uint8)


GRID_HALF = 32767.5  # 65,536 evenly spaced points j / 32767.5 - 1, j = 0 ... 65535, cover [-1, 1]


def grid_lookup_8bit(x: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """The CPU kernel's 8-bit codes: each value rounded to a grid point, then the level nearest that point.

    ``j = floor((x + 1) * 32767.5 + 0.5)`` in float32 arithmetic, after NaN goes to -1 and
    infinities are clamped to +-1, as the kernel does; then the level of ``code`` (sorted)
    nearest the grid point ``j / 32767.5 - 1``, found in float64.
    """
    x = torch.nan_to_num(x, nan=-1.0).clamp(-1, 1)
    grid_point = torch.floor((x + 1) * GRID_HALF + 0.5)
    code = code.double()
    return torch.bucketize(grid_point.double() / GRID_HALF - 1, (code[:-1] + code[1:]) / 2).to(torch.uint8)
