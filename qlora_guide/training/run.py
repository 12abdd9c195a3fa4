"""``train``: from a recipe to a complete run folder, checked before anything is written."""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any

import torch

from qlora_guide import progress
from qlora_guide.config import Recipe, load_recipe
from qlora_guide.data import PreparedData, load_examples, prepare_data
from qlora_guide.models import load_tokenizer, resolve_model
from qlora_guide.outputs import lock_beside, write_text_atomic
from qlora_guide.precision import Precision
from qlora_guide.runs import MANIFEST_FILE, METRICS_FILE, RunFolder, checkpoint_step
from qlora_guide.training import preflight
from qlora_guide.training.checkpoints import (
    RunState,
    check_output_dir,
    check_same_recipe,
    clear_run,
    holds_run,
    initial_eval_loss,
    latest_checkpoint,
    save_adapter,
    trim_history,
    verify_checkpoint,
)
from qlora_guide.training.devices import (
    barrier,
    free_memory,
    is_main_process,
    memory_stats,
    resolve_precision,
    world_size,
)
from qlora_guide.training.model import build_model, save_initial_adapter, start_adapter, trainable_parameters
from qlora_guide.training.preference import (
    drop_reference_adapter,
    load_pairs,
    make_preference_trainer,
    preference_arguments,
    prepare_pairs,
)
from qlora_guide.training.result import TrainResult
from qlora_guide.training.trainer import make_trainer, training_arguments
from qlora_guide.versions import package_versions

log = logging.getLogger(__name__)


@progress.library_bars()
def train(
    recipe: Recipe | str | Path | dict,
    overrides: list[str] | None = None,
    output_dir: str | Path | None = None,
    resume: bool = False,
    overwrite: bool = False,
) -> TrainResult:
    """Fine-tune the recipe's model with (Q)LoRA and write the adapter folder; see the module docstring.

    ``recipe`` is a bundled name (``demo``), a YAML file, a mapping or a
    :class:`~qlora_guide.config.Recipe`; ``overrides`` are ``section.key=value``
    strings. ``output_dir`` replaces ``output.dir``. A folder that already
    holds a run is refused unless ``resume`` (continue from its latest complete
    checkpoint) or ``overwrite`` (start again). Everything is checked before
    anything is written, so a mistake never damages an earlier run.
    """
    if isinstance(recipe, Recipe):
        recipe = load_recipe(recipe.to_dict(), overrides)
    else:
        recipe = load_recipe(recipe, overrides)
    out = Path(output_dir or recipe.output.dir).expanduser()
    run_folder = RunFolder(out)
    overwrite = overwrite or recipe.output.overwrite
    check_output_dir(out, resume, overwrite)
    if resume:
        check_same_recipe(run_folder.recipe, recipe)
        newest = latest_checkpoint(out)
        if newest is not None:
            verify_checkpoint(newest)  # before any model is loaded


    precision = resolve_precision(recipe)
    for note in precision.notes:
        log.warning(note)
    preference = recipe.dpo is not None
    if preference:
        start_adapter(recipe)  # a missing or mismatched starting adapter is found before any model loads
    # a missing or malformed data file is found before any model loads, too
    examples = load_pairs(recipe.data) if preference else load_examples(recipe.data)
    tokenizer = load_tokenizer(recipe.model.name_or_path, trust_remote_code=recipe.model.trust_remote_code)
    if not preference:  # what doctor checks: a template, EOS or label mistake stops the run before the model loads
        report = preflight.check(recipe, examples["train"], tokenizer, precision)
        for finding in report.findings:
            if finding.level in ("warning", "error") and finding.check != "precision":  # precision notes: logged above
                log.warning("doctor: %s", finding.line())
        report.raise_on_error()
    if preference:
        data = prepare_pairs(recipe.data, tokenizer, examples, recipe.training.per_device_train_batch_size)
    else:
        data = prepare_data(recipe.data, tokenizer, recipe.training.per_device_train_batch_size, splits=examples)
    model = build_model(recipe, precision)
    trainable, total = trainable_parameters(model)
    log.info("trainable params: %s of %s (%.2f%%)", f"{trainable:,}", f"{total:,}", 100 * trainable / total)
    free_memory()
    arguments = preference_arguments if preference else training_arguments
    args = arguments(recipe, precision, out, data.validation is not None)
    _ = args.device  # sets the devices up, and under torchrun/accelerate the process group

    checkpoint = None
    if is_main_process():
        if overwrite and holds_run(out):
            clear_run(out)
        out.mkdir(parents=True, exist_ok=True)
        if resume:
            checkpoint = latest_checkpoint(out, delete_incomplete=True)
            trim_history(run_folder.metrics_log, checkpoint_step(checkpoint) or 0 if checkpoint else 0)
        else:
            write_text_atomic(run_folder.recipe, recipe.to_yaml())
        if recipe.lora.changes_base_weights:
            save_initial_adapter(model, run_folder.initial_adapter)
    barrier()
    if resume and not is_main_process():
        checkpoint = latest_checkpoint(out)
    if resume and checkpoint is None:
        log.warning("--resume: %s has no complete checkpoint yet: starting from step 0", out)

    trainer = (make_preference_trainer if preference else make_trainer)(recipe, model, tokenizer, data, args, out)
    trainer.run_state = RunState.load(checkpoint, args.process_index)
    initial_eval = None
    if data.validation is not None:
        initial_eval = trainer.evaluate()["eval_loss"] if checkpoint is None else initial_eval_loss(run_folder)
    output = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    drop_reference_adapter(trainer.model)
    free_memory()
    metrics = _final_metrics(trainer, output, data, initial_eval)
    result = TrainResult(out, run_folder.adapter, metrics, trainable, total, data.train_stats, data.validation_stats,
                         str(checkpoint) if checkpoint else None, precision.notes)
    files = {METRICS_FILE: metrics, MANIFEST_FILE: _manifest(recipe, precision, data, result)}
    save_adapter(trainer, tokenizer, out, files)
    del trainer, model, output
    free_memory()  # the Trainer holds reference cycles: give the model's memory back before returning
    return result


