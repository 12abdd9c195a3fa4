"""torch's post-training dynamic int8 quantization, run on a real model and measured.

``torch.quantization.quantize_dynamic`` turns every ``nn.Linear`` into int8
weights with activations quantized on the fly. :func:`dynamic_quantization_report`
runs it on the embedded model and measures what it changes: the bytes held
(:func:`qlora_guide.quantization.footprint.model_footprint`), the size of the
saved state dict, the forward latency and the logits. torch deprecates the API;
:data:`DYNAMIC_ALTERNATIVE` is its replacement in torchao.
"""

from __future__ import annotations

import copy
import io
import statistics
import time
import warnings
from typing import Any

import torch

from qlora_guide.models import load_model, load_tokenizer
from qlora_guide.quantization.footprint import model_footprint

DYNAMIC_ALTERNATIVE = "torchao.quantization.quantize_(model, Int8DynamicActivationInt8WeightConfig())"


def torch_dynamic_int8(model: Any) -> tuple[Any, list[str]]:
    """``torch.quantization.quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8)``, with the warnings it raised."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quantized = torch.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)
    messages = []
    for warning in caught:
        first_line = str(warning.message).strip().splitlines()[0]
        if first_line not in messages:
            messages.append(first_line)
    return quantized, messages


def _serialized_bytes(model: Any) -> int:
    """Size of ``torch.save(model.state_dict())``: packed int8 weights are not tensors safetensors can hold."""
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return buffer.tell()


def _median_forward_seconds(model: Any, input_ids: torch.Tensor, repeats: int) -> tuple[float, torch.Tensor]:
    """Median seconds of ``repeats`` forward passes after one warm-up, and the warm-up's logits."""
    with torch.inference_mode():
        logits = model(input_ids).logits  # warm-up
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            model(input_ids)
            times.append(time.perf_counter() - start)
    return statistics.median(times), logits


SAMPLE_TEXT = (
    "Quantization stores each weight of a neural network with fewer bits. QLoRA keeps the frozen base model "
    "in 4-bit NormalFloat and trains small low-rank adapters in 16-bit precision on top of it, so that a "
    "large language model can be fine-tuned on a single GPU. "
)


def dynamic_quantization_report(
    name_or_path: str = "smollm2-135m", batch_size: int = 1, seq_len: int = 128, repeats: int = 3, text: str = SAMPLE_TEXT
) -> dict[str, Any]:
    """Run the originals' ``torch.quantization.quantize_dynamic`` example on a real model and measure it.

    The fp32 model's ``nn.Linear`` layers become int8 weights with activations
    quantized on the fly. Measured: serialized size (``torch.save`` of the
    state dict), the bytes of the Linear layers, the median forward latency
    on ``text`` (repeated to ``seq_len`` tokens), and how far the logits
    move (largest difference, agreement of the top-1 next token). The tied output head
    becomes an int8 *copy*, while the fp32 embedding stays. Also returns the
    deprecation warnings torch prints and the current replacement (torchao).
    """
    model = load_model(name_or_path, dtype="float32", device_map="cpu").eval()
    tokens = load_tokenizer(name_or_path)(text)["input_ids"]
    tokens = (tokens * (seq_len // len(tokens) + 1))[:seq_len]
    input_ids = torch.tensor([tokens] * batch_size)
    before = model_footprint(model)
    size_before = _serialized_bytes(model)
    latency_before, logits_before = _median_forward_seconds(model, input_ids, repeats)
    quantized, warnings_seen = torch_dynamic_int8(copy.deepcopy(model))
    after = model_footprint(quantized)
    size_after = _serialized_bytes(quantized)
    latency_after, logits_after = _median_forward_seconds(quantized, input_ids, repeats)
    linear_types = sum(isinstance(m, torch.ao.nn.quantized.dynamic.Linear) for m in quantized.modules())
    linear = ("attention", "mlp", "lm_head")
    return {
        "torch_version": torch.__version__,
        "quantized_linear_layers": linear_types,
        "serialized_bytes_before": size_before,
        "serialized_bytes_after": size_after,
        "linear_bytes_before": sum(before["by_kind"][k] for k in linear),
        "linear_bytes_after": sum(after["by_kind"][k] for k in linear),
        "embedding_bytes_after": after["by_kind"]["embeddings"],
        "latency_before_s": latency_before,
        "latency_after_s": latency_after,
        "input_shape": (batch_size, seq_len),
        "max_abs_logit_diff": float((logits_after - logits_before).abs().max()),
        "top1_agreement": float((logits_after.argmax(-1) == logits_before.argmax(-1)).float().mean()),
        "deprecated": any("deprecated" in message for message in warnings_seen),
        "warnings": warnings_seen,
        "alternative": DYNAMIC_ALTERNATIVE,
    }
