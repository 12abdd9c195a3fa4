"""Recipes: validation that names the key, overrides, bundled recipes, copying."""

from __future__ import annotations

import re

import pytest
import yaml

from qlora_guide.config import (
    GUIDE_TARGET_MODULES,
    RECIPES_DIR,
    Recipe,
    bundled_recipes,
    copy_recipe,
    field_help,
    load_recipe,
)
from qlora_guide.errors import QLoRAGuideError


def test_unknown_key_is_named_with_a_suggestion():
    with pytest.raises(QLoRAGuideError, match=r"unknown recipe key 'lora\.rank' \(did you mean 'r'\?\)"):
        load_recipe({"lora": {"rank": 8}})
    with pytest.raises(QLoRAGuideError, match=r"'trainig'.*did you mean 'training'"):
        load_recipe({"trainig": {}})


def test_wrong_type_is_named():
    with pytest.raises(QLoRAGuideError, match=r"training\.per_device_train_batch_size: expected an integer, got 'four'"):
        load_recipe({"training": {"per_device_train_batch_size": "four"}})
    with pytest.raises(QLoRAGuideError, match=r"data\.packing: expected true or false"):
        load_recipe({"data": {"packing": "yes please"}})
    with pytest.raises(QLoRAGuideError, match=r"^lora: must be a mapping"):
        load_recipe({"lora": 16})


@pytest.mark.parametrize(
    "override, key",
    [("lora.r=0", "lora.r"), ("lora.r=-4", "lora.r"), ("training.learning_rate=-1e-4", "training.learning_rate"),
     ("data.max_length=4", "data.max_length"), ("quantization.bnb_4bit_quant_type=int3", "quantization.bnb_4bit_quant_type")],
)
def test_bad_values_are_named(override, key):
    with pytest.raises(QLoRAGuideError) as err:
        load_recipe("demo", [override])
    assert str(err.value).startswith(key)
    assert "\n" not in str(err.value)


def test_overrides_are_read_as_yaml_and_validated():
    recipe = load_recipe("demo", [
        "training.learning_rate=1e-4", "lora.target_modules=[q_proj, v_proj]", "data.languages=[fr]",
        "training.bf16=false", "quantization=null",
    ])
    assert recipe.training.learning_rate == 1e-4
    assert recipe.lora.target_modules == ["q_proj", "v_proj"]
    assert recipe.data.languages == ["fr"]
    assert recipe.training.bf16 is False
    assert recipe.quantization is None  # plain LoRA, same code path
    with pytest.raises(QLoRAGuideError, match=r"unknown recipe key 'training\.learning_rte'"):
        load_recipe("demo", ["training.learning_rte=1e-4"])
    with pytest.raises(QLoRAGuideError, match="must look like section.key=value"):
        load_recipe("demo", ["learning_rate"])


def test_every_bundled_recipe_loads_and_documents_its_command():
    recipes = bundled_recipes()
    assert {"demo", "mistral-7b", "llama-3-8b", "llama-3-70b-fsdp"} <= set(recipes)
    assert "fsdp_qlora" not in recipes  # launcher configs in subfolders are not recipes
    for name, path in recipes.items():
        recipe = load_recipe(name)
        assert recipe.name == name
        header = path.read_text().split("\nname:")[0]
        assert header.startswith("#") and "qlora-guide" in header and "--set" in header, name
        assert load_recipe(recipe.to_dict()) == recipe  # the resolved YAML written next to a run loads back


def test_mistral_recipe_has_the_guides_exact_settings():
    r = load_recipe("mistral-7b")
    q = r.quantization
    assert (q.load_in_4bit, q.bnb_4bit_quant_type, q.bnb_4bit_use_double_quant, q.bnb_4bit_compute_dtype) == (True, "nf4", True, "bfloat16")
    assert (r.lora.r, r.lora.lora_alpha, r.lora.lora_dropout, r.lora.bias) == (64, 16, 0.05, "none")
    assert r.lora.target_modules == list(GUIDE_TARGET_MODULES)
    t = r.training
    assert (t.num_train_epochs, t.per_device_train_batch_size, t.gradient_accumulation_steps, t.learning_rate) == (3, 4, 4, 2e-4)
    assert (t.logging_steps, t.save_steps, t.save_total_limit, t.max_grad_norm, t.warmup_ratio) == (10, 100, 2, 0.3, 0.03)


