"""What the shipped BLEU and chrF modules share: their input features, and references as sacrebleu wants them."""

from __future__ import annotations

from collections.abc import Sequence

import datasets

# One reference per prediction, or a list of them (the same count for every prediction).
FEATURES = [
    datasets.Features({"predictions": datasets.Value("string"), "references": datasets.Sequence(datasets.Value("string"))}),
    datasets.Features({"predictions": datasets.Value("string"), "references": datasets.Value("string")}),
]


def reference_streams(references: Sequence[str | Sequence[str]]) -> list[list[str]]:
    """Per-prediction references turned into sacrebleu's streams: stream i holds every prediction's i-th reference."""
    references = [[r] if isinstance(r, str) else list(r) for r in references]
    count = len(references[0]) if references else 0
    if any(len(r) != count for r in references):
        raise ValueError("sacrebleu needs the same number of references for every prediction")
    return [[refs[i] for refs in references] for i in range(count)]
