"""Evaluation: perplexity on answers, shipped BLEU/chrF modules, Trainer hooks, comparisons and reports."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import numpy as np
import pytest

from qlora_guide import evaluation
from qlora_guide.errors import QLoRAGuideError


@pytest.fixture(scope="module")
def examples():
    return evaluation.load_split("qlora-faq", "test", max_samples=8)


@pytest.fixture(scope="module")
def model32(model_cache):
    """The embedded model in float32, so batch-size comparisons are exact to rounding."""
    from qlora_guide.models import load_model, load_tokenizer

    return load_model(dtype="float32").eval(), load_tokenizer()


# ------------------------------------------------------------------ metric modules


def test_shipped_metrics_load_offline_and_match_sacrebleu():
    import evaluate
    import sacrebleu

    from qlora_guide.metrics import load_metric, metric_path

    predictions = ["the cat sat on the mat", "QLoRA trains adapters on a 4-bit base", "le chat"]
    references = ["the cat sat on a mat", "QLoRA trains low-rank adapters on a frozen 4-bit base", "le chien"]
    bleu = evaluate.load(metric_path("bleu")).compute(predictions=predictions, references=references)
    assert bleu["score"] == pytest.approx(sacrebleu.corpus_bleu(predictions, [references]).score)
    chrf = load_metric("chrf").compute(predictions=predictions, references=references)
    assert chrf["score"] == pytest.approx(sacrebleu.corpus_chrf(predictions, [references]).score)
    # several references per prediction
    second = ["a cat sat on the mat", "QLoRA", "le chat"]
    multi = load_metric("bleu").compute(predictions=predictions, references=[[a, b] for a, b in zip(references, second, strict=True)])
    assert multi["score"] == pytest.approx(sacrebleu.corpus_bleu(predictions, [references, second]).score)
    assert evaluation.generation_scores(references, references) == {"bleu": pytest.approx(100), "chrf": pytest.approx(100)}
    with pytest.raises(QLoRAGuideError, match="unknown metric 'rouge'"):
        metric_path("rouge")


# ------------------------------------------------------------------ perplexity


def test_perplexity_is_the_token_weighted_answer_loss_whatever_the_batch_size(model32, examples):
    import torch

    from qlora_guide.data import encode_messages

    model, tokenizer = model32
    nll, count = evaluation.answer_nll(model, tokenizer, examples, batch_size=1)
    nll16, count16 = evaluation.answer_nll(model, tokenizer, examples, batch_size=16)
    assert count16 == count and nll16 == pytest.approx(nll, rel=1e-6)

    # the same number from the model's own loss, one example at a time, weighted by answer tokens
    total, tokens, all_tokens = 0.0, 0, 0
    for example in examples:
        ids, labels = encode_messages(example["messages"], tokenizer)
        answer = sum(label != -100 for label in labels[1:])
        with torch.no_grad():
            loss = model(input_ids=torch.tensor([ids]), labels=torch.tensor([labels])).loss.item()
        total, tokens, all_tokens = total + loss * answer, tokens + answer, all_tokens + len(ids)
    assert count == tokens < all_tokens  # prompts do not count
    assert nll == pytest.approx(total, rel=1e-5)
    assert evaluation.perplexity(model, tokenizer, examples, batch_size=16) == pytest.approx(math.exp(total / tokens), rel=1e-5)


def test_perplexity_accepts_pretokenized_rows_and_rejects_empty_ones(model32):
    model, tokenizer = model32
    rows = [{"input_ids": [1, 2, 3, 4], "labels": [-100, -100, 3, 4]}, {"input_ids": [5, 6], "labels": [-100, 6]}]
    assert evaluation.answer_nll(model, tokenizer, rows, batch_size=2)[1] == 3
    with pytest.raises(QLoRAGuideError, match="no answer tokens"):
        evaluation.perplexity(model, tokenizer, [{"input_ids": [1, 2], "labels": [-100, -100]}])
    with pytest.raises(QLoRAGuideError, match="batch_size must be positive"):
        evaluation.perplexity(model, tokenizer, rows, batch_size=0)


# ------------------------------------------------------------------ Trainer hooks


def test_compute_metrics_shifts_and_masks():
    import torch

    labels = np.array([[-100, -100, 5, 6, 7, -100], [-100, 8, 9, -100, -100, -100]])
    right = np.array([[0, 5, 6, 7, 1, 1], [8, 9, 3, 3, 3, 3]])  # position t predicts token t + 1
    assert evaluation.compute_metrics(SimpleNamespace(predictions=right, label_ids=labels)) == {"token_accuracy": 1.0, "answer_tokens": 5}
    unshifted = np.where(labels == -100, 0, labels)  # the bug: comparing position t with token t
    assert evaluation.compute_metrics(SimpleNamespace(predictions=unshifted, label_ids=labels))["token_accuracy"] == 0.0
    logits = torch.randn(2, 6, 11)
    ids = evaluation.preprocess_logits_for_metrics((logits, None), None)
    assert ids.shape == (2, 6) and torch.equal(ids, logits.argmax(-1))


def test_trainer_evaluation_with_the_hooks_gives_the_direct_accuracy(model32, examples, tmp_path):
    import torch
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments

    from qlora_guide.data import Collator

    model, tokenizer = model32
    rows = evaluation.tokenize_for_loss(examples[:6], tokenizer)
    trainer = Trainer(
        model=model,
        args=TrainingArguments(output_dir=str(tmp_path), per_device_eval_batch_size=4, report_to=[], use_cpu=True),
        eval_dataset=Dataset.from_list(rows),
        data_collator=Collator(tokenizer.pad_token_id),
        compute_metrics=evaluation.compute_metrics,
        preprocess_logits_for_metrics=evaluation.preprocess_logits_for_metrics,
    )
    metrics = trainer.evaluate()
    right = total = 0
    for row in rows:
        with torch.no_grad():
            predicted = model(input_ids=torch.tensor([row["input_ids"]])).logits[0, :-1].argmax(-1)
        labels = torch.tensor(row["labels"][1:])
        mask = labels != -100
        right += int((predicted[mask] == labels[mask]).sum())
        total += int(mask.sum())
    assert metrics["eval_answer_tokens"] == total
    assert metrics["eval_token_accuracy"] == pytest.approx(right / total)


# ------------------------------------------------------------------ generation


def test_batched_generation_pads_on_the_left_and_matches_one_by_one(model32, examples):
    model, tokenizer = model32
    prompts, references = evaluation.prompts_and_references(examples[:3])
    assert references[0] == examples[0]["messages"][-1]["content"]
    batched = evaluation.generate_answers(model, tokenizer, prompts, max_new_tokens=8, batch_size=3)
    single = evaluation.generate_answers(model, tokenizer, prompts, max_new_tokens=8, batch_size=1)
    assert batched == single and all(batched)
    assert tokenizer.padding_side == "right"


def test_text_examples_have_no_references():
    with pytest.raises(QLoRAGuideError, match="plain 'text' examples"):
        evaluation.prompts_and_references([{"text": "just text"}])


# ------------------------------------------------------------------ whole runs


def test_evaluate_run_on_the_base_model_writes_json_and_markdown(tmp_path, model_cache):
    report = evaluation.evaluate_run("smollm2-135m", max_samples=3, max_new_tokens=6, output_dir=tmp_path)
    (row,) = report["rows"]
    assert row["samples"] == 3 and row["perplexity"] > 1
    assert 0 <= row["bleu"] <= 100 and 0 <= row["chrf"] <= 100
    for key in ("load_s", "weights_mb", "rss_peak_mb", "ttft_s", "tokens_per_s", "decode_tokens_per_s"):
        assert row[key] >= 0, key
    assert row["generated_tokens"] == 32  # speed is measured on a fixed number of tokens
    saved = json.loads((tmp_path / "report.json").read_text())
    assert saved["rows"][0]["perplexity"] == pytest.approx(row["perplexity"])
    markdown = (tmp_path / "report.md").read_text()
    assert "| model | perplexity |" in markdown and "tokens/s" in markdown
    assert "| model | perplexity |" in evaluation.format_report(report)
    with pytest.raises(QLoRAGuideError, match="already exists"):
        evaluation.write_report(report["rows"], tmp_path)


@pytest.mark.slow
def test_compare_models_measures_every_variant_on_the_same_data(tmp_path_factory, examples, monkeypatch):
    from test_deployment import make_adapter_run

    from qlora_guide.deployment import merge_adapter

    # float32 arithmetic everywhere (4-bit compute dtype, and bitsandbytes' bf16 CPU kernel off): the merged
    # model must then match the 4-bit + adapter model exactly
    monkeypatch.setenv("QLORA_GUIDE_CPU_BF16", "0")
    run = make_adapter_run(tmp_path_factory.mktemp("compare") / "run")
    merged = merge_adapter(run, run.parent / "merged", check_parity=False).output_dir
    from qlora_guide.config import QuantizationConfig

    float32_4bit = QuantizationConfig(bnb_4bit_compute_dtype="float32")
    rows = evaluation.compare_models(adapter_dir=run, merged_dir=merged, data=examples[:4], batch_size=4, max_new_tokens=6,
                                     speed_tokens=4, quantization=float32_4bit)
    by_name = {r["variant"]: r for r in rows}
    assert list(by_name) == ["bf16 base", "4-bit base", "4-bit + adapter", "merged"]
    assert by_name["bf16 base"]["perplexity_ratio"] == 1.0
    # bf16 weights (measured as such), computed in float32 where the CPU only emulates bf16 (on this path: always)
    assert by_name["bf16 base"]["compute_dtype"] == "float32"
    for row in rows:
        assert row["samples"] == 4 and row["generated_tokens"] == 4
        for key in ("perplexity", "bleu", "chrf", "perplexity_ratio", "load_s", "weights_mb", "rss_peak_mb", "ttft_s", "tokens_per_s"):
            assert key in row, (row["variant"], key)
    # the linear layers shrink to about 4.1 / 16 of their bf16 bytes; the embedding (a fifth of this model's
    # parameters) stays in the compute dtype, float32 on this path: about 0.62 of the bf16 footprint (0.43 in bf16)
    assert by_name["4-bit base"]["weights_mb"] < 0.65 * by_name["bf16 base"]["weights_mb"]
    # the adapter changes the model; the merged model is that same model
    assert by_name["4-bit + adapter"]["perplexity"] != pytest.approx(by_name["4-bit base"]["perplexity"], rel=0.01)
    assert by_name["merged"]["perplexity"] == pytest.approx(by_name["4-bit + adapter"]["perplexity"], rel=1e-3)
    # every model against the bf16 base, with an interval around each figure
    differences = evaluation.compare_to_reference(rows, examples[:4])
    assert {d["model"] for d in differences} == {"4-bit base", "4-bit + adapter", "merged"}
    assert {d["measure"] for d in differences} == {"perplexity", "chrf", "bleu", "same_language_pct", "repeated_4gram_pct"}
    for d in differences:
        assert d["low"] <= d["difference"] <= d["high"] and d["against"] == "bf16 base", d
    paths = evaluation.write_report(rows, tmp_path_factory.mktemp("report"))
    table = open(paths["markdown"]).read()
    assert all(name in table for name in by_name) and "ppl / bf16" in table


@pytest.mark.gpu
def test_cuda_memory_is_measured_on_a_gpu(model_cache):
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    (row,) = evaluation.evaluate_run("smollm2-135m", max_samples=2, max_new_tokens=4)["rows"]
    assert row["cuda_peak_allocated_mb"] >= row["weights_mb"]
    assert row["cuda_peak_reserved_mb"] >= row["cuda_peak_allocated_mb"]


def test_an_existing_report_is_refused_before_any_model_loads(tmp_path, monkeypatch):
    (tmp_path / "report.json").write_text("{}")
    monkeypatch.setattr("qlora_guide.deployment.load_any", lambda *a, **k: pytest.fail("a model was loaded"))
    with pytest.raises(QLoRAGuideError, match="report.json already exists"):
        evaluation.evaluate_run("smollm2-135m", output_dir=tmp_path)
    (tmp_path / "file").write_text("x")
    with pytest.raises(QLoRAGuideError, match="is a file, not a folder"):
        evaluation.evaluate_run("smollm2-135m", output_dir=tmp_path / "file")
    assert (tmp_path / "report.json").read_text() == "{}"
    for option in ("batch_size", "max_new_tokens"):  # 0 used to mean "the default" silently
        with pytest.raises(QLoRAGuideError, match=f"^{option} must be a positive integer, not 0$"):
            evaluation.evaluate_run("smollm2-135m", **{option: 0})


def test_a_run_trained_on_one_file_is_evaluated_on_its_held_out_split(tmp_path, tiny_jsonl, caplog, model_cache):
    from test_deployment import make_adapter_run

    from qlora_guide.config import DataConfig, Recipe
    from qlora_guide.data import load_examples

    run = make_adapter_run(tmp_path / "run")
    recipe = Recipe(name="one-file", data=DataConfig(path=str(tiny_jsonl), validation_size=0.25))
    (run / "recipe.yaml").write_text(recipe.to_yaml())
    rows, split = evaluation.run_split(recipe)
    assert split == "validation" and rows == list(load_examples(recipe.data)["validation"])  # what training held out
    with caplog.at_level("WARNING"):
        report = evaluation.evaluate_run(run, max_samples=2, generation=False, performance=False)
    assert report["meta"]["split"] == "validation" and report["meta"]["samples"] == 2
    assert "has no 'test' split: evaluating on the run's held-out validation split (8 examples, never trained on)" in caplog.text
    assert report["rows"][0]["perplexity"] > 1
    with pytest.raises(QLoRAGuideError, match=r"has no 'test' split \(the run has: train, validation\)"):
        evaluation.evaluate_run(run, split="test", generation=False, performance=False)


# ------------------------------------------------------------------ adapter variants


def test_variants_with_a_bad_setting_or_the_same_folder_are_refused_before_training(tiny_recipe, tmp_path):
    from qlora_guide.evaluation.variants import train_variants

    with pytest.raises(QLoRAGuideError, match="lora.use_dora"):
        train_variants({"LoRA": [], "DoRA": ["lora.use_dora=maybe"]}, tmp_path / "runs", recipe=tiny_recipe)
    with pytest.raises(QLoRAGuideError, match="same folder name"):
        train_variants({"DoRA r=4": [], "dora r 4": []}, tmp_path / "runs", recipe=tiny_recipe)
    assert not (tmp_path / "runs").exists()


@pytest.mark.slow
def test_variants_train_on_the_same_budget_and_compare_with_the_first(tiny_recipe, tmp_path):
    from qlora_guide.evaluation.variants import evaluate_variants, train_variants
    from qlora_guide.memory import estimate

    common = ["training.max_steps=2", "training.eval_steps=1", "training.save_steps=2"]
    rows = train_variants({"LoRA": [], "DoRA": ["lora.use_dora=true"], "rsLoRA r=16": ["lora.use_rslora=true", "lora.r=16"]},
                          tmp_path / "runs", recipe=tiny_recipe, common=common)
    lora, dora, rslora = rows
    # DoRA adds one magnitude per output row of every adapted layer (q_proj and v_proj), as the planner counts
    plans = [estimate("smollm2-135m", r=4, target_modules=["q_proj", "v_proj"], use_dora=d).trainable_parameters
             for d in (False, True)]
    assert [lora["trainable_params"], dora["trainable_params"]] == plans
    assert rslora["scaling"] == pytest.approx(8 / 4) and lora["scaling"] == pytest.approx(8 / 4)  # α/√16 and α/4
    for row in rows:
        steps = [step for step, _ in row["history"]]
        assert steps[:3] == [0, 1, 2] and row["history"][0][1] == pytest.approx(row["initial_eval_loss"])
        assert row["step_s"] > 0 and row["rss_peak_mb"] >= 0
    comparisons = evaluate_variants(rows, split="validation", generation=False)  # the tiny data has no test split
    assert [(c["model"], c["against"], c["measure"]) for c in comparisons] == [
        ("DoRA", "LoRA", "perplexity"), ("rsLoRA r=16", "LoRA", "perplexity")]
    for c in comparisons:
        assert c["low"] <= c["difference"] <= c["high"]
        row = next(r for r in rows if r["variant"] == c["model"])
        assert c["difference"] == pytest.approx(row["perplexity"] / lora["perplexity"], rel=1e-6)


@pytest.mark.slow
def test_training_steps_are_timed_for_qlora_and_lora(tiny_recipe):
    from qlora_guide.evaluation.speed import measure_training_steps

    [row] = measure_training_steps(tiny_recipe, tokens=(16,), steps=1)
    assert row["tokens"] == 16 and row["QLoRA s/step"] > 0 and row["LoRA s/step"] > 0
    assert row["QLoRA / LoRA"] == row["QLoRA s/step"] / row["LoRA s/step"]
