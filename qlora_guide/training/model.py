"""The model a run trains: the 4-bit (or 16-bit) base, prepared for k-bit training, with LoRA adapters."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

import peft
import transformers

from qlora_guide.config import LoraConfig, Recipe
from qlora_guide.errors import QLoRAGuideError
from qlora_guide.models import load_model
from qlora_guide.outputs import replace_folder, staging_folder
from qlora_guide.precision import Precision, use_differentiable_4bit_kernel
from qlora_guide.training.devices import fsdp_enabled

log = logging.getLogger(__name__)


def check_target_modules(model: Any, lora: LoraConfig) -> None:
    """Fail early, naming the module, when a LoRA target is not a module of the model."""
    if isinstance(lora.target_modules, str):
        return
    names = [name for name, _ in model.named_modules()]
    for target in lora.target_modules:
        if not any(name == target or name.endswith("." + target) for name in names):
            linear = sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules() if "Linear" in type(m).__name__} - {"lm_head"})
            raise QLoRAGuideError(
                f"lora.target_modules: '{target}' is not a module of {model.config.model_type} (its linear layers: {', '.join(linear)}; or use all-linear)"
            )


def check_initialisation(lora: LoraConfig) -> None:
    """Refuse, before any model loads, an initialisation this machine cannot run (LoftQ on a 4-bit base needs CUDA)."""
    import torch

    if lora.init_lora_weights == "loftq" and not (torch.cuda.is_available() or torch.xpu.is_available()):
        raise QLoRAGuideError(
            "lora.init_lora_weights: loftq on a 4-bit base runs on CUDA or XPU only (peft's replace_lora_weights_loftq), "
            "and this machine has neither: use true, gaussian, or pissa with quantization: null"
        )


def start_from_loftq(model: Any, lora: LoraConfig) -> None:
    """LoftQ: set each adapter so that W_nf4 + s B A is closest to the original W (one alternating step)."""
    if lora.init_lora_weights == "loftq":
        peft.replace_lora_weights_loftq(model)


def build_model(recipe: Recipe, precision: Precision) -> Any:
    """The base model (4-bit when the recipe quantizes) with trainable LoRA adapters."""
    check_initialisation(recipe.lora)
    quantization = recipe.quantization
    if quantization is not None and quantization.bnb_4bit_compute_dtype != precision.compute_dtype:
        quantization = quantization.model_copy(update={"bnb_4bit_compute_dtype": precision.compute_dtype})
    dtype = precision.model_dtype
    if fsdp_enabled() and quantization is not None:
        if quantization.bnb_4bit_quant_storage != dtype:
            raise QLoRAGuideError(
                f"FSDP shards only one dtype: set quantization.bnb_4bit_quant_storage={dtype} (now {quantization.bnb_4bit_quant_storage})"
            )
    model = load_model(
        recipe.model.name_or_path,
        quantization=quantization,
        dtype=dtype,
        trust_remote_code=recipe.model.trust_remote_code,
        attn_implementation=recipe.model.attn_implementation,
    )
    model.config.use_cache = False  # a KV cache is useless in training and disables packed attention masks
    use_differentiable_4bit_kernel(model)
    check_target_modules(model, recipe.lora)
    checkpointing = recipe.training.gradient_checkpointing
    ckpt_kwargs = {"use_reentrant": False}
    if quantization is not None and not fsdp_enabled():
        model = peft.prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=checkpointing, gradient_checkpointing_kwargs=ckpt_kwargs
        )
    elif checkpointing:  # FSDP keeps one dtype, so the fp32 up-casting of prepare_model_for_kbit_training is skipped
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=ckpt_kwargs)
        model.enable_input_require_grads()
    transformers.set_seed(recipe.training.seed)  # the adapters' initialisation
    adapter = start_adapter(recipe)
    if adapter is not None:  # preference tuning that continues a trained adapter
        return peft.PeftModel.from_pretrained(model, str(adapter), is_trainable=True)
    try:
        model = peft.get_peft_model(model, recipe.lora.to_peft())
    except ValueError as err:
        raise QLoRAGuideError(f"lora: {str(err).splitlines()[0]}") from None
    start_from_loftq(model, recipe.lora)
    return model


def start_adapter(recipe: Recipe) -> Path | None:
    """The adapter folder a dpo recipe continues (``dpo.adapter``), checked against the recipe: same base model,
    same LoRA shape (r, lora_alpha, target modules, DoRA), so that the recipe says what is trained."""
    if recipe.dpo is None or not recipe.dpo.adapter:
        return None
    from qlora_guide.deployment.loading import adapter_base, check_adapter_dir, find_adapter_dir

    folder = find_adapter_dir(recipe.dpo.adapter)
    saved = check_adapter_dir(folder)
    base = adapter_base(folder)
    if base != recipe.model.name_or_path:
        raise QLoRAGuideError(f"dpo.adapter: {folder} was trained on {base}, not on model.name_or_path {recipe.model.name_or_path}")
    wanted = recipe.lora.to_peft()
    for key in ("r", "lora_alpha", "use_dora", "use_rslora"):
        if saved.get(key) != getattr(wanted, key):
            raise QLoRAGuideError(f"dpo.adapter: its {key} is {saved.get(key)}, the recipe's lora.{key} is {getattr(wanted, key)}: make them equal")
    if not isinstance(recipe.lora.target_modules, str) and set(saved.get("target_modules") or []) != set(recipe.lora.target_modules):
        raise QLoRAGuideError(f"dpo.adapter: it adapts {sorted(saved.get('target_modules') or [])}, the recipe's lora.target_modules "
                              f"are {sorted(recipe.lora.target_modules)}: make them equal")
    return folder


def save_initial_adapter(model: Any, folder: Path) -> None:
    """Keep the adapters as PiSSA or OLoRA initialised them, written whole or not at all: the final adapter is
    saved as the difference from them (a LoRA of the original weights, of rank 2 r)."""
    if folder.exists():
        return  # a resumed run keeps the one it started from
    staging = staging_folder(folder, "initial adapter")
    config = model.peft_config["default"]
    init, config.init_lora_weights = config.init_lora_weights, True  # it loads as a plain adapter
    try:
        model.save_pretrained(str(staging))
        replace_folder(staging, folder)
    finally:
        config.init_lora_weights = init
        shutil.rmtree(staging, ignore_errors=True)


def trainable_parameters(model: Any) -> tuple[int, int]:
    """(trainable, all) parameter counts; a 4-bit weight counts as its number of values, not bytes."""
    return tuple(model.get_nb_trainable_parameters())  # type: ignore[return-value]