def train_once(recipe: Recipe | str | Path | dict, output_dir: str | Path,
               overrides: list[str] | None = None) -> Path:
    """The run folder ``output_dir``, trained with ``recipe`` unless it already holds a finished run.

    For pages and scripts that share one run: the first caller trains, the others reuse
    its folder. A hidden lock file beside the folder makes a caller that comes while another is
    training wait for that run instead of training the same one again. A folder whose
    run never finished (no ``metrics.json``) is trained again from the start.
    """
    out = Path(output_dir).expanduser()
    with lock_beside(out):
        if not RunFolder(out).metrics.is_file():
            train(recipe, overrides, output_dir=out, overwrite=True)
    return out


def _final_metrics(trainer: Any, output: Any, data: PreparedData, initial_eval: float | None) -> dict[str, Any]:
    """Final figures of the whole run (a resumed one included): training loss and speed, and the validation
    loss of the kept (best) adapter."""
    state, run = trainer.state, trainer.run_state
    counts = torch.tensor([run.real_tokens, run.padded_tokens, run.loss_sum], dtype=torch.float64,
                          device=trainer.args.device)
    if trainer.args.world_size > 1:  # every process counted its own batches, and its own share of each loss
        counts = trainer.accelerator.reduce(counts, reduction="sum")
        counts[2] /= trainer.args.world_size  # each share is scaled by the process count, as DDP averages
    real, padding, loss_sum = int(counts[0]), int(counts[1]), float(counts[2])
    runtime = run.runtime + output.metrics.get("train_runtime", time.time() - run.started)
    metrics: dict[str, Any] = {
        "global_step": state.global_step,
        "epoch": state.epoch,
        "train_loss": loss_sum / max(state.global_step, 1),
        "train_runtime": runtime,
        "train_tokens": real,
        "train_padding_tokens": padding,
        "train_tokens_per_second": real / max(runtime, 1e-9),
        "best_checkpoint": state.best_model_checkpoint,
        "stopped_early": state.max_steps > state.global_step,
        "answer_only_logits": bool(trainer.answer_only and trainer.answer_only.checked),
        **memory_stats(),
    }
    if initial_eval is not None:
        metrics["initial_eval_loss"] = initial_eval
    if data.validation is not None and data.data_format == "preference":  # the DPO loss and rewards of the kept adapter
        final = trainer.evaluate()
        metrics.update({k: v for k, v in final.items() if k == "eval_loss" or k.startswith(("eval_rewards", "eval_logps"))})
    elif data.validation is not None:
        if state.best_metric is not None and state.best_global_step:  # the kept model was evaluated already
            metrics["eval_loss"] = state.best_metric
            metrics["eval_perplexity"] = math.exp(min(state.best_metric, 50))
        else:
            final = trainer.evaluate()
            metrics.update({k: final[k] for k in ("eval_loss", "eval_perplexity")})
    return metrics


def _manifest(recipe: Recipe, precision: Precision, data: PreparedData, result: TrainResult) -> dict[str, Any]:

    return {
        "recipe": recipe.name,
        "base_model": recipe.model.name_or_path,
        "base_model_path": resolve_model(recipe.model.name_or_path),
        "seed": recipe.training.seed,
        "data": {
            "path": recipe.data.path,
            "format": data.data_format,
            "train_fingerprint": data.train_stats.fingerprint,
            "validation_fingerprint": data.validation_stats.fingerprint if data.validation_stats else None,
            "train": data.train_stats.to_dict(),
            "validation": data.validation_stats.to_dict() if data.validation_stats else None,
        },
        "trainable_params": result.trainable_params,
        "all_params": result.all_params,
        "trainable_percent": round(result.trainable_percent, 4),
        "precision": {k: v for k, v in precision.__dict__.items() if k != "notes"},
        "world_size": world_size(),
        "resumed_from": result.resumed_from,
        "versions": package_versions(),
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
