"""The processes of a run and their memory: world size, main process, FSDP, precision, peaks, barriers."""

from __future__ import annotations

import gc
import os

import torch
import torch.distributed as dist

from qlora_guide.config import Recipe
from qlora_guide.memory.measure import read_peaks
from qlora_guide.precision import Precision, resolve


def resolve_precision(recipe: Recipe) -> Precision:
    """Autocast, compute dtype and optimizer of this recipe on this machine (:func:`qlora_guide.precision.resolve`)."""
    compute = recipe.quantization.bnb_4bit_compute_dtype if recipe.quantization else recipe.model.dtype
    return resolve(recipe.training.bf16, compute, recipe.model.dtype, recipe.training.optim)


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", 1))


def is_main_process() -> bool:
    return int(os.environ.get("RANK", 0)) == 0


def fsdp_enabled() -> bool:
    """True under ``accelerate launch`` with an FSDP config."""
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


def free_memory() -> None:
    """Return cached blocks to the device between stages (loading, training, saving)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def memory_stats() -> dict[str, float]:
    """Memory so far, in MiB (:func:`qlora_guide.memory.read_peaks`): on CUDA the allocator's peaks (allocated
    and reserved), on the CPU the process' resident memory now and its peak."""
    peaks = read_peaks()
    if peaks.cuda:
        return {
            "mem_cuda_peak_allocated_mb": peaks.cuda_peak_allocated / 2**20,
            "mem_cuda_peak_reserved_mb": peaks.cuda_peak_reserved / 2**20,
        }
    return {"mem_rss_mb": peaks.rss_end / 2**20, "mem_rss_peak_mb": peaks.rss_peak / 2**20}


def barrier() -> None:

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
