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
    LoRA weights        r * (in + out) per adapted layer, in float32 (peft keeps
                        adapters in fp32 when the base is bf16/fp16)
    optimizer states    AdamW: two states per trainable weight (4+4 bytes, or
                        about 1+1 for 8-bit AdamW)
    gradients           LoRA weights only (lora, qlora), every weight (full)
    activations         what autograd keeps for the backward pass (see below)
    optimizer update    torch's AdamW on CUDA (foreach) holds one temporary the
                        size of the trainable weights; fused bitsandbytes
                        optimizers and the CPU's loop do not
    CUDA overhead       CUDA context, cuBLAS workspaces, allocator slack (none on the CPU)

Activations, with T = batch_size * seq_len tokens, h = hidden_size,
i = intermediate_size, q/kv = widths of the query and key/value projections,
L = layers, d = bytes per element of ``dtype``. Per decoder layer autograd saves::

    2 RMSNorms           2 * T * (4h + 4)      (they compute in fp32)
    attention (SDPA)     d * T * (2q + 2kv)    (q, k, v and the output; no T x T matrix)
                         + 4 * T * heads       (the log-sum-exp)
    SwiGLU MLP           3 * d * T * i         (gate, SiLU(gate), up)
    each LoRA adapter    T * (5 * in + 4r)     (fp32 input copy after dropout + its
                                                1-byte mask, and the r-wide middle; on
                                                the CPU the mask is fp32: 8 * in)
    full fine-tuning     d * T * (2h + q + i)  (inputs kept for the weight gradients)

Without gradient checkpointing every layer keeps its tensors. With it, only
each layer's input (d * T * h) is kept and one layer at a time is recomputed
during the backward pass. The loss is often the peak: the logits in float32,
the log-softmax kept for the backward pass and two gradients of the same size,
``12 * T * vocab_size`` bytes. A layer's backward pass also needs a workspace
of temporary gradients, ``(4 + 2d) * T * max(h, i)``, plus for qlora one
linear weight dequantized to ``dtype``. Peak activations are therefore::

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
SDPA or flash attention, LoRA adapters in fp32, the frozen non-quantized
weights left in ``dtype`` (peft's ``prepare_model_for_kbit_training`` casts them
to fp32: add 2 bytes for each of those parameters), the training loop drops the
model output (and its logits) before ``backward``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qlora_guide.errors import QLoRAGuideError

CONFIGS_DIR = Path(__file__).parent / "assets" / "model_configs"
METHODS = ("full", "lora", "qlora")
GUIDE_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
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

# Decoders whose blocks are Llama-shaped: attention q/k/v/o, SwiGLU MLP gate/up/down, RMSNorm.
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma")
TIED_BY_DEFAULT = {"gemma"}
ENCODER_MODEL_TYPES = {"bert", "roberta", "distilbert", "albert", "electra", "deberta", "deberta-v2", "xlm-roberta",
                       "t5", "mt5", "bart", "mbart", "marian", "pegasus", "vit", "clip", "whisper"}


# --------------------------------------------------------------------------- model shapes


