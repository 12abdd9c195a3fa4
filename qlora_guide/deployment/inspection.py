"""Inspection: what a run, adapter or merged folder holds (``qlora-guide info``), without loading a model."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import yaml
from safetensors import safe_open

from qlora_guide.deployment.loading import (
    ADAPTER_WEIGHTS,
    adapter_base,
    check_adapter_dir,
    find_adapter_dir,
    folder_bytes,
    manifest_base,
    model_kind,
    read_json,
    read_manifest,
)
from qlora_guide.errors import QLoRAGuideError
from qlora_guide.runs import RunFolder


def _adapter_summary(folder: Path) -> dict[str, Any]:
    """Rank, targets and size of an adapter, read from its config and the safetensors header (no tensor loaded)."""
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
    """What a run, adapter or merged folder holds: manifest, recipe, metrics, adapter shape and size, checkpoints.

    The files are found where :class:`~qlora_guide.runs.RunFolder` says a run
    keeps them; ``checkpoints`` lists the run's ``checkpoint-N`` folders,
    oldest step first.

    Reads only small files and the safetensors header; nothing is loaded on
    the model side.
    """
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise QLoRAGuideError(f"{folder} is not a folder" if folder.exists() else f"{folder} does not exist")
    kind = model_kind(folder)
    result: dict[str, Any] = {"path": str(folder.resolve()), "kind": kind}
    run = RunFolder(folder)
    if kind == "adapter":
        adapter_dir = find_adapter_dir(folder)
        run = RunFolder.of(adapter_dir)
        result["adapter_dir"] = str(adapter_dir.resolve())
        result["adapter"] = _adapter_summary(adapter_dir)
        result["base_model"] = adapter_base(adapter_dir)
    manifest = read_manifest(run.root)
    if kind == "model":
        result["kind"] = manifest.get("kind", "model")
        config = read_json(folder / "config.json", "model config")
        result["architecture"] = ", ".join(config.get("architectures") or []) or config.get("model_type")
        result["dtype"] = config.get("dtype") or config.get("torch_dtype")
        result["quantized"] = "quantization_config" in config
        result["base_model"] = manifest_base(manifest)
        result["bytes"] = folder_bytes(folder)
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
    if run.recipe.is_file():
        try:
            result["recipe"] = yaml.safe_load(run.recipe.read_text(encoding="utf-8"))
        except yaml.YAMLError:
            result["recipe"] = f"(unreadable YAML: {run.recipe})"
    if run.metrics.is_file():
        result["metrics"] = read_json(run.metrics, "metrics")
    checkpoints = [p.name for p in run.checkpoint_dirs()]
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
        rows.append(("versions", ", ".join(f"{k} {v}" for k, v in data["versions"].items() if v)))
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
