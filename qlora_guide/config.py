"""Typed configuration: one pydantic model per pipeline stage, loaded from a YAML recipe.

A recipe file has one section per stage::

    model:         which base model
    quantization:  how the frozen base is stored (null = plain LoRA in bf16)
    lora:          the adapters
    data:          what to train on
    training:      the optimisation
    evaluation:    what to measure
    output:        where to write

QLoRA is LoRA plus a quantization section, never a second code path. Field
names are the libraries' own (``r``, ``lora_alpha``, ``bnb_4bit_quant_type``,
``per_device_train_batch_size``...), so what you read here is what you read in
the peft, bitsandbytes and transformers documentation.

Defaults are the guide's settings. Each section is a pydantic model that
refuses unknown keys (``extra="forbid"``); types, bounds (``Field(gt=0)``) and
choices (``Literal``) say what a value may be, and every field has a help text
(``LoraConfig.model_fields["r"].description``, or :func:`field_help`). A wrong
value raises one :class:`~qlora_guide.errors.QLoRAGuideError` line that names
the key: ``training.learning_rate: expected a number, got 'abc'``.

YAML is read with YAML 1.2's booleans and exponents: ``2e-4`` is a number
(PyYAML alone reads a string), and ``yes``, ``no``, ``on`` and ``off`` stay
words unless the field is a boolean (``data.languages: [no]`` keeps Norwegian,
``packing: off`` is false).
"""

from __future__ import annotations

import copy
import difflib
import functools
import importlib.util
import re
import types
import typing
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictInt,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from qlora_guide.errors import QLoRAGuideError
from qlora_guide.outputs import write_text_atomic

RECIPES_DIR = Path(__file__).parent / "recipes"
# The guide's adapters: every projection of a Llama-style block (attention and MLP), the output head apart.
GUIDE_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

Dtype = Literal["float32", "bfloat16", "float16"]
DTYPES: tuple[str, ...] = typing.get_args(Dtype)
# transformers' SchedulerType values, spelled out so that a recipe is checked without importing torch;
# tests/test_config.py fails if transformers adds or drops one.
Schedule = Literal["linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
                   "inverse_sqrt", "reduce_lr_on_plateau", "cosine_with_min_lr", "cosine_warmup_with_min_lr",
                   "warmup_stable_decay", "greedy"]
SCHEDULER_TYPES: tuple[str, ...] = typing.get_args(Schedule)


def _no_bool(value: Any) -> Any:
    if isinstance(value, bool):  # a bool is an int to Python, not a number to a recipe
        raise PydanticCustomError("float_type", "Input should be a valid number")
    return value


# A finite number; a numeric string ("2e-4", as YAML 1.1 reads it) is accepted, true and false are not.
Float = Annotated[float, BeforeValidator(_no_bool), Field(allow_inf_nan=False)]
# An integer, and only an integer: not 2.5, not "8", not true.
Int = StrictInt


def _fail(message: str, key: str | None = None) -> PydanticCustomError:
    """A validator's error: ``message`` follows the key path (``key`` extends it, for a mapping's entry)."""
    return PydanticCustomError("recipe", "{message}", {"message": message, "key": key})


