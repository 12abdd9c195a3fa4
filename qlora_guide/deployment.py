"""Deployment: load an adapter for inference, merge it into a plain model, generate, chat, inspect.

The guide's original loading code, with the current transformers API::

    config = PeftConfig.from_pretrained(adapter_dir)
    base = load_model(config.base_model_name_or_path, quantization=QuantizationConfig())
    model = PeftModel.from_pretrained(base, adapter_dir)

:func:`load_adapter_model` does exactly that, after checking what it is about
to load: the folder has an ``adapter_config.json``, the weights are a complete
``adapter_model.safetensors`` (a pickled ``adapter_model.bin`` is refused,
never unpickled), and every LoRA matrix fits a layer of the base model.

Merging (:func:`merge_adapter`) folds ``W + (lora_alpha / r) * B @ A`` into
plain weights (float32 by default), so the result loads with transformers
alone. *Which* ``W`` matters: a QLoRA adapter was trained on top of the NF4
weights, so it is merged into those weights dequantized to float32, not into
the original bf16 checkpoint (see :func:`merge_adapter`).

A model reference (``model_ref``) is one of: an alias such as
``smollm2-135m``, a hub id, a model folder (``config.json``: a base or a merged
model), or an adapter folder (``adapter_config.json``). :func:`load_any` turns
any of them into a :class:`LoadedModel` that :func:`generate`, :func:`chat`,
the server and the evaluation share.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import math
import os
import re
import shutil
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from qlora_guide import progress
from qlora_guide.errors import QLoRAGuideError
from qlora_guide.outputs import check_output_folder, replace_folder, staging_folder
from qlora_guide.precision import cpu_compute_dtype, use_differentiable_4bit_kernel

if TYPE_CHECKING:  # pragma: no cover
    from qlora_guide.config import QuantizationConfig

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PICKLED_WEIGHTS = ("adapter_model.bin", "adapter_model.pt", "adapter_model.pth")
RUN_MANIFEST = "manifest.json"
RECIPE_FILE = "recipe.yaml"
METRICS_FILE = "metrics.json"
EMBEDDED_FOLDER = re.compile(r"^SmolLM2-135M-Instruct-v\d+$")
AUTO = "auto"

DEFAULT_PARITY_PROMPTS = (
    "What is QLoRA?",
    "Explain NF4 quantization in one sentence.",
    "Qu'est-ce qu'un adaptateur LoRA ?",
)


# ------------------------------------------------------------------ reading folders


def read_json(path: Path, what: str) -> dict[str, Any]:
    """Read a JSON object, or raise a one-line error naming the file."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as err:
        raise QLoRAGuideError(f"cannot read {what} {path}: {err.strerror}") from None
    except ValueError as err:
        raise QLoRAGuideError(f"{what} {path} is not valid JSON ({err})") from None
    if not isinstance(data, dict):
        raise QLoRAGuideError(f"{what} {path} must hold a JSON object, not {type(data).__name__}")
    return data


def read_manifest(folder: str | os.PathLike) -> dict[str, Any]:
    """The run manifest of an adapter or merged folder, or ``{}`` when there is none."""
    path = Path(folder) / RUN_MANIFEST
    return read_json(path, "manifest") if path.is_file() else {}


def find_adapter_dir(path: str | os.PathLike) -> Path:
    """The folder that holds the adapter: ``path`` itself, or its ``adapter/`` sub-folder."""
    folder = Path(path).expanduser()
    if not folder.exists():
        raise QLoRAGuideError(f"adapter folder {folder} does not exist")
    if not folder.is_dir():
        raise QLoRAGuideError(f"{folder} is a file, not an adapter folder")
    if not (folder / ADAPTER_CONFIG).is_file() and (folder / "adapter" / ADAPTER_CONFIG).is_file():
        return folder / "adapter"
    return folder


def run_root(adapter_dir: str | os.PathLike) -> Path:
    """The folder with the run's manifest.json and recipe.yaml: the adapter folder or its parent.

    ``qlora-guide train`` writes ``RUN/adapter/`` (the adapter) next to
    ``RUN/manifest.json`` and ``RUN/recipe.yaml``; a merged model or a
    hand-made adapter keeps them in its own folder.
    """
    folder = Path(adapter_dir).expanduser()
    for candidate in (folder, folder.parent):
        if (candidate / RUN_MANIFEST).is_file() or (candidate / RECIPE_FILE).is_file():
            return candidate
    return folder


def check_adapter_dir(path: str | os.PathLike) -> dict[str, Any]:
    """Check an adapter folder before anything loads it; return its ``adapter_config.json``.

    Refuses, with one line each: a missing folder or config, a config that is
    not a LoRA config, a folder whose only weights are a pickle file
    (``adapter_model.bin``: loading a pickle can run arbitrary code, so it is
    never opened), and a truncated or corrupt ``adapter_model.safetensors``.

    peft itself falls back to ``torch.load(adapter_model.bin)`` when no
    safetensors file is present; this check runs first so that never happens.
    """
    from safetensors import SafetensorError, safe_open

    folder = find_adapter_dir(path)
    config_path = folder / ADAPTER_CONFIG
    if not config_path.is_file():
        if (folder / "config.json").is_file():
            raise QLoRAGuideError(f"{folder} is a full model folder (config.json), not an adapter: it has no {ADAPTER_CONFIG}")
        raise QLoRAGuideError(f"{folder} has no {ADAPTER_CONFIG}: it is not a peft adapter folder")
    config = read_json(config_path, "adapter config")
    peft_type = config.get("peft_type")
    if peft_type != "LORA":
        raise QLoRAGuideError(f"{config_path}: only LoRA adapters are supported, this one is {peft_type or 'of no known type'}")
    weights = folder / ADAPTER_WEIGHTS
    if not weights.is_file():
        pickled = [name for name in PICKLED_WEIGHTS if (folder / name).is_file()]
        if pickled:
            raise QLoRAGuideError(
                f"{folder} holds {pickled[0]}, a pickle file (loading it can run code), and no {ADAPTER_WEIGHTS}: "
                "only safetensors adapters are loaded; convert it with safetensors where you trust its origin"
            )
        raise QLoRAGuideError(f"{folder} has no {ADAPTER_WEIGHTS}")
    try:
        with safe_open(str(weights), framework="pt") as f:
            keys = list(f.keys())
            for key in keys:  # reading each tensor catches a damaged data section too
                f.get_slice(key).get_shape()
    except (SafetensorError, OSError, ValueError) as err:
        raise QLoRAGuideError(f"{weights} is corrupt or truncated ({str(err).splitlines()[0]})") from None
    if not any(".lora_A." in k or ".lora_B." in k for k in keys):
        raise QLoRAGuideError(f"{weights} holds no LoRA weights (no lora_A / lora_B tensors)")
    return config


