"""Data pipeline: loading, formats, answer-only labels, truncation, packing, collation, bad input."""

from __future__ import annotations

import csv
import json
from collections import Counter

import pytest
from conftest import chat_rows, write_jsonl

from qlora_guide.config import DataConfig
from qlora_guide.data import (
    IGNORE_INDEX,
    Collator,
    encode_messages,
    load_examples,
    pack,
    padding_fraction,
    prepare_data,
    tokenize,
)
from qlora_guide.errors import QLoRAGuideError

QA = [{"role": "user", "content": "What does NF4 stand for?"}, {"role": "assistant", "content": "NormalFloat 4: a 4-bit data type."}]


@pytest.fixture
def fresh_tokenizer(embedded_model):
    """A tokenizer the test may modify."""
    from qlora_guide.models import load_tokenizer

    return load_tokenizer(str(embedded_model))


# ---------------------------------------------------------------- loading


def test_bundled_dataset_has_three_bilingual_splits():
    ds = load_examples(DataConfig(path="qlora-faq"))
    assert {"train", "validation", "test"} <= set(ds)
    assert set(ds["train"]["lang"]) == {"en", "fr"}
    assert len(ds["train"]) > len(ds["validation"]) > 0
    french = load_examples(DataConfig(path="qlora-faq", languages=["fr"]))
    assert set(french["train"]["lang"]) == {"fr"} and set(french["validation"]["lang"]) == {"fr"}
    assert 0 < len(french["train"]) < len(ds["train"])


def test_validation_split_is_made_with_a_fixed_seed(tiny_jsonl):
    a = load_examples(DataConfig(path=str(tiny_jsonl), validation_size=0.25))
    b = load_examples(DataConfig(path=str(tiny_jsonl), validation_size=0.25))
    assert len(a["validation"]) == 8 and len(a["train"]) == 24
    assert a["validation"]["id"] == b["validation"]["id"]
    assert not set(a["validation"]["id"]) & set(a["train"]["id"])
    assert "validation" not in load_examples(DataConfig(path=str(tiny_jsonl), validation_split=None))


def test_a_folder_gives_one_split_per_file(tmp_path):
    rows = chat_rows()
    write_jsonl(tmp_path / "d" / "train.jsonl", rows[:20])
    write_jsonl(tmp_path / "d" / "dev.jsonl", rows[20:])
    ds = load_examples(DataConfig(path=str(tmp_path / "d")))
    assert (len(ds["train"]), len(ds["validation"])) == (20, 12)


@pytest.mark.parametrize("fmt", ["alpaca", "prompt_completion", "text", "messages"])
def test_formats_are_detected(tmp_path, tokenizer, fmt):
    q, a = "Why packing?", "To waste no compute on padding."
    row = {
        "alpaca": {"instruction": q, "input": "", "output": a},
        "prompt_completion": {"prompt": q, "completion": a},
        "text": {"text": f"{q} {a}"},
        "messages": {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]},
    }[fmt]
    path = write_jsonl(tmp_path / "x.jsonl", [row] * 6)
    data = DataConfig(path=str(path), packing=False)
    ds = load_examples(data)
    tokenized, stats = tokenize(ds["train"], tokenizer, data)
    ids, labels = tokenized[0]["input_ids"], tokenized[0]["labels"]
    learnt = tokenizer.decode([t for t, label in zip(ids, labels, strict=True) if label != IGNORE_INDEX])
    assert a in learnt
    if fmt == "text":
        assert "packing?" in learnt  # plain text has no prompt: every token but the first is learnt
    else:
        assert q not in learnt and tokenizer.decode(ids).count("<|im_start|>assistant") == 1


