"""Measured memory next to the planner's figures.

    python benchmarks/bench_memory.py            # CPU: the embedded model, QLoRA and LoRA
    python benchmarks/bench_memory.py --gpu      # CUDA: Mistral-7B and Llama-3-8B shapes, random weights

Each CPU measurement runs in a fresh process whose allocator hands freed
memory back (``MALLOC_MMAP_THRESHOLD_``), so resident memory follows the
tensors. On the GPU the figure is ``torch.cuda.max_memory_allocated`` of a
training step, plus what the driver reports in use (CUDA context included).
``--out FILE`` also writes every figure as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

from qlora_guide.memory import (
    estimate,
    format_measurement,
    gib,
    measure_cpu_in_subprocess,
    measure_gpu_in_subprocess,
)

CPU_RUNS = [
    dict(method="qlora", batch_size=4, seq_len=256, gradient_checkpointing=True),
    dict(method="qlora", batch_size=4, seq_len=256, gradient_checkpointing=False),
    dict(method="lora", batch_size=4, seq_len=256, gradient_checkpointing=True),
]
GPU_RUNS = [
    ("mistral-7b", dict(batch_size=1, seq_len=512, gradient_checkpointing=True)),
    ("mistral-7b", dict(batch_size=4, seq_len=512, gradient_checkpointing=True)),
    ("mistral-7b", dict(batch_size=4, seq_len=2048, gradient_checkpointing=True)),
    ("mistral-7b", dict(batch_size=1, seq_len=512, gradient_checkpointing=False)),
    ("mistral-7b", dict(batch_size=4, seq_len=512, gradient_checkpointing=False)),
    ("llama-3-8b", dict(batch_size=1, seq_len=512, gradient_checkpointing=True)),
    ("llama-3-8b", dict(batch_size=4, seq_len=1024, gradient_checkpointing=True)),
    ("llama-3-8b", dict(batch_size=1, seq_len=512, gradient_checkpointing=False)),
    ("llama-2-7b", dict(batch_size=2, seq_len=1024, gradient_checkpointing=True)),
    ("smollm2-135m", dict(batch_size=4, seq_len=256, gradient_checkpointing=True)),
    ("smollm2-135m", dict(batch_size=4, seq_len=256, gradient_checkpointing=False)),
]


def error(measured: float, planned: float) -> str:
    """Planner error relative to the measurement."""
    return f"{100 * (planned - measured) / measured:+.1f} %"


def save(results: list[dict], out: str | None) -> None:
    """Write the figures so far (a run cut short keeps what it measured)."""
    if out:
        with open(out, "w") as f:
            json.dump(results, f, indent=2, default=str)


def run_cpu(model: str, out: str | None = None) -> list[dict]:
    results = []
    for settings in CPU_RUNS:
        t0 = time.perf_counter()
        result = measure_cpu_in_subprocess(model, **settings)
        result["seconds"] = time.perf_counter() - t0
        results.append(result)
        save(results, out)
        print(f"\n{settings}")
        print(format_measurement(result))
        print(f"  error: step {error(result['measured_step_increase'], result['planned_step_increase'])}, "
              f"training {error(result['measured_training_increase'], result['planned_training_total'])}")
        if result.get("saved_activation_bytes"):
            print(f"  saved activations: measured {gib(result['saved_activation_bytes'])}, "
                  f"planned {gib(result['planned_saved_activations'])} "
                  f"({error(result['saved_activation_bytes'], result['planned_saved_activations'])})")
    return results


def run_gpu(models: list[str], out: str | None = None) -> list[dict]:
    results = []
    folders: dict[str, str] = {}
    for model, settings in GPU_RUNS:
        if model not in models:
            continue
        folder = folders.setdefault(model, tempfile.mkdtemp(prefix=f"random-{model}-"))
        t0 = time.perf_counter()
        result = measure_gpu_in_subprocess(model, folder=folder, **settings)
        result["seconds"] = time.perf_counter() - t0
        results.append(result)
        save(results, out)
        peak = result["step_peak"]
        print(f"\n{settings}")
        print(format_measurement(result))
        print(f"  error vs peak allocated: {error(peak, result['planned_without_overhead'])}")
        print("  phases (allocated after / peak during): " + ", ".join(
            f"{p['phase']}{p['step']} {gib(p['allocated'])}/{gib(p['peak'])}" for p in result["phases"]))
        if result.get("saved_activation_bytes"):
            planned = result["planned_activations"]["saved_without_checkpointing"]
            print(f"  saved activations: measured {gib(result['saved_activation_bytes'])}, planned {gib(planned)} "
                  f"({error(result['saved_activation_bytes'], planned)})")
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpu", action="store_true", help="measure on the CUDA GPU instead of the CPU")
    parser.add_argument("--models", default="mistral-7b,llama-3-8b,llama-2-7b,smollm2-135m", help="bundled configs for --gpu")
    parser.add_argument("--cpu-model", default="smollm2-135m")
    parser.add_argument("--out", help="write the figures as JSON here")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.gpu:
        run_gpu(args.models.split(","), args.out)
    else:
        run_cpu(args.cpu_model, args.out)
    plan = estimate("mistral-7b")
    print(f"\n(planner's Mistral-7B QLoRA default for reference: {gib(plan.training_total)})")


if __name__ == "__main__":
    main()
