"""The model a run trains: the 4-bit (or 16-bit) base, prepared for k-bit training, with LoRA adapters."""

from __future__ import annotations

import logging
from typing import Any

import peft
import transformers

from qlora_guide.config import LoraConfig, Recipe
from qlora_guide.errors import QLoRAGuideError
from qlora_guide.models import load_model
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


def build_model(recipe: Recipe, precision: Precision) -> Any:
    """The base model (4-bit when the recipe quantizes) with trainable LoRA adapters."""

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
    try:
        model = peft.get_peft_model(model, recipe.lora.to_peft())
    except ValueError as err:
        raise QLoRAGuideError(f"lora: {str(err).splitlines()[0]}") from None
    return model


def trainable_parameters(model: Any) -> tuple[int, int]:
    """(trainable, all) parameter counts; a 4-bit weight counts as its number of values, not bytes."""
    return tuple(model.get_nb_trainable_parameters())  # type: ignore[return-value]
