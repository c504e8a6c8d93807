"""Checkers for chapter 4's exercises: the NF4 levels, quantizing a block, packing nibbles, bits per weight, Lloyd-Max."""

from __future__ import annotations

import functools
import math
from typing import Callable

import torch

from lora_edu.checks.core import (CheckFailed, as_number, call_learner, expect_shape, first_hint, is_number,
                                  learner_raised, passed, returned)
from lora_edu.nf4 import bits_per_parameter as _bits_per_parameter
from lora_edu.nf4 import ZERO_CODE, nf4_code, quantize_nf4
from lora_edu.plumbing import check_int

__all__ = [
    "absmax_scaled_normal_blocks",
    "check_bits_per_parameter",
    "check_lloyd_max_levels",
    "check_nf4_values",
    "check_pack_unpack",
    "check_quantize_block",
    "squared_error_with_levels",
]

_PAD_WITH_7 = "pad with 7, the index of 0.0 (lora_edu.nf4.ZERO_CODE), so the padding decodes to exactly zero"

_RECIPE = (
    "8 positive levels at the normal quantiles of torch.linspace(0.9677083, 0.5, 9)[:-1], 7 negative ones at minus "
    "those of torch.linspace(0.9677083, 0.5, 8)[:-1], and one exact 0"
)


def _fmt(values) -> str:
    return "[" + ", ".join(f"{v:.4f}" for v in values) + "]"


# ---------------------------------------------------------------------------
# Exercise 4.1: the 16 NF4 levels.


def check_nf4_values(nf4_values: Callable[[], torch.Tensor]) -> None:
    """Exercise 4.1: ``nf4_values()`` returns the 16 NF4 levels, sorted ascending, float32, in [-1, 1]."""
    got = call_learner(nf4_values)
    if not isinstance(got, torch.Tensor):
        hint = ": turn your list into one with torch.tensor(...)" if isinstance(got, (list, tuple)) else ""
        raise CheckFailed(
            f"nf4_values should return a torch.Tensor of the 16 levels, but it returned {returned(got)}{hint}."
        )
    if got.dim() != 1:
        raise CheckFailed(
            f"nf4_values should return a 1-D tensor of 16 levels, but yours has shape {tuple(got.shape)}: "
            "concatenate the pieces with torch.cat, not torch.stack."
        )
    if not got.is_floating_point():
        raise CheckFailed(
            f"The NF4 levels are fractions in [-1, 1], but your tensor holds {got.dtype}: keep them float32."
        )
    values = got.detach().double()
    zeros = int((values.abs() <= 1e-6).sum())
    if got.numel() != 16:
        if zeros > 1:
            hint = (f"{zeros} of them are 0, because the last probability of each linspace is 0.5, whose quantile "
                    "is 0: drop it with [:-1] and add a single 0 yourself")
        else:
            hint = f"4 bits store 16: {_RECIPE}"
        raise CheckFailed(f"nf4_values returned {got.numel()} values, but NF4 has 16: {hint}.")
    if not torch.isfinite(values).all():
        raise CheckFailed(
            "Your levels contain NaN or inf: the normal quantile of 1 is infinite, which is why the outermost "
            "probability is 0.9677083, not 1."
        )
    want = nf4_code().double()
    if not torch.allclose(values, want, rtol=0, atol=1e-6):
        if not (values[1:] >= values[:-1]).all():
            if torch.allclose(values.sort().values, want, rtol=0, atol=1e-6):
                hint = ("these are the right levels, but not in order: sort them ascending (.sort().values), since "
                        "index i stands for level i")
            else:
                hint = f"sort the levels ascending, since index i stands for level i; yours are {_fmt(values)}"
        elif zeros == 0:
            hint = ("none of your levels is 0: NF4 is asymmetric, 8 positive levels, 7 negative ones and an exact 0, "
                    "so that a zero weight (and padding) is stored exactly, not split into two levels around it")
        elif zeros > 1:
            hint = (f"{zeros} of your levels are 0, but the quantile of 0.5 is 0: run each linspace from 0.9677083 "
                    "down to 0.5 so that [:-1] drops the 0.5, and add the single 0 yourself")
        elif abs(values.max().item() - 1) > 1e-6:
            hint = (f"your levels span [{values.min().item():.4f}, {values.max().item():.4f}]: divide them all by the "
                    "largest, so that they span [-1, 1] like a block divided by its absmax")
        else:
            i = int((values - want).abs().argmax())
            hint = (f"level {i} is {values[i].item():.6f} but should be {want[i].item():.6f}: NF4 has "
                    f"{_RECIPE}, all divided by the largest; check the probabilities, which start at 0.9677083")
        raise CheckFailed(f"Your NF4 levels are not right yet: {hint}.")
    if got.dtype != torch.float32:
        raise CheckFailed(
            f"Your levels are right but {got.dtype}: return float32 (.float()), the dtype bitsandbytes stores them in."
        )
    passed("Correct: 16 NF4 levels from normal quantiles, 8 positive, 7 negative and an exact 0, spanning [-1, 1].")


