"""``doctor``: a recipe's first training examples as the model will see them, checked before a run is wasted.

The failures that cost the most are the ones a run only shows at the end: a
model that never stops generating because its end-of-turn token was never
learnt, a chat template at inference that differs from the one the model was
trained on, a loss computed on nothing, a precision the hardware emulates. Each
is visible in the tokenized examples and the settings before any model is
loaded, so :func:`preflight` looks there; ``qlora-guide doctor RECIPE`` prints
what it finds, and ``qlora-guide train`` runs the same checks and stops on an
error before loading the model.

Each finding is one line that names the problem and its fix, with a level:
``ok`` (checked and fine), ``note`` (worth knowing, nothing to change),
``warning`` (the run works but likely not as meant) or ``error`` (the run
would be wasted).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from qlora_guide.config import Recipe, load_recipe
from qlora_guide.data import IGNORE_INDEX, Collator, load_examples, tokenize
from qlora_guide.errors import QLoRAGuideError
from qlora_guide.precision import Precision

Level = Literal["ok", "note", "warning", "error"]
CHECKED_EXAMPLES = 32  # examples tokenized for the checks: enough to see a pattern, milliseconds to encode


@dataclass(frozen=True)
class Finding:
    """One result of a check: its level, the check's name and one line with the fix."""

    level: Level
    check: str
    message: str

    def line(self) -> str:
        return f"{self.level:<7} {self.check:<10} {self.message}"


@dataclass
class Preflight:
    """What :func:`preflight` found, and a few examples split into masked and learnt text."""

    recipe: str
    findings: list[Finding]
    examples: list[list[tuple[str, bool]]] = field(default_factory=list)  # (text, learnt) segments per example

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.level == "error"]

    @property
    def exit_code(self) -> int:
        """1 when a check failed: ``qlora-guide doctor`` exits with it."""
        return 1 if self.errors else 0

    def to_dict(self) -> dict[str, Any]:
        return {"recipe": self.recipe, "findings": [asdict(f) for f in self.findings],
                "examples": [[{"text": t, "learnt": learnt} for t, learnt in example] for example in self.examples]}

    def raise_on_error(self) -> None:
        """Stop with the first error's line (``train`` calls this before loading the model)."""
        if self.errors:
            first = self.errors[0]
            more = f" (and {len(self.errors) - 1} more: qlora-guide doctor lists them)" if len(self.errors) > 1 else ""
            raise QLoRAGuideError(f"{first.check}: {first.message}{more}")


def segments(ids: list[int], labels: list[int], tokenizer: Any) -> list[tuple[str, bool]]:
    """An example as runs of text with the same fate: ``(text, True)`` carries a loss, ``(text, False)`` is masked."""
    runs: list[tuple[list[int], bool]] = []
    for token, label in zip(ids, labels, strict=True):
        learnt = label != IGNORE_INDEX
        if runs and runs[-1][1] == learnt:
            runs[-1][0].append(token)
        else:
            runs.append(([token], learnt))
    return [(tokenizer.decode(run, skip_special_tokens=False), learnt) for run, learnt in runs]


def stop_token_ids(name_or_path: str, tokenizer: Any) -> set[int]:
    """The ids that end generation: the model's generation config's EOS ids (where it has one) and the tokenizer's."""
    from transformers import GenerationConfig

    ids = {tokenizer.eos_token_id} - {None}
    try:
        eos = GenerationConfig.from_pretrained(name_or_path).eos_token_id
    except (OSError, ValueError):  # no generation_config.json: generate() falls back to the model config's EOS
        eos = None
    ids |= set(eos if isinstance(eos, list) else [eos]) - {None}
    return ids


def check_labels(rows: list[dict[str, list[int]]], stats: Any, data: Any) -> list[Finding]:
    """Something is learnt, and from answers only unless asked."""
    learnt = sum(label != IGNORE_INDEX for row in rows for label in row["labels"])
    tokens = sum(len(row["input_ids"]) for row in rows)
    found = []
    if stats.dropped:
        found.append(Finding("warning", "labels", f"{stats.dropped} of the first {stats.dropped + len(rows)} examples have no "
                             f"answer token left within data.max_length={data.max_length} and are dropped: raise data.max_length"))
    if data.train_on_prompt:
        found.append(Finding("note", "labels", f"data.train_on_prompt: the loss covers prompts too ({learnt} of {tokens} "
                             "tokens); set it to false to learn the answers only"))
    else:
        found.append(Finding("ok", "labels", f"{learnt} of {tokens} tokens carry a loss (the answers); the prompts are masked"))
    if stats.truncated:
        found.append(Finding("note", "length", f"{stats.truncated} of the first {stats.examples + stats.dropped} examples "
                             f"are longer than data.max_length={data.max_length} (longest {stats.longest}): their ends "
                             "are cut, the end-of-turn token with them"))
    return found


