"""Answer-token loss: the summed negative log-likelihood of the tokens that carry a label.

Training (its answer-only output layer and its validation loss) and evaluation
(perplexity) compute their losses with :func:`answer_token_nll`, so that the
validation loss of a run and the perplexity of its adapter are the same
quantity. Labels follow transformers' convention: ``-100`` marks a token that
carries no loss (prompt, padding, the first token), and the output at position
``t`` predicts token ``t + 1``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch.nn.functional as F

from qlora_guide.data import IGNORE_INDEX


def answer_token_count(labels: Any) -> int:
    """Number of tokens of a batch that carry a loss: labels other than -100, the first position apart."""
    return int((labels[:, 1:] != IGNORE_INDEX).sum())


def answer_token_nll(outputs: Any, labels: Any, head: Callable[[Any], Any] | None = None) -> Any:
    """Summed negative log-likelihood (nats, a float32 scalar tensor) of the labelled tokens of a batch.

    ``outputs`` is ``(batch, positions, vocabulary)`` logits, or with ``head``
    the final hidden states that the output layer ``head`` turns into logits;
    ``labels`` is ``(batch, positions)``. Position ``t`` is compared with label
    ``t + 1``. Only the labelled positions are kept before the output layer and
    the float32 cast, so the rest costs neither compute nor memory.
    """
    targets = labels[:, 1:]
    keep = targets != IGNORE_INDEX
    selected = outputs[:, :-1][keep]
    logits = head(selected) if head is not None else selected
    return F.cross_entropy(logits.float(), targets[keep], reduction="sum")
