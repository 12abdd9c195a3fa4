"""Which precision path this machine takes: native bf16, or float32 on a CPU that only emulates bf16.

On a CPU, bfloat16 is fast only when the processor computes it in hardware
(AVX512-BF16 or AMX); elsewhere every bf16 product is emulated and float32 is
several times faster. Training and inference therefore compute in float32 on
such CPUs (see :func:`resolve`), and so do
bitsandbytes' 4-bit layers, which otherwise switch to a bf16-only CPU kernel
for inference.

Both paths must work on every machine, so the choice can be forced:

``QLORA_GUIDE_CPU_BF16=0``
    behave as a CPU without native bf16: float32 compute everywhere, and
    bitsandbytes' AVX512-BF16 inference kernel switched off. The test suite
    runs its precision-sensitive tests on this path on every machine.
``QLORA_GUIDE_CPU_BF16=auto`` (the default)
    use bf16 where the CPU has it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from qlora_guide.errors import QLoRAGuideError

CPU_BF16_ENV = "QLORA_GUIDE_CPU_BF16"


def cpu_bf16_setting() -> str:
    """The value of ``QLORA_GUIDE_CPU_BF16``: ``auto`` or ``0``."""
    value = os.environ.get(CPU_BF16_ENV, "auto").strip().lower()
    if value in ("", "auto", "1", "true", "on"):
        return "auto"
    if value in ("0", "false", "off", "no"):
        return "0"
    raise QLoRAGuideError(f"{CPU_BF16_ENV}={value!r}: use auto (bf16 where the CPU has it) or 0 (always float32 on the CPU)")


def cpu_has_native_bf16() -> bool:
    """True when this CPU computes bf16 in hardware (AVX512-BF16 or AMX) and ``QLORA_GUIDE_CPU_BF16`` allows it."""
    if cpu_bf16_setting() == "0":
        return False
    import torch

    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in checks)


def cpu_compute_dtype(dtype: str) -> str:
    """``dtype`` for a computation on this CPU: bfloat16 becomes float32 where bf16 is only emulated."""
    return "float32" if dtype == "bfloat16" and not cpu_has_native_bf16() else dtype


def use_differentiable_4bit_kernel(model: Any) -> int:
    """Keep every bitsandbytes 4-bit layer on its ordinary kernel (dequantize, then a float matmul).

    On a CPU with AVX512-BF16, bitsandbytes 0.50 repacks a ``Linear4bit`` the
    first time it runs in eval mode without gradients and from then on
    multiplies with a bf16 kernel of its own, whatever the compute dtype. That
    kernel has no backward (a model that is trained would silently stop
    getting gradients through the frozen layers after an evaluation pass), and
    it does not compute in float32 (a parity check against exact arithmetic
    would measure bf16 noise). Returns how many layers were switched.
    """
    layers = [m for m in model.modules() if hasattr(m, "support_avx512bf16_for_cpu")]
    for module in layers:
        module.support_avx512bf16_for_cpu = False
    return len(layers)


def follow_cpu_bf16_setting(model: Any) -> int:
    """On the float32 path, keep bitsandbytes' 4-bit layers off their AVX512-BF16 inference kernel too.

    bitsandbytes asks the processor itself, not this package, whether to use
    that kernel; forcing the float32 path must switch it off, or a machine
    with native bf16 would not test what a machine without it runs.
    """
    return 0 if cpu_has_native_bf16() else use_differentiable_4bit_kernel(model)


# ---------------------------------------------------------------- what a run computes in


@dataclass
class Precision:
    """Where and in which dtypes a run computes, decided once from its settings and the machine."""

    device: str  # cuda or cpu
    bf16: bool  # bf16 autocast
    fp16: bool  # fp16 autocast with loss scaling
    compute_dtype: str  # dtype the 4-bit weights are dequantized to
    model_dtype: str  # dtype of the weights that are not quantized
    optim: str
    notes: list[str] = field(default_factory=list)


def cuda_has_native_bf16() -> bool:
    """True when every visible GPU computes bf16 in hardware (compute capability 8.0 and later).

    ``torch.cuda.is_bf16_supported()`` alone also says yes on a T4 or a V100,
    where bf16 is emulated and slow; the guide's rule is native support.
    """
    import torch

    return torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)


def resolve(bf16: bool | str = "auto", compute_dtype: str = "bfloat16", model_dtype: str = "bfloat16", optim: str = "auto",
            device: str | None = None, native_bf16: bool | None = None) -> Precision:
    """The precision a training run with these settings takes on this machine (``auto`` resolved here).

    The one answer to "what does training compute in here": ``qlora-guide
    train`` runs with it and ``qlora-guide check`` reports it. ``device``
    (``cuda`` or ``cpu``) and ``native_bf16`` describe another machine; by
    default they are this one's.
    """
    import torch

    notes, fp16 = [], False
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda":
        native = cuda_has_native_bf16() if native_bf16 is None else native_bf16
        if bf16 is True and not native:
            raise QLoRAGuideError("training.bf16: this GPU has no native bfloat16 (compute capability < 8.0); "
                                  "set training.bf16=false, or auto to train in float16")
        use_bf16 = native if bf16 == "auto" else bool(bf16)
        if not native and "bfloat16" in (compute_dtype, model_dtype):
            compute_dtype, model_dtype = (d.replace("bfloat16", "float16") for d in (compute_dtype, model_dtype))
            fp16 = bf16 == "auto"
            notes.append("this GPU has no native bfloat16: computing in float16 (smaller range: the NaN guard stops the run if the loss overflows)")
    else:
        native = cpu_has_native_bf16() if native_bf16 is None else native_bf16
        use_bf16 = native if bf16 == "auto" else bool(bf16)
        if bf16 is True and not native:
            notes.append("training.bf16=true on a CPU without native bf16: it is emulated and slow")
        if not use_bf16 and (compute_dtype != "float32" or model_dtype != "float32"):
            compute_dtype = model_dtype = "float32"
            notes.append("CPU without native bf16: computing in float32")
    optim = optim if optim != "auto" else ("paged_adamw_32bit" if device == "cuda" else "adamw_torch")
    if device == "cpu" and "paged" in optim:
        raise QLoRAGuideError(f"training.optim: '{optim}' pages optimizer states between GPU and CPU memory, which "
                              "needs a CUDA GPU; on the CPU use adamw_torch (auto) or adamw_bnb_8bit")
    return Precision(device, use_bf16, fp16, compute_dtype, model_dtype, optim, notes)


def range_report(model: Any, tokenizer: Any, texts: list[str]) -> dict[str, Any]:
    """The largest activation of one forward pass and the adapters' gradients of one backward pass, computed in
    float32, against the range of float16 (with and without loss scaling), bfloat16 and float32.

    Why fp16 training fails and bf16 does not: an activation above a type's largest value becomes inf (then NaN),
    and a gradient below its smallest positive value becomes 0. Both are measured by casting the float32 values:
    ``rows`` has one entry per type; ``largest_activation`` and ``gradients`` (non-zero entries) are what was cast.
    """
    import torch

    largest = 0.0

    def watch(_module: Any, _args: Any, output: Any) -> None:
        nonlocal largest
        tensor = output[0] if isinstance(output, tuple) else output
        if isinstance(tensor, torch.Tensor) and tensor.is_floating_point():
            largest = max(largest, float(tensor.detach().abs().max()))

    hooks = [module.register_forward_hook(watch) for module in model.modules()]
    batch = tokenizer(texts, return_tensors="pt", padding=True)
    try:
        model.train()
        model(**batch, labels=batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)).loss.backward()
    finally:
        for hook in hooks:
            hook.remove()
    grads = torch.cat([p.grad.detach().flatten().float() for p in model.parameters() if p.requires_grad and p.grad is not None])
    grads = grads[grads != 0]
    model.zero_grad(set_to_none=True)
    rows = []
    for name, dtype, scale in (("float16", torch.float16, 1.0), ("float16, loss scaled by 2^16", torch.float16, 2.0**16),
                               ("bfloat16", torch.bfloat16, 1.0), ("float32", torch.float32, 1.0)):
        info = torch.finfo(dtype)
        rows.append({
            "dtype": name,
            "largest value": info.max,
            "smallest positive": info.smallest_normal * info.eps,  # the smallest subnormal number
            "largest activation overflows": bool(torch.isinf(torch.tensor(largest).to(dtype))),
            "gradients flushed to 0 (%)": 100 * float(((grads * scale).to(dtype) == 0).float().mean()),
        })
    return {"largest_activation": largest, "smallest_gradient": float(grads.abs().min()), "gradients": grads.numel(),
            "rows": rows}
