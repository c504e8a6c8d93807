"""NF4: QLoRA's 4-bit NormalFloat quantizer, in plain PyTorch, equal bit for bit to bitsandbytes.

Dettmers et al. (2023) store a frozen weight in 4 bits per value. The recipe, which this
module follows top to bottom:

1. Flatten the weight and cut it into blocks of ``blocksize`` values (64 by default); the
   last block may be partial.
2. Divide each block by its absolute maximum ("absmax"), so its values lie in [-1, 1].
3. Replace each value by the index (0..15) of the nearest of 16 fixed levels, the NF4
   code: quantiles of a standard normal, since trained weights are roughly normal.
4. Pack two 4-bit indices per byte. Keep one float32 absmax per block.
5. Optionally ("double quantization") store the absmaxes themselves in 8 bits: subtract
   their mean and quantize them blockwise (256 per block) with bitsandbytes' dynamic map.

Dequantizing is the reverse: look each index up in the code and multiply by its block's
absmax.

:func:`quantize_nf4` and :func:`dequantize_nf4` give the same bytes and values as
bitsandbytes 0.50.2 (``bitsandbytes.functional.quantize_4bit(w, blocksize=bs,
quant_type="nf4", compress_statistics=dq)`` and ``dequantize_4bit``), for float32,
bfloat16 and float16 weights of any shape and every blocksize bitsandbytes allows
(32 ... 4096), with and without double quantization; the tests compare them with
``torch.equal``. bitsandbytes' CPU path and its CUDA kernel round differently at the
edges (an all-zero block, a partial last block, a value within a rounding error of a
midpoint, the 8-bit absmaxes), and ``quantize_nf4(..., kernel="cpu" | "cuda")`` copies
either. Here the two part ways in a few marked lines; what each rounding is, and where
bitsandbytes itself goes wrong, is in :mod:`lora_edu.nf4_bitexact`.

Two dequantize functions give the same values bit for bit: :func:`dequantize_nf4`, the
one Chapter 4 teaches, written to be read, and :func:`dequantize_nf4_fast`, which
:class:`NF4Linear` runs at every forward pass.

Pure PyTorch and vectorised: no Python loop runs over blocks (the fast path loops over a
few large chunks on the CPU), so it also runs on a GPU, where it is a readable
reference, not bitsandbytes' CUDA kernel.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from lora_edu.nf4_bitexact import (
    binary_search_8bit,
    check_rounding,
    cuda_nf4_thresholds,
    cuda_reciprocal,
    grid_lookup_8bit,
)
from lora_edu.plumbing import check_int

__all__ = [
    "BLOCKSIZES",
    "DQ_BLOCKSIZE",
    "NF4Linear",
    "NF4State",
    "ZERO_CODE",
    "bits_per_parameter",
    "check_blocksize",
    "check_compute_dtype",
    "check_weight",
    "dequantize_8bit_blockwise",
    "dequantize_int4",
    "dequantize_nf4",
    "dequantize_nf4_fast",
    "dynamic_map",
    "fp4_code",
    "int4_roundtrip",
    "nf4_code",
    "quantize_8bit_blockwise",
    "quantize_int4",
    "quantize_nf4",
]

NF4_OFFSET = 0.9677083  # the outermost quantile: (1 - 1/(2*15) + 1 - 1/(2*16)) / 2, from the QLoRA code
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)  # what bitsandbytes accepts
DQ_BLOCKSIZE = 256  # bitsandbytes quantizes the absmaxes in blocks of 256
ZERO_CODE = 7  # nf4_code()[7] == 0.0; odd lengths are padded with it


# ----------------------------------------------------------------------------------------
# The codes: 16 levels for NF4 (and FP4, for comparison)
# ----------------------------------------------------------------------------------------


@functools.cache
def _nf4_code() -> torch.Tensor:
    normal = torch.distributions.Normal(torch.tensor(0.0, dtype=torch.float64), torch.tensor(1.0, dtype=torch.float64))
    # 8 positive levels (the extra one makes the code asymmetric, so that 0 is exact),
    # 7 negative ones, and 0. The probabilities are float32, as in bitsandbytes'
    # create_normal_map; the quantiles are float64 (scipy's norm.ppf there), rounded
    # to float32 before normalising: that order gives its table to the last bit.
    positive = normal.icdf(torch.linspace(NF4_OFFSET, 0.5, 9).double())[:-1]
    negative = -normal.icdf(torch.linspace(NF4_OFFSET, 0.5, 8).double())[:-1]
    levels = torch.cat([negative, torch.zeros(1, dtype=torch.float64), positive]).float().sort().values
    return levels / levels.max()


def nf4_code() -> torch.Tensor:
    """The 16 NF4 levels, sorted, in [-1, 1] (float32): index i is stored as the 4 bits of i.

    Built from normal quantiles as in QLoRA: 8 positive levels at the quantiles of
    ``linspace(0.9677083, 0.5, 9)[:-1]``, 7 negative at those of ``linspace(0.9677083,
    0.5, 8)[:-1]``, and 0, scaled so the largest is 1. Computed here, not copied, and
    equal bit for bit to the table bitsandbytes hard-codes (``get_4bit_type("nf4")``).
    """
    return _nf4_code().clone()


def fp4_code() -> torch.Tensor:
    """bitsandbytes' FP4 levels, in index order (not sorted), float32; for comparison with NF4.

    1 sign bit (the top one), 2 exponent bits, 1 mantissa bit. Index 0bSEEM, with the
    magnitude ``M * 0.0625`` for E = 0 (subnormal) and ``(1 + M/2) * 2**(4 - E)`` otherwise,
    divided by the largest, 12: bitsandbytes' own (unusual) exponent order. Equals
    ``get_4bit_type("fp4")``. Four of its 16 patterns go to +-0 and +-0.0052, all next to
    0; NF4 spends every pattern on a distinct level where a normal weight has its mass.
    """
    index = torch.arange(8)
    exponent, mantissa = index // 2, (index % 2).float()
    magnitude = torch.where(exponent == 0, mantissa * 0.0625, (1 + mantissa / 2) * 2.0 ** (4 - exponent))
    return torch.cat([magnitude, -magnitude]) / magnitude.max()


# ----------------------------------------------------------------------------------------
# NF4
# ----------------------------------------------------------------------------------------


@dataclass(eq=False)  # fields are tensors: == between states would be ambiguous
class NF4State:
    """What it takes, beside the packed bytes, to dequantize an NF4 tensor.

    ``absmax`` holds one float32 per block; with double quantization it is ``None`` and
    the absmaxes are stored as ``absmax_codes`` (uint8, one per block) with
    ``absmax_scales`` (float32, one per 256 codes) and the ``absmax_offset`` (their mean,
    float32 scalar) that was subtracted first: absmax = dynamic_map[code] * scale + offset.
    In bitsandbytes' ``QuantState`` these are ``absmax`` (either form), ``state2.absmax``,
    ``offset`` and ``state2.code`` (our ``dq_code``).
    """

    shape: torch.Size
    dtype: torch.dtype
    blocksize: int
    absmax: torch.Tensor | None = None
    absmax_codes: torch.Tensor | None = None
    absmax_scales: torch.Tensor | None = None
    absmax_offset: torch.Tensor | None = None
    dq_code: torch.Tensor | None = None
    dq_blocksize: int = DQ_BLOCKSIZE

    @property
    def double_quant(self) -> bool:
        return self.absmax_codes is not None

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def n_blocks(self) -> int:
        return -(-self.numel // self.blocksize)

    def block_absmax(self) -> torch.Tensor:
        """One float32 absmax per block, dequantized first if it is double-quantized."""
        if not self.double_quant:
            return self.absmax
        scales = dequantize_8bit_blockwise(self.absmax_codes, self.absmax_scales, self.dq_blocksize)
        return scales + self.absmax_offset


def quantize_nf4(
    w: torch.Tensor, blocksize: int = 64, double_quant: bool = False, kernel: str | None = None
) -> tuple[torch.Tensor, NF4State]:
    """``w`` in NF4: (packed, state), with packed a uint8 tensor of shape (ceil(numel / 2), 1).

    Byte k holds values 2k (high nibble) and 2k + 1 (low nibble) of ``w`` flattened; an odd
    count is padded. Equals, byte for byte and absmax for absmax,
    ``bitsandbytes.functional.quantize_4bit(w, blocksize=blocksize, quant_type="nf4",
    compress_statistics=double_quant)``, on the CPU (``kernel="cpu"``) or on a CUDA GPU
    (``kernel="cuda"``). The default copies the kernel of ``w``'s device. The two differ
    only at the edges: an all-zero block, a partial last block, a value within a rounding
    error of the midpoint between two levels, and the double-quantized absmaxes.
    """
    flat = check_weight(w)
    blocksize = check_blocksize(blocksize)
    if not isinstance(double_quant, bool):
        raise TypeError(f"double_quant must be True or False, got {double_quant!r}")
    kernel = check_rounding(kernel, flat.device)
    n = flat.numel()

    # 1-2. Blocks, their absmax, and the values scaled into [-1, 1].
    blocks = _blocks(flat, blocksize)
    absmax = blocks.abs().amax(dim=1)
    if kernel == "cuda":
        scaled = blocks * cuda_reciprocal(absmax)[:, None]  # an all-zero block: 0 * inf = NaN
    else:
        safe = absmax.clamp(min=1e-38)  # an all-zero block scales by 1e38, not by 1/0 = inf
        scaled = blocks * (1.0 / safe)[:, None]  # bitsandbytes multiplies by the reciprocal...
        if n % blocksize:
            scaled[-1] = blocks[-1] / safe[-1]  # ...but divides in a partial last block,
            absmax[-1] = safe[-1]  # and stores its clamped absmax
        scaled = scaled.clamp(-1, 1)

    # 3. The nearest level: count the midpoints below. A value on a midpoint (right=False)
    # takes the lower level. The CUDA kernel's decision tree tests its own float32 midpoints
    # with ">" (lora_edu.nf4_bitexact.CUDA_NF4_THRESHOLDS) and sends NaN to level 0.
    code = _nf4_code()
    midpoints = cuda_nf4_thresholds() if kernel == "cuda" else (code[:-1] + code[1:]) / 2
    scaled = scaled.reshape(-1)[: n + n % 2]  # an odd count: one more value, from the zero padding
    indices = torch.bucketize(scaled, midpoints.to(w.device), out_int32=True)
    if kernel == "cuda":
        indices = torch.where(scaled.isnan(), 0, indices)
    else:
        indices[n:] = ZERO_CODE
    indices = indices.to(torch.uint8)

    # 4. Two indices per byte, the first in the high nibble.
    packed = ((indices[0::2] << 4) | indices[1::2]).unsqueeze(1)

    if not double_quant:
        return packed, NF4State(shape=w.shape, dtype=w.dtype, blocksize=blocksize, absmax=absmax)

    # 5. Double quantization. The absmaxes are all positive; centring them first spends the
    # 8 bits on their spread, which the dynamic map's signed levels then cover.
    offset = absmax.mean()
    codes, scales = quantize_8bit_blockwise(absmax - offset, DQ_BLOCKSIZE, kernel=kernel)
    return packed, NF4State(
        shape=w.shape, dtype=w.dtype, blocksize=blocksize, absmax_codes=codes, absmax_scales=scales,
        absmax_offset=offset, dq_code=dynamic_map().to(w.device),
    )


def dequantize_nf4(packed: torch.Tensor, state: NF4State, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The weight back from :func:`quantize_nf4`, in its shape and dtype (or ``dtype``).

    Each value is ``nf4_code()[index] * absmax`` of its block, computed in float32 and then
    rounded once to the output dtype. Equals ``bitsandbytes.functional.dequantize_4bit``
    on the CPU (which returns a 1-D weight of even length as shape (1, n)), except where
    its AVX-512 kernel is wrong (see :mod:`lora_edu.nf4_bitexact`).
    """
    _check_state(packed, state)
    n = state.numel
    packed = packed.reshape(-1)
    indices = torch.stack([packed >> 4, packed & 0x0F], dim=1).reshape(-1)[:n]  # high nibble first
    values = _nf4_code().to(packed.device)[indices.long()]
    absmax = state.block_absmax().to(packed.device).float()
    weight = (_blocks(values, state.blocksize) * absmax[:, None]).reshape(-1)[:n]
    return weight.to(dtype or state.dtype).reshape(state.shape)


