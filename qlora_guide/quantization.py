"""Quantization, step by step: absmax int8/int4, FP4, NF4 and double quantization.

Every quantizer here is a few lines of plain torch that the guide's pages show
one step at a time. The 4-bit ones reproduce ``bitsandbytes.functional.
quantize_4bit`` / ``dequantize_4bit`` *bit for bit*: the packed codes, the absmax
constants, the double-quantized constants and the dequantized values are
``torch.equal`` to what bitsandbytes returns (:func:`compare_with_bitsandbytes`
checks it, the tests run it on many shapes, seeds and dtypes).

How bitsandbytes (0.50) quantizes, and so how this module does
--------------------------------------------------------------

* **4-bit codes.** The input is flattened and cast to float32, cut into blocks
  of ``blocksize`` values (64 by default; the last block may be shorter). Each
  block is divided by its absolute maximum, then every value gets the index of
  the *nearest* entry of the 16-value codebook: the sorted codebook's midpoints
  are thresholds (``torch.bucketize``), and a value exactly on a midpoint goes
  to the lower entry. Two codes share a byte, the *first* value in the *high*
  nibble. An odd count is padded with the code of 0.0.
* **Rounding details that matter for bit-exactness.** Full blocks are scaled by
  multiplying with the float32 reciprocal ``1 / absmax``; the last, partial
  block is divided by its absmax. A block of zeros keeps absmax 0 when it is a
  full block, but the partial last block stores ``1e-38`` (bitsandbytes clamps
  it before the division).
* **FP4 zero.** FP4 has two zeros, +0 (code 0) and -0 (code 8). On the CPU,
  bitsandbytes sorts the codebook (+0 before -0), so zero and tiny negative
  values get code 0, tiny positive values (up to ``0.0026 * absmax``) code 8.
  Both decode to zero; the reference does the same.
* **Double quantization** (``compress_statistics=True``): the float32 absmax
  constants minus their mean (the *offset*, kept in float32) are quantized
  with bitsandbytes' signed 8-bit *dynamic* code in blocks of 256. bitsandbytes'
  CPU kernel divides each value by its block's absmax, rounds the result to a
  16-bit grid over [-1, 1] (``floor((v + 1) * 32767.5 + 0.5)`` in float32) and
  looks the grid point up in a table of the nearest code values. This is *not*
  always the nearest code value: the code's values near zero are closer than
  the grid step (3e-5), and the grid has no point at zero, so every value in
  [0, 3e-5) becomes 2.1e-5 (and (-3e-5, 0) becomes -2.1e-5), zero included.
  A block whose constants all equal the mean gives 0/0, stored as code 0.
* **Dequantization** looks each code up, multiplies by its block's absmax in
  float32 and only then casts to the input dtype (round to nearest even).

CPU and CUDA
------------

The reference follows bitsandbytes' CPU path (the kernels it registers for
``cpu``; 4-bit quantization there is bitsandbytes' own pure-torch kernel).
Its CUDA kernels, checked on an H100 (bitsandbytes 0.50.2, torch 2.11 + CUDA
13) over 432 tensors and 2.3 billion values, differ from it in three ways:

* Ties. CUDA compares with decimal thresholds written in the kernel rather
  than float32 midpoints of the codebook, and FP4 compares the magnitude,
  so a value exactly on a midpoint goes towards zero. NF4 codes are still
  identical for bf16 and fp16 weights; for float32 weights 16 codes in 189
  million differed (values within an ulp of a midpoint). For FP4, 0.07 % of
  bf16 values (fewer for fp16 and float32) differ by one step.
* FP4 zero: CUDA encodes the sign first, so tiny positive values get +0
  (code 0) and tiny negative ones -0 (code 8), the reverse of the CPU. Both
  decode to zero.
* Double quantization: the offset (a float32 mean computed on the device) and
  the nested absmax are identical, but CUDA searches the 256 code values
  directly instead of going through the 16-bit grid: 0.16 % of the 8-bit
  absmax codes differ, so do the weights of those blocks, by one 8-bit step
  of their scale. bitsandbytes' own CPU and CUDA results differ the same way
  (and their offsets by an ulp, the mean being summed in another order).

:func:`compare_with_bitsandbytes` counts each kind of difference on whatever
device its input is on; the GPU test asserts these bounds.

The rest of the module measures what quantization buys and costs: bits per
parameter from real byte sizes (:attr:`Quantized4bit.bits_per_parameter`),
the footprint of a loaded model (:func:`model_footprint`,
:func:`footprint_table`), the error of each format (:func:`error_table`),
torch's post-training dynamic int8 quantization
(:func:`dynamic_quantization_report`) and saving a bitsandbytes-quantized
model that transformers reloads (:func:`quantize_model`).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from qlora_guide import progress
from qlora_guide.errors import QLoRAGuideError

if TYPE_CHECKING:  # pragma: no cover
    import torch

QUANT_TYPES = ("nf4", "fp4")
BNB_BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)  # what bitsandbytes' quantize_4bit accepts
NESTED_BLOCKSIZE = 256  # blocksize of the 8-bit double quantization of the absmax constants
NF4_OFFSET = 0.9677083  # outermost quantile of N(0, 1) that NF4 covers (bitsandbytes' create_normal_map)
GRANULARITIES = ("tensor", "channel", "block")


# ---------------------------------------------------------------- checks


def _check_weights(x: torch.Tensor, what: str = "tensor") -> None:
    """Refuse inputs that would give a silently wrong result: empty, non-float, NaN or inf."""
    import torch

    if not isinstance(x, torch.Tensor):
        raise QLoRAGuideError(f"cannot quantize a {type(x).__name__}: expected a torch.Tensor")
    if x.numel() == 0:
        raise QLoRAGuideError(f"cannot quantize an empty {what} (shape {tuple(x.shape)})")
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise QLoRAGuideError(f"cannot quantize a {x.dtype} {what}: expected float32, float16 or bfloat16")
    finite = torch.isfinite(x)
    if not bool(finite.all()):
        bad = int((~finite).sum())
        kind = "NaN" if bool(torch.isnan(x).any()) else "inf"
        raise QLoRAGuideError(f"cannot quantize a {what} with {bad} non-finite value(s) ({kind}): its absmax would be meaningless")


def _check_blocksize(blocksize: int, allowed: tuple[int, ...] | None = BNB_BLOCKSIZES) -> None:
    """A blocksize must be a power of two (and, for 4-bit, one that bitsandbytes accepts)."""
    if isinstance(blocksize, bool) or not isinstance(blocksize, int) or blocksize < 2 or blocksize & (blocksize - 1):
        raise QLoRAGuideError(f"blocksize must be a power of two, not {blocksize!r}")
    if allowed is not None and blocksize not in allowed:
        raise QLoRAGuideError(f"blocksize {blocksize} is not supported by bitsandbytes: use one of {', '.join(map(str, allowed))}")


def _check_quant_type(quant_type: str) -> None:
    if quant_type not in QUANT_TYPES:
        raise QLoRAGuideError(f"unknown quant_type {quant_type!r}: use 'nf4' or 'fp4'")


# ---------------------------------------------------------------- codebooks


def nf4_code(offset: float = NF4_OFFSET) -> torch.Tensor:
    """Derive the 16 NF4 values from quantiles of N(0, 1), as the QLoRA paper builds them.

    NF4 is asymmetric so that zero is represented exactly: 8 quantiles for the
    positive half (the largest is ``ndtri(offset)``), 7 for the negative half,
    and 0, all divided by the largest so that they span [-1, 1]. The steps and dtypes
    are those of bitsandbytes' ``create_normal_map`` (float32 probabilities,
    float64 inverse CDF, float32 result), so the table equals bitsandbytes'
    hard-coded ``get_4bit_type("nf4")`` bit for bit.
    """
    import torch

    positive_probs = torch.linspace(offset, 0.5, 9)[:-1]  # 8 levels above zero
    negative_probs = torch.linspace(offset, 0.5, 8)[:-1]  # 7 levels below zero
    positive = torch.special.ndtri(positive_probs.double())
    negative = -torch.special.ndtri(negative_probs.double())
    values = torch.cat([negative, torch.zeros(1, dtype=torch.float64), positive]).float()
    values = values.sort().values
    return values / values.max()


def fp4_code() -> torch.Tensor:
    """The 16 FP4 values of bitsandbytes, indexed by their 4-bit pattern ``s e1 e0 m``.

    One sign bit, two exponent bits, one mantissa bit, exponent bias 2, and a
    subnormal for exponent 0. In the raw scale the magnitudes are 0, 0.0625,
    8, 12, 4, 6, 2, 3 (patterns 000 ... 111); dividing by 12 brings them into
    [-1, 1]. Unlike NF4 the table is not sorted: the index *is* the float's bit
    pattern.
    """
    import torch

    magnitudes = []
    for bits in range(8):
        exponent, mantissa = bits >> 1, bits & 1
        if exponent == 0:  # subnormal: 0 or 0.0625
            magnitudes.append(mantissa * 0.0625)
        else:  # normal: (1 + m/2) * 2^(4 - e): 8, 12, 4, 6, 2, 3
            magnitudes.append((1 + mantissa / 2) * 2.0 ** (4 - exponent))
    values = torch.tensor(magnitudes + [-m for m in magnitudes], dtype=torch.float32)
    return values / values.abs().max()


def dynamic_code() -> torch.Tensor:
    """bitsandbytes' signed 8-bit *dynamic* code, used to double-quantize the absmax constants.

    Besides 0 and 1, it has for each decimal exponent ``10^-6 ... 10^0`` a
    linear grid of ``2^k`` fractions in [0.1, 1] (k = 0 ... 6), each with both
    signs: 254 + 2 = 256 values, fine near zero and coarse near one
    (Dettmers 2016, "8-Bit Approximations for Parallelism in Deep Learning").
    Equals ``bitsandbytes.functional.create_dynamic_map()``.
    """
    import torch

    values = [0.0, 1.0]
    for k in range(7):
        edges = torch.linspace(0.1, 1.0, 2**k + 1)
        centres = (edges[:-1] + edges[1:]) / 2.0
        magnitudes = 10.0 ** (k - 6) * centres
        values += magnitudes.tolist() + (-magnitudes).tolist()
    return torch.tensor(sorted(values), dtype=torch.float32)


def code_for(quant_type: str) -> torch.Tensor:
    """The 16-entry codebook of ``"nf4"`` or ``"fp4"``."""
    _check_quant_type(quant_type)
    return nf4_code() if quant_type == "nf4" else fp4_code()


# ---------------------------------------------------------------- absmax int8 / int4


@dataclass
class AbsmaxQuantized:
    """Symmetric integer quantization: ``x ~ q * scale`` with ``q`` in [-qmax, qmax]."""

    q: torch.Tensor  # int8 values (bits=8) or two 4-bit values per byte, offset by 8 (bits=4)
    scale: torch.Tensor  # float32: one per tensor, per channel (row) or per block
    bits: int
    granularity: str
    blocksize: int
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        """Bytes actually stored: the integer codes plus the float32 scales."""
        return self.q.numel() * self.q.element_size() + self.scale.numel() * self.scale.element_size()

    @property
    def bits_per_parameter(self) -> float:
        return 8 * self.nbytes / math.prod(self.shape)


def _groups(x: torch.Tensor, granularity: str, blocksize: int) -> torch.Tensor:
    """View ``x`` as rows that each share one scale (zero-padding the last block)."""
    import torch

    flat = x.detach().float()
    if granularity == "tensor":
        return flat.reshape(1, -1)
    if granularity == "channel":  # one scale per output channel: dim 0 of a Linear weight
        return flat.reshape(x.shape[0], -1) if x.dim() > 1 else flat.reshape(-1, 1)
    flat = flat.reshape(-1)
    pad = -flat.numel() % blocksize
    return torch.nn.functional.pad(flat, (0, pad)).reshape(-1, blocksize)


def absmax_quantize(x: torch.Tensor, bits: int = 8, granularity: str = "tensor", blocksize: int = 64) -> AbsmaxQuantized:
    """Absmax (symmetric) quantization to int8 or int4, per tensor, per channel or per block.

    Each group is scaled so that its largest magnitude maps to ``qmax`` (127 or
    7) and rounded to the nearest integer: ``q = round(x / absmax * qmax)``.
    The larger the group, the more one outlier squeezes all the other values
    into a few levels: this is why QLoRA works in small blocks.
    """
    import torch

    _check_weights(x)
    if bits not in (4, 8):
        raise QLoRAGuideError(f"absmax quantization supports 8 or 4 bits, not {bits!r}")
    if granularity not in GRANULARITIES:
        raise QLoRAGuideError(f"unknown granularity {granularity!r}: use one of {', '.join(GRANULARITIES)}")
    if granularity == "block":
        _check_blocksize(blocksize, allowed=None)
    qmax = 2 ** (bits - 1) - 1
    groups = _groups(x, granularity, blocksize)
    scale = groups.abs().amax(dim=1) / qmax
    q = torch.round(groups / scale.clamp(min=torch.finfo(torch.float32).tiny).unsqueeze(1)).to(torch.int8)
    q = q.reshape(-1)[: x.numel()]
    if bits == 4:
        q = pack_4bit((q + 8).to(torch.uint8)).reshape(-1)  # -7..7 stored as 1..15
    return AbsmaxQuantized(q, scale, bits, granularity, blocksize, tuple(x.shape), x.dtype)


def absmax_dequantize(qx: AbsmaxQuantized) -> torch.Tensor:
    """Undo :func:`absmax_quantize`: ``q * scale``, in the input's shape and dtype."""
    import torch

    n = math.prod(qx.shape)
    q = unpack_4bit(qx.q, n).to(torch.int8) - 8 if qx.bits == 4 else qx.q
    q = q.float()
    if qx.granularity == "tensor":
        values = q * qx.scale
    elif qx.granularity == "channel":
        values = q.reshape(qx.scale.numel(), -1) * qx.scale.unsqueeze(1)
    else:
        pad = -n % qx.blocksize
        values = (torch.nn.functional.pad(q, (0, pad)).reshape(-1, qx.blocksize) * qx.scale.unsqueeze(1)).reshape(-1)[:n]
    return values.reshape(qx.shape).to(qx.dtype)