def test_fsdp_recipe_stores_4bit_codes_in_the_model_dtype():
    r = load_recipe("llama-3-70b-fsdp")
    assert r.quantization.bnb_4bit_quant_storage == r.model.dtype == "bfloat16"
    launcher = yaml.safe_load((RECIPES_DIR / "accelerate" / "fsdp_qlora.yaml").read_text())
    assert launcher["distributed_type"] == "FSDP"


def test_invalid_yaml_names_the_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("lora:\n  r: 8\n   lora_alpha: [16\n")
    with pytest.raises(QLoRAGuideError, match=r"not valid YAML line \d"):
        load_recipe(bad)
    with pytest.raises(QLoRAGuideError, match="no recipe 'nope'"):
        load_recipe("nope")


def test_copy_recipe_never_overwrites_unasked(tmp_path):
    [written] = copy_recipe("demo", tmp_path)
    assert written == tmp_path / "demo.yaml"
    assert load_recipe(written) == load_recipe("demo")
    written.write_text("# my edits\n" + written.read_text())
    with pytest.raises(QLoRAGuideError, match="already exists"):
        copy_recipe("demo", tmp_path)
    assert written.read_text().startswith("# my edits")
    copy_recipe("demo", tmp_path, overwrite=True)
    assert not written.read_text().startswith("# my edits")
    renamed = copy_recipe("demo", tmp_path / "sub" / "mine.yaml")
    assert renamed == [tmp_path / "sub" / "mine.yaml"]
    with pytest.raises(QLoRAGuideError, match="no bundled recipe 'demos'"):
        copy_recipe("demos", tmp_path)
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(QLoRAGuideError, match="notes.txt is a file, not a folder: give a folder or a .yaml file name"):
        copy_recipe("demo", tmp_path / "notes.txt")
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_copy_fsdp_recipe_brings_its_launcher_config(tmp_path):
    recipe, launcher = copy_recipe("llama-3-70b-fsdp", tmp_path)
    assert launcher.name == "accelerate_fsdp_qlora.yaml"
    assert launcher.name in recipe.read_text()  # the command in the header names the copied file


def test_library_objects_match_the_recipe():
    r = load_recipe("mistral-7b")
    bnb = r.quantization.to_bnb()
    assert bnb.bnb_4bit_quant_type == "nf4" and bnb.bnb_4bit_use_double_quant and str(bnb.bnb_4bit_compute_dtype) == "torch.bfloat16"
    lora = r.lora.to_peft()
    assert (lora.r, lora.lora_alpha, lora.lora_dropout, lora.bias) == (64, 16, 0.05, "none")
    assert set(lora.target_modules) == set(GUIDE_TARGET_MODULES)


def test_every_field_has_help():
    from qlora_guide.config import DpoConfig

    sections = {type(getattr(Recipe(), name)) for name in Recipe.model_fields} - {str, type(None)} | {DpoConfig}
    assert len(sections) == 8
    for cls in (Recipe, *sections):
        assert field_help(cls).keys() == cls.model_fields.keys()
        assert all(field_help(cls).values()), cls.__name__


def test_schedules_are_transformers_own(tmp_path):
    from transformers.trainer_utils import SchedulerType

    from qlora_guide.config import scheduler_types

    assert set(scheduler_types()) == {s.value for s in SchedulerType}


@pytest.mark.parametrize(("override", "message"), [
    ("training.lr_scheduler_type=bogus", "training.lr_scheduler_type: must be one of linear, cosine, "),
    ("training.lr_scheduler_type=cosin", "not 'cosin' (did you mean 'cosine'?)"),
    ("training.learning_rate=.inf", "training.learning_rate: must be a positive finite number, not inf"),
    ("training.learning_rate=.nan", "training.learning_rate: must be a positive finite number, not nan"),
    ("training.report_to=[no_such_logger_pkg]", "training.report_to: 'no_such_logger_pkg' is not installed"),
])
def test_bad_training_settings_are_one_line_errors_at_load(override, message):
    from qlora_guide.config import load_recipe

    with pytest.raises(QLoRAGuideError, match=re.escape(message)):
        load_recipe("demo", [override])


