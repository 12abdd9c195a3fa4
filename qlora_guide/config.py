"""Typed configuration: one dataclass per pipeline stage, loaded from a YAML recipe.

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

Defaults are the guide's settings. Every field has a help text
(``dataclasses.fields(LoraConfig)[0].metadata["help"]``); wrong values raise a
:class:`~qlora_guide.errors.QLoRAGuideError` that names the field.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import importlib.util
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

from qlora_guide.errors import QLoRAGuideError
from qlora_guide.outputs import write_text_atomic

RECIPES_DIR = Path(__file__).parent / "recipes"
GUIDE_TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
DTYPES = ("float32", "bfloat16", "float16")


def _field(default: Any, help: str, **kwargs: Any) -> Any:
    """A dataclass field with a help text (mutable defaults are copied per instance)."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help}, **kwargs)
    return field(default=default, metadata={"help": help}, **kwargs)


def _require(condition: bool, name: str, message: str) -> None:
    if not condition:
        raise QLoRAGuideError(f"{name}: {message}")


@dataclass
class ModelConfig:
    """The base model to fine-tune."""

    name_or_path: str = _field("smollm2-135m", "A hub id (mistralai/Mistral-7B-v0.1), a local folder, or 'smollm2-135m' for the embedded model.")
    dtype: str = _field("bfloat16", "dtype of the weights that are not quantized (float32, bfloat16, float16).")
    attn_implementation: str = _field("sdpa", "Attention kernel: sdpa, eager or flash_attention_2.")
    trust_remote_code: bool = _field(False, "Run modelling code shipped with a hub model. Off by default: it executes code from the hub.")

    def __post_init__(self) -> None:
        _require(bool(self.name_or_path), "model.name_or_path", "must not be empty")
        _require(self.dtype in DTYPES, "model.dtype", f"must be one of {', '.join(DTYPES)}, not '{self.dtype}'")
        allowed = ("sdpa", "eager", "flash_attention_2")
        _require(self.attn_implementation in allowed, "model.attn_implementation", f"must be one of {', '.join(allowed)}")


@dataclass
class QuantizationConfig:
    """How bitsandbytes stores the frozen base model (the 'Q' of QLoRA)."""

    load_in_4bit: bool = _field(True, "Store the base weights in 4 bits (False: 8-bit LLM.int8()).")
    bnb_4bit_quant_type: str = _field("nf4", "4-bit data type: nf4 (NormalFloat, for normally distributed weights) or fp4.")
    bnb_4bit_use_double_quant: bool = _field(True, "Quantize the absmax constants too: 0.5 -> about 0.127 extra bits per parameter.")
    bnb_4bit_compute_dtype: str = _field("bfloat16", "dtype the 4-bit weights are dequantized to for each matmul.")
    bnb_4bit_quant_storage: str = _field("uint8", "dtype the packed 4-bit codes are stored in; FSDP and DeepSpeed ZeRO-3 shard the weights and need it equal to the model dtype (bfloat16).")

    def __post_init__(self) -> None:
        _require(self.bnb_4bit_quant_type in ("nf4", "fp4"), "quantization.bnb_4bit_quant_type", f"must be nf4 or fp4, not '{self.bnb_4bit_quant_type}'")
        _require(self.bnb_4bit_compute_dtype in DTYPES, "quantization.bnb_4bit_compute_dtype", f"must be one of {', '.join(DTYPES)}")
        storage = (*DTYPES, "uint8")
        _require(self.bnb_4bit_quant_storage in storage, "quantization.bnb_4bit_quant_storage", f"must be one of {', '.join(storage)}")

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


