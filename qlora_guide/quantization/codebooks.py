"""The codebooks: the 16 values of NF4 and FP4, and the 256 values of bitsandbytes' dynamic 8-bit code.

A 4-bit quantizer stores, for each weight, the index of one entry of a
16-value table that spans [-1, 1]; the table is what makes NF4 different from
FP4. Each table here is computed from its definition (quantiles of N(0, 1) for
NF4, the bit layout for FP4) and equals bitsandbytes' own, bit for bit. A new
4-bit format starts here: its table, its name in :data:`QUANT_TYPES` and in
:func:`code_for`.
"""

from __future__ import annotations

import torch

from qlora_guide.errors import QLoRAGuideError

QUANT_TYPES = ("nf4", "fp4")
NF4_OFFSET = 0.9677083  # outermost quantile of N(0, 1) that NF4 covers (bitsandbytes' create_normal_map)


def _check_quant_type(quant_type: str) -> None:
    if quant_type not in QUANT_TYPES:
        raise QLoRAGuideError(f"unknown quant_type {quant_type!r}: use 'nf4' or 'fp4'")


def nf4_code(offset: float = NF4_OFFSET) -> torch.Tensor:
    """Derive the 16 NF4 values from quantiles of N(0, 1), as the QLoRA paper builds them.

    NF4 is asymmetric so that zero is represented exactly: 8 quantiles for the
    positive half (the largest is ``ndtri(offset)``), 7 for the negative half,
    and 0, all divided by the largest so that they span [-1, 1]. The steps and dtypes
    are those of bitsandbytes' ``create_normal_map`` (float32 probabilities,
    float64 inverse CDF, float32 result), so the table equals bitsandbytes'
    hard-coded ``get_4bit_type("nf4")`` bit for bit.
    """
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