def is_embedded_path(name: str) -> bool:
    """True for the embedded model's cache folder, here or as recorded on another machine."""
    return bool(EMBEDDED_FOLDER.match(Path(str(name)).name))


def canonical_model_name(name: str | os.PathLike | None) -> str:
    """One name per base model: aliases and cache paths of the embedded model become ``smollm2-135m``."""
    from qlora_guide.models import EMBEDDED_ALIASES, EMBEDDED_MODEL

    text = str(name) if name is not None else EMBEDDED_MODEL
    if text in EMBEDDED_ALIASES or is_embedded_path(text):
        return EMBEDDED_MODEL
    path = Path(text).expanduser()
    if path.exists():
        return str(path.resolve())
    return text


def manifest_base(manifest: dict[str, Any]) -> str | None:
    """The base model a manifest records (``base_model`` as a string, or a mapping with a name)."""
    base = manifest.get("base_model") or manifest.get("base")
    if isinstance(base, dict):
        base = base.get("alias") or base.get("name") or base.get("name_or_path")
    return str(base) if base else None


def adapter_base(adapter_dir: str | os.PathLike, config: dict[str, Any] | None = None) -> str:
    """The base model an adapter was trained on, as a name :func:`~qlora_guide.models.load_model` accepts.

    The manifest written by training records the name the user gave (for
    example ``smollm2-135m``); peft records ``base_model_name_or_path``, which
    for a local model is a path on the training machine, such as the
    embedded model's cache folder. The manifest wins; a recorded cache path of
    the embedded model maps back to its alias; a path that no longer exists is
    an error rather than a hub lookup of a path.
    """
    folder = find_adapter_dir(adapter_dir)
    recorded = manifest_base(read_manifest(run_root(folder)))
    if recorded is None:
        config = config if config is not None else read_json(folder / ADAPTER_CONFIG, "adapter config")
        recorded = config.get("base_model_name_or_path")
    if not recorded:
        raise QLoRAGuideError(f"{folder}: neither manifest.json nor {ADAPTER_CONFIG} names the base model; pass base=...")
    recorded = str(recorded)
    canonical = canonical_model_name(recorded)
    if canonical == "smollm2-135m":
        return canonical
    if os.path.isabs(recorded) and not Path(recorded).exists():
        raise QLoRAGuideError(f"the adapter's base model folder {recorded} does not exist on this machine: pass the base explicitly")
    return recorded


def training_quantization(adapter_dir: str | os.PathLike) -> QuantizationConfig | None:
    """The quantization the adapter was trained with: the run's recipe, else the guide's NF4 default.

    ``None`` means plain LoRA on a bf16 base (a recipe with ``quantization: null``).
    """
    from qlora_guide.config import QuantizationConfig, load_recipe

    recipe = run_root(find_adapter_dir(adapter_dir)) / RECIPE_FILE
    if recipe.is_file():
        return load_recipe(recipe).quantization
    return QuantizationConfig()


def apply_run_generation_settings(model: Any, adapter_dir: str | os.PathLike) -> None:
    """Decode as the run's recipe says (``evaluation.repetition_penalty``), through the model's generation config.

    Everything that generates (evaluation, ``generate``, ``chat``, the server,
    the parity checks) calls ``model.generate`` without overriding it, and a
    merged model saves it in its ``generation_config.json``: one setting, the
    same decoding everywhere.
    """
    from qlora_guide.config import load_recipe

    recipe = run_root(find_adapter_dir(adapter_dir)) / RECIPE_FILE
    if recipe.is_file() and getattr(model, "generation_config", None) is not None:
        penalty = load_recipe(recipe).evaluation.repetition_penalty
        model.generation_config.repetition_penalty = penalty if penalty != 1.0 else None


# ------------------------------------------------------------------ loading


def _lora_shapes_fit(model: Any, adapter_dir: Path, base_name: str) -> None:
    """Check that every LoRA matrix of the adapter fits a layer of ``model``; raise naming the first misfit.

    peft only warns about adapter keys it cannot place, and a wrong base with
    the same layer names fails deep inside ``load_state_dict``; this check gives
    one clear line instead.
    """
    from safetensors import safe_open

    with safe_open(str(adapter_dir / ADAPTER_WEIGHTS), framework="pt") as f:
        shapes = {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}
    modules = dict(model.named_modules())
    for key, shape in sorted(shapes.items()):
        match = re.match(r"^(?:base_model\.model\.)?(.+)\.lora_([AB])(?:\.[^.]+)?\.weight$", key)
        if not match:
            continue
        module_name, which = match.groups()
        module = modules.get(module_name)
        if module is None:
            raise QLoRAGuideError(
                f"adapter {adapter_dir} does not match base '{base_name}': it has weights for '{module_name}', "
                "a layer this base does not have (was it trained on another model?)"
            )
        in_features = getattr(module, "in_features", None)
        out_features = getattr(module, "out_features", None)
        if in_features is None or out_features is None:
            continue  # embeddings and other layer types: peft checks them
        expected_dim = in_features if which == "A" else out_features
        got_dim = shape[1] if which == "A" else shape[0]
        if len(shape) != 2 or got_dim != expected_dim:
            raise QLoRAGuideError(
                f"adapter {adapter_dir} does not match base '{base_name}': lora_{which} of '{module_name}' has shape "
                f"{list(shape)}, but that layer is {in_features} -> {out_features} (was it trained on another model?)"
            )


