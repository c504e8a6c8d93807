"""lora_edu.nf4: NF4 equal bit for bit to bitsandbytes on the CPU, and what chapter 4 claims about it.

A test that compares with bitsandbytes asks for the ``bnb`` fixture (or one built on it)
and skips without bitsandbytes; the rest run anywhere. The pieces of each kernel's
rounding are tested on their own in tests/test_nf4_bitexact.py.
"""

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lora_edu.nf4 import (
    BLOCKSIZES,
    NF4Linear,
    NF4State,
    bits_per_parameter,
    dequantize_8bit_blockwise,
    dequantize_int4,
    dequantize_nf4,
    dequantize_nf4_fast,
    dynamic_map,
    fp4_code,
    int4_roundtrip,
    nf4_code,
    quantize_8bit_blockwise,
    quantize_int4,
    quantize_nf4,
)

PROPERTY = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def weight(shape, dtype=torch.float32, seed=0, scale=0.02):
    return (torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * scale).to(dtype)


@pytest.fixture
def bnb_default_ops(monkeypatch):
    """bitsandbytes' pure-PyTorch backend (the test skips without bitsandbytes), run eagerly."""
    default_ops = pytest.importorskip("bitsandbytes.backends.default.ops")
    # bitsandbytes falls back to a torch.compile'd pure-PyTorch dequantize for odd shapes and
    # large blocks; run the same function eagerly, so the tests do not wait for compilation.
    compiled = default_ops._dequantize_4bit_compute
    monkeypatch.setattr(default_ops, "_dequantize_4bit_compute", getattr(compiled, "__wrapped__", compiled))
    return default_ops


@pytest.fixture
def bnb(bnb_default_ops):
    """``bitsandbytes.functional``; the test skips without bitsandbytes."""
    return pytest.importorskip("bitsandbytes.functional")


@pytest.fixture
def bnb_dequantize_reference(bnb, bnb_default_ops):
    """bitsandbytes' own pure-PyTorch dequantize (its default backend), whatever the shape."""

    def dequantize(packed, bnb_state):
        absmax = bnb_state.absmax
        if bnb_state.nested:
            absmax = bnb.dequantize_blockwise(bnb_state.absmax, bnb_state.state2) + bnb_state.offset
        code = bnb.get_4bit_type("nf4", device="cpu")
        return bnb_default_ops._dequantize_4bit_compute(
            packed.reshape(-1), absmax, code, bnb_state.blocksize, bnb_state.shape, bnb_state.dtype
        )

    return dequantize


@pytest.fixture
def assert_same_as_bnb(bnb, bnb_dequantize_reference):
    """``quantize_nf4(w, blocksize, double_quant)``, after checking its bytes and values equal bitsandbytes'."""

    def quantize(w, blocksize, double_quant):
        packed, state = quantize_nf4(w, blocksize, double_quant)
        bnb_packed, bnb_state = bnb.quantize_4bit(
            w, blocksize=blocksize, quant_type="nf4", compress_statistics=double_quant
        )
        assert packed.shape == bnb_packed.shape and packed.dtype == bnb_packed.dtype == torch.uint8
        assert torch.equal(packed, bnb_packed)
        if double_quant:
            assert state.absmax is None
            assert torch.equal(state.absmax_codes, bnb_state.absmax)
            assert torch.equal(state.absmax_scales, bnb_state.state2.absmax)
            assert torch.equal(state.absmax_offset, bnb_state.offset)
            assert torch.equal(state.dq_code, bnb_state.state2.code)
        else:
            assert torch.equal(state.absmax, bnb_state.absmax)
        ours = dequantize_nf4(packed, state)
        assert ours.shape == w.shape and ours.dtype == w.dtype
        assert torch.equal(ours, bnb_dequantize_reference(bnb_packed, bnb_state).reshape(w.shape))
        # bitsandbytes' AVX-512 CPU dequantize kernel misplaces block boundaries when a row's length
        # is not a multiple of the blocksize (see lora_edu.nf4_bitexact); compare with it elsewhere.
        if w.dim() == 1 or w.shape[-1] % blocksize == 0:
            assert torch.equal(ours, bnb.dequantize_4bit(bnb_packed, bnb_state).reshape(w.shape))
        return packed, state

    return quantize