class Section(BaseModel):
    """A recipe section: unknown keys refused, wrong values reported as one line naming the key."""

    model_config = ConfigDict(extra="forbid")
    recipe_section: ClassVar[str] = ""  # the key of this section in a recipe, the prefix of its error messages

    def __init__(self, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as err:
            raise QLoRAGuideError(recipe_error(err, type(self))) from None

    @classmethod
    def from_dict(cls, data: Any) -> Any:
        """Build and check the section from a mapping (as read from YAML)."""
        try:
            return cls.model_validate(data)
        except ValidationError as err:
            raise QLoRAGuideError(recipe_error(err, cls)) from None

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump()


class ModelConfig(Section):
    """The base model to fine-tune."""

    recipe_section: ClassVar[str] = "model"

    name_or_path: str = Field("smollm2-135m", min_length=1, description=(
        "A hub id (mistralai/Mistral-7B-v0.1), a local folder, or 'smollm2-135m' for the embedded model."))
    dtype: Dtype = Field("bfloat16", description="dtype of the weights that are not quantized (float32, bfloat16, float16).")
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = Field(
        "sdpa", description="Attention kernel: sdpa, eager or flash_attention_2.")
    trust_remote_code: bool = Field(False, description=(
        "Run modelling code shipped with a hub model. Off by default: it executes code from the hub."))


class QuantizationConfig(Section):
    """How bitsandbytes stores the frozen base model (the 'Q' of QLoRA)."""

    recipe_section: ClassVar[str] = "quantization"

    load_in_4bit: bool = Field(True, description="Store the base weights in 4 bits (False: 8-bit LLM.int8()).")
    bnb_4bit_quant_type: Literal["nf4", "fp4"] = Field(
        "nf4", description="4-bit data type: nf4 (NormalFloat, for normally distributed weights) or fp4.")
    bnb_4bit_use_double_quant: bool = Field(
        True, description="Quantize the absmax constants too: 0.5 -> about 0.127 extra bits per parameter.")
    bnb_4bit_compute_dtype: Dtype = Field("bfloat16", description="dtype the 4-bit weights are dequantized to for each matmul.")
    bnb_4bit_quant_storage: Literal["float32", "bfloat16", "float16", "uint8"] = Field("uint8", description=(
        "dtype the packed 4-bit codes are stored in; FSDP and DeepSpeed ZeRO-3 shard the weights and need it "
        "equal to the model dtype (bfloat16)."))

    def to_bnb(self) -> Any:
        """The equivalent ``transformers.BitsAndBytesConfig`` (all fields set: its defaults are fp4 and fp32)."""
        import torch
        from transformers import BitsAndBytesConfig

        if not self.load_in_4bit:
            return BitsAndBytesConfig(load_in_8bit=True)
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=self.bnb_4bit_quant_type,
            bnb_4bit_use_double_quant=self.bnb_4bit_use_double_quant,
            bnb_4bit_compute_dtype=getattr(torch, self.bnb_4bit_compute_dtype),
            bnb_4bit_quant_storage=getattr(torch, self.bnb_4bit_quant_storage),
        )


# peft's init_lora_weights values this package runs (besides true, false and pissa_niter_N).
LORA_INITIALISATIONS = ("gaussian", "pissa", "olora", "loftq")
# peft's other initialisations, and why a recipe cannot ask for them.
UNSUPPORTED_INITIALISATIONS = {
    "eva": "it needs a pass over the training data before training (peft.initialize_lora_eva_weights); run it with peft directly",
    "corda": "it needs a pass over calibration data before training (peft's preprocess_corda); run it with peft directly",
    "lora_ga": "it needs the gradients of a pass over the training data; run it with peft directly",
    "orthogonal": "use gaussian or true",
}


