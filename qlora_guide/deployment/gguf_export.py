"""GGUF export: a merged model, with its tokenizer and chat template, as one file for llama.cpp and Ollama.

The file is written with the ``gguf`` package (the writer llama.cpp's own
converter uses), in the llama architecture's tensor names and layout, then
read back with transformers (``gguf_file=``) and compared with the model it
came from: logits and greedy answers. Llama-family checkpoints (Llama,
SmolLM2, Mistral) with a byte-level BPE tokenizer are supported; anything
else is refused before any work.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from qlora_guide import progress
from qlora_guide.deployment.merging import (
    DEFAULT_PARITY_PROMPTS,
    compare_outputs,
    merge_adapter,
    model_outputs,
    parity_inputs,
)
from qlora_guide.errors import QLoRAGuideError
from qlora_guide.outputs import atomic_file

# The transformers classes whose weights map onto GGUF's llama architecture.
ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM")
OUTTYPES = ("q8_0", "f16", "f32")  # the weights' type in the file, named as llama.cpp's converter names them


@dataclass
class GGUFExport:
    """What :func:`export_gguf` wrote, and how closely the file's model matches the one it came from."""

    path: str
    source: str
    outtype: str
    size_bytes: int
    tensors: int
    seconds: float
    parity: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _check_output(out: Path, overwrite: bool) -> None:
    """Refuse, before any work, an output path whose writing would lose something."""
    if out.is_dir():
        raise QLoRAGuideError(f"output {out} is a folder: give the path of a .gguf file")
    if out.exists() and not overwrite:
        raise QLoRAGuideError(f"output {out} already exists: choose another path, or pass --overwrite to replace it")
    if not out.parent.is_dir():
        raise QLoRAGuideError(f"folder {out.parent} does not exist")


def _check_architecture(config: Any) -> None:
    """Refuse a model whose weights have no llama-architecture GGUF layout here."""
    architectures = getattr(config, "architectures", None) or []
    if not set(architectures) & set(ARCHITECTURES):
        raise QLoRAGuideError(f"GGUF export supports {', '.join(ARCHITECTURES)}, not {', '.join(architectures) or '?'}")


