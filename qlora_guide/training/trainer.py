"""transformers' Trainer as a run uses it: the subclass, its callbacks, and TrainingArguments from the recipe."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from peft.utils.other import fsdp_auto_wrap_policy
from transformers import EarlyStoppingCallback, Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_utils import EvalLoopOutput

from qlora_guide import progress
from qlora_guide.config import TRAINING_ARGUMENT_NAMES, Recipe
from qlora_guide.data import PreparedData
from qlora_guide.errors import QLoRAGuideError
from qlora_guide.precision import Precision
from qlora_guide.runs import RunFolder, checkpoint_name
from qlora_guide.training.answer_only import AnswerOnlyLogits, validation_loss
from qlora_guide.training.checkpoints import RunState, mark_complete
from qlora_guide.training.devices import fsdp_enabled, memory_stats


class RunTrainer:
    """What every trainer of a run adds to its library's Trainer (transformers', TRL's): a NaN/inf guard, the
    run's token counts and loss sum (:class:`RunState`, saved in each checkpoint) and memory in every log."""

    answer_only: AnswerOnlyLogits | None = None
    run_state: RunState

    def count_tokens(self, inputs: dict[str, Any]) -> tuple[int, int]:
        """(real, padding) tokens of the batch just trained on."""
        raise NotImplementedError

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        if not torch.isfinite(loss).all():
            raise QLoRAGuideError(
                f"training stopped at step {self.state.global_step + 1}: the loss became {float(loss.float().mean())} "
                "(lower training.learning_rate or training.max_grad_norm, or set training.bf16=false)"
            )
        self.run_state.add(float(loss.float().mean()), *self.count_tokens(inputs))
        return loss

    def _save_checkpoint(self, model, trial):
        super()._save_checkpoint(model, trial)  # the completion marker, written after this, covers the state file
        folder = Path(self._get_output_dir(trial)) / checkpoint_name(self.state.global_step)
        self.run_state.save(folder, self.args.process_index)

    def log(self, logs, start_time=None):
        logs.update(memory_stats())
        logs["train_tokens_seen"] = self.run_state.real_tokens
        super().log(logs, start_time)


class QLoRATrainer(RunTrainer, Trainer):
    """transformers' Trainer with answer-only logits and a token-weighted evaluation (and :class:`RunTrainer`'s guards)."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        head = self.answer_only
        if head is None or return_outputs or "labels" not in inputs or not model.training:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        labels = inputs["labels"]
        inputs = {k: v for k, v in inputs.items() if k != "labels"}
        autocast_dtype = torch.bfloat16 if self.args.bf16 else torch.float16 if self.args.fp16 else None
        if not head.check(model, inputs, labels, self.autocast_smart_context_manager, autocast_dtype):
            return super().compute_loss(model, {**inputs, "labels": labels}, return_outputs, num_items_in_batch)
        loss = head.loss(model, inputs, labels, num_items_in_batch)
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            loss = loss * self.accelerator.num_processes  # as Trainer does: DDP averages the gradients
        return loss

    def count_tokens(self, inputs: dict[str, Any]) -> tuple[int, int]:
        return self.data_collator.take()

    def evaluation_loop(self, dataloader, description, prediction_loss_only=None, ignore_keys=None, metric_key_prefix="eval"):
        batches = (self._prepare_inputs(b) for b in dataloader)
        pending = len(self.data_collator.batch_counts)
        gather = self.accelerator.gather_for_metrics if self.args.world_size > 1 else None
        loss, tokens = validation_loss(self.model, batches, self.autocast_smart_context_manager, gather)
        while len(self.data_collator.batch_counts) > pending:  # validation batches are not training tokens
            self.data_collator.batch_counts.pop()
        metrics = {
            f"{metric_key_prefix}_loss": loss,
            f"{metric_key_prefix}_perplexity": math.exp(min(loss, 50)),
            f"{metric_key_prefix}_tokens": tokens,
        }
        return EvalLoopOutput(predictions=None, label_ids=None, metrics=metrics, num_samples=len(dataloader.dataset))

class CheckpointMarker(TrainerCallback):
    """After every save: wait for all processes, then mark the checkpoint complete."""

    def on_save(self, args, state, control, **kwargs):
        if args.world_size > 1:
            dist.barrier()
        if state.is_world_process_zero:
            checkpoint = Path(args.output_dir) / checkpoint_name(state.global_step)
            if checkpoint.is_dir():
                mark_complete(checkpoint, state.global_step)


class MetricsHistory(TrainerCallback):
    """Append every logged dict to the run's metrics.jsonl, one JSON object per line."""

    def __init__(self, history: Path) -> None:
        self.history = history

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs:
            record = {"step": state.global_step, "epoch": state.epoch, "time": time.time(), **logs}
            with open(self.history, "a") as f:
                f.write(json.dumps(record) + "\n")