@dataclass
class LoraConfig:
    """The low-rank adapters trained on top of the frozen base (peft's LoraConfig)."""

    r: int = _field(64, "Rank of the update B @ A: its number of trainable directions per layer.")
    lora_alpha: int = _field(16, "Scale of the update: it is multiplied by lora_alpha / r.")
    lora_dropout: float = _field(0.05, "Dropout on the adapter input during training.")
    bias: str = _field("none", "Which biases to train: none, all or lora_only.")
    target_modules: list[str] | str = _field(GUIDE_TARGET_MODULES, "Module names that get adapters, or 'all-linear' for every linear layer but the output head.")

    def __post_init__(self) -> None:
        _require(self.r > 0, "lora.r", f"must be a positive integer, not {self.r}")
        _require(self.lora_alpha > 0, "lora.lora_alpha", f"must be positive, not {self.lora_alpha}")
        _require(0 <= self.lora_dropout < 1, "lora.lora_dropout", f"must be in [0, 1), not {self.lora_dropout}")
        _require(self.bias in ("none", "all", "lora_only"), "lora.bias", f"must be none, all or lora_only, not '{self.bias}'")
        if isinstance(self.target_modules, str):
            _require(self.target_modules == "all-linear", "lora.target_modules", "must be a list of module names or 'all-linear'")
        else:
            _require(len(self.target_modules) > 0, "lora.target_modules", "must not be empty")

    def to_peft(self) -> Any:
        """The equivalent ``peft.LoraConfig`` for a causal language model."""
        import peft

        return peft.LoraConfig(
            r=self.r,
            lora_alpha=self.lora_alpha,
            lora_dropout=self.lora_dropout,
            bias=self.bias,
            target_modules=self.target_modules,
            task_type="CAUSAL_LM",
        )


@dataclass
class DataConfig:
    """What to train on and how examples become token sequences."""

    path: str = _field("qlora-faq", "A local .jsonl/.json/.csv/.parquet file or folder, a hub dataset id, or 'qlora-faq' for the bundled bilingual dataset.")
    format: str = _field("auto", "Example format: auto, messages, alpaca, prompt_completion or text.")
    train_split: str = _field("train", "Split used for training.")
    validation_split: str | None = _field("validation", "Split used for validation; made from the training split when it does not exist.")
    validation_size: float = _field(0.1, "Fraction of the training split held out when there is no validation split.")
    max_length: int = _field(512, "Longest sequence in tokens; longer examples are truncated and counted.")
    train_on_prompt: bool = _field(False, "Also compute the loss on prompt tokens (off: loss on answers only).")
    packing: bool = _field(True, "Concatenate examples up to max_length without cross-example attention, to waste no compute on padding.")
    languages: list[str] | None = _field(None, "Keep only examples whose 'lang' field is in this list (the bundled dataset has en and fr).")

    def __post_init__(self) -> None:
        formats = ("auto", "messages", "alpaca", "prompt_completion", "text")
        _require(self.format in formats, "data.format", f"must be one of {', '.join(formats)}, not '{self.format}'")
        _require(0 < self.validation_size < 1, "data.validation_size", f"must be in (0, 1), not {self.validation_size}")
        _require(self.max_length >= 16, "data.max_length", f"must be at least 16, not {self.max_length}")


