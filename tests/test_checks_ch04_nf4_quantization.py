"""Chapter 4's checkers accept the right answer and reject wrong ones with a useful sentence."""

import math
import statistics

import pytest
import torch
import torch.nn.functional as F

from lora_edu.checks import (
    CheckFailed,
    check_bits_per_parameter,
    check_lloyd_max_levels,
    check_nf4_values,
    check_pack_unpack,
    check_quantize_block,
)
from lora_edu.nf4 import ZERO_CODE, nf4_code, quantize_nf4


def stub(*args):
    raise NotImplementedError("Exercise hint")


# --- Exercise 4.1: the 16 NF4 levels ---

def make_values(icdf=torch.distributions.Normal(0.0, 1.0).icdf, offset=0.9677083, n_pos=9, n_neg=8, drop_last=True,
                zero=True, symmetric=False, normalise=True, sort=True, dtype=torch.float32, out=lambda v: v):
    """An nf4_values, right by default (float32 quantiles); each option breaks it in one way."""

    def nf4_values():
        positive = icdf(torch.linspace(offset, 0.5, n_pos, dtype=dtype))
        negative = -icdf(torch.linspace(offset, 0.5, n_neg, dtype=dtype))
        if drop_last:
            positive, negative = positive[:-1], negative[:-1]
        if symmetric:
            negative = -positive
        levels = torch.cat([negative, torch.zeros(1 if zero else 0, dtype=dtype), positive])
        if sort:
            levels = levels.sort().values
        if normalise:
            levels = levels / levels.max()
        return out(levels)

    return nf4_values


def inv_cdf_from_statistics(p):  # also right: float64 quantiles from the standard library
    normal = statistics.NormalDist()
    return torch.tensor([normal.inv_cdf(x) for x in p.tolist()], dtype=torch.float64)


def reversed_linspace():  # probabilities running up from 0.5: [:-1] drops the outermost one, not 0.5
    icdf = torch.distributions.Normal(0.0, 1.0).icdf
    positive = icdf(torch.linspace(0.5, 0.9677083, 9))[:-1]
    negative = -icdf(torch.linspace(0.5, 0.9677083, 8))[:-1]
    levels = torch.cat([negative, torch.zeros(1), positive]).sort().values
    return levels / levels.max()


WRONG_VALUES = {
    "symmetric 8 + 8": (make_values(zero=False, symmetric=True), "none of your levels is 0: NF4 is asymmetric"),
    "not normalised": (make_values(normalise=False), r"span \[-1.8\d+, 1.8\d+\]: divide them all by the largest"),
    "unsorted": (make_values(sort=False), r"right levels, but not in order: sort them ascending"),
    "descending": (make_values(out=lambda v: v.flip(0)), "not in order"),
    "offset 0.99": (make_values(offset=0.99), r"level \d+ is .* check the probabilities, which start at 0.9677083"),
    "offset 1": (make_values(offset=1.0), "NaN or inf: the normal quantile of 1 is infinite"),
    "15 values": (make_values(n_pos=8), "returned 15 values, but NF4 has 16: 4 bits store 16"),
    "17 values, no [:-1]": (make_values(drop_last=False, zero=False), r"returned 17 values.* drop it with \[:-1\]"),
    "2-D": (make_values(out=lambda v: v[None]), r"1-D tensor of 16 levels, but yours has shape \(1, 16\)"),
    "a list": (make_values(out=lambda v: v.tolist()), r"returned a list: turn your list into one with torch\.tensor"),
    "no return": (lambda: None, "return statement missing"),
    "integers": (make_values(out=lambda v: v.round().long()), "holds torch.int64"),
    "float64": (make_values(dtype=torch.float64), r"right but torch.float64: return float32"),
    "linspace upwards": (reversed_linspace, "3 of your levels are 0, but the quantile of 0.5 is 0"),
    "stub": (stub, "still the stub"),
}


@pytest.mark.parametrize("right", [
    make_values(), make_values(icdf=torch.special.ndtri), make_values(icdf=torch.special.ndtri, dtype=torch.float64,
                                                                     out=lambda v: v.float()),
    make_values(icdf=inv_cdf_from_statistics, dtype=torch.float64, out=lambda v: v.float()), nf4_code,
])
def test_nf4_values_accepts(right, capsys):
    check_nf4_values(right)
    assert capsys.readouterr().out.startswith("Correct:")


