"""Memory planner: how much memory a fine-tuning run needs, from a model config alone.

Before renting a GPU, you want to know whether QLoRA on a 7B model fits in
16 GB, or a 65B one in 48 GB. :func:`estimate` answers from the model's
``config.json`` (bundled for well-known models, so it works offline) and the
run's settings, and breaks the answer down::

    base weights        4-bit codes of every linear layer of the decoder (qlora),
                        or all weights in ``dtype`` (lora, full)
    quant. constants    absmax per block of ``blocksize`` weights; with double
                        quantization 8-bit absmax + one fp32 constant per 256 blocks
    16-bit weights      embeddings, norms, biases and lm_head, kept in ``dtype``
                        (tied embeddings counted once)
    LoRA weights        r * (in + out) per adapted layer (DoRA: + out, its magnitudes), in ``adapter_dtype``:
                        float32 by default, as peft keeps adapters when the base
                        is bf16/fp16; bfloat16 where the training script casts
                        them, as the QLoRA paper's ``qlora.py`` does with ``--bf16``
    optimizer states    AdamW: two states per trainable weight (4+4 bytes, or
                        about 1+1 for 8-bit AdamW); torch's AdamW keeps them in
                        the adapters' dtype, bitsandbytes' 32-bit ones in fp32
    gradients           LoRA weights only, in ``adapter_dtype`` (lora, qlora),
                        every weight (full)
    activations         what autograd keeps for the backward pass (see below)
    optimizer update    torch's AdamW on CUDA (foreach) holds one temporary the
                        size of the trainable weights; fused bitsandbytes
                        optimizers and the CPU's loop do not
    CUDA overhead       CUDA context, cuBLAS workspaces, allocator slack (none on the CPU)

Activations, with T = batch_size * seq_len tokens, h = hidden_size,
i = intermediate_size, q/kv = widths of the query and key/value projections,
L = layers, d = bytes per element of ``dtype``, a = bytes per element of
``adapter_dtype``. Per decoder layer autograd saves::

    2 RMSNorms           2 * T * (4h + 4)      (they compute in fp32)
    attention (SDPA)     d * T * (2q + 2kv)    (q, k, v and the output; no T x T matrix)
                         + 4 * T * heads       (the log-sum-exp)
    SwiGLU MLP           3 * d * T * i         (gate, SiLU(gate), up)
    each LoRA adapter    T * ((a+1) * in + a*r)  (input copy in the adapters' dtype
                                                after dropout + its 1-byte mask, and the
                                                r-wide middle; on the CPU the mask has
                                                the input's dtype: 2a * in)
    each DoRA adapter    + (d+a) * T * out     (the base and LoRA outputs, which the magnitude's
                                                gradient needs); with lora_dropout > 0, peft
                                                recomputes the base output in the adapters'
                                                dtype from the dropped-out input, and keeps the
                                                dequantized weight for it: 2a * T * out
                                                + a * in * out, whatever T
    full fine-tuning     d * T * (2h + q + i)  (inputs kept for the weight gradients)

Without gradient checkpointing every layer keeps its tensors. With it, only
each layer's input (d * T * h) is kept and one layer at a time is recomputed
during the backward pass. The loss is often the peak: the logits in float32,
the log-softmax kept for the backward pass and two gradients of the same size,
``12 * T * vocab_size`` bytes. A layer's backward pass also needs a workspace
of temporary gradients, ``(4 + 2d) * T * max(h, i)``, plus for qlora one
linear weight dequantized to ``dtype``; DoRA adds three of its largest weight in
``adapter_dtype`` (``B A``, ``W + s B A`` for its row norms, and ``W`` cast to the
adapters' dtype). Peak activations are therefore::

    with checkpointing:    L * d*T*h + head + max(logits, layer + workspace)
    without:               L * layer + head + max(logits, workspace)

Not everything is in memory at once. The step's peak is the larger of the
backward pass (activations, and the gradients computed so far: with
checkpointing they replace the freed layer inputs, so the two count as
max(checkpoints, gradients)) and the optimizer update (all gradients and
its temporaries)::

    peak = weights + LoRA weights + optimizer states + max(backward, update) + overhead

These formulas are checked against measurements: exact tensor bytes and
saved-activation bytes of the embedded model on the CPU, process memory of a
training step on the CPU, and ``torch.cuda.max_memory_allocated`` of
Mistral-7B-, Llama-2-7B- and Llama-3-8B-shaped models with random weights on
an H100 (:func:`measure_gpu_training_peak`; within 2 % in every run of
``benchmarks/bench_memory.py --gpu``).

Assumptions: a Llama-style decoder (llama, mistral, qwen2, qwen3, gemma),
SDPA or flash attention, LoRA adapters in ``adapter_dtype``, the frozen non-quantized
weights left in ``dtype`` (peft's ``prepare_model_for_kbit_training`` casts them
to fp32: add 2 bytes for each of those parameters), the training loop drops the
model output (and its logits) before ``backward``.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from typing import Any

from qlora_guide.config import GUIDE_TARGET_MODULES
from qlora_guide.errors import QLoRAGuideError
from qlora_guide.memory.shapes import ModelShape, bundled_configs, load_model_shape

METHODS = ("full", "lora", "qlora")
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
BNB_BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
GiB = 1024**3

# Optimizer state bytes per trainable parameter, and fixed bytes per tensor.
# bitsandbytes' 8-bit optimizers store each state as uint8 with one fp32 absmax
# per block of 256 values, plus a 256-entry fp32 code table per state and tensor.
OPTIMIZERS = {
    "adamw": (8.0, 0),
    "paged_adamw_32bit": (8.0, 0),
    "adamw_8bit": (2.0 + 2 * 4 / 256, 2 * 256 * 4),
    "paged_adamw_8bit": (2.0 + 2 * 4 / 256, 2 * 256 * 4),
}
# torch's AdamW creates its two states like the parameters (zeros_like), so bf16
# adapters get bf16 states; bitsandbytes' 32-bit optimizers always keep fp32 states.
STATES_IN_PARAMETER_DTYPE = {"adamw"}

# Memory a CUDA process uses beyond torch.cuda.max_memory_allocated(): the CUDA
# context (kernels, libraries) and the caching allocator's reserved-but-unused
# blocks. Measured with `python benchmarks/bench_memory.py --gpu` on an H100
# (torch 2.11, CUDA 13): the driver showed 1.21 GiB more than torch reserved in
# every run; torch reserved 8 % to 80 % of a step's transient memory (activations,
# gradients, update temporaries) beyond its peak, more with gradient
# checkpointing, which frees and reallocates one layer at a time. 20 % kept the
# planned total within -13 % / +9 % of the driver's figure in those runs.
# Older GPUs and CUDA versions have smaller contexts (0.3-0.8 GiB).
# torch also allocates cuBLAS workspaces through its allocator (about 64 MiB in
# those runs: allocated memory grew by that much at the first step beyond the
# tensors of the model and the optimizer), which max_memory_allocated includes.
CUDA_CONTEXT_BYTES = int(1.2 * GiB)
CUBLAS_WORKSPACE_BYTES = 64 * 1024**2
ALLOCATOR_SLACK = 0.20

# Per tensor constants of bitsandbytes' 4-bit format, as the loaded model stores them:
# the 16-entry code table (fp32); with double quantization also the 256-entry
# table of the 8-bit absmax (fp32) and the mean subtracted before it (one fp32).
CODE_4BIT_BYTES = 16 * 4
CODE_8BIT_BYTES = 256 * 4
OFFSET_BYTES = 4
NESTED_BLOCKSIZE = 256


@dataclass
class Row:
    """One line of a breakdown: what, how many bytes, and how it was counted."""

    name: str
    bytes: int
    note: str = ""


@dataclass
class MemoryEstimate:
    """Planned peak memory of one training run and of inference with the same model.

    ``training`` lists what is in memory during a step. They are not all there
    at once: the peak is either in the backward pass (activations, gradients
    so far) or in the optimizer update (all gradients, the update's
    temporaries), so ``training_total`` is::

        weights + LoRA weights + optimizer states + max(backward, update) + CUDA overhead

    and ``peak_phase`` says which one it is. ``inference`` rows add up to
    ``inference_total``.
    """

    model: str
    method: str
    settings: dict[str, Any]
    parameters: int
    quantized_parameters: int
    trainable_parameters: int
    training: list[Row]
    inference: list[Row]
    activations: dict[str, int]
    training_total: int
    tensor_peak: int
    training_total_with_checkpointing: int
    training_total_without_checkpointing: int
    peak_phase: str
    notes: list[str] = field(default_factory=list)

    def _get(self, rows: list[Row], name: str) -> int:
        return next((r.bytes for r in rows if r.name == name), 0)

    @property
    def weights_bytes(self) -> int:
        """Bytes of the base model's stored weights (codes, constants and 16-bit weights)."""
        return sum(self._get(self.training, n) for n in ("base weights", "quant. constants", "16-bit weights"))

    @property
    def overhead_bytes(self) -> int:
        return self._get(self.training, "CUDA overhead")

    @property
    def inference_total(self) -> int:
        return sum(r.bytes for r in self.inference)

    def to_dict(self) -> dict[str, Any]:
        """Plain data for ``--json``: every row, the totals and the settings."""
        data = dataclasses.asdict(self)
        data["weights_bytes"] = self.weights_bytes
        data["inference_total"] = self.inference_total
        return data