def load_adapter_model(
    adapter_dir: str | os.PathLike,
    quantization: QuantizationConfig | None | str = AUTO,
    base: str | None = None,
    dtype: str = "bfloat16",
    device_map: str | dict | None = None,
    is_trainable: bool = False,
    allow_other_base: bool = False,
    base_model: Any = None,
) -> Any:
    """Load a LoRA adapter on its (4-bit) base for inference: ``PeftConfig`` -> base -> ``PeftModel``.

    ``quantization="auto"`` uses what the adapter was trained with (the run's
    recipe; NF4 with double quantization by default), ``None`` a bf16 base.
    ``base`` overrides the recorded base model; a different model than the one
    recorded is refused unless ``allow_other_base=True``, and a base whose
    layers do not fit the adapter is always refused. ``base_model`` passes an
    already loaded base (it is modified in place by peft). ``is_trainable=True``
    keeps the adapter trainable, to continue training it.
    """
    from peft import PeftConfig, PeftModel

    from qlora_guide.models import load_model

    folder = find_adapter_dir(adapter_dir)
    check_adapter_dir(folder)
    peft_config = PeftConfig.from_pretrained(str(folder))
    recorded = adapter_base(folder)
    base_name = base or recorded
    if base and not allow_other_base and canonical_model_name(base) != canonical_model_name(recorded):
        raise QLoRAGuideError(
            f"adapter {folder} was trained on '{recorded}', not '{base}': load it on its own base "
            "(or pass allow_other_base=True if the two are the same weights)"
        )
    if quantization == AUTO:
        quantization = training_quantization(folder)
    if base_model is None:
        base_model = load_model(base_name, quantization=quantization, dtype=dtype, device_map=device_map)
    _lora_shapes_fit(base_model, folder, base_name)
    peft_config.inference_mode = not is_trainable
    try:
        model = PeftModel.from_pretrained(base_model, str(folder), config=peft_config, is_trainable=is_trainable)
    except (RuntimeError, ValueError, KeyError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise QLoRAGuideError(f"adapter {folder} does not load on base '{base_name}': {first}") from None
    if not is_trainable:
        model.eval()
        apply_run_generation_settings(model, folder)
    return model


def model_kind(model_ref: str | os.PathLike) -> str:
    """``"adapter"`` (adapter_config.json), ``"model"`` (a folder with config.json) or ``"hub"`` (an alias or hub id)."""
    path = Path(str(model_ref)).expanduser()
    if path.is_dir():
        if (path / ADAPTER_CONFIG).is_file() or (path / "adapter" / ADAPTER_CONFIG).is_file():
            return "adapter"
        if (path / "config.json").is_file():
            return "model"
        if any((path / name).is_file() for name in (ADAPTER_WEIGHTS, *PICKLED_WEIGHTS)):
            raise QLoRAGuideError(f"{path} holds adapter weights but no {ADAPTER_CONFIG}: it is not a usable adapter folder")
        raise QLoRAGuideError(f"{path} is neither a model folder (config.json) nor an adapter folder ({ADAPTER_CONFIG})")
    if path.exists():
        raise QLoRAGuideError(f"{path} is a file: give a model folder, an adapter folder or a model name")
    return "hub"


@dataclass
class LoadedModel:
    """A model ready to generate, with its tokenizer and where it came from."""

    model: Any
    tokenizer: Any
    kind: str  # "adapter", "model" (a base or merged folder) or "hub"
    name: str  # a short id: the folder name or the model name
    source: str  # what the user gave
    base_model: str | None = None
    quantized: bool = False
    load_seconds: float = 0.0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def context_length(self) -> int:
        """Longest sequence (prompt + answer) the model takes, from its config."""
        config = self.model.config
        length = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None) or 2048
        tokenizer_max = getattr(self.tokenizer, "model_max_length", None)
        if isinstance(tokenizer_max, int) and 0 < tokenizer_max < length:
            length = tokenizer_max
        return int(length)

    @property
    def device(self) -> Any:
        return next(self.model.parameters()).device


def _load_tokenizer_for(folder: Path | None, fallback: str) -> Any:
    """The tokenizer saved with a run or merged model, else the base model's."""
    from qlora_guide.models import load_tokenizer

    if folder is not None and ((folder / "tokenizer.json").is_file() or (folder / "tokenizer_config.json").is_file()):
        return load_tokenizer(folder)
    return load_tokenizer(fallback)


def saved_dtype(folder: str | os.PathLike) -> str:
    """The dtype a model folder's weights were saved in (``config.json``), bfloat16 when it does not say."""
    config = read_json(Path(folder) / "config.json", "model config")
    dtype = str(config.get("dtype") or config.get("torch_dtype") or "bfloat16").removeprefix("torch.")
    return dtype if dtype in MERGE_DTYPES else "bfloat16"


@progress.library_bars()
def load_any(
    model_ref: Any,
    quantization: QuantizationConfig | None | str = AUTO,
    dtype: str = AUTO,
    device_map: str | dict | None = None,
) -> LoadedModel:
    """Load a base, merged or adapter model from one reference (see the module docstring).

    ``quantization="auto"``: an adapter loads on the base it was trained on
    (4-bit for QLoRA), a plain model in ``dtype``. ``dtype="auto"``: a model
    folder loads in the dtype it was saved in (a float32 merge stays float32),
    anything else in bfloat16; on a CPU without native bf16, bfloat16 weights
    load as float32 (the same values, computed many times faster). Pass a
    :class:`~qlora_guide.config.QuantizationConfig` to load any of them in 4 bits.
    A :class:`LoadedModel` is returned unchanged.
    """
    from qlora_guide.models import default_device_map, load_model

    if isinstance(model_ref, LoadedModel):
        return model_ref
    start = time.perf_counter()
    kind = model_kind(model_ref)
    on_cpu = (device_map or default_device_map()) == "cpu"
    if dtype == AUTO:
        dtype = saved_dtype(model_ref) if kind == "model" else "bfloat16"
        if on_cpu:
            dtype = cpu_compute_dtype(dtype)  # bf16 is only emulated on many CPUs, and then far slower than float32
    if kind == "adapter":
        folder = find_adapter_dir(model_ref)
        if quantization == AUTO and on_cpu:
            # the 4-bit layers compute as the run trained here: float32 where the CPU only emulates bf16
            quantization = training_quantization(folder)
            if quantization is not None:
                quantization = dataclasses.replace(quantization, bnb_4bit_compute_dtype=cpu_compute_dtype(quantization.bnb_4bit_compute_dtype))
        model = load_adapter_model(folder, quantization=quantization, dtype=dtype, device_map=device_map)
        base = adapter_base(folder)
        tokenizer = _load_tokenizer_for(folder if (folder / "tokenizer_config.json").is_file() else folder.parent, base)
        name = Path(str(model_ref)).expanduser().resolve().name
    else:
        quant = None if quantization == AUTO else quantization
        model = load_model(str(model_ref), quantization=quant, dtype=dtype, device_map=device_map)
        model.eval()
        folder = Path(str(model_ref)).expanduser() if kind == "model" else None
        tokenizer = _load_tokenizer_for(folder, str(model_ref))
        base = manifest_base(read_manifest(folder)) if folder else str(model_ref)
        name = folder.resolve().name if folder else str(model_ref)
    quantized = bool(getattr(getattr(model, "config", None), "quantization_config", None)) or bool(
        getattr(model, "is_loaded_in_4bit", False)
    )
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        kind=kind,
        name=name,
        source=str(model_ref),
        base_model=base,
        quantized=quantized,
        load_seconds=time.perf_counter() - start,
    )


# ------------------------------------------------------------------ merging


