"""From data files to training sequences: load, convert, tokenize, mask, pack.

The pipeline has three steps, each a function:

1. :func:`load_examples` reads a local JSONL/JSON/CSV/Parquet file or folder,
   a hub dataset, or the bundled bilingual ``qlora-faq`` set, filters it by
   language and makes a validation split when there is none.
2. :func:`tokenize` renders every example with the model's own chat template
   and gives it ``labels``: the answer tokens keep their ids, the prompt tokens
   get -100 so that the loss is computed on answers only. The answer span is
   found by rendering the prompt alone (``add_generation_prompt=True``) and
   checking that it is a prefix of the full rendering.
3. Packing (``data.packing``) concatenates several examples into one row of at
   most ``max_length`` tokens. ``position_ids`` restart at 0 at each example:
   transformers (>= 4.53) turns that into a block-diagonal causal mask for the
   eager, sdpa and flash attention kernels, provided the batch carries no
   ``attention_mask`` and the model builds no KV cache (``use_cache=False``;
   with a cache the packed format is silently ignored). The collator below
   produces exactly that. The first token of each packed example has no label,
   so no example is asked to predict its neighbour's first token: the packed
   loss equals the unpacked loss.

Everything that goes wrong with the data (a missing file, a line that is not
JSON, a missing column, nothing left to train on) is a one-line
:class:`~qlora_guide.errors.QLoRAGuideError`.
"""

from __future__ import annotations

import bisect
import collections
import csv
import hashlib
import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qlora_guide.errors import QLoRAGuideError, first_line

if TYPE_CHECKING:  # pragma: no cover
    from datasets import Dataset, DatasetDict

    from qlora_guide.config import DataConfig

log = logging.getLogger(__name__)

# The datasets shipped with the package: the FAQ (answers) and its preference pairs (chosen and rejected answers).
BUNDLED_DATASETS = {"qlora-faq": Path(__file__).parent / "assets" / "qlora_faq",
                    "qlora-prefs": Path(__file__).parent / "assets" / "qlora_prefs"}
FILE_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")
SPLIT_ALIASES = {"val": "validation", "valid": "validation", "dev": "validation", "eval": "validation"}
IGNORE_INDEX = -100  # label value that the loss skips (torch's cross_entropy default)
SPLIT_SEED = 42  # the validation split made from the training split is always the same one

# Columns each format needs (the first of each group is what auto-detection looks for).
FORMAT_COLUMNS = {
    "messages": ("messages",),
    "alpaca": ("instruction", "output"),
    "prompt_completion": ("prompt", "completion"),
    "text": ("text",),
    "preference": ("chosen", "rejected", "prompt"),
}

# Used only for models that ship without a chat template (base models such as
# Mistral-7B-v0.1). It is saved with the tokenizer, so inference uses the same format.
FALLBACK_CHAT_TEMPLATE = (
    "{{ bos_token or '' }}"
    "{% for message in messages %}"
    "{% if not loop.first %}{{ '\n\n' }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '### Question:\n' + message['content'] }}"
    "{% elif message['role'] == 'assistant' %}{{ '### Answer:\n' + message['content'] + (eos_token or '') }}"
    "{% else %}{{ message['content'] }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '\n\n### Answer:\n' }}{% endif %}"
)


# ---------------------------------------------------------------- loading