def _check_settings(method: str, batch_size: int, seq_len: int, r: int, blocksize: int, optimizer: str,
                    dtype: str, lora_dropout: float, device: str, adapter_dtype: str = "float32") -> None:
    """One-line errors for settings the planner cannot size."""
    def positive_int(value: Any, what: str) -> None:
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise QLoRAGuideError(f"{what} must be a positive integer, not {value!r}")

    if method not in METHODS:
        raise QLoRAGuideError(f"unknown method '{method}': use one of {', '.join(METHODS)}")
    positive_int(batch_size, "batch_size")
    positive_int(seq_len, "seq_len")
    positive_int(r, "r (the LoRA rank)")
    if blocksize not in BNB_BLOCKSIZES:
        raise QLoRAGuideError(f"blocksize must be one of {', '.join(map(str, BNB_BLOCKSIZES))}, not {blocksize!r}")
    if optimizer not in OPTIMIZERS:
        raise QLoRAGuideError(f"unknown optimizer '{optimizer}': use one of {', '.join(OPTIMIZERS)}")
    if dtype not in DTYPE_BYTES:
        raise QLoRAGuideError(f"unknown dtype '{dtype}': use one of {', '.join(DTYPE_BYTES)}")
    if adapter_dtype not in DTYPE_BYTES:
        raise QLoRAGuideError(f"unknown adapter_dtype '{adapter_dtype}': use one of {', '.join(DTYPE_BYTES)}")
    if not 0 <= lora_dropout < 1:
        raise QLoRAGuideError(f"lora_dropout must be in [0, 1), not {lora_dropout!r}")
    if device not in ("cuda", "cpu"):
        raise QLoRAGuideError(f"device must be cuda or cpu, not '{device}'")


