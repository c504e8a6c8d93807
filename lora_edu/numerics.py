"""What another CPU reproduces: the kernel paths the book is checked on, and rounding tolerances.

A float32 sum rounds after every addition, so its last bits depend on the order of the
additions, and that order is the kernel's choice: AVX-512, AVX2 or no vectors at all,
one thread or two, Intel's MKL or Apple's Accelerate. One forward pass of the tiny GPT-2
moves by about 1e-7 from one path to another. Whether training carries that further
depends on the run: ``benchmarks/kernel_paths.py`` trains each of the book's kinds of run
under every path of :data:`KERNEL_PATHS` (its results: ``lora_edu.results.load
("kernel_paths")``). Full fine-tuning and LoRA (Chapter 2), LoRA+ (Chapter 3), Chapter
7's LoRA and Exercise 6.5's DoRA magnitudes end within 1.1e-7 of themselves on every
path, about as far as one forward pass moves; prompt tuning at a learning rate of 0.1
ends 5.6e-4 apart after 100 steps. (These are five paths of one x86 machine; Apple's
Accelerate and ARM's kernels were not measured.)

So the book lets nbval compare what these paths reproduce (forward passes, float64
arithmetic, committed results, and training runs that keep to rounding, printed to
three or four digits) and asserts the rest with :func:`loss_tolerance` in cells whose
output nbval does not compare. :func:`matmul_tolerance` is the rounding two orders of
one sum may differ by, for asserts that compare two computations of the same thing.

``make kernels`` runs every notebook under ``"avx2-1-thread"``, and
``python scripts/nbval_installed.py --kernel-path NAME`` under any path.
"""

from __future__ import annotations

import torch

from lora_edu import results
from lora_edu.plumbing import check_int

__all__ = ["KERNEL_PATHS", "loss_tolerance", "matmul_tolerance"]

_AVX2 = {"ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2"}
# Each entry: the environment a process needs to compute as another CPU would.
KERNEL_PATHS: dict[str, dict[str, str]] = {
    "native": {},  # whatever this CPU does best
    # PyTorch's, MKL's and oneDNN's code for CPUs without AVX-512 (AMD's Zen 2 and 3,
    # Intel's laptops and desktops)
    "avx2": _AVX2,
    # ATen's kernels without vector instructions, as on a CPU it has no vector code for
    "no-vectors": {"ATEN_CPU_CAPABILITY": "default"},
    # a machine with one core to spare: every parallel reduction split another way
    "1-thread": {"OMP_NUM_THREADS": "1"},
    "avx2-1-thread": {**_AVX2, "OMP_NUM_THREADS": "1"},  # what `make kernels` runs
}


def matmul_tolerance(magnitude: torch.Tensor | float, terms: int, dtype: torch.dtype = torch.float32):
    """How far two computations of the same sums of ``terms`` products may differ.

    Each adds its ``terms`` products in its own order, and each order's result is within
    ``terms * eps / 2`` times the sum of the products' absolute values (``magnitude``) of
    the exact sum (Higham, *Accuracy and Stability of Numerical Algorithms*, §3.1), so the
    two are within ``terms * eps`` of each other. ``magnitude`` is a tensor of such sums
    (``x.abs() @ w.abs().T``) or one number that bounds them all.
    """
    check_int(terms, "terms")
    if not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating-point dtype, got {dtype}")
    return terms * torch.finfo(dtype).eps * magnitude


def loss_tolerance(run: str | None = None) -> float:
    """How far the held-out loss of training run ``run`` may move from one CPU to another.

    ``benchmarks/kernel_paths.py`` trains each of the book's kinds of run (``"full"``,
    ``"lora"``, ``"loraplus"``, ``"prompt"``, ...) under every kernel path of
    :data:`KERNEL_PATHS` and records the largest difference between two paths' final
    losses. The tolerance is four times that (one machine's paths are a sample of all
    CPUs, not their extremes), and never below 1e-5, a hundred times the difference
    rounding makes to one forward pass: most of the book's runs keep their differences
    that small, and prompt tuning at a learning rate of 0.1 does not (DoRA's magnitudes
    at the same rate do: it is the run, not the rate alone). Without ``run``, the largest
    tolerance of all: for a run the benchmark does not measure.
    """
    spreads = {row["run"]: row["spread"] for row in results.load("kernel_paths")["results"]}
    if run is None:
        return max(1e-5, 4 * max(spreads.values()))
    if run not in spreads:
        raise ValueError(f"run must be one of {', '.join(sorted(spreads))} (benchmarks/kernel_paths.py); got {run!r}")
    return max(1e-5, 4 * spreads[run])