# ---------------------------------------------------------------------------
# Exercise 4.2: quantizing one block.


def _midpoints(code: torch.Tensor) -> torch.Tensor:
    return (code[1:] + code[:-1]) / 2


def _scaled(block: torch.Tensor, by: torch.Tensor) -> torch.Tensor:
    return (block * (1 / by)).clamp(-1, 1)


def _reference_indices(block: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """What quantize_block should give: the index of the nearest level, ties to the lower one (as bitsandbytes)."""
    # bitsandbytes multiplies by 1 / absmax. The clamp is a guard that never acts on a finite block: in float32 with
    # round-to-nearest, a * (1 / a) is 1 or 1 - 2**-24, never more (tested over every a in [1, 2)), and |x| <= a gives
    # |x * (1 / a)| <= a * (1 / a), as rounding is monotone. A value beyond +-1 would land in the outermost level
    # anyway, with bucketize or argmin alike. So no test can catch a missing clamp, and the checker does not try:
    # it only rejects an index outside 0..15, which comes from looking up the 16 levels instead of the 15 midpoints.
    scaled = _scaled(block, block.abs().max())
    return torch.bucketize(scaled, _midpoints(code))  # right=False: a value on a midpoint takes the lower level


def _block_cases():
    """(description, block, code): the learner's RNG is left alone."""
    g = torch.Generator().manual_seed(4)
    code = nf4_code()
    for k in (1, 2, 3):
        yield f"random normal block {k} (64 values)", torch.randn(64, generator=g), code
    negative = -3 * torch.rand(64, generator=g)
    negative[::4] = torch.rand(16, generator=g)  # a few positives below 1, negatives down to -3
    yield "a block of 64 whose largest magnitude is a negative value", negative, code
    # 1.0 (the absmax, so scaling changes nothing) and every midpoint between two NF4 levels, exactly: each must
    # take the lower of its two levels. argmin over distances sends several of them up (the distances round).
    order = torch.randperm(16, generator=g)
    yield ("a block holding 1.0 and the 15 midpoints (code[1:] + code[:-1]) / 2 exactly",
           torch.cat([_midpoints(code), torch.ones(1)])[order], code)
    yield ("a random normal block of 64 with code = torch.linspace(-1, 1, 16) (16 evenly spaced levels)",
           torch.randn(64, generator=g), torch.linspace(-1, 1, 16))


def _parse_block_answer(got, block: torch.Tensor, setting: str) -> tuple[torch.Tensor, float]:
    if not isinstance(got, (tuple, list)) or len(got) != 2:
        raise CheckFailed(f"quantize_block should return a pair (indices, absmax), but it returned {returned(got)}.")
    indices, absmax = got
    n = block.numel()
    indices_first = isinstance(indices, torch.Tensor) and indices.numel() == n
    if isinstance(absmax, torch.Tensor) and absmax.numel() == n and not indices_first:
        raise CheckFailed("You returned (absmax, indices); return them in the order (indices, absmax).")
    if not isinstance(indices, torch.Tensor):
        raise CheckFailed(f"indices should be a torch.Tensor, one index per value, but it is {returned(indices)}.")
    if indices.is_floating_point() or indices.dtype == torch.bool:
        raise CheckFailed(
            f"indices should be integers (0 to 15), but yours are {indices.dtype}: torch.bucketize gives integers, "
            "so do not turn them into floats (or use .long())."
        )
    expect_shape(indices, (n,), f"For {setting}, indices", otherwise="one index per value of block")
    if isinstance(absmax, torch.Tensor):
        if absmax.dim() != 0:
            raise CheckFailed(
                f"absmax should be a number or a 0-d tensor, but yours has shape {tuple(absmax.shape)}: "
                "block.abs().max() gives a 0-d tensor."
            )
        absmax = absmax.item()
    if not is_number(absmax):
        raise CheckFailed(f"absmax should be a float (or a 0-d tensor), but it is {returned(absmax)}.")
    return indices.long(), float(absmax)


def check_quantize_block(quantize_block: Callable) -> None:
    """Exercise 4.2: ``quantize_block(block, code)`` gives (index of the nearest level per value, absmax)."""
    for setting, block, code in _block_cases():
        passed_block, passed_code = block.clone(), code.clone()
        got = call_learner(quantize_block, passed_block, passed_code)
        if not torch.equal(passed_block, block) or not torch.equal(passed_code, code):
            raise CheckFailed(
                "quantize_block changed its argument block (or code) in place: compute scaled = block * (1 / absmax) "
                "as a new tensor instead of block /= absmax or block.mul_(...)."
            )
        indices, absmax = _parse_block_answer(got, block, setting)
        want_absmax = block.abs().max().item()
        if not math.isclose(absmax, want_absmax, rel_tol=1e-6):
            if math.isclose(absmax, block.max().item(), rel_tol=1e-6):
                hint = ("you took block.max(), which misses a larger negative value; absmax is the largest absolute "
                        "value")
            else:
                hint = "absmax is the largest absolute value in the block"
            raise CheckFailed(
                f"For {setting}, absmax should be {want_absmax:.6g} but you returned {absmax:.6g}: {hint}."
            )
        bad = (indices < 0) | (indices >= len(code))
        if bad.any():
            i = int(bad.nonzero()[0])
            raise CheckFailed(
                f"For {setting}, you returned index {indices[i].item()} for the value {block[i].item():.4f}, but the "
                "16 levels have indices 0 to 15: with 16 levels there are 15 midpoints between them, so count the "
                "midpoints below each scaled value."
            )
        want = _reference_indices(block, code)
        if torch.equal(indices, want):
            continue
        _diagnose_indices(setting, block, code, indices, want)
    passed("Correct: each value goes to its nearest level after dividing by the block's absmax, ties to the lower one.")


def _diagnose_indices(setting, block, code, indices, want) -> None:
    mid = _midpoints(code)
    scaled = _scaled(block, block.abs().max())
    wrong = indices != want
    if torch.isin(scaled[wrong], mid).all() and torch.equal(indices[wrong], want[wrong] + 1):
        i = int(wrong.nonzero()[0])
        lower = want[i].item()
        raise CheckFailed(
            f"For {setting}, the value {scaled[i].item():.6f} lies exactly on the midpoint between levels {lower} and "
            f"{lower + 1} and takes the lower one, {lower}, as in bitsandbytes, but you gave {indices[i].item()}: "
            "count only the midpoints strictly below each value, so that a tie stays with the lower level (argmin "
            "over distances can tip such a tie upwards, as the distances are rounded)."
        )
    variants = [
        (torch.bucketize(block.clamp(-1, 1), mid),
         "you looked up the raw values; divide the block by its absmax first, so that "
         "it spans [-1, 1] like the levels"),
        (torch.bucketize(_scaled(block, block.max()), mid),
         "you scaled by block.max(), but the largest magnitude here is negative: scale by the largest "
         "magnitude"),
        (torch.bucketize(scaled, code),
         "you rounded each value up to the next level; take the nearest level, by counting the midpoints between "
         "levels below it"),
        ((torch.bucketize(scaled, code, right=True) - 1).clamp(min=0),
         "you rounded each value down to the level below it; take the nearest level, by counting the midpoints "
         "between levels below it"),
        (_reference_indices(block, nf4_code()),
         "you used the NF4 levels, but this call passes other levels in code: look the values up in the code "
         "argument"),
    ]
    hint = first_hint(variants, lambda v: torch.equal(indices, v) and not torch.equal(v, want))
    if hint is None:
        i = int(wrong.nonzero()[0])
        j = want[i].item()
        hint = (f"the value {block[i].item():.4f} scales to {scaled[i].item():.4f}, whose nearest level is "
                f"code[{j}] = {code[j].item():.4f}, but you gave index {indices[i].item()}")
    raise CheckFailed(f"For {setting}, {hint}.")


# ---------------------------------------------------------------------------
# Exercise 4.3: two indices per byte.


def _reference_pack(indices: torch.Tensor, pad: int = ZERO_CODE) -> torch.Tensor:
    idx = indices.long()
    if idx.numel() % 2:
        # An odd count: the last low nibble is the padding, 7 (the index of 0.0) as in quantize_nf4 and bitsandbytes,
        # so that it decodes to exactly zero. (pad=0 gives the wrong convention, for the diagnosis.)
        idx = torch.cat([idx, idx.new_full((1,), pad)])
    return ((idx[0::2] << 4) | idx[1::2]).to(torch.uint8)  # the first index in the high nibble


def _nf4_indices(n: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """The n uint8 indices of n random normal values quantized by quantize_nf4 (blocksize 64), and its bytes."""
    packed, _ = quantize_nf4(torch.randn(n, generator=g), blocksize=64)
    packed = packed.reshape(-1)
    indices = torch.stack([packed >> 4, packed & 0x0F], dim=1).reshape(-1)[:n]  # high nibble first, as quantize_nf4
    return indices, packed


def _pack_cases():
    """(description, indices, packed bytes)."""
    for values, packed in [([1, 2, 3], [0x12, 0x37]), ([0, 15, 7, 8], [0x0F, 0x78]), ([15], [0xF7]),
                           ([10, 5, 0, 12, 3], [0xA5, 0x0C, 0x37])]:
        indices = torch.tensor(values)
        yield f"indices={values}", indices, torch.tensor(packed, dtype=torch.uint8)
    g = torch.Generator().manual_seed(5)
    indices, packed = _nf4_indices(64, g)
    yield "the 64 uint8 indices of a block quantized by lora_edu.nf4.quantize_nf4", indices, packed
    indices = torch.randint(0, 16, (33,), generator=g)
    yield "33 random indices", indices, _reference_pack(indices)
    # An odd count straight from the package's quantizer: its last byte's low nibble is the padding, 7.
    indices, packed = _nf4_indices(63, g)
    yield ("the 63 uint8 indices of 63 values quantized by lora_edu.nf4.quantize_nf4 (blocksize 64), an odd count",
           indices, packed)


def _hex(values: torch.Tensor) -> str:
    return "[" + ", ".join(f"0x{v:02X}" for v in values.long().tolist()) + "]"


def _check_pack(pack: Callable) -> None:
    for setting, indices, want in _pack_cases():
        n = indices.numel()
        given = indices.clone()
        try:
            got = call_learner(pack, given)
        except (RuntimeError, IndexError) as err:
            if n % 2 == 0:
                raise
            raise learner_raised(
                f"For {setting}, an odd count, pack", err,
                f"bring the indices to an even length first: {_PAD_WITH_7}; the last byte then holds the last index "
                "and a 7",
            ) from err
        if not torch.equal(given, indices):
            raise CheckFailed("pack changed its argument indices in place: build the bytes as a new tensor.")
        if not isinstance(got, torch.Tensor):
            raise CheckFailed(f"pack should return a torch.Tensor of bytes, but it returned {returned(got)}.")
        size = (n + 1) // 2
        if got.dim() != 1 or got.numel() != size:
            if got.numel() == n // 2 and n % 2:
                hint = f"with an odd count the last index needs a byte too, ceil(n / 2) bytes: {_PAD_WITH_7}"
            elif got.numel() == n and n > 1:
                hint = "you returned one value per index; pack two per byte, the first in the high nibble"
            else:
                hint = f"n indices take ceil(n / 2) bytes, here {size}, in a 1-D tensor"
            raise CheckFailed(f"For {setting}, pack returned shape {tuple(got.shape)}: {hint}.")
        values = got.long()
        if not torch.equal(values, want.long()):
            zero = _reference_pack(indices, pad=0).long() if n % 2 else None  # the old convention

            def swapped(b):
                return ((b & 0x0F) << 4) | (b >> 4)

            if torch.equal(values, swapped(want.long())) or (zero is not None and torch.equal(values, swapped(zero))):
                hint = ("the nibbles are swapped: the first index of each pair goes in the high nibble, "
                        "(indices[0::2] << 4) | indices[1::2]")
            elif zero is not None and torch.equal(values, zero):
                hint = (f"you padded with 0, which decodes to -1 times the absmax (nf4_code()[0] is -1.0), not to "
                        f"zero: {_PAD_WITH_7}, as quantize_nf4 and bitsandbytes do")
            elif n % 2 and torch.equal(values[:-1], want[:-1].long()) and values[-1] >> 4 == want[-1] >> 4:
                hint = (f"with an odd count the last byte holds the last index and a 7: bring the indices to an even "
                        f"length first, {_PAD_WITH_7} (indices[1::2] is one short, and broadcasting hides it)")
            else:
                hint = ("each byte holds two indices, the first in the high nibble: "
                        "(indices[0::2] << 4) | indices[1::2]")
            k = int((values != want.long()).nonzero()[0])
            gave = (f"pack gave {_hex(values)} but should give {_hex(want)}" if n <= 8 else
                    f"byte {k} is {_hex(values[k:k + 1])[1:-1]} but should be {_hex(want[k:k + 1])[1:-1]}")
            raise CheckFailed(f"For {setting}, {gave}: {hint}.")
        if got.dtype != torch.uint8:
            raise CheckFailed(
                f"For {setting}, your bytes are right but {got.dtype}, which takes {got.element_size()} bytes per "
                "value and saves nothing: return torch.uint8 (.to(torch.uint8))."
            )


def _check_unpack(unpack: Callable) -> None:
    for setting, indices, packed in _pack_cases():
        n = indices.numel()
        given = packed.clone()
        got = call_learner(unpack, given, n)
        if not torch.equal(given, packed):
            raise CheckFailed("unpack changed its argument packed in place: build the indices as a new tensor.")
        if not isinstance(got, torch.Tensor):
            raise CheckFailed(f"unpack should return a torch.Tensor of {n} indices, but it returned {returned(got)}.")
        if got.is_floating_point() or got.dtype == torch.bool:
            raise CheckFailed(
                f"unpack should return integer indices, but yours are {got.dtype}: keep them integers."
            )
        shown = f"{_hex(packed)} and n={n}" if packed.numel() <= 4 else f"the bytes of {setting}"
        if got.dim() != 1 or got.numel() != n:
            if got.numel() == n + 1:
                hint = "that includes the padding nibble (the 7) of the odd count: return only the first n, [:n]"
            else:
                hint = f"return a 1-D tensor of the n = {n} indices, two per byte"
            raise CheckFailed(f"For {shown}, unpack returned shape {tuple(got.shape)}: {hint}.")
        values, want = got.long(), indices.long()
        if torch.equal(values, want):
            continue
        pairs = torch.stack([packed.long() & 0x0F, packed.long() >> 4], dim=1).reshape(-1)[:n]
        if (values > 15).any() or (values < 0).any():
            hint = (f"an index is 0 to 15, but you returned values up to {values.max().item()}: the second index "
                    "of each byte is only its low 4 bits, packed & 0x0F")
        elif torch.equal(values, pairs):
            hint = "the nibbles are swapped: the high nibble (packed >> 4) is the first index of each pair"
        else:
            hint = ("byte k holds index 2k in its high nibble (packed >> 4) and index 2k + 1 in its low one "
                    "(packed & 0x0F)")
        k = int((values != want).nonzero()[0])
        gave = (f"unpack gave {values.tolist()} but should give {want.tolist()}" if n <= 8 else
                f"index {k} is {values[k].item()} but should be {want[k].item()}")
        raise CheckFailed(f"For {shown}, {gave}: {hint}.")


def check_pack_unpack(pack: Callable, unpack: Callable) -> None:
    """Exercise 4.3: ``pack(indices)`` puts two 4-bit indices in each uint8, the first high; ``unpack`` undoes it.

    An odd count is padded with 7 (``lora_edu.nf4.ZERO_CODE``, the index of 0.0), as ``quantize_nf4`` and bitsandbytes
    do, so that the padding decodes to exactly zero; ``unpack(packed, n)`` returns only the first n indices.
    """
    _check_pack(pack)
    _check_unpack(unpack)
    g = torch.Generator().manual_seed(6)
    for n in (1, 2, 7, 64, 101):
        indices = torch.randint(0, 16, (n,), generator=g)
        back = call_learner(unpack, call_learner(pack, indices.clone()), n)
        if not isinstance(back, torch.Tensor) or not torch.equal(back.long(), indices):
            raise CheckFailed(f"For {n} random indices, unpack(pack(indices), {n}) does not give the indices back.")
    passed("Correct: two indices per byte, the first in the high nibble, an odd count padded with 7 (the index of "
          "0.0), and unpack gives them back.")


# ---------------------------------------------------------------------------
# Exercise 4.4: bits per parameter.


def _matches(got: list[float], want: list[float]) -> bool:
    return all(math.isclose(g, w, rel_tol=1e-9) for g, w in zip(got, want))


def check_bits_per_parameter(bits_per_parameter: Callable[[int, bool], float]) -> None:
    """Exercise 4.4: bits per weight, 4 for the index plus its share of the absmax (8-bit with double quantization)."""
    blocksizes = (32, 64, 256, 4096)
    for double_quant in (False, True):
        got = []
        for blocksize in blocksizes:
            value = as_number(call_learner(bits_per_parameter, blocksize, double_quant))
            if not is_number(value):
                raise CheckFailed(
                    f"bits_per_parameter should return a number of bits, a float; got {returned(value)}."
                )
            got.append(float(value))
        want = [_bits_per_parameter(b, double_quant) for b in blocksizes]
        if _matches(got, want):
            continue
        # Diagnose from all blocksizes at once, so one coincidence does not mislead.
        variants = [
            ([4.0] * 4,
             "you counted only the 4-bit index; each block of blocksize values also stores its absmax, whose bits "
             "they share"),
            ([w / 8 for w in want], "that is bytes; the answer is in bits"),
            ([4 + b / 32 for b in blocksizes],
             "inverted: the absmax's 32 bits are shared by the blocksize values of its block, so a larger "
             "block should make each weight's share smaller"),
        ]
        if double_quant:
            variants += [
                ([4 + 32 / b for b in blocksizes],
                 "with double quantization each absmax is stored in 8 bits, not 32, and the 8-bit absmaxes "
                 "need a float32 scale of their own, one per 256 of them"),
                ([4 + 32 / b + 32 / (b * 256) for b in blocksizes],
                 "with double quantization each absmax is stored in 8 bits, not in 32"),
                ([4 + 8 / b for b in blocksizes],
                 "the 8-bit absmaxes need a float32 scale of their own, one per 256 of them, and every "
                 "weight pays its share of it"),
            ]
        else:
            variants += [
                ([4 + 16 / b for b in blocksizes], "the absmax is a float32, 32 bits, not 16"),
                ([32 / b for b in blocksizes], "you left out the 4 bits of the index itself"),
            ]
        idea = ("the 4-bit index, the 8-bit absmax shared by the block, and the float32 scale shared by 256 blocks"
                if double_quant else "the 4-bit index and the float32 absmax shared by the block")
        hint = first_hint(variants, lambda variant: _matches(got, variant), f"each weight pays for {idea}")
        i = next(i for i in range(4) if not math.isclose(got[i], want[i], rel_tol=1e-9))
        raise CheckFailed(
            f"For blocksize={blocksizes[i]} and double_quant={double_quant}, you returned {got[i]:g} bits but NF4 "
            f"takes {want[i]:g}: {hint}."
        )
    passed("Correct: 4 bits for the index plus its share of the absmax: 4.5 at blocksize 64, 4.127 double-quantized.")


# ---------------------------------------------------------------------------
# Exercise 4.5 (open): Lloyd-Max levels against NF4's.


def absmax_scaled_normal_blocks(n_blocks: int = 1024, blocksize: int = 64, seed: int = 0) -> torch.Tensor:
    """Blocks of standard normal values, each divided by its absmax: what a 4-bit code has to round, flattened."""
    check_int(n_blocks, "n_blocks")
    check_int(blocksize, "blocksize")
    blocks = torch.randn(n_blocks, blocksize, generator=torch.Generator().manual_seed(seed))
    return (blocks / blocks.abs().amax(dim=1, keepdim=True)).reshape(-1)


def squared_error_with_levels(values: torch.Tensor, levels: torch.Tensor) -> float:
    """Mean squared error of rounding each of ``values`` to its nearest level (levels sorted ascending)."""
    levels = levels.detach().double()
    nearest = torch.bucketize(values.double(), _midpoints(levels))
    return (values.double() - levels[nearest]).pow(2).mean().item()


@functools.lru_cache(maxsize=1)
def _best_levels(steps: int = 100) -> torch.Tensor:
    return _lloyd_max(absmax_scaled_normal_blocks(seed=0), nf4_code(), steps)


def _lloyd_max(values: torch.Tensor, levels: torch.Tensor, steps: int) -> torch.Tensor:
    """Lloyd's algorithm on sorted values: each cell is a slice, so its mean is a difference of cumulative sums."""
    values = values.double().sort().values
    cumsum = torch.cat([torch.zeros(1, dtype=torch.float64), values.cumsum(0)])
    levels = levels.double().clone()
    for _ in range(steps):
        # A value on a midpoint belongs to the lower cell, as bucketize(right=False) sends it.
        inner = torch.searchsorted(values, _midpoints(levels), right=True)
        edges = torch.cat([torch.zeros(1, dtype=inner.dtype), inner, torch.tensor([len(values)])])
        counts = edges[1:] - edges[:-1]
        sums = cumsum[edges[1:]] - cumsum[edges[:-1]]
        levels = torch.where(counts > 0, sums / counts.clamp_min(1), levels).sort().values
    return levels


def check_lloyd_max_levels(levels: torch.Tensor) -> None:
    """Exercise 4.5: 16 levels whose squared error on fresh absmax-scaled normal blocks is as low as Lloyd-Max's."""
    if not isinstance(levels, torch.Tensor):
        raise CheckFailed(f"Give your levels as a torch.Tensor, got {returned(levels)}.")
    if levels.dim() != 1 or levels.numel() != 16:
        raise CheckFailed(f"A 4-bit code has 16 levels in a 1-D tensor; yours has shape {tuple(levels.shape)}.")
    levels = levels.detach().double()
    if not torch.isfinite(levels).all():
        raise CheckFailed("Your levels contain NaN or inf: a level whose cell is empty has no mean; leave it where it is.")
    if not (levels[1:] > levels[:-1]).all():
        raise CheckFailed("Your levels should be distinct and sorted ascending, as a code table is.")
    fresh = absmax_scaled_normal_blocks(4096, seed=1)  # not the blocks you fitted on: the error must hold on new ones
    yours = squared_error_with_levels(fresh, levels)
    nf4 = squared_error_with_levels(fresh, nf4_code())
    best = squared_error_with_levels(fresh, _best_levels())
    if torch.allclose(levels, nf4_code().double(), atol=1e-6):
        raise CheckFailed("Those are NF4's own levels: start from them if you like, then let the levels move.")
    if yours > nf4:
        raise CheckFailed(
            f"Your levels err more than NF4's on fresh blocks (mean squared error {yours:.3e} against {nf4:.3e}): "
            "each step should move every level to the centre of the values it receives; did you fit on "
            "absmax-scaled blocks, values in [-1, 1]?"
        )
    if yours > 1.015 * best:
        raise CheckFailed(
            f"Your levels beat NF4 ({yours:.3e} against {nf4:.3e}) but not yet the best the checker finds "
            f"({best:.3e}): let them move for more steps, until they stop."
        )
    passed(f"Correct: mean squared error {yours:.3e} on fresh blocks, {1 - yours / nf4:.0%} below NF4's {nf4:.3e}.")
