"""Adapter variants trained on the same data and budget, then measured the same way.

A variant is a name and the recipe settings that make it (``lora.use_dora=true``,
``lora.r=128``, ...), applied on top of one recipe and one set of common
settings, so that only what the variant changes differs between runs. Each is
trained by :func:`qlora_guide.training.train` in its own run folder, inside a
:func:`~qlora_guide.memory.measure.peak_memory` block, and then measured on the
test split by :func:`~qlora_guide.evaluation.compare.evaluate_model`: perplexity
of the reference answers and, with ``generation``, chrF and BLEU of greedy
answers. Every variant is compared with the first one on the same examples,
with paired 95 % bootstrap intervals (:func:`~qlora_guide.evaluation.answers.compare_rows`),
so that a difference smaller than the noise of a small test set says so.
"""

from __future__ import annotations

import gc
import re
from pathlib import Path
from typing import Any

from qlora_guide import deployment
from qlora_guide.config import load_recipe
from qlora_guide.errors import QLoRAGuideError
from qlora_guide.evaluation.answers import compare_rows
from qlora_guide.evaluation.compare import evaluate_model
from qlora_guide.evaluation.data import run_split
from qlora_guide.memory.measure import peak_memory
from qlora_guide.runs import RunFolder
from qlora_guide.training.run import train


def _folder_name(name: str) -> str:
    """A run folder's name for a variant's display name: ``DoRA r=16`` becomes ``dora-r-16``."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def train_variants(variants: dict[str, list[str]], root: str | Path, recipe: str | Path | dict[str, Any] = "demo",
                   common: list[str] | None = None) -> list[dict[str, Any]]:
    """Train every variant of ``recipe`` (``common`` settings first, then the variant's own); one row each.

    A row holds the variant's run folder, its LoRA settings and scaling, its
    trainable parameters, the validation loss before and after training and
    at every evaluation (``history``), its training speed and the rise of
    peak memory during its training. The folders under ``root`` are written
    afresh (``overwrite``): ``root`` is meant for this comparison alone.
    """
    if not variants:
        raise QLoRAGuideError("no variants to compare")
    folders = [_folder_name(name) for name in variants]
    if len(set(folders)) < len(folders):
        raise QLoRAGuideError(f"two variants have the same folder name: {', '.join(variants)}")
    # every variant's settings are checked before the first one trains
    configs = [load_recipe(recipe, [*(common or []), *overrides]) for overrides in variants.values()]
    rows = []
    for name, folder, config in zip(variants, folders, configs, strict=True):
        gc.collect()
        with peak_memory() as memory:
            result = train(config, output_dir=Path(root) / folder, overwrite=True)
        metrics = result.metrics
        rows.append({
            "variant": name,
            "run_dir": str(result.output_dir),
            "r": config.lora.r,
            "lora_alpha": config.lora.lora_alpha,
            "scaling": config.lora.scaling,
            "quantized": config.quantization is not None,
            "trainable_params": result.trainable_params,
            "initial_eval_loss": metrics.get("initial_eval_loss"),
            "eval_loss": metrics.get("eval_loss"),
            "history": validation_history(result.output_dir),
            "step_s": metrics["train_runtime"] / max(metrics["global_step"], 1),
            "train_tokens_per_second": metrics["train_tokens_per_second"],
            **memory.mib(),
        })
    return rows


def validation_history(run_dir: str | Path) -> list[tuple[int, float]]:
    """(step, validation loss) of every evaluation a run logged, the one before training included."""
    return [(int(p.get("step", 0)), float(p["eval_loss"])) for p in RunFolder(Path(run_dir)).history() if "eval_loss" in p]


def evaluate_variants(rows: list[dict[str, Any]], split: str = "test",
                      generation: bool = True, max_new_tokens: int = 64, repetition_penalty: float | None = 1.2,
                      batch_size: int = 8, against: dict[str, str] | None = None) -> list[dict[str, Any]]:
    """Each trained variant on ``split`` of the runs' data, and against another variant (by default the first) with paired
    intervals.

    Fills every row of :func:`train_variants` in place with ``perplexity``
    (and ``chrf``, ``bleu``), and returns the comparisons, one per measure and
    variant after the first: ``difference`` with its 95 % interval ``low`` to
    ``high``, ``verdict`` "within noise" when the interval holds no difference.
    ``against`` names, for some variants, the one to compare them with instead
    (PiSSA on a 16-bit base against LoRA on the same base, say).
    """
    by_name = {row["variant"]: row for row in rows}
    unknown = sorted({*(against or {}), *(against or {}).values()} - set(by_name))
    if unknown:
        raise QLoRAGuideError(f"against: no variant named {', '.join(unknown)} (variants: {', '.join(by_name)})")
    # the runs share their data settings: the split is read as the first run's recipe reads it (languages included)
    examples, _ = run_split(load_recipe(RunFolder(Path(rows[0]["run_dir"])).recipe), split)
    for row in rows:
        loaded = deployment.load_any(row["run_dir"])  # on its own base: 4-bit for QLoRA runs
        measured = evaluate_model(loaded.model, loaded.tokenizer, examples, batch_size, max_new_tokens,
                                  generation=generation, repetition_penalty=repetition_penalty)
        row.update(measured)
        del loaded
        gc.collect()
    against = against or {}
    return [d for row in rows[1:] for d in compare_rows(by_name[against.get(row["variant"], rows[0]["variant"])], row, examples)]
