"""What an evaluation reads: a split of a data source or of a run's own data, as prompts, references and labels."""

from __future__ import annotations

import logging
from typing import Any

from datasets import Dataset

from qlora_guide.config import DataConfig, Recipe
from qlora_guide.data import (
    detect_format,
    filter_languages,
    load_examples,
    read_splits,
    to_messages,
    tokenize,
)
from qlora_guide.errors import QLoRAGuideError

log = logging.getLogger(__name__)


def load_split(data: str = "qlora-faq", split: str = "test", languages: list[str] | None = None, max_samples: int | None = None) -> list[dict[str, Any]]:
    """The raw examples of one split of a data source (the bundled set, a file or folder, a hub id)."""
    splits = read_splits(data)
    if split not in splits:
        raise QLoRAGuideError(f"data: {data} has no '{split}' split (it has: {', '.join(sorted(splits))})")
    dataset = splits[split]
    if languages:
        dataset = filter_languages(dataset, languages, f"{data} [{split}]")
    return _first(list(dataset), max_samples, f"the '{split}' split of {data}")


def _first(rows: list[dict[str, Any]], max_samples: int | None, where: str) -> list[dict[str, Any]]:
    """The first ``max_samples`` rows (all with None); an empty result is an error that names ``where``."""
    if max_samples is not None:
        if max_samples <= 0:
            raise QLoRAGuideError(f"max_samples must be positive, not {max_samples}")
        rows = rows[:max_samples]
    if not rows:
        raise QLoRAGuideError(f"data: {where} is empty")
    return rows


def run_split(recipe: Recipe, split: str | None = None, max_samples: int | None = None) -> tuple[list[dict[str, Any]], str]:
    """The examples a run is evaluated on, from its own data, and the name of their split.

    ``split`` (default ``evaluation.split``, ``test``) when the run's data has
    it. Without it, a run whose data had no such split is evaluated on its
    held-out validation split: the same examples training set aside (the
    split is cut with a fixed seed), never trained on. That is logged, and
    the split's name says so.
    """
    splits = load_examples(recipe.data)  # languages filtered, validation made as in training
    wanted = split or recipe.evaluation.split
    if wanted not in splits and split is None and "validation" in splits:
        log.warning("%s has no '%s' split: evaluating on the run's held-out validation split (%d examples, never trained on)",
                    recipe.data.path, wanted, len(splits["validation"]))
        wanted = "validation"
    if wanted not in splits:
        hint = "; without --split, a run is evaluated on its held-out validation split" if "validation" not in splits else ""
        raise QLoRAGuideError(f"data: {recipe.data.path} has no '{wanted}' split (the run has: {', '.join(sorted(splits))}){hint}")
    return _first(list(splits[wanted]), max_samples, f"the '{wanted}' split of {recipe.data.path}"), wanted


def tokenize_for_loss(examples: list[dict[str, Any]], tokenizer: Any, max_length: int = 512) -> list[dict[str, list[int]]]:
    """Token ids and answer-only labels of each example, with the training pipeline's own tokenizer code.

    Examples that already have ``input_ids`` and ``labels`` are kept as they
    are; raw examples (messages, alpaca, prompt/completion or text) go through
    :func:`qlora_guide.data.tokenize`, unpacked, so evaluation masks exactly
    what training masks.
    """
    if not examples:
        raise QLoRAGuideError("no examples to evaluate")
    if all("input_ids" in e and "labels" in e for e in examples):
        return [{"input_ids": list(e["input_ids"]), "labels": list(e["labels"])} for e in examples]


    config = DataConfig(path="evaluation", max_length=max_length, packing=False, train_on_prompt=False)
    dataset, _stats = tokenize(Dataset.from_list(list(examples)), tokenizer, config, where="evaluation")
    return [{"input_ids": row["input_ids"], "labels": row["labels"]} for row in dataset]


def prompts_and_references(examples: list[dict[str, Any]]) -> tuple[list[list[dict[str, str]]], list[str]]:
    """Split chat examples into the conversation before the last answer and that answer (the reference)."""
    if not examples:
        raise QLoRAGuideError("no examples to evaluate")
    fmt = detect_format(list(examples[0].keys()), "auto", "evaluation data")
    if fmt == "text":
        raise QLoRAGuideError("generation metrics need prompts and reference answers; plain 'text' examples have none")
    prompts, references = [], []
    for index, example in enumerate(examples):
        messages = to_messages(example, fmt, index)
        last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
        prompts.append(messages[:last])
        references.append(messages[last]["content"])
    return prompts, references
