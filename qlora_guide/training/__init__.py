"""QLoRA training: one call, :func:`train`, from a recipe to an adapter folder.

QLoRA is three steps on top of an ordinary causal language model::

    model = load_model(name, quantization=recipe.quantization)     # frozen NF4 base
    model = prepare_model_for_kbit_training(model, ...)             # fp32 norms, input grads, checkpointing
    model = get_peft_model(model, recipe.lora.to_peft())            # trainable low-rank adapters

With ``quantization: null`` the same path trains plain LoRA on a bf16 base.
transformers' ``Trainer`` then runs the optimisation with the recipe's
settings (the same names as ``TrainingArguments``), plus what a long run
needs: evaluation with perplexity, early stopping, the best checkpoint kept, a
memory log, a NaN/inf guard, TensorBoard, a ``metrics.jsonl`` history and
resumable checkpoints. The output folder holds (its layout: :class:`qlora_guide.runs.RunFolder`)::

    adapter/         adapter_model.safetensors, adapter_config.json, tokenizer
    recipe.yaml      the resolved recipe (what the run really used)
    metrics.json     final figures
    metrics.jsonl    every logged step
    manifest.json    package versions, seed, data fingerprint, parameter counts
    checkpoints/     checkpoint-N/ folders (complete ones carry checkpoint_complete.json)
    logs/            TensorBoard events

Precision: on a GPU, bf16 when it supports it, else fp16 (with a warning). On
the CPU, bf16 autocast (and bf16 dequantization of the 4-bit weights) only when
the processor computes bf16 natively (AVX512-BF16 or AMX): on such a 2-core
server CPU the demo recipe trained 1.2-1.5x faster in bf16 than in float32,
with per-step losses within 0.01 of each other. Elsewhere bf16 is emulated, so
the CPU computes in float32; ``QLORA_GUIDE_CPU_BF16=0`` forces that path on
any CPU (:mod:`qlora_guide.precision`).

Where each part lives::

    run.py           train(): checks, data, model, Trainer, final figures, manifest; train_once() for a shared run
    preflight.py     doctor: the first examples as the model sees them; labels, EOS, padding, template, precision
    model.py         the base (4-bit or 16-bit), prepared for k-bit training, plus the adapters
    trainer.py       the Trainer subclass, its callbacks, TrainingArguments from the recipe
    answer_only.py   the output layer on answer tokens only, and the validation loss
    checkpoints.py   the run folder: refusing to damage one, complete checkpoints, resume state
    devices.py       processes, precision, memory peaks
    result.py        what train() returns
    launch.py        several processes: the accelerate launch command of a recipe, and launch() to run it
    equivalence.py   two runs of one recipe compared step by step (one process against several)
"""

from qlora_guide.runs import COMPLETE_MARKER
from qlora_guide.training.answer_only import AnswerOnlyLogits, validation_loss
from qlora_guide.training.checkpoints import (
    RunState,
    check_output_dir,
    initial_eval_loss,
    is_complete,
    latest_checkpoint,
    mark_complete,
    save_adapter,
    verify_checkpoint,
)
from qlora_guide.training.devices import (
    free_memory,
    fsdp_enabled,
    is_main_process,
    memory_stats,
    resolve_precision,
    world_size,
)
from qlora_guide.training.equivalence import (
    RunComparison,
    adapter_difference,
    compare_runs,
    logged,
    loss_table,
)
from qlora_guide.training.launch import LaunchResult, format_launch_result, launch, launch_command
from qlora_guide.training.model import build_model, check_target_modules, trainable_parameters
from qlora_guide.training.result import TrainResult, format_train_result
from qlora_guide.training.run import train, train_once
from qlora_guide.training.trainer import (
    QLoRATrainer,
    make_trainer,
    package_training_arguments,
    training_arguments,
)

__all__ = [
    "COMPLETE_MARKER", "AnswerOnlyLogits", "LaunchResult", "QLoRATrainer", "RunComparison", "RunState", "TrainResult",
    "adapter_difference", "build_model", "check_output_dir", "compare_runs", "check_target_modules", "format_launch_result", "format_train_result", "free_memory", "fsdp_enabled", "initial_eval_loss",
    "is_complete", "is_main_process", "latest_checkpoint", "launch", "launch_command", "logged", "loss_table", "make_trainer", "mark_complete", "memory_stats",
    "package_training_arguments", "resolve_precision", "save_adapter", "train", "train_once", "trainable_parameters",
    "training_arguments", "validation_loss", "verify_checkpoint", "world_size",
]