# ---------------------------------------------------------------- packing


def pack_4bit(codes: torch.Tensor) -> torch.Tensor:
    """Two 4-bit codes per byte, the first in the high nibble (bitsandbytes' order); odd counts get a 0 pad."""
    import torch

    codes = codes.reshape(-1).to(torch.uint8)
    if codes.numel() % 2:
        codes = torch.cat([codes, codes.new_zeros(1)])
    return (codes[0::2] << 4) | codes[1::2]


def unpack_4bit(packed: torch.Tensor, n: int) -> torch.Tensor:
    """The ``n`` 4-bit codes stored in ``packed`` (uint8), high nibble first."""
    import torch

    packed = packed.reshape(-1)
    return torch.stack([packed >> 4, packed & 0x0F], dim=1).reshape(-1)[:n]


# ---------------------------------------------------------------- 8-bit blockwise (for double quantization)


def quantize_blockwise_8bit(
    x: torch.Tensor, code: torch.Tensor | None = None, blocksize: int = NESTED_BLOCKSIZE
) -> tuple[torch.Tensor, torch.Tensor]:
    """Blockwise 8-bit quantization with a 256-entry code, as bitsandbytes' CPU kernel does it.

    Each block is divided by its absmax. bitsandbytes' CPU kernel then does not
    search the code directly: it rounds the value to a grid of 65 536 points
    over [-1, 1] (a 16-bit fixed-point number) and looks that grid point up in
    a table holding the nearest code value of every grid point. Where code
    values are closer together than the grid step (3e-5, near zero) this is not
    the nearest code value: 0 and 1e-7 become 2.1e-5. Returns ``(codes uint8,
    absmax float32)``.
    """
    import torch

    code = dynamic_code().to(x.device) if code is None else code.to(x.device)
    flat = x.detach().reshape(-1).float()
    n = flat.numel()
    pad = -n % blocksize
    blocks = torch.nn.functional.pad(flat, (0, pad)).reshape(-1, blocksize)
    absmax = blocks.abs().amax(dim=1)
    normed = (blocks / absmax.unsqueeze(1)).reshape(-1)[:n]
    grid = torch.floor((normed + 1.0) * 32767.5 + 0.5).clamp(0, 65535)  # float32 arithmetic, as the kernel
    codes = _grid_to_code_table(code)[grid.nan_to_num(0).long()]
    codes = torch.where(torch.isnan(normed), 0, codes)  # an all-zero block: 0/0, code 0 (bitsandbytes' result)
    return codes.to(torch.uint8).reshape(x.shape), absmax


