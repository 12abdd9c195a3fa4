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
resumable checkpoints. The output folder holds::

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
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import json
import logging
import math
import os
import platform
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qlora_guide import progress
from qlora_guide.config import LoraConfig, Recipe, copy_recipe, load_recipe  # noqa: F401  (copy_recipe: for the CLI)
from qlora_guide.data import PreparedData, TokenStats, load_examples, prepare_data
from qlora_guide.errors import QLoRAGuideError
from qlora_guide.outputs import sha256_file, write_json_atomic, write_text_atomic
from qlora_guide.precision import Precision, resolve, use_differentiable_4bit_kernel

log = logging.getLogger(__name__)

ADAPTER_DIR = "adapter"
CHECKPOINTS_DIR = "checkpoints"
LOGS_DIR = "logs"
COMPLETE_MARKER = "checkpoint_complete.json"
RUN_FILES = ("recipe.yaml", "manifest.json", "metrics.json", "metrics.jsonl", ADAPTER_DIR, CHECKPOINTS_DIR, LOGS_DIR)
PACKAGES = ("torch", "transformers", "peft", "bitsandbytes", "accelerate", "datasets", "safetensors", "qlora-guide")


# ---------------------------------------------------------------- result


@dataclass
class TrainResult:
    """What a run produced: where its files are and its figures."""

    output_dir: Path
    adapter_dir: Path
    metrics: dict[str, Any]
    trainable_params: int
    all_params: int
    train_stats: TokenStats
    validation_stats: TokenStats | None = None
    resumed_from: str | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def trainable_percent(self) -> float:
        return 100 * self.trainable_params / self.all_params if self.all_params else 0.0

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready values (for ``qlora-guide train --json``)."""
        return {
            "output_dir": str(self.output_dir),
            "adapter_dir": str(self.adapter_dir),
            "metrics": self.metrics,
            "trainable_params": self.trainable_params,
            "all_params": self.all_params,
            "trainable_percent": self.trainable_percent,
            "train_stats": self.train_stats.to_dict(),
            "validation_stats": self.validation_stats.to_dict() if self.validation_stats else None,
            "resumed_from": self.resumed_from,
            "notes": self.notes,
        }


def format_train_result(result: TrainResult) -> str:
    """A few lines summarising a run, for the CLI and the docs pages."""
    m = result.metrics
    lines = [
        f"adapter:          {result.adapter_dir}",
        f"trainable params: {result.trainable_params:,} of {result.all_params:,} ({result.trainable_percent:.2f}%)",
        f"train data:       {result.train_stats.summary()}",
        f"steps:            {m.get('global_step')} in {m.get('train_runtime', 0):.0f} s, {m.get('train_tokens_per_second', 0):.0f} tokens/s",
    ]
    if "initial_eval_loss" in m and "eval_loss" in m:
        lines.append(f"validation loss:  {m['initial_eval_loss']:.4f} -> {m['eval_loss']:.4f} (perplexity {m['eval_perplexity']:.2f})")
    elif "eval_loss" in m:
        lines.append(f"validation loss:  {m['eval_loss']:.4f} (perplexity {m['eval_perplexity']:.2f})")
    if m.get("stopped_early"):
        lines.append("stopped early:    the validation loss stopped improving")
    if result.resumed_from:
        lines.append(f"resumed from:     {result.resumed_from}")
    lines += [f"note:             {n}" for n in result.notes]
    return "\n".join(lines)


# ---------------------------------------------------------------- precision and devices


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
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def memory_stats() -> dict[str, float]:
    """Peak GPU memory (allocated and reserved) on CUDA, the process' resident memory on the CPU, in MiB."""
    import torch

    if torch.cuda.is_available():
        return {
            "mem_cuda_peak_allocated_mb": torch.cuda.max_memory_allocated() / 2**20,
            "mem_cuda_peak_reserved_mb": torch.cuda.max_memory_reserved() / 2**20,
        }
    import psutil

    return {"mem_rss_mb": psutil.Process().memory_info().rss / 2**20}


# ---------------------------------------------------------------- model


