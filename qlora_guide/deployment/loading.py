"""Loading: check an adapter folder, find its base model, and load any model reference for inference.

The guide's original loading code, with the current transformers API::

    config = PeftConfig.from_pretrained(adapter_dir)
    base = load_model(config.base_model_name_or_path, quantization=QuantizationConfig())
    model = PeftModel.from_pretrained(base, adapter_dir)

:func:`load_adapter_model` does exactly that, after checking what it is about
to load: the folder has an ``adapter_config.json``, the weights are a complete
``adapter_model.safetensors`` (a pickled ``adapter_model.bin`` is refused,
never unpickled), and every LoRA matrix fits a layer of the base model.

A model reference (``model_ref``) is one of: an alias such as
``smollm2-135m``, a hub id, a model folder (``config.json``: a base or a merged
model), or an adapter folder (``adapter_config.json``). :func:`load_any` turns
any of them into a :class:`LoadedModel`.

:func:`load_dequantized` gives the 4-bit model's weights dequantized once to
float32: the weights a QLoRA adapter was trained against, which
:func:`~qlora_guide.deployment.merging.merge_adapter` merges into.
"""

from __future__ import annotations

import gc
import json
import os
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from safetensors import SafetensorError, safe_open

from qlora_guide import progress
from qlora_guide.config import QuantizationConfig, load_recipe
from qlora_guide.errors import QLoRAGuideError, first_line
from qlora_guide.models import (
    EMBEDDED_ALIASES,
    EMBEDDED_MODEL,
    default_device_map,
    load_model,
    load_tokenizer,
)
from qlora_guide.precision import cpu_compute_dtype, use_differentiable_4bit_kernel
from qlora_guide.runs import RunFolder

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PICKLED_WEIGHTS = ("adapter_model.bin", "adapter_model.pt", "adapter_model.pth")
EMBEDDED_FOLDER = re.compile(r"^SmolLM2-135M-Instruct-v\d+$")
AUTO = "auto"
MERGE_DTYPES = ("float32", "bfloat16", "float16")  # what a merged model is saved in


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
    path = RunFolder(folder).manifest
    return read_json(path, "manifest") if path.is_file() else {}


def folder_bytes(folder: Path) -> int:
    """The size of every file under ``folder``, in bytes."""
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def find_adapter_dir(path: str | os.PathLike) -> Path:
    """The folder that holds the adapter: ``path`` itself, or its ``adapter/`` sub-folder."""
    folder = Path(path).expanduser()
    if not folder.exists():
        raise QLoRAGuideError(f"adapter folder {folder} does not exist")
    if not folder.is_dir():
        raise QLoRAGuideError(f"{folder} is a file, not an adapter folder")
    adapter = RunFolder(folder).adapter
    if not (folder / ADAPTER_CONFIG).is_file() and (adapter / ADAPTER_CONFIG).is_file():
        return adapter
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
    recorded = manifest_base(read_manifest(RunFolder.of(folder).root))
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
    recipe = RunFolder.of(find_adapter_dir(adapter_dir)).recipe
    if recipe.is_file():
        return load_recipe(recipe).quantization
    return QuantizationConfig()


def run_repetition_penalty(adapter_dir: str | os.PathLike) -> float | None:
    """The repetition penalty the run's recipe decodes with (``evaluation.repetition_penalty``); None: no penalty."""
    recipe = RunFolder.of(find_adapter_dir(adapter_dir)).recipe
    if not recipe.is_file():
        return None
    penalty = load_recipe(recipe).evaluation.repetition_penalty
    return penalty if penalty != 1.0 else None


def apply_run_generation_settings(model: Any, adapter_dir: str | os.PathLike) -> None:
    """Decode as the run's recipe says (``evaluation.repetition_penalty``), through the model's generation config.

    Everything that generates (evaluation, ``generate``, ``chat``, the server,
    the parity checks) calls ``model.generate`` without overriding it, and a
    merged model saves it in its ``generation_config.json``: one setting, the
    same decoding everywhere.
    """
    recipe = RunFolder.of(find_adapter_dir(adapter_dir)).recipe
    if recipe.is_file() and getattr(model, "generation_config", None) is not None:
        model.generation_config.repetition_penalty = run_repetition_penalty(adapter_dir)


# ------------------------------------------------------------------ loading


def lora_shapes_fit(model: Any, adapter_dir: Path, base_name: str) -> None:
    """Check that every LoRA matrix of the adapter fits a layer of ``model``; raise naming the first misfit.

    peft only warns about adapter keys it cannot place, and a wrong base with
    the same layer names fails deep inside ``load_state_dict``; this check gives
    one clear line instead.
    """
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
    lora_shapes_fit(base_model, folder, base_name)
    if getattr(peft_config, "use_dora", False):
        # DoRA dequantizes the 4-bit weights itself at every forward pass, which reads garbage once
        # bitsandbytes has repacked them for its AVX512-BF16 inference kernel
        use_differentiable_4bit_kernel(base_model)
    peft_config.inference_mode = not is_trainable
    try:
        model = PeftModel.from_pretrained(base_model, str(folder), config=peft_config, is_trainable=is_trainable)
    except (RuntimeError, ValueError, KeyError) as err:
        first = first_line(err)
        raise QLoRAGuideError(f"adapter {folder} does not load on base '{base_name}': {first}") from None
    if not is_trainable:
        model.eval()
        apply_run_generation_settings(model, folder)
    return model


def model_kind(model_ref: str | os.PathLike) -> str:
    """``"adapter"`` (adapter_config.json), ``"model"`` (a folder with config.json) or ``"hub"`` (an alias or hub id)."""
    path = Path(str(model_ref)).expanduser()
    if path.is_dir():
        if (path / ADAPTER_CONFIG).is_file() or (RunFolder(path).adapter / ADAPTER_CONFIG).is_file():
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
    adapters: dict[str, Any] = field(default_factory=dict)  # several adapters on one base: name -> ServedAdapter

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


def load_tokenizer_for(folder: Path | None, fallback: str) -> Any:
    """The tokenizer saved with a run or merged model, else the base model's."""
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
                quantization = quantization.model_copy(update={"bnb_4bit_compute_dtype": cpu_compute_dtype(quantization.bnb_4bit_compute_dtype)})
        model = load_adapter_model(folder, quantization=quantization, dtype=dtype, device_map=device_map)
        base = adapter_base(folder)
        tokenizer = load_tokenizer_for(folder if (folder / "tokenizer_config.json").is_file() else folder.parent, base)
        name = Path(str(model_ref)).expanduser().resolve().name
    else:
        quant = None if quantization == AUTO else quantization
        model = load_model(str(model_ref), quantization=quant, dtype=dtype, device_map=device_map)
        model.eval()
        folder = Path(str(model_ref)).expanduser() if kind == "model" else None
        tokenizer = load_tokenizer_for(folder, str(model_ref))
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


# ------------------------------------------------------------------ the 4-bit weights, dequantized


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
    return quantization.model_copy(update={"bnb_4bit_compute_dtype": "float32"})


def _load_dequantized(base_name: str, quantization: QuantizationConfig) -> tuple[Any, Any]:
    """The 4-bit base (computing in float32), and a float32 model whose linear layers hold its NF4 weights.

    The dequantized weights are the ones the adapter saw during QLoRA
    training. Everything bitsandbytes does not quantize (embeddings, norms,
    the output head) comes from the original checkpoint, as in the 4-bit
    model. The 4-bit model is returned too, as the reference of the parity check.
    """
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
    quantized, model = _load_dequantized(base_name, quantization or QuantizationConfig())
    del quantized
    gc.collect()
    return model.eval()

