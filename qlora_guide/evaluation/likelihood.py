"""Perplexity on answer tokens: the summed negative log-likelihood of every answer token, batch by batch."""

from __future__ import annotations

import logging
import math
from typing import Any

import torch

from qlora_guide import progress
from qlora_guide.data import IGNORE_INDEX
from qlora_guide.errors import QLoRAGuideError
from qlora_guide.evaluation.data import tokenize_for_loss
from qlora_guide.loss import answer_token_count, answer_token_nll

log = logging.getLogger(__name__)


def model_device(model: Any) -> Any:
    return next(model.parameters()).device


def _batch_nll(model: Any, rows: list[dict[str, list[int]]], pad_token_id: int) -> list[tuple[float, int]]:
    """Summed negative log-likelihood and token count of the labelled tokens of each row of one batch.

    Rows are right-padded; the attention mask hides the padding and the
    labels (-100 on prompt and padding) choose the tokens that count. The
    logits at position t predict token t + 1, so they are compared with the
    labels shifted by one (:func:`~qlora_guide.loss.answer_token_nll`, the
    loss training validates with). Only the logits from the first labelled
    position on are computed (``logits_to_keep``), and they are turned into a
    loss one row at a time in float32, so memory stays at one batch's worth.
    """

    longest = max(len(r["input_ids"]) for r in rows)
    input_ids = torch.full((len(rows), longest), pad_token_id, dtype=torch.long)
    labels = torch.full((len(rows), longest), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), longest), dtype=torch.long)
    for i, row in enumerate(rows):
        n = len(row["input_ids"])
        input_ids[i, :n] = torch.tensor(row["input_ids"])
        labels[i, :n] = torch.tensor(row["labels"])
        attention_mask[i, :n] = 1
    labels[:, 0] = IGNORE_INDEX  # nothing predicts the first token
    labelled = (labels != IGNORE_INDEX).any(dim=0).nonzero()
    if len(labelled) == 0:
        return [(0.0, 0)] * len(rows)
    first = int(labelled[0])  # first position whose token carries a loss
    keep = longest - first + 1  # logits from position first - 1 to the end
    device = model_device(model)
    with torch.no_grad():
        try:
            logits = model(
                input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), use_cache=False, logits_to_keep=keep
            ).logits
        except TypeError:  # a model without logits_to_keep
            logits = model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), use_cache=False).logits
            logits = logits[:, -keep:]
        kept = labels[:, longest - keep :].to(device)  # the labels at the kept logits' positions
        rows_kept = [(logits[i : i + 1], kept[i : i + 1]) for i in range(len(rows))]
        return [(float(answer_token_nll(row, label)), answer_token_count(label)) for row, label in rows_kept]


def answer_nll_per_example(
    model: Any, tokenizer: Any, examples: list[dict[str, Any]], batch_size: int = 8, max_length: int = 512
) -> list[tuple[float, int]]:
    """Negative log-likelihood (nats) of each example's answer tokens and their number, in the examples' order.

    Examples are sorted by length before batching, to waste little on padding;
    the figures do not depend on the order or the batch size.
    """
    if batch_size <= 0:
        raise QLoRAGuideError(f"batch_size must be positive, not {batch_size}")
    rows = tokenize_for_loss(examples, tokenizer, max_length)
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]["input_ids"]))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    was_training = model.training
    model.eval()
    results: list[tuple[float, int]] = [(0.0, 0)] * len(rows)
    for start in progress.bar(range(0, len(order), batch_size), desc="perplexity", unit="batch"):
        chunk = order[start : start + batch_size]
        for i, value in zip(chunk, _batch_nll(model, [rows[i] for i in chunk], pad), strict=True):
            results[i] = value
    model.train(was_training)
    return results


def answer_nll(model: Any, tokenizer: Any, examples: list[dict[str, Any]], batch_size: int = 8, max_length: int = 512) -> tuple[float, int]:
    """Total negative log-likelihood (nats) of the answer tokens, and how many tokens that is."""
    per_example = answer_nll_per_example(model, tokenizer, examples, batch_size, max_length)
    return sum(nll for nll, _ in per_example), sum(n for _, n in per_example)


def perplexity(model: Any, tokenizer: Any, examples: list[dict[str, Any]], batch_size: int = 8, max_length: int = 512) -> float:
    """``exp(total answer NLL / number of answer tokens)``: the token-weighted perplexity on answers.

    Averaging per-batch (or per-example) means instead would weight a short
    answer's tokens more than a long one's, and make the number depend on the
    batch size; this does not.
    """
    total, count = answer_nll(model, tokenizer, examples, batch_size, max_length)
    if count == 0:
        raise QLoRAGuideError("no answer tokens to evaluate (every example was empty or truncated away)")
    return math.exp(total / count)