def check_target_modules(model: Any, lora: LoraConfig) -> None:
    """Fail early, naming the module, when a LoRA target is not a module of the model."""
    if isinstance(lora.target_modules, str):
        return
    names = [name for name, _ in model.named_modules()]
    for target in lora.target_modules:
        if not any(name == target or name.endswith("." + target) for name in names):
            linear = sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules() if "Linear" in type(m).__name__} - {"lm_head"})
            raise QLoRAGuideError(
                f"lora.target_modules: '{target}' is not a module of {model.config.model_type} (its linear layers: {', '.join(linear)}; or use all-linear)"
            )


def build_model(recipe: Recipe, precision: Precision) -> Any:
    """The base model (4-bit when the recipe quantizes) with trainable LoRA adapters."""
    import peft
    import transformers

    from qlora_guide.models import load_model

    quantization = recipe.quantization
    if quantization is not None and quantization.bnb_4bit_compute_dtype != precision.compute_dtype:
        quantization = dataclasses.replace(quantization, bnb_4bit_compute_dtype=precision.compute_dtype)
    dtype = precision.model_dtype
    if fsdp_enabled() and quantization is not None:
        if quantization.bnb_4bit_quant_storage != dtype:
            raise QLoRAGuideError(
                f"FSDP shards only one dtype: set quantization.bnb_4bit_quant_storage={dtype} (now {quantization.bnb_4bit_quant_storage})"
            )
    model = load_model(
        recipe.model.name_or_path,
        quantization=quantization,
        dtype=dtype,
        trust_remote_code=recipe.model.trust_remote_code,
        attn_implementation=recipe.model.attn_implementation,
    )
    model.config.use_cache = False  # a KV cache is useless in training and disables packed attention masks
    use_differentiable_4bit_kernel(model)
    check_target_modules(model, recipe.lora)
    checkpointing = recipe.training.gradient_checkpointing
    ckpt_kwargs = {"use_reentrant": False}
    if quantization is not None and not fsdp_enabled():
        model = peft.prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=checkpointing, gradient_checkpointing_kwargs=ckpt_kwargs
        )
    elif checkpointing:  # FSDP keeps one dtype, so the fp32 up-casting of prepare_model_for_kbit_training is skipped
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=ckpt_kwargs)
        model.enable_input_require_grads()
    transformers.set_seed(recipe.training.seed)  # the adapters' initialisation
    try:
        model = peft.get_peft_model(model, recipe.lora.to_peft())
    except ValueError as err:
        raise QLoRAGuideError(f"lora: {str(err).splitlines()[0]}") from None
    return model


def trainable_parameters(model: Any) -> tuple[int, int]:
    """(trainable, all) parameter counts; a 4-bit weight counts as its number of values, not bytes."""
    return tuple(model.get_nb_trainable_parameters())  # type: ignore[return-value]


# ---------------------------------------------------------------- output folder and checkpoints


def holds_run(folder: Path) -> bool:
    return any((folder / name).exists() for name in RUN_FILES)


def check_output_dir(folder: Path, resume: bool, overwrite: bool) -> None:
    """Refuse a folder that already holds something, unless resuming or overwriting a run."""
    if resume and overwrite:
        raise QLoRAGuideError("choose one of --resume and --overwrite")
    if folder.exists() and not folder.is_dir():
        raise QLoRAGuideError(f"--output {folder} is a file, not a folder: choose another path")
    if resume:
        if not (folder / "recipe.yaml").is_file():
            raise QLoRAGuideError(f"--resume: {folder} holds no run to resume")
        if (folder / ADAPTER_DIR).exists():
            raise QLoRAGuideError(f"--resume: the run in {folder} is already finished (use --overwrite to train again)")
        return
    if not folder.exists() or not any(folder.iterdir()):
        return
    if not holds_run(folder):
        raise QLoRAGuideError(f"output folder {folder} is not empty and holds no qlora-guide run: choose another --output")
    if not overwrite:
        raise QLoRAGuideError(f"output folder {folder} already holds a run: pass --resume to continue it or --overwrite to replace it")


def clear_run(folder: Path) -> None:
    """Delete a previous run's files (only those: anything else in the folder stays)."""
    for name in (*RUN_FILES, f".{ADAPTER_DIR}.tmp"):
        path = folder / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def check_same_recipe(saved: Path, recipe: Recipe) -> None:
    """--resume must continue the run it names: the recipe may differ only in its output section."""
    import yaml

    before = yaml.safe_load(saved.read_text(encoding="utf-8"))
    now = recipe.to_dict()
    for section in now:
        if section == "output":
            continue
        old, new = before.get(section), now[section]
        if old != new:
            keys = [k for k in (new or {}) if (old or {}).get(k) != (new or {}).get(k)] if isinstance(new, dict) else []
            where = f"{section}.{keys[0]}" if keys else section
            raise QLoRAGuideError(f"--resume: the recipe differs from the one the run started with ({where}); resume with the same recipe")


