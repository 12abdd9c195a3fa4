"""Merging: fold a (Q)LoRA adapter into plain weights, check the result, and report how closely it matches.

:func:`merge_adapter` folds ``W + (lora_alpha / r) * B @ A`` into plain
weights (float32 by default), so the result loads with transformers alone.
*Which* ``W`` matters: a QLoRA adapter was trained on top of the NF4 weights,
so it is merged into those weights dequantized to float32, not into the
original bf16 checkpoint (see :func:`merge_adapter` and ``MERGE_EXPLANATION``).
:func:`load_merged_4bit` quantizes a merged model to 4 bits again.
"""

from __future__ import annotations

import gc
import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from qlora_guide import progress
from qlora_guide.config import QuantizationConfig
from qlora_guide.deployment.generation import chat_input_ids, greedy_ids
from qlora_guide.deployment.loading import (
    MERGE_DTYPES,
    LoadedModel,
    _load_dequantized,
    adapter_base,
    apply_run_generation_settings,
    check_adapter_dir,
    find_adapter_dir,
    folder_bytes,
    load_adapter_model,
    load_any,
    load_tokenizer_for,
    read_manifest,
    training_quantization,
)
from qlora_guide.errors import QLoRAGuideError
from qlora_guide.models import load_model, torch_dtype
from qlora_guide.outputs import check_output_folder, replace_folder, staging_folder
from qlora_guide.runs import MANIFEST_FILE, RunFolder
from qlora_guide.versions import package_versions

UNIT_ROUNDOFF = {"float32": 2.0**-24, "bfloat16": 2.0**-8, "float16": 2.0**-11}
DEFAULT_PARITY_PROMPTS = (
    "What is QLoRA?",
    "Explain NF4 quantization in one sentence.",
    "Qu'est-ce qu'un adaptateur LoRA ?",
)


def _lora_layers(model: Any) -> list[tuple[str, Any, Any, Any]]:
    """Every LoRA layer of a PeftModel: (name, layer, exact merged weight, what float32 rounding may change in it).

    The merged weight is computed in float64: ``W + s B A``, and for DoRA
    ``m * (W + s B A) / |W + s B A|`` with the norm taken over each output row.
    The bound: ``r + 1`` roundings of the terms of ``s B A``, then the sum and
    its storage, each at most one unit roundoff; DoRA adds the rounding of the
    row norms (one per input feature, a summation bound) and of the scaling.
    """
    from peft.tuners.lora import LoraLayer

    u = UNIT_ROUNDOFF["float32"]
    layers = []
    for name, module in model.named_modules():
        if not isinstance(module, LoraLayer):
            continue
        for adapter in module.active_adapters:
            if adapter not in module.lora_A:
                continue
            a = module.lora_A[adapter].weight.detach().double()
            b = module.lora_B[adapter].weight.detach().double()
            scale, r = module.scaling[adapter], module.r[adapter]
            delta, terms = (b @ a) * scale, (b.abs() @ a.abs()) * abs(scale)
            if getattr(module, "fan_in_fan_out", False):
                delta, terms = delta.T, terms.T
            weight = module.get_base_layer().weight.detach().double() + delta
            bound = (r + 1) * u * terms + 2 * u * weight.abs()
            if module.use_dora.get(adapter, False):
                norm = weight.norm(dim=1, keepdim=True)
                factor = module.lora_magnitude_vector[adapter].weight.detach().double().view(-1, 1) / norm
                relative = (weight.shape[1] + 2) * u + bound.norm(dim=1, keepdim=True) / norm
                weight, bound = factor * weight, factor * bound + (relative + 2 * u) * (factor * weight).abs()
            layers.append((name, module, weight, bound))
    return layers


def update_rounding(model: Any, dtypes: tuple[str, ...] = MERGE_DTYPES) -> dict[str, Any]:
    """How much of the LoRA update each save dtype would lose, and the exact merged weights' error bound.

    For every adapted layer, the exact merged weight is ``W + s B A`` (float64;
    DoRA rescales its rows, see :func:`_lora_layers`), and the update is its
    difference from ``W``. Storing it in a dtype rounds it; ``lost_share[dtype]``
    is the size of that rounding error relative to the update itself (Frobenius
    norms over all layers): 0.5 means the stored weights misstate the update by
    half its size. The update is small next to ``W``, so a dtype with 8
    significant bits (bfloat16) can lose most of it while barely changing ``W``.
    """
    import torch

    err2 = dict.fromkeys(dtypes, 0.0)
    update2, layers = 0.0, []
    for name, module, target, _bound in _lora_layers(model):
        update2 += float(((target - module.get_base_layer().weight.detach().double()) ** 2).sum())
        for dtype in dtypes:
            stored = target.to(getattr(torch, dtype)).double()
            err2[dtype] += float(((stored - target) ** 2).sum())
        layers.append(name)
    if not layers:
        raise QLoRAGuideError("the model has no LoRA layer to merge")
    share = {d: math.sqrt(err2[d] / update2) if update2 else 0.0 for d in dtypes}
    return {"lost_share": share, "update_norm": math.sqrt(update2), "layers": len(layers)}


