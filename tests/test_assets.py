"""Checks on the bilingual QLoRA FAQ dataset shipped in ``qlora_guide/assets/qlora_faq``.

Each test guards against a mistake that would silently spoil a fine-tuning run
or its evaluation: a malformed line, a mislabelled language, an English/French
pair split across train and test (leakage), answers too long for CPU training,
or a dataset card whose figures no longer match the files.
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter, defaultdict
from importlib.resources import files
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

SPLITS = ("train", "validation", "test")
LANGS = {"en", "fr"}
TOPICS = {
    "quantization",
    "nf4",
    "double_quantization",
    "lora",
    "qlora",
    "paged_optimizers",
    "training",
    "evaluation",
    "deployment",
    "memory",
    "hardware",
}
FIELDS = ["id", "pair_id", "lang", "topic", "messages"]
DATA_DIR = Path(str(files("qlora_guide.assets") / "qlora_faq"))

# A few frequent function words that exist in one language and not in the other.
MARKERS = {
    "en": {"the", "is", "of", "and", "to", "with", "are", "it"},
    "fr": {"le", "la", "les", "des", "est", "et", "du", "une", "pour", "avec"},
}


def read_split(split: str) -> list[dict]:
    """Parse one split line by line, naming the line that fails."""
    path = DATA_DIR / f"{split}.jsonl"
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").split("\n"), start=1):
        if line == "":
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as error:
            pytest.fail(f"{path.name}:{number} is not valid JSON: {error}")
    return rows


@pytest.fixture(scope="module")
def data() -> dict[str, list[dict]]:
    return {split: read_split(split) for split in SPLITS}


def question(row: dict) -> str:
    return row["messages"][0]["content"]


def answer(row: dict) -> str:
    return row["messages"][-1]["content"]


def normalise(text: str) -> str:
    """Case- and spacing-insensitive form, so near-identical questions count as duplicates."""
    return re.sub(r"[\s?!.:;]+", " ", text.casefold()).strip()


def prose(text: str) -> str:
    """The text with inline code spans replaced, so code is left out of typography checks."""
    return re.sub(r"`[^`]*`", "CODE", text)


def test_files_end_with_one_newline_and_have_no_blank_lines():
    for split in SPLITS:
        text = (DATA_DIR / f"{split}.jsonl").read_text(encoding="utf-8")
        assert text.endswith("\n") and not text.endswith("\n\n"), split
        assert "\n\n" not in text, f"{split}.jsonl has a blank line"
        assert "\r" not in text, f"{split}.jsonl has Windows line endings"


def test_every_record_has_the_exact_schema(data):
    for split, rows in data.items():
        for row in rows:
            where = f"{split}:{row.get('id')}"
            assert list(row) == FIELDS, where
            assert row["lang"] in LANGS, where
            assert row["topic"] in TOPICS, where
            assert re.fullmatch(r"\d{4}", row["pair_id"]), where
            assert row["id"] == f"{row['lang']}-{row['pair_id']}", where
            assert isinstance(row["messages"], list) and row["messages"], where
            for message in row["messages"]:
                assert list(message) == ["role", "content"], where
                assert isinstance(message["content"], str), where


def test_roles_alternate_from_user_to_assistant_and_no_content_is_empty(data):
    for split, rows in data.items():
        for row in rows:
            roles = [m["role"] for m in row["messages"]]
            expected = ["user", "assistant"] * (len(roles) // 2)
            assert roles == expected and roles, f"{split}:{row['id']} has roles {roles}"
            for message in row["messages"]:
                content = message["content"]
                assert content.strip(), f"{split}:{row['id']} has an empty {message['role']} message"
                assert content == content.strip(), f"{split}:{row['id']} has leading or trailing spaces"
                assert "  " not in content, f"{split}:{row['id']} has a double space"


def test_counts_and_split_sizes(data):
    sizes = {split: len(rows) for split, rows in data.items()}
    pairs = {split: len({r["pair_id"] for r in rows}) for split, rows in data.items()}
    assert sum(sizes.values()) >= 300, sizes
    assert sum(pairs.values()) >= 200, pairs
    assert all(sizes[split] > 0 for split in SPLITS), sizes
    total = sum(pairs.values())
    assert 0.7 <= pairs["train"] / total <= 0.9, pairs  # about 80/10/10
    assert 0.05 <= pairs["validation"] / total <= 0.15, pairs
    assert 0.05 <= pairs["test"] / total <= 0.15, pairs


def test_every_split_has_both_languages_and_every_topic(data):
    for split, rows in data.items():
        assert {r["lang"] for r in rows} == LANGS, split
        assert {r["topic"] for r in rows} == TOPICS, split
        counts = Counter(r["lang"] for r in rows)
        assert counts["en"] == counts["fr"], f"{split} is unbalanced: {counts}"


def test_each_pair_is_one_english_and_one_french_example_on_the_same_topic(data):
    members = defaultdict(list)
    for split, rows in data.items():
        for row in rows:
            members[row["pair_id"]].append((split, row))
    for pair_id, group in members.items():
        assert sorted(row["lang"] for _, row in group) == ["en", "fr"], pair_id
        assert len({row["topic"] for _, row in group}) == 1, pair_id
        en, fr = sorted((row for _, row in group), key=lambda r: r["lang"])
        assert question(en) != question(fr) and answer(en) != answer(fr), f"{pair_id} is not translated"


def test_no_pair_and_no_question_appears_in_two_splits(data):
    pair_ids = {split: {r["pair_id"] for r in rows} for split, rows in data.items()}
    questions = {split: {normalise(question(r)) for r in rows} for split, rows in data.items()}
    for i, a in enumerate(SPLITS):
        for b in SPLITS[i + 1 :]:
            assert not pair_ids[a] & pair_ids[b], (
                f"pairs in both {a} and {b}: {sorted(pair_ids[a] & pair_ids[b])}"
            )
            assert not questions[a] & questions[b], (
                f"questions in both {a} and {b}: {questions[a] & questions[b]}"
            )


def test_no_duplicate_question_or_answer(data):
    rows = [row for split in SPLITS for row in data[split]]
    for name, get in (("question", question), ("answer", answer)):
        counts = Counter(normalise(get(row)) for row in rows)
        duplicates = [text for text, n in counts.items() if n > 1]
        assert not duplicates, f"duplicate {name}s: {duplicates[:3]}"
    ids = Counter(row["id"] for row in rows)
    assert max(ids.values()) == 1, [i for i, n in ids.items() if n > 1]


def test_language_labels_match_the_text(data):
    for split, rows in data.items():
        for row in rows:
            words = re.findall(r"[a-zà-ÿ]+", answer(row).casefold())
            own = sum(w in MARKERS[row["lang"]] for w in words)
            other = sum(w in MARKERS[({"en", "fr"} - {row["lang"]}).pop()] for w in words)
            assert own > other, f"{split}:{row['id']} does not read as {row['lang']}: {answer(row)[:80]}"


def test_typography_is_consistent_in_each_language(data):
    """English: no space before ? ! : ;  French: a plain space before them (no non-breaking spaces)."""
    for split, rows in data.items():
        for row in rows:
            for message in row["messages"]:
                text = prose(message["content"])
                where = f"{split}:{row['id']}: {message['content'][:60]}"
                assert "\u00a0" not in text and "\u202f" not in text, where
                if row["lang"] == "en":
                    assert not re.search(r"\s[?!:;]", text), where
                else:
                    assert not re.search(r"\S[?!:;]", text), where
            assert question(row).endswith("?"), f"{split}:{row['id']} question does not end with '?'"


def test_answers_are_short_enough_for_cpu_training(data):
    lengths = [len(answer(row).split()) for split in SPLITS for row in data[split]]
    assert max(lengths) <= 80, max(lengths)
    assert sum(n <= 60 for n in lengths) >= 0.9 * len(lengths)


def test_dataset_card_matches_the_files(data):
    card = (DATA_DIR / "README.md").read_text(encoding="utf-8")
    for split, rows in data.items():
        pairs = len({r["pair_id"] for r in rows})
        row_pattern = rf"\|\s*`?{split}`?\s*\|\s*{pairs}\s*\|\s*{len(rows)}\s*\|"
        assert re.search(row_pattern, card), (
            f"the card's row for {split} should read {pairs} pairs, {len(rows)} examples"
        )
    assert "CC-BY-4.0" in card


def test_load_dataset_json_gives_the_three_splits(data, tmp_path):
    datasets = pytest.importorskip("datasets")
    data_files = {split: str(DATA_DIR / f"{split}.jsonl") for split in SPLITS}
    loaded = datasets.load_dataset("json", data_files=data_files, cache_dir=str(tmp_path))
    assert set(loaded) == set(SPLITS)
    for split in SPLITS:
        assert loaded[split].column_names == FIELDS, split
        assert loaded[split].num_rows == len(data[split]), split
        assert loaded[split][0]["messages"] == data[split][0]["messages"], split


# ---------------------------------------------------------------- the preference pairs (qlora_prefs)

PREFS_DIR = Path(str(files("qlora_guide.assets") / "qlora_prefs"))
PREF_FIELDS = ["id", "pair_id", "lang", "topic", "rejection", "prompt", "chosen", "rejected"]


def test_preference_pairs_are_well_formed_bilingual_and_do_not_leak():
    """Every pair has one English and one French version in one split, one user prompt and two different
    non-empty assistant answers of similar length (a model must not win on length alone)."""
    seen: dict[str, str] = {}
    sizes = {}
    for split in SPLITS:
        rows = [json.loads(line) for line in (PREFS_DIR / f"{split}.jsonl").read_text(encoding="utf-8").splitlines()]
        sizes[split] = len(rows)
        by_pair = defaultdict(list)
        for row in rows:
            assert list(row) == PREF_FIELDS, row["id"]
            assert row["lang"] in LANGS and row["topic"] in TOPICS and row["rejection"] in ("wrong", "unhelpful"), row["id"]
            assert [m["role"] for m in row["prompt"]] == ["user"], row["id"]
            chosen, rejected = row["chosen"][0]["content"], row["rejected"][0]["content"]
            assert chosen.strip() and rejected.strip() and chosen != rejected, row["id"]
            assert 0.5 < len(chosen) / len(rejected) < 2, row["id"]
            assert seen.setdefault(row["pair_id"], split) == split, f"pair {row['pair_id']} is in two splits"
            by_pair[row["pair_id"]].append(row["lang"])
        assert all(sorted(langs) == ["en", "fr"] for langs in by_pair.values()), split
    assert sizes == {"train": 80, "validation": 16, "test": 24}
    card = (PREFS_DIR / "README.md").read_text(encoding="utf-8")
    for split, n in sizes.items():
        assert re.search(rf"`{split}`\s*\|\s*{n // 2}\s*\|\s*{n}", card), f"the card's {split} row does not match the files"
