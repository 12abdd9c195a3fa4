"""Generated answers and their scores: BLEU and chrF against the references, language, repetition, paired intervals."""

from __future__ import annotations

import logging
from typing import Any

from qlora_guide import progress
from qlora_guide.data import ensure_chat_template
from qlora_guide.deployment.generation import generate_ids
from qlora_guide.errors import QLoRAGuideError
from qlora_guide.evaluation.data import prompts_and_references
from qlora_guide.metrics import load_metric
from qlora_guide.metrics.answers import answer_languages, language_matches, repeated_ngram_share
from qlora_guide.metrics.intervals import corpus_difference, mean_difference, perplexity_ratio

log = logging.getLogger(__name__)


def generate_answers(
    model: Any,
    tokenizer: Any,
    prompts: list[list[dict[str, str]]],
    max_new_tokens: int = 64,
    batch_size: int = 8,
    repetition_penalty: float | None = None,
) -> list[str]:
    """Greedy answers to chat prompts, in batches with left padding.

    ``repetition_penalty`` above 1 divides the logit of every token already in
    the prompt or the answer by that factor (Keskar et al., 2019, suggest
    1.2): greedy decoding of a small model otherwise tends to loop. ``None``
    keeps the model's own generation config (a trained run's recipe sets it).

    Generation appends tokens on the right, so the prompts are padded on the
    left: every row's last prompt token sits in the same column and the new
    tokens follow it directly. The tokenizer's padding side is restored after.
    """
    ensure_chat_template(tokenizer)
    texts = [tokenizer.apply_chat_template(p, add_generation_prompt=True, tokenize=False) for p in prompts]
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    answers: list[str] = [""] * len(texts)
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        for start in progress.bar(range(0, len(order), batch_size), desc="generating", unit="batch"):
            chunk = order[start : start + batch_size]
            batch = tokenizer([texts[i] for i in chunk], return_tensors="pt", padding=True, add_special_tokens=False)
            new = generate_ids(model, batch["input_ids"], batch["attention_mask"], max_new_tokens=max_new_tokens,
                               tokenizer=tokenizer, repetition_penalty=repetition_penalty)
            for i, ids in zip(chunk, new, strict=True):
                answers[i] = tokenizer.decode(ids, skip_special_tokens=True).strip()
    finally:
        tokenizer.padding_side = side
    return answers


def generation_scores(predictions: list[str], references: list[str] | list[list[str]]) -> dict[str, float]:
    """Corpus BLEU and chrF (sacrebleu, 0-100) through the ``evaluate`` modules shipped with the package."""
    if len(predictions) != len(references):
        raise QLoRAGuideError(f"{len(predictions)} predictions for {len(references)} references")
    bleu = load_metric("bleu").compute(predictions=predictions, references=references)
    chrf = load_metric("chrf").compute(predictions=predictions, references=references)
    return {"bleu": bleu["score"], "chrf": chrf["score"]}


def question_languages(examples: list[dict[str, Any]]) -> list[str]:
    """The language of each example's last question: its ``lang`` field, else identified from the text."""
    prompts, _ = prompts_and_references(examples)
    if all(e.get("lang") for e in examples):
        return [str(e["lang"]) for e in examples]
    return answer_languages([p[-1]["content"] for p in prompts])


def answer_measures(predictions: list[str], references: list[str], languages: list[str]) -> dict[str, float]:
    """chrF and BLEU, the share of answers in the question's language and the mean repeated 4-gram share (in %)."""
    row = generation_scores(predictions, references)
    row["same_language_pct"] = 100 * sum(language_matches(predictions, languages)) / len(predictions)
    row["repeated_4gram_pct"] = 100 * sum(repeated_ngram_share(p) for p in predictions) / len(predictions)
    return row


def compare_answers(predictions_a: list[str], predictions_b: list[str], references: list[str], languages: list[str]) -> list[dict[str, Any]]:
    """Model b minus model a on the same questions, each measure with its paired bootstrap 95 % interval.

    chrF and BLEU as corpus scores, the share of answers in the question's
    language and the repeated 4-gram share in %; each row says whether the
    difference is more than the noise of this test set (the interval excludes 0).
    """
    differences = [
        corpus_difference("chrf", predictions_a, predictions_b, references),
        corpus_difference("bleu", predictions_a, predictions_b, references),
        mean_difference("same_language_pct", language_matches(predictions_a, languages), language_matches(predictions_b, languages), 100),
        mean_difference("repeated_4gram_pct", [repeated_ngram_share(p) for p in predictions_a], [repeated_ngram_share(p) for p in predictions_b], 100),
    ]
    return [d.to_dict() for d in differences]


def compare_rows(a: dict[str, Any], b: dict[str, Any], examples: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Two rows of :func:`evaluate_model` on the same examples: b against a, every measure with its 95 % interval.

    The perplexity row is the ratio b / a (below 1: b predicts the reference
    answers better); the others are differences b - a (chrF and BLEU points,
    percentage points for the language and repetition shares).
    """
    _, references = prompts_and_references(examples)
    rows = [perplexity_ratio(a["nll_per_example"], b["nll_per_example"]).to_dict()]
    if "predictions" in a and "predictions" in b:
        rows += compare_answers(a["predictions"], b["predictions"], references, question_languages(examples))
    for row in rows:
        row["model"], row["against"] = b.get("variant", "b"), a.get("variant", "a")
    return rows
