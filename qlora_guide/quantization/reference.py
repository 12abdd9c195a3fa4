"""The reference quantizers, from scratch: absmax int8/int4, 4-bit packing, blockwise 8-bit, NF4/FP4.

Every quantizer here is a few lines of plain torch that the guide's pages show
one step at a time. The 4-bit ones reproduce ``bitsandbytes.functional.
quantize_4bit`` / ``dequantize_4bit`` *bit for bit*: the packed codes, the absmax
constants, the double-quantized constants and the dequantized values are
``torch.equal`` to what bitsandbytes returns
(:func:`qlora_guide.quantization.parity.compare_with_bitsandbytes` checks it, the
tests run it on many shapes, seeds and dtypes). They follow bitsandbytes' CPU
path; :mod:`qlora_guide.quantization.parity` says where its CUDA kernels differ.

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

Bits per parameter come from the byte sizes actually stored
(:attr:`Quantized4bit.bits_per_parameter`, :attr:`AbsmaxQuantized.bits_per_parameter`),
not from a formula.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from qlora_guide.errors import QLoRAGuideError
from qlora_guide.quantization.codebooks import _check_quant_type, code_for, dynamic_code

BNB_BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)  # what bitsandbytes' quantize_4bit accepts
NESTED_BLOCKSIZE = 256  # blocksize of the 8-bit double quantization of the absmax constants
GRANULARITIES = ("tensor", "channel", "block")


# ---------------------------------------------------------------- input checks


def _check_weights(x: torch.Tensor, what: str = "tensor") -> None:
    """Refuse inputs that would give a silently wrong result: empty, non-float, NaN or inf."""
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
    codes = codes.reshape(-1).to(torch.uint8)
    if codes.numel() % 2:
        codes = torch.cat([codes, codes.new_zeros(1)])
    return (codes[0::2] << 4) | codes[1::2]


def unpack_4bit(packed: torch.Tensor, n: int) -> torch.Tensor:
    """The ``n`` 4-bit codes stored in ``packed`` (uint8), high nibble first."""
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
    grid_values = torch.arange(65536, dtype=torch.float64, device=code.device) / 32767.5 - 1
    sorted_code = code.double()
    midpoints = (sorted_code[:-1] + sorted_code[1:]) / 2
    return torch.bucketize(grid_values, midpoints)


def dequantize_blockwise_8bit(
    codes: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor | None = None, blocksize: int = NESTED_BLOCKSIZE
) -> torch.Tensor:
    """Undo :func:`quantize_blockwise_8bit`: code value times block absmax, in float32."""
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