@dataclass(frozen=True)
class ModelShape:
    """The dimensions of a Llama-style decoder that memory depends on."""

    name: str
    model_type: str
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int
    tie_word_embeddings: bool
    max_position_embeddings: int
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False

    @property
    def q_dim(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.num_key_value_heads * self.head_dim

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """(in_features, out_features) of each linear layer of one decoder block."""
        h, i = self.hidden_size, self.intermediate_size
        return {
            "q_proj": (h, self.q_dim),
            "k_proj": (h, self.kv_dim),
            "v_proj": (h, self.kv_dim),
            "o_proj": (self.q_dim, h),
            "gate_proj": (h, i),
            "up_proj": (h, i),
            "down_proj": (i, h),
        }

    def bias_parameters(self) -> int:
        """Bias parameters of one block (kept in 16 bits even when the weights are 4-bit)."""
        shapes = self.linear_shapes()
        total = 0
        if self.qkv_bias:
            total += sum(shapes[n][1] for n in ("q_proj", "k_proj", "v_proj"))
        if self.o_bias:
            total += shapes["o_proj"][1]
        if self.mlp_bias:
            total += sum(shapes[n][1] for n in ("gate_proj", "up_proj", "down_proj"))
        return total

    def norm_parameters(self) -> int:
        """RMSNorm weights: two per block (+ q/k norms for qwen3) and the final one."""
        per_layer = 2 * self.hidden_size + (2 * self.head_dim if self.qk_norm else 0)
        return self.num_hidden_layers * per_layer + self.hidden_size

    def embedding_parameters(self) -> int:
        """Input embeddings plus lm_head, counted once when they are tied."""
        copies = 1 if self.tie_word_embeddings else 2
        return copies * self.vocab_size * self.hidden_size

    def linear_parameters(self) -> int:
        """Weights of the decoder's linear layers: what bitsandbytes quantizes (not lm_head)."""
        per_layer = sum(fan_in * fan_out for fan_in, fan_out in self.linear_shapes().values())
        return self.num_hidden_layers * per_layer

    def num_parameters(self) -> int:
        """All parameters, as ``model.num_parameters()`` counts them."""
        other = self.num_hidden_layers * self.bias_parameters() + self.norm_parameters() + self.embedding_parameters()
        return self.linear_parameters() + other


def bundled_configs() -> dict[str, Path]:
    """Names and files of the model configs shipped with the package."""
    return {p.stem: p for p in sorted(CONFIGS_DIR.glob("*.json"))}


def _bundled_lookup() -> dict[str, Path]:
    """Every accepted spelling (name, hub id, alias; lower case) -> bundled config file."""
    lookup = {}
    for name, path in bundled_configs().items():
        data = json.loads(path.read_text())
        for key in [name, data.get("_name_or_path", ""), *data.get("qlora_guide_aliases", [])]:
            if key:
                lookup[key.lower()] = path
    return lookup


def shape_from_config(config: dict[str, Any], name: str = "model") -> ModelShape:
    """Read a ``config.json`` mapping into a :class:`ModelShape`, refusing what the planner cannot size."""
    model_type = str(config.get("model_type", ""))
    architectures = [str(a) for a in config.get("architectures") or []]
    is_causal = any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in architectures)
    if config.get("is_encoder_decoder") or model_type in ENCODER_MODEL_TYPES or (architectures and not is_causal):
        raise QLoRAGuideError(f"'{name}' is not a decoder-only causal language model (model_type '{model_type or '?'}')")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise QLoRAGuideError(
            f"'{name}' has model_type '{model_type or '?'}': the planner sizes Llama-style decoders "
            f"({', '.join(SUPPORTED_MODEL_TYPES)})"
        )
    required = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
    missing = [k for k in required if not isinstance(config.get(k), int) or config[k] <= 0]
    if missing:
        raise QLoRAGuideError(f"the config of '{name}' lacks positive integer fields: {', '.join(missing)}")
    heads = config["num_attention_heads"]
    return ModelShape(
        name=name,
        model_type=model_type,
        hidden_size=config["hidden_size"],
        intermediate_size=config["intermediate_size"],
        num_hidden_layers=config["num_hidden_layers"],
        num_attention_heads=heads,
        num_key_value_heads=config.get("num_key_value_heads") or heads,
        head_dim=config.get("head_dim") or config["hidden_size"] // heads,
        vocab_size=config["vocab_size"],
        tie_word_embeddings=bool(config.get("tie_word_embeddings", model_type in TIED_BY_DEFAULT)),
        max_position_embeddings=int(config.get("max_position_embeddings") or 0),
        qkv_bias=model_type == "qwen2" or bool(config.get("attention_bias", False)),
        o_bias=model_type != "qwen2" and bool(config.get("attention_bias", False)),
        mlp_bias=bool(config.get("mlp_bias", False)),
        qk_norm=model_type == "qwen3",
    )


def _config_from_hub(model_id: str) -> dict[str, Any]:
    """Fetch a hub model's config (no weights), turning any failure into one line naming the id."""
    try:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(model_id, trust_remote_code=False)
    except Exception as err:  # noqa: BLE001 - any failure here means "cannot resolve this id"
        offline = os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("TRANSFORMERS_OFFLINE") == "1"
        why = "offline mode is on" if offline else (str(err).strip().splitlines() or [type(err).__name__])[0]
        bundled = ", ".join(bundled_configs())
        raise QLoRAGuideError(
            f"cannot read the config of '{model_id}' ({why}): give a local folder, or one of the bundled configs: {bundled}"
        ) from None
    data = config.to_dict()
    text = data.get("text_config")
    return text if isinstance(text, dict) and "hidden_size" in text else data