def _fsync_tree(folder: Path) -> dict[str, int]:
    sizes = {}
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
            sizes[str(path.relative_to(folder))] = path.stat().st_size
    return sizes


def mark_complete(checkpoint: Path, step: int) -> None:
    """Write the marker that says a checkpoint is whole: each file's size and SHA-256, written last and atomically."""
    sizes = _fsync_tree(checkpoint)
    files = {name: {"size": size, "sha256": sha256_file(checkpoint / name)} for name, size in sizes.items()}
    write_json_atomic(checkpoint / COMPLETE_MARKER, {"step": step, "files": files})


def _recorded(entry: Any) -> tuple[int, str | None]:
    """(size, sha256) of a marker entry; markers written before digests were recorded hold the size alone."""
    return (entry["size"], entry.get("sha256")) if isinstance(entry, dict) else (int(entry), None)


def is_complete(checkpoint: Path) -> bool:
    """A checkpoint is complete when its marker exists and every file it lists has the recorded size."""
    try:
        marker = json.loads((checkpoint / COMPLETE_MARKER).read_text())
        files = {name: _recorded(entry) for name, entry in marker["files"].items()}
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return all((checkpoint / name).is_file() and (checkpoint / name).stat().st_size == size for name, (size, _) in files.items())


def verify_checkpoint(checkpoint: Path) -> None:
    """Compare every file of a complete checkpoint with its recorded SHA-256; name the first that differs.

    A file damaged in place keeps its size, so only its content tells; resuming
    from it would fail later with a misleading error (a NaN loss, a shape error).
    """
    marker = json.loads((checkpoint / COMPLETE_MARKER).read_text())
    for name, entry in sorted(marker["files"].items()):
        _, digest = _recorded(entry)
        if digest is not None and sha256_file(checkpoint / name) != digest:
            raise QLoRAGuideError(
                f"--resume: {checkpoint / name} is damaged (its content differs from what was saved): "
                f"delete {checkpoint} to resume from the previous checkpoint, or train again with --overwrite"
            )


def latest_checkpoint(folder: Path, delete_incomplete: bool = False) -> Path | None:
    """The newest complete ``checkpoint-N`` under ``folder/checkpoints`` (incomplete ones are skipped or deleted)."""
    root = folder / CHECKPOINTS_DIR
    found = sorted(root.glob("checkpoint-*"), key=lambda p: int(p.name.rsplit("-", 1)[-1]) if p.name.rsplit("-", 1)[-1].isdigit() else -1)
    complete = [p for p in found if is_complete(p)]
    if delete_incomplete:
        for p in found:
            if p not in complete:
                log.warning("deleting incomplete checkpoint %s (the run was interrupted while writing it)", p)
                shutil.rmtree(p, ignore_errors=True)
    return complete[-1] if complete else None


def trim_history(path: Path, step: int) -> None:
    """Drop history lines logged after ``step`` (a killed run logged steps that its resume will redo)."""
    if not path.exists():
        return
    lines = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line).get("step", 0) <= step]
    write_text_atomic(path, "".join(line + "\n" for line in lines))


# ---------------------------------------------------------------- Trainer pieces


def validation_loss(model: Any, batches: Any, autocast: Any = contextlib.nullcontext) -> tuple[float, int]:
    """Token-weighted loss over batches: (mean loss per answer token, number of answer tokens).

    transformers' own evaluation averages per-batch means, which weights a short
    batch like a long one; this sums over tokens, so packed and unpacked data
    give the same figure.
    """
    import torch

    total, count = 0.0, 0
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for batch in batches:
            n = int((batch["labels"][:, 1:] != -100).sum())
            if n == 0:
                continue
            with autocast():
                loss = model(**batch).loss
            total += float(loss) * n
            count += n
    model.train(was_training)
    return (total / count if count else float("nan")), count