def check_eos(rows: list[dict[str, list[int]]], stops: set[int], tokenizer: Any, truncated: int) -> list[Finding]:
    """Every answer ends with a learnt token that stops generation, and padding does not take that label away."""
    names = ", ".join(repr(tokenizer.convert_ids_to_tokens(i)) for i in sorted(stops))
    ending = [row for row in rows if any(label in stops for label in row["labels"])]
    if not stops:
        return [Finding("error", "eos", "the tokenizer has no EOS token and the model no generation EOS: answers would never "
                        "end; set tokenizer.eos_token (and generation_config.eos_token_id) to the template's end-of-turn token")]
    if not ending:
        return [Finding("error", "eos", f"no answer has a learnt stop token ({names}): the tuned model will not learn to stop "
                        "and will generate until max_new_tokens; end each answer with the EOS token (a chat template that "
                        "closes the assistant turn with it)")]
    found = [Finding("ok", "eos", f"{len(ending)} of {len(rows)} answers end with a learnt stop token ({names})")]
    if len(ending) + truncated < len(rows):
        found = [Finding("warning", "eos", f"{len(rows) - len(ending)} of {len(rows)} answers end without a learnt stop token "
                         f"({names}): check that the chat template closes every assistant turn with it")]
    if tokenizer.pad_token_id in stops:
        found.append(check_padding(ending[0], Collator(tokenizer.pad_token_id), tokenizer.pad_token_id, tokenizer.pad_token))
    return found


def check_padding(row: dict[str, list[int]], collator: Any, pad_token_id: int, pad_token: str) -> Finding:
    """Pad ``row`` in a batch with a longer one, as training does, and see whether its stop tokens keep their labels."""
    longer = {"input_ids": row["input_ids"] + [0], "labels": row["labels"] + [IGNORE_INDEX]}
    padded = collator([row, longer])["labels"][0].tolist()
    stops = [k for k, label in enumerate(row["labels"]) if label == pad_token_id]
    if all(padded[k] == pad_token_id for k in stops):
        return Finding("note", "pad", f"the pad token is a stop token ({pad_token!r}): padding is masked by position here, so "
                       "the stop token keeps its label; a collator that masks by token id (DataCollatorForLanguageModeling) "
                       "would unlearn it: give such tools a distinct pad token")
    return Finding("error", "pad", f"padding masks the stop token ({pad_token!r}) it shares an id with: the model would "
                   "never learn to stop; mask padding by position or set a distinct pad token")


def check_template(examples: Any, tokenizer: Any, fmt: str, fallback: bool) -> list[Finding]:
    """Generation builds, for each prompt, exactly the tokens training saw before the answer."""
    from qlora_guide.data import encode_messages, to_messages
    from qlora_guide.deployment.generation import chat_input_ids

    if fmt == "text":
        if getattr(tokenizer, "chat_template", None):
            return [Finding("warning", "template", "plain text data: the model learns no chat turns, but `chat` and `serve` "
                            "wrap prompts in the chat template; generate from plain text, or train on messages")]
        return [Finding("ok", "template", "plain text data and no chat template: generation sees plain text, as training did")]
    found = []
    if fallback:
        found.append(Finding("warning", "template", f"{tokenizer.name_or_path} has no chat template: training uses the package's "
                             "'### Question / ### Answer' one, saved with the adapter; load the tokenizer from the adapter folder "
                             "to generate, or other tools will prompt differently"))
    mismatches = []
    for index, example in enumerate(examples):
        messages = to_messages(example, fmt, index)
        last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
        trained = encode_messages(messages, tokenizer)[0]  # what tokenize() encodes, before truncation
        prompt = chat_input_ids(tokenizer, messages[:last])[0].tolist()
        if trained[: len(prompt)] != prompt:
            at = next((k for k, (a, b) in enumerate(zip(trained, prompt, strict=False)) if a != b), min(len(trained), len(prompt)))
            mismatches.append((index, at, trained[at:at + 1], prompt[at:at + 1]))
    if mismatches:
        index, at, trained, prompt = mismatches[0]
        found.append(Finding("error", "template", f"{len(mismatches)} of {len(examples)} prompts differ between training and "
                             f"generation (example {index + 1}, token {at}: trained {tokenizer.decode(trained)!r}, generation "
                             f"{tokenizer.decode(prompt)!r}): render both with the same tokenizer.apply_chat_template, "
                             "add_generation_prompt=True for generation, and no second BOS"))
    else:
        found.append(Finding("ok", "template", f"generation builds the prompt tokens training saw, for {len(examples)} of "
                             f"{len(examples)} examples"))
    return found


