"""Parity with bitsandbytes: quantize the same tensor both ways and count every difference.

The reference (:mod:`qlora_guide.quantization.reference`) follows bitsandbytes'
CPU path (the kernels it registers for ``cpu``; 4-bit quantization there is
bitsandbytes' own pure-torch kernel), and :func:`compare_with_bitsandbytes`
finds no difference there.

CPU and CUDA
------------

bitsandbytes' CUDA kernels, checked on an H100 (bitsandbytes 0.50.2, torch
2.11 + CUDA 13) over 432 tensors and 2.3 billion values, differ from the
reference in three ways:

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
"""

from __future__ import annotations

from typing import Any

import torch

from qlora_guide.quantization.reference import dequantize_4bit, quantize_4bit


def _differing(a: torch.Tensor, b: torch.Tensor) -> int:
    """How many entries of ``a`` and ``b`` differ; all of them when shape or dtype differ."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return max(a.numel(), b.numel())
    return int((a != b).sum())


def compare_with_bitsandbytes(
    x: torch.Tensor, quant_type: str = "nf4", blocksize: int = 64, double_quant: bool = False
) -> dict[str, Any]:
    """Quantize ``x`` with the reference and with bitsandbytes (on ``x``'s device) and count differences.

    Returns the number of differing packed bytes, absmax entries, nested
    entries and dequantized values, and ``equal``: True when all of them are
    ``torch.equal``. bitsandbytes returns a 1-D input dequantized as shape
    (1, n) on the CPU; values are compared after reshaping to the input shape.
    """
    import bitsandbytes.functional as bnbf  # loads its native library: only when a comparison is asked for

    ours = quantize_4bit(x, quant_type, blocksize, double_quant)
    codes, state = bnbf.quantize_4bit(x, blocksize=blocksize, quant_type=quant_type, compress_statistics=double_quant)
    report: dict[str, Any] = {
        "device": str(x.device),
        "shape": tuple(x.shape),
        "dtype": str(x.dtype).removeprefix("torch."),
        "quant_type": quant_type,
        "blocksize": blocksize,
        "double_quant": double_quant,
        "codes_differ": _differing(ours.codes, codes),
        "absmax_differ": _differing(ours.absmax, state.absmax),
        "codebook_equal": torch.equal(ours.code, state.code),
    }
    if double_quant:
        report["offset_equal"] = torch.equal(ours.nested.offset, state.offset)
        report["nested_absmax_differ"] = _differing(ours.nested.absmax, state.state2.absmax)
        report["nested_code_equal"] = torch.equal(ours.nested.code, state.state2.code)
    theirs = bnbf.dequantize_4bit(codes, state).reshape(x.shape)
    mine = dequantize_4bit(ours)
    report["dequantized_dtype_equal"] = mine.dtype == theirs.dtype
    report["dequantized_differ"] = _differing(mine, theirs)
    report["dequantized_max_abs_diff"] = float((mine.float() - theirs.float()).abs().max())
    counts = [v for k, v in report.items() if k.endswith("_differ")]
    flags = [v for k, v in report.items() if k.endswith("_equal")]
    report["equal"] = all(c == 0 for c in counts) and all(flags)
    return report
