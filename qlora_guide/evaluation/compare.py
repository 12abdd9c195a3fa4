"""One model evaluated, and variants compared on the same data: bf16 base, 4-bit base, adapter, merged."""

from __future__ import annotations

import gc
import logging
import math
import os
import time
from typing import Any

from qlora_guide import deployment, progress
from qlora_guide.config import QuantizationConfig
from qlora_guide.errors import QLoRAGuideError
from qlora_guide.evaluation.answers import answer_measures, compare_rows, generate_answers, question_languages
from qlora_guide.evaluation.data import load_split, prompts_and_references
from qlora_guide.evaluation.likelihood import answer_nll_per_example
from qlora_guide.evaluation.speed import measure_generation
from qlora_guide.memory.measure import peak_memory
from qlora_guide.models import load_model, load_tokenizer

log = logging.getLogger(__name__)


def evaluate_model(
    model: Any,
    tokenizer: Any,
    examples: list[dict[str, Any]],
    batch_size: int = 8,
    max_new_tokens: int = 64,
    max_length: int = 512,
    generation: bool = True,
    repetition_penalty: float | None = None,
) -> dict[str, Any]:
    """Perplexity on answers, and (``generation``) BLEU, chrF, language and repetition of greedy answers."""
    per_example = answer_nll_per_example(model, tokenizer, examples, batch_size, max_length)
    total, count = sum(nll for nll, _ in per_example), sum(n for _, n in per_example)
    if count == 0:
        raise QLoRAGuideError("no answer tokens to evaluate (every example was empty or truncated away)")
    row: dict[str, Any] = {"perplexity": math.exp(total / count), "answer_tokens": count, "samples": len(examples),
                           "nll_per_example": per_example}
    if generation:
        prompts, references = prompts_and_references(examples)
        predictions = generate_answers(model, tokenizer, prompts, max_new_tokens, batch_size, repetition_penalty)
        row.update(answer_measures(predictions, references, question_languages(examples)))
        row["predictions"] = predictions
    return row


def compare_to_reference(rows: list[dict[str, Any]], examples: list[dict[str, Any]], reference: str = "bf16 base") -> list[dict[str, Any]]:
    """Every row of :func:`evaluate_model` (with a ``variant`` name) against the reference row, see :func:`compare_rows`."""
    ref = next((r for r in rows if r.get("variant") == reference), None)
    if ref is None:
        raise QLoRAGuideError(f"no row named '{reference}' to compare with (rows: {', '.join(str(r.get('variant')) for r in rows)})")
    return [d for row in rows if row is not ref for d in compare_rows(ref, row, examples)]


def _variant_loaders(base: str, adapter_dir: str | None, merged_dir: str | None, quantization: QuantizationConfig, merged_4bit: bool) -> list[tuple[str, Any]]:
    """(name, loader) for each variant to compare; a loader returns (model, tokenizer)."""
    def plain(name: str, quant: QuantizationConfig | None) -> Any:
        return lambda: (load_model(name, quantization=quant).eval(), load_tokenizer(name))

    def loaded(ref: str, quant: Any) -> Any:
        def load() -> tuple[Any, Any]:
            lm = deployment.load_any(ref, quantization=quant)
            return lm.model, lm.tokenizer

        return load

    variants = [("bf16 base", plain(base, None)), ("4-bit base", plain(base, quantization))]
    if adapter_dir:
        variants.append(("4-bit + adapter", loaded(adapter_dir, quantization)))
    if merged_dir:
        variants.append(("merged", loaded(merged_dir, None)))
        if merged_4bit:
            variants.append(("merged 4-bit", loaded(merged_dir, quantization)))
    return variants


def compare_models(
    base: str | None = None,
    adapter_dir: str | os.PathLike | None = None,
    merged_dir: str | os.PathLike | None = None,
    data: str | list[dict[str, Any]] = "qlora-faq",
    split: str = "test",
    max_samples: int | None = None,
    batch_size: int = 8,
    max_new_tokens: int = 64,
    max_length: int = 512,
    quantization: QuantizationConfig | None = None,
    generation: bool = True,
    performance: bool = True,
    speed_tokens: int = 32,
    merged_4bit: bool = False,
) -> list[dict[str, Any]]:
    """Evaluate the bf16 base, the 4-bit base, 4-bit + adapter and a merged model on the same examples.

    One row per variant (the adapter and merged rows only when given), each
    with perplexity, BLEU, chrF and their ratio to the bf16 base
    (``perplexity_ratio`` below 1 and ``bleu_ratio`` / ``chrf_ratio`` above 1
    are better than the base), and with ``performance``: load time, memory,
    time to first token and tokens per second. Models are loaded one at a
    time and freed before the next. ``base`` defaults to the adapter's base,
    else the embedded model; ``quantization`` to NF4 with double quantization.
    """
    if base is None:
        base = deployment.adapter_base(adapter_dir) if adapter_dir else "smollm2-135m"
    quantization = quantization or QuantizationConfig()
    examples = data if isinstance(data, list) else load_split(data, split, max_samples=max_samples)
    if isinstance(data, list) and max_samples is not None:
        examples = examples[:max_samples]
    rows: list[dict[str, Any]] = []
    variants = _variant_loaders(base, str(adapter_dir) if adapter_dir else None, str(merged_dir) if merged_dir else None, quantization, merged_4bit)
    for name, loader in progress.bar(variants, desc="models", unit="model"):
        gc.collect()
        with peak_memory() as memory:
            start = time.perf_counter()
            model, tokenizer = loader()
            load_s = time.perf_counter() - start
            weights_mb = round(model.get_memory_footprint() / 2**20, 1)  # as stored, before any cast
            model = computed_as_this_cpu_would(model)
            row: dict[str, Any] = {"variant": name, "compute_dtype": str(model.dtype).removeprefix("torch.")}
            row.update(evaluate_model(model, tokenizer, examples, batch_size, max_new_tokens, max_length, generation))
            if performance:
                row.update(load_s=round(load_s, 2), weights_mb=weights_mb)
                row.update(measure_generation(model, tokenizer, max_new_tokens=speed_tokens))
        if performance:
            row.update(memory.mib())
        rows.append(row)
        del model, tokenizer
    add_ratios(rows)
    return rows


def computed_as_this_cpu_would(model: Any) -> Any:
    """A 16-bit model in float32 on a CPU that only emulates bf16 (as the package computes there), else unchanged.

    Its weights are measured first, in bf16; emulated bf16 arithmetic is tens of times slower than float32 and
    would make the evaluation, not the model, the slow part. A 4-bit model keeps its own compute dtype.
    """
    import torch

    from qlora_guide.precision import cpu_compute_dtype

    quantized = getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False)
    on_cpu = next(model.parameters()).device.type == "cpu"
    if on_cpu and not quantized and model.dtype == torch.bfloat16 and cpu_compute_dtype("bfloat16") == "float32":
        return model.float()
    return model


def add_ratios(rows: list[dict[str, Any]], reference: str = "bf16 base") -> None:
    """Add ``perplexity_ratio``, ``bleu_ratio`` and ``chrf_ratio`` against the reference row, in place."""
    ref = next((r for r in rows if r.get("variant") == reference), None)
    if ref is None:
        return
    for row in rows:
        for key in ("perplexity", "bleu", "chrf"):
            if key in row and ref.get(key):
                row[f"{key}_ratio"] = round(row[key] / ref[key], 4)