def check_precision(precision: Precision) -> list[Finding]:
    """The compute dtype this hardware takes, and anything about it that costs speed or stability."""
    found = [Finding("warning" if "emulated" in note or "float16" in note else "note", "precision", note)
             for note in precision.notes]
    dtype = "bf16" if precision.bf16 else "fp16" if precision.fp16 else precision.compute_dtype
    found.append(Finding("ok", "precision", f"{precision.device}: training computes in {dtype}, optimizer {precision.optim}"))
    return found


def check(recipe: Recipe, train_split: Any, tokenizer: Any, precision: Precision, examples: int = 0) -> Preflight:
    """Every check on the first training examples of ``train_split``, tokenized as training tokenizes them."""
    from qlora_guide.data import detect_format
    from qlora_guide.models import resolve_model

    split = train_split.select(range(min(CHECKED_EXAMPLES, len(train_split))))
    fmt = detect_format(split.column_names, recipe.data.format, recipe.data.path)
    fallback = fmt != "text" and not getattr(tokenizer, "chat_template", None)
    dataset, stats = tokenize(split, tokenizer, recipe.data.model_copy(update={"packing": False}), where="train")
    rows = dataset.to_list()
    stops = stop_token_ids(resolve_model(recipe.model.name_or_path), tokenizer)
    findings = [
        *check_labels(rows, stats, recipe.data),
        *check_eos(rows, stops, tokenizer, stats.truncated),
        *check_template(split, tokenizer, fmt, fallback),
        *check_precision(precision),
    ]
    shown = [segments(row["input_ids"], row["labels"], tokenizer) for row in rows[:examples]]
    return Preflight(recipe.name, findings, shown)


def doctor(recipe: str, overrides: list[str] | None = None, examples: int = 3) -> Preflight:
    """``qlora-guide doctor RECIPE``: the checks ``train`` runs before loading a model, with ``examples`` of the
    training examples shown as masked and learnt text. Only the tokenizer and the data are loaded."""
    from qlora_guide.models import load_tokenizer
    from qlora_guide.training.devices import resolve_precision

    recipe = load_recipe(recipe.to_dict() if isinstance(recipe, Recipe) else recipe, overrides)
    if recipe.dpo is not None:
        raise QLoRAGuideError("doctor: a dpo recipe trains on preference pairs, which TRL tokenizes itself; "
                              "doctor checks supervised recipes")
    tokenizer = load_tokenizer(recipe.model.name_or_path, trust_remote_code=recipe.model.trust_remote_code)
    return check(recipe, load_examples(recipe.data)["train"], tokenizer, resolve_precision(recipe), examples)


def format_preflight(report: Preflight) -> str:
    """The examples with their learnt text between ⟦ ⟧, then one line per finding."""
    lines = []
    if report.examples:
        lines.append(f"recipe {report.recipe}: the first {len(report.examples)} training examples as the model sees them "
                     "(⟦learnt⟧, the rest masked)")
    for number, example in enumerate(report.examples, 1):
        text = "".join(f"⟦{t}⟧" if learnt else t for t, learnt in example)
        lines += [f"--- example {number}", text.rstrip("\n"), "---"]
    lines += [finding.line() for finding in report.findings]
    lines.append(f"{len(report.errors)} error(s): fix them before training" if report.errors else "no error")
    return "\n".join(lines)