def _target_modules(target_modules: list[str] | tuple[str, ...] | str | None) -> tuple[str, ...]:
    """The adapted module names: the guide's seven by default, 'all-linear' for all of them."""
    if target_modules is None or target_modules == "all-linear":
        return GUIDE_TARGET_MODULES
    names = (target_modules,) if isinstance(target_modules, str) else tuple(target_modules)
    unknown = [n for n in names if n not in GUIDE_TARGET_MODULES]
    if unknown or not names:
        raise QLoRAGuideError(
            f"target_modules {', '.join(unknown) or '(empty)'} not in a Llama-style block ({', '.join(GUIDE_TARGET_MODULES)})"
        )
    return names


def quantized_bytes(numel: int, blocksize: int = 64, double_quant: bool = True) -> tuple[int, int]:
    """(code bytes, constant bytes) of one weight tensor stored by bitsandbytes in 4 bits.

    Two 4-bit codes per byte; one fp32 absmax per block, or with double
    quantization one uint8 absmax per block plus one fp32 constant per 256
    blocks, the 8-bit code table and the subtracted mean.
    """
    codes = (numel + 1) // 2
    blocks = math.ceil(numel / blocksize)
    if double_quant:
        constants = blocks + 4 * math.ceil(blocks / NESTED_BLOCKSIZE) + CODE_8BIT_BYTES + OFFSET_BYTES
    else:
        constants = 4 * blocks
    return codes, constants + CODE_4BIT_BYTES


