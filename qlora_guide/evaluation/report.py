"""``qlora-guide evaluate``: evaluate a run or a model, and write the report as JSON and Markdown."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from qlora_guide import deployment, progress
from qlora_guide.config import EvaluationConfig, load_recipe
from qlora_guide.errors import QLoRAGuideError
from qlora_guide.evaluation.compare import compare_models, evaluate_model
from qlora_guide.evaluation.data import load_split, run_split
from qlora_guide.evaluation.speed import measure_generation
from qlora_guide.memory.measure import peak_memory
from qlora_guide.outputs import write_text_atomic
from qlora_guide.runs import RunFolder

log = logging.getLogger(__name__)


REPORT_JSON = "report.json"


REPORT_MD = "report.md"


COLUMNS = (
    ("variant", "model", "{}"),
    ("perplexity", "perplexity", "{:.3f}"),
    ("perplexity_ratio", "ppl / bf16", "{:.3f}"),
    ("bleu", "BLEU", "{:.2f}"),
    ("bleu_ratio", "BLEU / bf16", "{:.3f}"),
    ("chrf", "chrF", "{:.2f}"),
    ("chrf_ratio", "chrF / bf16", "{:.3f}"),
    ("same_language_pct", "same language %", "{:.0f}"),
    ("repeated_4gram_pct", "repeated 4-grams %", "{:.1f}"),
    ("load_s", "load s", "{:.1f}"),
    ("weights_mb", "weights MiB", "{:.0f}"),
    ("rss_peak_mb", "RSS peak MiB", "{:.0f}"),
    ("cuda_peak_allocated_mb", "CUDA alloc MiB", "{:.0f}"),
    ("cuda_peak_reserved_mb", "CUDA reserved MiB", "{:.0f}"),
    ("ttft_s", "TTFT s", "{:.3f}"),
    ("tokens_per_s", "tokens/s", "{:.1f}"),
)


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """A Markdown table of the rows, with the columns that at least one row has."""
    columns = [c for c in COLUMNS if any(c[0] in r for r in rows)]
    lines = ["| " + " | ".join(title for _, title, _ in columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    for row in rows:
        cells = [fmt.format(row[key]) if row.get(key) is not None else "" for key, _, fmt in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def check_report_folder(output_dir: str | os.PathLike, overwrite: bool = False) -> dict[str, Path]:
    """The report's two paths in ``output_dir``; refused when ``output_dir`` is a file or a report is there (unless ``overwrite``)."""
    out = Path(output_dir).expanduser()
    if out.exists() and not out.is_dir():
        raise QLoRAGuideError(f"--out {out} is a file, not a folder: choose another path")
    paths = {"json": out / REPORT_JSON, "markdown": out / REPORT_MD}
    existing = [p for p in paths.values() if p.exists()]
    if existing and not overwrite:
        raise QLoRAGuideError(f"{existing[0]} already exists: choose another folder or pass overwrite=True (--overwrite)")
    return paths


def write_report(rows: list[dict[str, Any]], output_dir: str | os.PathLike, meta: dict[str, Any] | None = None, overwrite: bool = False) -> dict[str, str]:
    """Write ``report.json`` (rows and settings) and ``report.md`` (a table) into ``output_dir``; return their paths."""
    paths = check_report_folder(output_dir, overwrite)
    paths["json"].parent.mkdir(parents=True, exist_ok=True)
    payload = {"meta": meta or {}, "rows": rows}
    for key, text in (("json", json.dumps(payload, indent=2, ensure_ascii=False, default=str)), ("markdown", _markdown_report(rows, meta))):
        write_text_atomic(paths[key], text + "\n")
    return {k: str(v) for k, v in paths.items()}


def _markdown_report(rows: list[dict[str, Any]], meta: dict[str, Any] | None) -> str:
    lines = ["# Evaluation", ""]
    for key, value in (meta or {}).items():
        lines.append(f"- {key}: {value}")
    lines += ["", markdown_table(rows), "", "Ratios are to the bf16 base: below 1 is better for perplexity, above 1 for BLEU and chrF."]
    return "\n".join(lines)


