"""What a loaded model holds in memory, counted tensor by tensor: the one place that counts a model's bytes.

:func:`tensor_bytes` walks every parameter and buffer once (a tied output head
shares the embedding's tensor and adds nothing), with what bitsandbytes stores
beside a quantized weight (``weight.quant_state``: absmax, nested absmax,
offset and codebooks; ``weight.SCB`` for int8) and the int8 weights of torch's
dynamically quantized Linear layers. It sorts each tensor's bytes two ways:

* ``by_kind``: the part of the transformer it belongs to (:data:`KINDS`:
  embeddings, attention, mlp, norms, lm_head, other);
* ``by_storage``: how it is stored (:data:`STORAGE`: ``quantized`` codes,
  4-bit packed or int8; their ``quant_constants``; ``lora`` adapter weights;
  ``other``, every tensor kept in 16 or 32 bits).

:func:`model_footprint` adds bits per parameter and whether the head is tied.
These are bytes in memory; the size of a saved folder on disk is another
quantity (safetensors headers, the tokenizer, the config) and is counted from
its files.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import torch

KINDS = ("embeddings", "attention", "mlp", "norms", "lm_head", "other")
STORAGE = ("quantized", "quant_constants", "lora", "other")


def _kind(name: str) -> str:
    """Which part of a transformer a parameter or buffer belongs to, from its name."""
    if "lm_head" in name:
        return "lm_head"
    if "embed" in name or name.endswith(("wte.weight", "wpe.weight")):
        return "embeddings"
    if "norm" in name or "ln_" in name:
        return "norms"
    if any(key in name for key in ("self_attn", "attention", "q_proj", "k_proj", "v_proj", "o_proj", "attn")):
        return "attention"
    if any(key in name for key in ("mlp", "gate_proj", "up_proj", "down_proj", "feed_forward", "ffn")):
        return "mlp"
    return "other"


def _quant_state_tensors(param: Any) -> list[torch.Tensor]:
    """The tensors bitsandbytes keeps beside a quantized weight (absmax, codebooks, offset, int8 row scales)."""
    tensors = []
    state = getattr(param, "quant_state", None)
    if state is not None:  # Params4bit
        tensors += [state.absmax, state.code]
        if state.nested:
            tensors += [state.offset, state.state2.absmax, state.state2.code]
    scb = getattr(param, "SCB", None)
    if isinstance(scb, torch.Tensor):  # Int8Params: one float32 scale per row
        tensors.append(scb)
    return [t for t in tensors if isinstance(t, torch.Tensor)]


def _logical_numel(param: Any) -> int:
    """Number of weights a parameter stands for (a packed 4-bit tensor holds two per byte)."""
    state = getattr(param, "quant_state", None)
    if state is not None and state.shape is not None:
        return math.prod(state.shape)
    return param.numel()


def _storage(name: str, param: Any) -> str:
    """How a parameter is stored: bitsandbytes' 4-bit or int8 codes, a LoRA weight, or plain floats."""
    if getattr(param, "quant_state", None) is not None or isinstance(getattr(param, "SCB", None), torch.Tensor):
        return "quantized"
    return "lora" if "lora_" in name else "other"


def _model_tensors(model: Any) -> Iterator[tuple[str, torch.Tensor, str, int]]:
    """Every tensor the model holds: ``(name, tensor, storage, number of weights it stands for)``.

    A tensor may come more than once (a tied head yields the embedding's
    tensor again); :func:`tensor_bytes` counts it once.
    """
    for module_name, module in model.named_modules():
        for name, param in module.named_parameters(prefix=module_name, recurse=False):
            yield name, param.data, _storage(name, param), _logical_numel(param)
            for tensor in _quant_state_tensors(param):
                yield name, tensor, "quant_constants", 0
        for name, buffer in module.named_buffers(prefix=module_name, recurse=False):
            yield name, buffer, "other", 0
        if isinstance(module, torch.ao.nn.quantized.dynamic.Linear):  # torch's dynamic int8 Linear
            weight = module.weight()
            yield f"{module_name}.weight", weight.int_repr(), "quantized", weight.numel()
            if weight.qscheme() in (torch.per_channel_affine, torch.per_channel_symmetric):
                yield f"{module_name}.weight", weight.q_per_channel_scales(), "quant_constants", 0
            if module.bias() is not None:
                yield f"{module_name}.bias", module.bias(), "other", module.bias().numel()


def tensor_bytes(model: Any) -> dict[str, Any]:
    """Bytes of every tensor a loaded model holds, each counted once, by kind of layer and by storage.

    Returns ``total_bytes``, ``by_kind`` (bytes per :data:`KINDS`),
    ``by_storage`` (bytes per :data:`STORAGE`) and ``parameters`` (the number
    of weights, two per byte of a packed 4-bit tensor). A tensor is the same
    one when it starts at the same address with the same size: a tied head adds
    nothing, while weights that are views into one loaded file each count.
    """
    seen: set[tuple[int, int]] = set()
    alive: list[torch.Tensor] = []  # keeps tensors made on the fly (int_repr) so their addresses stay unique
    by_kind = dict.fromkeys(KINDS, 0)
    by_storage = dict.fromkeys(STORAGE, 0)
    parameters = 0
    for name, tensor, storage, numel in _model_tensors(model):
        nbytes = tensor.numel() * tensor.element_size()
        key = (tensor.data_ptr(), nbytes)
        if nbytes == 0 or key in seen:  # shared (tied) tensors are counted once
            continue
        seen.add(key)
        alive.append(tensor)
        by_kind[_kind(name)] += nbytes
        by_storage[storage] += nbytes
        parameters += numel
    return {"total_bytes": sum(by_kind.values()), "by_kind": by_kind, "by_storage": by_storage, "parameters": parameters}


def model_footprint(model: Any) -> dict[str, Any]:
    """Bytes actually held by a loaded model, grouped by kind of layer, and what they cost per weight.

    :func:`tensor_bytes` (``total_bytes``, ``by_kind``, ``by_storage``,
    ``parameters``) with ``quant_constants_bytes``, ``bits_per_parameter`` and
    ``tied_lm_head``.

    Measure a 4-bit model before its first forward pass on the CPU: for
    inference, bitsandbytes' CPU backend repacks each Linear4bit on first use
    (on CPUs with AVX512-BF16), undoing double quantization into a bf16
    absmax per block.
    """
    counted = tensor_bytes(model)
    return {
        **counted,
        "quant_constants_bytes": counted["by_storage"]["quant_constants"],
        "bits_per_parameter": 8 * counted["total_bytes"] / max(counted["parameters"], 1),
        "tied_lm_head": _is_tied(model),
    }


def _is_tied(model: Any) -> bool:
    """True when the output head shares the input embedding's tensor."""
    get_in, get_out = getattr(model, "get_input_embeddings", None), getattr(model, "get_output_embeddings", None)
    if get_in is None or get_out is None or get_out() is None:
        return False
    head = get_out().weight
    if callable(head):  # torch's dynamically quantized Linear: its own int8 copy, never tied
        return False
    return get_in().weight.data_ptr() == head.data_ptr()
