"""Model shapes: the dimensions of a Llama-style decoder, read from its ``config.json``.

The configs of well-known models ship in ``qlora_guide/assets/model_configs``
(:func:`bundled_configs`), so that the planner answers for them offline; any
other model is read from a local folder or, through ``transformers.AutoConfig``,
from the hub (:func:`load_model_shape`).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qlora_guide.errors import QLoRAGuideError, first_line

CONFIGS_DIR = Path(__file__).resolve().parent.parent / "assets" / "model_configs"

# Decoders whose blocks are Llama-shaped: attention q/k/v/o, SwiGLU MLP gate/up/down, RMSNorm.
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma")
TIED_BY_DEFAULT = {"gemma"}
ENCODER_MODEL_TYPES = {"bert", "roberta", "distilbert", "albert", "electra", "deberta", "deberta-v2", "xlm-roberta",
                       "t5", "mt5", "bart", "mbart", "marian", "pegasus", "vit", "clip", "whisper"}


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


def bundled_lookup() -> dict[str, Path]:
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
        why = "offline mode is on" if offline else first_line(err)
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
    path = bundled_lookup().get(name.lower())
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
