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

Where each part lives (a new measure of answers goes in ``answers.py``, a
new metric module in :mod:`qlora_guide.metrics`)::

    report.py            evaluate_run(): what `qlora-guide evaluate` runs; JSON and Markdown reports
    compare.py           one model evaluated; variants compared on the same data, with ratios
    likelihood.py        perplexity on answer tokens
    preferences.py       which answer of a preference pair a model prefers, two models compared
    variants.py          adapter variants (DoRA, rsLoRA, PiSSA, r, lora_alpha) trained on one budget, compared
    answers.py           generated answers, BLEU, chrF, language and repetition, paired intervals
    speed.py             time to first token, tokens per second, peak memory
    data.py              the split evaluated: prompts, references, labels
    trainer_metrics.py   the hooks a transformers Trainer calls during evaluation
"""

from qlora_guide.evaluation.answers import (
    answer_measures,
    compare_answers,
    compare_rows,
    generate_answers,
    generation_scores,
    question_languages,
)
from qlora_guide.evaluation.compare import add_ratios, compare_models, compare_to_reference, evaluate_model
from qlora_guide.evaluation.data import load_split, prompts_and_references, run_split, tokenize_for_loss
from qlora_guide.evaluation.likelihood import answer_nll, answer_nll_per_example, perplexity
from qlora_guide.evaluation.preferences import compare_preferences, preference_margins, preference_table
from qlora_guide.evaluation.report import (
    COLUMNS,
    REPORT_JSON,
    REPORT_MD,
    check_report_folder,
    evaluate_run,
    format_report,
    markdown_table,
    write_report,
)
from qlora_guide.evaluation.speed import SPEED_PROMPT, measure_generation
from qlora_guide.evaluation.trainer_metrics import compute_metrics, preprocess_logits_for_metrics

__all__ = [
    "COLUMNS", "REPORT_JSON", "REPORT_MD", "SPEED_PROMPT", "add_ratios", "answer_measures", "answer_nll",
    "answer_nll_per_example", "check_report_folder", "compare_answers", "compare_preferences", "compare_models", "compare_rows",
    "compare_to_reference", "compute_metrics", "evaluate_model", "evaluate_run", "format_report",
    "generate_answers", "generation_scores", "load_split", "markdown_table", "measure_generation", "perplexity",
    "preference_margins", "preference_table", "preprocess_logits_for_metrics", "prompts_and_references", "question_languages", "run_split",
    "tokenize_for_loss", "write_report",
]