def load_model_shape(model: str | os.PathLike | dict | ModelShape | None = None) -> ModelShape:
    """Find a model's dimensions without loading any weights.

    Accepts, in this order: a :class:`ModelShape` or a config mapping; the
    embedded model (``None``, ``"smollm2-135m"``) and the bundled configs, by name,
    hub id or alias (:func:`bundled_configs`); a local folder with a
    ``config.json`` or a ``.json`` file; any other hub id, through
    ``transformers.AutoConfig`` (needs the network).
    """
    if isinstance(model, ModelShape):
        return model
    if isinstance(model, dict):
        return shape_from_config(model, name=str(model.get("_name_or_path") or "config"))
    name = "smollm2-135m" if model is None else str(model)
    path = _bundled_lookup().get(name.lower())
    if path is not None:
        return shape_from_config(json.loads(path.read_text()), name=path.stem)
    local = Path(name).expanduser()
    if local.is_dir():
        local = local / "config.json"
        if not local.is_file():
            raise QLoRAGuideError(f"model folder {local.parent} has no config.json")
    if local.is_file():
        try:
            data = json.loads(local.read_text())
        except (OSError, ValueError) as err:
            raise QLoRAGuideError(f"{local} is not a readable JSON config ({err})") from None
        return shape_from_config(data, name=name)
    return shape_from_config(_config_from_hub(name), name=name)


# --------------------------------------------------------------------------- the estimate


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
                    dtype: str, lora_dropout: float, device: str) -> None:
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


def lora_parameters(shape: ModelShape, r: int, target_modules: tuple[str, ...]) -> int:
    """r * (in + out) for every adapted linear layer of every block."""
    shapes = shape.linear_shapes()
    return shape.num_hidden_layers * sum(r * (shapes[n][0] + shapes[n][1]) for n in target_modules)


def layer_activation_bytes(shape: ModelShape, tokens: int, method: str, r: int, target_modules: tuple[str, ...],
                           dtype_bytes: int, lora_dropout: float, device: str = "cuda") -> int:
    """Bytes autograd saves for the backward pass of one decoder block (formula in the module docstring)."""
    h, i, d = shape.hidden_size, shape.intermediate_size, dtype_bytes
    saved = 2 * (4 * h + 4)  # two RMSNorms: fp32 input copy and 1/rms per token
    saved += d * (2 * shape.q_dim + 2 * shape.kv_dim) + 4 * shape.num_attention_heads  # SDPA inputs, output, LSE
    saved += 3 * d * i  # SwiGLU: gate output, SiLU(gate), up output
    if method == "full":
        saved += d * (2 * h + shape.q_dim + i)  # inputs of the norms' and linears' weight gradients
    else:
        # fp32 input after dropout, plus the dropout mask: 1 byte (bool) on CUDA's fused kernel,
        # an fp32 noise tensor on the CPU
        per_input = 4 + ((1 if device == "cuda" else 4) if lora_dropout > 0 else 0)
        shapes = shape.linear_shapes()
        saved += sum(per_input * shapes[n][0] + 4 * r for n in target_modules)
    return tokens * saved


def activation_bytes(shape: ModelShape, batch_size: int, seq_len: int, method: str, r: int,
                     target_modules: tuple[str, ...], dtype_bytes: int, lora_dropout: float,
                     device: str = "cuda", gradient_bytes: int = 0) -> dict[str, int]:
    """Peak activation memory with and without gradient checkpointing, and its parts.

    ``peak_*`` are the activations alone. ``backward_*`` add the gradients
    present at that moment: with checkpointing, the layer inputs are freed as
    the gradients appear, so the two overlap as max(checkpoints, gradients).
    """
    tokens = batch_size * seq_len
    d = dtype_bytes
    layers = shape.num_hidden_layers
    layer = layer_activation_bytes(shape, tokens, method, r, target_modules, d, lora_dropout, device)
    workspace = (4 + 2 * d) * tokens * max(shape.hidden_size, shape.intermediate_size)
    if method == "qlora":
        workspace += d * max(a * b for a, b in shape.linear_shapes().values())  # one dequantized weight
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
                 double_quant: bool, dtype: str) -> list[Row]:
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
        rows.append(Row("LoRA weights", 4 * n_lora, f"{n_lora / 1e6:.1f} M in fp32, r={r}, {n_modules} modules"))
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
) -> MemoryEstimate:
    """Plan the peak memory of training (and of inference) for ``model`` with ``method``.

    ``model`` is anything :func:`load_model_shape` accepts. ``method`` is
    ``full`` (every weight trained in ``dtype``), ``lora`` (frozen ``dtype``
    base + adapters) or ``qlora`` (frozen NF4 base + adapters). ``device="cpu"``
    drops the CUDA overhead line. Inference is generation of ``seq_len`` tokens
    for ``batch_size`` sequences with a KV cache.
    """
    _check_settings(method, batch_size, seq_len, r, blocksize, optimizer, dtype, lora_dropout, device)
    modules = _target_modules(target_modules)
    shape = load_model_shape(model)
    d = DTYPE_BYTES[dtype]
    total_params = shape.num_parameters()
    n_lora = 0 if method == "full" else lora_parameters(shape, r, modules)
    trainable = total_params if method == "full" else n_lora

    weights = _weight_rows(shape, method, n_lora, r, len(modules), blocksize, double_quant, dtype)

    per_param, per_tensor = OPTIMIZERS[optimizer]
    if method == "full":
        grads = Row("gradients", d * trainable, f"every weight, in {dtype}")
        n_tensors = 7 * shape.num_hidden_layers
    else:
        grads = Row("gradients", 4 * trainable, "LoRA weights only, fp32")
        n_tensors = 2 * len(modules) * shape.num_hidden_layers
    states = Row("optimizer states", int(per_param * trainable) + per_tensor * n_tensors, optimizer)
    # torch's AdamW on CUDA (foreach) holds one temporary the size of the trainable
    # weights during the update; bitsandbytes' fused optimizers and the CPU loop do not.
    foreach = optimizer == "adamw" and device == "cuda"
    update = Row("optimizer update", grads.bytes if foreach else 0,
                 "AdamW temporaries (torch foreach)" if foreach else "fused update, no temporaries")

    act = activation_bytes(shape, batch_size, seq_len, method, r, modules, d, lora_dropout, device, grads.bytes)
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
    settings = dict(batch_size=batch_size, seq_len=seq_len, r=r, target_modules=list(modules),
                    gradient_checkpointing=gradient_checkpointing, double_quant=double_quant, blocksize=blocksize,
                    optimizer=optimizer, dtype=dtype, lora_dropout=lora_dropout, device=device)
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