class AnswerOnlyLogits:
    """Compute the output layer only at the positions that have a label.

    With the loss on answers only, the logits of the prompt tokens are thrown
    away: the model is asked for the last position's logits only
    (``logits_to_keep=1``), the final hidden states are caught on their way out
    of the decoder, and the output layer runs on the labelled positions alone.
    On the demo recipe, where about half the tokens are prompt, that halves the
    work of the output layer. The first batch is checked against the model's
    own loss; a model that transforms its logits (soft-capping, scaling) fails
    the check and keeps the ordinary path.
    """

    def __init__(self, model: Any) -> None:
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        self.decoder, self.head = base.get_decoder(), base.get_output_embeddings()
        self.checked: bool | None = None  # None: not checked yet

    def loss(self, model: Any, inputs: dict[str, Any], labels: Any, num_items: Any = None) -> Any:
        import torch.nn.functional as F

        caught: list[Any] = []
        handle = self.decoder.register_forward_hook(lambda _m, _a, out: caught.append(out.last_hidden_state))
        try:
            model(**inputs, logits_to_keep=1)
        finally:
            handle.remove()
        target = labels[:, 1:]
        keep = target != -100
        logits = self.head(caught[-1][:, :-1][keep]).float()
        total = F.cross_entropy(logits, target[keep], reduction="sum")
        return total / (num_items if num_items is not None else keep.sum().clamp(min=1))

    def check(self, model: Any, inputs: dict[str, Any], labels: Any, autocast: Any) -> bool:
        """Compare with the model's own loss once (eval mode: no dropout); keep the result."""
        import torch

        if self.checked is None:
            was_training = model.training
            model.eval()
            try:
                with torch.no_grad(), autocast():
                    ours = float(self.loss(model, inputs, labels))
                    reference = float(model(**inputs, labels=labels).loss)
                self.checked = abs(ours - reference) <= 1e-3 * max(1.0, abs(reference))
                if not self.checked:
                    log.info("the model's loss is not the plain cross-entropy of its output layer: computing all logits")
            except (AttributeError, TypeError) as err:  # no get_decoder, no logits_to_keep...
                log.info("answer-only logits unavailable (%s): computing all logits", err)
                self.checked = False
            model.train(was_training)
        return self.checked


@dataclass
class RunState:
    """What a resumed run needs besides the Trainer's own state to report the whole run, not its last part.

    transformers restores the optimizer, scheduler, RNG and step counters from a
    checkpoint, but restarts its training-loss sum, and knows nothing of the
    collator's token counts or the time spent before the interruption. Each
    process saves these in every checkpoint (``run_state-rank<N>.json``) and
    reloads them on resume, so a resumed run's ``metrics.json`` equals an
    uninterrupted one's.
    """

    loss_sum: float = 0.0  # sum of the per-batch training losses, as the Trainer adds them up
    real_tokens: int = 0  # tokens of the batches trained on, padding apart
    padded_tokens: int = 0
    runtime: float = 0.0  # seconds of training before this process started
    started: float = field(default_factory=time.time)

    def add(self, loss: float, real: int, padding: int) -> None:
        """Count one trained batch."""
        self.loss_sum += loss
        self.real_tokens += real
        self.padded_tokens += padding

    @staticmethod
    def path(checkpoint: Path, rank: int) -> Path:
        return checkpoint / f"run_state-rank{rank}.json"

    def save(self, checkpoint: Path, rank: int) -> None:
        state = {"loss_sum": self.loss_sum, "real_tokens": self.real_tokens, "padded_tokens": self.padded_tokens,
                 "runtime": self.runtime + time.time() - self.started}
        write_json_atomic(self.path(checkpoint, rank), state)

    @classmethod
    def load(cls, checkpoint: Path | None, rank: int) -> RunState:
        """The state saved in ``checkpoint`` (a fresh one without it)."""
        if checkpoint is None or not cls.path(checkpoint, rank).is_file():
            return cls()
        saved = json.loads(cls.path(checkpoint, rank).read_text())
        return cls(**{key: saved[key] for key in ("loss_sum", "real_tokens", "padded_tokens", "runtime")})


def initial_eval_loss(history: Path) -> float | None:
    """The validation loss before the first step, as the run's ``metrics.jsonl`` recorded it."""
    if not history.is_file():
        return None
    for line in history.read_text().splitlines():
        record = json.loads(line) if line.strip() else {}
        if record.get("step") == 0 and "eval_loss" in record:
            return record["eval_loss"]
    return None


