"""Pre-flight checks (``qlora-guide doctor``): each broken setup fed to them, and its one-line finding."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from conftest import QUESTIONS, chat_rows, write_jsonl

from qlora_guide import cli
from qlora_guide.data import IGNORE_INDEX, Collator
from qlora_guide.errors import QLoRAGuideError
from qlora_guide.precision import resolve
from qlora_guide.training import preflight, train

# SmolLM2's template with the assistant turn left open: no <|im_end|> after an answer.
OPEN_TURN_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content']}}"
    "{% if message['role'] != 'assistant' %}{{'<|im_end|>\n'}}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# Training renders the assistant header with a colon; the generation prompt without one.
MISMATCHED_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'assistant' %}{{'<|im_start|>assistant:\n'}}"
    "{% else %}{{'<|im_start|>' + message['role'] + '\n'}}{% endif %}{{message['content'] + '<|im_end|>\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def model_with_template(embedded_model: Path, folder: Path, template: str | None) -> Path:
    """The embedded model's files (linked, not copied) with another chat template, or none."""
    folder.mkdir()
    for item in embedded_model.iterdir():
        if item.name not in ("chat_template.jinja", "qlora_guide_manifest.json"):
            os.symlink(item, folder / item.name)
    if template is not None:
        (folder / "chat_template.jinja").write_text(template)
    return folder


def recipe_for(model: Path | str, tiny_recipe: dict, **data) -> dict:
    return {**tiny_recipe, "model": {"name_or_path": str(model)}, "data": {**tiny_recipe["data"], **data}}


def found(report: preflight.Preflight, check: str) -> preflight.Finding:
    [finding] = [f for f in report.findings if f.check == check and f.level != "ok"] or \
        [f for f in report.findings if f.check == check]
    return finding


def test_the_bundled_recipe_passes_and_shows_its_answers_as_the_learnt_text(tiny_recipe):
    report = preflight.doctor(tiny_recipe, examples=2)
    assert not report.errors, report.findings
    assert {f.check: f.level for f in report.findings if f.check in ("labels", "eos", "template")} == \
        {"labels": "ok", "eos": "ok", "template": "ok"}
    learnt = ["".join(t for t, is_learnt in example if is_learnt) for example in report.examples]
    masked = ["".join(t for t, is_learnt in example if not is_learnt) for example in report.examples]
    for shown, hidden in zip(learnt, masked, strict=True):  # the answer is learnt, its question masked
        [(question, answer)] = [(q, a) for _, q, a in QUESTIONS if q in hidden]
        assert shown.startswith(answer) and shown.rstrip().endswith("<|im_end|>") and question not in shown
    # SmolLM2's pad token is its end-of-turn token: safe here, and said so
    assert found(report, "pad").level == "note"


def test_an_answer_without_end_of_turn_token_is_an_error_and_train_stops_before_loading_the_model(
        tiny_recipe, embedded_model, tmp_path, monkeypatch):
    model = model_with_template(embedded_model, tmp_path / "open-turn", OPEN_TURN_TEMPLATE)
    recipe = recipe_for(model, tiny_recipe)
    finding = found(preflight.doctor(recipe), "eos")
    assert finding.level == "error" and "no answer has a learnt stop token ('<|im_end|>')" in finding.message
    loaded = []
    monkeypatch.setattr("qlora_guide.training.run.build_model", lambda *a, **k: loaded.append(1))
    with pytest.raises(QLoRAGuideError, match="^eos: no answer has a learnt stop token"):
        train(recipe)
    assert not loaded and not Path(tiny_recipe["output"]["dir"]).exists()


def test_a_prompt_that_generation_renders_differently_is_an_error(tiny_recipe, embedded_model, tmp_path):
    model = model_with_template(embedded_model, tmp_path / "mismatch", MISMATCHED_TEMPLATE)
    finding = found(preflight.doctor(recipe_for(model, tiny_recipe)), "template")
    assert finding.level == "error", finding
    assert finding.message.startswith("24 of 24 prompts differ between training and generation"), finding.message
    assert "trained ':'" in finding.message, finding.message


