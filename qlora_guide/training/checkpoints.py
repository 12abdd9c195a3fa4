"""The run folder before and after a run: refusing to damage one, complete checkpoints, resuming exactly."""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from qlora_guide.config import Recipe, load_recipe
from qlora_guide.errors import QLoRAGuideError
from qlora_guide.outputs import sha256_file, write_json_atomic, write_text_atomic
from qlora_guide.runs import COMPLETE_MARKER, RunFolder

log = logging.getLogger(__name__)


def holds_run(folder: Path) -> bool:
    return RunFolder(folder).holds_run()


def check_output_dir(folder: Path, resume: bool, overwrite: bool) -> None:
    """Refuse a folder that already holds something, unless resuming or overwriting a run."""
    if resume and overwrite:
        raise QLoRAGuideError("choose one of --resume and --overwrite")
    if folder.exists() and not folder.is_dir():
        raise QLoRAGuideError(f"--output {folder} is a file, not a folder: choose another path")
    if resume:
        if not RunFolder(folder).recipe.is_file():
            raise QLoRAGuideError(f"--resume: {folder} holds no run to resume")
        if RunFolder(folder).adapter.exists():
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
    run = RunFolder(folder)
    for path in (*run.files, run.adapter_staging):
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def check_same_recipe(saved: Path, recipe: Recipe) -> None:
    """--resume must continue the run it names: the recipe may differ only in its output section.

    The saved recipe is read with today's defaults, so a setting added to the
    recipe format since the run started does not count as a difference.
    """
    try:
        before = load_recipe(saved).to_dict()
    except QLoRAGuideError:
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
    """A checkpoint is complete when its marker exists: :func:`mark_complete` writes it last, once every file is.

    A complete checkpoint whose files changed afterwards is not incomplete but damaged: :func:`verify_checkpoint`
    names the file, and nothing deletes it.
    """
    try:
        marker = json.loads((checkpoint / COMPLETE_MARKER).read_text())
        return isinstance(marker["files"], dict)
    except (OSError, ValueError, KeyError, TypeError):
        return False


def verify_checkpoint(checkpoint: Path) -> None:
    """Compare every file of a complete checkpoint with its recorded size and SHA-256; name the first that differs.

    Resuming from a file changed since it was saved would fail later with a misleading error (a NaN loss, a
    shape error), or, if it were taken for an interrupted save, throw the run's progress away.
    """
    marker = json.loads((checkpoint / COMPLETE_MARKER).read_text())
    for name, entry in sorted(marker["files"].items()):
        size, digest = _recorded(entry)
        path = checkpoint / name
        problem = ("is missing" if not path.is_file() else
                   f"has {path.stat().st_size} bytes instead of the {size} saved" if path.stat().st_size != size else
                   "is damaged (its content differs from what was saved)" if digest is not None and sha256_file(path) != digest
                   else None)
        if problem:
            raise QLoRAGuideError(
                f"--resume: {path} {problem}: "
                f"delete {checkpoint} to resume from the previous checkpoint, or train again with --overwrite"
            )


def latest_checkpoint(folder: Path, delete_incomplete: bool = False) -> Path | None:
    """The newest complete ``checkpoint-N`` under ``folder/checkpoints`` (incomplete ones are skipped or deleted)."""
    found = RunFolder(folder).checkpoint_dirs()
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


def initial_eval_loss(run: RunFolder) -> float | None:
    """The validation loss before the first step, as the run's ``metrics.jsonl`` recorded it."""
    return next((r["eval_loss"] for r in run.history() if r.get("step") == 0 and "eval_loss" in r), None)


def save_adapter(trainer: Any, tokenizer: Any, output_dir: Path, files: dict[str, dict[str, Any]] | None = None) -> Path:
    """Write the adapter and tokenizer into a temporary folder, then ``files`` (metrics, manifest), then rename
    the folder into place: a run whose ``adapter/`` exists is complete, whenever it was killed.

    A run that started from PiSSA or OLoRA (it has ``initial-adapter/``) is saved as the difference from that
    start, which peft writes as a plain LoRA of the original weights (rank 2 r): it loads, merges and serves
    on the unchanged base like any other adapter.
    """
    run = RunFolder(output_dir)
    final, tmp = run.adapter, run.adapter_staging
    if trainer.is_world_process_zero() and tmp.exists():
        shutil.rmtree(tmp)
    if getattr(trainer, "is_fsdp_enabled", False):
        trainer.accelerator.state.fsdp_plugin.set_state_dict_type("FULL_STATE_DICT")
    if run.initial_adapter.is_dir():
        if trainer.is_world_process_zero():
            trainer.model.save_pretrained(str(tmp), path_initial_model_for_weight_conversion=str(run.initial_adapter))
    else:
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