# --------------------------------------------------------------------------- formatting


def gib(n: float) -> str:
    """Bytes as GiB with two decimals (MiB below one GiB), e.g. ``'3.84 GiB'``."""
    return f"{n / GiB:.2f} GiB" if abs(n) >= GiB else f"{n / 1024**2:.1f} MiB"


def _table(rows: list[tuple[str, str, str]]) -> list[str]:
    width = [max(len(row[k]) for row in rows) for k in range(3)]
    return [f"  {a:<{width[0]}}  {b:>{width[1]}}  {c}".rstrip() for a, b, c in rows]


def format_estimate(est: MemoryEstimate) -> str:
    """A readable table: what a training step holds, its peak, then inference."""
    s = est.settings
    head = (f"{est.model} - {est.method}: {est.parameters / 1e9:.2f} B parameters, "
            f"{est.trainable_parameters / 1e6:,.1f} M trainable")
    lines = [head, f"batch {s['batch_size']} x seq {s['seq_len']}, r={s['r']}, {s['dtype']}, {s['optimizer']}, "
                   f"device {s['device']}", "", "Training"]
    rows = [(r.name, gib(r.bytes), r.note) for r in est.training]
    rows.append(("peak", gib(est.training_total), f"weights + states + {est.peak_phase} + overhead"))
    if s["gradient_checkpointing"]:
        rows.append(("peak without grad. ckpt", gib(est.training_total_without_checkpointing), "for comparison"))
    else:
        rows.append(("peak with grad. ckpt", gib(est.training_total_with_checkpointing), "for comparison"))
    lines += _table(rows)
    lines += ["", "Inference"]
    rows = [(r.name, gib(r.bytes), r.note) for r in est.inference] + [("total", gib(est.inference_total), "")]
    lines += _table(rows)
    lines += [f"note: {n}" for n in est.notes]
    return "\n".join(lines)


def format_comparison(estimates: list[MemoryEstimate]) -> str:
    """One line per method: weights, trainable parameters, training and inference totals."""
    rows = [("method", "weights", "trainable", "training", "inference")]
    for e in estimates:
        rows.append((e.method, gib(e.weights_bytes), f"{e.trainable_parameters / 1e6:,.1f} M",
                     gib(e.training_total), gib(e.inference_total)))
    width = [max(len(row[k]) for row in rows) for k in range(5)]
    return "\n".join("  ".join(f"{c:>{w}}" for c, w in zip(row, width, strict=True)) for row in rows)


# --------------------------------------------------------------------------- the guide's claims


