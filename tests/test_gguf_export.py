"""GGUF export (qlora_guide.deployment.gguf_export): the embedded model written to GGUF and read back by transformers."""

from __future__ import annotations

import json

import numpy as np
import pytest

from qlora_guide.deployment.export import export
from qlora_guide.deployment.gguf_export import export_gguf
from qlora_guide.errors import QLoRAGuideError


@pytest.fixture(scope="module")
def f16_export(embedded_model, tmp_path_factory):
    """The embedded model exported once to F16, with its parity check."""
    out = tmp_path_factory.mktemp("gguf") / "smollm2-f16.gguf"
    return export_gguf(embedded_model, out, outtype="f16")


@pytest.mark.slow
def test_an_f16_file_read_back_by_transformers_is_the_same_model(f16_export):
    parity = f16_export.parity
    # the embedded weights come from a 4-bit GGUF: float16 holds every one of them, so nothing moves
    assert parity["max_logit_diff"] < 1e-3, parity
    assert parity["greedy_agree"] and parity["prompts"] == 3
    assert parity["same_token_ids"] and parity["chat_template_kept"]
    assert f16_export.tensors == 272  # 30 blocks of 9 tensors, the embeddings and the final norm; tied output


def test_the_file_holds_the_tokenizer_and_chat_template_llama_cpp_reads(f16_export, tokenizer):
    import gguf

    reader = gguf.GGUFReader(f16_export.path)
    fields = reader.fields
    assert fields["general.architecture"].contents() == "llama"
    assert fields["tokenizer.ggml.model"].contents() == "gpt2"
    assert len(fields["tokenizer.ggml.tokens"].data) == len(tokenizer)
    assert len(fields["tokenizer.ggml.merges"].data) > 40_000
    assert fields["tokenizer.chat_template"].contents() == tokenizer.chat_template
    assert fields["tokenizer.ggml.eos_token_id"].contents() == tokenizer.eos_token_id
    kinds = {t.name: t.tensor_type.name for t in reader.tensors}
    assert kinds["blk.0.attn_q.weight"] == "F16" and kinds["blk.0.attn_norm.weight"] == "F32"
    assert "output.weight" not in kinds  # tied to token_embd, as llama.cpp writes SmolLM2


@pytest.mark.slow
def test_q8_0_stores_each_weight_within_half_a_step_of_its_block(embedded_model, tmp_path):
    import gguf
    import torch
    from transformers import AutoModelForCausalLM

    out = tmp_path / "smollm2-q8_0.gguf"
    result = export(embedded_model, out, outtype="q8_0", check_parity=False)
    assert result.parity == {}
    reader = gguf.GGUFReader(out)
    stored = {t.name: t for t in reader.tensors}
    weights = AutoModelForCausalLM.from_pretrained(embedded_model, dtype=torch.float32).state_dict()
    original = weights["model.layers.3.mlp.down_proj.weight"].numpy()
    tensor = stored["blk.3.ffn_down.weight"]
    assert tensor.tensor_type.name == "Q8_0"
    back = gguf.dequantize(tensor.data, tensor.tensor_type).reshape(original.shape)
    # Q8_0: blocks of 32, codes round(x / d) with the step d = absmax / 127; d is stored in float16, whose
    # rounding (at most 2**-11 of d) moves a code of at most 127 by 127 * 2**-11 steps more than half a step
    step = np.abs(original).reshape(-1, 32).max(axis=1, keepdims=True) / 127
    error = np.abs(back - original).reshape(-1, 32)
    assert (error <= step * (0.5 + 127 * 2**-11) + 1e-8).all()
    assert (error > step / 2 * 1.001).any(), "the float16 scale's rounding should show somewhere"
    assert 0 < error.max()
    assert out.stat().st_size < 0.3 * 4 * sum(w.numel() for n, w in weights.items() if n != "lm_head.weight")


def test_bad_outputs_and_sources_are_refused_before_any_work(tmp_path, embedded_model):
    existing = tmp_path / "model.gguf"
    existing.write_bytes(b"keep me")
    with pytest.raises(QLoRAGuideError, match="already exists: choose another path, or pass --overwrite"):
        export_gguf(embedded_model, existing)
    assert existing.read_bytes() == b"keep me"
    with pytest.raises(QLoRAGuideError, match="is a folder: give the path of a .gguf file"):
        export_gguf(embedded_model, tmp_path)
    with pytest.raises(QLoRAGuideError, match="outtype must be one of q8_0, f16, f32, not 'q4_k'"):
        export_gguf(embedded_model, tmp_path / "x.gguf", outtype="q4_k")
    with pytest.raises(QLoRAGuideError, match="format must be one of gguf, not 'onnx'"):
        export(embedded_model, tmp_path / "x.onnx", format="onnx")
    gpt2 = tmp_path / "gpt2"
    gpt2.mkdir()
    (gpt2 / "config.json").write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(QLoRAGuideError, match="GGUF export supports LlamaForCausalLM, MistralForCausalLM, not GPT2LMHeadModel"):
        export_gguf(gpt2, tmp_path / "gpt2.gguf")
    assert not (tmp_path / "gpt2.gguf").exists() and not list(tmp_path.glob(".*.tmp"))


@pytest.mark.slow
def test_a_run_is_merged_first_and_its_merged_weights_are_what_the_file_holds(tmp_path, model_cache):
    import gguf
    from safetensors.torch import load_file
    from test_deployment import make_adapter_run

    from qlora_guide.deployment import merge_adapter

    run = make_adapter_run(tmp_path / "run")
    out = tmp_path / "run-f32.gguf"
    export(run, out, outtype="f32", check_parity=False)
    merge_adapter(run, tmp_path / "merged", check_parity=False, compare_naive=False)
    merged = load_file(tmp_path / "merged" / "model.safetensors")
    stored = {t.name: t for t in gguf.GGUFReader(out).tensors}
    for layer in (0, 29):  # v_proj rows keep their order in GGUF (q and k are permuted for RoPE)
        v = stored[f"blk.{layer}.attn_v.weight"]
        expected = merged[f"model.layers.{layer}.self_attn.v_proj.weight"].float().numpy()
        assert np.array_equal(np.asarray(v.data).reshape(expected.shape), expected)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".qlora-guide-gguf-")], "the scratch merge is left"