def _grid_to_code_table(code: torch.Tensor) -> torch.Tensor:
    """For each of the 65 536 grid points ``i / 32767.5 - 1``, the index of the nearest code value (ties: lower)."""
    import torch

    grid_values = torch.arange(65536, dtype=torch.float64, device=code.device) / 32767.5 - 1
    sorted_code = code.double()
    midpoints = (sorted_code[:-1] + sorted_code[1:]) / 2
    return torch.bucketize(grid_values, midpoints)


def dequantize_blockwise_8bit(
    codes: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor | None = None, blocksize: int = NESTED_BLOCKSIZE
) -> torch.Tensor:
    """Undo :func:`quantize_blockwise_8bit`: code value times block absmax, in float32."""
    import torch

    code = dynamic_code().to(codes.device) if code is None else code.to(codes.device)
    values = code[codes.reshape(-1).long()]
    n = values.numel()
    pad = -n % blocksize
    values = torch.nn.functional.pad(values, (0, pad)).reshape(-1, blocksize) * absmax.unsqueeze(1)
    return values.reshape(-1)[:n].reshape(codes.shape)


# ---------------------------------------------------------------- 4-bit NF4 / FP4


@dataclass
class NestedAbsmax:
    """Double quantization of the absmax constants: 8-bit codes, their own absmax, and the mean."""

    codes: torch.Tensor  # uint8, one per 4-bit block
    absmax: torch.Tensor  # float32, one per NESTED_BLOCKSIZE codes
    offset: torch.Tensor  # float32 scalar: the mean that was subtracted
    code: torch.Tensor  # the 256-value dynamic code
    blocksize: int = NESTED_BLOCKSIZE