def paper_headline_check(budget_gib: float = 48.0, batch_size: int = 1, seq_len: int = 512) -> dict[str, Any]:
    """Does a 65B QLoRA fine-tune fit in a 48 GB GPU, as the QLoRA paper says?

    Planned the paper's way: LLaMA-65B, NF4 with double quantization, LoRA r=64
    on every linear layer of the blocks, bf16 compute, gradient checkpointing,
    paged 32-bit AdamW, batch 1 (the paper accumulates gradients to batch 16)
    and 512 tokens.
    """
    est = estimate("llama-65b", method="qlora", batch_size=batch_size, seq_len=seq_len, r=64,
                   optimizer="paged_adamw_32bit", gradient_checkpointing=True, double_quant=True)
    budget = int(budget_gib * GiB)
    return {
        "model": est.model, "batch_size": batch_size, "seq_len": seq_len,
        "weights_bytes": est.weights_bytes, "training_total": est.training_total, "budget_bytes": budget,
        "fits": est.training_total <= budget, "margin_bytes": budget - est.training_total,
        "without_double_quant": estimate("llama-65b", method="qlora", batch_size=batch_size, seq_len=seq_len,
                                         optimizer="paged_adamw_32bit", double_quant=False).training_total,
        "lora_bf16_total": estimate("llama-65b", method="lora", batch_size=batch_size, seq_len=seq_len,
                                    optimizer="paged_adamw_32bit").training_total,
        "estimate": est,
    }


def sixteen_gb_check(model: str = "mistral-7b", budget_gib: float = 16.0,
                     settings: tuple[tuple[int, int], ...] = ((1, 512), (4, 512), (8, 512), (4, 2048), (16, 1024))) -> dict[str, Any]:
    """Is a 16 GB GPU enough for QLoRA on Mistral-7B? Planned for several batch x sequence sizes.

    Each row is a QLoRA run with the guide's defaults (NF4 + double
    quantization, r=64 on the seven projections, bf16, gradient checkpointing,
    32-bit AdamW), with and without checkpointing.
    """
    budget = int(budget_gib * GiB)
    rows = []
    for batch_size, seq_len in settings:
        est = estimate(model, method="qlora", batch_size=batch_size, seq_len=seq_len)
        rows.append({"batch_size": batch_size, "seq_len": seq_len, "weights_bytes": est.weights_bytes,
                     "training_total": est.training_total, "fits": est.training_total <= budget,
                     "training_total_without_checkpointing": est.training_total_without_checkpointing,
                     "fits_without_checkpointing": est.training_total_without_checkpointing <= budget})
    return {"model": load_model_shape(model).name, "budget_bytes": budget, "rows": rows}


# --------------------------------------------------------------------------- measurements


def model_tensor_bytes(model: Any) -> dict[str, int]:
    """Bytes of every tensor a loaded model holds, by kind, each storage counted once.

    ``quantized``: bitsandbytes' packed 4-bit codes; ``quant_constants``: their
    absmax, nested absmax, code tables and offsets; ``lora``: adapter weights;
    ``other``: every other parameter and buffer (tied embeddings once).
    """
    import torch

    seen: set[int] = set()
    totals = {"quantized": 0, "quant_constants": 0, "lora": 0, "other": 0}

    def add(t: Any, kind: str) -> None:
        if not isinstance(t, torch.Tensor):
            return
        storage = t.untyped_storage()
        if storage.data_ptr() in seen:
            return
        seen.add(storage.data_ptr())
        totals[kind] += storage.nbytes()

    for name, p in model.named_parameters():
        state = getattr(p, "quant_state", None)
        add(p, "quantized" if state is not None else ("lora" if "lora_" in name else "other"))
        if state is not None:
            for t in (state.absmax, state.code, state.offset):
                add(t, "quant_constants")
            if state.state2 is not None:
                add(state.state2.absmax, "quant_constants")
                add(state.state2.code, "quant_constants")
    for _, b in model.named_buffers():
        add(b, "other")
    totals["weights"] = totals["quantized"] + totals["quant_constants"] + totals["other"]
    return totals


def saved_activation_bytes(model: Any, batch: dict[str, Any]) -> int:
    """Bytes autograd keeps for the backward pass of one forward pass with loss, measured exactly.

    A ``saved_tensors_hooks`` pair records each saved tensor's storage once;
    parameters and quantization constants (not activations) are left out. Run it
    without gradient checkpointing: checkpointing installs its own hooks.
    """
    import torch

    exclude = {p.untyped_storage().data_ptr() for p in model.parameters()}
    for p in model.parameters():
        state = getattr(p, "quant_state", None)
        if state is not None:
            exclude.update(t.untyped_storage().data_ptr() for t in (state.absmax, state.code) if t is not None)
    sizes: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in exclude and storage.device.type != "meta":
            sizes[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(**batch).loss
    loss.backward()
    model.zero_grad(set_to_none=True)
    return sum(sizes.values())


def _random_batch(vocab_size: int, batch_size: int, seq_len: int, device: str, seed: int = 0) -> dict[str, Any]:
    """Token ids drawn at random (memory does not depend on their values), labels = inputs, no padding."""
    import torch

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab_size, (batch_size, seq_len), generator=g).to(device)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def _peft_model(model: Any, r: int, gradient_checkpointing: bool) -> Any:
    """Attach the guide's LoRA adapters and enable checkpointing as the training code does."""
    import peft

    from qlora_guide.config import LoraConfig

    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model.config.use_cache = False
    return peft.get_peft_model(model, LoraConfig(r=r).to_peft())


