"""Evaluation: perplexity on answers, BLEU and chrF on generated answers, and speed, per model variant.

Three kinds of numbers, each measured the way its name says:

* **Perplexity** is ``exp`` of the mean negative log-likelihood per answer
  token, over the whole evaluation set: every token that carries a loss counts
  once, prompts and padding not at all. It is summed batch by batch (the
  logits of one batch are dropped before the next), so it does not depend on
  the batch size.
* **BLEU and chrF** score answers the model *generates* (greedy decoding)
  against the reference answers, with sacrebleu through ``evaluate`` metric
  modules shipped in :mod:`qlora_guide.metrics` (no network needed).
* **Speed and memory**: load time, peak memory (CUDA allocator, or process RSS
  on the CPU), time to first token and generated tokens per second.

:func:`compare_models` measures the bf16 base, the 4-bit base, the 4-bit base
with an adapter and a merged model on the same data, with each metric's ratio
to the bf16 base: that is how a claim such as "4-bit keeps 98 % of the
original quality" is checked rather than assumed.
"""

from __future__ import annotations

import gc
import json
import logging
import math
import os
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qlora_guide import progress
from qlora_guide.errors import QLoRAGuideError
from qlora_guide.outputs import write_text_atomic

if TYPE_CHECKING:  # pragma: no cover
    from qlora_guide.config import QuantizationConfig, Recipe

log = logging.getLogger(__name__)

IGNORE_INDEX = -100
REPORT_JSON = "report.json"
REPORT_MD = "report.md"
SPEED_PROMPT = "Explain in a few sentences what QLoRA is and why it saves memory."


# ------------------------------------------------------------------ data


def load_split(data: str = "qlora-faq", split: str = "test", languages: list[str] | None = None, max_samples: int | None = None) -> list[dict[str, Any]]:
    """The raw examples of one split of a data source (the bundled set, a file or folder, a hub id)."""
    from qlora_guide.data import filter_languages, read_splits

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
    from qlora_guide.data import load_examples

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
    from datasets import Dataset

    from qlora_guide.config import DataConfig
    from qlora_guide.data import tokenize

    config = DataConfig(path="evaluation", max_length=max_length, packing=False, train_on_prompt=False)
    dataset, _stats = tokenize(Dataset.from_list(list(examples)), tokenizer, config, where="evaluation")
    return [{"input_ids": row["input_ids"], "labels": row["labels"]} for row in dataset]


def prompts_and_references(examples: list[dict[str, Any]]) -> tuple[list[list[dict[str, str]]], list[str]]:
    """Split chat examples into the conversation before the last answer and that answer (the reference)."""
    from qlora_guide.data import detect_format, to_messages

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


# ------------------------------------------------------------------ perplexity


def _model_device(model: Any) -> Any:
    return next(model.parameters()).device


def _batch_nll(model: Any, rows: list[dict[str, list[int]]], pad_token_id: int) -> list[tuple[float, int]]:
    """Summed negative log-likelihood and token count of the labelled tokens of each row of one batch.

    Rows are right-padded; the attention mask hides the padding and the
    labels (-100 on prompt and padding) choose the tokens that count. The
    logits at position t predict token t + 1, so they are compared with the
    labels shifted by one. Only the logits from the first labelled position
    on are computed (``logits_to_keep``), and they are turned into a loss one
    row at a time in float32, so memory stays at one batch's worth.
    """
    import torch
    import torch.nn.functional as F

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
    device = _model_device(model)
    with torch.no_grad():
        try:
            logits = model(
                input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), use_cache=False, logits_to_keep=keep
            ).logits
        except TypeError:  # a model without logits_to_keep
            logits = model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), use_cache=False).logits
            logits = logits[:, -keep:]
        targets = labels[:, longest - keep + 1 :].to(device)  # the token each kept logit predicts
        sums = [
            F.cross_entropy(logits[i, :-1].float(), targets[i], ignore_index=IGNORE_INDEX, reduction="sum").item()
            for i in range(len(rows))
        ]
    counts = (targets != IGNORE_INDEX).sum(dim=1).tolist()
    return [(nll, int(n)) for nll, n in zip(sums, counts, strict=True)]


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


