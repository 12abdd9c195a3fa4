"""The hooks a transformers Trainer calls during evaluation: argmax ids per position, next-token accuracy."""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from qlora_guide.data import IGNORE_INDEX

log = logging.getLogger(__name__)


def preprocess_logits_for_metrics(logits: Any, labels: Any) -> Any:
    """Keep only the argmax token id per position, so evaluation does not hold vocabulary-sized tensors.

    The Trainer calls this after every evaluation batch and concatenates what
    it returns over the whole evaluation set; without it, it would keep
    ``batch x length x vocabulary`` logits for every batch (about 200 MB per
    batch of 4 x 256 tokens for a 49 k vocabulary in float32).
    """
    if isinstance(logits, tuple):
        logits = logits[0]
    return logits.argmax(dim=-1)


def compute_metrics(eval_pred: Any) -> dict[str, float]:
    """Next-token accuracy on answer tokens, from the argmax ids of :func:`preprocess_logits_for_metrics`.

    The prediction at position t is for token t + 1, so predictions and labels
    are shifted by one before comparing, and only labelled tokens (answers,
    not prompts or padding: label -100) count.

    Why not BLEU here, as the guide's original code did? Those ids come from
    one teacher-forced forward pass: each is the model's best guess for the
    next token *given the reference prefix*, not text the model would write.
    BLEU over them was computed on token ids rather than words, without the
    shift, and over prompt and padding tokens too: a number that looks like a
    translation score but measures next-token agreement with a crutch. Real
    BLEU and chrF need generated answers: :func:`generate_answers` and
    :func:`generation_scores`. The evaluation loss (and its ``exp``, the
    perplexity) comes from the Trainer's ``eval_loss``.
    """
    predictions, labels = eval_pred.predictions, eval_pred.label_ids
    if isinstance(predictions, tuple):
        predictions = predictions[0]
    predictions = np.asarray(predictions)[:, :-1]
    labels = np.asarray(labels)[:, 1:]
    mask = labels != IGNORE_INDEX
    count = int(mask.sum())
    accuracy = float((predictions[mask] == labels[mask]).mean()) if count else 0.0
    return {"token_accuracy": accuracy, "answer_tokens": count}