def test_a_model_without_chat_template_is_warned_about(tiny_recipe, embedded_model, tmp_path):
    model = model_with_template(embedded_model, tmp_path / "no-template", None)
    report = preflight.doctor(recipe_for(model, tiny_recipe))
    warnings = [f.message for f in report.findings if f.check == "template" and f.level == "warning"]
    assert warnings and "has no chat template" in warnings[0]


def test_plain_text_data_for_a_chat_model_is_warned_about(tiny_recipe, tmp_path):
    path = tmp_path / "text.jsonl"
    path.write_text("".join(json.dumps({"text": f"NF4 has 16 levels, note {i}."}) + "\n" for i in range(8)))
    finding = found(preflight.doctor(recipe_for("smollm2-135m", tiny_recipe, path=str(path))), "template")
    assert finding.level == "warning" and finding.message.startswith("plain text data")


def test_answers_cut_away_by_max_length_are_counted(tiny_recipe, tmp_path):
    long_question = {"messages": [{"role": "user", "content": "Explain NF4 " + "in detail " * 60 + "?"},
                                  {"role": "assistant", "content": "Sixteen levels at normal quantiles."}]}
    path = write_jsonl(tmp_path / "long.jsonl", [long_question] * 4 + chat_rows())
    recipe = recipe_for("smollm2-135m", tiny_recipe, path=str(path), validation_size=0.1)
    finding = found(preflight.doctor(recipe), "labels")
    assert finding.level == "warning", finding
    assert finding.message.startswith("4 of the first 32 examples have no answer token left within data.max_length=96")


def test_a_collator_that_masks_padding_by_token_id_is_caught(tokenizer):
    from transformers import DataCollatorForLanguageModeling

    ids = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}],
                                        tokenize=True, return_dict=True)["input_ids"]
    labels = [IGNORE_INDEX] * (len(ids) - 4) + ids[-4:]  # "Hello", ".", "<|im_end|>", "\n"
    row = {"input_ids": list(ids), "labels": labels}
    pad, name = tokenizer.pad_token_id, tokenizer.pad_token
    assert preflight.check_padding(row, Collator(pad), pad, name).level == "note"
    by_id = DataCollatorForLanguageModeling(tokenizer, mlm=False, return_tensors="pt")
    finding = preflight.check_padding(row, lambda rows: by_id([{"input_ids": r["input_ids"]} for r in rows]), pad, name)
    assert finding.level == "error" and finding.message.startswith("padding masks the stop token")


def test_precision_that_the_hardware_emulates_is_a_warning():
    emulated = preflight.check_precision(resolve(bf16=True, device="cpu", native_bf16=False))
    assert [f.level for f in emulated] == ["warning", "ok"] and "emulated and slow" in emulated[0].message
    native = preflight.check_precision(resolve(bf16="auto", device="cpu", native_bf16=True))
    assert [(f.level, f.message) for f in native] == [("ok", "cpu: training computes in bf16, optimizer adamw_torch")]


def test_doctor_prints_one_line_per_finding_and_exits_1_on_an_error(tiny_recipe, embedded_model, tmp_path, capsys):
    good = tmp_path / "good.yaml"
    good.write_text(json.dumps(tiny_recipe))
    assert cli.main(["doctor", str(good), "--examples", "1"]) == 0
    out = capsys.readouterr().out
    assert any(f"⟦{a}" in out for _, _, a in QUESTIONS) and out.rstrip().endswith("no error")
    model = model_with_template(embedded_model, tmp_path / "open-turn", OPEN_TURN_TEMPLATE)
    bad = tmp_path / "bad.yaml"
    bad.write_text(json.dumps(recipe_for(model, tiny_recipe)))
    assert cli.main(["doctor", str(bad)]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert any(line.startswith("error   eos        no answer has a learnt stop token") for line in lines), lines
    assert lines[-1] == "1 error(s): fix them before training"
    assert cli.main(["doctor", str(bad), "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert {"level": "error", "check": "eos"}.items() <= next(f for f in report["findings"] if f["check"] == "eos").items()