class LoraConfig(Section):
    """The low-rank adapters trained on top of the frozen base (peft's LoraConfig)."""

    recipe_section: ClassVar[str] = "lora"

    r: Int = Field(64, gt=0, description="Rank of the update B @ A: its number of trainable directions per layer.")
    lora_alpha: Int = Field(16, gt=0, description="Scale of the update: it is multiplied by lora_alpha / r.")
    lora_dropout: Float = Field(0.05, ge=0, lt=1, description="Dropout on the adapter input during training.")
    bias: Literal["none", "all", "lora_only"] = Field("none", description="Which biases to train: none, all or lora_only.")
    target_modules: list[str] | Literal["all-linear"] = Field(
        default_factory=lambda: list(GUIDE_TARGET_MODULES),
        description="Module names that get adapters, or 'all-linear' for every linear layer but the output head.")
    use_dora: bool = Field(False, description=(
        "DoRA: also train a magnitude per output row and apply the update to the direction of W only "
        "(W' = m * (W + s B A) / |W + s B A|); more memory and time per step."))
    use_rslora: bool = Field(False, description=(
        "rsLoRA: scale the update by lora_alpha / sqrt(r) instead of lora_alpha / r, so that a high rank still learns."))
    init_lora_weights: bool | str = Field(True, description=(
        "How the adapters start: true (B = 0, A Kaiming-uniform), gaussian, pissa or pissa_niter_N (the top "
        "singular directions of W; 16-bit base only), olora (16-bit base only) or loftq (a 4-bit base, on CUDA)."))

    @field_validator("target_modules")
    @classmethod
    def _some_modules(cls, value: list[str] | str) -> list[str] | str:
        if not value:
            raise _fail("must name at least one module (or be all-linear)")
        return value

    @field_validator("init_lora_weights")
    @classmethod
    def _known_initialisation(cls, value: bool | str) -> bool | str:
        if isinstance(value, bool) or value in LORA_INITIALISATIONS or re.fullmatch(r"pissa_niter_[1-9][0-9]*", value):
            return value
        if value in UNSUPPORTED_INITIALISATIONS:
            raise _fail(f"{value} is not supported: {UNSUPPORTED_INITIALISATIONS[value]}")
        close = difflib.get_close_matches(value, [*LORA_INITIALISATIONS, "pissa_niter_4"], n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise _fail(f"must be true, false, {', '.join(LORA_INITIALISATIONS)} or pissa_niter_N, not {value!r}{hint}")

    @property
    def scaling(self) -> float:
        """The factor s of the update s B A: lora_alpha / r, or lora_alpha / sqrt(r) with rsLoRA."""
        return self.lora_alpha / (self.r**0.5 if self.use_rslora else self.r)

    @property
    def changes_base_weights(self) -> bool:
        """PiSSA and OLoRA start from W - B A: the base weights are rewritten before training."""
        return isinstance(self.init_lora_weights, str) and self.init_lora_weights.startswith(("pissa", "olora"))

    def to_peft(self) -> Any:
        """The equivalent ``peft.LoraConfig`` for a causal language model.

        LoftQ is applied after the model is built (``peft.replace_lora_weights_loftq``, on a
        4-bit base): the adapters are created with the default initialisation first.
        """
        import peft

        return peft.LoraConfig(
            r=self.r,
            lora_alpha=self.lora_alpha,
            lora_dropout=self.lora_dropout,
            bias=self.bias,
            target_modules=self.target_modules,
            use_dora=self.use_dora,
            use_rslora=self.use_rslora,
            init_lora_weights=True if self.init_lora_weights == "loftq" else self.init_lora_weights,
            task_type="CAUSAL_LM",
        )


class DataConfig(Section):
    """What to train on and how examples become token sequences."""

    recipe_section: ClassVar[str] = "data"

    path: str = Field("qlora-faq", description=(
        "A local .jsonl/.json/.csv/.parquet file or folder, a hub dataset id, 'qlora-faq' for the bundled bilingual dataset "
        "or 'qlora-prefs' for its preference pairs."))
    format: Literal["auto", "messages", "alpaca", "prompt_completion", "text", "preference"] = Field(
        "auto", description=(
            "Example format: auto, messages, alpaca, prompt_completion, text, or preference (prompt, chosen and "
            "rejected, for a dpo recipe)."))
    train_split: str = Field("train", description="Split used for training.")
    validation_split: str | None = Field(
        "validation", description="Split used for validation; made from the training split when it does not exist.")
    validation_size: Float = Field(
        0.1, gt=0, lt=1, description="Fraction of the training split held out when there is no validation split.")
    max_length: Int = Field(512, ge=16, description="Longest sequence in tokens; longer examples are truncated and counted.")
    train_on_prompt: bool = Field(False, description="Also compute the loss on prompt tokens (off: loss on answers only).")
    packing: bool = Field(True, description=(
        "Concatenate examples up to max_length without cross-example attention, to waste no compute on padding."))
    languages: list[str] | None = Field(None, description=(
        "Keep only examples whose 'lang' field is in this list (the bundled dataset has en and fr)."))


# Recipe fields that transformers' TrainingArguments spells differently (its current names; gradient_checkpointing
# is its deprecated alias of activation_checkpointing, and a warmup_steps below 1 is a ratio of the total steps).
TRAINING_ARGUMENT_NAMES = {"gradient_checkpointing": "activation_checkpointing", "warmup_ratio": "warmup_steps"}
# TrainingArguments fields that qlora_guide.training sets itself, and from what: training.trainer_args may not set them.
PACKAGE_TRAINING_ARGUMENTS = {
    "output_dir": "output.dir",
    "fp16": "training.bf16 and the device",
    "use_cpu": "the device",
    "save_strategy": "training.save_steps",
    "eval_strategy": "data.validation_split and training.eval_steps",
    "load_best_model_at_end": "data.validation_split (the best checkpoint is kept)",
    "metric_for_best_model": "data.validation_split (the validation loss)",
    "greater_is_better": "data.validation_split (the validation loss)",
    "remove_unused_columns": "the collator",
}
# Former names of TrainingArguments fields, which transformers no longer accepts.
TRAINING_ARGUMENT_ALIASES = {"evaluation_strategy": "eval_strategy", "no_cuda": "use_cpu"}


@functools.cache
def training_argument_fields() -> dict[str, str]:
    """Names of transformers' ``TrainingArguments`` fields and their help texts (imports transformers)."""
    import dataclasses

    from transformers import TrainingArguments

    return {f.name: str(f.metadata.get("help", "")) for f in dataclasses.fields(TrainingArguments) if f.init}


class TrainingConfig(Section):
    """Optimisation settings, passed to transformers' TrainingArguments under the same names.

    ``trainer_args`` sets any other TrainingArguments field: ``trainer_args: {adam_beta2: 0.95}``.
    """

    recipe_section: ClassVar[str] = "training"

    num_train_epochs: Float = Field(3, gt=0, description="Passes over the training set.")
    max_steps: Int = Field(-1, ge=-1, description="Stop after this many optimizer steps (-1: use num_train_epochs).")
    per_device_train_batch_size: Int = Field(4, gt=0, description="Sequences per device per forward pass.")
    gradient_accumulation_steps: Int = Field(4, gt=0, description=(
        "Forward passes per optimizer step (effective batch = batch x accumulation x devices)."))
    learning_rate: Float = Field(2e-4, gt=0, description="Peak learning rate of the adapters.")
    lr_scheduler_type: Schedule = Field(
        "constant", description="Learning-rate schedule after warm-up (the QLoRA paper uses constant).")
    warmup_ratio: Float = Field(0.03, ge=0, lt=1, description=(
        "Fraction of the steps spent warming the learning rate up (TrainingArguments' warmup_steps below 1)."))
    max_grad_norm: Float = Field(0.3, gt=0, description="Gradient clipping norm.")
    weight_decay: Float = Field(0.0, ge=0, description="AdamW weight decay on the adapters.")
    optim: str = Field("auto", description=(
        "Optimizer: auto (paged_adamw_32bit on CUDA, adamw_torch on the CPU) or any TrainingArguments optim name."))
    gradient_checkpointing: bool = Field(True, description=(
        "Recompute activations in the backward pass (non-reentrant) to save memory (TrainingArguments' "
        "activation_checkpointing)."))
    bf16: bool | Literal["auto"] = Field("auto", description="Mixed precision in bf16: auto (where supported), true or false.")
    logging_steps: Int = Field(10, gt=0, description="Log the loss every N optimizer steps.")
    save_steps: Int = Field(100, gt=0, description="Write a checkpoint every N optimizer steps.")
    save_total_limit: Int = Field(2, gt=0, description="Checkpoints kept on disk (the best one is always kept).")
    eval_steps: Int | None = Field(None, gt=0, description="Evaluate every N steps (default: save_steps).")
    early_stopping_patience: Int | None = Field(
        None, gt=0, description="Stop after N evaluations without improvement of the validation loss.")
    auto_find_batch_size: bool = Field(False, description=(
        "On an out-of-memory error, retry with a batch 10 % smaller (accelerate's find_executable_batch_size) "
        "until a step fits."))
    seed: Int = Field(42, description="Random seed for data order, dropout and adapter initialisation.")
    report_to: list[str] = Field(default_factory=lambda: ["tensorboard"], validate_default=True,
                                 description="Loggers: tensorboard, none, wandb, ...")
    trainer_args: dict[str, Any] = Field(default_factory=dict, description=(
        "Any other TrainingArguments field, under its own name (adam_beta2: 0.95, lr_scheduler_kwargs: {...}); "
        "checked against transformers' TrainingArguments."))

    @field_validator("report_to")
    @classmethod
    def _loggers_installed(cls, value: list[str]) -> list[str]:
        for logger in value:
            if logger not in ("none", "all") and importlib.util.find_spec(logger) is None:
                raise _fail(f"'{logger}' is not installed (pip install {logger}, or report_to: [tensorboard])")
        return value

    @field_validator("trainer_args")
    @classmethod
    def _known_training_arguments(cls, value: dict[str, Any]) -> dict[str, Any]:
        own = {**{name: name for name in cls.model_fields}, **{v: k for k, v in TRAINING_ARGUMENT_NAMES.items()}}
        for name in value:
            if name in own:
                raise _fail(f"set training.{own[name]} instead", key=str(name))
            if name in PACKAGE_TRAINING_ARGUMENTS:
                raise _fail(f"set by qlora-guide from {PACKAGE_TRAINING_ARGUMENTS[name]}", key=str(name))
        fields = training_argument_fields() if value else {}
        for name in value:
            if name not in fields:
                close = TRAINING_ARGUMENT_ALIASES.get(str(name)) or suggest_key(str(name), list(fields))
                hint = f" (did you mean '{close}'?)" if close else ""
                raise _fail(f"not a field of transformers' TrainingArguments{hint}", key=str(name))
            alias = re.match(r"Deprecated alias of `(\w+)`", fields[name])
            if alias:
                raise _fail(f"a deprecated name in transformers: use {alias.group(1)}", key=str(name))
        return value


class EvaluationConfig(Section):
    """What `qlora-guide evaluate` and the end of training measure."""

    recipe_section: ClassVar[str] = "evaluation"

    split: str = Field("test", description="Split that is evaluated.")
    batch_size: Int = Field(8, gt=0, description="Sequences per forward pass when computing perplexity.")
    max_new_tokens: Int = Field(64, gt=0, description="Longest generated answer for BLEU and chrF.")
    max_samples: Int | None = Field(None, gt=0, description="Evaluate on the first N examples only (None: all).")
    repetition_penalty: Float = Field(1.0, ge=1.0, le=2.0, description=(
        "transformers' GenerationConfig.repetition_penalty for the trained model: logits of tokens already in the "
        "text are divided by it (1.0: off). Saved into the run's generation settings, so evaluate, generate, chat, "
        "serve and merged models decode alike."))


# TRL's DPOConfig.loss_type values (one loss per recipe).
DpoLoss = Literal["sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
                  "aot_unpaired", "apo_zero", "apo_down", "discopop", "sigmoid_norm"]


class DpoConfig(Section):
    """Preference tuning with TRL's DPOTrainer: the adapters learn to prefer each pair's chosen answer.

    A recipe with a ``dpo`` section trains on preference pairs (``prompt``,
    ``chosen``, ``rejected``) instead of answers; everything else (model,
    quantization, adapters, optimisation, run folder) is the same recipe.
    """

    recipe_section: ClassVar[str] = "dpo"

    reference: Literal["initial", "precomputed"] = Field(description=(
        "The reference model the DPO loss compares with, which is the model the run starts from (the base, or "
        "dpo.adapter): initial (its log-probabilities computed at every step, with the adapter disabled or a "
        "frozen copy of it) or precomputed (computed once over the data before training: faster steps)."))
    beta: Float = Field(0.1, gt=0, description=(
        "TRL's beta: how far the tuned model may move from the reference (higher: closer to it)."))
    loss_type: DpoLoss = Field("sigmoid", description="TRL's loss_type: sigmoid (the DPO paper's), ipo, hinge, robust...")
    adapter: str | None = Field(None, description=(
        "Start from this trained adapter (a run folder or its adapter/), usually a supervised run on the same "
        "base; null: new adapters on the base."))


class OutputConfig(Section):
    """Where a run writes its adapter, checkpoints, logs and manifest."""

    recipe_section: ClassVar[str] = "output"

    dir: str = Field("runs/qlora", description="Output folder of the run.")
    overwrite: bool = Field(False, description="Replace an output folder that already holds a run.")


class Recipe(Section):
    """A whole run: one typed section per pipeline stage."""

    name: str = Field("custom", description="Short name of the recipe.")
    description: str = Field("", description="One line saying what the recipe is for.")
    model: ModelConfig = Field(default_factory=ModelConfig, description="The base model.")
    quantization: QuantizationConfig | None = Field(
        default_factory=QuantizationConfig, description="4-bit storage of the base (null: plain LoRA).")
    lora: LoraConfig = Field(default_factory=LoraConfig, description="The adapters.")
    data: DataConfig = Field(default_factory=DataConfig, description="The training data.")
    training: TrainingConfig = Field(default_factory=TrainingConfig, description="The optimisation.")
    evaluation: EvaluationConfig = Field(default_factory=EvaluationConfig, description="The evaluation.")
    dpo: DpoConfig | None = Field(None, description="Preference tuning with TRL's DPOTrainer (null: supervised fine-tuning).")
    output: OutputConfig = Field(default_factory=OutputConfig, description="Where to write.")

    @model_validator(mode="after")
    def _initialisation_fits_base(self) -> Recipe:
        """An initialisation that rewrites W needs W in full precision; LoftQ needs a 4-bit W to correct."""
        init, key = self.lora.init_lora_weights, "lora.init_lora_weights"
        quantized = self.quantization is not None
        if self.lora.changes_base_weights and quantized:
            raise _fail(f"{init} starts from W - B A and rewrites the base weights, which a 4-bit base cannot hold exactly: "
                        "set quantization: null (the adapter is saved as a LoRA of the original weights)", key)
        if self.lora.changes_base_weights and self.lora.use_dora:
            raise _fail(f"{init} with use_dora: peft cannot save the result as an adapter of the original weights", key)
        if init == "loftq" and not (quantized and self.quantization.load_in_4bit):
            raise _fail("loftq starts the adapters so that W_nf4 + s B A is close to W: it needs a 4-bit quantization section", key)
        if self.dpo is not None and self.data.format not in ("auto", "preference"):
            raise _fail(f"a dpo recipe trains on preference pairs (prompt, chosen, rejected): set auto or preference, not {self.data.format}",
                        "data.format")
        if self.dpo is not None and self.dpo.adapter and self.lora.changes_base_weights:
            raise _fail("dpo.adapter continues a trained adapter: its initialisation cannot be chosen again", key)
        return self

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, allow_unicode=True)