@pytest.mark.parametrize("name", WRONG_VALUES)
def test_nf4_values_rejects(name):
    fn, message = WRONG_VALUES[name]
    with pytest.raises(CheckFailed, match=message):
        check_nf4_values(fn)


# --- Exercise 4.2: quantizing one block ---

def make_quantize(scale=lambda block, absmax: block * (1 / absmax), clamp=True, lookup=None,
                  out=lambda indices, absmax: (indices, absmax)):
    """A quantize_block, right by default; each option breaks it in one way."""

    def quantize_block(block, code):
        absmax = block.abs().max()
        scaled = scale(block, absmax)
        if clamp:
            scaled = scaled.clamp(-1, 1)
        midpoints = (code[1:] + code[:-1]) / 2
        indices = lookup(scaled, code) if lookup else torch.bucketize(scaled, midpoints)
        return out(indices, absmax)

    return quantize_block


def argmin_lookup(scaled, code):
    return (scaled[:, None] - code).abs().argmin(dim=1)


def by_max(block, code):
    top = block.max()
    return torch.bucketize((block * (1 / top)).clamp(-1, 1), (code[1:] + code[:-1]) / 2), top


def in_place(block, code):
    absmax = block.abs().max()
    block.mul_(1 / absmax)
    return torch.bucketize(block, (code[1:] + code[:-1]) / 2), absmax


def loop_version(block, code):  # also right: one value at a time, ties to the lower level
    absmax = block.abs().max().item()
    indices = []
    for x in block.tolist():
        s = min(max(x * (1 / absmax), -1.0), 1.0)
        s = torch.tensor(s, dtype=torch.float32).item()  # the scaled value in float32, as a tensor would hold it
        mids = ((code[1:] + code[:-1]) / 2).tolist()
        indices.append(sum(s > m for m in mids))
    return torch.tensor(indices, dtype=torch.uint8), absmax


WRONG_QUANTIZE = {
    "ties up (bucketize right=True)": (make_quantize(lookup=lambda s, c: torch.bucketize(s, (c[1:] + c[:-1]) / 2, right=True)),
                                       "exactly on the midpoint .* takes the lower one"),
    "ties up (argmin)": (make_quantize(lookup=argmin_lookup), r"exactly on the midpoint .* \(argmin over distances can tip such a tie upwards"),
    "no division": (make_quantize(scale=lambda block, absmax: block), "divide the block by its absmax first"),
    "max, not abs max": (by_max, r"you took block\.max\(\), which misses a larger negative value"),
    "max for scaling only": (make_quantize(scale=lambda block, absmax: block * (1 / block.max())),
                             r"you scaled by block\.max\(\), but the largest magnitude here is negative"),
    "rounds up": (make_quantize(lookup=lambda s, c: torch.bucketize(s, c)), "rounded each value up to the next level"),
    "rounds down": (make_quantize(lookup=lambda s, c: (torch.bucketize(s, c, right=True) - 1).clamp(min=0)),
                    "rounded each value down"),
    "index 16": (make_quantize(lookup=lambda s, c: torch.bucketize(s, c, right=True)),
                 r"index 16 for the value .* indices 0 to 15"),
    "hard-coded NF4 levels": (make_quantize(lookup=lambda s, c: torch.bucketize(s, (nf4_code()[1:] + nf4_code()[:-1]) / 2)),
                              "look the values up in the code argument"),
    "indices as float": (make_quantize(out=lambda i, a: (i.float(), a)), "integers .* torch.float32"),
    "indices (n, 1)": (make_quantize(out=lambda i, a: (i[:, None], a)), r"shape \(64,\), .* yours has \(64, 1\)"),
    "absmax of shape (1,)": (make_quantize(out=lambda i, a: (i, a.reshape(1))), r"0-d tensor, but yours has shape \(1,\)"),
    "swapped": (make_quantize(out=lambda i, a: (a, i)), r"order \(indices, absmax\)"),
    "indices only": (make_quantize(out=lambda i, a: i), r"pair \(indices, absmax\), but it returned a Tensor"),
    "absmax as a string": (make_quantize(out=lambda i, a: (i, str(a.item()))), "absmax should be a float .* a str"),
    "in place": (in_place, "changed its argument block"),
    "off by one": (make_quantize(out=lambda i, a: ((i + 1).clamp(max=15), a)), r"whose nearest level is code\[\d+\]"),
    "stub": (stub, "still the stub"),
}