def test_an_empty_recipe_file_is_refused(tmp_path):
    from qlora_guide.config import load_recipe

    empty = tmp_path / "empty.yaml"
    empty.write_text("# nothing yet\n")
    with pytest.raises(QLoRAGuideError, match="is empty"):
        load_recipe(empty)


def test_yaml_numbers_and_words_are_read_as_the_field_needs(tmp_path):
    path = tmp_path / "quirks.yaml"
    path.write_text("training:\n  learning_rate: 2e-4\n  bf16: no\ndata:\n  packing: off\n  languages: [no, fr]\n"
                    "model:\n  trust_remote_code: yes\n")
    recipe = load_recipe(path, ["training.weight_decay=1e-2", "output.overwrite=on"])
    assert recipe.training.learning_rate == 2e-4 and recipe.training.weight_decay == 0.01
    assert recipe.training.bf16 is False and recipe.data.packing is False and recipe.model.trust_remote_code is True
    assert recipe.output.overwrite is True
    assert recipe.data.languages == ["no", "fr"]  # Norwegian, not false: a word where the field takes words
    for override, message in [("lora.r=true", "lora.r: expected an integer, got true"),
                              ("lora.lora_dropout=false", "lora.lora_dropout: expected a number, got false"),
                              ("training.max_steps=2.5", "training.max_steps: expected an integer, got 2.5")]:
        with pytest.raises(QLoRAGuideError, match=re.escape(message)):
            load_recipe("demo", [override])


def test_sections_built_in_python_are_checked_alike():
    from qlora_guide.config import DataConfig, LoraConfig

    with pytest.raises(QLoRAGuideError, match=r"^lora\.r: must be a positive integer, not 0$"):
        LoraConfig(r=0)
    with pytest.raises(QLoRAGuideError, match=r"^unknown recipe key 'data\.max_len' \(did you mean 'max_length'\?\)$"):
        DataConfig(max_len=64)
    with pytest.raises(QLoRAGuideError, match=r"^lora\.target_modules: must name at least one module"):
        LoraConfig(target_modules=[])
    assert LoraConfig(target_modules="all-linear").to_peft().target_modules == "all-linear"


def test_trainer_args_are_transformers_own_names():
    recipe = load_recipe("demo", ["training.trainer_args={adam_beta2: 0.95, lr_scheduler_kwargs: {}}"])
    assert recipe.training.trainer_args == {"adam_beta2": 0.95, "lr_scheduler_kwargs": {}}
    assert load_recipe(recipe.to_dict()) == recipe
    for override, message in [
        ("training.trainer_args={adam_beta3: 0.9}",
         "training.trainer_args.adam_beta3: not a field of transformers' TrainingArguments (did you mean 'adam_beta2'?)"),
        ("training.trainer_args={evaluation_strategy: steps}", "training.trainer_args.evaluation_strategy: not a field "
                                                               "of transformers' TrainingArguments (did you mean 'eval_strategy'?)"),
        ("training.trainer_args={gradient_checkpointing_kwargs: {}}",
         "training.trainer_args.gradient_checkpointing_kwargs: a deprecated name in transformers: use activation_checkpointing_kwargs"),
        ("training.trainer_args={learning_rate: 0.1}", "training.trainer_args.learning_rate: set training.learning_rate instead"),
        ("training.trainer_args={warmup_steps: 10}", "training.trainer_args.warmup_steps: set training.warmup_ratio instead"),
        ("training.trainer_args={output_dir: elsewhere}", "training.trainer_args.output_dir: set by qlora-guide from output.dir"),
    ]:
        with pytest.raises(QLoRAGuideError) as err:
            load_recipe("demo", [override])
        assert str(err.value) == message


# ---------------------------------------------------------------- PEFT variants and preference tuning


