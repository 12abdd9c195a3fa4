"""Preference tuning: pairs checked before any model loads, a DPO run on the embedded model, held-out margins."""

from __future__ import annotations

import json
import math

import pytest
from conftest import write_jsonl

from qlora_guide.errors import QLoRAGuideError
from qlora_guide.training import format_train_result, train
from qlora_guide.training.preference import load_pairs, to_pair

PAIR = {"prompt": "What does NF4 stand for?", "chosen": "4-bit NormalFloat.", "rejected": "Neural Format 4."}


def dpo_recipe(path, tmp_path, **dpo):
    return {
        "name": "tiny-dpo", "model": {"name_or_path": "smollm2-135m"},
        "lora": {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]},
        "data": {"path": str(path), "max_length": 160, "languages": ["en"]},
        "training": {"max_steps": 2, "per_device_train_batch_size": 4, "gradient_accumulation_steps": 1, "learning_rate": 1e-3,
                     "logging_steps": 1, "save_steps": 2, "gradient_checkpointing": False, "report_to": ["none"], "seed": 3},
        "dpo": {"reference": "precomputed", **dpo},
        "output": {"dir": str(tmp_path / "run")},
    }


def test_pairs_take_text_or_messages_and_become_trl_conversations():
    pair = to_pair(PAIR, "example 1")
    assert pair == {"prompt": [{"role": "user", "content": PAIR["prompt"]}],
                    "chosen": [{"role": "assistant", "content": PAIR["chosen"]}],
                    "rejected": [{"role": "assistant", "content": PAIR["rejected"]}]}
    assert to_pair(pair, "example 1") == pair


@pytest.mark.parametrize("row, message", [
    ({"prompt": "Q?", "chosen": "A."}, "data: format 'preference' needs column 'rejected'"),
    ({"prompt": "Q?", "chosen": " ", "rejected": "B."}, "data: example 1 of the train split has an empty 'chosen' answer"),
    ({"prompt": "Q?", "chosen": "A.", "rejected": ""}, "data: example 1 of the train split has an empty 'rejected' answer"),
    ({"prompt": "", "chosen": "A.", "rejected": "B."}, "data: example 1 of the train split has an empty 'prompt'"),
    ({"prompt": "Q?", "chosen": "A.", "rejected": "A."}, "data: example 1 of the train split has the same chosen and rejected answer"),
    ({"prompt": "Q?", "chosen": 3, "rejected": "B."}, "data: example 1 of the train split has a 'chosen' that is neither text nor"),
])
def test_bad_preference_files_are_one_line_errors_before_any_model_loads(tmp_path, row, message):
    path = write_jsonl(tmp_path / "prefs" / "train.jsonl", [row] * 4)
    with pytest.raises(QLoRAGuideError) as err:
        train(dpo_recipe(path, tmp_path) | {"data": {"path": str(path)}})
    assert str(err.value).startswith(message) and "\n" not in str(err.value)
    assert not (tmp_path / "run").exists()


def test_preference_pairs_without_a_dpo_section_are_refused(tmp_path):
    recipe = dpo_recipe("qlora-prefs", tmp_path)
    del recipe["dpo"]
    with pytest.raises(QLoRAGuideError, match=r"^data: the examples are preference pairs .*add a dpo section"):
        train(recipe)


def test_a_starting_adapter_of_another_shape_is_refused(tmp_path):
    from test_deployment import make_adapter_run

    run = make_adapter_run(tmp_path / "sft", r=8)
    with pytest.raises(QLoRAGuideError, match=r"^dpo\.adapter: its r is 8, the recipe's lora\.r is 4: make them equal$"):
        train(dpo_recipe("qlora-prefs", tmp_path, adapter=str(run)))


def test_bundled_pairs_load_with_every_split():
    from qlora_guide.config import DataConfig

    pairs = load_pairs(DataConfig(path="qlora-prefs"))
    assert {len(pairs["train"]), len(pairs["validation"]), len(pairs["test"])} == {80, 16, 24}


@pytest.mark.slow
def test_dpo_trains_from_the_recipe_and_measures_what_trl_optimises(tmp_path):
    """The DPO loss starts at log 2 (the reference is the starting model), TRL's log-probabilities of the chosen
    answers are the package's own answer log-likelihoods, and the saved adapter is the trained one alone and changes
    which answers the model prefers. float32 throughout, so that the two computations compare on every CPU."""
    from qlora_guide import deployment
    from qlora_guide.config import DataConfig, QuantizationConfig
    from qlora_guide.evaluation import answer_nll_per_example, preference_margins

    recipe = dpo_recipe("qlora-prefs", tmp_path)
    recipe["quantization"] = {"bnb_4bit_compute_dtype": "float32"}
    recipe["training"]["bf16"] = False
    result = train(recipe)
    metrics = result.metrics
    assert metrics["initial_eval_loss"] == pytest.approx(math.log(2), abs=1e-4)
    assert metrics["global_step"] == 2 and {"eval_rewards/accuracies", "eval_rewards/margins"} <= metrics.keys()
    summary = format_train_result(result)  # what `qlora-guide train` prints: DPO's loss and rewards, no perplexity
    assert f"reward accuracy {metrics['eval_rewards/accuracies']:.2f}" in summary and "perplexity" not in summary
    assert [p.name for p in (result.output_dir / "adapter").iterdir() if p.is_dir()] == []  # TRL's "ref" copy is not saved
    history = [json.loads(line) for line in (result.output_dir / "metrics.jsonl").read_text().splitlines()]
    first_eval = next(h for h in history if "eval_logps/chosen" in h)

    pairs = load_pairs(DataConfig(path="qlora-prefs", languages=["en"]))["validation"]
    lm = deployment.load_any(result.output_dir, quantization=QuantizationConfig(bnb_4bit_compute_dtype="float32"), dtype="float32")
    with lm.model.disable_adapter():
        chosen = answer_nll_per_example(lm.model, lm.tokenizer, [{"messages": p["prompt"] + p["chosen"]} for p in pairs])
        before = preference_margins(lm.model, lm.tokenizer, pairs)
    assert first_eval["eval_logps/chosen"] == pytest.approx(-sum(n for n, _ in chosen) / len(chosen), rel=1e-3)
    after = preference_margins(lm.model, lm.tokenizer, pairs)
    assert len(after) == len(pairs) and after != before


def test_pair_statistics_count_the_answer_tokens_the_loss_masking_scores(tokenizer):
    from qlora_guide.config import DataConfig
    from qlora_guide.evaluation import tokenize_for_loss
    from qlora_guide.training.preference import pair_statistics

    pairs = load_pairs(DataConfig(path="qlora-prefs"))["validation"]
    rows = tokenize_for_loss([{"messages": p["prompt"] + p[a]} for p in pairs for a in ("chosen", "rejected")], tokenizer, 192)
    one, four = pair_statistics(pairs, tokenizer, 192, 1), pair_statistics(pairs, tokenizer, 192, 4)
    assert one.answer_tokens == sum(sum(label != -100 for label in row["labels"]) for row in rows) > 0
    assert one.sequences == 2 * len(pairs) and one.truncated == 0
    assert 0 < one.padding_fraction < four.padding_fraction < 1  # 8 rows of different lengths pad more than 2
    cut = pair_statistics(pairs, tokenizer, 64)
    assert cut.truncated == 2 * len(pairs) and cut.answer_tokens < one.answer_tokens