def load_examples(data: DataConfig) -> DatasetDict:
    """Load the examples named by ``data.path`` as a DatasetDict with train and validation splits.

    The format is checked (and detected when ``data.format`` is ``auto``) on the
    training split; ``data.languages`` keeps only examples whose ``lang`` is
    listed; a missing validation split is cut from the training split with a
    fixed seed (not ``training.seed``), so runs that differ only in their seed
    validate on the same examples and their validation losses compare.
    """
    from datasets import DatasetDict

    splits = read_splits(data.path)
    if data.train_split not in splits:
        raise QLoRAGuideError(f"data: {data.path} has no '{data.train_split}' split (it has: {', '.join(sorted(splits))})")
    if data.languages:
        splits = {name: filter_languages(ds, data.languages, f"{data.path} [{name}]") for name, ds in splits.items()}
    train = splits[data.train_split]
    if len(train) == 0:
        kept = f" with data.languages={data.languages}" if data.languages else ""
        raise QLoRAGuideError(f"data: {data.path} has no training example{kept}")
    fmt = detect_format(train.column_names, data.format, f"{data.path} [{data.train_split}]")
    result = {"train": train}
    if data.validation_split:
        if data.validation_split in splits and len(splits[data.validation_split]) > 0:
            result["validation"] = splits[data.validation_split]
        else:
            if len(train) < 2:
                raise QLoRAGuideError(f"data: {data.path} has {len(train)} training example(s): too few to hold out a validation split")
            parts = train.train_test_split(test_size=data.validation_size, seed=SPLIT_SEED, shuffle=True)
            result["train"], result["validation"] = parts["train"], parts["test"]
    for name, ds in splits.items():  # other splits (test...) pass through; 'validation' means the validation split only
        if name not in (data.train_split, data.validation_split, "validation") and len(ds) > 0:
            result[name] = ds
    for name, ds in result.items():
        detect_format(ds.column_names, fmt, f"{data.path} [{name}]")
    return DatasetDict(result)


def read_splits(path: str) -> dict[str, Dataset]:
    """Read every split of a data source: the bundled set, a local file or folder, or a hub id."""
    if path in BUNDLED_DATASETS:
        folder = BUNDLED_DATASETS[path]
        if not folder.is_dir():
            raise QLoRAGuideError(f"the bundled dataset {path} is missing from this installation ({folder}): reinstall qlora-guide")
        return read_folder(folder)
    local = Path(path).expanduser()
    if local.is_dir():
        return read_folder(local)
    if local.is_file():
        return {"train": read_file(local)}
    if local.suffix.lower() in FILE_SUFFIXES or path.startswith((".", "/", "~")) or path.count("/") > 1:
        raise QLoRAGuideError(f"data file {path} does not exist")
    return read_hub(path)


def read_folder(folder: Path) -> dict[str, Dataset]:
    """One split per file, named by the file (``train.jsonl``, ``validation-00000.parquet``, ``dev.csv``...)."""
    from datasets import concatenate_datasets

    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in FILE_SUFFIXES)
    if not files:
        raise QLoRAGuideError(f"data folder {folder} holds no {'/'.join(FILE_SUFFIXES)} file")
    groups: dict[str, list[Path]] = {}
    for file in files:
        name = file.name.split(".")[0].split("-")[0].lower()
        groups.setdefault(SPLIT_ALIASES.get(name, name), []).append(file)
    if "train" not in groups and len(groups) == 1:  # a single unnamed file is the training split
        groups = {"train": next(iter(groups.values()))}
    return {split: concatenate_datasets([read_file(f) for f in group]) for split, group in groups.items()}


def read_file(path: Path) -> Dataset:
    """Read one data file into a Dataset, with errors that name the file (and line, for JSON Lines)."""
    from datasets import Dataset

    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        rows = _read_jsonl(path)
    elif suffix == ".json":
        rows = _read_json(path)
    elif suffix == ".csv":
        try:
            with open(path, newline="", encoding="utf-8") as f:
                rows = list(csv.DictReader(f))
        except (OSError, UnicodeDecodeError, csv.Error) as err:
            raise QLoRAGuideError(f"data file {path} is not readable CSV: {err}") from None
    elif suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            rows = pq.read_table(path).to_pylist()
        except Exception as err:  # pyarrow raises several unrelated types for damaged files
            raise QLoRAGuideError(f"data file {path} is not readable Parquet: {str(err).splitlines()[0]}") from None
    else:
        raise QLoRAGuideError(f"data file {path}: unsupported type '{suffix}' (use {', '.join(FILE_SUFFIXES)})")
    if not rows:
        raise QLoRAGuideError(f"data file {path} holds no examples")
    bad = next((i for i, row in enumerate(rows) if not isinstance(row, dict)), None)
    if bad is not None:
        raise QLoRAGuideError(f"data file {path}: example {bad + 1} is a {type(rows[bad]).__name__}, not an object with named fields")
    try:
        return Dataset.from_list(rows)
    except Exception as err:  # pyarrow cannot build one column from mixed types
        raise QLoRAGuideError(f"data file {path}: the examples do not share one structure ({str(err).splitlines()[0]})") from None


