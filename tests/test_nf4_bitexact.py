"""lora_edu.nf4_bitexact: bitsandbytes' CPU and CUDA rounding, reproduced in plain PyTorch.

tests/test_cuda.py compares ``quantize_nf4(kernel="cuda")`` with the kernel itself on a
GPU; these tests pin down, on any CPU and without bitsandbytes, the pieces it is built
from: the GPU's approximate reciprocal, the kernel's float32 thresholds, its binary search
for 8-bit codes, the CPU kernel's 8-bit grid, and what each does with zero blocks.
tests/test_nf4.py compares the CPU rounding with bitsandbytes itself.
"""

import math
from fractions import Fraction

import pytest
import torch

from lora_edu.nf4 import dequantize_nf4, dynamic_map, nf4_code, quantize_8bit_blockwise, quantize_nf4
from lora_edu.nf4_bitexact import (
    CUDA_NF4_THRESHOLDS,
    GRID_HALF,
    ROUNDINGS,
    binary_search_8bit,
    cuda_nf4_thresholds,
    cuda_reciprocal,
    float32_literal,
    grid_lookup_8bit,
)


def ulps_apart(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a.view(torch.int32).long() - b.view(torch.int32).long()).abs()


def unpack(packed: torch.Tensor) -> torch.Tensor:
    flat = packed.flatten()
    return torch.stack([flat >> 4, flat & 15], dim=1).flatten()


@pytest.fixture
def cpu_midpoints() -> torch.Tensor:
    """The float32 midpoints between neighbouring NF4 levels, as the CPU path computes them."""
    code = nf4_code()
    return (code[:-1] + code[1:]) / 2


def test_cuda_reciprocal_is_within_one_ulp_and_sometimes_off():
    x = torch.rand(1_000_000, generator=torch.Generator().manual_seed(0)) * 100 + 1e-3
    approximate, exact = cuda_reciprocal(x), 1.0 / x
    apart = ulps_apart(approximate, exact)
    assert apart.max() == 1  # rcp.approx is at most one unit in the last place off ...
    assert 0.05 < (apart == 1).float().mean() < 0.3  # ... for about one mantissa in eight (1.1M of 8.4M)
    powers = 2.0 ** torch.arange(-100, 100, dtype=torch.float32)
    assert torch.equal(cuda_reciprocal(powers), 1.0 / powers)  # exact where the mantissa is 0


def test_cuda_reciprocal_flushes_subnormals_like_fast_math():
    x = torch.tensor([0.0, 1e-40, -1e-40, 2.0**127, -(2.0**127), -4.0])
    assert cuda_reciprocal(x).tolist() == [math.inf, math.inf, -math.inf, 0.0, -0.0, -0.25]


def test_float32_literals_are_rounded_once():
    for text in CUDA_NF4_THRESHOLDS:
        value, exact = float32_literal(text), Fraction(text)
        here = torch.tensor(value, dtype=torch.float32)
        assert here.item() == value  # a float32
        for direction in (-math.inf, math.inf):
            neighbour = torch.nextafter(here, torch.tensor(direction, dtype=torch.float32)).item()
            assert abs(Fraction(value) - exact) <= abs(Fraction(neighbour) - exact)
    # Rounding to float64 first, as float() does, lands elsewhere for one of them:
    twice = torch.tensor([float(t) for t in CUDA_NF4_THRESHOLDS], dtype=torch.float32)
    assert not torch.equal(twice, cuda_nf4_thresholds())


def test_the_kernel_thresholds_are_the_midpoints_give_or_take_one_ulp(cpu_midpoints):
    apart = ulps_apart(cuda_nf4_thresholds(), cpu_midpoints)
    assert apart.max() == 1
    assert apart.nonzero().flatten().tolist() == [0, 8, 12, 14]


def test_a_value_on_a_threshold_takes_the_lower_level_and_the_two_kernels_differ_there(cpu_midpoints):
    w = torch.cat([cuda_nf4_thresholds(), cpu_midpoints, torch.ones(1), torch.zeros(64 - 31)])  # absmax 1: scaled by exactly 1
    cuda_levels = unpack(quantize_nf4(w, 64, kernel="cuda")[0])[:30]
    cpu_levels = unpack(quantize_nf4(w, 64, kernel="cpu")[0])[:30]
    assert cuda_levels[:15].tolist() == list(range(15))  # each on its own kernel's threshold: the lower level
    assert cpu_levels[15:].tolist() == list(range(15))
    # Where the thresholds are one ulp apart, a value on one kernel's threshold is on the other side of the other's.
    assert (cuda_levels != cpu_levels).nonzero().flatten().tolist() == [8, 15, 27, 29]