def lora_parameters(shape: ModelShape, r: int, target_modules: tuple[str, ...], use_dora: bool = False) -> int:
    """r * (in + out) for every adapted linear layer of every block, plus DoRA's ``out`` magnitudes."""
    shapes = shape.linear_shapes()
    per_block = sum(r * (shapes[n][0] + shapes[n][1]) + (shapes[n][1] if use_dora else 0) for n in target_modules)
    return shape.num_hidden_layers * per_block


def layer_activation_bytes(shape: ModelShape, tokens: int, method: str, r: int, target_modules: tuple[str, ...],
                           dtype_bytes: int, lora_dropout: float, device: str = "cuda", adapter_bytes: int = 4,
                           use_dora: bool = False) -> int:
    """Bytes autograd saves for the backward pass of one decoder block (formula in the module docstring)."""
    h, i, d = shape.hidden_size, shape.intermediate_size, dtype_bytes
    saved = 2 * (4 * h + 4)  # two RMSNorms: fp32 input copy and 1/rms per token
    saved += d * (2 * shape.q_dim + 2 * shape.kv_dim) + 4 * shape.num_attention_heads  # SDPA inputs, output, LSE
    saved += 3 * d * i  # SwiGLU: gate output, SiLU(gate), up output
    if method == "full":
        saved += d * (2 * h + shape.q_dim + i)  # inputs of the norms' and linears' weight gradients
    else:
        # input in the adapters' dtype after dropout, plus the dropout mask: 1 byte (bool) on
        # CUDA's fused kernel, a noise tensor of the input's dtype on the CPU
        a = adapter_bytes
        per_input = a + ((1 if device == "cuda" else a) if lora_dropout > 0 else 0)
        shapes = shape.linear_shapes()
        saved += sum(per_input * shapes[n][0] + a * r for n in target_modules)
        if use_dora and lora_dropout > 0:
            # the base output is recomputed from the dropped-out input with the dequantized weight, in
            # the adapters' dtype, and autograd keeps that weight: a copy of every adapted weight
            saved += sum(2 * a * shapes[n][1] for n in target_modules)
            return tokens * saved + sum(a * shapes[n][0] * shapes[n][1] for n in target_modules)
        if use_dora:  # the base layer's own output (in dtype) and the LoRA output
            saved += sum((d + a) * shapes[n][1] for n in target_modules)
    return tokens * saved


def activation_bytes(shape: ModelShape, batch_size: int, seq_len: int, method: str, r: int,
                     target_modules: tuple[str, ...], dtype_bytes: int, lora_dropout: float,
                     device: str = "cuda", gradient_bytes: int = 0, adapter_bytes: int = 4,
                     use_dora: bool = False) -> dict[str, int]:
    """Peak activation memory with and without gradient checkpointing, and its parts.

    ``peak_*`` are the activations alone. ``backward_*`` add the gradients
    present at that moment: with checkpointing, the layer inputs are freed as
    the gradients appear, so the two overlap as max(checkpoints, gradients).
    """
    tokens = batch_size * seq_len
    d = dtype_bytes
    layers = shape.num_hidden_layers
    layer = layer_activation_bytes(shape, tokens, method, r, target_modules, d, lora_dropout, device, adapter_bytes,
                                   use_dora)
    workspace = (4 + 2 * d) * tokens * max(shape.hidden_size, shape.intermediate_size)
    largest = max(a * b for a, b in shape.linear_shapes().values())
    if method == "qlora":
        workspace += d * largest  # one dequantized weight
    if use_dora:
        workspace += 3 * adapter_bytes * largest  # B A, W + s B A, and W in the adapters' dtype
    checkpoints = layers * d * tokens * shape.hidden_size
    head = tokens * (4 * shape.hidden_size + 4)  # final RMSNorm
    logits = 12 * tokens * shape.vocab_size  # fp32 logits, log-softmax, two gradients
    grads = gradient_bytes
    return {
        "per_layer": layer,
        "workspace": workspace,
        "checkpoints": checkpoints,
        "head": head,
        "logits": logits,
        "saved_without_checkpointing": layers * layer + head + 4 * tokens * shape.vocab_size,
        "peak_with_checkpointing": checkpoints + head + max(logits, layer + workspace),
        "peak_without_checkpointing": layers * layer + head + max(logits, workspace),
        "backward_with_checkpointing": max(checkpoints + head + logits, max(checkpoints, grads) + layer + workspace),
        "backward_without_checkpointing": max(layers * layer + head + max(logits, workspace), grads + layer + workspace),
    }