def test_peft_variants_pass_to_peft_under_their_own_names():
    recipe = load_recipe("demo", ["lora.use_dora=true", "lora.use_rslora=true", "lora.init_lora_weights=gaussian"])
    lora = recipe.lora.to_peft()
    assert (lora.use_dora, lora.use_rslora, lora.init_lora_weights) == (True, True, "gaussian")
    assert recipe.lora.scaling == pytest.approx(32 / 16**0.5)  # rsLoRA: lora_alpha / sqrt(r)
    assert load_recipe("demo").lora.scaling == 32 / 16
    assert load_recipe("demo", ["quantization=null", "lora.init_lora_weights=pissa_niter_4"]).lora.changes_base_weights
    # LoftQ's adapters are set after the model is built (peft.replace_lora_weights_loftq): peft starts them as usual
    assert load_recipe("demo", ["lora.init_lora_weights=loftq"]).lora.to_peft().init_lora_weights is True


@pytest.mark.parametrize("overrides, message", [
    (["lora.use_dora=maybe"], "lora.use_dora: expected true or false, got 'maybe'"),
    (["lora.use_rslora=sqrt"], "lora.use_rslora: expected true or false, got 'sqrt'"),
    (["lora.init_lora_weights=pisa"], "lora.init_lora_weights: must be true, false, gaussian, pissa, olora, loftq or "
                                      "pissa_niter_N, not 'pisa' (did you mean 'pissa'?)"),
    (["lora.init_lora_weights=3"], "lora.init_lora_weights: must be true, false or a string, not 3"),
    (["lora.init_lora_weights=eva"], "lora.init_lora_weights: eva is not supported: it needs a pass over the training data"),
    (["lora.init_lora_weights=pissa"], "lora.init_lora_weights: pissa starts from W - B A and rewrites the base weights, "
                                       "which a 4-bit base cannot hold exactly: set quantization: null"),
    (["lora.init_lora_weights=olora"], "lora.init_lora_weights: olora starts from W - B A"),
    (["quantization=null", "lora.init_lora_weights=pissa", "lora.use_dora=true"],
     "lora.init_lora_weights: pissa with use_dora: peft cannot save the result"),
    (["quantization=null", "lora.init_lora_weights=loftq"], "lora.init_lora_weights: loftq starts the adapters so that "
                                                            "W_nf4 + s B A is close to W: it needs a 4-bit quantization section"),
])
def test_variant_settings_that_cannot_work_are_one_line_errors(overrides, message):
    with pytest.raises(QLoRAGuideError) as err:
        load_recipe("demo", overrides)
    assert str(err.value).startswith(message) and "\n" not in str(err.value)


def test_loftq_without_cuda_is_refused_before_any_model_loads(monkeypatch):
    import torch

    from qlora_guide.training.model import build_model

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.xpu, "is_available", lambda: False)
    recipe = load_recipe("demo", ["lora.init_lora_weights=loftq", "model.name_or_path=/nonexistent/model"])
    with pytest.raises(QLoRAGuideError, match=r"^lora\.init_lora_weights: loftq on a 4-bit base runs on CUDA or XPU only"):
        build_model(recipe, precision=None)  # the model path would fail later: the check comes first


def test_dpo_recipe_is_the_same_recipe_with_a_dpo_section():
    recipe = load_recipe("dpo")
    assert recipe.dpo.reference == "precomputed" and recipe.dpo.beta == 0.1 and recipe.data.path == "qlora-prefs"
    assert recipe.quantization is not None and recipe.lora.r == 16  # QLoRA, as the supervised demo
    assert load_recipe("demo").dpo is None


@pytest.mark.parametrize("overrides, message", [
    (["dpo={beta: 0.1}"], "dpo.reference: required: The reference model the DPO loss compares with"),
    (["dpo.reference=base"], "dpo.reference: must be initial or precomputed, not 'base'"),
    (["dpo.beta=0"], "dpo.beta: must be a positive finite number, not 0"),
    (["dpo.beta=high"], "dpo.beta: expected a number, got 'high'"),
    (["dpo.loss_type=sigmod"], "dpo.loss_type: must be one of sigmoid"),
    (["data.format=messages"], "data.format: a dpo recipe trains on preference pairs (prompt, chosen, rejected): "
                               "set auto or preference, not messages"),
])
def test_dpo_settings_are_checked_with_one_line_naming_the_key(overrides, message):
    with pytest.raises(QLoRAGuideError) as err:
        load_recipe("dpo", overrides)
    assert str(err.value).startswith(message) and "\n" not in str(err.value)
