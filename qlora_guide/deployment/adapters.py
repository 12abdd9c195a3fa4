"""Several LoRA adapters on one copy of their (4-bit) base, as vLLM's ``--lora-modules`` and PEFT's ``adapter_names`` do.

:func:`load_adapters` loads the first adapter as :func:`~qlora_guide.deployment.loading.load_any`
does (its base in 4 bits when it was trained so), then each further adapter
into the same PEFT model with ``load_adapter``: the base weights are held
once, each adapter adds only its LoRA matrices. Every adapter is checked
first: a safetensors LoRA folder, trained on the same base with the same
quantization, whose matrices fit the base's layers; anything else is a
one-line error before the base is loaded.

Each adapter is served under its folder's name (:class:`ServedAdapter`), and
the base alone under its own name, as vLLM lists a base and its LoRA modules:
the server sends a batch's rows through their own adapters in one forward
pass with ``adapter_names``, and ``"__base__"`` through none, so a
fine-tuned model and its base (or two checkpoints) answer side by side from
one copy of the weights.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qlora_guide.deployment.batching import BASE_ADAPTER
from qlora_guide.deployment.loading import (
    AUTO,
    LoadedModel,
    adapter_base,
    canonical_model_name,
    check_adapter_dir,
    find_adapter_dir,
    load_any,
    lora_shapes_fit,
    run_repetition_penalty,
    training_quantization,
)
from qlora_guide.errors import QLoRAGuideError, first_line

BASE = BASE_ADAPTER


@dataclass(frozen=True)
class ServedAdapter:
    """One adapter of a multi-adapter model: the id clients send, its folder, its name inside PEFT, how it decodes."""

    name: str
    folder: Path
    peft_name: str
    repetition_penalty: float | None = None


def served_name(adapter_dir: str | os.PathLike) -> str:
    """The id an adapter is served under: the name of the folder the user gave (a run, or its ``adapter/``)."""
    return Path(str(adapter_dir)).expanduser().resolve().name


def check_adapters(adapter_dirs: Sequence[str | os.PathLike]) -> list[Path]:
    """Check that the adapters can share one base; return their folders, or raise one line naming the misfit."""
    if not adapter_dirs:
        raise QLoRAGuideError("no adapter to serve: give at least one adapter folder")
    folders = [find_adapter_dir(d) for d in adapter_dirs]
    names = [served_name(d) for d in adapter_dirs]
    for name in names:
        if names.count(name) > 1:
            raise QLoRAGuideError(f"two adapters are both served as '{name}': give folders with different names")
    for folder in folders:
        check_adapter_dir(folder)
    first, first_base = adapter_dirs[0], canonical_model_name(adapter_base(folders[0]))
    first_quant = training_quantization(folders[0])
    for given, folder in zip(adapter_dirs[1:], folders[1:], strict=True):
        base = canonical_model_name(adapter_base(folder))
        if base != first_base:
            raise QLoRAGuideError(
                f"adapter {given} was trained on '{base}' and {first} on '{first_base}': one server holds one base; "
                "serve adapters of different bases from different servers"
            )
        if training_quantization(folder) != first_quant:
            raise QLoRAGuideError(
                f"adapter {given} was trained with another quantization of the base than {first}: "
                "adapters served together must share the base they were trained on, bit for bit"
            )
    return folders


def load_adapters(
    adapter_dirs: Sequence[str | os.PathLike],
    quantization: Any = AUTO,
    device_map: str | dict | None = None,
) -> LoadedModel:
    """Load the adapters (one or more, trained on one base) onto one copy of it; ``lm.adapters`` lists them."""
    folders = check_adapters(adapter_dirs)
    lm = load_any(adapter_dirs[0], quantization=quantization, device_map=device_map)
    model = lm.model
    model.generation_config.repetition_penalty = None  # each adapter decodes as its own run's recipe says
    adapters = {}
    for index, (given, folder) in enumerate(zip(adapter_dirs, folders, strict=True)):
        peft_name = f"adapter{index}" if index else "default"  # the first is loaded by load_any, as PEFT names it
        if index:
            lora_shapes_fit(model.get_base_model(), folder, str(lm.base_model))
            try:
                model.load_adapter(str(folder), adapter_name=peft_name, is_trainable=False)
            except (RuntimeError, ValueError, KeyError) as err:
                first = first_line(err)
                raise QLoRAGuideError(f"adapter {given} does not load beside {adapter_dirs[0]}: {first}") from None
        name = served_name(given)
        adapters[name] = ServedAdapter(name, folder, peft_name, run_repetition_penalty(folder))
    model.eval()
    lm.adapters = adapters
    if len(adapters) > 1:
        lm.kind, lm.name = "adapters", str(lm.base_model)
    return lm