def _trainer_class() -> type:
    """transformers' Trainer with answer-only logits, a token-weighted evaluation, a memory log and a NaN/inf guard."""
    import torch
    from transformers import Trainer
    from transformers.trainer_utils import EvalLoopOutput

    class QLoRATrainer(Trainer):
        answer_only: AnswerOnlyLogits | None = None
        run_state: RunState

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            head = self.answer_only
            if head is None or return_outputs or "labels" not in inputs or not model.training:
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            labels = inputs["labels"]
            inputs = {k: v for k, v in inputs.items() if k != "labels"}
            if not head.check(model, inputs, labels, self.autocast_smart_context_manager):
                return super().compute_loss(model, {**inputs, "labels": labels}, return_outputs, num_items_in_batch)
            loss = head.loss(model, inputs, labels, num_items_in_batch)
            if self.args.average_tokens_across_devices and num_items_in_batch is not None:
                loss = loss * self.accelerator.num_processes  # as Trainer does: DDP averages the gradients
            return loss

        def training_step(self, model, inputs, num_items_in_batch=None):
            loss = super().training_step(model, inputs, num_items_in_batch)
            if not torch.isfinite(loss).all():
                raise QLoRAGuideError(
                    f"training stopped at step {self.state.global_step + 1}: the loss became {float(loss.float().mean())} "
                    "(lower training.learning_rate or training.max_grad_norm, or set training.bf16=false)"
                )
            real, padding = self.data_collator.take()
            self.run_state.add(float(loss.float().mean()), real, padding)
            return loss

        def _save_checkpoint(self, model, trial):
            super()._save_checkpoint(model, trial)  # the completion marker, written after this, covers the state file
            folder = Path(self._get_output_dir(trial)) / f"checkpoint-{self.state.global_step}"
            self.run_state.save(folder, self.args.process_index)

        def evaluation_loop(self, dataloader, description, prediction_loss_only=None, ignore_keys=None, metric_key_prefix="eval"):
            batches = (self._prepare_inputs(b) for b in dataloader)
            pending = len(self.data_collator.batch_counts)
            loss, tokens = validation_loss(self.model, batches, self.autocast_smart_context_manager)
            while len(self.data_collator.batch_counts) > pending:  # validation batches are not training tokens
                self.data_collator.batch_counts.pop()
            totals = torch.tensor([loss * tokens if tokens else 0.0, float(tokens)], dtype=torch.float64, device=self.args.device)
            if self.args.world_size > 1:
                totals = self.accelerator.reduce(totals, reduction="sum")
            loss = float(totals[0] / totals[1]) if totals[1] > 0 else float("nan")
            metrics = {
                f"{metric_key_prefix}_loss": loss,
                f"{metric_key_prefix}_perplexity": math.exp(min(loss, 50)),
                f"{metric_key_prefix}_tokens": int(totals[1]),
            }
            return EvalLoopOutput(predictions=None, label_ids=None, metrics=metrics, num_samples=len(dataloader.dataset))

        def log(self, logs, start_time=None):
            logs.update(memory_stats())
            logs["train_tokens_seen"] = self.run_state.real_tokens
            super().log(logs, start_time)

    return QLoRATrainer


def _callbacks(output_dir: Path) -> list[Any]:
    """Checkpoint completion markers and the metrics.jsonl history."""
    from transformers import TrainerCallback

    class CheckpointMarker(TrainerCallback):
        """After every save: wait for all processes, then mark the checkpoint complete."""

        def on_save(self, args, state, control, **kwargs):
            if args.world_size > 1:
                import torch.distributed as dist

                dist.barrier()
            if state.is_world_process_zero:
                checkpoint = Path(args.output_dir) / f"checkpoint-{state.global_step}"
                if checkpoint.is_dir():
                    mark_complete(checkpoint, state.global_step)

    class MetricsHistory(TrainerCallback):
        """Append every logged dict to metrics.jsonl, one JSON object per line."""

        def on_log(self, args, state, control, logs=None, **kwargs):
            if state.is_world_process_zero and logs:
                record = {"step": state.global_step, "epoch": state.epoch, "time": time.time(), **logs}
                with open(output_dir / "metrics.jsonl", "a") as f:
                    f.write(json.dumps(record) + "\n")

    return [CheckpointMarker(), MetricsHistory()]