MERGE_DTYPES = ("float32", "bfloat16", "float16")
UNIT_ROUNDOFF = {"float32": 2.0**-24, "bfloat16": 2.0**-8, "float16": 2.0**-11}


def _dequantized_weights(model: Any) -> dict[str, Any]:
    """The float32 weight of every bitsandbytes 4-bit layer, exactly as its forward pass sees it.

    Every NF4 value is a code times its block's scale, which float32 holds
    exactly enough for the merge's arithmetic; bf16 would round it. On the CPU,
    bitsandbytes repacks a layer's codes into a CPU-specific layout the first
    time the layer runs in inference mode, after which
    ``dequantize_4bit(weight.data, quant_state)`` returns garbage
    (transformers' ``model.dequantize()`` is affected); such a layer is
    unpacked first with bitsandbytes' own inverse.
    """
    import bitsandbytes as bnb
    import torch

    weights = {}
    for name, module in model.named_modules():
        if not isinstance(module, bnb.nn.Linear4bit):
            continue
        data, state = module.weight.data, module.weight.quant_state
        if getattr(state, "packing_format_for_cpu", False):
            from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

            data, state = _convert_weight_packed_for_cpu_inverse(data, state)
            module.weight.data, module.weight.quant_state = data, state
        with torch.no_grad():
            weights[f"{name}.weight"] = bnb.functional.dequantize_4bit(data, state).to(torch.float32).clone()
    return weights


def _float32_quantization(quantization: QuantizationConfig) -> QuantizationConfig:
    """The same 4-bit weights, computing in float32: the exact arithmetic a merge is checked against."""
    import dataclasses

    return dataclasses.replace(quantization, bnb_4bit_compute_dtype="float32")


def _load_dequantized(base_name: str, quantization: QuantizationConfig) -> tuple[Any, Any]:
    """The 4-bit base (computing in float32), and a float32 model whose linear layers hold its NF4 weights.

    The dequantized weights are the ones the adapter saw during QLoRA
    training. Everything bitsandbytes does not quantize (embeddings, norms,
    the output head) comes from the original checkpoint, as in the 4-bit
    model. The 4-bit model is returned too, as the reference of the parity check.
    """
    from qlora_guide.models import load_model

    quantized = load_model(base_name, quantization=_float32_quantization(quantization))
    use_differentiable_4bit_kernel(quantized)  # float32 arithmetic, not bitsandbytes' bf16 CPU kernel
    weights = _dequantized_weights(quantized)
    model = load_model(base_name, dtype="float32")
    params = dict(model.named_parameters())
    missing = [name for name in weights if name not in params]
    if missing:
        raise QLoRAGuideError(f"cannot dequantize '{base_name}': the plain model has no parameter {missing[0]}")
    for name, weight in weights.items():
        params[name].data.copy_(weight.to(device=params[name].device))
    return quantized, model


def load_dequantized(base_name: str = "smollm2-135m", quantization: QuantizationConfig | None = None) -> Any:
    """The 4-bit model's weights, dequantized once to float32: the same model as the 4-bit one, exactly.

    A 4-bit layer dequantizes its weights again at every forward pass, so
    generating one token at a time on a CPU spends much of its time
    dequantizing. This model holds the result of that dequantization instead:
    it computes what the 4-bit model computes in float32 arithmetic, faster,
    in four times the memory (the evaluation page checks that their logits agree).
    ``quantization`` defaults to NF4 with double quantization.
    """
    from qlora_guide.config import QuantizationConfig

    quantized, model = _load_dequantized(base_name, quantization or QuantizationConfig())
    del quantized
    gc.collect()
    return model.eval()


def _lora_layers(model: Any) -> list[tuple[str, Any, Any, Any, int]]:
    """Every LoRA layer of a PeftModel: (name, layer, exact update ``s B A``, its terms ``|s| |B| |A|``, r), in float64."""
    from peft.tuners.lora import LoraLayer

    layers = []
    for name, module in model.named_modules():
        if not isinstance(module, LoraLayer):
            continue
        for adapter in module.active_adapters:
            if adapter not in module.lora_A:
                continue
            a = module.lora_A[adapter].weight.detach().double()
            b = module.lora_B[adapter].weight.detach().double()
            scale = module.scaling[adapter]
            delta, terms = (b @ a) * scale, (b.abs() @ a.abs()) * abs(scale)
            if getattr(module, "fan_in_fan_out", False):
                delta, terms = delta.T, terms.T
            layers.append((name, module, delta, terms, module.r[adapter]))
    return layers


def update_rounding(model: Any, dtypes: tuple[str, ...] = MERGE_DTYPES) -> dict[str, Any]:
    """How much of the LoRA update each save dtype would lose, and the exact merged weights' error bound.

    For every adapted layer, the exact merged weight is ``W + s B A`` (float64).
    Storing it in a dtype rounds it; ``lost_share[dtype]`` is the size of that
    rounding error relative to the update itself (Frobenius norms over all
    layers): 0.5 means the stored weights misstate the update by half its size.
    The update is small next to ``W``, so a dtype with 8 significant bits
    (bfloat16) can lose most of it while barely changing ``W``.
    """
    import torch

    err2 = dict.fromkeys(dtypes, 0.0)
    update2, layers = 0.0, []
    for name, module, delta, _terms, _r in _lora_layers(model):
        target = module.get_base_layer().weight.detach().double() + delta
        update2 += float((delta**2).sum())
        for dtype in dtypes:
            stored = target.to(getattr(torch, dtype)).double()
            err2[dtype] += float(((stored - target) ** 2).sum())
        layers.append(name)
    if not layers:
        raise QLoRAGuideError("the model has no LoRA layer to merge")
    share = {d: math.sqrt(err2[d] / update2) if update2 else 0.0 for d in dtypes}
    return {"lost_share": share, "update_norm": math.sqrt(update2), "layers": len(layers)}


def _exact_targets(model: Any) -> dict[str, tuple[Any, Any]]:
    """Per LoRA layer, before merging: the exact merged weight (float64) and what float32 rounding may change in it.

    The bound: ``r + 1`` roundings of the terms of ``s B A``, then the sum and
    its storage, each at most one unit roundoff (what :func:`merge_adapter`
    checks, element by element).
    """
    u = UNIT_ROUNDOFF["float32"]
    targets = {}
    for name, module, delta, terms, r in _lora_layers(model):
        target = module.get_base_layer().weight.detach().double() + delta
        targets[name] = (target, (r + 1) * u * terms + 2 * u * target.abs())
    return targets


