"""The guide's tables measured on a real model: its size in each storage format, and each format's error.

:func:`footprint_table` really loads the model as fp32, bf16, int8 and NF4
(+ double quantization) and measures each with
:func:`qlora_guide.quantization.footprint.model_footprint`: this is what
checks a claim such as "75 % memory reduction". :func:`error_table` quantizes
N(0, 1) samples and the model's own weights, layer type by layer type, with
each of :data:`ERROR_METHODS` (the reference quantizers) and gives the mean
squared error and the signal-to-noise ratio. A new format gets a row by adding
its name to :data:`ERROR_METHODS` and its round trip to :func:`quantize_roundtrip`.
"""

from __future__ import annotations

import gc
import math
import re
from typing import Any

import torch

from qlora_guide.config import QuantizationConfig
from qlora_guide.errors import QLoRAGuideError
from qlora_guide.models import load_model
from qlora_guide.quantization.dynamic import torch_dynamic_int8
from qlora_guide.quantization.footprint import model_footprint
from qlora_guide.quantization.reference import (
    absmax_dequantize,
    absmax_quantize,
    dequantize_4bit,
    quantize_4bit,
)

# ---------------------------------------------------------------- footprint per storage format

FOOTPRINT_VARIANTS = ("fp32", "bf16", "int8", "nf4", "nf4-dq")


def _load_variant(name_or_path: str, variant: str) -> tuple[Any, str]:
    """Load the model as one storage variant; returns the model and a label saying how it is stored."""
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
            model, _ = torch_dynamic_int8(load_model(name_or_path, dtype="float32", device_map="cpu"))
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
    model = load_model(name_or_path, dtype="bfloat16", device_map="cpu")
    grouped: dict[str, list] = {kind: [] for kind in LAYER_TYPES}
    for name, param in model.named_parameters():
        match = re.search(r"layers\.(\d+)\..*\.(\w+_proj)\.weight$", name)
        if match and match.group(2) in grouped and (layers is None or int(match.group(1)) in layers):
            grouped[match.group(2)].append(param.detach().float())
    return {kind: tensors for kind, tensors in grouped.items() if tensors}