# ---------------------------------------------------------------- errors

# Names people often write for a field (other libraries' or the papers' names).
KEY_ALIASES = {"rank": "r", "alpha": "lora_alpha", "dropout": "lora_dropout", "lr": "learning_rate",
               "epochs": "num_train_epochs", "batch_size": "per_device_train_batch_size",
               "grad_accum": "gradient_accumulation_steps", "targets": "target_modules", "model": "name_or_path"}


def suggest_key(key: str, known: list[str]) -> str | None:
    """The known field a mistyped key most likely means: an alias, a close spelling, or a longer name ending with it."""
    if KEY_ALIASES.get(key) in known:
        return KEY_ALIASES[key]
    close = difflib.get_close_matches(key, known, n=1)
    if close:
        return close[0]
    longer = [k for k in known if k.endswith("_" + key) or k.startswith(key + "_")]
    return longer[0] if len(longer) == 1 else None


# What a wrong type was expected to be, by pydantic error type.
_EXPECTED = {
    "int_type": "an integer", "int_parsing": "an integer", "int_from_float": "an integer",
    "float_type": "a number", "float_parsing": "a number",
    "bool_type": "true or false", "bool_parsing": "true or false",
    "string_type": "a string", "list_type": "a list", "dict_type": "a mapping",
}