@pytest.mark.parametrize("right", [
    make_quantize(), make_quantize(clamp=False), make_quantize(scale=lambda block, absmax: block / absmax),
    make_quantize(out=lambda i, a: (i.to(torch.uint8), a.item())),
    make_quantize(lookup=lambda s, c: torch.searchsorted((c[1:] + c[:-1]) / 2, s)), loop_version,
])
def test_quantize_block_accepts(right, capsys):
    check_quantize_block(right)
    assert capsys.readouterr().out.startswith("Correct:")


@pytest.mark.parametrize("name", WRONG_QUANTIZE)
def test_quantize_block_rejects(name):
    fn, message = WRONG_QUANTIZE[name]
    with pytest.raises(CheckFailed, match=message):
        check_quantize_block(fn)


def test_quantize_block_reference_agrees_with_quantize_nf4():
    """The checker's small reference gives quantize_nf4's indices on each of its NF4 cases (blocksize 64)."""
    from lora_edu.checks.ch04_nf4_quantization import _block_cases, _reference_indices

    cases = [(setting, block) for setting, block, code in _block_cases() if torch.equal(code, nf4_code())]
    assert len(cases) == 5
    for setting, block in cases:
        packed, _ = quantize_nf4(block, blocksize=64)
        packed = packed.reshape(-1)
        indices = torch.stack([packed >> 4, packed & 0x0F], dim=1).reshape(-1)[: block.numel()]  # first element high
        assert torch.equal(_reference_indices(block, nf4_code()), indices.long()), setting


def test_a_missing_clamp_cannot_change_an_index():
    """Why the checker cannot catch a missing clamp: in float32, a * (1 / a) never exceeds 1 (every a in [1, 2))."""
    a = torch.arange(0x3F800000, 0x40000000, dtype=torch.int32).view(torch.float32)
    assert (a * (1 / a)).max().item() == 1.0


# --- Exercise 4.3: packing two indices per byte ---

def right_pack(indices):  # an odd count is padded with 7, the index of 0.0, as quantize_nf4 does
    indices = F.pad(indices.long(), (0, indices.numel() % 2), value=ZERO_CODE)
    return ((indices[0::2] << 4) | indices[1::2]).to(torch.uint8)


def right_unpack(packed, n):
    return torch.stack([packed >> 4, packed & 0x0F], dim=1).reshape(-1)[:n]


def arithmetic_pack(indices):  # also right: with * 16 and a loop
    values = indices.tolist() + [7] * (len(indices) % 2)
    return torch.tensor([16 * values[i] + values[i + 1] for i in range(0, len(values), 2)], dtype=torch.uint8)