def test_csv_and_parquet_files(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"prompt": f"question {i}", "completion": f"answer {i}"} for i in range(10)]
    with open(tmp_path / "d.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["prompt", "completion"])
        writer.writeheader()
        writer.writerows(rows)
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    for name in ("d.csv", "d.parquet"):
        ds = load_examples(DataConfig(path=str(tmp_path / name)))
        assert len(ds["train"]) + len(ds["validation"]) == 10
        assert set(ds["train"].column_names) == {"prompt", "completion"}


# ---------------------------------------------------------------- masking


def test_labels_cover_exactly_the_answer_and_its_end_of_turn_token(tokenizer):
    ids, labels = encode_messages(QA, tokenizer)
    prompt = tokenizer.apply_chat_template(QA[:1], tokenize=False, add_generation_prompt=True)
    n_prompt = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    assert tokenizer.decode(ids[:n_prompt]) == prompt
    assert all(label == IGNORE_INDEX for label in labels[:n_prompt])  # no loss on the prompt
    assert labels[n_prompt:] == ids[n_prompt:]
    assert tokenizer.decode(labels[n_prompt:]) == QA[1]["content"] + "<|im_end|>\n"
    # SmolLM2's pad token is its end-of-turn token: the one closing the answer must keep its label
    assert tokenizer.pad_token_id == tokenizer.eos_token_id
    assert tokenizer.pad_token_id in labels[n_prompt:]


def test_train_on_prompt_learns_every_token(tokenizer):
    ids, labels = encode_messages(QA, tokenizer, train_on_prompt=True)
    assert labels == ids


def test_multi_turn_conversations_learn_every_assistant_turn(tokenizer):
    messages = QA + [{"role": "user", "content": "And FP4?"}, {"role": "assistant", "content": "A 4-bit float."}]
    ids, labels = encode_messages(messages, tokenizer)
    learnt = tokenizer.decode([t for t, label in zip(ids, labels, strict=True) if label != IGNORE_INDEX])
    assert learnt == QA[1]["content"] + "<|im_end|>\n" + "A 4-bit float.<|im_end|>\n"


def test_model_without_chat_template_gets_a_plain_one(fresh_tokenizer):
    fresh_tokenizer.chat_template = None
    path_rows = [{"messages": QA}] * 4
    from datasets import Dataset

    ds = Dataset.from_list(path_rows)
    tokenized, _ = tokenize(ds, fresh_tokenizer, DataConfig(packing=False))
    ids, labels = tokenized[0]["input_ids"], tokenized[0]["labels"]
    assert "### Question:" in fresh_tokenizer.decode(ids)
    assert fresh_tokenizer.decode([t for t, lab in zip(ids, labels, strict=True) if lab != IGNORE_INDEX]) == QA[1]["content"] + "<|im_end|>"
    assert fresh_tokenizer.chat_template  # saved with the adapter, so inference uses the same format


def test_template_that_is_not_prefix_stable_falls_back_to_the_common_prefix(fresh_tokenizer, caplog):
    # Like templates that add an empty reasoning block to the generation prompt only.
    fresh_tokenizer.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n<think></think>\n{% endif %}"
    )
    ids, labels = encode_messages(QA, fresh_tokenizer)
    learnt = fresh_tokenizer.decode([t for t, lab in zip(ids, labels, strict=True) if lab != IGNORE_INDEX])
    assert QA[0]["content"] not in learnt and QA[1]["content"] in learnt
    assert "longest common token prefix" in caplog.text


# ---------------------------------------------------------------- truncation and packing


def test_truncation_is_counted_and_all_truncated_is_an_error(tmp_path, tokenizer):
    long = {"messages": [QA[0], {"role": "assistant", "content": "very long answer " * 40}]}
    path = write_jsonl(tmp_path / "t.jsonl", [long] + chat_rows(1)[:5])
    data = DataConfig(path=str(path), max_length=128, packing=False, validation_split=None)
    tokenized, stats = tokenize(load_examples(data)["train"], tokenizer, data)
    assert stats.truncated == 1 and stats.examples == 6 and stats.longest > 128
    assert max(len(x) for x in tokenized["input_ids"]) == 128
    only_long = write_jsonl(tmp_path / "l.jsonl", [long] * 3)
    data = DataConfig(path=str(only_long), max_length=64, validation_split=None)
    with pytest.raises(QLoRAGuideError, match=r"all 3 train examples are longer than data\.max_length=64"):
        tokenize(load_examples(data)["train"], tokenizer, data)


def test_packing_keeps_every_example_and_restarts_positions(tiny_jsonl, tokenizer):
    data = DataConfig(path=str(tiny_jsonl), max_length=256, validation_split=None)
    plain, plain_stats = tokenize(load_examples(data)["train"], tokenizer, DataConfig(**{**data.__dict__, "packing": False}))
    packed, stats = tokenize(load_examples(data)["train"], tokenizer, data)
    assert stats.sequences < stats.examples == plain_stats.examples == 32
    assert stats.tokens == plain_stats.tokens and stats.answer_tokens == plain_stats.answer_tokens
    assert stats.fingerprint == plain_stats.fingerprint  # same tokens, whatever the packing
    segments = []
    for row in packed:
        assert len(row["input_ids"]) <= 256
        starts = [i for i, p in enumerate(row["position_ids"]) if p == 0]
        for start, end in zip(starts, starts[1:] + [len(row["input_ids"])], strict=True):
            assert row["position_ids"][start:end] == list(range(end - start))
            assert row["labels"][start] == IGNORE_INDEX  # no example learns its neighbour's first token
            segments.append(tuple(row["input_ids"][start:end]))
    assert Counter(segments) == Counter(tuple(x) for x in plain["input_ids"])