def _show(value: Any) -> str:
    """A value as the recipe would write it: 'text', 3, true, null."""
    if isinstance(value, bool):
        return str(value).lower()
    if value is None:
        return "null"
    return repr(value) if isinstance(value, str) else str(value)


def _or(words: list[str]) -> str:
    return " or ".join(words) if len(words) <= 2 else f"{', '.join(words[:-1])} or {words[-1]}"


def _model_of(annotation: Any) -> type[Section] | None:
    """The section model an annotation holds (``QuantizationConfig | None`` -> QuantizationConfig), if any."""
    if isinstance(annotation, type) and issubclass(annotation, Section):
        return annotation
    for arg in typing.get_args(annotation):
        found = _model_of(arg)
        if found is not None:
            return found
    return None


def _describe(annotation: Any) -> str:
    """What a value of this annotation may be, in words: 'true, false or auto', 'a list of strings'..."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is Annotated:
        return _describe(args[0])
    if origin is Literal:
        return _or([str(a) for a in args]) if len(args) <= 2 else f"one of {', '.join(map(str, args))}"
    if origin in (typing.Union, types.UnionType):
        parts: list[str] = []
        for arg in args:
            parts += ["null"] if arg is type(None) else [_describe(arg)]
        words = [w for part in parts for w in (part.split(" or ") if part == "true or false" else [part])]
        return _or(words)
    if origin is list:
        return f"a list of {_describe(args[0]).removeprefix('a ').removeprefix('an ')}s" if args else "a list"
    if origin is dict:
        return "a mapping"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(annotation, str(annotation))


def _bounds(field: Any) -> str:
    """What a bounded number may be: 'a positive integer', 'in [0, 1)', 'at least 16'..."""
    limits = {k: getattr(m, k) for m in field.metadata for k in ("gt", "ge", "lt", "le") if getattr(m, k, None) is not None}
    low = ("(", limits["gt"]) if "gt" in limits else ("[", limits["ge"]) if "ge" in limits else None
    high = (")", limits["lt"]) if "lt" in limits else ("]", limits["le"]) if "le" in limits else None
    integer = "integer" in _describe(field.annotation)
    if low and high:
        return f"in {low[0]}{low[1]}, {high[1]}{high[0]}"
    if low and low == ("(", 0):
        return "a positive integer" if integer else "a positive finite number"
    if low:
        return f"{'greater than' if low[0] == '(' else 'at least'} {low[1]}"
    if high:
        return f"{'less than' if high[0] == ')' else 'at most'} {high[1]}"
    return "an integer" if integer else "a finite number"


def _locate(root: type[Section], loc: tuple[Any, ...]) -> tuple[str, type[Section] | None, Any, tuple[Any, ...]]:
    """Dotted key of an error location, the section it ends in, its field, and what follows (union members)."""
    model: type[Section] | None = root
    parts = [root.recipe_section] if root.recipe_section else []
    field = None
    for i, item in enumerate(loc):
        if isinstance(item, int) and parts:
            parts[-1] += f"[{item}]"
        elif model is not None and item in model.model_fields:
            field = model.model_fields[item]
            parts.append(item)
            model = _model_of(field.annotation)
        else:
            return ".".join(parts), model, field, loc[i:]
    return ".".join(parts), model, field, ()


def recipe_error(err: ValidationError, root: type[Section]) -> str:
    """pydantic's errors as one line naming the first wrong key: ``lora.r: must be a positive integer, not 0``."""
    errors = err.errors(include_url=False)
    key, model, field, rest = _locate(root, errors[0]["loc"])
    first = errors[0]
    kind = first["type"]
    if kind == "extra_forbidden":
        unknown = str(rest[0]) if rest else key
        full = f"{key}.{unknown}" if key else unknown
        close = suggest_key(unknown, list(model.model_fields)) if model else None
        return f"unknown recipe key '{full}'" + (f" (did you mean '{close}'?)" if close else "")
    if kind == "recipe":
        ctx = first.get("ctx") or {}
        where = ".".join(part for part in (key, ctx.get("key")) if part)
        return f"{where}: {ctx.get('message', first['msg'])}"
    if not key:
        return f"recipe must be a mapping of sections, not {type(first['input']).__name__}"
    if kind in ("model_type", "model_attributes_type"):
        return f"{key}: must be a mapping of {model.__name__ if model else 'section'} fields, got {_show(first['input'])}"
    if rest and field is not None:  # none of the members of a union: say what the field takes
        same = [e for e in errors if _locate(root, e["loc"])[0] == key]
        value = min(same, key=lambda e: len(e["loc"]))["input"]
        return f"{key}: must be {_describe(field.annotation)}, not {_show(value)}"
    if kind in _EXPECTED:
        return f"{key}: expected {_EXPECTED[kind]}, got {_show(first['input'])}"
    if kind == "literal_error" and field is not None:
        choices = [str(c) for c in typing.get_args(field.annotation)] or []
        close = difflib.get_close_matches(str(first["input"]), choices, n=1, cutoff=0.8) if isinstance(first["input"], str) else []
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        return f"{key}: must be {_describe(field.annotation)}, not {_show(first['input'])}{hint}"
    if kind == "missing" and field is not None:
        return f"{key}: required: {field.description}"
    if kind in ("string_too_short", "too_short"):
        return f"{key}: must not be empty"
    if kind in ("greater_than", "greater_than_equal", "less_than", "less_than_equal", "finite_number") and field is not None:
        return f"{key}: must be {_bounds(field)}, not {_show(first['input'])}"
    message = str(first["msg"]).removeprefix("Value error, ")
    return f"{key}: {message[:1].lower()}{message[1:]} (got {_show(first['input'])})"