def arithmetic_unpack(packed, n):  # also right: // and %
    return torch.stack([packed.long() // 16, packed.long() % 16], dim=1).reshape(-1)[:n]


def uint8_pack(indices):  # also right: uint8 throughout, padding with torch.cat
    indices = indices.to(torch.uint8)
    if indices.numel() % 2:
        indices = torch.cat([indices, torch.tensor([7], dtype=torch.uint8)])
    return indices[0::2] * 16 + indices[1::2]


def pack_low_first(indices):
    indices = F.pad(indices.long(), (0, indices.numel() % 2), value=7)
    return ((indices[1::2] << 4) | indices[0::2]).to(torch.uint8)


def pack_low_first_padding_with_zero(indices):
    indices = F.pad(indices.long(), (0, indices.numel() % 2))
    return ((indices[1::2] << 4) | indices[0::2]).to(torch.uint8)


def unpack_low_first(packed, n):
    return torch.stack([packed & 0x0F, packed >> 4], dim=1).reshape(-1)[:n]


def pack_without_padding(indices):
    indices = indices.long()
    return ((indices[0::2] << 4) | indices[1::2]).to(torch.uint8)


def pack_pairs_without_padding(indices):  # reshape(-1, 2) raises a RuntimeError for an odd count
    pairs = indices.long().reshape(-1, 2)
    return (pairs[:, 0] * 16 + pairs[:, 1]).to(torch.uint8)


def pack_truncating(indices):
    indices = indices.long()[: indices.numel() // 2 * 2]
    return ((indices[0::2] << 4) | indices[1::2]).to(torch.uint8)


def pack_with_zero(indices):  # the old convention: the padding decodes to -absmax, not 0
    indices = F.pad(indices.long(), (0, indices.numel() % 2))
    return ((indices[0::2] << 4) | indices[1::2]).to(torch.uint8)


def pack_with_fifteen(indices):
    indices = F.pad(indices.long(), (0, indices.numel() % 2), value=15)
    return ((indices[0::2] << 4) | indices[1::2]).to(torch.uint8)


def pack_with_zero_on_long_inputs(indices):  # right on the small cases: only quantize_nf4's odd case catches it
    return right_pack(indices) if indices.numel() <= 33 else pack_with_zero(indices)


def mutating_pack(indices):
    packed = right_pack(indices)
    indices.zero_()
    return packed


WRONG_PACK = {
    "pack low nibble first": ((pack_low_first, right_unpack), "nibbles are swapped: the first index of each pair goes in the high"),
    "pack low nibble first, padding with 0": ((pack_low_first_padding_with_zero, right_unpack),
                                              "nibbles are swapped: the first index of each pair goes in the high"),
    "unpack low nibble first": ((right_pack, unpack_low_first), "nibbles are swapped: the high nibble .* is the first index"),
    "no padding (broadcasts)": ((pack_without_padding, right_unpack),
                                r"indices=\[1, 2, 3\], pack gave \[0x12, 0x32\] but should give \[0x12, 0x37\]: with an "
                                r"odd count the last byte holds the last index and a 7: .*pad with 7, the index of 0\.0 \(lora_edu\.nf4\.ZERO_CODE\), so the padding decodes to exactly zero"),
    "no padding (crash)": ((pack_pairs_without_padding, right_unpack),
                           r"an odd count, pack raised RuntimeError .* even length first: pad with 7, the index of 0\.0 \(lora_edu\.nf4\.ZERO_CODE\), so the padding decodes to exactly zero"),
    "no padding (truncates)": ((pack_truncating, right_unpack), r"with an odd count .* ceil\(n / 2\) bytes: pad with 7, the index of 0\.0 \(lora_edu\.nf4\.ZERO_CODE\), so the padding decodes to exactly zero"),
    "padding with 0": ((pack_with_zero, right_unpack),
                       r"indices=\[1, 2, 3\], pack gave \[0x12, 0x30\] but should give \[0x12, 0x37\]: you padded "
                       r"with 0, which decodes to -1 times the absmax .*pad with 7, the index of 0\.0 \(lora_edu\.nf4\.ZERO_CODE\), so the padding decodes to exactly zero"),
    "padding with 0 on long inputs only": ((pack_with_zero_on_long_inputs, right_unpack),
                                           r"the 63 uint8 indices .*quantize_nf4 .*, byte 31 is 0x[0-9A-F]0 but should "
                                           r"be 0x[0-9A-F]7: you padded with 0"),
    "padding with 15": ((pack_with_fifteen, right_unpack), r"pack gave \[0x12, 0x3F\] .*: with an odd count .* a 7"),
    "unpack ignores n": ((right_pack, lambda packed, n: right_unpack(packed, None)), r"padding nibble .* \[:n\]"),
    "pack returns int64": ((lambda i: right_pack(i).long(), right_unpack), r"right but torch.int64, .* torch.uint8"),
    "unpack without the mask": ((right_pack, lambda p, n: torch.stack([p >> 4, p], dim=1).reshape(-1)[:n]),
                                r"values up to 18: the second index of each byte is only its low 4 bits, packed & 0x0F"),
    "one value per index": ((lambda i: i.to(torch.uint8), right_unpack), "one value per index; pack two per byte"),
    "pack changes its input": ((mutating_pack, right_unpack), "pack changed its argument indices in place"),
    "unpack as float": ((right_pack, lambda p, n: right_unpack(p, n).float()), "integer indices, but yours are torch.float32"),
    "pack returns a list": ((lambda i: right_pack(i).tolist(), right_unpack), "returned a list"),
    "pack wrong on long inputs only": ((lambda i: right_pack(i) if i.numel() <= 8 else right_pack(i).flip(0), right_unpack),
                                       r"quantize_nf4, byte 0 is 0x[0-9A-F]{2} but should be 0x[0-9A-F]{2}: each byte"),
    "unpack wrong on long inputs only": ((right_pack, lambda p, n: right_unpack(p, n) if n <= 8 else right_unpack(p, n).flip(0)),
                                         r"For the bytes of the 64 uint8 indices .*, index 0 is \d+ but should be \d+"),
    "pack stub": ((stub, right_unpack), "still the stub"),
    "unpack stub": ((right_pack, stub), "still the stub"),
}


@pytest.mark.parametrize("right", [(right_pack, right_unpack), (arithmetic_pack, arithmetic_unpack),
                                   (uint8_pack, right_unpack)])
def test_pack_unpack_accepts(right, capsys):
    check_pack_unpack(*right)
    assert capsys.readouterr().out.startswith("Correct:")


@pytest.mark.parametrize("name", WRONG_PACK)
def test_pack_unpack_rejects(name):
    fns, message = WRONG_PACK[name]
    with pytest.raises(CheckFailed, match=message):
        check_pack_unpack(*fns)


def test_pack_cases_follow_quantize_nf4_and_the_hand_made_example():
    from lora_edu.checks.ch04_nf4_quantization import _pack_cases, _reference_pack

    cases = list(_pack_cases())
    assert cases[0][1].tolist() == [1, 2, 3] and cases[0][2].tolist() == [0x12, 0x37]
    by_values = {tuple(indices.tolist()): packed.tolist() for _, indices, packed in cases[:4]}
    assert by_values == {(1, 2, 3): [0x12, 0x37], (0, 15, 7, 8): [0x0F, 0x78], (15,): [0xF7],
                         (10, 5, 0, 12, 3): [0xA5, 0x0C, 0x37]}
    for setting, indices, packed in cases:
        assert packed.dtype == torch.uint8 and torch.equal(_reference_pack(indices), packed), setting
    from_nf4 = [indices.numel() for setting, indices, _ in cases if "quantize_nf4" in setting]
    assert 64 in from_nf4 and 63 in from_nf4  # an even and an odd count straight from the package's quantizer


def test_odd_counts_are_padded_with_the_index_of_zero_like_quantize_nf4():
    """The exercise's convention is the package's: the padding nibble is ZERO_CODE = 7, which decodes to 0.0."""
    from lora_edu.checks.ch04_nf4_quantization import _reference_pack

    assert ZERO_CODE == 7 and nf4_code()[ZERO_CODE].item() == 0.0
    g = torch.Generator().manual_seed(0)
    for n in (1, 3, 63, 65, 127):
        packed, _ = quantize_nf4(torch.randn(n, generator=g), blocksize=64)
        packed = packed.reshape(-1)
        assert packed[-1].item() & 0x0F == ZERO_CODE, n
        indices = right_unpack(packed, n)
        assert torch.equal(_reference_pack(indices), packed) and torch.equal(right_pack(indices), packed), n


# --- Exercise 4.4: bits per parameter ---

def make_bits(single=lambda bs: 4 + 32 / bs, double=lambda bs: 4 + 8 / bs + 32 / (bs * 256)):
    def bits_per_parameter(blocksize, double_quant):
        return double(blocksize) if double_quant else single(blocksize)

    return bits_per_parameter


WRONG_BITS = {
    "forgot the absmax": (make_bits(single=lambda bs: 4), "double_quant=False.* counted only the 4-bit index"),
    "forgot the absmax with dq": (make_bits(double=lambda bs: 4), "double_quant=True.* counted only the 4-bit index"),
    "absmax as 16 bits": (make_bits(single=lambda bs: 4 + 16 / bs), "float32, 32 bits, not 16"),
    "dq absmax at 32 bits": (make_bits(double=lambda bs: 4 + 32 / bs + 32 / (bs * 256)), "stored in 8 bits, not in 32"),
    "dq ignored": (make_bits(double=lambda bs: 4 + 32 / bs), "stored in 8 bits, not 32"),
    "no second level": (make_bits(double=lambda bs: 4 + 8 / bs), r"float32 scale of their own, one per 256 of them, and every weight pays its share"),
    "inverted": (make_bits(single=lambda bs: 4 + bs / 32), "inverted: .* share smaller"),
    "bytes": (make_bits(single=lambda bs: (4 + 32 / bs) / 8), "that is bytes"),
    "no index bits": (make_bits(single=lambda bs: 32 / bs), "left out the 4 bits of the index"),
    "per 256 wrong": (make_bits(double=lambda bs: 4 + 8 / bs + 32 / 256),
                      r"blocksize=32 and double_quant=True, you returned 4.375 bits .* each weight pays for the 4-bit index, the 8-bit absmax"),
    "a string": (make_bits(single=lambda bs: f"{4 + 32 / bs} bits"), "a number of bits, a float; got a str"),
    "stub": (stub, "still the stub"),
}


@pytest.mark.parametrize("right", [
    make_bits(), lambda bs, dq: 4 + (8 + 32 / 256) / bs if dq else 4 + 32 / bs,
    lambda bs, dq: torch.tensor(make_bits()(bs, dq), dtype=torch.float64),
])
def test_bits_per_parameter_accepts(right, capsys):
    check_bits_per_parameter(right)
    assert capsys.readouterr().out.startswith("Correct:")


@pytest.mark.parametrize("name", WRONG_BITS)
def test_bits_per_parameter_rejects(name):
    fn, message = WRONG_BITS[name]
    with pytest.raises(CheckFailed, match=message):
        check_bits_per_parameter(fn)


def test_checkers_leave_the_learners_rng_alone():
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    check_quantize_block(make_quantize())
    check_pack_unpack(right_pack, right_unpack)
    assert torch.equal(torch.rand(3), expected)


def test_bits_reference_is_the_packages():
    from lora_edu.nf4 import bits_per_parameter

    assert math.isclose(bits_per_parameter(64, False), 4.5) and math.isclose(bits_per_parameter(64, True), 4.127, abs_tol=1e-3)


# --- Exercise 4.5 (open): Lloyd-Max levels ---

def learner_lloyd_max(values, levels, steps):
    """A learner's plain version: assign each value to its nearest level, move each level to its cell's mean."""
    for _ in range(steps):
        cell = (values[:, None] - levels[None, :]).abs().argmin(dim=1)
        levels = torch.stack([values[cell == i].mean() if (cell == i).any() else levels[i] for i in range(16)])
    return levels.sort().values


def test_lloyd_max_accepts_converged_levels_from_any_start(capsys):
    from lora_edu.checks.ch04_nf4_quantization import absmax_scaled_normal_blocks

    values = absmax_scaled_normal_blocks()
    check_lloyd_max_levels(learner_lloyd_max(values, nf4_code(), 40))
    check_lloyd_max_levels(learner_lloyd_max(values, torch.linspace(-1, 1, 16), 60))
    out = capsys.readouterr().out
    assert out.count("Correct") == 2 and "below NF4's" in out


def test_lloyd_max_beats_nf4_by_about_a_tenth_and_uses_codes_less_evenly():
    """The chapter's claim: equal-probability levels do not minimise squared error; Lloyd-Max's do."""
    from lora_edu.checks.ch04_nf4_quantization import _best_levels, absmax_scaled_normal_blocks, squared_error_with_levels

    fresh = absmax_scaled_normal_blocks(4096, seed=1)
    nf4, best = squared_error_with_levels(fresh, nf4_code()), squared_error_with_levels(fresh, _best_levels())
    assert 0.05 < 1 - best / nf4 < 0.2
    assert (_best_levels().abs() > 1e-3).all() and (_best_levels().abs() < 1).all()  # no exact 0, no +-1


@pytest.mark.parametrize("levels, message", [
    (nf4_code(), "NF4's own levels"),
    (torch.linspace(-1, 1, 16), "err more than NF4's"),
    ("make", "not yet the best"),
    (torch.linspace(-1, 1, 15), "16 levels"),
    (torch.linspace(-1, 1, 16).reshape(4, 4), "16 levels"),
    (torch.linspace(-1, 1, 16).flip(0), "sorted ascending"),
    (torch.full((16,), float("nan")), "NaN"),
    ([0.0] * 16, "torch.Tensor"),
    (None, "None"),
])
def test_lloyd_max_rejects(levels, message):
    from lora_edu.checks.ch04_nf4_quantization import absmax_scaled_normal_blocks

    if levels == "make":  # two steps from NF4: better than NF4, not yet converged
        levels = learner_lloyd_max(absmax_scaled_normal_blocks(), nf4_code(), 2)
    with pytest.raises(CheckFailed, match=message):
        check_lloyd_max_levels(levels)


def test_lloyd_max_fit_on_unscaled_normals_is_rejected():
    values = torch.randn(65536, generator=torch.Generator().manual_seed(0)).clamp(-1, 1)  # not absmax-scaled blocks
    with pytest.raises(CheckFailed):
        check_lloyd_max_levels(learner_lloyd_max(values, nf4_code(), 30))