def _weight_rows(shape: ModelShape, method: str, n_lora: int, r: int, n_modules: int, blocksize: int,
                 double_quant: bool, dtype: str, adapter_dtype: str = "float32", use_dora: bool = False) -> list[Row]:
    """The stored weights: 4-bit codes and constants (qlora), 16-bit weights, LoRA adapters."""
    d = DTYPE_BYTES[dtype]
    total, linear = shape.num_parameters(), shape.linear_parameters()
    rows = []
    if method == "qlora":
        codes = constants = 0
        for fan_in, fan_out in shape.linear_shapes().values():
            c, k = quantized_bytes(fan_in * fan_out, blocksize, double_quant)
            codes, constants = codes + c, constants + k
        layers = shape.num_hidden_layers
        dq = "8-bit absmax + nested fp32" if double_quant else "fp32 absmax"
        rows.append(Row("base weights", layers * codes, f"{linear / 1e9:.2f} B linear weights in 4 bits"))
        rows.append(Row("quant. constants", layers * constants, f"blocks of {blocksize}, {dq}"))
        rows.append(Row("16-bit weights", d * (total - linear), f"embeddings, norms, lm_head in {dtype}"))
    else:
        rows.append(Row("16-bit weights", d * total, f"all {total / 1e9:.2f} B weights in {dtype}"))
    if n_lora:
        rows.append(Row("LoRA weights", DTYPE_BYTES[adapter_dtype] * n_lora,
                        f"{n_lora / 1e6:.1f} M in {adapter_dtype}, r={r}, {n_modules} modules"
                        + (", DoRA magnitudes" if use_dora else "")))
    return rows


def _inference_rows(shape: ModelShape, method: str, weights: list[Row], batch_size: int, seq_len: int,
                    dtype: str, device: str) -> list[Row]:
    """Generation with the same weights: a KV cache for ``seq_len`` tokens and the prefill's temporaries."""
    d = DTYPE_BYTES[dtype]
    tokens = batch_size * seq_len
    kv_cache = 2 * shape.num_hidden_layers * tokens * shape.kv_dim * d
    workspace = 3 * d * tokens * shape.intermediate_size + 2 * 4 * batch_size * shape.vocab_size
    if method == "qlora":
        workspace += d * max(a * b for a, b in shape.linear_shapes().values())
    rows = [
        *weights,
        Row("KV cache", kv_cache, f"{seq_len} tokens x batch {batch_size}, in {dtype}"),
        Row("workspace", workspace, "prefill MLP temporaries, last-token logits"),
    ]
    if device == "cuda":
        beyond = CUDA_CONTEXT_BYTES + CUBLAS_WORKSPACE_BYTES + int(ALLOCATOR_SLACK * (kv_cache + workspace))
        rows.append(Row("CUDA overhead", beyond, f"context {CUDA_CONTEXT_BYTES / GiB:.1f} GiB, cuBLAS, allocator slack"))
    return rows


