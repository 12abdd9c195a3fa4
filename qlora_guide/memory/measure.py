"""Measuring memory: the peak of a block of code, and the harness that checks the planner.

:func:`peak_memory` is the one way the package measures peak memory::
    with peak_memory() as peak:
        run_something()
    peak.rss_peak_increase, peak.cuda_peak_allocated

Process memory comes from the kernel's own peak counter (``VmHWM`` in
``/proc/self/status``), reset at the start of the block by writing ``5`` to
``/proc/self/clear_refs``, so no short peak is missed. Where the counter cannot
be reset (or there is no ``/proc``), the lifetime peak (``VmHWM`` or
``ru_maxrss``) still gives the block's peak when the block set a new high;
otherwise the result says the figure is a lower bound (``rss_peak_exact``).
CUDA memory comes from the allocator's counters
(``torch.cuda.reset_peak_memory_stats`` and ``max_memory_allocated``). Blocks
may nest: before a counter is reset, every open block takes the peak so far.
:func:`read_peaks` gives the peaks since the process started, without resetting
anything (the training log's memory figures).

The harness measures training steps of real or random-weight models, on the
CPU (:func:`measure_cpu_training_peak`) and on a CUDA GPU
(:func:`measure_gpu_training_peak`), next to the planner's figures; run it as
``python -m qlora_guide.memory --measure-cpu smollm2-135m`` or ``--measure-gpu mistral-7b``.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import shutil
import subprocess
import sys
import tempfile
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import peft
import psutil
import torch

from qlora_guide.config import LoraConfig, QuantizationConfig
from qlora_guide.errors import QLoRAGuideError
from qlora_guide.memory.planner import MemoryEstimate, estimate
from qlora_guide.memory.report import format_measurement
from qlora_guide.memory.shapes import bundled_lookup, load_model_shape
from qlora_guide.models import load_model
from qlora_guide.quantization.footprint import tensor_bytes

try:
    import resource
except ImportError:  # pragma: no cover - not on Windows
    resource = None

MiB = 1024**2


# --------------------------------------------------------------------------- peak memory


@dataclass
class PeakMemory:
    """Memory of one block of code (:func:`peak_memory`) or of the process so far (:func:`read_peaks`), in bytes.

    ``rss_*`` is the process' resident memory: at the start, at the end and its
    peak in between; ``rss_peak_source`` says where the peak comes from (``VmHWM``
    or ``ru_maxrss``) and ``rss_peak_exact`` whether it is the block's true peak
    (False: the lifetime counter could not be reset and the block set no new
    high, so ``rss_peak`` is only the larger of the start and the end). The
    ``cuda_*`` figures are the CUDA allocator's, on a GPU (0 elsewhere).
    """

    rss_start: int = 0
    rss_end: int = 0
    rss_peak: int = 0
    rss_peak_source: str = ""
    rss_peak_exact: bool = True
    cuda: bool = False
    cuda_start: int = 0
    cuda_end: int = 0
    cuda_peak_allocated: int = 0
    cuda_peak_reserved: int = 0

    @property
    def rss_peak_increase(self) -> int:
        """How far the resident memory rose above its level at the start."""
        return max(self.rss_peak - self.rss_start, 0)

    @property
    def cuda_peak_increase(self) -> int:
        """How far CUDA allocated memory rose above its level at the start."""
        return max(self.cuda_peak_allocated - self.cuda_start, 0)

    def mib(self) -> dict[str, float]:
        """The figures of an evaluation row, in MiB: ``rss_peak_mb`` (the rise above the start), and on a GPU
        ``cuda_peak_allocated_mb`` and ``cuda_peak_reserved_mb`` (the allocator's peaks)."""
        row = {"rss_peak_mb": round(self.rss_peak_increase / MiB, 1)}
        if self.cuda:
            row["cuda_peak_allocated_mb"] = round(self.cuda_peak_allocated / MiB, 1)
            row["cuda_peak_reserved_mb"] = round(self.cuda_peak_reserved / MiB, 1)
        return row


# Blocks of peak_memory() still running, and the highest figures seen before any reset.
_OPEN_BLOCKS: list[PeakMemory] = []
_PROCESS_PEAKS = {"rss": 0, "cuda_allocated": 0, "cuda_reserved": 0}


def _rss_now_and_peak() -> tuple[int, int, str]:
    """(current, peak) resident bytes of this process, and where the peak comes from."""
    try:
        values = {}
        with open("/proc/self/status") as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key in ("VmRSS", "VmHWM"):
                    values[key] = int(rest.split()[0]) * 1024
        return values["VmRSS"], values["VmHWM"], "VmHWM"
    except (OSError, KeyError, ValueError):
        now = psutil.Process().memory_info().rss
        if resource is None:
            return now, now, "rss"
        maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return now, max(now, maxrss if sys.platform == "darwin" else maxrss * 1024), "ru_maxrss"


def proc_status() -> dict[str, int]:
    """Resident memory of this process from /proc (Linux), in bytes: VmRSS, VmHWM, RssAnon, RssFile."""
    values = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
                values[key] = int(rest.split()[0]) * 1024
    return values


def _cuda_available() -> bool:
    return torch.cuda.is_available()


def _fold_peaks(cuda: bool) -> None:
    """Give every open block, and the process' record, the peaks so far: the counters are about to be reset."""
    _, rss_peak, _ = _rss_now_and_peak()
    allocated = reserved = 0
    if cuda:
        torch.cuda.synchronize()
        allocated, reserved = torch.cuda.max_memory_allocated(), torch.cuda.max_memory_reserved()
    for block in _OPEN_BLOCKS:
        block.rss_peak = max(block.rss_peak, rss_peak)
        block.cuda_peak_allocated = max(block.cuda_peak_allocated, allocated)
        block.cuda_peak_reserved = max(block.cuda_peak_reserved, reserved)
    _PROCESS_PEAKS["rss"] = max(_PROCESS_PEAKS["rss"], rss_peak)
    _PROCESS_PEAKS["cuda_allocated"] = max(_PROCESS_PEAKS["cuda_allocated"], allocated)
    _PROCESS_PEAKS["cuda_reserved"] = max(_PROCESS_PEAKS["cuda_reserved"], reserved)


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS counter (VmHWM) of this process; False where that is not allowed."""
    _fold_peaks(cuda=False)
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def read_peaks() -> PeakMemory:
    """Peak memory since the process started (resets by :func:`peak_memory` included), without resetting it.

    ``rss_end`` is the resident memory now. Resets of the CUDA counters made
    outside this module (``torch.cuda.reset_peak_memory_stats``) shorten the
    CUDA figures to the time since then.
    """
    now, rss_peak, source = _rss_now_and_peak()
    result = PeakMemory(rss_end=now, rss_peak=max(rss_peak, _PROCESS_PEAKS["rss"]), rss_peak_source=source,
                        cuda=_cuda_available())
    if result.cuda:
        result.cuda_end = torch.cuda.memory_allocated()
        result.cuda_peak_allocated = max(torch.cuda.max_memory_allocated(), _PROCESS_PEAKS["cuda_allocated"])
        result.cuda_peak_reserved = max(torch.cuda.max_memory_reserved(), _PROCESS_PEAKS["cuda_reserved"])
    return result


@contextlib.contextmanager
def peak_memory(empty_cache: bool = True) -> Iterator[PeakMemory]:
    """Measure the peak memory of the ``with`` block; the result is filled in when the block ends.

    ``empty_cache`` first returns the CUDA blocks cached for earlier work, so
    that they do not count as reserved by this block.
    """
    cuda = _cuda_available()
    result = PeakMemory(cuda=cuda)
    if cuda:
        _fold_peaks(cuda=True)
        if empty_cache:
            torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        result.cuda_start = torch.cuda.memory_allocated()
    _, lifetime_peak, _ = _rss_now_and_peak()
    resettable = reset_peak_rss()
    result.rss_start, _, _ = _rss_now_and_peak()
    result.rss_peak = result.rss_start
    _OPEN_BLOCKS.append(result)
    try:
        yield result
    finally:
        del _OPEN_BLOCKS[next(k for k, block in enumerate(_OPEN_BLOCKS) if block is result)]
        end, peak, source = _rss_now_and_peak()
        result.rss_end, result.rss_peak_source = end, source
        if resettable or peak > lifetime_peak:  # the counter covers this block alone, or the block set a new high
            result.rss_peak = max(result.rss_peak, peak, end)
        else:
            result.rss_peak = max(result.rss_peak, end)
            result.rss_peak_exact = False
        if cuda:
            torch.cuda.synchronize()
            result.cuda_end = torch.cuda.memory_allocated()
            result.cuda_peak_allocated = max(result.cuda_peak_allocated, torch.cuda.max_memory_allocated())
            result.cuda_peak_reserved = max(result.cuda_peak_reserved, torch.cuda.max_memory_reserved())
        _PROCESS_PEAKS["rss"] = max(_PROCESS_PEAKS["rss"], result.rss_peak)
        _PROCESS_PEAKS["cuda_allocated"] = max(_PROCESS_PEAKS["cuda_allocated"], result.cuda_peak_allocated)
        _PROCESS_PEAKS["cuda_reserved"] = max(_PROCESS_PEAKS["cuda_reserved"], result.cuda_peak_reserved)


# --------------------------------------------------------------------------- the harness


def model_tensor_bytes(model: Any) -> dict[str, int]:
    """Bytes of every tensor a loaded model holds, by storage (see :func:`~qlora_guide.quantization.tensor_bytes`).

    ``quantized``: bitsandbytes' packed 4-bit codes; ``quant_constants``: their
    absmax, nested absmax, code tables and offsets; ``lora``: adapter weights;
    ``other``: every other parameter and buffer (tied embeddings once);
    ``weights``: all but the adapters.
    """
    counted = tensor_bytes(model)["by_storage"]
    return {**counted, "weights": counted["quantized"] + counted["quant_constants"] + counted["other"]}


def saved_activation_bytes(model: Any, batch: dict[str, Any]) -> int:
    """Bytes autograd keeps for the backward pass of one forward pass with loss, measured exactly.

    A ``saved_tensors_hooks`` pair sees every tensor saved for backward; those
    still held when the forward pass ends are counted, each storage once. A
    tensor saved by an intermediate graph that is dropped before the loss
    (DoRA's ``lora_B(lora_A(eye))`` for its weight norm) does not count.
    Parameters and quantization constants (not activations) are left out. Run
    it without gradient checkpointing: checkpointing installs its own hooks.
    """

    exclude = {p.untyped_storage().data_ptr() for p in model.parameters()}
    for p in model.parameters():
        state = getattr(p, "quant_state", None)
        if state is not None:
            exclude.update(t.untyped_storage().data_ptr() for t in (state.absmax, state.code) if t is not None)
    saved: list[weakref.ref] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(weakref.ref(t))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(**batch).loss
    held = [t.untyped_storage() for t in (ref() for ref in saved) if t is not None]
    sizes = {s.data_ptr(): s.nbytes() for s in held if s.data_ptr() not in exclude and s.device.type != "meta"}
    del held
    loss.backward()
    model.zero_grad(set_to_none=True)
    return sum(sizes.values())


def _random_batch(vocab_size: int, batch_size: int, seq_len: int, device: str, seed: int = 0) -> dict[str, Any]:
    """Token ids drawn at random (memory does not depend on their values), labels = inputs, no padding."""

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab_size, (batch_size, seq_len), generator=g).to(device)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def _peft_model(model: Any, r: int, gradient_checkpointing: bool, use_dora: bool = False,
                lora_dropout: float = 0.05) -> Any:
    """Attach the guide's LoRA (or DoRA) adapters and enable checkpointing as the training code does."""

    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model.config.use_cache = False
    return peft.get_peft_model(model, LoraConfig(r=r, use_dora=use_dora, lora_dropout=lora_dropout).to_peft())


def _train_steps(model: Any, batch: dict[str, Any], steps: int,
                 phases: list[dict[str, Any]], cuda: bool) -> None:
    """``steps`` torch AdamW steps, each phase measured with :func:`peak_memory`.

    The phases are ``forward`` (with the loss), ``backward`` and ``update``
    (optimizer step and zero_grad). Each appends to ``phases`` one entry with
    the memory after it (``rss``, or ``allocated`` on CUDA) and its peak (``peak``);
    a ``start`` entry gives the memory when each step begins.
    """

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    model.train()

    def record(phase: str, step: int, peak: PeakMemory) -> None:
        if cuda:
            phases.append({"phase": phase, "step": step, "allocated": peak.cuda_end, "peak": peak.cuda_peak_allocated,
                           "reserved_peak": peak.cuda_peak_reserved})
        else:
            phases.append({"phase": phase, "step": step, "rss": peak.rss_end, "peak": peak.rss_peak})

    for k in range(steps):
        with peak_memory(empty_cache=False) as forward:
            loss = model(**batch).loss
        start = PeakMemory(rss_end=forward.rss_start, rss_peak=forward.rss_start, cuda_end=forward.cuda_start,
                           cuda_peak_allocated=forward.cuda_start, cuda_peak_reserved=forward.cuda_start)
        record("start", k, start)
        record("forward", k, forward)
        with peak_memory(empty_cache=False) as backward:
            loss.backward()
            del loss
        record("backward", k, backward)
        with peak_memory(empty_cache=False) as update:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        record("update", k, update)


def _row(est: MemoryEstimate, name: str) -> int:
    return next((r.bytes for r in est.training if r.name == name), 0)


def measure_cpu_training_peak(model: str = "smollm2-135m", method: str = "qlora", batch_size: int = 4,
                              seq_len: int = 256, r: int = 64, gradient_checkpointing: bool = True,
                              steps: int = 2) -> dict[str, Any]:
    """Measure the embedded (or a local) model's memory on the CPU, next to the planner's figures.

    Resident memory comes from :func:`peak_memory` around each phase of each
    step (the kernel's peak counter, reset at its start), so no short peak is missed. Weights that
    transformers leaves mapped from the checkpoint file are copied into
    ordinary memory first, so that the file's pages do not blur the figures. For figures that follow the tensors
    closely, run it in a fresh process with ``MALLOC_MMAP_THRESHOLD_=65536`` so
    that freed tensors go back to the system (``python -m qlora_guide.memory
    --measure-cpu`` does): :func:`measure_cpu_in_subprocess`.
    """

    if method not in ("lora", "qlora"):
        raise QLoRAGuideError(f"measure_cpu_training_peak measures lora or qlora, not '{method}'")
    import bitsandbytes  # noqa: F401 - libraries imported before the baseline: they are not the model
    import peft  # noqa: F401
    import transformers.models.llama.modeling_llama  # noqa: F401

    torch.manual_seed(0)
    before_load = proc_status()
    quantization = QuantizationConfig() if method == "qlora" else None
    base = load_model(model, quantization=quantization, dtype="bfloat16", device_map="cpu")
    with torch.no_grad():  # copy weights still mapped from the checkpoint file into ordinary memory
        for p in base.parameters():
            if getattr(p, "quant_state", None) is None:
                p.data = p.data.clone()
    gc.collect()
    after_load = proc_status()
    tensors = model_tensor_bytes(base)
    peft_model = _peft_model(base, r, gradient_checkpointing)
    batch = _random_batch(base.config.vocab_size, batch_size, seq_len, "cpu")
    phases: list[dict[str, Any]] = []
    _train_steps(peft_model, batch, steps, phases, cuda=False)
    saved = None if gradient_checkpointing else saved_activation_bytes(peft_model, batch)
    plan = estimate(model, method=method, batch_size=batch_size, seq_len=seq_len, r=r,
                    gradient_checkpointing=gradient_checkpointing, device="cpu")
    last = [p for p in phases if p["step"] == steps - 1]
    step_peak = max(p["peak"] for p in last if p["phase"] != "start")
    return {
        "model": plan.model, "method": method, "batch_size": batch_size, "seq_len": seq_len, "r": r,
        "gradient_checkpointing": gradient_checkpointing,
        "peak_rss_resettable": reset_peak_rss(),
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
    from transformers import AutoConfig, AutoModelForCausalLM

    shape = load_model_shape(model)
    path = bundled_lookup().get(shape.name.lower())
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

    if not torch.cuda.is_available():
        raise QLoRAGuideError("measure_gpu_training_peak needs a CUDA GPU")
    tmp = Path(folder) if folder else Path(tempfile.mkdtemp(prefix="qlora-guide-random-"))
    try:
        if not (tmp / "config.json").is_file():
            build_random_model(model, tmp)
        with peak_memory() as load:
            base = load_model(str(tmp), quantization=QuantizationConfig(), device_map="cuda:0")
        loaded = load.cuda_end
        tensors = model_tensor_bytes(base)
        peft_model = _peft_model(base, r, gradient_checkpointing)
        batch = _random_batch(base.config.vocab_size, batch_size, seq_len, "cuda")
        phases: list[dict[str, Any]] = []
        _train_steps(peft_model, batch, steps, phases, cuda=True)
        with peak_memory(empty_cache=False) as last:
            saved = None if gradient_checkpointing else saved_activation_bytes(peft_model, batch)
        result = {
            "device": torch.cuda.get_device_name(0), "model": load_model_shape(model).name,
            "batch_size": batch_size, "seq_len": seq_len, "r": r, "gradient_checkpointing": gradient_checkpointing,
            "allocated_after_load": loaded, "tensor_bytes": tensors, "phases": phases,
            "step_peak": max(p["peak"] for p in phases if p["step"] == steps - 1 and p["phase"] != "start"),
            "max_reserved": max([p["reserved_peak"] for p in phases if p["step"] == steps - 1]
                                + [last.cuda_peak_reserved]),
            "reserved": torch.cuda.memory_reserved(),
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


def main(argv: list[str] | None = None) -> int:
    """``python -m qlora_guide.memory --measure-gpu mistral-7b`` (or ``--measure-cpu smollm2-135m``)."""
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
