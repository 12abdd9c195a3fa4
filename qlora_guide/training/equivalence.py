"""Did two runs of one recipe train the same thing? Losses step by step and the adapters' weights.

Data parallelism promises that N processes with a per-process batch of B/N train what one process
trains with a batch of B: every optimizer step sees the same examples, and DDP averages the
gradients. :func:`compare_runs` checks that promise on two finished run folders.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from safetensors.torch import load_file

from qlora_guide.runs import RunFolder


@dataclass
class RunComparison:
    """Two runs side by side: ``steps`` and ``validation`` are rows per step, ``adapter`` the weights' differences."""

    names: tuple[str, str]
    steps: list[dict[str, Any]]
    validation: list[dict[str, Any]]
    adapter: dict[str, float]

    @property
    def max_loss_difference(self) -> float:
        """The largest relative difference between the two training losses of a step."""
        return max(row["relative_difference"] for row in self.steps)

    @property
    def max_validation_difference(self) -> float:
        return max(row["relative_difference"] for row in self.validation) if self.validation else 0.0


def logged(run: str | os.PathLike, key: str) -> dict[int, float]:
    """``key`` as the run's metrics log recorded it, by step (the last record of a step wins)."""
    return {record["step"]: record[key] for record in RunFolder.of(run).history() if key in record}


def _side_by_side(a: dict[int, float], b: dict[int, float]) -> list[dict[str, Any]]:
    rows = []
    for step in sorted(a.keys() & b.keys()):
        difference = abs(a[step] - b[step])
        rows.append({"step": step, "a": a[step], "b": b[step], "difference": difference,
                     "relative_difference": difference / max(abs(a[step]), 1e-12)})
    return rows


def adapter_difference(a: str | os.PathLike, b: str | os.PathLike) -> dict[str, float]:
    """How far apart two adapters of the same shape are, relative to the first one's weights.

    ``lora_B`` starts at zero, so its weights are all learnt: ``lora_B_relative`` compares what
    the two runs learnt. ``lora_A`` starts from the seed's random draw and moves little.
    """
    first, second = (load_file(RunFolder.of(path).adapter / "adapter_model.safetensors") for path in (a, b))
    if first.keys() != second.keys():
        raise ValueError("the two adapters do not have the same tensors: they come from different recipes")

    def relative(keys: list[str]) -> float:
        diff = sum(float((first[k].double() - second[k].double()).norm() ** 2) for k in keys)
        norm = sum(float(first[k].double().norm() ** 2) for k in keys)
        return (diff / norm) ** 0.5 if norm else 0.0

    keys = sorted(first)
    return {"relative": relative(keys), "lora_B_relative": relative([k for k in keys if "lora_B" in k]),
            "max_abs": max(float((first[k].double() - second[k].double()).abs().max()) for k in keys),
            "tensors": len(keys)}


def compare_runs(a: str | os.PathLike, b: str | os.PathLike,
                 names: tuple[str, str] = ("a", "b")) -> RunComparison:
    """Training losses step by step, validation losses, and the two adapters' difference."""
    a, b = Path(a), Path(b)
    steps = _side_by_side(logged(a, "loss"), logged(b, "loss"))
    if not steps:
        raise ValueError(f"{a} and {b} have no logged training step in common")
    validation = _side_by_side(logged(a, "eval_loss"), logged(b, "eval_loss"))
    return RunComparison(names, steps, validation, adapter_difference(a, b))


def loss_table(runs: dict[str, str | os.PathLike]) -> list[dict[str, Any]]:
    """The training and validation losses of several runs, one row per step that all of them logged."""
    rows = []
    for kind, key in (("training", "loss"), ("validation", "eval_loss")):
        logs = {name: logged(run, key) for name, run in runs.items()}
        for step in sorted(set.intersection(*(set(log) for log in logs.values()))):
            rows.append({"loss": kind, "step": step, **{name: log[step] for name, log in logs.items()}})
    return rows