@dataclass
class Quantized4bit:
    """A tensor in 4 bits: packed codes, one absmax per block, optionally double-quantized."""

    codes: torch.Tensor  # uint8, shape (ceil(n / 2), 1): two codes per byte, high nibble first
    absmax: torch.Tensor  # float32 per block, or (double quant) uint8 codes of the centred absmax
    shape: tuple[int, ...]
    dtype: torch.dtype
    blocksize: int
    quant_type: str
    code: torch.Tensor  # the 16-value codebook
    nested: NestedAbsmax | None = None

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        """Bytes of the tensors that belong to this weight: codes, absmax, nested absmax and offset.

        The codebooks (16 and 256 float32 values) are shared constants and are
        left out here; :attr:`codebook_nbytes` gives them (bitsandbytes keeps
        a copy per layer, 64 + 1024 bytes).
        """
        tensors = [self.codes, self.absmax]
        if self.nested is not None:
            tensors += [self.nested.absmax, self.nested.offset]
        return sum(t.numel() * t.element_size() for t in tensors)

    @property
    def codebook_nbytes(self) -> int:
        tables = [self.code] + ([self.nested.code] if self.nested is not None else [])
        return sum(t.numel() * t.element_size() for t in tables)

    @property
    def bits_per_parameter(self) -> float:
        """Storage per weight, from the byte sizes above: 4.5 for NF4/64, about 4.127 with double quant."""
        return 8 * self.nbytes / self.numel


