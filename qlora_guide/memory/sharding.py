"""Memory per GPU when one run is spread over several: DDP copies, FSDP (or ZeRO-3) shards.

:func:`per_device` plans one GPU of ``num_processes``, from :func:`~qlora_guide.memory.estimate`'s rows:

``ddp``
    every GPU holds the whole model, its adapters, their optimizer states and gradients, and
    DDP's communication buckets: one more copy of the gradients (``gradient_as_bucket_view``
    is off in transformers' Trainer).
``fsdp``
    FSDP's FULL_SHARD (DeepSpeed ZeRO-3 splits the same three things) keeps 1/N of every
    wrapped layer's weights, 4-bit codes included, and of the adapters, their gradients and
    optimizer states. To compute, a GPU gathers one decoder layer at a time, and with
    ``BACKWARD_PRE`` prefetch the next one too: two whole layers. The root unit (embeddings,
    final norm and output layer) stays gathered during the step.

Activations depend on the batch of one GPU, so they are the same in every case. This is
arithmetic on the planner's rows, not a measurement: communication buffers (NCCL, DeepSpeed's
buckets) come on top.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from qlora_guide.errors import QLoRAGuideError
from qlora_guide.memory.planner import MemoryEstimate, Row, estimate
from qlora_guide.memory.shapes import ModelShape, load_model_shape

STRATEGIES = ("ddp", "fsdp")


@dataclass
class DeviceMemory:
    """The planned memory of one GPU among ``num_processes``: rows that add up to ``total``."""

    model: str
    strategy: str
    num_processes: int
    rows: list[Row]
    total: int
    notes: list[str] = field(default_factory=list)


def per_device(model: str | os.PathLike | dict | ModelShape | None = None, num_processes: int = 2,
               strategy: str = "fsdp", **settings: Any) -> DeviceMemory:
    """Plan the memory of one GPU when ``num_processes`` GPUs train ``model`` together.

    ``settings`` are :func:`~qlora_guide.memory.estimate`'s (``method``, ``batch_size`` per GPU,
    ``seq_len``, ``r``, ...).
    """
    if strategy not in STRATEGIES:
        raise QLoRAGuideError(f"strategy must be one of {', '.join(STRATEGIES)}, not {strategy!r}")
    if num_processes < 1:
        raise QLoRAGuideError(f"num_processes must be at least 1, not {num_processes}")
    plan = estimate(model, **settings)
    if num_processes == 1:  # nothing to copy or to shard: one GPU is the planner's run
        return DeviceMemory(plan.model, strategy, 1, list(plan.training), plan.training_total)
    layers = load_model_shape(model).num_hidden_layers
    return (_ddp if strategy == "ddp" else _fsdp)(plan, num_processes, layers)


def _bytes(plan: MemoryEstimate, name: str) -> int:
    return plan._get(plan.training, name)


def _total(plan: MemoryEstimate, rows: list[Row]) -> int:
    """Persistent rows, plus the larger of the backward pass and the optimizer update, as the planner counts."""
    get = {row.name: row.bytes for row in rows}
    checkpointing = plan.settings["gradient_checkpointing"]
    backward = plan.activations["backward_with_checkpointing" if checkpointing else "backward_without_checkpointing"]
    transient = {"activations", "gradients", "optimizer update"}
    persistent = sum(row.bytes for row in rows if row.name not in transient)
    return persistent + max(backward, get["gradients"] + get["optimizer update"])


def _ddp(plan: MemoryEstimate, n: int, layers: int) -> DeviceMemory:
    gradients = _bytes(plan, "gradients")
    rows = [*plan.training, Row("DDP buckets", gradients, "a second copy of the gradients, for the all-reduce")]
    return DeviceMemory(plan.model, "ddp", n, rows, _total(plan, rows), ["each GPU trains on its own batch of batch_size sequences"])


def _fsdp(plan: MemoryEstimate, n: int, layers: int) -> DeviceMemory:
    sharded = ("base weights", "quant. constants", "LoRA weights", "optimizer states", "gradients", "optimizer update")
    rows = []
    for row in plan.training:
        if row.name in sharded:
            rows.append(Row(row.name, -(-row.bytes // n), f"1/{n} of {row.bytes / 2**30:.2f} GiB"))
        elif row.name == "16-bit weights":
            rows.append(Row(row.name, row.bytes, "the root unit (embeddings, norm, output layer), gathered"))
        else:
            rows.append(row)
    layer = sum(_bytes(plan, name) for name in ("base weights", "quant. constants", "LoRA weights")) // layers
    rows.insert(3, Row("gathered layers", 2 * layer, "the layer being computed and the next one (prefetch)"))
    return DeviceMemory(plan.model, "fsdp", n, rows, _total(plan, rows),
                        ["4-bit codes can be sharded only when bnb_4bit_quant_storage is the model's dtype"])


def per_device_rows(model: str, counts: tuple[int, ...] = (1, 2, 4, 8), strategies: tuple[str, ...] = STRATEGIES,
                    **settings: Any) -> list[dict[str, Any]]:
    """The planned GiB per GPU for each strategy and number of GPUs, one row each, for a table."""
    rows = []
    for strategy in strategies:
        for n in counts:
            plan = per_device(model, n, strategy, **settings)
            rows.append({"strategy": strategy, "gpus": n, "per_gpu_gib": plan.total / 2**30})
    return rows
