"""Deployment: load an adapter for inference, merge it into a plain model, generate, chat, inspect, serve.

One concept per module:

* :mod:`~qlora_guide.deployment.loading`: check an adapter folder (a pickled
  ``adapter_model.bin`` is refused, never unpickled), find the base model it
  was trained on, load any model reference (:func:`load_any`,
  :func:`load_adapter_model`, :class:`LoadedModel`), and the 4-bit weights
  dequantized to float32 (:func:`load_dequantized`).
* :mod:`~qlora_guide.deployment.merging`: fold the adapter into the
  dequantized NF4 weights and check the result (:func:`merge_adapter`,
  :class:`MergeResult`, :func:`format_merge_result`, :func:`load_merged_4bit`).
* :mod:`~qlora_guide.deployment.generation`: the one ``model.generate`` call
  of the package (:func:`generate_ids`), streamed answers and the chat loop
  (:func:`chat_input_ids`, :func:`sampling_kwargs`, :func:`stream_generate`,
  :func:`generate`, :func:`chat`).
* :mod:`~qlora_guide.deployment.export`: ``qlora-guide export``, one module
  per file format beside it; :mod:`~qlora_guide.deployment.gguf_export` writes
  the merged model as a GGUF file for llama.cpp and Ollama and reads it back
  with transformers to check it (:func:`export_gguf`, :class:`GGUFExport`).
* :mod:`~qlora_guide.deployment.inspection`: what a run, adapter or merged
  folder holds (:func:`info`, :func:`format_info`).
* :mod:`~qlora_guide.deployment.serving`: an OpenAI-compatible HTTP server
  on FastAPI and uvicorn (``from qlora_guide.deployment import serving``; not
  imported here, nor are fastapi and uvicorn). Its parts: the request and
  response bodies (:mod:`~qlora_guide.deployment.api_types`), OpenAI's error
  bodies (:mod:`~qlora_guide.deployment.api_errors`), the body checks before
  parsing (:mod:`~qlora_guide.deployment.http_guards`), the model and its
  limits (:mod:`~qlora_guide.deployment.served_model`), the one worker that
  owns the model (:mod:`~qlora_guide.deployment.engine`), the requests it
  generates together (:mod:`~qlora_guide.deployment.batching`), several
  adapters on one base (:mod:`~qlora_guide.deployment.adapters`) and the
  token ids turned into text (:mod:`~qlora_guide.deployment.detokenize`).
  Beside it: a load test of a running server
  (:mod:`~qlora_guide.deployment.load_test`) and ``transformers serve`` run
  on a merged model (:mod:`~qlora_guide.deployment.transformers_serve`).

Where a run folder keeps its files is :mod:`qlora_guide.runs`.

A model reference (``model_ref``) is one of: an alias such as
``smollm2-135m``, a hub id, a model folder (``config.json``: a base or a merged
model), or an adapter folder (``adapter_config.json``). :func:`load_any` turns
any of them into a :class:`LoadedModel` that :func:`generate`, :func:`chat`,
the server and the evaluation share.
"""

from qlora_guide.deployment.export import export
from qlora_guide.deployment.generation import (
    CHAT_HELP,
    FirstTokenClock,
    StopWhenSet,
    chat,
    chat_input_ids,
    generate,
    generate_ids,
    greedy_ids,
    model_pad_id,
    sampling_kwargs,
    stream_generate,
)
from qlora_guide.deployment.gguf_export import GGUFExport, export_gguf, format_gguf_export
from qlora_guide.deployment.inspection import format_info, info
from qlora_guide.deployment.loading import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    AUTO,
    MERGE_DTYPES,
    PICKLED_WEIGHTS,
    LoadedModel,
    adapter_base,
    apply_run_generation_settings,
    canonical_model_name,
    check_adapter_dir,
    find_adapter_dir,
    is_embedded_path,
    load_adapter_model,
    load_any,
    load_dequantized,
    manifest_base,
    model_kind,
    read_json,
    read_manifest,
    saved_dtype,
    training_quantization,
)
from qlora_guide.deployment.merging import (
    DEFAULT_PARITY_PROMPTS,
    MERGE_EXPLANATION,
    MergeResult,
    format_merge_result,
    load_merged_4bit,
    merge_adapter,
    update_rounding,
)

__all__ = [
    "ADAPTER_CONFIG",
    "ADAPTER_WEIGHTS",
    "AUTO",
    "CHAT_HELP",
    "DEFAULT_PARITY_PROMPTS",
    "MERGE_DTYPES",
    "MERGE_EXPLANATION",
    "PICKLED_WEIGHTS",
    "FirstTokenClock",
    "GGUFExport",
    "LoadedModel",
    "MergeResult",
    "StopWhenSet",
    "adapter_base",
    "apply_run_generation_settings",
    "canonical_model_name",
    "chat",
    "chat_input_ids",
    "export",
    "export_gguf",
    "check_adapter_dir",
    "find_adapter_dir",
    "format_gguf_export",
    "format_info",
    "format_merge_result",
    "generate",
    "generate_ids",
    "greedy_ids",
    "info",
    "is_embedded_path",
    "load_adapter_model",
    "load_any",
    "load_dequantized",
    "load_merged_4bit",
    "manifest_base",
    "merge_adapter",
    "model_kind",
    "model_pad_id",
    "read_json",
    "read_manifest",
    "sampling_kwargs",
    "saved_dtype",
    "stream_generate",
    "training_quantization",
    "update_rounding",
]