@progress.library_bars()
def evaluate_run(
    run: str | os.PathLike,
    data: str | None = None,
    split: str | None = None,
    max_samples: int | None = None,
    compare: bool = False,
    output_dir: str | os.PathLike | None = None,
    batch_size: int | None = None,
    max_new_tokens: int | None = None,
    generation: bool = True,
    performance: bool = True,
    overwrite: bool = False,
) -> dict[str, Any]:
    """What ``qlora-guide evaluate`` runs: evaluate a run, adapter, merged or base model, or compare variants.

    Defaults come from the run's ``recipe.yaml`` when there is one (data,
    languages, evaluation split, batch size, answer length), else from the
    bundled dataset and :class:`~qlora_guide.config.EvaluationConfig`.
    ``compare=True`` adds the bf16 and 4-bit bases (and a merged model when
    ``run`` is one) as in :func:`compare_models`. With ``output_dir`` the report
    is also written as JSON and Markdown.
    """
    for option, value in (("batch_size", batch_size), ("max_new_tokens", max_new_tokens)):
        if value is not None and value <= 0:
            raise QLoRAGuideError(f"{option} must be a positive integer, not {value}")
    if output_dir is not None:
        check_report_folder(output_dir, overwrite)  # before minutes of evaluation, not after
    kind = deployment.model_kind(run)
    recipe = None
    folder = Path(run).expanduser()
    if kind != "hub":
        recipe_path = RunFolder.of(folder).recipe
        if recipe_path.is_file():
            recipe = load_recipe(recipe_path)
    defaults = recipe.evaluation if recipe else EvaluationConfig()
    max_samples = max_samples if max_samples is not None else defaults.max_samples
    batch_size = batch_size or defaults.batch_size
    max_new_tokens = max_new_tokens or defaults.max_new_tokens
    max_length = recipe.data.max_length if recipe else 512
    if recipe is not None and data is None:
        examples, split = run_split(recipe, split, max_samples)
        data = recipe.data.path
    else:
        data, split = data or "qlora-faq", split or defaults.split
        examples = load_split(data, split, languages=recipe.data.languages if recipe else None, max_samples=max_samples)
    meta = {"model": str(run), "kind": kind, "data": data, "split": split, "samples": len(examples), "max_new_tokens": max_new_tokens}

    if compare:
        adapter = str(run) if kind == "adapter" else None
        merged = str(run) if kind == "model" else None
        base = deployment.adapter_base(run) if adapter else (deployment.manifest_base(deployment.read_manifest(folder)) if merged else str(run))
        if kind == "model" and not base:
            base, merged = str(run), None  # a plain model folder: it is the base
        quantization = deployment.training_quantization(run) if adapter else None
        rows = compare_models(
            base=base or "smollm2-135m", adapter_dir=adapter, merged_dir=merged, data=examples,
            batch_size=batch_size, max_new_tokens=max_new_tokens, max_length=max_length,
            quantization=quantization, generation=generation, performance=performance,
        )
    else:
        with peak_memory() as memory:
            lm = deployment.load_any(run)
            row: dict[str, Any] = {"variant": lm.name + (" (4-bit + adapter)" if lm.kind == "adapter" and lm.quantized else "")}
            row.update(evaluate_model(lm.model, lm.tokenizer, examples, batch_size, max_new_tokens, max_length, generation))
            if performance:
                row["load_s"] = round(lm.load_seconds, 2)
                row["weights_mb"] = round(lm.model.get_memory_footprint() / 2**20, 1)
                row.update(measure_generation(lm.model, lm.tokenizer, max_new_tokens=32))
        if performance:
            row.update(memory.mib())
        rows = [row]
    report = {"meta": meta, "rows": rows}
    if output_dir:
        report["files"] = write_report(rows, output_dir, meta, overwrite=overwrite)
    return report


def format_report(report: dict[str, Any]) -> str:
    """The report as a Markdown table (what ``qlora-guide evaluate`` prints)."""
    meta = report.get("meta", {})
    head = f"{meta.get('model')} on {meta.get('data')} [{meta.get('split')}], {meta.get('samples')} examples"
    lines = [head, "", markdown_table(report["rows"])]
    if any("perplexity_ratio" in r for r in report["rows"]):
        lines += ["", "Ratios are to the bf16 base: below 1 is better for perplexity, above 1 for BLEU and chrF."]
    if report.get("files"):
        lines += ["", "written: " + ", ".join(report["files"].values())]
    return "\n".join(lines)