def package_training_arguments(recipe: Recipe, precision: Precision, output_dir: Path, has_validation: bool) -> dict[str, Any]:
    """The TrainingArguments fields the package derives itself: output folder, precision, evaluation and saving.

    A recipe decides them through the fields named in
    :data:`~qlora_guide.config.PACKAGE_TRAINING_ARGUMENTS` (or its own
    ``optim``, ``bf16``, ``eval_steps`` and ``report_to``), never through
    ``training.trainer_args``.
    """
    t = recipe.training
    eval_steps = t.eval_steps or t.save_steps
    if has_validation and t.save_steps % eval_steps:
        raise QLoRAGuideError(
            f"training.save_steps ({t.save_steps}) must be a multiple of training.eval_steps ({eval_steps}) so that the best checkpoint is kept"
        )
    if t.early_stopping_patience is not None and not has_validation:
        raise QLoRAGuideError("training.early_stopping_patience needs a validation split (data.validation_split is null)")
    return {
        "output_dir": str(RunFolder(output_dir).checkpoints),
        "optim": precision.optim,
        "bf16": precision.bf16,
        "fp16": precision.fp16,
        "use_cpu": precision.device == "cpu",
        "save_strategy": "steps",
        "eval_strategy": "steps" if has_validation else "no",
        "eval_steps": eval_steps if has_validation else None,
        "load_best_model_at_end": has_validation,  # the best checkpoint is the adapter saved
        "metric_for_best_model": "eval_loss" if has_validation else None,
        "greater_is_better": False if has_validation else None,
        "report_to": [r for r in t.report_to if r != "none"],
        "remove_unused_columns": False,  # the collator takes what it needs
    }


def training_arguments(recipe: Recipe, precision: Precision, output_dir: Path, has_validation: bool,
                       arguments_class: type = TrainingArguments, **extra: Any) -> Any:
    """TrainingArguments from the recipe's training section, by field name, and the resolved precision.

    ``arguments_class`` is TrainingArguments or a subclass (TRL's ``DPOConfig``), whose own fields come in ``extra``.

    Every training field whose name is a ``TrainingArguments`` field passes
    under that name (:data:`~qlora_guide.config.TRAINING_ARGUMENT_NAMES` maps
    the two the recipe spells otherwise), then come the package's defaults,
    then ``training.trainer_args`` (any other field, by transformers' name), and
    last what :func:`package_training_arguments` derives.
    """
    t = recipe.training
    fields = {f.name for f in dataclasses.fields(TrainingArguments) if f.init}
    named = {TRAINING_ARGUMENT_NAMES.get(name, name): getattr(t, name) for name in type(t).model_fields}
    defaults = {  # the package's choices, which training.trainer_args may change
        "per_device_eval_batch_size": t.per_device_train_batch_size,
        "activation_checkpointing_kwargs": {"use_reentrant": False},
        "logging_first_step": True,
        "ddp_find_unused_parameters": False,  # every adapter is used at every step
        "dataloader_num_workers": 0,
        "disable_tqdm": not progress.enabled(),  # the Trainer's bar on a terminal only (qlora_guide.progress)
    }
    kwargs = {
        **{name: value for name, value in named.items() if name in fields},
        **defaults,
        **t.trainer_args,
        **package_training_arguments(recipe, precision, output_dir, has_validation),
        **extra,
    }
    try:
        return arguments_class(**kwargs)
    except (TypeError, ValueError) as err:
        if not t.trainer_args:
            raise
        raise QLoRAGuideError(f"training.trainer_args: transformers' TrainingArguments refused them: {str(err).splitlines()[0]}") from None


@contextlib.contextmanager
def _env(**values: str):
    """Set environment variables for the duration of a block (transformers reads some at construction)."""
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def tensorboard_logs(out: Path) -> contextlib.AbstractContextManager:
    """Within it, a Trainer being built sends its TensorBoard events to the run's ``logs/``."""
    return _env(TENSORBOARD_LOGGING_DIR=str(RunFolder(out).logs))  # read by the TensorBoard callback when it is built


def run_callbacks(recipe: Recipe, out: Path) -> list[TrainerCallback]:
    """The callbacks of every run: checkpoint markers, the metrics history, and early stopping if the recipe asks."""
    callbacks = [CheckpointMarker(), MetricsHistory(RunFolder(out).metrics_log)]
    if recipe.training.early_stopping_patience is not None:
        callbacks.append(EarlyStoppingCallback(early_stopping_patience=recipe.training.early_stopping_patience))
    return callbacks


def make_trainer(recipe: Recipe, model: Any, tokenizer: Any, data: PreparedData, args: Any, out: Path) -> QLoRATrainer:
    """The Trainer of a run in ``out``: its callbacks, TensorBoard folder, answer-only logits and FSDP wrapping."""
    callbacks = run_callbacks(recipe, out)
    with tensorboard_logs(out):
        trainer = QLoRATrainer(
            model=model,
            args=args,
            train_dataset=data.train,
            eval_dataset=data.validation,
            data_collator=data.collator,
            processing_class=tokenizer,
            callbacks=callbacks,
        )
    if not recipe.data.train_on_prompt and not fsdp_enabled():  # FSDP shards the output layer: keep its own path
        trainer.answer_only = AnswerOnlyLogits(model)
    if getattr(trainer, "is_fsdp_enabled", False):
        # wrap the adapters apart from the frozen 4-bit layers: FSDP flattens tensors of one requires_grad only
        trainer.accelerator.state.fsdp_plugin.auto_wrap_policy = fsdp_auto_wrap_policy(trainer.model)
    return trainer