def _exact_targets(model: Any) -> dict[str, tuple[Any, Any]]:
    """Per LoRA layer, before merging: the exact merged weight (float64) and what float32 rounding may change in it
    (what :func:`merge_adapter` checks, element by element)."""
    return {name: (target, bound) for name, _module, target, bound in _lora_layers(model)}


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

    output_dir: str
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
        return asdict(self)


MERGE_EXPLANATION = (
    "A QLoRA adapter is trained on top of the 4-bit NF4 weights: its update B @ A learned to correct the "
    "output of the dequantized weights W_nf4, not of the original bf16 weights W. Merging it into W_nf4 "
    "(dequantized to float32) gives the model that was trained, up to the rounding of the saved dtype. Merging "
    "it into the original W instead adds the update to weights that differ from W_nf4 by the quantization "
    "error (about 10 % of each weight's magnitude for NF4), so the merged model is a different model: its "
    "logits move by about as much as quantization moved them, and greedy answers can change."
)


def parity_inputs(tokenizer: Any, prompts: tuple[str, ...] | list[str]) -> list[Any]:
    """Chat-formatted token ids of a few prompts, for logit and generation parity checks."""
    return [chat_input_ids(tokenizer, [{"role": "user", "content": p}]) for p in prompts]


def _logits(model: Any, inputs: list[Any]) -> list[Any]:
    """Float32 logits of each input, on the CPU."""
    import torch

    device = next(model.parameters()).device
    with torch.no_grad():
        return [model(input_ids=ids.to(device)).logits.float().cpu() for ids in inputs]


def model_outputs(model: Any, inputs: list[Any], max_new_tokens: int) -> dict[str, list[Any]]:
    """What parity compares: the logits of each input and its greedy continuation."""
    return {"logits": _logits(model, inputs), "greedy": [greedy_ids(model, ids, max_new_tokens) for ids in inputs]}


def compare_outputs(reference: dict[str, list[Any]], candidate: dict[str, list[Any]]) -> dict[str, Any]:
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


@progress.library_bars()
def merge_adapter(
    adapter_dir: str | os.PathLike,
    output_dir: str | os.PathLike,
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
    ``manifest.json`` into a staging folder next to ``output_dir``, renamed into
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
    if dtype not in MERGE_DTYPES:
        raise QLoRAGuideError(f"dtype '{dtype}': merge saves float32, bfloat16 or float16")
    start = time.perf_counter()
    folder = find_adapter_dir(adapter_dir)
    check_adapter_dir(folder)
    run = RunFolder.of(folder)
    output_dir = check_output_folder(output_dir, overwrite, "merged", inputs=(run.root, folder), legacy=(MANIFEST_FILE,))
    base_name = adapter_base(folder)
    quantization = training_quantization(folder)
    tokenizer = load_tokenizer_for(folder if (folder / "tokenizer_config.json").is_file() else folder.parent, base_name)
    inputs = parity_inputs(tokenizer, parity_prompts) if check_parity else []
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
        reference = model_outputs(adapter_model, inputs, parity_tokens)
        parity = compare_outputs(reference, model_outputs(merged, inputs, parity_tokens))
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
            naive = compare_outputs(reference, model_outputs(naive_model, inputs, parity_tokens))
            del naive_model, original
    del unmerged
    gc.collect()

    stage("saving")
    staging = staging_folder(output_dir, "merged")
    try:
        merged.config._name_or_path = str(output_dir)
        merged.config.dtype = dtype
        if hasattr(merged.config, "quantization_config"):
            del merged.config.quantization_config
        merged.save_pretrained(staging, safe_serialization=True)
        tokenizer.padding_side = "right"
        tokenizer.save_pretrained(staging)
        result = MergeResult(
            output_dir=str(output_dir),
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
        source_manifest = read_manifest(run.root)
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
            "versions": package_versions(),
        }
        saved = RunFolder(staging)
        saved.manifest.write_text(json.dumps(manifest, indent=2, default=str))
        if run.recipe.is_file():
            shutil.copy2(run.recipe, saved.recipe)
        replace_folder(staging, output_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        stage.close()
    result.size_bytes = folder_bytes(output_dir)
    result.seconds = round(time.perf_counter() - start, 2)
    return result


def load_merged_4bit(merged_dir: str | os.PathLike, quantization: QuantizationConfig | None = None) -> LoadedModel:
    """The "4-bit merged-back" model: a merged folder quantized to NF4 again at load time.

    It is as small as the 4-bit base and needs no adapter at inference, but
    quantizing ``W_nf4 + B @ A`` rounds the adapter's update into the 4-bit
    grid, so it is not exactly the trained model either.
    """
    return load_any(merged_dir, quantization=quantization or QuantizationConfig())


def format_merge_result(result: MergeResult | dict[str, Any]) -> str:
    """A few lines for the terminal."""
    r = result.to_dict() if hasattr(result, "to_dict") else result
    lines = [
        f"merged {r['adapter_dir']} into {r['merged_into']} of {r['base_model']}",
        f"saved  {r['output_dir']} ({r['size_bytes'] / 2**20:.0f} MiB, {r['dtype']}, loads without peft or bitsandbytes)",
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