def training_arguments(recipe: Recipe, precision: Precision, output_dir: Path, has_validation: bool) -> Any:
    """TrainingArguments from the recipe's training section (same names) and the resolved precision."""
    from transformers import TrainingArguments

    t = recipe.training
    eval_steps = t.eval_steps or t.save_steps
    if has_validation and t.save_steps % eval_steps:
        raise QLoRAGuideError(
            f"training.save_steps ({t.save_steps}) must be a multiple of training.eval_steps ({eval_steps}) so that the best checkpoint is kept"
        )
    if t.early_stopping_patience is not None and not has_validation:
        raise QLoRAGuideError("training.early_stopping_patience needs a validation split (data.validation_split is null)")
    report_to = [r for r in t.report_to if r != "none"]
    return TrainingArguments(
        output_dir=str(output_dir / CHECKPOINTS_DIR),
        num_train_epochs=t.num_train_epochs,
        max_steps=t.max_steps,
        per_device_train_batch_size=t.per_device_train_batch_size,
        per_device_eval_batch_size=t.per_device_train_batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        learning_rate=t.learning_rate,
        lr_scheduler_type=t.lr_scheduler_type,
        warmup_steps=t.warmup_ratio,  # a float in [0, 1) is a ratio of the total steps
        max_grad_norm=t.max_grad_norm,
        weight_decay=t.weight_decay,
        optim=precision.optim,
        bf16=precision.bf16,
        fp16=precision.fp16,
        activation_checkpointing=t.gradient_checkpointing,
        activation_checkpointing_kwargs={"use_reentrant": False},
        auto_find_batch_size=t.auto_find_batch_size,
        logging_steps=t.logging_steps,
        logging_first_step=True,
        save_strategy="steps",
        save_steps=t.save_steps,
        save_total_limit=t.save_total_limit,
        eval_strategy="steps" if has_validation else "no",
        eval_steps=eval_steps if has_validation else None,
        load_best_model_at_end=has_validation,
        metric_for_best_model="eval_loss" if has_validation else None,
        greater_is_better=False if has_validation else None,
        seed=t.seed,
        report_to=report_to,
        remove_unused_columns=False,  # the collator takes what it needs
        ddp_find_unused_parameters=False,  # every adapter is used at every step
        dataloader_num_workers=0,
        use_cpu=precision.device == "cpu",
        disable_tqdm=not progress.enabled(),  # the Trainer's bar on a terminal only (qlora_guide.progress)
    )


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


# ---------------------------------------------------------------- manifest


def package_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    versions = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def save_adapter(trainer: Any, tokenizer: Any, output_dir: Path, files: dict[str, dict[str, Any]] | None = None) -> Path:
    """Write the adapter and tokenizer into a temporary folder, then ``files`` (metrics, manifest), then rename
    the folder into place: a run whose ``adapter/`` exists is complete, whenever it was killed."""
    final, tmp = output_dir / ADAPTER_DIR, output_dir / f".{ADAPTER_DIR}.tmp"
    if trainer.is_world_process_zero() and tmp.exists():
        shutil.rmtree(tmp)
    if getattr(trainer, "is_fsdp_enabled", False):
        trainer.accelerator.state.fsdp_plugin.set_state_dict_type("FULL_STATE_DICT")
    trainer.save_model(str(tmp))  # gathers the weights under FSDP; writes on the main process only
    if trainer.is_world_process_zero():
        tokenizer.save_pretrained(str(tmp))
        (tmp / "training_args.bin").unlink(missing_ok=True)  # a pickle: not part of the adapter
        _fsync_tree(tmp)
        for name, content in (files or {}).items():
            write_json_atomic(output_dir / name, content)
        os.replace(tmp, final)
    trainer.accelerator.wait_for_everyone()
    return final


