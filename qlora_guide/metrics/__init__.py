"""Metric modules for ``evaluate.load`` that ship with the package, so scoring works offline.

``evaluate.load("bleu")`` downloads its metric script from the Hugging Face
hub, which fails without a network. ``evaluate.load`` also accepts a local
folder holding a script of the same name; these are two such folders, both
thin wrappers around sacrebleu::

    import evaluate
    from qlora_guide.metrics import metric_path

    bleu = evaluate.load(metric_path("bleu"))
    bleu.compute(predictions=["the cat sat on the mat"], references=[["the cat sat on the mat"]])["score"]  # 100.0
"""

from __future__ import annotations

from pathlib import Path

from qlora_guide.errors import QLoRAGuideError

METRICS_DIR = Path(__file__).parent
METRICS = ("bleu", "chrf")


def metric_path(name: str) -> str:
    """The folder of a shipped metric module, for ``evaluate.load``."""
    if name not in METRICS:
        raise QLoRAGuideError(f"unknown metric '{name}': the package ships {', '.join(METRICS)}")
    return str(METRICS_DIR / name)


def load_metric(name: str):
    """``evaluate.load`` on a shipped metric module (no network needed)."""
    import evaluate

    return evaluate.load(metric_path(name))
