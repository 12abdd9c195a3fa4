"""System check: what this machine has, and what it can fine-tune.

``qlora-guide check`` reports the operating system, the library versions,
each CUDA GPU (memory, compute capability, bf16), the CUDA runtime and
driver, which bitsandbytes backend will run the 4-bit kernels and what it
really supports here (tried on a tiny tensor, not guessed from the platform),
CPU cores, RAM and free disk. Then it recommends, with the memory planner of
:mod:`qlora_guide.memory`, the largest well-known models that fit for QLoRA
inference and training, the compute dtype and whether paged optimizers are
available. It works the same on a machine without a GPU, where the plans are
made for the CPU and its RAM.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import platform
import shutil
import subprocess
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import torch

from qlora_guide.errors import first_line
from qlora_guide.memory import bundled_configs, estimate, load_model_shape
from qlora_guide.models import cache_dir, embedded_model_path
from qlora_guide.precision import CPU_BF16_ENV, resolve
from qlora_guide.versions import package_versions

TRAIN_BATCH, TRAIN_SEQ = 1, 512  # the recommendation's training run: batch 1 x 512 tokens, checkpointing on


@dataclass
class GPUInfo:
    """One CUDA device as torch sees it."""

    index: int
    name: str
    total_memory: int
    compute_capability: str
    bf16: bool
    multiprocessors: int


@dataclass
class FitRow:
    """Whether one well-known model fits this machine for QLoRA inference and training."""

    model: str
    parameters: int
    inference_bytes: int
    training_bytes: int
    fits_inference: bool
    fits_training: bool


@dataclass
class Recommendations:
    """What to run on this machine, computed with the memory planner."""

    device: str
    budget_bytes: int
    budget_source: str
    largest_inference: str | None
    largest_training: str | None
    fits: list[FitRow]
    compute_dtype: str
    compute_dtype_note: str
    paged_optimizers: bool
    paged_note: str
    optimizer: str  # the optimizer the plans assume, in the planner's names
    training_optim: str  # what `qlora-guide train` uses with optim: auto (TrainingArguments' name)
    notes: list[str] = field(default_factory=list)


@dataclass
class SystemReport:
    """Everything ``qlora-guide check`` prints, as plain data."""

    os: str
    python: str
    packages: dict[str, str | None]
    cuda_available: bool
    cuda_runtime: str | None
    driver: str | None
    gpus: list[GPUInfo]
    bnb_backend: str
    bnb_checks: dict[str, str]
    cpu_physical: int | None
    cpu_logical: int | None
    cpu_usable: int | None
    cpu_capability: str | None
    ram_total: int
    ram_available: int
    disk_free: dict[str, int]
    recommendations: Recommendations

    def to_dict(self) -> dict[str, Any]:
        """Plain data for ``--json``."""
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------- probes


def gpu_info() -> list[GPUInfo]:
    """The CUDA devices torch can use (empty without CUDA)."""

    if not torch.cuda.is_available():
        return []
    gpus = []
    for i in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(i)
        gpus.append(GPUInfo(
            index=i, name=props.name, total_memory=int(props.total_memory),
            compute_capability=f"{props.major}.{props.minor}",
            bf16=props.major >= 8,  # Ampere and later compute in bf16 natively
            multiprocessors=props.multi_processor_count,
        ))
    return gpus


def driver_version() -> str | None:
    """The NVIDIA driver version, from nvidia-smi or NVML; None when neither answers."""
    exe = shutil.which("nvidia-smi")
    if exe:
        try:
            out = subprocess.run([exe, "--query-gpu=driver_version", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=15, check=False)
            lines = out.stdout.strip().splitlines()
            if out.returncode == 0 and lines:
                return lines[0].strip()
        except (OSError, subprocess.SubprocessError):
            pass
    try:
        import pynvml

        pynvml.nvmlInit()
        version = pynvml.nvmlSystemGetDriverVersion()
        return version.decode() if isinstance(version, bytes) else str(version)
    except Exception:  # noqa: BLE001 - NVML is optional and fails in many ways without a driver
        return None


def _try(action: Any) -> str:
    """Run a capability probe: 'ok', or the first line of why it failed."""
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            note = action()
        if note:
            return note
        messages = [str(w.message).splitlines()[0] for w in caught if "not supported" in str(w.message).lower()]
        return f"falls back: {messages[0].split('. ')[0]}" if messages else "ok"
    except Exception as err:  # noqa: BLE001 - a probe reports any failure instead of raising
        return f"fails: {first_line(err)[:120]}"


def bitsandbytes_backend() -> tuple[str, dict[str, str]]:
    """Which backend bitsandbytes uses here, and what it really does, tried on tiny tensors.

    bitsandbytes picks its backend from torch (CUDA, ROCm, XPU, else the CPU).
    The probes quantize a small tensor to NF4 and FP4 and back, take one step
    of the 8-bit AdamW and one of the paged AdamW; on the CPU, bitsandbytes
    warns that paged optimizers are not supported and falls back to ordinary
    ones, which the report says.
    """
    try:
        with _quiet_logging("bitsandbytes"):
            import bitsandbytes
            import bitsandbytes.functional as bnbf
            from bitsandbytes import cextension
    except Exception as err:  # noqa: BLE001 - a broken install is reported, not raised
        return f"unavailable ({first_line(err)[:100]})", {}

    backend = str(getattr(cextension, "BNB_BACKEND", "unknown")).lower()
    lib = type(getattr(cextension, "lib", None)).__name__
    native = "no native library loaded" if "Mock" in lib or lib == "NoneType" else "native library loaded"
    device = "cuda" if backend in ("cuda", "rocm") else ("xpu" if backend == "xpu" else "cpu")
    checks: dict[str, str] = {}

    def roundtrip(quant_type: str) -> None:
        x = torch.randn(64, 128, device=device, dtype=torch.bfloat16)
        packed, state = bnbf.quantize_4bit(x, blocksize=64, quant_type=quant_type, compress_statistics=True)
        y = bnbf.dequantize_4bit(packed, state)
        if not torch.isfinite(y).all() or (y - x).abs().max() > x.abs().max():
            raise RuntimeError("dequantized values are wrong")

    def optimizer_step(name: str) -> None:
        p = torch.nn.Parameter(torch.randn(64, 128, device=device))
        opt = getattr(bitsandbytes.optim, name)([p], lr=1e-3)
        p.grad = torch.randn_like(p)
        opt.step()

    checks["nf4 + double quant"] = _try(lambda: roundtrip("nf4"))
    checks["fp4"] = _try(lambda: roundtrip("fp4"))
    checks["8-bit AdamW"] = _try(lambda: optimizer_step("AdamW8bit"))
    checks["paged AdamW"] = _try(lambda: optimizer_step("PagedAdamW32bit"))
    return f"{backend} ({native})", checks


@contextlib.contextmanager
def _quiet_logging(name: str) -> Any:
    """Silence a library's import-time warnings (bitsandbytes logs about optional CPU kernels)."""
    logger = logging.getLogger(name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def cpu_capability() -> str | None:
    """The CPU instruction set torch dispatches to (AVX2, AVX512...), plus AVX512-BF16 when bitsandbytes sees it."""

    try:
        capability = torch.backends.cpu.get_cpu_capability()
    except Exception:  # noqa: BLE001 - older torch
        return None
    try:
        with _quiet_logging("bitsandbytes"):
            from bitsandbytes.functional import has_avx512bf16
        if has_avx512bf16():
            capability += " + AVX512-BF16"
    except Exception:  # noqa: BLE001 - bitsandbytes missing or without the probe
        pass
    return capability


def _existing(path: Path) -> Path:
    """The path itself or its nearest existing parent (the cache may not exist yet)."""
    path = path.expanduser().resolve()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def disk_free() -> dict[str, int]:
    """Free bytes where models are cached and in the working directory."""

    places = {f"cache ({cache_dir()})": cache_dir(), f"cwd ({Path.cwd()})": Path.cwd()}
    return {label: shutil.disk_usage(_existing(path)).free for label, path in places.items()}


# --------------------------------------------------------------------------- recommendations


def recommend(gpus: list[GPUInfo], ram_available: int, paged_ok: bool) -> Recommendations:
    """Plan every bundled model for QLoRA on this machine's largest GPU, or on the CPU's available RAM."""

    if gpus:
        gpu = max(gpus, key=lambda g: g.total_memory)
        device, budget, source = f"cuda:{gpu.index} ({gpu.name})", gpu.total_memory, "GPU memory"
        optimizer = "paged_adamw_32bit" if paged_ok else "adamw"
        plan_device = "cuda"
    else:
        device, budget, source = "cpu (slow: hours for what a GPU does in minutes)", ram_available, "available RAM"
        optimizer, plan_device = "adamw", "cpu"
    shapes = sorted((load_model_shape(name) for name in bundled_configs()), key=lambda s: s.num_parameters())
    rows = []
    for shape in shapes:
        est = estimate(shape, method="qlora", batch_size=TRAIN_BATCH, seq_len=TRAIN_SEQ,
                       gradient_checkpointing=True, optimizer=optimizer, device=plan_device)
        rows.append(FitRow(shape.name, shape.num_parameters(), est.inference_total, est.training_total,
                           est.inference_total <= budget, est.training_total <= budget))
    largest_inference = next((r.model for r in reversed(rows) if r.fits_inference), None)
    largest_training = next((r.model for r in reversed(rows) if r.fits_training), None)

    notes = [f"plans: QLoRA (NF4 + double quantization, r=64 on 7 modules), batch {TRAIN_BATCH} x {TRAIN_SEQ} "
             f"tokens, gradient checkpointing, {optimizer}; see `qlora-guide estimate MODEL` for others"]
    # what `qlora-guide train` does here with a recipe's defaults (bf16: auto, optim: auto): the same function decides
    plan = resolve(optim="auto" if paged_ok or not gpus else "adamw_torch", device=plan_device,
                   native_bf16=all(g.bf16 for g in gpus) if gpus else None)
    dtype = plan.compute_dtype
    if gpus:
        dtype_note = ("supported natively (compute capability >= 8.0)" if plan.bf16 else
                      "warning: this GPU has no native bf16 (compute capability < 8.0); training uses float16, which "
                      "needs loss scaling and can overflow, so watch for NaN losses")
        paged_note = ("available: optimizer states page to CPU RAM when the GPU runs short" if paged_ok
                      else "not available: bitsandbytes could not run them here")
        if len(gpus) > 1:
            notes.append(f"{len(gpus)} GPUs: plans are for one process on one GPU (no model sharding)")
    else:
        dtype_note = ("what training computes in here (bf16: auto): this CPU computes bf16 natively (AVX512-BF16 or AMX)"
                      if plan.bf16 else "what training computes in here (bf16: auto): this CPU has no native bf16 "
                      f"(or {CPU_BF16_ENV}=0), and emulated bf16 is several times slower than float32")
        paged_note = "not available: paged optimizers need CUDA (training refuses them on the CPU)"
    return Recommendations(device, budget, source, largest_inference, largest_training, rows, dtype, dtype_note,
                           bool(gpus) and paged_ok, paged_note, optimizer, plan.optim, notes)


def check_system(rebuild_model: bool = False) -> SystemReport:
    """Inspect this machine and recommend what to run on it (works without a GPU).

    ``rebuild_model`` converts the embedded model into the cache again first
    (after a change of transformers, or to repair a cache).
    """
    if rebuild_model:
        embedded_model_path(rebuild=True)
    gpus = gpu_info()
    backend, checks = bitsandbytes_backend()
    capability = cpu_capability()
    memory = psutil.virtual_memory()
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        usable = os.cpu_count()
    paged_ok = bool(gpus) and checks.get("paged AdamW") == "ok"
    return SystemReport(
        os=platform.platform(),
        python=platform.python_version(),
        packages=package_versions(),
        cuda_available=bool(gpus),
        cuda_runtime=torch.version.cuda,
        driver=driver_version() if gpus or shutil.which("nvidia-smi") else None,
        gpus=gpus,
        bnb_backend=backend,
        bnb_checks=checks,
        cpu_physical=psutil.cpu_count(logical=False),
        cpu_logical=psutil.cpu_count(logical=True),
        cpu_usable=usable,
        cpu_capability=capability,
        ram_total=int(memory.total),
        ram_available=int(memory.available),
        disk_free=disk_free(),
        recommendations=recommend(gpus, int(memory.available), paged_ok),
    )


# --------------------------------------------------------------------------- formatting


def _gb(n: int | None) -> str:
    return "n/a" if n is None else f"{n / 1024**3:.1f} GiB"


def _section(title: str, rows: list[tuple[str, str]]) -> list[str]:
    width = max(len(k) for k, _ in rows) if rows else 0
    return [title, *(f"  {k:<{width}}  {v}" for k, v in rows), ""]


def format_report(report: SystemReport) -> str:
    """The report as a readable table with one section per topic."""
    lines = _section("System", [("OS", report.os), ("Python", report.python)])
    lines += _section("Packages", [(k, v or "not installed") for k, v in report.packages.items()])
    gpu_rows = [("CUDA runtime", report.cuda_runtime or "none (CPU build of torch)"),
                ("NVIDIA driver", report.driver or "none found")]
    for g in report.gpus:
        gpu_rows.append((f"GPU {g.index}", f"{g.name}, {_gb(g.total_memory)}, compute capability "
                                           f"{g.compute_capability}, bf16 {'yes' if g.bf16 else 'no'}"))
    if not report.gpus:
        gpu_rows.append(("GPUs", "none: everything runs on the CPU"))
    lines += _section("GPU", gpu_rows)
    lines += _section("bitsandbytes", [("backend", report.bnb_backend), *report.bnb_checks.items()])
    cores = f"{report.cpu_physical or '?'} physical, {report.cpu_logical or '?'} logical, {report.cpu_usable or '?'} usable"
    lines += _section("CPU and memory", [("cores", cores), ("instruction set", report.cpu_capability or "n/a"),
                                         ("RAM", f"{_gb(report.ram_total)} total, {_gb(report.ram_available)} available")])
    lines += _section("Disk (free)", [(k, _gb(v)) for k, v in report.disk_free.items()])
    rec = report.recommendations
    lines += _section("Recommendations", [
        ("plans for", f"{rec.device}, {_gb(rec.budget_bytes)} {rec.budget_source}"),
        ("largest for inference", rec.largest_inference or "none of the bundled models"),
        ("largest for training", rec.largest_training or "none of the bundled models"),
        ("compute dtype", f"{rec.compute_dtype}: {rec.compute_dtype_note}"),
        ("paged optimizers", rec.paged_note),
        ("optimizer", f"{rec.training_optim} (what training uses with optim: auto)"),
    ])
    table = [("model", "params", "inference", "training")]
    for r in rec.fits:
        table.append((r.model, f"{r.parameters / 1e9:.2f} B",
                      f"{_gb(r.inference_bytes)} {'fits' if r.fits_inference else 'too big'}",
                      f"{_gb(r.training_bytes)} {'fits' if r.fits_training else 'too big'}"))
    widths = [max(len(row[k]) for row in table) for k in range(4)]
    lines.append("QLoRA plans")
    lines += [f"  {a:<{widths[0]}}  {b:>{widths[1]}}  {c:<{widths[2]}}  {d}" for a, b, c, d in table]
    lines += [f"  note: {n}" for n in rec.notes]
    return "\n".join(lines)