@dataclass
class TrainingConfig:
    """Optimisation settings, passed to transformers' TrainingArguments under the same names."""

    num_train_epochs: float = _field(3, "Passes over the training set.")
    max_steps: int = _field(-1, "Stop after this many optimizer steps (-1: use num_train_epochs).")
    per_device_train_batch_size: int = _field(4, "Sequences per device per forward pass.")
    gradient_accumulation_steps: int = _field(4, "Forward passes per optimizer step (effective batch = batch x accumulation x devices).")
    learning_rate: float = _field(2e-4, "Peak learning rate of the adapters.")
    lr_scheduler_type: str = _field("constant", "Learning-rate schedule after warm-up (the QLoRA paper uses constant).")
    warmup_ratio: float = _field(0.03, "Fraction of the steps spent warming the learning rate up.")
    max_grad_norm: float = _field(0.3, "Gradient clipping norm.")
    weight_decay: float = _field(0.0, "AdamW weight decay on the adapters.")
    optim: str = _field("auto", "Optimizer: auto (paged_adamw_32bit on CUDA, adamw_torch on the CPU) or any TrainingArguments optim name.")
    gradient_checkpointing: bool = _field(True, "Recompute activations in the backward pass (non-reentrant) to save memory.")
    bf16: bool | str = _field("auto", "Mixed precision in bf16: auto (where supported), true or false.")
    logging_steps: int = _field(10, "Log the loss every N optimizer steps.")
    save_steps: int = _field(100, "Write a checkpoint every N optimizer steps.")
    save_total_limit: int = _field(2, "Checkpoints kept on disk (the best one is always kept).")
    eval_steps: int | None = _field(None, "Evaluate every N steps (default: save_steps).")
    early_stopping_patience: int | None = _field(None, "Stop after N evaluations without improvement of the validation loss.")
    auto_find_batch_size: bool = _field(False, "On an out-of-memory error, retry with a batch 10 % smaller (accelerate's find_executable_batch_size) until a step fits.")
    seed: int = _field(42, "Random seed for data order, dropout and adapter initialisation.")
    report_to: list[str] = _field(["tensorboard"], "Loggers: tensorboard, none, wandb, ...")

    def __post_init__(self) -> None:
        _require(math.isfinite(self.learning_rate) and self.learning_rate > 0, "training.learning_rate",
                 f"must be a positive finite number, not {self.learning_rate}")
        _require(self.lr_scheduler_type in scheduler_types(), "training.lr_scheduler_type",
                 f"unknown schedule '{self.lr_scheduler_type}' (transformers has: {', '.join(scheduler_types())})")
        for logger in self.report_to:
            _require(logger in ("none", "all") or importlib.util.find_spec(logger) is not None, "training.report_to",
                     f"'{logger}' is not installed (pip install {logger}, or report_to: [tensorboard])")
        _require(self.num_train_epochs > 0, "training.num_train_epochs", "must be positive")
        for name in ("per_device_train_batch_size", "gradient_accumulation_steps", "logging_steps", "save_steps", "save_total_limit"):
            _require(getattr(self, name) > 0, f"training.{name}", f"must be a positive integer, not {getattr(self, name)}")
        _require(0 <= self.warmup_ratio < 1, "training.warmup_ratio", "must be in [0, 1)")
        _require(self.max_grad_norm > 0, "training.max_grad_norm", "must be positive")
        _require(self.bf16 in (True, False, "auto"), "training.bf16", "must be true, false or auto")


@dataclass
class EvaluationConfig:
    """What `qlora-guide evaluate` and the end of training measure."""

    split: str = _field("test", "Split that is evaluated.")
    batch_size: int = _field(8, "Sequences per forward pass when computing perplexity.")
    max_new_tokens: int = _field(64, "Longest generated answer for BLEU and chrF.")
    max_samples: int | None = _field(None, "Evaluate on the first N examples only (None: all).")
    repetition_penalty: float = _field(
        1.0,
        "transformers' GenerationConfig.repetition_penalty for the trained model: logits of tokens already in the "
        "text are divided by it (1.0: off). Saved into the run's generation settings, so evaluate, generate, chat, "
        "serve and merged models decode alike.",
    )

    def __post_init__(self) -> None:
        _require(self.batch_size > 0, "evaluation.batch_size", "must be a positive integer")
        _require(self.max_new_tokens > 0, "evaluation.max_new_tokens", "must be a positive integer")
        _require(1.0 <= self.repetition_penalty <= 2.0, "evaluation.repetition_penalty", "must be between 1.0 (off) and 2.0")


@dataclass
class OutputConfig:
    """Where a run writes its adapter, checkpoints, logs and manifest."""

    dir: str = _field("runs/qlora", "Output folder of the run.")
    overwrite: bool = _field(False, "Replace an output folder that already holds a run.")


@dataclass
class Recipe:
    """A whole run: one typed section per pipeline stage."""

    name: str = _field("custom", "Short name of the recipe.")
    description: str = _field("", "One line saying what the recipe is for.")
    model: ModelConfig = field(default_factory=ModelConfig, metadata={"help": "The base model."})
    quantization: QuantizationConfig | None = field(default_factory=QuantizationConfig, metadata={"help": "4-bit storage of the base (null: plain LoRA)."})
    lora: LoraConfig = field(default_factory=LoraConfig, metadata={"help": "The adapters."})
    data: DataConfig = field(default_factory=DataConfig, metadata={"help": "The training data."})
    training: TrainingConfig = field(default_factory=TrainingConfig, metadata={"help": "The optimisation."})
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig, metadata={"help": "The evaluation."})
    output: OutputConfig = field(default_factory=OutputConfig, metadata={"help": "Where to write."})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        import yaml

        return yaml.safe_dump(self.to_dict(), sort_keys=False, allow_unicode=True)