def _permute(weight: Any, n_head: int) -> Any:
    """q/k projection rows reordered from transformers' rotary layout to GGML's (llama.cpp's converter does this)."""
    return weight.reshape(n_head, 2, weight.shape[0] // n_head // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def _add_hyperparameters(writer: Any, config: Any, name: str, file_type: int) -> None:
    """The llama hyperparameters llama.cpp and transformers read back."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    rope = getattr(config, "rope_parameters", None) or {}
    writer.add_name(name)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(file_type)


def _add_tokenizer(writer: Any, folder: Path, tokenizer: Any, vocab_size: int) -> None:
    """The byte-level BPE vocabulary, merges, special tokens and chat template, as llama.cpp writes them."""
    import gguf

    spec = folder / "tokenizer.json"
    if not spec.is_file():
        raise QLoRAGuideError(f"{folder} has no tokenizer.json: GGUF export needs the model's fast tokenizer")
    saved = json.loads(spec.read_text(encoding="utf-8"))
    if saved.get("model", {}).get("type") != "BPE" or "ByteLevel" not in json.dumps(saved.get("pre_tokenizer")):
        raise QLoRAGuideError("GGUF export supports byte-level BPE tokenizers (GPT-2 style, as SmolLM2 and Llama 3); "
                              "this tokenizer is not one")
    vocab = tokenizer.get_vocab()
    by_id = {i: t for t, i in vocab.items()}
    special = set(tokenizer.all_special_ids)
    added = {i for i in tokenizer.added_tokens_decoder}
    tokens, types = [], []
    for i in range(vocab_size):
        tokens.append(by_id.get(i, f"[PAD{i}]"))
        types.append(gguf.TokenType.CONTROL if i in special else gguf.TokenType.USER_DEFINED if i in added
                     else gguf.TokenType.UNUSED if i not in by_id else gguf.TokenType.NORMAL)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    gguf.SpecialVocab(folder, load_merges=True, n_vocab=vocab_size).add_to_gguf(writer, quiet=True)
    if tokenizer.chat_template and "tokenizer.chat_template" not in writer.kv_data[0]:
        writer.add_chat_template(tokenizer.chat_template)


def _tensors(model: Any, config: Any, qtype: Any) -> list[tuple[str, Any, Any]]:
    """(GGUF name, data, raw dtype) of every weight: 2-D matrices in ``qtype``, norms in float32."""
    import gguf
    import numpy as np

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    tied = getattr(config, "tie_word_embeddings", False)
    out = []
    for name, tensor in model.state_dict().items():
        if tied and name == "lm_head.weight":
            continue  # llama.cpp reads the output layer from token_embd when output.weight is absent
        gguf_name = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise QLoRAGuideError(f"no GGUF name for the weight {name}")
        data = tensor.detach().float().cpu().numpy()
        if ".attn_q." in gguf_name:
            data = _permute(data, config.num_attention_heads)
        elif ".attn_k." in gguf_name:
            data = _permute(data, config.num_key_value_heads)
        if data.ndim == 1 or qtype == gguf.GGMLQuantizationType.F32:
            out.append((gguf_name, data.astype(np.float32), gguf.GGMLQuantizationType.F32))
        elif qtype == gguf.GGMLQuantizationType.Q8_0 and data.shape[-1] % 32 == 0:
            out.append((gguf_name, gguf.quantize(data, qtype), qtype))
        else:
            out.append((gguf_name, data.astype(np.float16), gguf.GGMLQuantizationType.F16))
    return out


def write_gguf(model_dir: str | os.PathLike, out: str | os.PathLike, outtype: str = "q8_0") -> int:
    """Write the merged model of ``model_dir`` to the GGUF file ``out`` (atomically); return its tensor count."""
    import gguf
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder, out = Path(model_dir), Path(out)
    config = AutoConfig.from_pretrained(folder)
    _check_architecture(config)
    qtypes = {"f16": gguf.GGMLQuantizationType.F16, "q8_0": gguf.GGMLQuantizationType.Q8_0,
              "f32": gguf.GGMLQuantizationType.F32}
    file_types = {"f16": gguf.LlamaFileType.MOSTLY_F16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
                  "f32": gguf.LlamaFileType.ALL_F32}
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    with atomic_file(out) as tmp:
        writer = gguf.GGUFWriter(tmp, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
        _add_hyperparameters(writer, config, folder.name, file_types[outtype])
        _add_tokenizer(writer, folder, tokenizer, config.vocab_size)
        tensors = _tensors(model, config, qtypes[outtype])
        for name, data, raw_dtype in tensors:
            writer.add_tensor(name, data, raw_dtype=raw_dtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return len(tensors)


def gguf_parity(model_dir: str | os.PathLike, gguf_path: str | os.PathLike,
                prompts: tuple[str, ...] | list[str] = DEFAULT_PARITY_PROMPTS, max_new_tokens: int = 16) -> dict[str, Any]:
    """Logits and greedy answers of the GGUF file, read back by transformers, against the model it was made from."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path = Path(gguf_path)
    reference = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    inputs = parity_inputs(tokenizer, prompts)
    expected = model_outputs(reference, inputs, max_new_tokens)
    del reference
    exported = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
    reread = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    result = compare_outputs(expected, model_outputs(exported, inputs, max_new_tokens))
    result["same_token_ids"] = all(reread(p)["input_ids"] == tokenizer(p)["input_ids"] for p in prompts)
    result["chat_template_kept"] = reread.chat_template == tokenizer.chat_template
    return result


@progress.library_bars()
def export_gguf(source: str | os.PathLike, out: str | os.PathLike, outtype: str = "q8_0", overwrite: bool = False,
                check_parity: bool = True) -> GGUFExport:
    """Export a merged model folder, or a run / adapter folder (merged first, in float32), to a GGUF file.

    ``outtype`` is the weights' type in the file: ``q8_0`` (8-bit blocks of 32,
    about a quarter of float32), ``f16`` or ``f32``; norms stay float32. With
    ``check_parity`` the file is read back with transformers and compared with
    the merged model: maximum and mean logit difference, greedy answers.
    """
    if outtype not in OUTTYPES:
        raise QLoRAGuideError(f"outtype must be one of {', '.join(OUTTYPES)}, not {outtype!r}")
    source, out = Path(source), Path(out).expanduser()
    if not source.is_dir():
        raise QLoRAGuideError(f"{source} does not exist or is not a folder")
    _check_output(out, overwrite)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix=".qlora-guide-gguf-", dir=out.parent) as scratch:
        model_dir = source
        if not (source / "config.json").is_file():  # an adapter or a run: merge it first
            model_dir = Path(scratch) / "merged"
            merge_adapter(source, model_dir, check_parity=False, compare_naive=False)
        tensors = write_gguf(model_dir, out, outtype)
        parity = gguf_parity(model_dir, out) if check_parity else {}
    return GGUFExport(path=str(out), source=str(source), outtype=outtype, size_bytes=out.stat().st_size,
                      tensors=tensors, seconds=round(time.perf_counter() - start, 1), parity=parity)


def format_gguf_export(result: GGUFExport | dict[str, Any]) -> str:
    """The export as the CLI prints it: the file, its size, and the parity with the merged model."""
    r = result.to_dict() if isinstance(result, GGUFExport) else result
    lines = [f"wrote {r['path']} ({r['outtype']}, {r['size_bytes'] / 2**20:.1f} MiB, {r['tensors']} tensors) "
             f"from {r['source']} in {r['seconds']:.1f} s"]
    if r["parity"]:
        p = r["parity"]
        lines.append(f"read back by transformers: max |logit diff| {p['max_logit_diff']:.4f}, mean "
                     f"{p['mean_logit_diff']:.4f}, greedy answers identical {p['greedy_agree_count']}, "
                     f"same token ids: {p['same_token_ids']}, chat template kept: {p['chat_template_kept']}")
    return "\n".join(lines)