def _check_merged_weights(merged: Any, targets: dict[str, tuple[Any, Any]], dtype: str) -> dict[str, Any]:
    """Compare each stored merged weight with its exact value: within the float32 bound plus one rounding to ``dtype``?"""
    modules = dict(merged.named_modules())
    worst = 0.0
    for name, (target, bound) in targets.items():
        key = name.removeprefix("base_model.model.")
        stored = modules[key].weight.detach().double()
        allowed = bound + UNIT_ROUNDOFF[dtype] * target.abs() + 1e-45
        worst = max(worst, float(((stored - target).abs() / allowed).max()))
    return {"weights_within_bound": worst <= 1.0, "max_error_over_bound": round(worst, 4), "checked_layers": len(targets)}


@dataclass
class MergeResult:
    """What :func:`merge_adapter` wrote and how closely the merged model matches the adapter model."""

    out_dir: str
    adapter_dir: str
    base_model: str
    merged_into: str  # "dequantized NF4 weights" or "base weights" (plain LoRA)
    dtype: str
    size_bytes: int
    seconds: float
    parity: dict[str, Any] = field(default_factory=dict)
    naive_merge: dict[str, Any] = field(default_factory=dict)
    rounding: dict[str, Any] = field(default_factory=dict)
    weights: dict[str, Any] = field(default_factory=dict)
    explanation: str = ""

    def to_dict(self) -> dict[str, Any]:
        from dataclasses import asdict

        return asdict(self)


MERGE_EXPLANATION = (
    "A QLoRA adapter is trained on top of the 4-bit NF4 weights: its update B @ A learned to correct the "
    "output of the dequantized weights W_nf4, not of the original bf16 weights W. Merging it into W_nf4 "
    "(dequantized to float32) gives the model that was trained, up to the rounding of the saved dtype. Merging "
    "it into the original W instead adds the update to weights that differ from W_nf4 by the quantization "
    "error (about 10 % of each weight's magnitude for NF4), so the merged model is a different model: its "
    "logits move by about as much as quantization moved them, and greedy answers can change."
)


def _parity_inputs(tokenizer: Any, prompts: tuple[str, ...] | list[str]) -> list[Any]:
    """Chat-formatted token ids of a few prompts, for logit and generation parity checks."""
    return [chat_input_ids(tokenizer, [{"role": "user", "content": p}]) for p in prompts]


def _logits(model: Any, inputs: list[Any]) -> list[Any]:
    """Float32 logits of each input, on the CPU."""
    import torch

    device = next(model.parameters()).device
    with torch.no_grad():
        return [model(input_ids=ids.to(device)).logits.float().cpu() for ids in inputs]


def _outputs(model: Any, inputs: list[Any], max_new_tokens: int) -> dict[str, list[Any]]:
    """What parity compares: the logits of each input and its greedy continuation."""
    return {"logits": _logits(model, inputs), "greedy": [greedy_ids(model, ids, max_new_tokens) for ids in inputs]}


def _compare(reference: dict[str, list[Any]], candidate: dict[str, list[Any]]) -> dict[str, Any]:
    """Max and mean absolute logit difference, and whether greedy answers agree token for token."""
    diffs = [(a - b).abs() for a, b in zip(reference["logits"], candidate["logits"], strict=True)]
    agree = [a == b for a, b in zip(reference["greedy"], candidate["greedy"], strict=True)]
    return {
        "max_logit_diff": round(max(d.max().item() for d in diffs), 6),
        "mean_logit_diff": round(sum(d.mean().item() for d in diffs) / len(diffs), 6),
        "greedy_agree": all(agree),
        "greedy_agree_count": f"{sum(agree)}/{len(agree)}",
        "prompts": len(diffs),
        "max_new_tokens": max((len(g) for g in reference["greedy"]), default=0),
    }


def greedy_ids(model: Any, input_ids: Any, max_new_tokens: int) -> list[int]:
    """The token ids of a greedy continuation (no sampling, no stopping before max_new_tokens but EOS)."""
    import torch

    input_ids = input_ids.to(next(model.parameters()).device)
    with torch.no_grad():
        out = model.generate(
            input_ids=input_ids,
            attention_mask=torch.ones_like(input_ids),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=_pad_id(model),
        )
    return out[0, input_ids.shape[1] :].tolist()


def _pad_id(model: Any) -> int | None:
    config = getattr(model, "generation_config", None)
    pad = getattr(config, "pad_token_id", None)
    if pad is None:
        eos = getattr(config, "eos_token_id", None)
        pad = eos[0] if isinstance(eos, list) else eos
    return pad


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


