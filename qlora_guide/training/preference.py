"""Preference tuning (DPO) with TRL: the recipe's model and adapters, trained to prefer each pair's chosen answer.

A recipe with a ``dpo`` section is the same recipe as a supervised one (model,
quantization, adapters, optimisation, run folder: :func:`qlora_guide.training.train`
runs both); what changes is the data, pairs of a ``prompt`` with a ``chosen``
and a ``rejected`` answer, and the loss, which TRL's ``DPOTrainer`` computes:

    loss = -log sigmoid(beta * ((log p(chosen) - log p_ref(chosen)) - (log p(rejected) - log p_ref(rejected))))

The reference ``p_ref`` is the model the run starts from: the base (a new
adapter starts at B = 0, so the model equals its base) or ``dpo.adapter``, a
trained adapter such as the supervised run's. TRL keeps a frozen copy of the
starting adapter for it (or, with ``reference: precomputed``, computes its
log-probabilities once before training).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from trl import DPOConfig, DPOTrainer

from qlora_guide.config import DataConfig, Recipe
from qlora_guide.data import PreparedData, TokenStats, detect_format, ensure_chat_template, load_examples
from qlora_guide.errors import QLoRAGuideError
from qlora_guide.precision import Precision
from qlora_guide.training.trainer import RunTrainer, run_callbacks, tensorboard_logs, training_arguments

PAIR_FIELDS = ("prompt", "chosen", "rejected")


def _messages(value: Any, role: str, field: str, where: str) -> list[dict[str, str]]:
    """A pair's field as chat messages: a string becomes one message of ``role``; empty text is refused."""
    if isinstance(value, str):
        value = [{"role": role, "content": value}]
    if not isinstance(value, list) or not value or not all(isinstance(m, dict) and "role" in m and "content" in m for m in value):
        raise QLoRAGuideError(f"data: {where} has a '{field}' that is neither text nor a list of {{role, content}} messages")
    if not all(isinstance(m["content"], str) and m["content"].strip() for m in value):
        raise QLoRAGuideError(f"data: {where} has an empty '{field}'{' answer' if field != 'prompt' else ''}")
    return [{"role": str(m["role"]), "content": m["content"]} for m in value]


def to_pair(example: dict[str, Any], where: str) -> dict[str, list[dict[str, str]]]:
    """One preference example in TRL's conversational form, checked: prompt, chosen and rejected as messages."""
    pair = {
        "prompt": _messages(example["prompt"], "user", "prompt", where),
        "chosen": _messages(example["chosen"], "assistant", "chosen", where),
        "rejected": _messages(example["rejected"], "assistant", "rejected", where),
    }
    if pair["chosen"] == pair["rejected"]:
        raise QLoRAGuideError(f"data: {where} has the same chosen and rejected answer: a pair must prefer one answer to another")
    return pair


def pair_statistics(pairs: list[dict[str, Any]], tokenizer: Any, max_length: int, batch_size: int = 1) -> TokenStats:
    """Token counts of each pair's two sequences (prompt + answer) with the chat template, how many of them are
    the answer's (the tokens DPO scores), how many TRL will cut at ``max_length``, and the share of padding when
    ``batch_size`` pairs at a time are padded to their longest sequence."""
    stats = TokenStats(examples=len(pairs), sequences=2 * len(pairs))
    lengths = []
    for pair in pairs:
        prompt = len(tokenizer.apply_chat_template(pair["prompt"], tokenize=True, add_generation_prompt=True,
                                                   return_dict=False))
        for answer in ("chosen", "rejected"):
            n = len(tokenizer.apply_chat_template(pair["prompt"] + pair[answer], tokenize=True, return_dict=False))
            lengths.append(min(n, max_length))
            stats.tokens += n
            stats.answer_tokens += max(min(n, max_length) - prompt, 0)
            stats.longest = max(stats.longest, n)
            stats.truncated += n > max_length
    batches = [lengths[i:i + 2 * batch_size] for i in range(0, len(lengths), 2 * batch_size)]
    padded = sum(max(batch) * len(batch) for batch in batches)
    stats.padding_fraction = 1 - sum(lengths) / padded if padded else 0.0
    stats.fingerprint = hashlib.sha256(json.dumps(pairs, sort_keys=True, ensure_ascii=False).encode()).hexdigest()
    return stats


def load_pairs(data: DataConfig) -> dict[str, list[dict[str, Any]]]:
    """The preference pairs of ``data`` (train, validation and any other split), each one checked by :func:`to_pair`."""
    data = data.model_copy(update={"format": "preference"})
    splits = load_examples(data)
    result = {}
    for name, ds in splits.items():
        detect_format(ds.column_names, "preference", f"{data.path} [{name}]")
        result[name] = [to_pair(example, f"example {i + 1} of the {name} split") for i, example in enumerate(ds)]
    return result


def prepare_pairs(data: DataConfig, tokenizer: Any, splits: dict[str, list[dict[str, Any]]], batch_size: int = 1) -> PreparedData:
    """The pairs as TRL's DPOTrainer takes them (datasets of prompt, chosen, rejected), with their statistics."""
    from datasets import Dataset

    ensure_chat_template(tokenizer)
    train = Dataset.from_list(splits["train"])
    validation = Dataset.from_list(splits["validation"]) if "validation" in splits else None
    return PreparedData(
        train=train,
        validation=validation,
        train_stats=pair_statistics(splits["train"], tokenizer, data.max_length, batch_size),
        validation_stats=pair_statistics(splits["validation"], tokenizer, data.max_length, batch_size)
        if validation is not None else None,
        collator=None,
        data_format="preference",
    )


def preference_arguments(recipe: Recipe, precision: Precision, output_dir: Path, has_validation: bool) -> DPOConfig:
    """TRL's DPOConfig: the recipe's TrainingArguments (as supervised runs get them) plus the dpo section."""
    dpo = recipe.dpo
    return training_arguments(
        recipe, precision, output_dir, has_validation, arguments_class=DPOConfig,
        beta=dpo.beta, loss_type=[dpo.loss_type], max_length=recipe.data.max_length,
        precompute_ref_log_probs=dpo.reference == "precomputed",
    )


class PreferenceTrainer(RunTrainer, DPOTrainer):
    """TRL's DPOTrainer with the run's checkpoints, logs, token counts and NaN guard."""

    def count_tokens(self, inputs: dict[str, Any]) -> tuple[int, int]:
        mask = inputs["attention_mask"]
        return int(mask.sum()), int(mask.numel() - mask.sum())


def make_preference_trainer(recipe: Recipe, model: Any, tokenizer: Any, data: PreparedData, args: DPOConfig, out: Path) -> PreferenceTrainer:
    """The DPOTrainer of a run in ``out``; the adapters stay in float32, as in supervised runs (TRL casts those of a
    4-bit model to bfloat16, which a CPU without bf16 computes slowly and whose updates round away)."""
    with tensorboard_logs(out):
        trainer = PreferenceTrainer(
            model=model,
            args=args,
            train_dataset=data.train,
            eval_dataset=data.validation,
            processing_class=tokenizer,
            callbacks=run_callbacks(recipe, out),
        )
    for param in trainer.model.parameters():
        if param.requires_grad and param.dtype != torch.float32:
            param.data = param.data.float()
    return trainer


def drop_reference_adapter(model: Any) -> None:
    """Remove the frozen copy TRL adds as the reference (adapter "ref"): the run's adapter is "default" alone."""
    if "ref" in getattr(model, "peft_config", {}):
        model.delete_adapter("ref")