# ---------------------------------------------------------------- YAML


class RecipeLoader(yaml.SafeLoader):
    """PyYAML's safe loader with YAML 1.2's booleans and exponents: ``2e-4`` is a float, ``no`` a word."""


RecipeLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
RecipeLoader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))
RecipeLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"), list("-+0123456789"))


def read_yaml(text: str) -> Any:
    """A YAML document read with :class:`RecipeLoader`."""
    return yaml.load(text, Loader=RecipeLoader)  # a SafeLoader: builds plain data only


# ---------------------------------------------------------------- recipes


def bundled_recipes() -> dict[str, Path]:
    """Names and files of the recipes shipped with the package (launcher configs live in subfolders)."""
    return {p.stem: p for p in sorted(RECIPES_DIR.glob("*.yaml"))}


# Files that a recipe needs next to it, copied along with it (recipe name -> files under recipes/).
RECIPE_COMPANIONS = {"llama-3-70b-fsdp": ["accelerate/fsdp_qlora.yaml"]}


def copy_recipe(name: str, dest: str | Path, overwrite: bool = False) -> list[Path]:
    """Copy a bundled recipe (and the launcher config it needs) to ``dest`` to edit it.

    ``dest`` is a folder (the file keeps its name) or a ``.yaml`` file name.
    Returns the files written, the recipe first; an existing file is never
    replaced unless ``overwrite``.
    """
    recipes = bundled_recipes()
    if name not in recipes:
        raise QLoRAGuideError(f"no bundled recipe '{name}' (bundled: {', '.join(recipes)})")
    dest = Path(dest).expanduser()
    if dest.suffix not in (".yaml", ".yml") and dest.exists() and not dest.is_dir():
        raise QLoRAGuideError(f"{dest} is a file, not a folder: give a folder or a .yaml file name")
    target = dest if dest.suffix in (".yaml", ".yml") else dest / recipes[name].name
    copies = [(recipes[name], target)]
    copies += [(RECIPES_DIR / extra, target.parent / extra.replace("/", "_")) for extra in RECIPE_COMPANIONS.get(name, [])]
    for _, out in copies:
        if out.exists() and not overwrite:
            raise QLoRAGuideError(f"{out} already exists: choose another destination or pass --overwrite")
    target.parent.mkdir(parents=True, exist_ok=True)
    for source, out in copies:
        write_text_atomic(out, source.read_text(encoding="utf-8"))
    return [out for _, out in copies]