def estimate(
    model: str | os.PathLike | dict | ModelShape | None = None,
    method: str = "qlora",
    batch_size: int = 1,
    seq_len: int = 512,
    r: int = 64,
    target_modules: list[str] | tuple[str, ...] | str | None = None,
    gradient_checkpointing: bool = True,
    double_quant: bool = True,
    blocksize: int = 64,
    optimizer: str = "adamw",
    dtype: str = "bfloat16",
    lora_dropout: float = 0.05,
    device: str = "cuda",
    adapter_dtype: str = "float32",
    use_dora: bool = False,
) -> MemoryEstimate:
    """Plan the peak memory of training (and of inference) for ``model`` with ``method``.

    ``model`` is anything :func:`load_model_shape` accepts. ``method`` is
    ``full`` (every weight trained in ``dtype``), ``lora`` (frozen ``dtype``
    base + adapters) or ``qlora`` (frozen NF4 base + adapters). ``device="cpu"``
    drops the CUDA overhead line. Inference is generation of ``seq_len`` tokens
    for ``batch_size`` sequences with a KV cache.

    ``adapter_dtype`` is the dtype of the LoRA weights and of their gradients.
    The default, ``float32``, is what peft does today (``get_peft_model`` keeps
    adapters in fp32 over a bf16/fp16 base): use it to plan your own run.
    ``bfloat16`` is the QLoRA paper's setting, whose ``qlora.py`` casts every
    LoRA layer to bf16 after creating it (:func:`qlora_guide.memory.claims.paper_headline_check`).

    ``use_dora`` plans DoRA (peft's ``use_dora``): a trainable magnitude per
    output row, and what its forward pass keeps and computes (module docstring).
    """
    _check_settings(method, batch_size, seq_len, r, blocksize, optimizer, dtype, lora_dropout, device, adapter_dtype)
    modules = _target_modules(target_modules)
    shape = load_model_shape(model)
    d, a = DTYPE_BYTES[dtype], DTYPE_BYTES[adapter_dtype]
    total_params = shape.num_parameters()
    n_lora = 0 if method == "full" else lora_parameters(shape, r, modules, use_dora)
    trainable = total_params if method == "full" else n_lora

    weights = _weight_rows(shape, method, n_lora, r, len(modules), blocksize, double_quant, dtype, adapter_dtype,
                           use_dora)

    per_param, per_tensor = OPTIMIZERS[optimizer]
    if method == "full":
        grads = Row("gradients", d * trainable, f"every weight, in {dtype}")
        n_tensors = 7 * shape.num_hidden_layers
    else:
        grads = Row("gradients", a * trainable, f"LoRA weights only, {adapter_dtype}")
        n_tensors = (3 if use_dora else 2) * len(modules) * shape.num_hidden_layers
        if optimizer in STATES_IN_PARAMETER_DTYPE:
            per_param = 2.0 * a
    states = Row("optimizer states", int(per_param * trainable) + per_tensor * n_tensors, optimizer)
    # torch's AdamW on CUDA (foreach) holds one temporary the size of the trainable
    # weights during the update; bitsandbytes' fused optimizers and the CPU loop do not.
    foreach = optimizer == "adamw" and device == "cuda"
    update = Row("optimizer update", grads.bytes if foreach else 0,
                 "AdamW temporaries (torch foreach)" if foreach else "fused update, no temporaries")

    act = activation_bytes(shape, batch_size, seq_len, method, r, modules, d, lora_dropout, device, grads.bytes, a,
                           use_dora and method != "full")
    persistent = sum(row.bytes for row in weights) + states.bytes

    def peak(checkpointing: bool) -> tuple[int, int, str]:
        """(allocated peak, overhead beyond it, phase) for one checkpointing setting."""
        backward = act["backward_with_checkpointing" if checkpointing else "backward_without_checkpointing"]
        phase = "backward" if backward >= grads.bytes + update.bytes else "optimizer update"
        transient = max(backward, grads.bytes + update.bytes)
        if device != "cuda":
            return persistent + transient, 0, phase
        slack = int(ALLOCATOR_SLACK * transient)
        return persistent + transient + CUBLAS_WORKSPACE_BYTES, CUDA_CONTEXT_BYTES + slack, phase

    allocated, beyond, phase = peak(gradient_checkpointing)
    key = "peak_with_checkpointing" if gradient_checkpointing else "peak_without_checkpointing"
    gc_note = "with gradient checkpointing" if gradient_checkpointing else "no gradient checkpointing"
    activations = Row("activations", act[key], f"{gc_note}, batch {batch_size} x {seq_len} tokens")
    overhead = Row("CUDA overhead", beyond + (CUBLAS_WORKSPACE_BYTES if device == "cuda" else 0),
                   f"context {CUDA_CONTEXT_BYTES / GiB:.1f} GiB, cuBLAS, allocator slack"
                   if device == "cuda" else "none on the CPU")
    training = [*weights, states, grads, activations, update, overhead]
    totals = {flag: sum(peak(flag)[:2]) for flag in (True, False)}

    inference = _inference_rows(shape, method, weights, batch_size, seq_len, dtype, device)

    notes = []
    if shape.max_position_embeddings and seq_len > shape.max_position_embeddings:
        notes.append(f"seq_len {seq_len} exceeds the model's max_position_embeddings ({shape.max_position_embeddings})")
    if method == "full":
        notes.append("full: weights and gradients in dtype with 32-bit optimizer states; mixed precision "
                     "with fp32 master weights adds 4 bytes per parameter")
    if optimizer.startswith("paged") and device == "cpu":
        notes.append("paged optimizers page to the CPU only from a GPU; on the CPU they are ordinary optimizers")
    elif optimizer.startswith("paged"):
        notes.append(f"{optimizer}: the optimizer states ({states.bytes / GiB:.2f} GiB) are in paged memory, which "
                     "the driver moves to the CPU when the GPU runs short; the peak counts them on the GPU")
    settings = dict(batch_size=batch_size, seq_len=seq_len, r=r, target_modules=list(modules),
                    gradient_checkpointing=gradient_checkpointing, double_quant=double_quant, blocksize=blocksize,
                    optimizer=optimizer, dtype=dtype, lora_dropout=lora_dropout, device=device,
                    adapter_dtype=adapter_dtype, use_dora=use_dora)
    return MemoryEstimate(
        model=shape.name, method=method, settings=settings, parameters=total_params,
        quantized_parameters=shape.linear_parameters() if method == "qlora" else 0, trainable_parameters=trainable,
        training=training, inference=inference, activations=act, training_total=totals[gradient_checkpointing],
        tensor_peak=allocated,
        training_total_with_checkpointing=totals[True], training_total_without_checkpointing=totals[False],
        peak_phase=phase, notes=notes,
    )