def _train_steps(model: Any, batch: dict[str, Any], steps: int, probe: Any) -> None:
    """``steps`` torch AdamW steps; ``probe(phase, step)`` runs at the start and after each phase.

    The phases are ``forward`` (with the loss), ``backward`` and ``update``
    (optimizer step and zero_grad), so a probe that reads and resets a peak
    counter gets the peak of each phase.
    """
    import torch

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    model.train()
    for k in range(steps):
        probe("start", k)
        loss = model(**batch).loss
        probe("forward", k)
        loss.backward()
        del loss
        probe("backward", k)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        probe("update", k)


def _rss() -> dict[str, int]:
    """Current and peak resident memory of this process, in bytes (Linux /proc)."""
    values = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
                values[key] = int(rest.split()[0]) * 1024
    return values


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS counter (VmHWM) of this process; False where not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _row(est: MemoryEstimate, name: str) -> int:
    return next((r.bytes for r in est.training if r.name == name), 0)


def measure_cpu_training_peak(model: str = "smollm2-135m", method: str = "qlora", batch_size: int = 4,
                              seq_len: int = 256, r: int = 64, gradient_checkpointing: bool = True,
                              steps: int = 2) -> dict[str, Any]:
    """Measure the embedded (or a local) model's memory on the CPU, next to the planner's figures.

    Resident memory comes from /proc (the kernel's peak counter, reset before
    each phase of each step), so no short peak is missed. Weights that
    transformers leaves mapped from the checkpoint file are copied into
    ordinary memory first, so that the file's pages do not blur the figures. For figures that follow the tensors
    closely, run it in a fresh process with ``MALLOC_MMAP_THRESHOLD_=65536`` so
    that freed tensors go back to the system (``python -m qlora_guide.memory
    --measure-cpu`` does): :func:`measure_cpu_in_subprocess`.
    """
    import torch

    from qlora_guide.config import QuantizationConfig
    from qlora_guide.models import load_model

    if method not in ("lora", "qlora"):
        raise QLoRAGuideError(f"measure_cpu_training_peak measures lora or qlora, not '{method}'")
    import gc

    import bitsandbytes  # noqa: F401 - libraries imported before the baseline: they are not the model
    import peft  # noqa: F401
    import transformers.models.llama.modeling_llama  # noqa: F401

    torch.manual_seed(0)
    before_load = _rss()
    quantization = QuantizationConfig() if method == "qlora" else None
    base = load_model(model, quantization=quantization, dtype="bfloat16", device_map="cpu")
    with torch.no_grad():  # copy weights still mapped from the checkpoint file into ordinary memory
        for p in base.parameters():
            if getattr(p, "quant_state", None) is None:
                p.data = p.data.clone()
    gc.collect()
    after_load = _rss()
    tensors = model_tensor_bytes(base)
    peft_model = _peft_model(base, r, gradient_checkpointing)
    batch = _random_batch(base.config.vocab_size, batch_size, seq_len, "cpu")
    phases: list[dict[str, Any]] = []

    def probe(phase: str, step: int) -> None:
        now = _rss()
        phases.append({"phase": phase, "step": step, "rss": now["VmRSS"], "peak": now["VmHWM"]})
        _reset_peak_rss()

    _train_steps(peft_model, batch, steps, probe)
    saved = None if gradient_checkpointing else saved_activation_bytes(peft_model, batch)
    plan = estimate(model, method=method, batch_size=batch_size, seq_len=seq_len, r=r,
                    gradient_checkpointing=gradient_checkpointing, device="cpu")
    last = [p for p in phases if p["step"] == steps - 1]
    step_peak = max(p["peak"] for p in last if p["phase"] != "start")
    return {
        "model": plan.model, "method": method, "batch_size": batch_size, "seq_len": seq_len, "r": r,
        "gradient_checkpointing": gradient_checkpointing,
        "peak_rss_resettable": _reset_peak_rss(),
        "load_rss_increase": after_load["VmRSS"] - before_load["VmRSS"],
        "file_backed_rss_after_load": after_load["RssFile"],
        "tensor_bytes": tensors,
        "phases": phases, "saved_activation_bytes": saved,
        "planned_saved_activations": plan.activations["saved_without_checkpointing"],
        "measured_training_increase": step_peak - before_load["VmRSS"],
        "measured_step_increase": step_peak - last[0]["rss"],
        "planned_weights": plan.weights_bytes,
        "planned_training_total": plan.training_total,
        "planned_step_increase": plan.tensor_peak - plan.weights_bytes - _row(plan, "LoRA weights")
        - _row(plan, "optimizer states"),
    }


