"""Memory: how much a fine-tuning run needs, planned from a model config alone, and measured.

``from qlora_guide import memory`` gives every name below; each file holds one concept:

``shapes.py``
    the dimensions of a Llama-style decoder (:class:`ModelShape`), the bundled
    model configs (:func:`bundled_configs`) and :func:`load_model_shape`.
``planner.py``
    the planner: :func:`estimate` (its formulas are in the module's docstring),
    :func:`compare_methods`, :func:`comparison_rows`, :class:`MemoryEstimate`
    and :class:`Row`, and the byte counts they use (:func:`quantized_bytes`,
    :func:`lora_parameters`, activations, the CUDA overhead constants).
``sharding.py``
    memory per GPU when several train one run: :func:`per_device` (DDP copies,
    FSDP or ZeRO-3 shards) and :func:`per_device_rows`.
``report.py``
    text tables: :func:`gib`, :func:`format_estimate`, :func:`format_comparison`
    and :func:`format_measurement`.
``claims.py``
    the guide's checks: :func:`paper_headline_check` (the QLoRA paper's 65B
    model on a 48 GB GPU, in the paper's setting and with today's peft
    defaults) and :func:`sixteen_gb_check` (QLoRA on a 7B model in 16 GB).
``measure.py``
    measurement: :func:`peak_memory` (the peak memory of a block of code),
    :func:`read_peaks`, and the harness that checks the planner against real
    training steps (:func:`measure_cpu_training_peak`,
    :func:`measure_gpu_training_peak`, ``python -m qlora_guide.memory``).
"""

from qlora_guide.memory.claims import (
    PAPER_65B_MODEL,
    PAPER_65B_SEQ_LEN,
    PAPER_65B_SETTINGS,
    PEFT_DEFAULT_ADAPTER_DTYPE,
    paper_headline_check,
    sixteen_gb_check,
)
from qlora_guide.memory.measure import (
    PeakMemory,
    _peft_model,
    _random_batch,
    build_random_model,
    main,
    measure_cpu_in_subprocess,
    measure_cpu_training_peak,
    measure_gpu_in_subprocess,
    measure_gpu_training_peak,
    model_tensor_bytes,
    peak_memory,
    proc_status,
    read_peaks,
    reset_peak_rss,
    saved_activation_bytes,
)
from qlora_guide.memory.planner import (
    ALLOCATOR_SLACK,
    BNB_BLOCKSIZES,
    CODE_4BIT_BYTES,
    CODE_8BIT_BYTES,
    CUBLAS_WORKSPACE_BYTES,
    CUDA_CONTEXT_BYTES,
    DTYPE_BYTES,
    GUIDE_TARGET_MODULES,
    METHODS,
    NESTED_BLOCKSIZE,
    OFFSET_BYTES,
    OPTIMIZERS,
    STATES_IN_PARAMETER_DTYPE,
    GiB,
    MemoryEstimate,
    Row,
    activation_bytes,
    compare_methods,
    comparison_rows,
    estimate,
    layer_activation_bytes,
    lora_parameters,
    peak_rows,
    quantized_bytes,
)
from qlora_guide.memory.report import format_comparison, format_estimate, format_measurement, gib
from qlora_guide.memory.shapes import (
    CONFIGS_DIR,
    ENCODER_MODEL_TYPES,
    SUPPORTED_MODEL_TYPES,
    TIED_BY_DEFAULT,
    ModelShape,
    bundled_configs,
    bundled_lookup,
    load_model_shape,
    shape_from_config,
)
from qlora_guide.memory.sharding import STRATEGIES, DeviceMemory, per_device, per_device_rows

__all__ = [
    "ALLOCATOR_SLACK", "BNB_BLOCKSIZES", "CODE_4BIT_BYTES", "CODE_8BIT_BYTES", "CONFIGS_DIR", "CUBLAS_WORKSPACE_BYTES",
    "CUDA_CONTEXT_BYTES", "DTYPE_BYTES", "ENCODER_MODEL_TYPES", "GUIDE_TARGET_MODULES", "METHODS", "NESTED_BLOCKSIZE",
    "OFFSET_BYTES", "OPTIMIZERS", "PAPER_65B_MODEL", "PAPER_65B_SEQ_LEN", "PAPER_65B_SETTINGS",
    "PEFT_DEFAULT_ADAPTER_DTYPE", "STATES_IN_PARAMETER_DTYPE", "SUPPORTED_MODEL_TYPES", "TIED_BY_DEFAULT",
    "STRATEGIES", "DeviceMemory", "GiB", "MemoryEstimate", "ModelShape", "PeakMemory", "Row",
    "_peft_model", "_random_batch", "activation_bytes", "build_random_model", "bundled_configs", "bundled_lookup",
    "compare_methods", "comparison_rows", "estimate", "format_comparison", "format_estimate", "format_measurement",
    "gib", "layer_activation_bytes", "load_model_shape", "lora_parameters", "main", "measure_cpu_in_subprocess",
    "measure_cpu_training_peak", "measure_gpu_in_subprocess", "measure_gpu_training_peak", "model_tensor_bytes",
    "paper_headline_check", "peak_memory", "peak_rows", "per_device", "per_device_rows", "proc_status", "quantized_bytes", "read_peaks", "reset_peak_rss",
    "saved_activation_bytes", "shape_from_config", "sixteen_gb_check",
]