# ------------------------------------------------------------------ generation metrics


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
    import torch

    from qlora_guide.data import ensure_chat_template

    ensure_chat_template(tokenizer)
    texts = [tokenizer.apply_chat_template(p, add_generation_prompt=True, tokenize=False) for p in prompts]
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    answers: list[str] = [""] * len(texts)
    device = _model_device(model)
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        for start in progress.bar(range(0, len(order), batch_size), desc="generating", unit="batch"):
            chunk = order[start : start + batch_size]
            batch = tokenizer([texts[i] for i in chunk], return_tensors="pt", padding=True, add_special_tokens=False)
            with torch.no_grad():
                out = model.generate(
                    **batch.to(device),
                    max_new_tokens=max_new_tokens,
                    do_sample=False,
                    **({"repetition_penalty": repetition_penalty} if repetition_penalty is not None else {}),
                    pad_token_id=tokenizer.pad_token_id,
                )
            new = out[:, batch["input_ids"].shape[1] :]
            for i, ids in zip(chunk, new, strict=True):
                answers[i] = tokenizer.decode(ids, skip_special_tokens=True).strip()
    finally:
        tokenizer.padding_side = side
    return answers


def generation_scores(predictions: list[str], references: list[str] | list[list[str]]) -> dict[str, float]:
    """Corpus BLEU and chrF (sacrebleu, 0-100) through the ``evaluate`` modules shipped with the package."""
    from qlora_guide.metrics import load_metric

    if len(predictions) != len(references):
        raise QLoRAGuideError(f"{len(predictions)} predictions for {len(references)} references")
    bleu = load_metric("bleu").compute(predictions=predictions, references=references)
    chrf = load_metric("chrf").compute(predictions=predictions, references=references)
    return {"bleu": bleu["score"], "chrf": chrf["score"]}


def question_languages(examples: list[dict[str, Any]]) -> list[str]:
    """The language of each example's last question: its ``lang`` field, else identified from the text."""
    from qlora_guide.metrics.answers import answer_languages

    prompts, _ = prompts_and_references(examples)
    if all(e.get("lang") for e in examples):
        return [str(e["lang"]) for e in examples]
    return answer_languages([p[-1]["content"] for p in prompts])


def answer_measures(predictions: list[str], references: list[str], languages: list[str]) -> dict[str, float]:
    """chrF and BLEU, the share of answers in the question's language and the mean repeated 4-gram share (in %)."""
    from qlora_guide.metrics.answers import language_matches, repeated_ngram_share

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
    from qlora_guide.metrics.answers import language_matches, repeated_ngram_share
    from qlora_guide.metrics.intervals import corpus_difference, mean_difference

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
    from qlora_guide.metrics.intervals import perplexity_ratio

    _, references = prompts_and_references(examples)
    rows = [perplexity_ratio(a["nll_per_example"], b["nll_per_example"]).to_dict()]
    if "predictions" in a and "predictions" in b:
        rows += compare_answers(a["predictions"], b["predictions"], references, question_languages(examples))
    for row in rows:
        row["model"], row["against"] = b.get("variant", "b"), a.get("variant", "a")
    return rows


# ------------------------------------------------------------------ Trainer hooks


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
    import numpy as np

    predictions, labels = eval_pred.predictions, eval_pred.label_ids
    if isinstance(predictions, tuple):
        predictions = predictions[0]
    predictions = np.asarray(predictions)[:, :-1]
    labels = np.asarray(labels)[:, 1:]
    mask = labels != IGNORE_INDEX
    count = int(mask.sum())
    accuracy = float((predictions[mask] == labels[mask]).mean()) if count else 0.0
    return {"token_accuracy": accuracy, "answer_tokens": count}


# ------------------------------------------------------------------ speed and memory