def _measure_in_subprocess(flag: str, model: str, env: dict[str, str], **kwargs: Any) -> dict[str, Any]:
    """Run ``python -m qlora_guide.memory FLAG MODEL --json`` in a fresh process and read its JSON line."""
    import subprocess
    import sys

    args = [sys.executable, "-m", "qlora_guide.memory", flag, model, "--json"]
    for key, value in kwargs.items():
        if value is not None:
            args += [f"--{key.replace('_', '-')}", str(value)]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TQDM_DISABLE="1", **env)
    done = subprocess.run(args, env=env, capture_output=True, text=True, check=False)
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"measurement failed ({' '.join(args[2:])}):\n{(done.stdout + done.stderr)[-2000:]}")
    return json.loads(lines[-1])


def measure_cpu_in_subprocess(model: str = "smollm2-135m", **kwargs: Any) -> dict[str, Any]:
    """:func:`measure_cpu_training_peak` in a fresh process whose allocator returns freed memory at once."""
    return _measure_in_subprocess("--measure-cpu", model, {"MALLOC_MMAP_THRESHOLD_": "65536"}, **kwargs)


def measure_gpu_in_subprocess(model: str = "mistral-7b", **kwargs: Any) -> dict[str, Any]:
    """:func:`measure_gpu_training_peak` in a fresh process, so that no earlier model is still allocated."""
    return _measure_in_subprocess("--measure-gpu", model, {}, **kwargs)


