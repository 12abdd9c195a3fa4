"""The guide's claims about memory, checked with the planner.

:func:`paper_headline_check` plans the QLoRA paper's 65B run twice: in the
paper's own setting (its ``qlora.py`` casts the LoRA layers to bfloat16) and
with today's peft defaults (adapters kept in float32), with and without double
quantization. :func:`sixteen_gb_check` plans QLoRA on a 7B model for a 16 GB GPU.
"""

from __future__ import annotations

from typing import Any

from qlora_guide.memory.planner import GiB, estimate
from qlora_guide.memory.shapes import load_model_shape

# The paper's 65B run: scripts/finetune_guanaco_65b.sh of github.com/artidoro/qlora and the
# defaults of its qlora.py. NF4 with double quantization (bitsandbytes' blocks of 64), r=64 on
# every linear layer of the blocks, LoRA dropout 0.05, bf16 compute, gradient checkpointing,
# paged 32-bit AdamW (qlora.py's default optimizer), batch 1 with 16 accumulation steps, and
# sequences of at most 16 source + 512 target tokens (source_max_len, target_max_len).
# With --bf16, qlora.py casts every LoraLayer to bfloat16 after get_peft_model.
PAPER_65B_MODEL = "llama-65b"
PAPER_65B_SEQ_LEN = 16 + 512
PAPER_65B_SETTINGS: dict[str, Any] = {
    "method": "qlora", "r": 64, "target_modules": "all-linear", "lora_dropout": 0.05, "dtype": "bfloat16",
    "gradient_checkpointing": True, "double_quant": True, "blocksize": 64, "optimizer": "paged_adamw_32bit",
    "adapter_dtype": "bfloat16",
}
# Today's peft (get_peft_model) keeps the adapters in float32 over a bf16 base.
PEFT_DEFAULT_ADAPTER_DTYPE = "float32"


def _planned(budget: int, **settings: Any) -> dict[str, Any]:
    """Totals of one 65B plan against the budget, with and without double quantization."""
    est = estimate(PAPER_65B_MODEL, **settings)
    single = estimate(PAPER_65B_MODEL, **{**settings, "double_quant": False})
    states = next(row.bytes for row in est.training if row.name == "optimizer states")
    return {
        "adapter_dtype": settings["adapter_dtype"], "weights_bytes": est.weights_bytes,
        "training_total": est.training_total, "fits": est.training_total <= budget,
        "margin_bytes": budget - est.training_total,
        "without_double_quant": single.training_total, "without_double_quant_fits": single.training_total <= budget,
        "without_double_quant_margin_bytes": budget - single.training_total,
        "paged_states_bytes": states, "estimate": est,
    }


def paper_headline_check(budget_gib: float = 48.0, batch_size: int = 1,
                         seq_len: int = PAPER_65B_SEQ_LEN) -> dict[str, Any]:
    """Does a 65B QLoRA fine-tune fit in a 48 GB GPU, as the QLoRA paper says?

    The top-level figures are the paper's setting (:data:`PAPER_65B_SETTINGS`,
    LoRA weights and gradients in bfloat16), at its batch of 1 and its longest
    sequence. ``peft_defaults`` holds the same figures for the same run with
    the adapters in float32, as peft keeps them unless the script casts them:
    what a run with today's libraries and the guide's training code needs.
    ``paged_states_bytes`` is the part of the peak (the optimizer states) that
    the paged optimizer can move to the CPU when the GPU runs short.
    """
    budget = int(budget_gib * GiB)
    settings = {**PAPER_65B_SETTINGS, "batch_size": batch_size, "seq_len": seq_len}
    paper = _planned(budget, **settings)
    peft_defaults = _planned(budget, **{**settings, "adapter_dtype": PEFT_DEFAULT_ADAPTER_DTYPE})
    lora = estimate(PAPER_65B_MODEL, **{**settings, "method": "lora"})
    return {
        "model": paper["estimate"].model, "batch_size": batch_size, "seq_len": seq_len, "budget_bytes": budget,
        **paper, "lora_bf16_total": lora.training_total, "peft_defaults": peft_defaults,
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