@progress.library_bars()
def merge_adapter(
    adapter_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    overwrite: bool = False,
    dtype: str = "float32",
    check_parity: bool = True,
    compare_naive: bool = True,
    parity_prompts: tuple[str, ...] | list[str] = DEFAULT_PARITY_PROMPTS,
    parity_tokens: int = 16,
) -> MergeResult:
    """Merge a (Q)LoRA adapter into its base and save a plain transformers model in ``dtype``.

    Steps: load the 4-bit base the adapter was trained on; dequantize its NF4
    layers to float32 (the weights the adapter was trained against); load the
    adapter on that and ``merge_and_unload()`` in float32; save safetensors
    weights in ``dtype``, the tokenizer with its chat template and a
    ``manifest.json`` into a staging folder next to ``out_dir``, renamed into
    place when complete. The result loads with
    ``AutoModelForCausalLM.from_pretrained`` alone, without peft or bitsandbytes.

    Why float32 by default: the update ``s B A`` is small next to ``W``, and
    rounding their sum to bfloat16 (8 significant bits) can lose most of it;
    ``rounding["lost_share"]`` says how much each dtype would lose, so a
    user can choose ``bfloat16`` knowingly (half the size).

    Checks: ``weights`` compares every merged weight with the exact
    ``W_nf4 + s B A`` against the bound float arithmetic allows (see
    :func:`update_rounding`). ``parity`` (``check_parity``) runs the merged
    model and the 4-bit + adapter model, both in float32 arithmetic, on the
    same chat prompts: max and mean absolute logit difference, and whether
    greedy answers agree; ``arithmetic_floor_max_logit_diff`` is the same
    difference between the two bases alone. ``naive_merge`` (``compare_naive``)
    does the same for the adapter merged into the *original* weights, which is
    not the trained model: see ``MERGE_EXPLANATION``. An adapter trained
    without quantization is merged into its base weights directly.
    """
    from qlora_guide.models import load_model, torch_dtype

    if dtype not in MERGE_DTYPES:
        raise QLoRAGuideError(f"dtype '{dtype}': merge saves float32, bfloat16 or float16")
    start = time.perf_counter()
    folder = find_adapter_dir(adapter_dir)
    check_adapter_dir(folder)
    out_dir = check_output_folder(out_dir, overwrite, "merged", inputs=(run_root(folder), folder), legacy=("manifest.json",))
    base_name = adapter_base(folder)
    quantization = training_quantization(folder)
    tokenizer = _load_tokenizer_for(folder if (folder / "tokenizer_config.json").is_file() else folder.parent, base_name)
    inputs = _parity_inputs(tokenizer, parity_prompts) if check_parity else []
    stage = progress.Stages("merge", 4 + 2 * check_parity)
    stage("loading the base")
    quantized = None
    if quantization is not None:
        quantized, plain = _load_dequantized(base_name, quantization)
        merged_into = f"dequantized {quantization.bnb_4bit_quant_type.upper()} weights"
    else:
        plain = load_model(base_name, dtype="float32")
        merged_into = "base weights"
    unmerged = load_adapter_model(folder, base_model=plain)
    stage("merging in float32")
    rounding = update_rounding(unmerged)
    targets = _exact_targets(unmerged)
    floor = None
    if check_parity and quantized is not None:
        with unmerged.disable_adapter():
            floor = _logits(unmerged, inputs)
    merged = unmerged.merge_and_unload()
    apply_run_generation_settings(merged, folder)
    merged.to(torch_dtype(dtype))
    merged.eval()
    stage("checking every merged weight")
    weights = _check_merged_weights(merged, targets, dtype)
    del targets

    parity: dict[str, Any] = {}
    naive: dict[str, Any] = {}
    naive_wanted = quantized is not None
    if check_parity:
        stage("parity with the adapter model")
        if quantized is None:
            adapter_model = load_adapter_model(folder, quantization=None, dtype="float32")
        else:
            adapter_model = load_adapter_model(folder, base_model=quantized)
        reference = _outputs(adapter_model, inputs, parity_tokens)
        parity = _compare(reference, _outputs(merged, inputs, parity_tokens))
        if floor is not None:
            with adapter_model.disable_adapter():
                base_4bit = _logits(adapter_model, inputs)
            parity["arithmetic_floor_max_logit_diff"] = round(
                max((a - b).abs().max().item() for a, b in zip(base_4bit, floor, strict=True)), 6
            )
        del adapter_model, quantized
        gc.collect()  # the naive merge loads another whole model: free the 4-bit one first
        stage("the naive merge, for comparison")
        if compare_naive and naive_wanted:
            original = load_model(base_name, dtype="float32")
            naive_model = load_adapter_model(folder, base_model=original).merge_and_unload()
            naive = _compare(reference, _outputs(naive_model, inputs, parity_tokens))
            del naive_model, original
    del unmerged
    gc.collect()

    stage("saving")
    staging = staging_folder(out_dir, "merged")
    try:
        merged.config._name_or_path = str(out_dir)
        merged.config.dtype = dtype
        if hasattr(merged.config, "quantization_config"):
            del merged.config.quantization_config
        merged.save_pretrained(staging, safe_serialization=True)
        tokenizer.padding_side = "right"
        tokenizer.save_pretrained(staging)
        result = MergeResult(
            out_dir=str(out_dir),
            adapter_dir=str(folder),
            base_model=base_name,
            merged_into=merged_into,
            dtype=dtype,
            size_bytes=0,
            seconds=0.0,
            parity=parity,
            naive_merge=naive,
            rounding=rounding,
            weights=weights,
            explanation=MERGE_EXPLANATION if quantization is not None else "",
        )
        source_manifest = read_manifest(run_root(folder))
        manifest = {
            "kind": "merged",
            "base_model": base_name,
            "adapter_dir": str(folder.resolve()),
            "merged_into": merged_into,
            "dtype": dtype,
            "parity": parity,
            "naive_merge": naive,
            "rounding": rounding,
            "weights": weights,
            "adapter_manifest": source_manifest,
            "versions": _versions(),
        }
        (staging / RUN_MANIFEST).write_text(json.dumps(manifest, indent=2, default=str))
        recipe = run_root(folder) / RECIPE_FILE
        if recipe.is_file():
            shutil.copy2(recipe, staging / RECIPE_FILE)
        replace_folder(staging, out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        stage.close()
    result.size_bytes = _folder_bytes(out_dir)
    result.seconds = round(time.perf_counter() - start, 2)
    return result


def load_merged_4bit(merged_dir: str | os.PathLike, quantization: QuantizationConfig | None = None) -> LoadedModel:
    """The "4-bit merged-back" model: a merged folder quantized to NF4 again at load time.

    It is as small as the 4-bit base and needs no adapter at inference, but
    quantizing ``W_nf4 + B @ A`` rounds the adapter's update into the 4-bit
    grid, so it is not exactly the trained model either.
    """
    from qlora_guide.config import QuantizationConfig

    return load_any(merged_dir, quantization=quantization or QuantizationConfig())


def format_merge_result(result: MergeResult | dict[str, Any]) -> str:
    """A few lines for the terminal."""
    r = result.to_dict() if hasattr(result, "to_dict") else result
    lines = [
        f"merged {r['adapter_dir']} into {r['merged_into']} of {r['base_model']}",
        f"saved  {r['out_dir']} ({r['size_bytes'] / 2**20:.0f} MiB, {r['dtype']}, loads without peft or bitsandbytes)",
    ]
    if r.get("weights"):
        w = r["weights"]
        verdict = "within" if w["weights_within_bound"] else "OUTSIDE"
        lines.append(
            f"merged weights vs exact W + (lora_alpha/r) B A: {verdict} the float rounding bound "
            f"in all {w['checked_layers']} layers (worst error {w['max_error_over_bound']:.2f} x the bound)"
        )
    if r.get("rounding"):
        lost = r["rounding"]["lost_share"]
        shares = ", ".join(f"{d} {100 * lost[d]:.3g} %" for d in MERGE_DTYPES if d in lost)
        lines.append(f"rounding error of the saved weights, as a share of the LoRA update: {shares}")
    if r.get("parity"):
        p = r["parity"]
        floor = p.get("arithmetic_floor_max_logit_diff")
        floor_text = f" (the 4-bit and dequantized bases alone differ by {floor:.4f})" if floor is not None else ""
        lines.append(
            f"parity with the 4-bit + adapter model (float32 arithmetic): max |logit diff| {p['max_logit_diff']:.4f}{floor_text}, "
            f"greedy answers agree {p['greedy_agree_count']}"
        )
    if r.get("naive_merge"):
        n = r["naive_merge"]
        lines.append(
            f"merged into the original weights instead: max |logit diff| {n['max_logit_diff']:.4f}, "
            f"greedy answers agree {n['greedy_agree_count']}"
        )
    if r.get("explanation"):
        lines.append("why they differ: " + r["explanation"])
    return "\n".join(lines)


# ------------------------------------------------------------------ generation


def chat_input_ids(tokenizer: Any, messages: list[dict[str, str]]) -> Any:
    """Token ids (1 x T tensor) of a conversation, ready for the assistant's answer.

    Models without a chat template get the last user message as plain text.
    """
    import torch

    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    else:
        ids = tokenizer(messages[-1]["content"])["input_ids"]
    return torch.tensor([ids], dtype=torch.long)


def sampling_kwargs(temperature: float = 0.0, top_p: float = 1.0) -> dict[str, Any]:
    """``generate`` keyword arguments: greedy for temperature 0, else sampling."""
    if temperature < 0:
        raise QLoRAGuideError(f"temperature must be 0 (greedy) or positive, not {temperature}")
    if not 0 < top_p <= 1:
        raise QLoRAGuideError(f"top_p must be in (0, 1], not {top_p}")
    if temperature == 0:
        return {"do_sample": False}
    return {"do_sample": True, "temperature": float(temperature), "top_p": float(top_p)}


def stream_generate(
    lm: LoadedModel,
    input_ids: Any,
    max_new_tokens: int = 256,
    temperature: float = 0.0,
    top_p: float = 1.0,
    out: IO[str] | None = None,
) -> str:
    """Generate an answer in a background thread and write its text to ``out`` as it comes.

    transformers' ``TextIteratorStreamer`` turns token ids into printable text
    (it waits for whole words and whole UTF-8 characters). The model's lock is
    held for the whole generation, so two callers never interleave.
    """
    import torch
    from transformers import TextIteratorStreamer

    if max_new_tokens <= 0:
        raise QLoRAGuideError(f"max_new_tokens must be positive, not {max_new_tokens}")
    streamer = TextIteratorStreamer(lm.tokenizer, skip_prompt=True, skip_special_tokens=True)
    input_ids = input_ids.to(lm.device)
    kwargs = dict(
        input_ids=input_ids,
        attention_mask=torch.ones_like(input_ids),
        max_new_tokens=max_new_tokens,
        pad_token_id=lm.tokenizer.pad_token_id,
        streamer=streamer,
        **sampling_kwargs(temperature, top_p),
    )
    failure: list[BaseException] = []

    def run() -> None:
        try:
            with torch.no_grad():
                lm.model.generate(**kwargs)
        except BaseException as err:  # re-raised in the caller's thread
            failure.append(err)
            streamer.end()

    pieces = []
    with lm.lock:
        worker = threading.Thread(target=run, daemon=True)
        worker.start()
        for piece in streamer:
            pieces.append(piece)
            if out is not None:
                out.write(piece)
                out.flush()
        worker.join()
    if failure:
        raise failure[0]
    return "".join(pieces)


def generate(
    model_ref: Any,
    prompt: str,
    max_new_tokens: int = 256,
    stream: bool = True,
    temperature: float = 0.0,
    top_p: float = 1.0,
    system_prompt: str | None = None,
    quantization: QuantizationConfig | None | str = AUTO,
    out: IO[str] | None = None,
) -> str:
    """Answer one user message with a base, merged or adapter model; stream it to ``out`` (stdout).

    Returns the answer's text. ``stream=False`` prints nothing and only returns it.
    Bad arguments are refused before any model is loaded.
    """
    if not prompt.strip():
        raise QLoRAGuideError("the prompt is empty: give the message to answer ('-' reads it from standard input)")
    if max_new_tokens < 1:
        raise QLoRAGuideError(f"max_new_tokens must be a positive number of tokens, not {max_new_tokens}")
    sampling_kwargs(temperature, top_p)  # raises on bad values, before the load
    lm = load_any(model_ref, quantization=quantization)
    messages = ([{"role": "system", "content": system_prompt}] if system_prompt else []) + [
        {"role": "user", "content": prompt}
    ]
    ids = chat_input_ids(lm.tokenizer, messages)
    _check_fits(lm, ids.shape[1], max_new_tokens)
    out = (out or sys.stdout) if stream else None
    text = stream_generate(lm, ids, max_new_tokens, temperature, top_p, out=out)
    if out is not None:
        out.write("\n")
        out.flush()
    return text


def _check_fits(lm: LoadedModel, prompt_tokens: int, max_new_tokens: int) -> None:
    if prompt_tokens + max_new_tokens > lm.context_length:
        raise QLoRAGuideError(
            f"the prompt has {prompt_tokens} tokens; with max_new_tokens={max_new_tokens} it exceeds the "
            f"model's context of {lm.context_length} tokens"
        )


CHAT_HELP = "Type a message and press Enter. /reset forgets the conversation, /exit (or Ctrl-D) quits."


def chat(
    model_ref: Any,
    max_new_tokens: int = 256,
    temperature: float = 0.0,
    top_p: float = 1.0,
    system_prompt: str | None = None,
    quantization: QuantizationConfig | None | str = AUTO,
    input: IO[str] | None = None,
    output: IO[str] | None = None,
) -> list[dict[str, str]]:
    """An interactive chat on stdin/stdout that keeps the conversation; returns the final history.

    Commands: ``/reset`` clears the history, ``/exit`` (or ``/quit``, or end of
    input) leaves. When the conversation no longer fits the context, the
    oldest exchanges are dropped (the system prompt stays) and a note says so.
    """
    input = input or sys.stdin
    output = output or sys.stdout
    lm = load_any(model_ref, quantization=quantization)
    system = [{"role": "system", "content": system_prompt}] if system_prompt else []
    history: list[dict[str, str]] = []
    output.write(f"{lm.name} ({lm.kind}{', 4-bit' if lm.quantized else ''}). {CHAT_HELP}\n")
    while True:
        output.write("> ")
        output.flush()
        line = input.readline()
        if not line:
            output.write("\n")
            break
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            break
        if text == "/reset":
            history = []
            output.write("(conversation cleared)\n")
            continue
        if text.startswith("/") and " " not in text:
            output.write(f"unknown command {text}. {CHAT_HELP}\n")
            continue
        history.append({"role": "user", "content": text})
        ids = chat_input_ids(lm.tokenizer, system + history)
        while ids.shape[1] + max_new_tokens > lm.context_length and len(history) > 1:
            history = history[2:] if len(history) > 2 else history[-1:]
            output.write("(oldest messages dropped to fit the context)\n")
            ids = chat_input_ids(lm.tokenizer, system + history)
        if ids.shape[1] + max_new_tokens > lm.context_length:
            history.pop()
            output.write("(message too long for the model's context)\n")
            continue
        answer = stream_generate(lm, ids, max_new_tokens, temperature, top_p, out=output)
        output.write("\n")
        history.append({"role": "assistant", "content": answer.strip()})
    return system + history


# ------------------------------------------------------------------ maintenance


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for name in ("qlora-guide", "torch", "transformers", "peft", "bitsandbytes", "safetensors"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            pass
    return found


def _adapter_summary(folder: Path) -> dict[str, Any]:
    """Rank, targets and size of an adapter, read from its config and the safetensors header (no tensor loaded)."""
    from safetensors import safe_open

    config = check_adapter_dir(folder)
    weights = folder / ADAPTER_WEIGHTS
    parameters, dtypes = 0, set()
    with safe_open(str(weights), framework="pt") as f:
        for key in f.keys():
            piece = f.get_slice(key)
            count = 1
            for dim in piece.get_shape():
                count *= dim
            parameters += count
            dtypes.add(str(piece.get_dtype()))
    targets = config.get("target_modules")
    return {
        "peft_type": config.get("peft_type"),
        "r": config.get("r"),
        "lora_alpha": config.get("lora_alpha"),
        "lora_dropout": config.get("lora_dropout"),
        "target_modules": sorted(targets) if isinstance(targets, list) else targets,
        "use_rslora": config.get("use_rslora", False),
        "use_dora": config.get("use_dora", False),
        "parameters": parameters,
        "dtype": ", ".join(sorted(dtypes)),
        "file": str(weights),
        "bytes": weights.stat().st_size,
        "recorded_base": config.get("base_model_name_or_path"),
    }


def info(path: str | os.PathLike) -> dict[str, Any]:
    """What a run, adapter or merged folder holds: manifest, recipe, metrics, adapter shape and size.

    Reads only small files and the safetensors header; nothing is loaded on
    the model side.
    """
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise QLoRAGuideError(f"{folder} is not a folder" if folder.exists() else f"{folder} does not exist")
    kind = model_kind(folder)
    result: dict[str, Any] = {"path": str(folder.resolve()), "kind": kind}
    run_dir = folder
    if kind == "adapter":
        adapter_dir = find_adapter_dir(folder)
        run_dir = run_root(adapter_dir)
        result["adapter_dir"] = str(adapter_dir.resolve())
        result["adapter"] = _adapter_summary(adapter_dir)
        result["base_model"] = adapter_base(adapter_dir)
    manifest = read_manifest(run_dir)
    if kind == "model":
        result["kind"] = manifest.get("kind", "model")
        config = read_json(folder / "config.json", "model config")
        result["architecture"] = ", ".join(config.get("architectures") or []) or config.get("model_type")
        result["dtype"] = config.get("dtype") or config.get("torch_dtype")
        result["quantized"] = "quantization_config" in config
        result["base_model"] = manifest_base(manifest)
        result["bytes"] = _folder_bytes(folder)
    result["manifest"] = manifest
    for key in ("recipe", "seed", "versions", "finished", "resumed_from", "from_adapter"):
        if manifest.get(key) is not None:
            result["recipe_name" if key == "recipe" else key] = manifest[key]
    data = manifest.get("data")
    if isinstance(data, dict):
        result["data"] = data.get("path")
        result["data_fingerprint"] = data.get("train_fingerprint") or data.get("fingerprint")
    elif manifest.get("data_fingerprint"):
        result["data_fingerprint"] = manifest["data_fingerprint"]
    recipe_path = run_dir / RECIPE_FILE
    if recipe_path.is_file():
        import yaml

        try:
            result["recipe"] = yaml.safe_load(recipe_path.read_text(encoding="utf-8"))
        except yaml.YAMLError:
            result["recipe"] = f"(unreadable YAML: {recipe_path})"
    metrics_path = run_dir / METRICS_FILE
    if metrics_path.is_file():
        result["metrics"] = read_json(metrics_path, "metrics")
    checkpoints = sorted((p.name for p in run_dir.glob("checkpoint-*") if p.is_dir()), key=lambda n: int(n.split("-")[-1]) if n.split("-")[-1].isdigit() else 0)
    if checkpoints:
        result["checkpoints"] = checkpoints
    return result


def _short(value: Any, width: int = 90) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str, ensure_ascii=False)
    return text if len(text) <= width else text[: width - 3] + "..."


def format_info(data: dict[str, Any]) -> str:
    """``qlora-guide info`` as aligned ``key: value`` lines."""
    rows: list[tuple[str, str]] = [("path", data["path"]), ("kind", data["kind"])]
    if data.get("base_model"):
        rows.append(("base model", str(data["base_model"])))
    adapter = data.get("adapter")
    if adapter:
        targets = adapter["target_modules"]
        rows += [
            ("adapter", f"{adapter['peft_type']} r={adapter['r']} lora_alpha={adapter['lora_alpha']} dropout={adapter['lora_dropout']}"),
            ("targets", ", ".join(targets) if isinstance(targets, list) else str(targets)),
            ("adapter size", f"{adapter['bytes'] / 2**20:.2f} MiB, {adapter['parameters']:,} parameters ({adapter['dtype']})"),
        ]
    if data.get("architecture"):
        rows.append(("model", f"{data['architecture']} ({data.get('dtype')}{', quantized' if data.get('quantized') else ''})"))
        rows.append(("size", f"{data['bytes'] / 2**20:.0f} MiB"))
    labels = (("recipe_name", "recipe"), ("data", "data"), ("data_fingerprint", "data fingerprint"), ("seed", "seed"),
              ("finished", "finished"), ("resumed_from", "resumed from"), ("from_adapter", "continued from"))
    for key, label in labels:
        if data.get(key) is not None:
            rows.append((label, _short(data[key])))
    if data.get("versions"):
        rows.append(("versions", ", ".join(f"{k} {v}" for k, v in data["versions"].items())))
    recipe = data.get("recipe")
    if isinstance(recipe, dict):
        for section in ("model", "quantization", "lora", "data", "training"):
            if section in recipe:
                rows.append((f"recipe.{section}", _short(recipe[section])))
    metrics = data.get("metrics")
    if isinstance(metrics, dict):
        for key, value in metrics.items():
            rows.append((f"metrics.{key}", _short(value)))
    manifest = data.get("manifest") or {}
    for key in ("parity", "naive_merge"):
        if manifest.get(key):
            rows.append((key.replace("_", " "), _short(manifest[key])))
    if data.get("checkpoints"):
        rows.append(("checkpoints", ", ".join(data["checkpoints"])))
    if not manifest:
        rows.append(("manifest", "none (not written by qlora-guide train / merge)"))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)