def recipe_path(name_or_path: str | Path) -> Path:
    """A bundled recipe's file, or the given path if it exists."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    recipes = bundled_recipes()
    if str(name_or_path) in recipes:
        return recipes[str(name_or_path)]
    raise QLoRAGuideError(f"no recipe '{name_or_path}': not a file, nor one of the bundled recipes ({', '.join(recipes)})")


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"training.learning_rate=1e-4"`` -> (["training", "learning_rate"], 1e-4), values read as YAML."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise QLoRAGuideError(f"override '{text}' must look like section.key=value")
    try:
        value = read_yaml(raw)
    except yaml.YAMLError:
        value = raw
    return key.strip().split("."), value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Set dotted keys in a raw recipe mapping (validation happens afterwards, in :meth:`Recipe.from_dict`)."""
    for text in overrides:
        keys, value = parse_override(text)
        node = data
        for key in keys[:-1]:
            if node.get(key) is None:
                node[key] = {}
            node = node[key]
            if not isinstance(node, dict):
                raise QLoRAGuideError(f"override '{text}': '{key}' is not a section")
        node[keys[-1]] = value
    return data


def scheduler_types() -> tuple[str, ...]:
    """The learning-rate schedules transformers' Trainer knows (its ``SchedulerType``)."""
    return SCHEDULER_TYPES


def load_recipe(name_or_path: str | Path | dict, overrides: list[str] | None = None) -> Recipe:
    """Load and validate a recipe from a bundled name, a YAML file or a mapping, then apply ``--set`` overrides."""
    if isinstance(name_or_path, dict):
        data = copy.deepcopy(name_or_path)  # overrides must not change the caller's mapping
    else:
        path = recipe_path(name_or_path)
        try:
            data = read_yaml(path.read_text(encoding="utf-8"))
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f" line {mark.line + 1}" if mark else ""
            raise QLoRAGuideError(f"recipe {path} is not valid YAML{where}: {getattr(err, 'problem', err)}") from None
        if data is None:
            raise QLoRAGuideError(f"recipe {path} is empty: start from a bundled one (qlora-guide recipes --copy demo {path.name})")
        if not isinstance(data, dict):
            raise QLoRAGuideError(f"recipe {path} must be a mapping of sections, not {type(data).__name__}")
    data = apply_overrides(data, overrides or [])
    return Recipe.from_dict(data)


def field_help(cls: type[BaseModel]) -> dict[str, str]:
    """Help text of each field of a recipe section (its pydantic description), for docs and ``--help``."""
    return {name: info.description or "" for name, info in cls.model_fields.items()}
