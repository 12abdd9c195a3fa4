"""The precision path switch (qlora_guide.precision) and what follows it on the CPU."""

from __future__ import annotations

import pytest

from qlora_guide import precision
from qlora_guide.errors import QLoRAGuideError


def test_the_float32_path_can_be_forced_on_any_cpu(monkeypatch):
    monkeypatch.setenv(precision.CPU_BF16_ENV, "0")
    assert not precision.cpu_has_native_bf16()
    assert precision.cpu_compute_dtype("bfloat16") == "float32"
    assert precision.cpu_compute_dtype("float16") == "float16"
    monkeypatch.setenv(precision.CPU_BF16_ENV, "bogus")
    with pytest.raises(QLoRAGuideError, match="QLORA_GUIDE_CPU_BF16='bogus'"):
        precision.cpu_has_native_bf16()


def test_forced_float32_path_reaches_training_and_the_4bit_layers(monkeypatch, tiny_recipe):
    from qlora_guide.config import QuantizationConfig, load_recipe
    from qlora_guide.models import load_model
    from qlora_guide.training import resolve_precision

    monkeypatch.setenv(precision.CPU_BF16_ENV, "0")
    resolved = resolve_precision(load_recipe(tiny_recipe))
    assert not resolved.bf16 and resolved.compute_dtype == "float32" and resolved.model_dtype == "float32"
    model = load_model(quantization=QuantizationConfig())
    layers = [m for m in model.modules() if hasattr(m, "support_avx512bf16_for_cpu")]
    assert layers and not any(m.support_avx512bf16_for_cpu for m in layers)


def test_range_report_casts_the_real_activations_and_gradients():
    from peft import LoraConfig, get_peft_model

    from qlora_guide.models import load_model, load_tokenizer

    tokenizer = load_tokenizer()
    model = get_peft_model(load_model(dtype="float32"), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    report = precision.range_report(model, tokenizer, ["What is NF4?", "Qu'est-ce que QLoRA ?"])
    rows = {row["dtype"]: row for row in report["rows"]}
    assert 1 < report["largest_activation"] < rows["float16"]["largest value"]  # SmolLM2 fits fp16's range
    assert report["gradients"] > 0 and 0 < report["smallest_gradient"] < rows["float16"]["smallest positive"]
    # gradients below fp16's smallest positive value vanish, unless the loss is scaled; never in bf16 or fp32
    assert rows["float16"]["gradients flushed to 0 (%)"] > rows["float16, loss scaled by 2^16"]["gradients flushed to 0 (%)"]
    assert rows["bfloat16"]["gradients flushed to 0 (%)"] == rows["float32"]["gradients flushed to 0 (%)"] == 0
    assert all(p.grad is None for p in model.parameters()), "the report leaves no gradient behind"