# ----------------------------------------------------------------------------------------
# Double quantization: the absmaxes in 8 bits, with the dynamic map
# ----------------------------------------------------------------------------------------


@functools.cache
def _dynamic_map() -> torch.Tensor:
    levels = [torch.tensor([0.0, 1.0])]
    for i in range(7):  # decimal exponents 10^-6 ... 10^0, with 1, 2, 4, ... 64 fractions each
        edges = torch.linspace(0.1, 1, 2**i + 1)
        fractions = (edges[:-1] + edges[1:]) / 2
        levels += [10 ** (i - 6) * fractions, -(10 ** (i - 6)) * fractions]
    return torch.cat(levels).sort().values


def dynamic_map() -> torch.Tensor:
    """bitsandbytes' signed 8-bit dynamic map: 256 sorted float32 levels in [-0.993, 1].

    Dettmers (2016): after the sign, a decimal exponent 10^-6 ... 10^0 and a linear
    fraction in (0.1, 1); the larger the exponent, the more fractions it gets (1 for 10^-6,
    64 for 10^0). So the levels are dense near 0 and relative error stays small across six
    orders of magnitude. Equals ``bitsandbytes.functional.create_dynamic_map(signed=True)``.
    """
    return _dynamic_map().clone()


def quantize_8bit_blockwise(
    x: torch.Tensor, blocksize: int = DQ_BLOCKSIZE, kernel: str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """8-bit codes (uint8, shaped like ``x``) and one float32 absmax per block, as bitsandbytes.

    Equals ``bitsandbytes.functional.quantize_blockwise(x, blocksize=blocksize)`` for float32
    ``x``, on the CPU (``kernel="cpu"``) or on a CUDA GPU (``kernel="cuda"``; the default is
    the one for ``x``'s device). The two kernels round differently:

    * CPU: each block is multiplied by ``1 / absmax``; each scaled value s is rounded to the
      grid point ``j = floor((s + 1) * 32767.5 + 0.5)`` (float32 arithmetic) and stored as
      the dynamic-map level nearest that grid point. Near zero that is not always the
      nearest level, because the levels there are closer together than the grid (spacing
      3.1e-5): an exact 0 becomes level 131 (2.1e-5), not 127 (0.0). An all-zero block
      (0 * inf = NaN) is stored as level 0; infinities from a denormal absmax as 0 or 255.
    * CUDA: each block is multiplied by the GPU's approximate ``1 / absmax``
      (:func:`~lora_edu.nf4_bitexact.cuda_reciprocal`) and each value goes to the nearer of
      the two levels a binary search of the map ends between: the nearest level, NaN to level 0.

    Both roundings are written out in :mod:`lora_edu.nf4_bitexact`.
    """
    flat = check_weight(x, "x")
    blocksize = check_int(blocksize, "blocksize")
    kernel = check_rounding(kernel, flat.device)
    blocks = _blocks(flat, blocksize)
    absmax = blocks.abs().amax(dim=1)
    if kernel == "cuda":
        scaled = blocks * cuda_reciprocal(absmax)[:, None]
        codes = binary_search_8bit(scaled, _dynamic_map().to(x.device))
    else:
        scaled = blocks * (1.0 / absmax)[:, None]  # the reciprocal, as the kernel: x / absmax differs in the last bit
        codes = grid_lookup_8bit(scaled, _dynamic_map().to(x.device))
    return codes.reshape(-1)[: flat.numel()].reshape(x.shape), absmax


def dequantize_8bit_blockwise(codes: torch.Tensor, absmax: torch.Tensor, blocksize: int = DQ_BLOCKSIZE) -> torch.Tensor:
    """float32 values ``dynamic_map()[code] * absmax`` of their block, shaped like ``codes``."""
    if not isinstance(codes, torch.Tensor) or codes.dtype != torch.uint8:
        raise TypeError(f"codes must be a uint8 tensor, got {getattr(codes, 'dtype', type(codes).__name__)}")
    blocksize = check_int(blocksize, "blocksize")
    n_blocks = -(-codes.numel() // blocksize)
    if absmax.numel() != n_blocks:
        raise ValueError(
            f"absmax has {absmax.numel()} values, but {codes.numel()} codes in blocks of {blocksize} need {n_blocks}"
        )
    levels = _dynamic_map().to(codes.device)[codes.reshape(-1).long()]
    values = _blocks(levels, blocksize) * absmax.float().reshape(-1, 1)
    return values.reshape(-1)[: codes.numel()].reshape(codes.shape)


# ----------------------------------------------------------------------------------------
# The fast dequantize path, for NF4Linear
# ----------------------------------------------------------------------------------------


@functools.cache
def _nf4_pairs() -> torch.Tensor:
    # Entry b holds the two float32 values byte b encodes, (code[b >> 4], code[b & 0x0F]),
    # read as one 8-byte integer: a lookup then copies both at once, as plain bits.
    code = _nf4_code()
    return torch.stack([code.repeat_interleave(16), code.repeat(16)], dim=1).view(torch.int64).reshape(256)


_FAST_CHUNK_BYTES = 2**17  # on the CPU: 256 Ki values, whose float32 temporaries stay in cache


def dequantize_nf4_fast(packed: torch.Tensor, state: NF4State, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The same values as :func:`dequantize_nf4`, bit for bit, computed faster.

    :func:`dequantize_nf4` splits every byte into two nibbles, widens them to int64 and
    looks each one up: five passes over the weight and int64 temporaries 16 times the
    size of the packed bytes. Here one lookup in a 256-entry table decodes both nibbles
    of a byte at once (each entry is the pair of float32 values, stored as one 8-byte
    integer, so the lookup copies 8 bytes per byte of input), the indices are int32, and
    the block scaling is done in place. On the CPU the weight is processed in chunks of
    2^17 bytes, so the float32 temporaries stay in cache and the output is written once.
    :class:`NF4Linear` uses this function; the chapter teaches the other.
    """
    _check_state(packed, state)
    n, blocksize = state.numel, state.blocksize
    out_dtype = dtype or state.dtype
    pairs = _nf4_pairs().to(packed.device)
    absmax = state.block_absmax().to(packed.device).float()
    packed = packed.reshape(-1)
    chunk = packed.numel() if packed.is_cuda else _FAST_CHUNK_BYTES  # a multiple of every blocksize / 2

    out = torch.empty(2 * packed.numel(), dtype=out_dtype, device=packed.device)  # an odd n has one spare
    scratch = None if out_dtype == torch.float32 else torch.empty(2 * min(chunk, packed.numel()), device=packed.device)
    for start in range(0, packed.numel(), chunk):
        indices = packed[start : start + chunk].int()
        target = out[2 * start : 2 * (start + indices.numel())]
        values = target if scratch is None else scratch[: target.numel()]
        torch.index_select(pairs, 0, indices, out=values.view(torch.int64))  # both nibbles of each byte
        # Scale each block by its absmax; the chunk starts on a block boundary.
        first_block, whole = 2 * start // blocksize, values.numel() // blocksize
        values[: whole * blocksize].view(whole, blocksize).mul_(absmax[first_block : first_block + whole, None])
        if values.numel() % blocksize:  # the last, partial block
            values[whole * blocksize :].mul_(absmax[first_block + whole])
        if scratch is not None:
            target.copy_(values)  # float32 products rounded once, as dequantize_nf4 does
    return out[:n].view(state.shape)


# ----------------------------------------------------------------------------------------
# Storage
# ----------------------------------------------------------------------------------------


def bits_per_parameter(blocksize: int = 64, double_quant: bool = False, dq_blocksize: int = DQ_BLOCKSIZE) -> float:
    """Storage per weight in bits: 4 for the index plus the block's share of its absmax.

    4 + 32/64 = 4.5 without double quantization; 4 + 8/64 + 32/(64*256) = 4.127 with it
    (the one float32 offset per tensor is left out).
    """
    blocksize = check_int(blocksize, "blocksize")
    dq_blocksize = check_int(dq_blocksize, "dq_blocksize")
    if double_quant:
        return 4 + 8 / blocksize + 32 / (blocksize * dq_blocksize)
    return 4 + 32 / blocksize


# ----------------------------------------------------------------------------------------
# Plain int4, for comparison
# ----------------------------------------------------------------------------------------


def quantize_int4(w: torch.Tensor, blocksize: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric absmax int4: (codes, absmax), codes = round(7 w / absmax) in -7..7.

    ``codes`` is int8 (one per value, unpacked, shaped like ``w``), ``absmax`` float32, one
    per block. 15 evenly spaced levels, symmetric about an exact 0 (the 16th pattern goes
    unused); NF4 instead spaces its 16 levels like a normal distribution's quantiles.
    An all-zero block stores absmax 0 and codes 0. Rounds half to even.
    """
    flat = check_weight(w)
    blocksize = check_blocksize(blocksize)
    blocks = _blocks(flat, blocksize)
    absmax = blocks.abs().amax(dim=1)
    scale = torch.where(absmax > 0, 7 / absmax, torch.zeros_like(absmax))
    codes = torch.round(blocks * scale[:, None]).clamp(-7, 7).to(torch.int8)
    return codes.reshape(-1)[: flat.numel()].reshape(w.shape), absmax


def dequantize_int4(
    codes: torch.Tensor, absmax: torch.Tensor, blocksize: int = 64, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Values ``codes / 7 * absmax`` of their block, shaped like ``codes``, in ``dtype``."""
    if not isinstance(codes, torch.Tensor) or codes.dtype != torch.int8:
        got = getattr(codes, "dtype", type(codes).__name__)
        raise TypeError(f"codes must be an int8 tensor (from quantize_int4), got {got}")
    blocksize = check_blocksize(blocksize)
    n_blocks = -(-codes.numel() // blocksize)
    if not isinstance(absmax, torch.Tensor) or absmax.numel() != n_blocks:
        got = absmax.numel() if isinstance(absmax, torch.Tensor) else type(absmax).__name__
        raise ValueError(f"absmax has {got} values, but {codes.numel()} codes in blocks of {blocksize} need {n_blocks}")
    values = _blocks(codes.reshape(-1).float() / 7, blocksize) * absmax.float().reshape(-1, 1)
    return values.reshape(-1)[: codes.numel()].reshape(codes.shape).to(dtype)


def int4_roundtrip(w: torch.Tensor, blocksize: int = 64) -> torch.Tensor:
    """``w`` quantized to int4 and back, in ``w``'s shape and dtype."""
    codes, absmax = quantize_int4(w, blocksize)
    return dequantize_int4(codes, absmax, blocksize, dtype=w.dtype)


# ----------------------------------------------------------------------------------------
# A frozen 4-bit linear layer
# ----------------------------------------------------------------------------------------


class _MatmulNF4(torch.autograd.Function):
    """``x @ W.T`` for a frozen NF4 weight, dequantizing it again in backward.

    ``F.linear(x, layer.dequantized_weight())`` would give the same numbers, but autograd
    would keep every layer's dequantized weight alive until backward: the model in full
    precision again, exactly what 4 bits were meant to save. Here nothing is saved; the
    backward pass dequantizes once more (bitsandbytes' ``MatMul4Bit`` does the same).
    The weight is frozen, so only the input gets a gradient.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, layer: "NF4Linear") -> torch.Tensor:
        ctx.layer = layer
        return F.linear(x, layer.dequantized_weight())

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        if not ctx.needs_input_grad[0]:
            return None, None
        return grad_out @ ctx.layer.dequantized_weight().to(grad_out.dtype), None


class NF4Linear(nn.Module):
    """A frozen linear layer whose weight is stored in NF4 and dequantized at every forward.

    ``forward(x) = F.linear(x, W, bias)`` with W = :func:`dequantize_nf4_fast` in
    ``compute_dtype`` (x and bias are cast to it too). The packed weight and its
    quantization state are buffers, not parameters: they move with ``.to()`` and are saved
    in the state dict, but no optimizer sees them. The bias, if any, is a frozen parameter.
    This is QLoRA's base layer; LoRA's A and B go beside it. Change the precision of the
    computation with ``compute_dtype``: ``.to(dtype)`` or ``.half()`` would also round the
    float32 absmax buffers.
    """

    def __init__(self, packed: torch.Tensor, state: NF4State, bias: torch.Tensor | None = None,
                 compute_dtype: torch.dtype = torch.float32):
        super().__init__()
        _check_state(packed, state)
        if len(state.shape) != 2:
            raise ValueError(f"a linear layer's weight is 2-D (out, in), got shape {tuple(state.shape)}")
        compute_dtype = check_compute_dtype(compute_dtype)
        self.out_features, self.in_features = state.shape
        if bias is not None and tuple(bias.shape) != (self.out_features,):
            raise ValueError(f"bias must have shape ({self.out_features},), got {tuple(bias.shape)}")
        self.blocksize, self.weight_dtype, self.compute_dtype = state.blocksize, state.dtype, compute_dtype
        self.register_buffer("weight_packed", packed)
        for name in ("absmax", "absmax_codes", "absmax_scales", "absmax_offset", "dq_code"):
            self.register_buffer(name, getattr(state, name))
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    @classmethod
    def from_linear(cls, linear: nn.Linear, blocksize: int = 64, double_quant: bool = True,
                    compute_dtype: torch.dtype = torch.float32) -> "NF4Linear":
        """Quantize ``linear``'s weight (``linear`` itself is left as it was)."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be an nn.Linear, got {type(linear).__name__}")
        packed, state = quantize_nf4(linear.weight.detach(), blocksize, double_quant)
        return cls(packed, state, linear.bias, compute_dtype)

    @property
    def quant_state(self) -> NF4State:
        return NF4State(
            shape=torch.Size((self.out_features, self.in_features)), dtype=self.weight_dtype, blocksize=self.blocksize,
            absmax=self.absmax, absmax_codes=self.absmax_codes, absmax_scales=self.absmax_scales,
            absmax_offset=self.absmax_offset, dq_code=self.dq_code,
        )

    def dequantized_weight(self) -> torch.Tensor:
        """The weight, (out, in), in ``compute_dtype``."""
        return dequantize_nf4_fast(self.weight_packed, self.quant_state, dtype=self.compute_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = _MatmulNF4.apply(x.to(self.compute_dtype), self)
        return out if self.bias is None else out + self.bias.to(self.compute_dtype)

    def extra_repr(self) -> str:
        return (
            f"in={self.in_features}, out={self.out_features}, blocksize={self.blocksize}, "
            f"double_quant={self.absmax_codes is not None}, compute_dtype={self.compute_dtype}"
        )


# ----------------------------------------------------------------------------------------
# Checks, shared with lora_edu.qlora, and the block layout
# ----------------------------------------------------------------------------------------


def check_weight(w, name: str = "w") -> torch.Tensor:
    """``w`` flattened to float32, after checking it is a non-empty, finite float tensor."""
    if not isinstance(w, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(w).__name__}")
    if not w.is_floating_point():
        raise TypeError(f"{name} must hold floating-point numbers, got {w.dtype}")
    if w.numel() == 0:
        raise ValueError(f"{name} must not be empty, got shape {tuple(w.shape)}")
    flat = w.detach().reshape(-1).float()
    bad = (~torch.isfinite(flat)).sum().item()
    if bad:
        # One NaN or inf would poison its block's absmax and with it every value in the block.
        raise ValueError(f"{name} has {bad} NaN or infinite value(s) (in float32); a quantizer cannot store them")
    return flat


def check_blocksize(blocksize, name: str = "blocksize") -> int:
    """``blocksize``, if it is one bitsandbytes accepts: a power of two from 32 to 4096."""
    if isinstance(blocksize, bool) or not isinstance(blocksize, int) or blocksize not in BLOCKSIZES:
        raise ValueError(f"{name} must be a power of two from 32 to 4096 (as in bitsandbytes), got {blocksize!r}")
    return blocksize


def check_compute_dtype(compute_dtype) -> torch.dtype:
    """The precision a 4-bit layer computes in must be a floating-point dtype."""
    if not isinstance(compute_dtype, torch.dtype) or not compute_dtype.is_floating_point:
        raise TypeError(f"compute_dtype must be a floating-point torch.dtype, got {compute_dtype!r}")
    return compute_dtype


def _check_state(packed, state) -> None:
    """Refuse a ``packed`` and ``state`` that did not come from one :func:`quantize_nf4` call."""
    if not isinstance(state, NF4State):
        raise TypeError(f"state must be an NF4State (from quantize_nf4), got {type(state).__name__}")
    if not isinstance(packed, torch.Tensor) or packed.dtype != torch.uint8:
        got = getattr(packed, "dtype", type(packed).__name__)
        raise TypeError(f"packed must be a uint8 tensor (from quantize_nf4), got {got}")
    check_blocksize(state.blocksize, "state.blocksize")
    expected = -(-state.numel // 2)
    if packed.numel() != expected:
        raise ValueError(
            f"packed has {packed.numel()} bytes, but state describes shape {tuple(state.shape)} "
            f"({state.numel} values), which packs into {expected}: they do not belong together"
        )
    if state.double_quant:
        if state.absmax_codes.numel() != state.n_blocks:
            raise ValueError(
                f"state.absmax_codes has {state.absmax_codes.numel()} codes, but shape {tuple(state.shape)} "
                f"in blocks of {state.blocksize} has {state.n_blocks} blocks"
            )
        n_scales = -(-state.n_blocks // state.dq_blocksize)
        if state.absmax_scales is None or state.absmax_scales.numel() != n_scales or state.absmax_offset is None:
            raise ValueError(f"a double-quantized state needs {n_scales} absmax_scales and an absmax_offset")
    elif state.absmax is None or state.absmax.numel() != state.n_blocks:
        got = "none" if state.absmax is None else state.absmax.numel()
        raise ValueError(
            f"state.absmax has {got} values, but shape {tuple(state.shape)} "
            f"in blocks of {state.blocksize} has {state.n_blocks} blocks"
        )


def _blocks(flat: torch.Tensor, blocksize: int) -> torch.Tensor:
    """``flat`` zero-padded to whole blocks, one block per row (the padding never sets an absmax)."""
    n_blocks = -(-flat.numel() // blocksize)
    return F.pad(flat, (0, n_blocks * blocksize - flat.numel())).view(n_blocks, blocksize)