# ---------------------------------------------------------------- loading


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _convert(value: Any, tp: Any, name: str) -> Any:
    """Check ``value`` against the annotation ``tp`` and build nested dataclasses."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None:
            _require(type(None) in options, name, "must not be null")
            return None
        present = [o for o in options if o is not type(None)]
        if len(present) == 1:  # Optional[X]: X's own error names the wrong field
            return _convert(value, present[0], name)
        errors = []
        for option in present:
            try:
                return _convert(value, option, name)
            except QLoRAGuideError as err:
                errors.append(str(err))
        raise QLoRAGuideError(f"{name}: expected {' or '.join(_type_name(o) for o in options)}, got {value!r}")
    if dataclasses.is_dataclass(tp):
        _require(isinstance(value, dict), name, f"must be a mapping of {tp.__name__} fields, got {value!r}")
        return from_dict(tp, value, prefix=name)
    if origin is list:
        _require(isinstance(value, list), name, f"expected a list, got {value!r}")
        (item,) = typing.get_args(tp)
        return [_convert(v, item, f"{name}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        _require(isinstance(value, bool), name, f"expected true or false, got {value!r}")
        return value
    if tp is int:
        _require(isinstance(value, int) and not isinstance(value, bool), name, f"expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML reads 2e-4 as a string
            try:
                value = float(value)
            except ValueError:
                pass
        _require(isinstance(value, (int, float)) and not isinstance(value, bool), name, f"expected a number, got {value!r}")
        return float(value)
    if tp is str:
        _require(isinstance(value, str), name, f"expected a string, got {value!r}")
        return value
    raise TypeError(f"unsupported annotation {tp} for {name}")


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


def from_dict(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    """Build the dataclass ``cls`` from a mapping; unknown keys and wrong types name the key."""
    hints = typing.get_type_hints(cls)
    known = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        full = f"{prefix}.{key}" if prefix else str(key)
        if key not in known:
            close = suggest_key(str(key), known)
            hint = f" (did you mean '{close}'?)" if close else ""
            raise QLoRAGuideError(f"unknown recipe key '{full}'{hint}")
        kwargs[key] = _convert(value, hints[key], full)
    return cls(**kwargs)


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
    import yaml

    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise QLoRAGuideError(f"override '{text}' must look like section.key=value")
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError:
        value = raw
    return key.strip().split("."), value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Set dotted keys in a raw recipe mapping (validation happens afterwards, in :func:`from_dict`)."""
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


# transformers' SchedulerType values, spelled out so that a recipe is checked without importing torch;
# tests/test_config.py fails if transformers adds or drops one.
SCHEDULER_TYPES = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
                   "inverse_sqrt", "reduce_lr_on_plateau", "cosine_with_min_lr", "cosine_warmup_with_min_lr",
                   "warmup_stable_decay", "greedy")


def scheduler_types() -> tuple[str, ...]:
    """The learning-rate schedules transformers' Trainer knows (its ``SchedulerType``)."""
    return SCHEDULER_TYPES


def load_recipe(name_or_path: str | Path | dict, overrides: list[str] | None = None) -> Recipe:
    """Load and validate a recipe from a bundled name, a YAML file or a mapping, then apply ``--set`` overrides."""
    import yaml

    if isinstance(name_or_path, dict):
        data = copy.deepcopy(name_or_path)  # overrides must not change the caller's mapping
    else:
        path = recipe_path(name_or_path)
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f" line {mark.line + 1}" if mark else ""
            raise QLoRAGuideError(f"recipe {path} is not valid YAML{where}: {getattr(err, 'problem', err)}") from None
        if data is None:
            raise QLoRAGuideError(f"recipe {path} is empty: start from a bundled one (qlora-guide recipes --copy demo {path.name})")
        if not isinstance(data, dict):
            raise QLoRAGuideError(f"recipe {path} must be a mapping of sections, not {type(data).__name__}")
    data = apply_overrides(data, overrides or [])
    return from_dict(Recipe, data)


def field_help(cls: type) -> dict[str, str]:
    """Help text of each field of a config dataclass, for docs and ``--help``."""
    return {f.name: f.metadata.get("help", "") for f in dataclasses.fields(cls)}
