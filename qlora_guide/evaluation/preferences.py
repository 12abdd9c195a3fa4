"""Which answer of each preference pair a model prefers: the held-out check of preference tuning.

A model prefers a pair's chosen answer when it gives it a higher
log-likelihood than the rejected one, given the same prompt (summed over the
answer tokens, as :func:`~qlora_guide.evaluation.likelihood.answer_nll_per_example`
computes it for the training data's masking). Two models compare on the same
pairs with paired bootstrap intervals: the share of pairs where the chosen
answer wins, and the mean log-likelihood margin.
"""

from __future__ import annotations

from typing import Any

from qlora_guide.errors import QLoRAGuideError
from qlora_guide.evaluation.likelihood import answer_nll_per_example
from qlora_guide.metrics.intervals import Difference, mean_difference


def preference_margins(model: Any, tokenizer: Any, pairs: list[dict[str, Any]], batch_size: int = 8,
                       max_length: int = 512) -> list[float]:
    """Per pair, ``log p(chosen | prompt) - log p(rejected | prompt)`` in nats (positive: the chosen answer wins).

    ``pairs`` are in TRL's conversational form (``prompt``, ``chosen`` and ``rejected`` lists of messages),
    as :func:`qlora_guide.training.preference.load_pairs` returns them.
    """
    examples = [{"messages": pair["prompt"] + pair[answer]} for pair in pairs for answer in ("chosen", "rejected")]
    nll = answer_nll_per_example(model, tokenizer, examples, batch_size, max_length)
    return [nll[2 * i + 1][0] - nll[2 * i][0] for i in range(len(pairs))]


def compare_preferences(margins_a: list[float], margins_b: list[float]) -> dict[str, Difference]:
    """Model ``b`` against model ``a`` on the same pairs: share of pairs won by the chosen answer (in %), and mean margin."""
    wins_a, wins_b = [float(m > 0) for m in margins_a], [float(m > 0) for m in margins_b]
    return {
        "chosen_preferred": mean_difference("chosen preferred (%)", wins_a, wins_b, scale=100.0),
        "margin": mean_difference("log-likelihood margin (nats)", margins_a, margins_b),
    }


def preference_table(margins_a: list[float], margins_b: list[float], groups: list[str] | None = None) -> list[dict[str, Any]]:
    """:func:`compare_preferences` on all pairs, then on each group of pairs (``groups[i]`` names pair ``i``'s group,
    such as the bundled pairs' ``rejection``: ``wrong`` or ``unhelpful``), one row per measure and group."""
    if groups is not None and len(groups) != len(margins_a):
        raise QLoRAGuideError(f"{len(groups)} group names for {len(margins_a)} pairs")
    subsets = {"all": list(range(len(margins_a)))}
    for name in dict.fromkeys(groups or []):
        subsets[name] = [i for i, group in enumerate(groups) if group == name]
    rows = []
    for name, index in subsets.items():
        compared = compare_preferences([margins_a[i] for i in index], [margins_b[i] for i in index])
        rows += [{"pairs": name, **difference.to_dict()} for difference in compared.values()]
    return rows