def build_random_model(model: str, folder: str | os.PathLike, dtype: str = "bfloat16") -> Path:
    """Save a model with the architecture of ``model``'s config and random weights (no download).

    The weights are drawn on the GPU when there is one, then saved as
    safetensors, so that the measurement loads and quantizes them exactly as
    ``from_pretrained`` does with a real checkpoint.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    shape = load_model_shape(model)
    path = _bundled_lookup().get(shape.name.lower())
    data = json.loads(path.read_text()) if path else None
    if data is None:
        raise QLoRAGuideError(f"build_random_model needs a bundled config, not '{model}'")
    data = {k: v for k, v in data.items() if not k.startswith(("qlora_guide", "_"))}
    config = AutoConfig.for_model(data.pop("model_type"), **data)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(device):
        net = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
    net.save_pretrained(folder, safe_serialization=True)
    del net
    return Path(folder)


def measure_gpu_training_peak(model: str = "mistral-7b", batch_size: int = 1, seq_len: int = 512, r: int = 64,
                              gradient_checkpointing: bool = True, steps: int = 2,
                              folder: str | os.PathLike | None = None) -> dict[str, Any]:
    """Measure one QLoRA training step of a model with ``model``'s architecture on a CUDA GPU.

    Random weights (:func:`build_random_model`), loaded in NF4 with double
    quantization through transformers, the guide's LoRA adapters, gradient
    checkpointing, torch AdamW, ``steps`` steps on random tokens. Reports
    ``torch.cuda.max_memory_allocated`` per step, the reserved memory and the
    device's used memory (nvidia-smi's figure, through NVML when available),
    next to the planner's figures.
    """
    import gc
    import shutil
    import tempfile

    import torch

    from qlora_guide.config import QuantizationConfig
    from qlora_guide.models import load_model

    if not torch.cuda.is_available():
        raise QLoRAGuideError("measure_gpu_training_peak needs a CUDA GPU")
    tmp = Path(folder) if folder else Path(tempfile.mkdtemp(prefix="qlora-guide-random-"))
    try:
        if not (tmp / "config.json").is_file():
            build_random_model(model, tmp)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = load_model(str(tmp), quantization=QuantizationConfig(), device_map="cuda:0")
        torch.cuda.synchronize()
        loaded = torch.cuda.memory_allocated()
        tensors = model_tensor_bytes(base)
        peft_model = _peft_model(base, r, gradient_checkpointing)
        batch = _random_batch(base.config.vocab_size, batch_size, seq_len, "cuda")
        phases: list[dict[str, Any]] = []

        def probe(phase: str, step: int) -> None:
            torch.cuda.synchronize()
            phases.append({"phase": phase, "step": step, "allocated": torch.cuda.memory_allocated(),
                           "peak": torch.cuda.max_memory_allocated()})
            torch.cuda.reset_peak_memory_stats()

        _train_steps(peft_model, batch, steps, probe)
        saved = None if gradient_checkpointing else saved_activation_bytes(peft_model, batch)
        result = {
            "device": torch.cuda.get_device_name(0), "model": load_model_shape(model).name,
            "batch_size": batch_size, "seq_len": seq_len, "r": r, "gradient_checkpointing": gradient_checkpointing,
            "allocated_after_load": loaded, "tensor_bytes": tensors, "phases": phases,
            "step_peak": max(p["peak"] for p in phases if p["step"] == steps - 1 and p["phase"] != "start"),
            "max_reserved": torch.cuda.max_memory_reserved(), "reserved": torch.cuda.memory_reserved(),
            "device_used": _device_used_bytes(), "saved_activation_bytes": saved,
        }
    finally:
        if folder is None:
            shutil.rmtree(tmp, ignore_errors=True)
    del base, peft_model
    gc.collect()
    torch.cuda.empty_cache()
    plan = estimate(model, method="qlora", batch_size=batch_size, seq_len=seq_len, r=r,
                    gradient_checkpointing=gradient_checkpointing)
    result.update(planned_weights=plan.weights_bytes, planned_training_total=plan.training_total,
                  planned_without_overhead=plan.tensor_peak,
                  planned_activations=plan.activations)
    return result


def _device_used_bytes() -> int | None:
    """Memory in use on GPU 0 as the driver sees it (what nvidia-smi shows), or None."""
    try:
        import pynvml

        pynvml.nvmlInit()
        return int(pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(0)).used)
    except Exception:  # noqa: BLE001 - NVML is optional
        return None


def format_measurement(result: dict[str, Any]) -> str:
    """Measured and planned figures side by side."""
    lines = [f"{result['model']}: batch {result['batch_size']} x seq {result['seq_len']}, r={result['r']}"]
    if "device" in result:
        peak = result["step_peak"]
        rows = [("", "measured", "planned"),
                ("weights", gib(result["tensor_bytes"]["weights"]), gib(result["planned_weights"])),
                ("allocated after load", gib(result["allocated_after_load"]), ""),
                ("peak allocated (step)", gib(peak), gib(result["planned_without_overhead"])),
                ("max reserved", gib(result["max_reserved"]), ""),
                ("device used (incl. context)", gib(result["device_used"]) if result["device_used"] else "n/a",
                 gib(result["planned_training_total"]))]
        lines.insert(0, result["device"])
    else:
        rows = [("", "measured", "planned"),
                ("weights (tensor bytes)", gib(result["tensor_bytes"]["weights"]), gib(result["planned_weights"])),
                ("load: RSS increase", gib(result["load_rss_increase"]), gib(result["planned_weights"])),
                ("step: RSS peak increase", gib(result["measured_step_increase"]), gib(result["planned_step_increase"])),
                ("training: RSS increase", gib(result["measured_training_increase"]), gib(result["planned_training_total"]))]
    width = [max(len(r[k]) for r in rows) for k in range(3)]
    lines += [f"  {a:<{width[0]}}  {b:>{width[1]}}  {c:>{width[2]}}" for a, b, c in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """``python -m qlora_guide.memory --measure-gpu mistral-7b`` (or ``--measure-cpu smollm2-135m``)."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m qlora_guide.memory", description=main.__doc__)
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--measure-gpu", metavar="MODEL", help="bundled config to build with random weights")
    which.add_argument("--measure-cpu", metavar="MODEL", help="model to measure on the CPU (default model: smollm2-135m)")
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--seq-len", type=int, default=None)
    parser.add_argument("--r", type=int, default=64)
    parser.add_argument("--method", default="qlora")
    parser.add_argument("--gradient-checkpointing", type=lambda s: s.lower() in ("1", "true", "yes"), default=True)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--folder", help="--measure-gpu: where the random model is (built there if missing)")
    parser.add_argument("--json", action="store_true", help="print one JSON line")
    args = parser.parse_args(argv)
    try:
        if args.measure_gpu:
            result = measure_gpu_training_peak(args.measure_gpu, batch_size=args.batch_size or 1,
                                               seq_len=args.seq_len or 512, r=args.r,
                                               gradient_checkpointing=args.gradient_checkpointing, steps=args.steps,
                                               folder=args.folder)
        else:
            result = measure_cpu_training_peak(args.measure_cpu, method=args.method, batch_size=args.batch_size or 4,
                                               seq_len=args.seq_len or 256, r=args.r,
                                               gradient_checkpointing=args.gradient_checkpointing, steps=args.steps)
    except QLoRAGuideError as err:
        print(f"error: {err}")
        return err.exit_code
    print(json.dumps(result, default=str) if args.json else format_measurement(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