def _scale_blocks(flat: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-block absmax and the values scaled into [-1, 1], with bitsandbytes' exact arithmetic.

    Full blocks are multiplied by ``1 / absmax``; the last partial block is
    divided by its absmax, clamped to 1e-38 first (so an all-zero tail stores
    1e-38). Both are bitsandbytes' CPU kernel's choices, kept for bit-exactness.
    """
    import torch

    n = flat.numel()
    full = n - n % blocksize
    blocks = flat[:full].reshape(-1, blocksize)
    absmax = blocks.abs().amax(dim=1)
    scaled = (blocks * (1.0 / absmax.clamp(min=1e-38)).unsqueeze(1)).reshape(-1)
    if full < n:
        tail = flat[full:]
        tail_absmax = tail.abs().amax().clamp(min=1e-38)
        absmax = torch.cat([absmax, tail_absmax.reshape(1)])
        scaled = torch.cat([scaled, tail / tail_absmax])
    return absmax, scaled.clamp_(-1.0, 1.0)


def _nearest_4bit(scaled: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """Index of the nearest codebook entry: thresholds at the midpoints of the sorted codebook.

    ``bucketize`` counts the midpoints strictly below each value, so a value
    exactly on a midpoint goes to the lower entry. The codebook is sorted with
    a stable sort (FP4's +0 comes before -0) and the sorted position is mapped
    back to the code's index; NF4 is already sorted.
    """
    import torch

    sorted_code, order = torch.sort(code, stable=True)
    midpoints = (sorted_code[:-1] + sorted_code[1:]) / 2
    position = torch.bucketize(scaled, midpoints, out_int32=True).to(torch.uint8)
    if torch.equal(order, torch.arange(code.numel(), device=code.device)):
        return position
    return order.to(torch.uint8)[position.long()]


def quantize_4bit(
    x: torch.Tensor, quant_type: str = "nf4", blocksize: int = 64, double_quant: bool = False
) -> Quantized4bit:
    """Blockwise 4-bit quantization (NF4 or FP4), bit-exact with ``bitsandbytes.functional.quantize_4bit``.

    1. flatten and cast to float32; cut into blocks of ``blocksize`` values;
    2. divide each block by its absmax, so that it lies in [-1, 1];
    3. replace every value by the index of the nearest codebook entry;
    4. pack two 4-bit indices per byte;
    5. with ``double_quant``, quantize the float32 absmax constants too
       (minus their mean, 8-bit, blocks of 256).
    """
    import torch

    _check_weights(x)
    _check_quant_type(quant_type)
    _check_blocksize(blocksize)
    code = code_for(quant_type).to(x.device)
    flat = x.detach().reshape(-1).float()
    absmax, scaled = _scale_blocks(flat, blocksize)
    if scaled.numel() % 2:  # an odd count: the last byte's low nibble holds the code of 0.0
        scaled = torch.nn.functional.pad(scaled, (0, 1))
    codes = pack_4bit(_nearest_4bit(scaled, code)).unsqueeze(1)
    nested = None
    if double_quant:
        offset = absmax.mean()
        nested_codes, nested_absmax = quantize_blockwise_8bit(absmax - offset)
        nested = NestedAbsmax(nested_codes, nested_absmax, offset, dynamic_code().to(x.device))
        absmax = nested_codes
    return Quantized4bit(codes, absmax, tuple(x.shape), x.dtype, blocksize, quant_type, code, nested)


def block_absmax(qx: Quantized4bit) -> torch.Tensor:
    """The float32 absmax of every block, undoing the double quantization when there is one."""
    if qx.nested is None:
        return qx.absmax
    nested = qx.nested
    return dequantize_blockwise_8bit(qx.absmax, nested.absmax, nested.code, nested.blocksize) + nested.offset


def dequantize_4bit(qx: Quantized4bit) -> torch.Tensor:
    """Undo :func:`quantize_4bit`: codebook value times block absmax (float32), cast to the input dtype.

    A byte holds two codes, so a 256-row table of value pairs decodes a whole
    byte with one lookup (the same numbers as looking up each nibble).
    """
    import torch

    n, blocksize = qx.numel, qx.blocksize
    byte = torch.arange(256, device=qx.code.device)
    pair_table = torch.stack([qx.code[byte >> 4], qx.code[byte & 0x0F]], dim=1)  # (256, 2): high, low nibble
    values = pair_table.index_select(0, qx.codes.reshape(-1).int()).reshape(-1)[:n]
    absmax = block_absmax(qx)
    full = n - n % blocksize
    values[:full].view(-1, blocksize).mul_(absmax[: full // blocksize].unsqueeze(1))
    if full < n:  # the last, partial block
        values[full:].mul_(absmax[-1])
    return values.reshape(qx.shape).to(qx.dtype)


# ---------------------------------------------------------------- parity with bitsandbytes


def compare_with_bitsandbytes(
    x: torch.Tensor, quant_type: str = "nf4", blocksize: int = 64, double_quant: bool = False
) -> dict[str, Any]:
    """Quantize ``x`` with the reference and with bitsandbytes (on ``x``'s device) and count differences.

    Returns the number of differing packed bytes, absmax entries, nested
    entries and dequantized values, and ``equal``: True when all of them are
    ``torch.equal``. bitsandbytes returns a 1-D input dequantized as shape
    (1, n) on the CPU; values are compared after reshaping to the input shape.
    """
    import bitsandbytes.functional as bnbf
    import torch

    ours = quantize_4bit(x, quant_type, blocksize, double_quant)
    codes, state = bnbf.quantize_4bit(x, blocksize=blocksize, quant_type=quant_type, compress_statistics=double_quant)

    def differing(a: torch.Tensor, b: torch.Tensor) -> int:
        if a.shape != b.shape or a.dtype != b.dtype:
            return max(a.numel(), b.numel())
        return int((a != b).sum())

    report: dict[str, Any] = {
        "device": str(x.device),
        "shape": tuple(x.shape),
        "dtype": str(x.dtype).removeprefix("torch."),
        "quant_type": quant_type,
        "blocksize": blocksize,
        "double_quant": double_quant,
        "codes_differ": differing(ours.codes, codes),
        "absmax_differ": differing(ours.absmax, state.absmax),
        "codebook_equal": torch.equal(ours.code, state.code),
    }
    if double_quant:
        report["offset_equal"] = torch.equal(ours.nested.offset, state.offset)
        report["nested_absmax_differ"] = differing(ours.nested.absmax, state.state2.absmax)
        report["nested_code_equal"] = torch.equal(ours.nested.code, state.state2.code)
    theirs = bnbf.dequantize_4bit(codes, state).reshape(x.shape)
    mine = dequantize_4bit(ours)
    report["dequantized_dtype_equal"] = mine.dtype == theirs.dtype
    report["dequantized_differ"] = differing(mine, theirs)
    report["dequantized_max_abs_diff"] = float((mine.float() - theirs.float()).abs().max())
    counts = [v for k, v in report.items() if k.endswith("_differ")]
    flags = [v for k, v in report.items() if k.endswith("_equal")]
    report["equal"] = all(c == 0 for c in counts) and all(flags)
    return report


# ---------------------------------------------------------------- footprint of a loaded model

KINDS = ("embeddings", "attention", "mlp", "norms", "lm_head", "other")


def _kind(name: str) -> str:
    """Which part of a transformer a parameter or buffer belongs to, from its name."""
    if "lm_head" in name:
        return "lm_head"
    if "embed" in name or name.endswith(("wte.weight", "wpe.weight")):
        return "embeddings"
    if "norm" in name or "ln_" in name:
        return "norms"
    if any(key in name for key in ("self_attn", "attention", "q_proj", "k_proj", "v_proj", "o_proj", "attn")):
        return "attention"
    if any(key in name for key in ("mlp", "gate_proj", "up_proj", "down_proj", "feed_forward", "ffn")):
        return "mlp"
    return "other"


def _quant_state_tensors(param: Any) -> list[torch.Tensor]:
    """The tensors bitsandbytes keeps beside a quantized weight (absmax, codebooks, offset, int8 row scales)."""
    import torch

    tensors = []
    state = getattr(param, "quant_state", None)
    if state is not None:  # Params4bit
        tensors += [state.absmax, state.code]
        if state.nested:
            tensors += [state.offset, state.state2.absmax, state.state2.code]
    scb = getattr(param, "SCB", None)
    if isinstance(scb, torch.Tensor):  # Int8Params: one float32 scale per row
        tensors.append(scb)
    return [t for t in tensors if isinstance(t, torch.Tensor)]


def _logical_numel(param: Any) -> int:
    """Number of weights a parameter stands for (a packed 4-bit tensor holds two per byte)."""
    state = getattr(param, "quant_state", None)
    if state is not None and state.shape is not None:
        return math.prod(state.shape)
    return param.numel()


def model_footprint(model: Any) -> dict[str, Any]:
    """Bytes actually held by a loaded model, grouped by kind of layer.

    Counts every parameter and buffer once (a tied ``lm_head`` shares the
    embedding's tensor and adds nothing), plus what bitsandbytes stores beside
    quantized weights (``weight.quant_state``: absmax, nested absmax, offset
    and codebooks; ``weight.SCB`` for int8), and the int8 weights of torch's
    dynamically quantized Linear layers. Returns ``total_bytes``, ``by_kind``
    (bytes per kind), ``quant_constants_bytes``, ``parameters`` (number of
    weights), ``bits_per_parameter`` and ``tied_lm_head``.

    Measure a 4-bit model before its first forward pass on the CPU: for
    inference, bitsandbytes' CPU backend repacks each Linear4bit on first use
    (on CPUs with AVX512-BF16), undoing double quantization into a bf16
    absmax per block.
    """
    import torch

    seen: set[tuple[int, int]] = set()
    alive: list[torch.Tensor] = []  # keeps tensors made on the fly (int_repr) so their addresses stay unique
    by_kind = dict.fromkeys(KINDS, 0)
    counts = {"constants": 0, "parameters": 0}

    def add(name: str, tensor: torch.Tensor, numel: int = 0, constant: bool = False) -> None:
        nbytes = tensor.numel() * tensor.element_size()
        key = (tensor.data_ptr(), nbytes)
        if nbytes == 0 or key in seen:  # shared (tied) tensors are counted once
            return
        seen.add(key)
        alive.append(tensor)
        by_kind[_kind(name)] += nbytes
        counts["parameters"] += numel
        counts["constants"] += nbytes if constant else 0

    for module_name, module in model.named_modules():
        for name, param in module.named_parameters(prefix=module_name, recurse=False):
            add(name, param.data, numel=_logical_numel(param))
            for tensor in _quant_state_tensors(param):
                add(name, tensor, constant=True)
        for name, buffer in module.named_buffers(prefix=module_name, recurse=False):
            add(name, buffer)
        if isinstance(module, torch.ao.nn.quantized.dynamic.Linear):  # torch's dynamic int8 Linear
            weight = module.weight()
            add(f"{module_name}.weight", weight.int_repr(), numel=weight.numel())
            if weight.qscheme() in (torch.per_channel_affine, torch.per_channel_symmetric):
                add(f"{module_name}.weight", weight.q_per_channel_scales(), constant=True)
            if module.bias() is not None:
                add(f"{module_name}.bias", module.bias(), numel=module.bias().numel())
    total = sum(by_kind.values())
    return {
        "total_bytes": total,
        "by_kind": by_kind,
        "quant_constants_bytes": counts["constants"],
        "parameters": counts["parameters"],
        "bits_per_parameter": 8 * total / max(counts["parameters"], 1),
        "tied_lm_head": _is_tied(model),
    }


def _is_tied(model: Any) -> bool:
    """True when the output head shares the input embedding's tensor."""
    get_in, get_out = getattr(model, "get_input_embeddings", None), getattr(model, "get_output_embeddings", None)
    if get_in is None or get_out is None or get_out() is None:
        return False
    head = get_out().weight
    if callable(head):  # torch's dynamically quantized Linear: its own int8 copy, never tied
        return False
    return get_in().weight.data_ptr() == head.data_ptr()


FOOTPRINT_VARIANTS = ("fp32", "bf16", "int8", "nf4", "nf4-dq")


def _load_variant(name_or_path: str, variant: str) -> tuple[Any, str]:
    """Load the model as one storage variant; returns the model and a label saying how it is stored."""
    from qlora_guide.config import QuantizationConfig
    from qlora_guide.models import load_model

    if variant == "fp32":
        return load_model(name_or_path, dtype="float32", device_map="cpu"), "float32"
    if variant == "bf16":
        return load_model(name_or_path, dtype="bfloat16", device_map="cpu"), "bfloat16"
    if variant == "int8":
        config = QuantizationConfig(load_in_4bit=False)
        try:
            model = load_model(name_or_path, quantization=config, dtype="bfloat16", device_map="cpu")
            return model, "bitsandbytes LLM.int8() (Linear8bitLt), rest bf16"
        except Exception as err:  # an old bitsandbytes without a CPU int8 path: say so and use torch's int8
            model, _ = _torch_dynamic_int8(load_model(name_or_path, dtype="float32", device_map="cpu"))
            return model, f"torch dynamic int8 (bitsandbytes int8 unavailable: {str(err).splitlines()[0][:80]}), rest fp32"
    if variant in ("nf4", "nf4-dq"):
        config = QuantizationConfig(bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=variant == "nf4-dq")
        label = "bitsandbytes NF4" + (" + double quant" if variant == "nf4-dq" else "") + ", rest bf16"
        return load_model(name_or_path, quantization=config, device_map="cpu"), label
    raise QLoRAGuideError(f"unknown footprint variant {variant!r}: use one of {', '.join(FOOTPRINT_VARIANTS)}")


def footprint_table(name_or_path: str = "smollm2-135m", variants: tuple[str, ...] = FOOTPRINT_VARIANTS) -> list[dict[str, Any]]:
    """Measured size of the model stored as fp32, bf16, int8 and NF4 (+ double quant), one row each.

    Each variant is really loaded (bitsandbytes quantizes on load) and
    measured with :func:`model_footprint`. ``reduction_vs_fp32`` and
    ``reduction_vs_bf16`` are ``1 - bytes / reference bytes``: this is what
    checks a claim such as "75 % memory reduction". What is not quantized
    (embeddings, norms, a tied output head) stays in 16 bits and shows up in
    the per-kind columns.
    """
    import gc

    for variant in variants:
        if variant not in FOOTPRINT_VARIANTS:
            raise QLoRAGuideError(f"unknown footprint variant {variant!r}: use one of {', '.join(FOOTPRINT_VARIANTS)}")
    rows = []
    for variant in variants:
        model, label = _load_variant(name_or_path, variant)
        footprint = model_footprint(model)
        del model
        gc.collect()
        row = {"variant": variant, "storage": label, "total_bytes": footprint["total_bytes"]}
        row.update({f"{kind}_bytes": nbytes for kind, nbytes in footprint["by_kind"].items()})
        row["quant_constants_bytes"] = footprint["quant_constants_bytes"]
        row["bits_per_parameter"] = footprint["bits_per_parameter"]
        row["tied_lm_head"] = footprint["tied_lm_head"]
        rows.append(row)
    reference = {row["variant"]: row["total_bytes"] for row in rows}
    for row in rows:
        for base in ("fp32", "bf16"):
            row[f"reduction_vs_{base}"] = 1 - row["total_bytes"] / reference[base] if base in reference else None
    return rows


# ---------------------------------------------------------------- error analysis

ERROR_METHODS = ("int8 absmax (tensor)", "int4 absmax (block 64)", "fp4 (block 64)", "nf4 (block 64)", "nf4 + dq (block 64)")


def quantize_roundtrip(x: torch.Tensor, method: str) -> torch.Tensor:
    """Quantize and dequantize ``x`` with one of :data:`ERROR_METHODS`."""
    if method == "int8 absmax (tensor)":
        return absmax_dequantize(absmax_quantize(x, bits=8, granularity="tensor"))
    if method == "int4 absmax (block 64)":
        return absmax_dequantize(absmax_quantize(x, bits=4, granularity="block", blocksize=64))
    if method == "fp4 (block 64)":
        return dequantize_4bit(quantize_4bit(x, "fp4", 64))
    if method == "nf4 (block 64)":
        return dequantize_4bit(quantize_4bit(x, "nf4", 64))
    if method == "nf4 + dq (block 64)":
        return dequantize_4bit(quantize_4bit(x, "nf4", 64, double_quant=True))
    raise QLoRAGuideError(f"unknown quantization method {method!r}: use one of {', '.join(ERROR_METHODS)}")


def quantization_error(x: torch.Tensor, method: str) -> dict[str, float]:
    """Mean squared error and signal-to-noise ratio (dB) of quantizing ``x`` (computed in float64).

    ``SNR = 10 log10(sum x^2 / sum (x - x_hat)^2)``: each extra bit is worth
    about 6 dB for a uniform grid.
    """
    x = x.detach().float()
    error = (quantize_roundtrip(x, method).double() - x.double()).pow(2).sum()
    signal = x.double().pow(2).sum()
    return {"mse": float(error / x.numel()), "snr_db": float(10 * math.log10(signal / error)) if error > 0 else math.inf}


LAYER_TYPES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def error_table(
    name_or_path: str | None = "smollm2-135m",
    methods: tuple[str, ...] = ERROR_METHODS,
    gaussian_size: int = 1 << 20,
    layers: tuple[int, ...] | None = None,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """MSE and SNR of each method on N(0, 1) weights and on the real weights, per layer type.

    Rows: ``{"weights", "method", "numel", "mse", "snr_db"}``, first for
    ``gaussian_size`` samples of N(0, 1), then for every layer type (q, k, v,
    o, gate, up, down) of the model, errors summed over the chosen decoder
    ``layers`` (all when None). ``name_or_path=None`` gives the N(0, 1) rows
    only.
    """
    import torch

    generator = torch.Generator().manual_seed(seed)
    samples = {"N(0,1)": [torch.randn(gaussian_size, generator=generator)]}
    if name_or_path is not None:
        samples.update(_weights_by_layer_type(name_or_path, layers))
    rows = []
    for weights, tensors in samples.items():
        for method in methods:
            numel = sum(t.numel() for t in tensors)
            squared = sum(quantization_error(t, method)["mse"] * t.numel() for t in tensors)
            signal = sum(float(t.double().pow(2).sum()) for t in tensors)
            mse = squared / numel
            snr = 10 * math.log10(signal / squared) if squared > 0 else math.inf
            rows.append({"weights": weights, "method": method, "numel": numel, "mse": mse, "snr_db": snr})
    return rows


def _weights_by_layer_type(name_or_path: str, layers: tuple[int, ...] | None) -> dict[str, list[torch.Tensor]]:
    """The bf16 weights of the model's linear layers, as float32 tensors grouped by layer type."""
    import re

    from qlora_guide.models import load_model

    model = load_model(name_or_path, dtype="bfloat16", device_map="cpu")
    grouped: dict[str, list] = {kind: [] for kind in LAYER_TYPES}
    for name, param in model.named_parameters():
        match = re.search(r"layers\.(\d+)\..*\.(\w+_proj)\.weight$", name)
        if match and match.group(2) in grouped and (layers is None or int(match.group(1)) in layers):
            grouped[match.group(2)].append(param.detach().float())
    return {kind: tensors for kind, tensors in grouped.items() if tensors}


# ---------------------------------------------------------------- post-training dynamic quantization

DYNAMIC_ALTERNATIVE = "torchao.quantization.quantize_(model, Int8DynamicActivationInt8WeightConfig())"


def _torch_dynamic_int8(model: Any) -> tuple[Any, list[str]]:
    """``torch.quantization.quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8)``, with the warnings it raised."""
    import warnings

    import torch

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quantized = torch.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)
    messages = []
    for warning in caught:
        first_line = str(warning.message).strip().splitlines()[0]
        if first_line not in messages:
            messages.append(first_line)
    return quantized, messages


def _serialized_bytes(model: Any) -> int:
    """Size of ``torch.save(model.state_dict())``: packed int8 weights are not tensors safetensors can hold."""
    import io

    import torch

    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return buffer.tell()


def _median_forward_seconds(model: Any, input_ids: torch.Tensor, repeats: int) -> tuple[float, torch.Tensor]:
    import statistics
    import time

    import torch

    with torch.inference_mode():
        logits = model(input_ids).logits  # warm-up
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            model(input_ids)
            times.append(time.perf_counter() - start)
    return statistics.median(times), logits


SAMPLE_TEXT = (
    "Quantization stores each weight of a neural network with fewer bits. QLoRA keeps the frozen base model "
    "in 4-bit NormalFloat and trains small low-rank adapters in 16-bit precision on top of it, so that a "
    "large language model can be fine-tuned on a single GPU. "
)


def dynamic_quantization_report(
    name_or_path: str = "smollm2-135m", batch_size: int = 1, seq_len: int = 128, repeats: int = 3, text: str = SAMPLE_TEXT
) -> dict[str, Any]:
    """Run the originals' ``torch.quantization.quantize_dynamic`` example on a real model and measure it.

    The fp32 model's ``nn.Linear`` layers become int8 weights with activations
    quantized on the fly. Measured: serialized size (``torch.save`` of the
    state dict), the bytes of the Linear layers, the median forward latency
    on ``text`` (repeated to ``seq_len`` tokens), and how far the logits
    move (largest difference, agreement of the top-1 next token). The tied output head
    becomes an int8 *copy*, while the fp32 embedding stays. Also returns the
    deprecation warnings torch prints and the current replacement (torchao).
    """
    import copy

    import torch

    from qlora_guide.models import load_model, load_tokenizer

    model = load_model(name_or_path, dtype="float32", device_map="cpu").eval()
    tokens = load_tokenizer(name_or_path)(text)["input_ids"]
    tokens = (tokens * (seq_len // len(tokens) + 1))[:seq_len]
    input_ids = torch.tensor([tokens] * batch_size)
    before = model_footprint(model)
    size_before = _serialized_bytes(model)
    latency_before, logits_before = _median_forward_seconds(model, input_ids, repeats)
    quantized, warnings_seen = _torch_dynamic_int8(copy.deepcopy(model))
    after = model_footprint(quantized)
    size_after = _serialized_bytes(quantized)
    latency_after, logits_after = _median_forward_seconds(quantized, input_ids, repeats)
    linear_types = sum(isinstance(m, torch.ao.nn.quantized.dynamic.Linear) for m in quantized.modules())
    linear = ("attention", "mlp", "lm_head")
    return {
        "torch_version": torch.__version__,
        "quantized_linear_layers": linear_types,
        "serialized_bytes_before": size_before,
        "serialized_bytes_after": size_after,
        "linear_bytes_before": sum(before["by_kind"][k] for k in linear),
        "linear_bytes_after": sum(after["by_kind"][k] for k in linear),
        "embedding_bytes_after": after["by_kind"]["embeddings"],
        "latency_before_s": latency_before,
        "latency_after_s": latency_after,
        "input_shape": (batch_size, seq_len),
        "max_abs_logit_diff": float((logits_after - logits_before).abs().max()),
        "top1_agreement": float((logits_after.argmax(-1) == logits_before.argmax(-1)).float().mean()),
        "deprecated": any("deprecated" in message for message in warnings_seen),
        "warnings": warnings_seen,
        "alternative": DYNAMIC_ALTERNATIVE,
    }


# ---------------------------------------------------------------- saving a quantized model

SAVE_TYPES = ("nf4", "fp4", "int8")


@dataclass
class QuantizeResult:
    """What :func:`quantize_model` wrote."""

    out_dir: str
    quant_type: str
    double_quant: bool
    compute_dtype: str
    memory_bytes: int  # the quantized model in memory (model_footprint)
    disk_bytes: int  # all files written
    weights_bytes: int  # the *.safetensors files
    quantized_layers: int

    def to_dict(self) -> dict[str, Any]:
        from dataclasses import asdict

        return asdict(self)


def check_causal_lm(name_or_path: str) -> None:
    """Raise a one-line error unless the model's config is one that ``AutoModelForCausalLM`` loads."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    from qlora_guide.models import resolve_model

    name = resolve_model(name_or_path)
    try:
        config = AutoConfig.from_pretrained(name)
    except (OSError, ValueError) as err:
        first_line = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise QLoRAGuideError(f"could not read the config of '{name_or_path}': {first_line}") from None
    causal_classes = set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())
    architectures = config.architectures or []
    is_causal = config.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and (
        not architectures or any(arch in causal_classes or arch.endswith("ForCausalLM") for arch in architectures)
    )
    if not is_causal:
        kind = ", ".join(architectures) or config.model_type
        raise QLoRAGuideError(f"'{name_or_path}' is not a causal language model ({kind}): quantize needs a model that generates text")


@progress.library_bars()
def quantize_model(
    name_or_path: str,
    out_dir: str | os.PathLike,
    quant_type: str = "nf4",
    double_quant: bool = True,
    compute_dtype: str = "bfloat16",
    overwrite: bool = False,
) -> QuantizeResult:
    """Load a model quantized by bitsandbytes and save it so that ``from_pretrained(out_dir)`` reloads it quantized.

    The weights are saved as safetensors with their quantization state (packed
    codes, absmax, nested constants) and the ``quantization_config`` in
    ``config.json``; the tokenizer is saved beside them. The folder is written
    under a temporary name in the same parent and renamed into place, so an
    interrupted run never leaves a half-written model. An existing non-empty
    ``out_dir`` is refused unless ``overwrite``, and even then unless it holds a
    model this function wrote (:mod:`qlora_guide.outputs`).
    """
    import shutil

    from qlora_guide.config import DTYPES, QuantizationConfig
    from qlora_guide.models import load_model, load_tokenizer
    from qlora_guide.outputs import check_output_folder, replace_folder, staging_folder

    if quant_type not in SAVE_TYPES:
        raise QLoRAGuideError(f"unknown quant type {quant_type!r}: use nf4, fp4 or int8")
    if compute_dtype not in DTYPES:
        raise QLoRAGuideError(f"unknown compute dtype {compute_dtype!r}: use one of {', '.join(DTYPES)}")
    out = check_output_folder(out_dir, overwrite, "quantized", inputs=(name_or_path,))
    check_causal_lm(name_or_path)

    double_quant = double_quant and quant_type != "int8"
    config = QuantizationConfig(
        load_in_4bit=quant_type != "int8",
        bnb_4bit_quant_type=quant_type if quant_type != "int8" else "nf4",
        bnb_4bit_use_double_quant=double_quant,
        bnb_4bit_compute_dtype=compute_dtype,
    )
    model = load_model(name_or_path, quantization=config, dtype=compute_dtype)
    tokenizer = load_tokenizer(name_or_path)
    footprint = model_footprint(model)
    layers = sum(1 for m in model.modules() if type(m).__name__ in ("Linear4bit", "Linear8bitLt"))

    staging = staging_folder(out, "quantized")
    try:
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        replace_folder(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    files = [p for p in out.rglob("*") if p.is_file()]
    return QuantizeResult(
        out_dir=str(out),
        quant_type=quant_type,
        double_quant=double_quant,
        compute_dtype=compute_dtype,
        memory_bytes=footprint["total_bytes"],
        disk_bytes=sum(p.stat().st_size for p in files),
        weights_bytes=sum(p.stat().st_size for p in files if p.suffix == ".safetensors"),
        quantized_layers=layers,
    )


def format_quantize_result(result: QuantizeResult) -> str:
    """The CLI's table for :func:`quantize_model`."""
    kind = result.quant_type + (" + double quant" if result.double_quant else "")
    rows = [
        ("saved to", result.out_dir),
        ("quantization", f"{kind}, compute in {result.compute_dtype}"),
        ("quantized layers", str(result.quantized_layers)),
        ("in memory", f"{result.memory_bytes / 2**20:.1f} MiB"),
        ("weights on disk", f"{result.weights_bytes / 2**20:.1f} MiB (safetensors)"),
        ("all files", f"{result.disk_bytes / 2**20:.1f} MiB"),
    ]
    width = max(len(label) for label, _ in rows)
    lines = [f"{label:<{width}}  {value}" for label, value in rows]
    lines.append(f"reload: AutoModelForCausalLM.from_pretrained({result.out_dir!r}) gives the quantized layers back")
    return "\n".join(lines)
