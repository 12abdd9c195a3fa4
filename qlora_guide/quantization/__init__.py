"""Quantization, step by step: absmax int8/int4, FP4, NF4 and double quantization, measured on a real model.

One concept per file; every name below is importable from
``qlora_guide.quantization`` itself::

    codebooks.py   the 16 values of NF4 and FP4, bitsandbytes' 256-value dynamic code
                   (nf4_code, fp4_code, dynamic_code, code_for, QUANT_TYPES)
    reference.py   the quantizers, from scratch in plain torch and bit-exact with bitsandbytes:
                   absmax int8/int4, 4-bit packing, blockwise 8-bit, NF4/FP4 with double
                   quantization (absmax_quantize, quantize_4bit, dequantize_4bit, Quantized4bit, ...)
    parity.py      compare_with_bitsandbytes: the reference against bitsandbytes on CPU or CUDA,
                   and the documented CUDA differences
    footprint.py   the bytes a loaded model holds, by kind of layer and by storage
                   (tensor_bytes, model_footprint)
    dynamic.py     torch's post-training dynamic int8 quantization, run and measured
                   (dynamic_quantization_report)
    tables.py      the guide's tables over a real model: size per storage format
                   (footprint_table) and error per format (error_table, quantization_error)
    save.py        the ``qlora-guide quantize`` command (quantize_model, format_quantize_result)

A new quantization format starts in ``codebooks.py`` (its table of values) and
``reference.py`` (its quantize / dequantize pair); ``parity.py`` checks it
against a library's kernels, and a line in ``tables.py`` (:data:`ERROR_METHODS`,
:func:`quantize_roundtrip`) puts it in the error table.
"""

from qlora_guide.quantization.codebooks import (
    NF4_OFFSET,
    QUANT_TYPES,
    code_for,
    dynamic_code,
    fp4_code,
    nf4_code,
)
from qlora_guide.quantization.dynamic import (
    DYNAMIC_ALTERNATIVE,
    SAMPLE_TEXT,
    dynamic_quantization_report,
    torch_dynamic_int8,
)
from qlora_guide.quantization.footprint import KINDS, STORAGE, model_footprint, tensor_bytes
from qlora_guide.quantization.parity import compare_with_bitsandbytes
from qlora_guide.quantization.reference import (
    BNB_BLOCKSIZES,
    GRANULARITIES,
    NESTED_BLOCKSIZE,
    AbsmaxQuantized,
    NestedAbsmax,
    Quantized4bit,
    absmax_dequantize,
    absmax_quantize,
    block_absmax,
    dequantize_4bit,
    dequantize_blockwise_8bit,
    pack_4bit,
    quantize_4bit,
    quantize_blockwise_8bit,
    unpack_4bit,
)
from qlora_guide.quantization.save import (
    SAVE_TYPES,
    QuantizeResult,
    check_causal_lm,
    format_quantize_result,
    quantize_model,
)
from qlora_guide.quantization.tables import (
    ERROR_METHODS,
    FOOTPRINT_VARIANTS,
    LAYER_TYPES,
    error_table,
    footprint_table,
    quantization_error,
    quantize_roundtrip,
)

__all__ = [
    # codebooks
    "NF4_OFFSET", "QUANT_TYPES", "code_for", "dynamic_code", "fp4_code", "nf4_code",
    # reference quantizers
    "BNB_BLOCKSIZES", "GRANULARITIES", "NESTED_BLOCKSIZE", "AbsmaxQuantized", "NestedAbsmax", "Quantized4bit",
    "absmax_dequantize", "absmax_quantize", "block_absmax", "dequantize_4bit", "dequantize_blockwise_8bit",
    "pack_4bit", "quantize_4bit", "quantize_blockwise_8bit", "unpack_4bit",
    # parity with bitsandbytes
    "compare_with_bitsandbytes",
    # bytes of a loaded model
    "KINDS", "STORAGE", "model_footprint", "tensor_bytes",
    # torch's dynamic int8
    "DYNAMIC_ALTERNATIVE", "SAMPLE_TEXT", "dynamic_quantization_report", "torch_dynamic_int8",
    # tables over a real model
    "ERROR_METHODS", "FOOTPRINT_VARIANTS", "LAYER_TYPES", "error_table", "footprint_table",
    "quantization_error", "quantize_roundtrip",
    # the quantize command
    "SAVE_TYPES", "QuantizeResult", "check_causal_lm", "format_quantize_result", "quantize_model",
]