def _read_text(path: Path) -> str:
    """A data file's text; JSON is UTF-8 by definition (RFC 8259), so any other bytes are a one-line error."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        raise QLoRAGuideError(
            f"data file {path} is not UTF-8 (byte 0x{data[err.start]:02x} on line {line}): save it as UTF-8"
        ) from None


def _read_jsonl(path: Path) -> list[Any]:
    rows = []
    for number, line in enumerate(_read_text(path).split("\n"), start=1):  # not splitlines: JSON strings may hold U+2028
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as err:
            raise QLoRAGuideError(f"data file {path} line {number} is not valid JSON: {err.msg}") from None
    return rows


def _read_json(path: Path) -> list[Any]:
    text = _read_text(path)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        if text.lstrip().startswith("{") and "\n" in text.strip():  # JSON Lines saved as .json
            return _read_jsonl(path)
        raise QLoRAGuideError(f"data file {path} is not valid JSON (line {err.lineno}): {err.msg}") from None
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list):
        raise QLoRAGuideError(f"data file {path} must hold a list of examples (or JSON Lines), not a {type(data).__name__}")
    return data


def read_hub(dataset_id: str) -> dict[str, Dataset]:
    """Load a dataset from the Hugging Face hub (or its local cache when offline)."""
    import datasets

    try:
        loaded = datasets.load_dataset(dataset_id)
    except Exception as err:  # datasets raises many types for 'not found', 'offline', 'bad format'
        first = first_line(err)
        raise QLoRAGuideError(f"data: '{dataset_id}' is not a local file or folder and the hub could not provide it ({first})") from None
    return dict(loaded)


def filter_languages(ds: Dataset, languages: list[str], where: str) -> Dataset:
    """Keep the examples whose ``lang`` field is one of ``languages``."""
    if "lang" not in ds.column_names:
        raise QLoRAGuideError(f"data.languages is set but {where} has no 'lang' column (columns: {', '.join(ds.column_names)})")
    wanted = set(languages)
    keep = [i for i, lang in enumerate(ds["lang"]) if lang in wanted]
    return ds.select(keep)


def detect_format(columns: list[str], fmt: str, where: str) -> str:
    """Return the example format, checking that its columns exist (``auto``: guessed from the columns)."""
    if fmt == "auto":
        for name, needed in FORMAT_COLUMNS.items():
            if all(c in columns for c in needed):
                return name
        expected = "; ".join(f"{name}: {', '.join(cols)}" for name, cols in FORMAT_COLUMNS.items())
        raise QLoRAGuideError(f"data: cannot tell the format of {where} from its columns ({', '.join(columns)}); expected one of {expected}")
    missing = [c for c in FORMAT_COLUMNS[fmt] if c not in columns]
    if missing:
        raise QLoRAGuideError(f"data: format '{fmt}' needs column '{missing[0]}', which {where} does not have (columns: {', '.join(columns)})")
    return fmt


# ---------------------------------------------------------------- conversion


def to_messages(example: dict[str, Any], fmt: str, index: int = 0) -> list[dict[str, str]] | None:
    """Turn one example into chat messages (None for plain ``text`` examples, which have no prompt)."""
    if fmt == "text":
        return None
    if fmt == "preference":
        raise QLoRAGuideError("data: the examples are preference pairs (prompt, chosen, rejected): add a dpo section to the recipe to train on them")
    if fmt == "messages":
        messages = example["messages"]
        if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) and "role" in m and "content" in m for m in messages):
            raise QLoRAGuideError(f"data: example {index + 1} has 'messages' that are not a list of {{role, content}} objects")
        if not any(m["role"] == "assistant" for m in messages):
            raise QLoRAGuideError(f"data: example {index + 1} has no assistant message to learn from")
        return [{"role": m["role"], "content": str(m["content"])} for m in messages]
    if fmt == "alpaca":
        prompt, answer = example.get("instruction"), example.get("output")
        if example.get("input"):
            prompt = f"{prompt}\n\n{example['input']}"
    else:
        prompt, answer = example.get("prompt"), example.get("completion")
    if prompt is None or answer is None:
        raise QLoRAGuideError(f"data: example {index + 1} has an empty {'instruction/output' if fmt == 'alpaca' else 'prompt/completion'}")
    return [{"role": "user", "content": str(prompt)}, {"role": "assistant", "content": str(answer)}]


def ensure_chat_template(tokenizer: Any) -> None:
    """Give a tokenizer without a chat template a simple one (Question/Answer), and say so."""
    if getattr(tokenizer, "chat_template", None):
        return
    log.warning("%s has no chat template: using a plain '### Question / ### Answer' template", tokenizer.name_or_path)
    tokenizer.chat_template = FALLBACK_CHAT_TEMPLATE


def answer_spans(messages: list[dict[str, str]], tokenizer: Any) -> tuple[str, list[tuple[int, int]]] | None:
    """Render a conversation and return it with the character span of each assistant answer.

    For each assistant message, the conversation up to it is rendered with
    ``add_generation_prompt=True`` (the prompt) and then including it; the
    answer is the difference. That only works when each rendering is a prefix
    of the next; ``None`` says the template does not behave that way.
    """
    render = tokenizer.apply_chat_template
    full = render(messages, tokenize=False)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = render(messages[:i], tokenize=False, add_generation_prompt=True) if i else ""
        upto = render(messages[: i + 1], tokenize=False)
        if not (upto.startswith(prompt) and full.startswith(upto)):
            return None
        spans.append((len(prompt), len(upto)))
    return full, spans


def encode_messages(messages: list[dict[str, str]], tokenizer: Any, train_on_prompt: bool = False) -> tuple[list[int], list[int]]:
    """Token ids and labels of one conversation: labels are -100 outside the assistant answers."""
    rendered = answer_spans(messages, tokenizer)
    if rendered is None or not getattr(tokenizer, "is_fast", False):  # character offsets need a fast tokenizer
        return _encode_by_common_prefix(messages, tokenizer, train_on_prompt)
    full, spans = rendered
    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    ids = enc["input_ids"]
    if train_on_prompt:
        return ids, list(ids)
    labels = [IGNORE_INDEX] * len(ids)
    for t, (start, _end) in enumerate(enc["offset_mapping"]):
        if any(a <= start < b for a, b in spans):
            labels[t] = ids[t]
    return ids, labels


_warned_templates: set[str] = set()


def _encode_by_common_prefix(messages: list[dict[str, str]], tokenizer: Any, train_on_prompt: bool) -> tuple[list[int], list[int]]:
    """Fallback for templates whose prompt rendering is not a prefix of the full one.

    The tokens shared by the rendered prompt (everything before the last answer)
    and the full conversation are masked; everything after them is the answer.
    """
    name = str(tokenizer.name_or_path)
    key = f"{name}:{hash(tokenizer.chat_template)}"
    if key not in _warned_templates:  # once per tokenizer and template
        _warned_templates.add(key)
        why = "is a slow tokenizer (no character offsets)" if not getattr(tokenizer, "is_fast", False) else \
            "has a chat template that does not render the prompt as a prefix of the conversation"
        log.warning("%s %s: masking the longest common token prefix instead (only the last answer is learnt)", name, why)
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    ids = list(tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"])
    prompt = list(tokenizer.apply_chat_template(messages[:last], tokenize=True, add_generation_prompt=True, return_dict=True)["input_ids"]) if last else []
    common = 0
    while common < min(len(ids), len(prompt)) and ids[common] == prompt[common]:
        common += 1
    if train_on_prompt:
        return ids, list(ids)
    return ids, [IGNORE_INDEX] * common + ids[common:]


def encode_text(text: str, tokenizer: Any) -> tuple[list[int], list[int]]:
    """Token ids of a plain text example (with BOS when the model uses one, and EOS): every token is learnt."""
    ids = list(tokenizer(text, add_special_tokens=True)["input_ids"])
    if tokenizer.eos_token_id is not None and (not ids or ids[-1] != tokenizer.eos_token_id):
        ids.append(tokenizer.eos_token_id)
    return ids, list(ids)


# ---------------------------------------------------------------- tokenizing


@dataclass
class TokenStats:
    """What tokenization produced: sizes, truncation and padding, reported before training."""

    examples: int = 0  # examples kept
    sequences: int = 0  # rows fed to the model (fewer than examples when packed)
    tokens: int = 0  # non-padding tokens
    answer_tokens: int = 0  # tokens that carry a loss
    truncated: int = 0  # examples cut at max_length
    dropped: int = 0  # examples with no answer token left after truncation
    longest: int = 0  # longest example before truncation, in tokens
    padding_fraction: float = 0.0  # share of padding when rows are batched in order
    packed: bool = False
    fingerprint: str = ""  # sha256 of the token ids and labels

    def summary(self) -> str:
        """One line for the log."""
        rows = f"{self.sequences} packed rows" if self.packed else f"{self.sequences} rows"
        return (f"{self.examples} examples -> {rows}, {self.tokens} tokens ({self.answer_tokens} with a loss), "
                f"{self.truncated} truncated, {self.dropped} dropped, padding {self.padding_fraction:.1%}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def tokenize(dataset: Dataset, tokenizer: Any, data: DataConfig, batch_size: int = 1, where: str = "train") -> tuple[Dataset, TokenStats]:
    """Tokenize a split: ``input_ids`` and ``labels`` per example (packed into rows when ``data.packing``).

    Examples longer than ``data.max_length`` are truncated and counted; an example
    left without any answer token is dropped (and counted). If every example is
    truncated, or nothing is left to learn from, this is an error: the
    max_length is too small for the data.
    """
    from datasets import Dataset

    if len(dataset) == 0:
        raise QLoRAGuideError(f"data: the {where} split is empty")
    fmt = detect_format(dataset.column_names, data.format, f"{data.path} [{where}]")
    if fmt != "text":
        ensure_chat_template(tokenizer)
    stats = TokenStats(packed=data.packing)
    rows: list[dict[str, list[int]]] = []
    for index, example in enumerate(dataset):
        messages = to_messages(example, fmt, index)
        if messages is None:
            if not isinstance(example["text"], str) or not example["text"].strip():
                raise QLoRAGuideError(f"data: example {index + 1} of the {where} split has an empty 'text'")
            ids, labels = encode_text(example["text"], tokenizer)
        else:
            ids, labels = encode_messages(messages, tokenizer, data.train_on_prompt)
        stats.longest = max(stats.longest, len(ids))
        if len(ids) > data.max_length:
            stats.truncated += 1
            ids, labels = ids[: data.max_length], labels[: data.max_length]
        labels[0] = IGNORE_INDEX  # nothing predicts the first token (the loss shifts labels by one)
        if all(label == IGNORE_INDEX for label in labels):
            stats.dropped += 1
            continue
        rows.append({"input_ids": ids, "labels": labels})
    if stats.truncated == len(dataset) or not rows:
        raise QLoRAGuideError(
            f"data: all {len(dataset)} {where} examples are longer than data.max_length={data.max_length} "
            f"(the longest has {stats.longest} tokens): raise data.max_length"
        )
    stats.examples = len(rows)
    stats.tokens = sum(len(r["input_ids"]) for r in rows)
    stats.answer_tokens = sum(sum(label != IGNORE_INDEX for label in r["labels"]) for r in rows)
    stats.fingerprint = fingerprint(rows)
    if data.packing:
        rows = pack(rows, data.max_length)
    stats.sequences = len(rows)
    stats.padding_fraction = padding_fraction([len(r["input_ids"]) for r in rows], batch_size)
    if stats.truncated:
        log.warning("%s: %d of %d examples are longer than data.max_length=%d and were truncated (longest: %d tokens)",
                    where, stats.truncated, len(dataset), data.max_length, stats.longest)
    columns = {key: [r[key] for r in rows] for key in rows[0]}
    return Dataset.from_dict(columns), stats


def fingerprint(rows: list[dict[str, list[int]]]) -> str:
    """sha256 of the token ids and labels, in order: two runs trained on the same tokens share it."""
    digest = hashlib.sha256()
    for row in rows:
        digest.update(json.dumps([row["input_ids"], row["labels"]], separators=(",", ":")).encode())
    return digest.hexdigest()


def padding_fraction(lengths: list[int], batch_size: int) -> float:
    """Share of padding when rows are batched in order and each batch is padded to its longest row."""
    padded = sum(max(lengths[i : i + batch_size]) * len(lengths[i : i + batch_size]) for i in range(0, len(lengths), batch_size))
    return 1 - sum(lengths) / padded if padded else 0.0


# ---------------------------------------------------------------- packing


def pack(rows: list[dict[str, list[int]]], max_length: int) -> list[dict[str, list[int]]]:
    """Concatenate examples into rows of at most ``max_length`` tokens (best-fit decreasing).

    Each packed row has ``position_ids`` that restart at 0 for every example:
    that is how the attention kernels know where one example ends. The first
    label of every example is -100, so no example learns to predict the first
    token of the next one.
    """
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i]["input_ids"]))
    bins: list[list[int]] = []  # example indices per packed row
    free: list[tuple[int, int]] = []  # (free space, bin index), sorted
    for i in order:
        size = len(rows[i]["input_ids"])
        slot = bisect.bisect_left(free, (size, -1))
        if slot < len(free):
            space, b = free.pop(slot)
        else:
            space, b = max_length, len(bins)
            bins.append([])
        bins[b].append(i)
        if space - size > 0:
            bisect.insort(free, (space - size, b))
    packed = []
    for members in bins:
        ids, labels, positions = [], [], []
        for i in members:
            ids += rows[i]["input_ids"]
            labels += [IGNORE_INDEX] + rows[i]["labels"][1:]
            positions += list(range(len(rows[i]["input_ids"])))
        packed.append({"input_ids": ids, "labels": labels, "position_ids": positions})
    return packed


@dataclass
class Collator:
    """Pad a list of rows into a batch (right padding), for packed or unpacked rows.

    Unpacked rows get an ``attention_mask`` (0 on padding). Packed rows get
    ``position_ids`` and no attention mask, which is what makes transformers
    build a block-diagonal mask; the padding at the end of a row is one more
    block, so no real token attends to it. Labels are -100 on padding by
    position, not by token id: with SmolLM2 the pad token is the end-of-turn
    token, and the one closing each answer keeps its label.

    ``real_tokens`` and ``padded_tokens`` count what went through. Each batch's
    own (real, padding) pair also waits in ``batch_counts`` until the trainer
    takes it with :meth:`take` when it trains on that batch: data loaders fetch
    ahead, so what was collated is not what was trained on.
    """

    pad_token_id: int
    pad_to_multiple_of: int | None = None
    real_tokens: int = field(default=0, init=False)
    padded_tokens: int = field(default=0, init=False)
    batch_counts: collections.deque = field(default_factory=collections.deque, init=False, repr=False)

    def take(self) -> tuple[int, int]:
        """(real, padding) tokens of the oldest batch not yet taken."""
        return self.batch_counts.popleft()

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        import torch

        packed = "position_ids" in features[0]
        longest = max(len(f["input_ids"]) for f in features)
        if self.pad_to_multiple_of:
            longest = -(-longest // self.pad_to_multiple_of) * self.pad_to_multiple_of
        batch: dict[str, list[list[int]]] = {"input_ids": [], "labels": [], "position_ids" if packed else "attention_mask": []}
        for f in features:
            n, pad = len(f["input_ids"]), longest - len(f["input_ids"])
            batch["input_ids"].append(list(f["input_ids"]) + [self.pad_token_id] * pad)
            batch["labels"].append(list(f["labels"]) + [IGNORE_INDEX] * pad)
            if packed:
                batch["position_ids"].append(list(f["position_ids"]) + list(range(pad)))
            else:
                batch["attention_mask"].append([1] * n + [0] * pad)
        real = sum(len(f["input_ids"]) for f in features)
        padding = longest * len(features) - real
        self.real_tokens += real
        self.padded_tokens += padding
        self.batch_counts.append((real, padding))
        out: dict[str, Any] = {key: torch.tensor(value, dtype=torch.long) for key, value in batch.items()}
        if packed:
            out["use_cache"] = False  # with a KV cache, transformers ignores the packed position_ids
        return out


def packing_leak(model: Any, tokenizer: Any, examples: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """How far packing moves each example's logits from those it gets alone (largest absolute difference).

    The examples are packed into one row by :func:`pack` and batched by :class:`Collator`, as training does, so
    that the row's ``position_ids`` restart at every example; the same row is also run as one plain
    concatenation, where each example attends to the ones before it.
    """
    import torch

    rows = []
    for index, example in enumerate(examples):
        ids, labels = encode_messages(to_messages(example, detect_format(list(example), "auto", "examples"), index), tokenizer)
        rows.append({"input_ids": ids, "labels": labels})
    [packed] = pack(rows, sum(len(r["input_ids"]) for r in rows))
    batch = Collator(tokenizer.pad_token_id)([packed])  # the batch training feeds the model
    ids, positions = batch["input_ids"], packed["position_ids"]
    starts = [k for k, p in enumerate(positions) if p == 0] + [len(positions)]
    with torch.no_grad():
        with_positions = model(**{k: v for k, v in batch.items() if k != "labels"}).logits[0]
        concatenated = model(input_ids=ids, use_cache=False).logits[0]
        found = []
        for number, (a, b) in enumerate(zip(starts, starts[1:], strict=False), 1):
            alone = model(input_ids=ids[:, a:b], use_cache=False).logits[0]
            found.append({"example in the row": number, "tokens": b - a,
                          "packed with position_ids": float((with_positions[a:b] - alone).abs().max()),
                          "concatenated": float((concatenated[a:b] - alone).abs().max())})
    return found


# ---------------------------------------------------------------- all together


@dataclass
class PreparedData:
    """Tokenized train and validation splits, their statistics and the collator."""

    train: Dataset
    validation: Dataset | None
    train_stats: TokenStats
    validation_stats: TokenStats | None
    collator: Collator
    data_format: str


def prepare_data(data: DataConfig, tokenizer: Any, batch_size: int = 1, splits: DatasetDict | None = None) -> PreparedData:
    """Load (unless ``splits`` are given, from :func:`load_examples`) and tokenize the training and validation
    splits of ``data`` for ``tokenizer``."""
    splits = splits if splits is not None else load_examples(data)
    fmt = detect_format(splits["train"].column_names, data.format, data.path)
    train, train_stats = tokenize(splits["train"], tokenizer, data, batch_size, where="train")
    validation, validation_stats = None, None
    if "validation" in splits:
        validation, validation_stats = tokenize(splits["validation"], tokenizer, data, batch_size, where="validation")
    log.info("train: %s", train_stats.summary())
    if validation_stats:
        log.info("validation: %s", validation_stats.summary())
    return PreparedData(train, validation, train_stats, validation_stats, Collator(tokenizer.pad_token_id), fmt)