def test_best_fit_packing_fills_rows():
    rows = [{"input_ids": [1] * n, "labels": [1] * n} for n in (60, 50, 40, 30, 20, 10, 90, 100)]
    packed = pack(rows, 100)
    assert sorted(len(r["input_ids"]) for r in packed) == [100, 100, 100, 100]
    assert padding_fraction([100, 50], 2) == pytest.approx(0.25)


def test_collator_pads_right_and_masks_padding_by_position(tokenizer):
    collator = Collator(pad_token_id=tokenizer.pad_token_id)
    short = {"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}
    long = {"input_ids": [5, 6, 7, 8, 2], "labels": [-100, 6, 7, 8, 2]}
    batch = collator([short, long])
    assert batch["input_ids"].tolist() == [[5, 6, 7, 2, 2], [5, 6, 7, 8, 2]]
    assert batch["labels"].tolist() == [[-100, 6, 7, -100, -100], [-100, 6, 7, 8, 2]]  # the real eos keeps its label
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1] * 5]
    assert "position_ids" not in batch
    packed = collator([{**short, "position_ids": [0, 1, 0]}, {**long, "position_ids": [0, 1, 2, 0, 1]}])
    assert "attention_mask" not in packed and packed["use_cache"] is False
    assert packed["position_ids"].tolist() == [[0, 1, 0, 0, 1], [0, 1, 2, 0, 1]]  # padding is a block of its own
    assert (collator.real_tokens, collator.padded_tokens) == (16, 4)
    assert [collator.take(), collator.take()] == [(8, 2), (8, 2)]  # each batch's counts, in the order collated


def test_prepare_data_on_the_bundled_dataset(tokenizer):
    prepared = prepare_data(DataConfig(max_length=256), tokenizer, batch_size=4)
    assert prepared.train_stats.truncated == 0 and prepared.data_format == "messages"
    assert prepared.train_stats.padding_fraction < 0.05  # packed rows are nearly full
    assert prepared.validation_stats.examples == len(load_examples(DataConfig())["validation"])


# ---------------------------------------------------------------- bad input


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(QLoRAGuideError, match=r"data file .*nope\.jsonl does not exist"):
        load_examples(DataConfig(path=str(tmp_path / "nope.jsonl")))
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "fine"}) + "\n{not json\n")
    with pytest.raises(QLoRAGuideError, match=r"bad\.jsonl line 2 is not valid JSON"):
        load_examples(DataConfig(path=str(bad)))
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(QLoRAGuideError, match="holds no examples"):
        load_examples(DataConfig(path=str(tmp_path / "empty.jsonl")))
    (tmp_path / "list.json").write_text("[1, 2]")
    with pytest.raises(QLoRAGuideError, match="example 1 is a int, not an object"):
        load_examples(DataConfig(path=str(tmp_path / "list.json")))
    (tmp_path / "broken.parquet").write_bytes(b"not parquet")
    with pytest.raises(QLoRAGuideError, match="not readable Parquet"):
        load_examples(DataConfig(path=str(tmp_path / "broken.parquet")))


def test_missing_columns_are_named(tmp_path):
    path = write_jsonl(tmp_path / "q.jsonl", [{"question": "a", "answer": "b"}] * 4)
    with pytest.raises(QLoRAGuideError, match=r"cannot tell the format .* from its columns \(question, answer\)"):
        load_examples(DataConfig(path=str(path)))
    with pytest.raises(QLoRAGuideError, match=r"format 'alpaca' needs column 'instruction'"):
        load_examples(DataConfig(path=str(path), format="alpaca"))


def test_nothing_left_after_the_language_filter(tiny_jsonl):
    with pytest.raises(QLoRAGuideError, match=r"no training example with data.languages=\['de'\]"):
        load_examples(DataConfig(path=str(tiny_jsonl), languages=["de"]))


def test_hub_dataset_offline_is_one_line():
    with pytest.raises(QLoRAGuideError) as err:
        load_examples(DataConfig(path="someone/some-dataset"))
    assert "someone/some-dataset" in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("suffix", [".jsonl", ".json"])
def test_a_data_file_that_is_not_utf8_is_a_one_line_error(tmp_path, suffix):
    from qlora_guide.data import read_splits

    path = tmp_path / f"train{suffix}"
    text = '{"prompt": "Qu\'est-ce que la quantification ?", "completion": "Réduire le nombre de bits."}\n'
    path.write_bytes(text.encode("latin-1"))
    with pytest.raises(QLoRAGuideError, match=r"is not UTF-8 \(byte 0xe9 on line 1\): save it as UTF-8"):
        read_splits(str(path))


def test_a_line_separator_inside_a_json_string_is_not_a_line_break(tmp_path):
    from qlora_guide.data import read_splits

    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps({"prompt": "a\u2028b", "completion": "c"}, ensure_ascii=False) + "\n", encoding="utf-8")
    assert list(read_splits(str(path))["train"])[0]["prompt"] == "a\u2028b"