class MemoryWatch:
    """Peak memory while a block runs: the CUDA allocator's peaks on a GPU, the process RSS on the CPU.

    On the CPU a background thread samples the resident set size every 10 ms;
    ``rss_peak_mb`` is the highest sample minus the RSS when the block started
    (so earlier models that were freed do not count, but memory the allocator
    kept from them may be reused and not show up).
    """

    def __init__(self, interval: float = 0.01) -> None:
        self.interval = interval
        self.result: dict[str, float] = {}

    def __enter__(self) -> MemoryWatch:
        import psutil
        import torch

        self.cuda = torch.cuda.is_available()
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.empty_cache()  # so that blocks cached for an earlier model do not count as reserved
            torch.cuda.reset_peak_memory_stats()
            self.cuda_start = torch.cuda.memory_allocated()
        self.process = psutil.Process()
        self.start_rss = self.peak_rss = self.process.memory_info().rss
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self) -> None:
        while not self.stop.is_set():
            self.peak_rss = max(self.peak_rss, self.process.memory_info().rss)
            self.stop.wait(self.interval)

    def __exit__(self, *exc: Any) -> None:
        import torch

        self.stop.set()
        self.thread.join()
        self.peak_rss = max(self.peak_rss, self.process.memory_info().rss)
        self.result = {"rss_peak_mb": round((self.peak_rss - self.start_rss) / 2**20, 1)}
        if self.cuda:
            torch.cuda.synchronize()
            self.result["cuda_peak_allocated_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
            self.result["cuda_peak_reserved_mb"] = round(torch.cuda.max_memory_reserved() / 2**20, 1)


def measure_generation(model: Any, tokenizer: Any, prompt: str = SPEED_PROMPT, max_new_tokens: int = 64, repeats: int = 1) -> dict[str, float]:
    """Time to first token and generated tokens per second of one greedy answer of exactly ``max_new_tokens``.

    ``min_new_tokens`` forces the same number of tokens for every model, so
    their speeds compare. ``tokens_per_s`` counts all generated tokens over
    the whole call (prompt processing included); ``decode_tokens_per_s`` only
    the tokens after the first, over the time after it. A short generation
    runs first, untimed, so one-off costs (CUDA kernels, bitsandbytes' CPU
    weight repacking) are not charged to the first model measured. With
    ``repeats`` > 1 the fastest run is kept.
    """
    import torch
    from transformers.generation.streamers import BaseStreamer

    class FirstToken(BaseStreamer):
        def __init__(self) -> None:
            self.calls, self.first = 0, None

        def put(self, value: Any) -> None:
            self.calls += 1
            if self.calls == 2 and self.first is None:  # call 1 is the prompt
                self.first = time.perf_counter()

        def end(self) -> None:
            pass

    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False
    ) if getattr(tokenizer, "chat_template", None) else prompt
    batch = tokenizer(text, return_tensors="pt", add_special_tokens=False).to(_model_device(model))
    with torch.no_grad():
        model.generate(**batch, max_new_tokens=2, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    best: dict[str, float] | None = None
    for _ in range(max(1, repeats)):
        streamer = FirstToken()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.no_grad():
            out = model.generate(
                **batch,
                max_new_tokens=max_new_tokens,
                min_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
                streamer=streamer,
            )
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        end = time.perf_counter()
        n = out.shape[1] - batch["input_ids"].shape[1]
        first = streamer.first or end
        run = {
            "ttft_s": round(first - start, 4),
            "tokens_per_s": round(n / (end - start), 2),
            "decode_tokens_per_s": round((n - 1) / (end - first), 2) if n > 1 and end > first else 0.0,
            "generated_tokens": int(n),
            "prompt_tokens": int(batch["input_ids"].shape[1]),
        }
        if best is None or run["tokens_per_s"] > best["tokens_per_s"]:
            best = run
    return best


# ------------------------------------------------------------------ one model, several models


def evaluate_model(
    model: Any,
    tokenizer: Any,
    examples: list[dict[str, Any]],
    batch_size: int = 8,
    max_new_tokens: int = 64,
    max_length: int = 512,
    generation: bool = True,
    repetition_penalty: float | None = None,
) -> dict[str, Any]:
    """Perplexity on answers, and (``generation``) BLEU, chrF, language and repetition of greedy answers."""
    per_example = answer_nll_per_example(model, tokenizer, examples, batch_size, max_length)
    total, count = sum(nll for nll, _ in per_example), sum(n for _, n in per_example)
    if count == 0:
        raise QLoRAGuideError("no answer tokens to evaluate (every example was empty or truncated away)")
    row: dict[str, Any] = {"perplexity": math.exp(total / count), "answer_tokens": count, "samples": len(examples),
                           "nll_per_example": per_example}
    if generation:
        prompts, references = prompts_and_references(examples)
        predictions = generate_answers(model, tokenizer, prompts, max_new_tokens, batch_size, repetition_penalty)
        row.update(answer_measures(predictions, references, question_languages(examples)))
        row["predictions"] = predictions
    return row


def compare_to_reference(rows: list[dict[str, Any]], examples: list[dict[str, Any]], reference: str = "bf16 base") -> list[dict[str, Any]]:
    """Every row of :func:`evaluate_model` (with a ``variant`` name) against the reference row, see :func:`compare_rows`."""
    ref = next((r for r in rows if r.get("variant") == reference), None)
    if ref is None:
        raise QLoRAGuideError(f"no row named '{reference}' to compare with (rows: {', '.join(str(r.get('variant')) for r in rows)})")
    return [d for row in rows if row is not ref for d in compare_rows(ref, row, examples)]


def _variant_loaders(base: str, adapter_dir: str | None, merged_dir: str | None, quantization: QuantizationConfig, merged_4bit: bool) -> list[tuple[str, Any]]:
    """(name, loader) for each variant to compare; a loader returns (model, tokenizer)."""
    from qlora_guide import deployment
    from qlora_guide.models import load_model, load_tokenizer

    def plain(name: str, quant: QuantizationConfig | None) -> Any:
        return lambda: (load_model(name, quantization=quant).eval(), load_tokenizer(name))

    def loaded(ref: str, quant: Any) -> Any:
        def load() -> tuple[Any, Any]:
            lm = deployment.load_any(ref, quantization=quant)
            return lm.model, lm.tokenizer

        return load

    variants = [("bf16 base", plain(base, None)), ("4-bit base", plain(base, quantization))]
    if adapter_dir:
        variants.append(("4-bit + adapter", loaded(adapter_dir, quantization)))
    if merged_dir:
        variants.append(("merged", loaded(merged_dir, None)))
        if merged_4bit:
            variants.append(("merged 4-bit", loaded(merged_dir, quantization)))
    return variants


def compare_models(
    base: str | None = None,
    adapter_dir: str | os.PathLike | None = None,
    merged_dir: str | os.PathLike | None = None,
    data: str | list[dict[str, Any]] = "qlora-faq",
    split: str = "test",
    max_samples: int | None = None,
    batch_size: int = 8,
    max_new_tokens: int = 64,
    max_length: int = 512,
    quantization: QuantizationConfig | None = None,
    generation: bool = True,
    performance: bool = True,
    speed_tokens: int = 32,
    merged_4bit: bool = False,
) -> list[dict[str, Any]]:
    """Evaluate the bf16 base, the 4-bit base, 4-bit + adapter and a merged model on the same examples.

    One row per variant (the adapter and merged rows only when given), each
    with perplexity, BLEU, chrF and their ratio to the bf16 base
    (``perplexity_ratio`` below 1 and ``bleu_ratio`` / ``chrf_ratio`` above 1
    are better than the base), and with ``performance``: load time, memory,
    time to first token and tokens per second. Models are loaded one at a
    time and freed before the next. ``base`` defaults to the adapter's base,
    else the embedded model; ``quantization`` to NF4 with double quantization.
    """
    from qlora_guide import deployment
    from qlora_guide.config import QuantizationConfig

    if base is None:
        base = deployment.adapter_base(adapter_dir) if adapter_dir else "smollm2-135m"
    quantization = quantization or QuantizationConfig()
    examples = data if isinstance(data, list) else load_split(data, split, max_samples=max_samples)
    if isinstance(data, list) and max_samples is not None:
        examples = examples[:max_samples]
    rows: list[dict[str, Any]] = []
    variants = _variant_loaders(base, str(adapter_dir) if adapter_dir else None, str(merged_dir) if merged_dir else None, quantization, merged_4bit)
    for name, loader in progress.bar(variants, desc="models", unit="model"):
        gc.collect()
        with MemoryWatch() as memory:
            start = time.perf_counter()
            model, tokenizer = loader()
            load_s = time.perf_counter() - start
            row: dict[str, Any] = {"variant": name}
            row.update(evaluate_model(model, tokenizer, examples, batch_size, max_new_tokens, max_length, generation))
            if performance:
                row["load_s"] = round(load_s, 2)
                row["weights_mb"] = round(model.get_memory_footprint() / 2**20, 1)
                row.update(measure_generation(model, tokenizer, max_new_tokens=speed_tokens))
        if performance:
            row.update(memory.result)
        rows.append(row)
        del model, tokenizer
    add_ratios(rows)
    return rows


def add_ratios(rows: list[dict[str, Any]], reference: str = "bf16 base") -> None:
    """Add ``perplexity_ratio``, ``bleu_ratio`` and ``chrf_ratio`` against the reference row, in place."""
    ref = next((r for r in rows if r.get("variant") == reference), None)
    if ref is None:
        return
    for row in rows:
        for key in ("perplexity", "bleu", "chrf"):
            if key in row and ref.get(key):
                row[f"{key}_ratio"] = round(row[key] / ref[key], 4)


# ------------------------------------------------------------------ reports

COLUMNS = (
    ("variant", "model", "{}"),
    ("perplexity", "perplexity", "{:.3f}"),
    ("perplexity_ratio", "ppl / bf16", "{:.3f}"),
    ("bleu", "BLEU", "{:.2f}"),
    ("bleu_ratio", "BLEU / bf16", "{:.3f}"),
    ("chrf", "chrF", "{:.2f}"),
    ("chrf_ratio", "chrF / bf16", "{:.3f}"),
    ("same_language_pct", "same language %", "{:.0f}"),
    ("repeated_4gram_pct", "repeated 4-grams %", "{:.1f}"),
    ("load_s", "load s", "{:.1f}"),
    ("weights_mb", "weights MiB", "{:.0f}"),
    ("rss_peak_mb", "RSS peak MiB", "{:.0f}"),
    ("cuda_peak_allocated_mb", "CUDA alloc MiB", "{:.0f}"),
    ("cuda_peak_reserved_mb", "CUDA reserved MiB", "{:.0f}"),
    ("ttft_s", "TTFT s", "{:.3f}"),
    ("tokens_per_s", "tokens/s", "{:.1f}"),
)


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """A Markdown table of the rows, with the columns that at least one row has."""
    columns = [c for c in COLUMNS if any(c[0] in r for r in rows)]
    lines = ["| " + " | ".join(title for _, title, _ in columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    for row in rows:
        cells = [fmt.format(row[key]) if row.get(key) is not None else "" for key, _, fmt in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def check_report_folder(out_dir: str | os.PathLike, overwrite: bool = False) -> dict[str, Path]:
    """The report's two paths in ``out_dir``; refused when ``out_dir`` is a file or a report is there (unless ``overwrite``)."""
    out = Path(out_dir).expanduser()
    if out.exists() and not out.is_dir():
        raise QLoRAGuideError(f"--out {out} is a file, not a folder: choose another path")
    paths = {"json": out / REPORT_JSON, "markdown": out / REPORT_MD}
    existing = [p for p in paths.values() if p.exists()]
    if existing and not overwrite:
        raise QLoRAGuideError(f"{existing[0]} already exists: choose another folder or pass overwrite=True (--overwrite)")
    return paths


def write_report(rows: list[dict[str, Any]], out_dir: str | os.PathLike, meta: dict[str, Any] | None = None, overwrite: bool = False) -> dict[str, str]:
    """Write ``report.json`` (rows and settings) and ``report.md`` (a table) into ``out_dir``; return their paths."""
    paths = check_report_folder(out_dir, overwrite)
    paths["json"].parent.mkdir(parents=True, exist_ok=True)
    payload = {"meta": meta or {}, "rows": rows}
    for key, text in (("json", json.dumps(payload, indent=2, ensure_ascii=False, default=str)), ("markdown", _markdown_report(rows, meta))):
        write_text_atomic(paths[key], text + "\n")
    return {k: str(v) for k, v in paths.items()}


def _markdown_report(rows: list[dict[str, Any]], meta: dict[str, Any] | None) -> str:
    lines = ["# Evaluation", ""]
    for key, value in (meta or {}).items():
        lines.append(f"- {key}: {value}")
    lines += ["", markdown_table(rows), "", "Ratios are to the bf16 base: below 1 is better for perplexity, above 1 for BLEU and chrF."]
    return "\n".join(lines)


@progress.library_bars()
def evaluate_run(
    run: str | os.PathLike,
    data: str | None = None,
    split: str | None = None,
    max_samples: int | None = None,
    compare: bool = False,
    out_dir: str | os.PathLike | None = None,
    batch_size: int | None = None,
    max_new_tokens: int | None = None,
    generation: bool = True,
    performance: bool = True,
    overwrite: bool = False,
) -> dict[str, Any]:
    """What ``qlora-guide evaluate`` runs: evaluate a run, adapter, merged or base model, or compare variants.

    Defaults come from the run's ``recipe.yaml`` when there is one (data,
    languages, evaluation split, batch size, answer length), else from the
    bundled dataset and :class:`~qlora_guide.config.EvaluationConfig`.
    ``compare=True`` adds the bf16 and 4-bit bases (and a merged model when
    ``run`` is one) as in :func:`compare_models`. With ``out_dir`` the report
    is also written as JSON and Markdown.
    """
    from qlora_guide import deployment
    from qlora_guide.config import EvaluationConfig, load_recipe

    for option, value in (("batch_size", batch_size), ("max_new_tokens", max_new_tokens)):
        if value is not None and value <= 0:
            raise QLoRAGuideError(f"{option} must be a positive integer, not {value}")
    if out_dir is not None:
        check_report_folder(out_dir, overwrite)  # before minutes of evaluation, not after
    kind = deployment.model_kind(run)
    recipe = None
    folder = Path(run).expanduser()
    if kind != "hub":
        for candidate in (folder / "recipe.yaml", folder.parent / "recipe.yaml"):
            if candidate.is_file():
                recipe = load_recipe(candidate)
                break
    defaults = recipe.evaluation if recipe else EvaluationConfig()
    max_samples = max_samples if max_samples is not None else defaults.max_samples
    batch_size = batch_size or defaults.batch_size
    max_new_tokens = max_new_tokens or defaults.max_new_tokens
    max_length = recipe.data.max_length if recipe else 512
    if recipe is not None and data is None:
        examples, split = run_split(recipe, split, max_samples)
        data = recipe.data.path
    else:
        data, split = data or "qlora-faq", split or defaults.split
        examples = load_split(data, split, languages=recipe.data.languages if recipe else None, max_samples=max_samples)
    meta = {"model": str(run), "kind": kind, "data": data, "split": split, "samples": len(examples), "max_new_tokens": max_new_tokens}

    if compare:
        adapter = str(run) if kind == "adapter" else None
        merged = str(run) if kind == "model" else None
        base = deployment.adapter_base(run) if adapter else (deployment.manifest_base(deployment.read_manifest(folder)) if merged else str(run))
        if kind == "model" and not base:
            base, merged = str(run), None  # a plain model folder: it is the base
        quantization = deployment.training_quantization(run) if adapter else None
        rows = compare_models(
            base=base or "smollm2-135m", adapter_dir=adapter, merged_dir=merged, data=examples,
            batch_size=batch_size, max_new_tokens=max_new_tokens, max_length=max_length,
            quantization=quantization, generation=generation, performance=performance,
        )
    else:
        with MemoryWatch() as memory:
            lm = deployment.load_any(run)
            row: dict[str, Any] = {"variant": lm.name + (" (4-bit + adapter)" if lm.kind == "adapter" and lm.quantized else "")}
            row.update(evaluate_model(lm.model, lm.tokenizer, examples, batch_size, max_new_tokens, max_length, generation))
            if performance:
                row["load_s"] = round(lm.load_seconds, 2)
                row["weights_mb"] = round(lm.model.get_memory_footprint() / 2**20, 1)
                row.update(measure_generation(lm.model, lm.tokenizer, max_new_tokens=32))
        if performance:
            row.update(memory.result)
        rows = [row]
    report = {"meta": meta, "rows": rows}
    if out_dir:
        report["files"] = write_report(rows, out_dir, meta, overwrite=overwrite)
    return report


def format_report(report: dict[str, Any]) -> str:
    """The report as a Markdown table (what ``qlora-guide evaluate`` prints)."""
    meta = report.get("meta", {})
    head = f"{meta.get('model')} on {meta.get('data')} [{meta.get('split')}], {meta.get('samples')} examples"
    lines = [head, "", markdown_table(report["rows"])]
    if any("perplexity_ratio" in r for r in report["rows"]):
        lines += ["", "Ratios are to the bf16 base: below 1 is better for perplexity, above 1 for BLEU and chrF."]
    if report.get("files"):
        lines += ["", "written: " + ", ".join(report["files"].values())]
    return "\n".join(lines)