# ---------------------------------------------------------------- train


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
    overwrite = overwrite or recipe.output.overwrite
    check_output_dir(out, resume, overwrite)
    if resume:
        check_same_recipe(out / "recipe.yaml", recipe)
        newest = latest_checkpoint(out)
        if newest is not None:
            verify_checkpoint(newest)  # before any model is loaded

    from qlora_guide.models import load_tokenizer

    precision = resolve_precision(recipe)
    for note in precision.notes:
        log.warning(note)
    examples = load_examples(recipe.data)  # a missing or malformed data file is found before any model loads
    tokenizer = load_tokenizer(recipe.model.name_or_path, trust_remote_code=recipe.model.trust_remote_code)
    data = prepare_data(recipe.data, tokenizer, recipe.training.per_device_train_batch_size, splits=examples)
    model = build_model(recipe, precision)
    trainable, total = trainable_parameters(model)
    log.info("trainable params: %s of %s (%.2f%%)", f"{trainable:,}", f"{total:,}", 100 * trainable / total)
    free_memory()
    args = training_arguments(recipe, precision, out, data.validation is not None)
    _ = args.device  # sets the devices up, and under torchrun/accelerate the process group

    checkpoint = None
    if is_main_process():
        if overwrite and holds_run(out):
            clear_run(out)
        out.mkdir(parents=True, exist_ok=True)
        if resume:
            checkpoint = latest_checkpoint(out, delete_incomplete=True)
            trim_history(out / "metrics.jsonl", int(checkpoint.name.rsplit("-", 1)[-1]) if checkpoint else 0)
        else:
            write_text_atomic(out / "recipe.yaml", recipe.to_yaml())
    _barrier()
    if resume and not is_main_process():
        checkpoint = latest_checkpoint(out)
    if resume and checkpoint is None:
        log.warning("--resume: %s has no complete checkpoint yet: starting from step 0", out)

    trainer = _make_trainer(recipe, model, tokenizer, data, args, out)
    trainer.run_state = RunState.load(checkpoint, args.process_index)
    initial_eval = None
    if data.validation is not None:
        initial_eval = trainer.evaluate()["eval_loss"] if checkpoint is None else initial_eval_loss(out / "metrics.jsonl")
    output = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    free_memory()
    metrics = _final_metrics(trainer, output, data, initial_eval)
    result = TrainResult(out, out / ADAPTER_DIR, metrics, trainable, total, data.train_stats, data.validation_stats,
                         str(checkpoint) if checkpoint else None, precision.notes)
    files = {"metrics.json": metrics, "manifest.json": _manifest(recipe, precision, data, result)}
    save_adapter(trainer, tokenizer, out, files)
    del trainer, model, output
    free_memory()  # the Trainer holds reference cycles: give the model's memory back before returning
    return result


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _make_trainer(recipe: Recipe, model: Any, tokenizer: Any, data: PreparedData, args: Any, out: Path) -> Any:
    from transformers import EarlyStoppingCallback

    callbacks = _callbacks(out)
    if recipe.training.early_stopping_patience is not None:
        callbacks.append(EarlyStoppingCallback(early_stopping_patience=recipe.training.early_stopping_patience))
    with _env(TENSORBOARD_LOGGING_DIR=str(out / LOGS_DIR)):  # read by the TensorBoard callback when it is built
        trainer = _trainer_class()(
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
        from peft.utils.other import fsdp_auto_wrap_policy

        # wrap the adapters apart from the frozen 4-bit layers: FSDP flattens tensors of one requires_grad only
        trainer.accelerator.state.fsdp_plugin.auto_wrap_policy = fsdp_auto_wrap_policy(trainer.model)
    return trainer


def _final_metrics(trainer: Any, output: Any, data: PreparedData, initial_eval: float | None) -> dict[str, Any]:
    """Final figures of the whole run (a resumed one included): training loss and speed, and the validation
    loss of the kept (best) adapter."""
    import torch

    state, run = trainer.state, trainer.run_state
    tokens = torch.tensor([run.real_tokens, run.padded_tokens], device=trainer.args.device)
    if trainer.args.world_size > 1:  # every process counted its own batches
        tokens = trainer.accelerator.reduce(tokens, reduction="sum")
    real, padding = (int(t) for t in tokens.tolist())
    runtime = run.runtime + output.metrics.get("train_runtime", time.time() - run.started)
    metrics: dict[str, Any] = {
        "global_step": state.global_step,
        "epoch": state.epoch,
        "train_loss": run.loss_sum / max(state.global_step, 1),
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
    if data.validation is not None:
        if state.best_metric is not None and state.best_global_step:  # the kept model was evaluated already
            metrics["eval_loss"] = state.best_metric
            metrics["eval_perplexity"] = math.exp(min(state.best_metric, 50))
        else:
            final = trainer.evaluate()
            metrics.update({k: final[k] for k in ("eval_loss", "eval_perplexity")})
    return metrics


def _manifest(recipe: Recipe, precision: Precision, data: PreparedData, result: TrainResult) -> dict[str, Any]:
    from qlora_guide.models import resolve_model

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