def compare_methods(model: str | os.PathLike | dict | ModelShape | None = None,
                    methods: tuple[str, ...] = METHODS, **settings: Any) -> list[MemoryEstimate]:
    """The same run planned for each method (full, lora, qlora), e.g. for a bar chart per model size."""
    return [estimate(model, method=m, **settings) for m in methods]


def peak_rows(estimates: list[MemoryEstimate]) -> list[dict[str, Any]]:
    """What a weights-only estimate counts next to the planned peak of a training step, one row per estimate (GiB)."""
    rows = []
    for est in estimates:
        rows.append({"seq_len": est.settings["seq_len"], "batch_size": est.settings["batch_size"],
                     "gradient_checkpointing": est.settings["gradient_checkpointing"],
                     "weights_gib": est.weights_bytes / GiB,
                     "activations_gib": est._get(est.training, "activations") / GiB,
                     "peak_gib": est.training_total / GiB,
                     "peak_over_weights": est.training_total / est.weights_bytes})
    return rows


def comparison_rows(models: list[str] | None = None, methods: tuple[str, ...] = METHODS,
                    **settings: Any) -> list[dict[str, Any]]:
    """Plain rows (model, parameters, method, weights, training and inference peaks) for plots.

    ``models`` defaults to every bundled config, smallest first.
    """
    names = models or [s.name for s in sorted((load_model_shape(n) for n in bundled_configs()),
                                              key=lambda s: s.num_parameters())]
    rows = []
    for name in names:
        for est in compare_methods(name, methods, **settings):
            rows.append({"model": est.model, "parameters": est.parameters, "method": est.method,
                         "weights_bytes": est.weights_bytes, "training_total": est.training_total,
                         "inference_total": est.inference_total, "peak_phase": est.peak_phase})
    return rows