def test_an_all_zero_block_is_level_0_with_absmax_0_and_dequantizes_to_zero():
    w = torch.cat([torch.zeros(64), torch.randn(64, generator=torch.Generator().manual_seed(0)), torch.zeros(37)])
    packed, state = quantize_nf4(w, 64, kernel="cuda")
    levels = unpack(packed)
    assert levels[:64].eq(0).all() and levels[128:165].eq(0).all()  # NaN (0 * 1/0) fails every test
    assert state.absmax[0] == 0 and state.absmax[2] == 0
    assert dequantize_nf4(packed, state)[w == 0].eq(0).all()


def kernel_binary_search(x: float, code: list[float]) -> int:
    """bitsandbytes' dQuantize<0>, transcribed line by line, one value at a time."""
    f32 = lambda v: torch.tensor(v, dtype=torch.float32).item()  # noqa: E731
    pivot, upper_pivot, lower_pivot = 127, 255, 0
    lower, upper = -1.0, 1.0
    val = code[pivot]
    i = 64
    while i > 0:
        if x > val:
            lower_pivot, lower, pivot = pivot, val, pivot + i
        else:
            upper_pivot, upper, pivot = pivot, val, pivot - i
        val = code[pivot]
        i >>= 1
    if upper_pivot == 255:
        upper = code[upper_pivot]
    if lower_pivot == 0:
        lower = code[lower_pivot]
    if x > val:
        return upper_pivot if x > f32(f32(upper + val) * 0.5) else pivot
    return lower_pivot if x < f32(f32(lower + val) * 0.5) else pivot


def test_the_8bit_binary_search_is_the_kernels():
    code = dynamic_map()
    x = torch.cat([
        torch.tensor([math.nan, -1.0, 1.0, 0.0, -0.0]), code, (code[:-1] + code[1:]) / 2,
        torch.rand(2000, generator=torch.Generator().manual_seed(0)) * 2 - 1,
        torch.randn(500, generator=torch.Generator().manual_seed(1)) * 1e-4,
    ])
    ours = binary_search_8bit(x, code)
    expected = [kernel_binary_search(v, code.tolist()) for v in x.tolist()]
    assert ours.tolist() == expected
    assert ours[0] == 0  # NaN


def test_the_8bit_search_finds_the_nearest_level_where_the_cpu_grid_does_not():
    x = torch.tensor([1.0, 0.0, 1e-6, -1e-6, 3e-6])
    codes, _ = quantize_8bit_blockwise(x, kernel="cuda")
    nearest = (x[:, None] - dynamic_map()).abs().argmin(1)
    assert torch.equal(codes.long(), nearest)
    assert codes[1] == 127  # an exact 0 is level 127 (0.0); the CPU kernel stores 131
    assert quantize_8bit_blockwise(x, kernel="cpu")[0][1] == 131


def test_the_cpu_8bit_kernel_takes_the_level_nearest_its_grid_point():
    f32 = lambda v: torch.tensor(v, dtype=torch.float32).item()  # noqa: E731
    code = dynamic_map()
    x = torch.cat([
        torch.tensor([math.nan, math.inf, -math.inf, -1.0, 1.0, 0.0]), code, (code[:-1] + code[1:]) / 2,
        torch.rand(2000, generator=torch.Generator().manual_seed(0)) * 2 - 1,
        torch.randn(500, generator=torch.Generator().manual_seed(1)) * 1e-4,
    ])
    # One value at a time: NaN to -1 and clamped, the grid point in float32 arithmetic ...
    clamped = [-1.0 if math.isnan(v) else min(max(v, -1.0), 1.0) for v in x.tolist()]
    points = torch.tensor([math.floor(f32(f32(f32(v + 1) * GRID_HALF) + 0.5)) for v in clamped], dtype=torch.float64)
    # ... then the level nearest that point, the lower one on a tie.
    nearest = ((points / GRID_HALF - 1)[:, None] - code.double()).abs().argmin(1)
    assert torch.equal(grid_lookup_8bit(x, code).long(), nearest)


def test_kernel_must_be_cpu_cuda_or_none():
    assert ROUNDINGS == ("cpu", "cuda")
    with pytest.raises(ValueError, match="kernel must be one of"):
        quantize_nf4(torch.ones(64), kernel="gpu")
    with pytest.raises(ValueError, match="kernel must be one of"):
        quantize_8bit_blockwise(torch.ones(64), kernel="CUDA")
