"""Text tables of the planner's estimates and of the measurements next to them."""

from __future__ import annotations

from typing import Any

from qlora_guide.memory.planner import GiB, MemoryEstimate


def gib(n: float) -> str:
    """Bytes as GiB with two decimals (MiB below one GiB), e.g. ``'3.84 GiB'``."""
    return f"{n / GiB:.2f} GiB" if abs(n) >= GiB else f"{n / 1024**2:.1f} MiB"


def _table(rows: list[tuple[str, str, str]]) -> list[str]:
    width = [max(len(row[k]) for row in rows) for k in range(3)]
    return [f"  {a:<{width[0]}}  {b:>{width[1]}}  {c}".rstrip() for a, b, c in rows]


def format_estimate(est: MemoryEstimate) -> str:
    """A readable table: what a training step holds, its peak, then inference."""
    s = est.settings
    head = (f"{est.model} - {est.method}: {est.parameters / 1e9:.2f} B parameters, "
            f"{est.trainable_parameters / 1e6:,.1f} M trainable")
    lines = [head, f"batch {s['batch_size']} x seq {s['seq_len']}, r={s['r']}, {s['dtype']}, {s['optimizer']}, "
                   f"device {s['device']}", "", "Training"]
    rows = [(r.name, gib(r.bytes), r.note) for r in est.training]
    rows.append(("peak", gib(est.training_total), f"weights + states + {est.peak_phase} + overhead"))
    if s["gradient_checkpointing"]:
        rows.append(("peak without grad. ckpt", gib(est.training_total_without_checkpointing), "for comparison"))
    else:
        rows.append(("peak with grad. ckpt", gib(est.training_total_with_checkpointing), "for comparison"))
    lines += _table(rows)
    lines += ["", "Inference"]
    rows = [(r.name, gib(r.bytes), r.note) for r in est.inference] + [("total", gib(est.inference_total), "")]
    lines += _table(rows)
    lines += [f"note: {n}" for n in est.notes]
    return "\n".join(lines)


def format_comparison(estimates: list[MemoryEstimate]) -> str:
    """One line per method: weights, trainable parameters, training and inference totals."""
    rows = [("method", "weights", "trainable", "training", "inference")]
    for e in estimates:
        rows.append((e.method, gib(e.weights_bytes), f"{e.trainable_parameters / 1e6:,.1f} M",
                     gib(e.training_total), gib(e.inference_total)))
    width = [max(len(row[k]) for row in rows) for k in range(5)]
    return "\n".join("  ".join(f"{c:>{w}}" for c, w in zip(row, width, strict=True)) for row in rows)


def format_measurement(result: dict[str, Any]) -> str:
    """Measured and planned figures side by side."""
    lines = [f"{result['model']}: batch {result['batch_size']} x seq {result['seq_len']}, r={result['r']}"]
    if "device" in result:
        peak = result["step_peak"]
        rows = [("", "measured", "planned"),
                ("weights", gib(result["tensor_bytes"]["weights"]), gib(result["planned_weights"])),
                ("allocated after load", gib(result["allocated_after_load"]), ""),
                ("peak allocated (step)", gib(peak), gib(result["planned_without_overhead"])),
                ("max reserved", gib(result["max_reserved"]), ""),
                ("device used (incl. context)", gib(result["device_used"]) if result["device_used"] else "n/a",
                 gib(result["planned_training_total"]))]
        lines.insert(0, result["device"])
    else:
        rows = [("", "measured", "planned"),
                ("weights (tensor bytes)", gib(result["tensor_bytes"]["weights"]), gib(result["planned_weights"])),
                ("load: RSS increase", gib(result["load_rss_increase"]), gib(result["planned_weights"])),
                ("step: RSS peak increase", gib(result["measured_step_increase"]), gib(result["planned_step_increase"])),
                ("training: RSS increase", gib(result["measured_training_increase"]), gib(result["planned_training_total"]))]
    width = [max(len(r[k]) for r in rows) for k in range(3)]
    lines += [f"  {a:<{width[0]}}  {b:>{width[1]}}  {c:>{width[2]}}" for a, b, c in rows]
    return "\n".join(lines)
