"""Which precision path this machine takes: native bf16, or float32 on a CPU that only emulates bf16.

On a CPU, bfloat16 is fast only when the processor computes it in hardware
(AVX512-BF16 or AMX); elsewhere every bf16 product is emulated and float32 is
several times faster. Training and inference therefore compute in float32 on
such CPUs (see :func:`qlora_guide.training.resolve_precision`), and so do
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