@pytest.fixture(params=["ours", "bitsandbytes"])
def quantize(request):
    """``quantize_nf4(w, blocksize, double_quant)``: on its own, then once more checked against bitsandbytes.

    A test of an edge case asks for it, so that what it shows about ours holds without
    bitsandbytes too; only the second run skips without it.
    """
    return quantize_nf4 if request.param == "ours" else request.getfixturevalue("assert_same_as_bnb")


# ---------------------------------------------------------------------------------------
# The codes
# ---------------------------------------------------------------------------------------


def test_nf4_code_is_16_sorted_levels_with_an_exact_zero():
    code = nf4_code()
    assert code.dtype == torch.float32 and code.shape == (16,)
    assert torch.equal(code, code.sort().values)
    assert code[0] == -1 and code[7] == 0 and code[15] == 1
    assert (code > 0).sum() == 8 and (code < 0).sum() == 7  # asymmetric, so that 0 is a level


def test_nf4_code_equals_the_table_bitsandbytes_hard_codes(bnb):
    assert torch.equal(nf4_code(), bnb.get_4bit_type("nf4", device="cpu"))


def test_nf4_levels_are_normal_quantiles_in_float64_not_float32():
    # The QLoRA recipe in float32 misses bitsandbytes' table in the last bit: the precision is part of it.
    normal = torch.distributions.Normal(0.0, 1.0)
    positive = normal.icdf(torch.linspace(0.9677083, 0.5, 9))[:-1]
    negative = -normal.icdf(torch.linspace(0.9677083, 0.5, 8))[:-1]
    in_float32 = torch.cat([negative, torch.zeros(1), positive]).sort().values
    in_float32 = in_float32 / in_float32.max()
    assert (in_float32 - nf4_code()).abs().max() < 1e-6
    assert not torch.equal(in_float32, nf4_code())


def test_nf4_levels_cut_a_normal_into_equal_slices_of_probability():
    # Each positive level sits at a quantile: equally spaced probabilities between 0.5 and 0.968.
    normal = torch.distributions.Normal(0.0, 1.0)
    quantiles = nf4_code()[7:] * normal.icdf(torch.tensor(0.9677083))  # undo the scaling to [-1, 1]
    gaps = normal.cdf(quantiles).diff()
    assert torch.allclose(gaps, gaps.mean().expand_as(gaps), rtol=1e-5)


def test_fp4_code_has_eight_magnitudes_with_both_signs():
    magnitudes = torch.tensor([0, 0.0625, 2, 3, 4, 6, 8, 12]) / 12
    assert torch.equal(fp4_code().abs().unique(), magnitudes)


def test_fp4_code_equals_bitsandbytes(bnb):
    assert torch.equal(fp4_code(), bnb.get_4bit_type("fp4", device="cpu"))


def test_dynamic_map_has_256_distinct_levels_up_to_1():
    code = dynamic_map()
    assert code.shape == (256,) and code.unique().numel() == 256 and code[-1] == 1


def test_dynamic_map_equals_bitsandbytes(bnb):
    assert torch.equal(dynamic_map(), bnb.create_dynamic_map(signed=True))


# ---------------------------------------------------------------------------------------
# Bit for bit against bitsandbytes
# ---------------------------------------------------------------------------------------

SHAPES = [(1,), (2,), (63,), (64,), (1001,), (4097,), (3, 5), (17, 33), (8, 96), (48, 64), (5, 4096)]


