"""``qlora-guide quantize``: save a bitsandbytes-quantized model that transformers reloads quantized.

:func:`quantize_model` loads the model through bitsandbytes (NF4, FP4 or
LLM.int8()), writes it with its quantization state and the tokenizer, and
reports its size in memory and on disk; :func:`format_quantize_result` is the
command's table.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import asdict, dataclass
from typing import Any

from qlora_guide import progress
from qlora_guide.config import DTYPES, QuantizationConfig
from qlora_guide.errors import QLoRAGuideError, first_line
from qlora_guide.models import load_model, load_tokenizer, resolve_model
from qlora_guide.outputs import check_output_folder, replace_folder, staging_folder
from qlora_guide.quantization.footprint import model_footprint

SAVE_TYPES = ("nf4", "fp4", "int8")


@dataclass
class QuantizeResult:
    """What :func:`quantize_model` wrote."""

    output_dir: str
    quant_type: str
    double_quant: bool
    compute_dtype: str
    memory_bytes: int  # the quantized model in memory (model_footprint)
    disk_bytes: int  # all files written
    weights_bytes: int  # the *.safetensors files
    quantized_layers: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def check_causal_lm(name_or_path: str) -> None:
    """Raise a one-line error unless the model's config is one that ``AutoModelForCausalLM`` loads."""
    from transformers import AutoConfig  # transformers takes seconds to import: only when a model is checked
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    name = resolve_model(name_or_path)
    try:
        config = AutoConfig.from_pretrained(name)
    except (OSError, ValueError) as err:
        reason = first_line(err)
        raise QLoRAGuideError(f"could not read the config of '{name_or_path}': {reason}") from None
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
    output_dir: str | os.PathLike,
    quant_type: str = "nf4",
    double_quant: bool = True,
    compute_dtype: str = "bfloat16",
    overwrite: bool = False,
) -> QuantizeResult:
    """Load a model quantized by bitsandbytes and save it so that ``from_pretrained(output_dir)`` reloads it quantized.

    The weights are saved as safetensors with their quantization state (packed
    codes, absmax, nested constants) and the ``quantization_config`` in
    ``config.json``; the tokenizer is saved beside them. The folder is written
    under a temporary name in the same parent and renamed into place, so an
    interrupted run never leaves a half-written model. An existing non-empty
    ``output_dir`` is refused unless ``overwrite``, and even then unless it holds a
    model this function wrote (:mod:`qlora_guide.outputs`).
    """
    if quant_type not in SAVE_TYPES:
        raise QLoRAGuideError(f"unknown quant type {quant_type!r}: use nf4, fp4 or int8")
    if compute_dtype not in DTYPES:
        raise QLoRAGuideError(f"unknown compute dtype {compute_dtype!r}: use one of {', '.join(DTYPES)}")
    out = check_output_folder(output_dir, overwrite, "quantized", inputs=(name_or_path,))
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
        output_dir=str(out),
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
        ("saved to", result.output_dir),
        ("quantization", f"{kind}, compute in {result.compute_dtype}"),
        ("quantized layers", str(result.quantized_layers)),
        ("in memory", f"{result.memory_bytes / 2**20:.1f} MiB"),
        ("weights on disk", f"{result.weights_bytes / 2**20:.1f} MiB (safetensors)"),
        ("all files", f"{result.disk_bytes / 2**20:.1f} MiB"),
    ]
    width = max(len(label) for label, _ in rows)
    lines = [f"{label:<{width}}  {value}" for label, value in rows]
    lines.append(f"reload: AutoModelForCausalLM.from_pretrained({result.output_dir!r}) gives the quantized layers back")
    return "\n".join(lines)
