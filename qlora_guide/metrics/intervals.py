"""Paired bootstrap intervals: is a difference between two models more than the noise of the test set?

Two models answer the same questions; resampling the questions with
replacement (the same resample for both models) and recomputing the
difference gives its sampling distribution, and the 2.5 and 97.5 percentiles
a 95 % interval (scipy's ``stats.bootstrap``, paired, BCa). An interval that
contains 0 means this test set cannot tell the two models apart.

Corpus chrF and BLEU are not means of per-answer scores: they sum character
or word n-gram statistics over the corpus first. The resampled statistic here
does the same, from sacrebleu's own per-answer statistics, so the point
estimate is exactly sacrebleu's corpus score.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from qlora_guide.errors import QLoRAGuideError

RESAMPLES = 2000
SEED = 0


@dataclass
class Difference:
    """``b - a`` (or ``b / a`` when ``ratio``) for one measure, with its paired bootstrap 95 % interval."""

    measure: str
    a: float
    b: float
    difference: float
    low: float
    high: float
    n: int
    ratio: bool = False

    @property
    def significant(self) -> bool:
        """True when the 95 % interval excludes "no difference" (0, or 1 for a ratio)."""
        none = 1.0 if self.ratio else 0.0
        return self.low > none or self.high < none

    @property
    def verdict(self) -> str:
        if not self.significant:
            return "within noise"
        return "higher" if self.difference > (1.0 if self.ratio else 0.0) else "lower"

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "significant": self.significant, "verdict": self.verdict}


def _sacrebleu_metric(name: str) -> Any:
    from sacrebleu.metrics import BLEU, CHRF

    if name == "chrf":
        return CHRF()
    if name == "bleu":
        return BLEU()
    raise QLoRAGuideError(f"unknown corpus metric '{name}': use chrf or bleu")


def sentence_statistics(name: str, predictions: list[str], references: list[str]) -> np.ndarray:
    """sacrebleu's sufficient statistics of each answer (one row per answer), for corpus ``chrf`` or ``bleu``."""
    metric = _sacrebleu_metric(name)
    return np.asarray(metric._extract_corpus_statistics(predictions, [references]), dtype=np.float64)


def corpus_score(name: str, statistics: np.ndarray) -> float:
    """The corpus score of summed per-answer statistics, exactly as sacrebleu computes it."""
    metric = _sacrebleu_metric(name)
    summed = statistics.sum(axis=0)
    if name == "bleu":
        return float(metric._compute_score_from_stats(summed.astype(int).tolist()).score)
    return float(metric._compute_score_from_stats(summed.tolist()).score)


def paired_difference(measure: str, a: np.ndarray, b: np.ndarray, statistic: Any, ratio: bool = False) -> Difference:
    """``statistic(b) - statistic(a)`` (``/`` when ``ratio``) with a paired bootstrap interval; one row per example."""
    from scipy import stats

    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if len(a) != len(b) or len(a) < 2:
        raise QLoRAGuideError(f"{measure}: a paired interval needs the same examples for both models, at least 2 ({len(a)} and {len(b)})")

    def diff(rows: np.ndarray) -> float:  # the same resampled examples for both models
        rows = rows.astype(int)
        return statistic(b[rows]) / statistic(a[rows]) if ratio else statistic(b[rows]) - statistic(a[rows])

    everything = np.arange(len(a))
    point = diff(everything)
    if np.array_equal(a, b):  # identical answers: no spread to resample
        return Difference(measure, statistic(a), statistic(b), point, point, point, len(a), ratio)
    low, high = np.nan, np.nan
    for method in ("BCa", "percentile"):  # BCa is undefined for some degenerate samples
        result = stats.bootstrap((everything,), diff, vectorized=False, n_resamples=RESAMPLES, confidence_level=0.95,
                                 method=method, rng=np.random.default_rng(SEED))
        low, high = result.confidence_interval
        if np.isfinite(low) and np.isfinite(high):
            break
    return Difference(measure, statistic(a), statistic(b), point, float(low), float(high), len(a), ratio)


def corpus_difference(name: str, predictions_a: list[str], predictions_b: list[str], references: list[str]) -> Difference:
    """Corpus chrF or BLEU of ``b`` minus ``a`` on the same references, with its paired 95 % interval."""
    a = sentence_statistics(name, predictions_a, references)
    b = sentence_statistics(name, predictions_b, references)
    return paired_difference(name, a, b, lambda s: corpus_score(name, s))


def mean_difference(measure: str, values_a: list[float], values_b: list[float], scale: float = 1.0) -> Difference:
    """Mean of per-example values of ``b`` minus ``a`` (times ``scale``, e.g. 100 for a percentage), paired interval."""
    return paired_difference(measure, np.asarray(values_a) * scale, np.asarray(values_b) * scale, lambda s: float(np.mean(s)))


def perplexity_ratio(nll_a: list[tuple[float, int]], nll_b: list[tuple[float, int]]) -> Difference:
    """Perplexity of ``b`` over that of ``a`` on the same answers, from each answer's (NLL, token count), paired interval.

    The perplexity of a resample is ``exp(sum of NLL / sum of tokens)``, token
    weighted as :func:`qlora_guide.evaluation.perplexity` computes it.
    """
    def perplexity(rows: np.ndarray) -> float:
        return float(np.exp(rows[:, 0].sum() / max(rows[:, 1].sum(), 1)))

    return paired_difference("perplexity", np.asarray(nll_a, dtype=np.float64), np.asarray(nll_b, dtype=np.float64), perplexity, ratio=True)


def corpus_ratio(name: str, predictions_a: list[str], predictions_b: list[str], references: list[str]) -> Difference:
    """Corpus chrF or BLEU of ``b`` over that of ``a``, with its paired 95 % interval ("keeps 98 % of the quality")."""
    a = sentence_statistics(name, predictions_a, references)
    b = sentence_statistics(name, predictions_b, references)
    return paired_difference(f"{name}_ratio", a, b, lambda s: corpus_score(name, s), ratio=True)