@pytest.mark.parametrize("double_quant", [False, True], ids=["absmax", "double_quant"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_quantize_and_dequantize_equal_bitsandbytes(shape, dtype, double_quant, assert_same_as_bnb):
    w = weight(shape, dtype, seed=len(shape) * 10_000 + shape[-1])
    for blocksize in BLOCKSIZES:
        assert_same_as_bnb(w, blocksize, double_quant)


@PROPERTY
@given(
    rows=st.integers(1, 40),
    cols=st.integers(1, 300),
    blocksize=st.sampled_from(BLOCKSIZES),
    dtype=st.sampled_from(DTYPES),
    double_quant=st.booleans(),
    log_scale=st.floats(-6, 3),
    seed=st.integers(0, 2**31 - 1),
    one_d=st.booleans(),
)
def test_any_weight_equals_bitsandbytes(assert_same_as_bnb, rows, cols, blocksize, dtype, double_quant, log_scale,
                                       seed, one_d):
    w = weight((rows * cols,) if one_d else (rows, cols), dtype, seed, scale=10.0**log_scale)
    if torch.isfinite(w).all():  # float16 overflows for the largest scales
        assert_same_as_bnb(w, blocksize, double_quant)


def test_heavy_tailed_and_outlier_weights_equal_bitsandbytes(assert_same_as_bnb):
    g = torch.Generator().manual_seed(3)
    w = torch.distributions.StudentT(2.0).sample((70_000,)) * 0.01
    w[torch.randint(0, 70_000, (20,), generator=g)] *= 1000  # outliers wreck their own block only
    for blocksize in (64, 4096):
        for double_quant in (False, True):
            assert_same_as_bnb(w, blocksize, double_quant)


# ---------------------------------------------------------------------------------------
# At the edges, where bitsandbytes rounds as a textbook would not (see lora_edu.nf4_bitexact):
# each test runs on ours alone, then once more against bitsandbytes
# ---------------------------------------------------------------------------------------


def midpoints():
    code = nf4_code()
    return (code[:-1] + code[1:]) / 2


def test_a_value_exactly_on_a_midpoint_takes_the_lower_level(quantize):
    # absmax = 1 exactly, so scaling leaves each value on its float32 midpoint, in a full
    # block (multiplied by 1 / 1) and in a partial last block (divided by 1).
    mids = midpoints()
    above, below = torch.nextafter(mids, torch.tensor(2.0)), torch.nextafter(mids, torch.tensor(-2.0))
    full = torch.cat([torch.ones(1), mids, above, below, torch.zeros(18)])
    w = torch.cat([full, torch.ones(1), mids])  # 64 + 16 values
    packed, _ = quantize(w, 64, False)
    indices = torch.stack([packed.flatten() >> 4, packed.flatten() & 15], 1).flatten().long()
    k = torch.arange(15)
    assert torch.equal(indices[1:16], k)  # on the midpoint: the lower level
    assert torch.equal(indices[16:31], k + 1)  # one float above it: the upper
    assert torch.equal(indices[31:46], k)
    assert torch.equal(indices[65:80], k)


def straddling_values(rule_a, rule_b, seed=0, tries=20_000):
    """(absmax, x) pairs for which two ways of scaling x put it on opposite sides of an NF4 midpoint."""
    g = torch.Generator().manual_seed(seed)
    absmax = torch.rand(tries, generator=g) * 3 + 0.05
    mids = midpoints()[torch.randint(0, 15, (tries,), generator=g)]
    x = mids * absmax
    x = (x.view(torch.int32) + torch.randint(-2, 3, (tries,), generator=g, dtype=torch.int32)).view(torch.float32)
    a = torch.bucketize(rule_a(x, absmax), midpoints())
    b = torch.bucketize(rule_b(x, absmax), midpoints())
    return absmax[a != b], x[a != b]


def test_full_blocks_multiply_by_the_reciprocal_and_the_last_partial_block_divides(quantize):
    def multiply(x, a):
        return x * (1 / a)

    def divide(x, a):
        return x / a

    absmax, x = straddling_values(multiply, divide)
    assert len(x) >= 8, "found too few values where the two rules disagree to test anything"
    absmax, x = absmax[:8], x[:8]
    # 8 full blocks of 32, [absmax, x, 0, ...], then the same 8 pairs once more, each as a
    # 2-value partial last block of its own tensor.
    full = torch.zeros(8, 32)
    full[:, 0], full[:, 1] = absmax, x
    packed, state = quantize(full.flatten(), 32, False)
    second = (packed.flatten()[::16] & 15).long()  # the low nibble of each block's first byte: x's index
    assert torch.equal(second, torch.bucketize(multiply(x, absmax), midpoints()))
    assert not torch.equal(second, torch.bucketize(divide(x, absmax), midpoints()))
    for a, value in zip(absmax, x):
        tail = torch.cat([torch.zeros(32), torch.stack([a, value])])  # 34 values: blocks of 32 and 2
        packed, _ = quantize(tail, 32, False)
        assert (packed.flatten()[-1] & 15) == torch.bucketize(divide(value, a), midpoints())


def test_all_zero_blocks_store_the_zero_level_and_bitsandbytes_absmax(quantize):
    w = torch.zeros(64 + 10)
    packed, state = quantize(w, 64, False)
    assert torch.all(packed == 0x77)  # index 7 (0.0) in both nibbles
    assert state.absmax[0] == 0  # a full zero block keeps absmax 0...
    assert state.absmax[1] == torch.tensor(1e-38)  # ...a partial one keeps the clamp, 1e-38
    assert torch.equal(dequantize_nf4(packed, state), w)
    for w in (torch.zeros(300), torch.cat([torch.zeros(64), weight(64)])):
        packed, state = quantize(w, 64, True)
        assert torch.equal(dequantize_nf4(packed, state)[:64], torch.zeros(64))


def test_constant_weight_double_quantizes_to_its_mean(quantize):
    # Every absmax equals their mean, so the centred absmaxes are a block of zeros (0 * inf = NaN
    # in bitsandbytes' 8-bit kernel, stored as level 0) and the offset carries the scale alone.
    w = torch.full((256,), 0.5)
    packed, state = quantize(w, 64, True)
    assert torch.all(state.absmax_codes == 0) and state.absmax_scales.item() == 0
    assert torch.equal(dequantize_nf4(packed, state), w)


def test_nibble_order_first_value_in_the_high_nibble(quantize):
    w = torch.tensor([1.0, -1.0, 0.0])  # indices 15, 0, 7, then a padding 7
    packed, state = quantize(w, 32, False)
    assert packed.tolist() == [[0xF0], [0x77]]
    assert torch.equal(dequantize_nf4(packed, state), w)
    packed, _ = quantize(torch.tensor([-0.5, 1.0]), 32, False)
    assert packed.tolist() == [[(2 << 4) | 15]]  # -0.5 is nearest level 2, -0.525


def test_dequantize_can_round_once_to_another_dtype():
    w = weight((40, 64))
    packed, state = quantize_nf4(w)
    out = dequantize_nf4(packed, state, dtype=torch.bfloat16)
    assert out.dtype == torch.bfloat16 and torch.equal(out, dequantize_nf4(packed, state).to(torch.bfloat16))


# ---------------------------------------------------------------------------------------
# Double quantization's 8-bit kernel
# ---------------------------------------------------------------------------------------


@pytest.fixture
def bnb_8bit(bnb):
    """bitsandbytes' 8-bit blockwise quantize: (codes, absmax)."""

    def quantize(x, blocksize=256):
        codes, state = bnb.quantize_blockwise(x, blocksize=blocksize)
        return codes, state.absmax

    return quantize


@pytest.fixture(params=["ours", "bitsandbytes"])
def quantize_8bit(request):
    """``quantize_8bit_blockwise(x)``: on its own, then once more checked against bitsandbytes."""
    if request.param == "ours":
        return quantize_8bit_blockwise
    bnb_8bit = request.getfixturevalue("bnb_8bit")

    def checked(x):
        codes, absmax = quantize_8bit_blockwise(x)
        bnb_codes, bnb_absmax = bnb_8bit(x)
        assert torch.equal(codes, bnb_codes) and torch.equal(absmax, bnb_absmax)
        return codes, absmax

    return checked


def test_8bit_blockwise_equals_bitsandbytes_on_random_values(bnb, bnb_8bit):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(256 * 50 + 77, generator=g) * torch.rand(256 * 50 + 77, generator=g) ** 4
    for blocksize in (64, 256, 4096):
        codes, absmax = quantize_8bit_blockwise(x, blocksize)
        bnb_codes, bnb_absmax = bnb_8bit(x, blocksize)
        assert torch.equal(codes, bnb_codes) and torch.equal(absmax, bnb_absmax)
        bnb_values = bnb.dequantize_blockwise(bnb_codes, absmax=bnb_absmax, blocksize=blocksize)
        assert torch.equal(dequantize_8bit_blockwise(codes, absmax, blocksize), bnb_values)


def test_8bit_kernel_rounds_to_a_grid_of_65536_points_first(quantize_8bit):
    # Not the nearest level near 0: an exact 0 is stored as level 131 (2.1e-5), not 127 (0.0).
    code = dynamic_map()
    x = torch.tensor([1.0, 0.0, 1e-6, -1e-6, 3e-6])
    codes, _ = quantize_8bit(x)
    assert codes[1] == 131 and code[127] == 0
    nearest = (x[:, None] - code).abs().argmin(1)
    assert not torch.equal(codes.long(), nearest)


def test_8bit_kernel_multiplies_by_the_reciprocal_at_grid_boundaries(quantize_8bit):
    # Values placed a few floats around the edges between grid points, in blocks of varied absmax:
    # dividing instead of multiplying by 1 / absmax would move some of them to the next level.
    g = torch.Generator().manual_seed(2)
    n_blocks = 400
    absmax = torch.rand(n_blocks, generator=g) * 5 + 0.01
    j = torch.randint(1, 65536, (n_blocks, 255), generator=g)
    edges = ((j + (j == 32768)).float() - 0.5) / 32767.5 - 1  # (the edge at 0 has no bit pattern to nudge)
    nudge = torch.randint(-3, 4, (n_blocks, 255), generator=g, dtype=torch.int32)  # a few floats either way
    x = (edges * absmax[:, None]).view(torch.int32) + nudge
    x = torch.cat([absmax[:, None], x.view(torch.float32).clamp(-absmax[:, None], absmax[:, None])], dim=1).flatten()
    codes, scales = quantize_8bit(x)
    assert torch.equal(scales, absmax)
    divided = (x.view(n_blocks, 256) / absmax[:, None]).clamp(-1, 1)  # the same kernel, dividing
    grid = torch.floor((divided + 1) * 32767.5 + 0.5).long()
    lookup = torch.bucketize(torch.arange(65536, dtype=torch.float64) / 32767.5 - 1,
                             (dynamic_map().double()[:-1] + dynamic_map().double()[1:]) / 2)
    assert (lookup[grid].flatten() != codes.long()).any()


def test_8bit_kernel_edge_cases_equal_bitsandbytes(bnb_8bit):
    for x in (torch.zeros(3), torch.tensor([1e-39, -1e-39, 0.0, 5e-40]), torch.tensor([3e-39, -3e-39, 0.0, 1e-39])):
        codes, absmax = quantize_8bit_blockwise(x)
        bnb_codes, bnb_absmax = bnb_8bit(x)
        assert torch.equal(codes, bnb_codes) and torch.equal(absmax, bnb_absmax), x


# ---------------------------------------------------------------------------------------
# The fast dequantize path (what NF4Linear runs) gives the teaching version's values
# ---------------------------------------------------------------------------------------

FAST_SHAPES = [(1,), (7,), (64,), (65,), (3, 100), (17, 129), (64, 256), (4, 80), (513, 1031)]


@pytest.mark.parametrize("chunk_bytes", [2048, None], ids=["small-chunks", "default-chunks"])
@pytest.mark.parametrize("shape", FAST_SHAPES, ids=str)
@pytest.mark.parametrize("double_quant", [False, True])
def test_fast_dequantize_equals_the_teaching_version(shape, double_quant, chunk_bytes, monkeypatch):
    import lora_edu.nf4 as nf4

    if chunk_bytes is not None:  # many chunks, with blocks and odd lengths ending inside them
        monkeypatch.setattr(nf4, "_FAST_CHUNK_BYTES", chunk_bytes)
    for dtype in DTYPES:
        w = weight(shape, dtype)
        for blocksize in (32, 64, 256, 4096):
            packed, state = quantize_nf4(w, blocksize, double_quant)
            for out_dtype in (None, torch.float32, torch.bfloat16, torch.float16):
                fast, teaching = dequantize_nf4_fast(packed, state, out_dtype), dequantize_nf4(packed, state, out_dtype)
                assert fast.shape == teaching.shape == w.shape and fast.dtype == teaching.dtype
                assert torch.equal(fast, teaching), (dtype, blocksize, out_dtype)


def test_fast_dequantize_equals_bitsandbytes_across_chunks(bnb, bnb_dequantize_reference):
    w = weight((600, 1000))  # 600,000 values: three chunks of 2^18, the last one partial
    for blocksize in (64, 4096):
        packed, state = quantize_nf4(w, blocksize, True)
        bnb_packed, bnb_state = bnb.quantize_4bit(w, blocksize=blocksize, quant_type="nf4", compress_statistics=True)
        expected = bnb_dequantize_reference(bnb_packed, bnb_state).reshape(w.shape)
        assert torch.equal(dequantize_nf4_fast(packed, state), expected)


def test_fast_dequantize_keeps_zero_blocks_and_edge_levels():
    w = torch.cat([torch.zeros(64), torch.tensor([1.0, -1.0, 0.0]), torch.zeros(10)])
    for double_quant in (False, True):
        packed, state = quantize_nf4(w, 64, double_quant)
        assert torch.equal(dequantize_nf4_fast(packed, state), dequantize_nf4(packed, state))
    assert torch.equal(dequantize_nf4_fast(*quantize_nf4(w, 64)), w)


def test_nf4_linear_uses_the_fast_path(monkeypatch):
    import lora_edu.nf4 as nf4

    layer = NF4Linear.from_linear(nn.Linear(64, 8))
    calls = []
    monkeypatch.setattr(nf4, "dequantize_nf4_fast", lambda *args, **kw: calls.append(1) or dequantize_nf4(*args, **kw))
    layer(torch.randn(2, 64))
    assert calls


@given(st.integers(1, 3000), st.sampled_from(BLOCKSIZES), st.booleans(), st.integers(0, 2**31 - 1))
@PROPERTY
def test_fast_dequantize_property(numel, blocksize, double_quant, seed):
    packed, state = quantize_nf4(weight((numel,), seed=seed), blocksize, double_quant)
    assert torch.equal(dequantize_nf4_fast(packed, state), dequantize_nf4(packed, state))


# ---------------------------------------------------------------------------------------
# What the chapter claims
# ---------------------------------------------------------------------------------------


def test_bits_per_parameter():
    assert bits_per_parameter(64) == 4.5
    assert bits_per_parameter(64, double_quant=True) == pytest.approx(4.127, abs=5e-4)
    assert bits_per_parameter(64, True) == 4 + 8 / 64 + 32 / (64 * 256)
    assert bits_per_parameter(32) == 5.0
    assert bits_per_parameter(4096, True) < bits_per_parameter(64, True)


@pytest.mark.parametrize("double_quant", [False, True])
def test_bits_per_parameter_is_what_quantize_nf4_stores(double_quant):
    n = 64 * 256 * 3
    packed, state = quantize_nf4(weight(n), 64, double_quant)
    stored = [packed, state.absmax] if not double_quant else [packed, state.absmax_codes, state.absmax_scales]
    bits = sum(t.numel() * t.element_size() * 8 for t in stored)
    assert bits / n == bits_per_parameter(64, double_quant)


def test_reconstruction_error_is_at_most_half_a_level_gap_per_block():
    w = weight((64, 256), seed=4)
    packed, state = quantize_nf4(w, 64)
    error = (dequantize_nf4(packed, state) - w).abs().view(-1, 64)
    half_gap = nf4_code().diff().max() / 2
    assert torch.all(error <= state.absmax[:, None] * half_gap * (1 + 1e-5))


def test_double_quantization_only_changes_the_absmaxes_and_barely():
    w = weight((256, 512), seed=5)
    packed, single = quantize_nf4(w, 64, False)
    packed_dq, double = quantize_nf4(w, 64, True)
    assert torch.equal(packed, packed_dq)  # the 4-bit indices are computed before the absmaxes are compressed
    assert ((double.block_absmax() - single.absmax) / single.absmax).abs().max() < 0.01
    error, error_dq = (dequantize_nf4(packed, single) - w).norm(), (dequantize_nf4(packed, double) - w).norm()
    assert abs(error_dq / error - 1) < 1e-3


def test_nf4_beats_int4_and_fp4_on_normal_weights():
    w = weight(64 * 2048, seed=6)
    nf4_error = (dequantize_nf4(*quantize_nf4(w, 64)) - w).pow(2).mean()
    int4_error = (int4_roundtrip(w, 64) - w).pow(2).mean()
    blocks = w.view(-1, 64)
    absmax = blocks.abs().amax(1, keepdim=True)
    fp4 = fp4_code()
    nearest_fp4 = fp4[(blocks[..., None] / absmax[..., None] - fp4).abs().argmin(-1)]
    fp4_error = (nearest_fp4 * absmax - blocks).pow(2).mean()
    assert nf4_error < int4_error and nf4_error < fp4_error


def test_int4_roundtrip():
    w = weight((10, 70), seed=7)
    codes, absmax = quantize_int4(w, 32)
    assert codes.dtype == torch.int8 and codes.shape == w.shape and codes.abs().max() == 7
    assert absmax.shape == (math.ceil(700 / 32),)
    back = dequantize_int4(codes, absmax, 32)
    assert torch.all((back - w).abs().view(-1)[:672].view(-1, 32) <= absmax[:21, None] / 14 * (1 + 1e-5))
    on_grid = torch.tensor([7.0, -7.0, 3.0, 0.0, -1.0]) / 7 * 2.5
    assert torch.equal(int4_roundtrip(on_grid, 32), on_grid)
    assert torch.equal(int4_roundtrip(torch.zeros(40), 32), torch.zeros(40))
    assert int4_roundtrip(w.to(torch.bfloat16), 32).dtype == torch.bfloat16


# ---------------------------------------------------------------------------------------
# NF4Linear
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("double_quant", [False, True])
def test_nf4_linear_computes_with_the_dequantized_weight(double_quant):
    linear = nn.Linear(128, 48)
    layer = NF4Linear.from_linear(linear, blocksize=64, double_quant=double_quant)
    x = torch.randn(5, 7, 128)
    packed, state = quantize_nf4(linear.weight.detach(), 64, double_quant)
    assert torch.equal(layer(x), F.linear(x, dequantize_nf4(packed, state), linear.bias))
    expected = linear(x)
    assert ((layer(x) - expected).norm() / expected.norm()) < 0.1
    assert torch.equal(layer.weight_packed, packed)


def test_nf4_linear_weight_is_frozen_and_not_a_parameter():
    linear = nn.Linear(64, 32)
    layer = NF4Linear.from_linear(linear)
    assert [name for name, _ in layer.named_parameters()] == ["bias"]
    assert not any(p.requires_grad for p in layer.parameters())
    assert "weight_packed" in dict(layer.named_buffers()) and "weight_packed" in layer.state_dict()
    assert linear.weight.requires_grad  # the source layer is left alone
    x = torch.randn(3, 64, requires_grad=True)
    layer(x).sum().backward()  # gradients still flow to the input, as LoRA needs
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_nf4_linear_compute_dtype_and_no_bias():
    linear = nn.Linear(64, 16, bias=False)
    layer = NF4Linear.from_linear(linear, double_quant=False, compute_dtype=torch.bfloat16)
    x = torch.randn(2, 64)
    out = layer(x)
    assert out.dtype == torch.bfloat16 and layer.bias is None
    assert torch.equal(out, F.linear(x.to(torch.bfloat16), layer.dequantized_weight()))
    assert "double_quant=False" in repr(layer)


# ---------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------


def mismatched(**changes):
    packed, state = quantize_nf4(weight((4, 64)), 64)
    fields = {**state.__dict__, **changes}
    return packed, NF4State(**fields)


@pytest.mark.parametrize("call, error, message", [
    (lambda: quantize_nf4(torch.ones(4, dtype=torch.long)), TypeError, "floating-point"),
    (lambda: quantize_nf4([1.0, 2.0]), TypeError, "w must be a torch.Tensor"),
    (lambda: quantize_nf4(torch.ones(0, 3)), ValueError, "must not be empty"),
    (lambda: quantize_nf4(torch.tensor([1.0, float("nan")])), ValueError, "1 NaN or infinite"),
    (lambda: quantize_nf4(torch.tensor([1.0, float("inf"), -float("inf")])), ValueError, "2 NaN or infinite"),
    (lambda: quantize_nf4(torch.tensor([1e39], dtype=torch.float64)), ValueError, "infinite value"),
    (lambda: quantize_nf4(torch.ones(8), blocksize=48), ValueError, "blocksize must be a power of two from 32 to 4096"),
    (lambda: quantize_nf4(torch.ones(8), blocksize=16), ValueError, "blocksize must be a power of two"),
    (lambda: quantize_nf4(torch.ones(8), blocksize=8192), ValueError, "got 8192"),
    (lambda: quantize_nf4(torch.ones(8), blocksize=64.0), ValueError, "blocksize must"),
    (lambda: quantize_nf4(torch.ones(8), double_quant=1), TypeError, "double_quant must be True or False"),
    (lambda: dequantize_nf4(quantize_nf4(torch.ones(8))[0][:3], quantize_nf4(torch.ones(8))[1]),
     ValueError, "packed has 3 bytes"),
    (lambda: dequantize_nf4(*mismatched(shape=torch.Size((4, 65)))), ValueError, "they do not belong together"),
    (lambda: dequantize_nf4(*mismatched(blocksize=32)), ValueError, "state.absmax has 4 values, but shape"),
    (lambda: dequantize_nf4(*mismatched(blocksize=100)), ValueError, "state.blocksize must be a power of two"),
    (lambda: dequantize_nf4_fast(*mismatched(shape=torch.Size((4, 65)))), ValueError, "they do not belong together"),
    (lambda: dequantize_nf4_fast(quantize_nf4(torch.ones(8))[0], {"absmax": 1}), TypeError, "state must be an NF4State"),
    (lambda: dequantize_nf4(quantize_nf4(torch.ones(8))[0].float(), quantize_nf4(torch.ones(8))[1]),
     TypeError, "packed must be a uint8"),
    (lambda: dequantize_nf4(quantize_nf4(torch.ones(8))[0], {"absmax": 1}), TypeError, "state must be an NF4State"),
    (lambda: dequantize_nf4(quantize_nf4(torch.ones(4, 64), 64, True)[0],
                            NF4State(**{**quantize_nf4(torch.ones(4, 64), 64, True)[1].__dict__, "blocksize": 32})),
     ValueError, "absmax_codes has 4 codes"),
    (lambda: dequantize_int4(torch.zeros(8, dtype=torch.int8), torch.ones(2), 32), ValueError, "absmax has 2 values"),
    (lambda: dequantize_int4(torch.zeros(8), torch.ones(1), 32), TypeError, "codes must be an int8"),
    (lambda: quantize_int4(torch.ones(8), 3), ValueError, "blocksize must"),
    (lambda: bits_per_parameter(0), ValueError, "blocksize must be a positive int"),
    (lambda: quantize_8bit_blockwise(torch.ones(8), 0), ValueError, "blocksize must be a positive int"),
    (lambda: NF4Linear.from_linear(nn.Conv1d(2, 2, 1)), TypeError, "linear must be an nn.Linear"),
    (lambda: NF4Linear(*quantize_nf4(torch.ones(64))), ValueError, "2-D"),
    (lambda: NF4Linear(*quantize_nf4(torch.ones(2, 64)), bias=torch.ones(3)),
     ValueError, r"bias must have shape \(2,\)"),
    (lambda: NF4Linear(*quantize_nf4(torch.ones(2, 64)), compute_dtype=torch.int32), TypeError, "compute_dtype"),
])
def test_bad_input_gets_a_clear_error(call, error, message):
    with pytest.raises(error, match=message):
        call()
