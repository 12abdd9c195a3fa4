"""The layout of a run folder: where ``qlora-guide train`` writes each file, and where everything else finds it.

A run folder holds::

    RUN/
      recipe.yaml      the resolved recipe (what the run really used)
      manifest.json    package versions, seed, data fingerprint, parameter counts
      metrics.json     final figures
      metrics.jsonl    every logged step
      adapter/         the adapter and its tokenizer, renamed into place last: a run that has it is finished
      initial-adapter/ the adapters as PiSSA or OLoRA started them (those runs only): the final adapter is
                       saved as their difference, a LoRA of the original weights
      checkpoints/     checkpoint-N/ folders (complete ones carry checkpoint_complete.json)
      logs/            TensorBoard events

A merged model keeps its ``manifest.json`` and ``recipe.yaml`` in its own
folder, next to its weights, so :class:`RunFolder` describes it too.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

ADAPTER_DIR = "adapter"
INITIAL_ADAPTER_DIR = "initial-adapter"
CHECKPOINTS_DIR = "checkpoints"
LOGS_DIR = "logs"
RECIPE_FILE = "recipe.yaml"
MANIFEST_FILE = "manifest.json"
METRICS_FILE = "metrics.json"
METRICS_LOG = "metrics.jsonl"
CHECKPOINT_PREFIX = "checkpoint-"  # transformers' Trainer names its checkpoint folders checkpoint-<global step>
COMPLETE_MARKER = "checkpoint_complete.json"
RUN_FILES = (RECIPE_FILE, MANIFEST_FILE, METRICS_FILE, METRICS_LOG, ADAPTER_DIR, INITIAL_ADAPTER_DIR, CHECKPOINTS_DIR, LOGS_DIR)


def checkpoint_name(step: int) -> str:
    """The folder name of the checkpoint saved at ``step``: ``checkpoint-<step>``."""
    return f"{CHECKPOINT_PREFIX}{step}"


def checkpoint_step(path: str | os.PathLike) -> int | None:
    """The step of a ``checkpoint-<step>`` folder, or None for any other name."""
    name = Path(path).name
    number = name.removeprefix(CHECKPOINT_PREFIX)
    return int(number) if name.startswith(CHECKPOINT_PREFIX) and number.isdigit() else None


@dataclass(frozen=True)
class RunFolder:
    """The paths of one run folder (see the module docstring); nothing is read or created."""

    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root).expanduser())

    @classmethod
    def of(cls, path: str | os.PathLike) -> RunFolder:
        """The run folder that ``path`` (a run, its ``adapter/``, a merged model) belongs to.

        That is ``path`` itself when it holds a manifest or a recipe, else its
        parent when that does (``path`` is a run's ``adapter/``), else ``path``.
        """
        folder = Path(path).expanduser()
        for candidate in (folder, folder.parent):
            run = cls(candidate)
            if run.manifest.is_file() or run.recipe.is_file():
                return run
        return cls(folder)

    @property
    def adapter(self) -> Path:
        return self.root / ADAPTER_DIR

    @property
    def adapter_staging(self) -> Path:
        """Where the adapter is written before it is renamed to :attr:`adapter`."""
        return self.root / f".{ADAPTER_DIR}.tmp"

    @property
    def initial_adapter(self) -> Path:
        """The adapters before training, for initialisations that rewrite the base weights (PiSSA, OLoRA)."""
        return self.root / INITIAL_ADAPTER_DIR

    @property
    def checkpoints(self) -> Path:
        """The folder of the ``checkpoint-N`` folders (the Trainer's ``output_dir``)."""
        return self.root / CHECKPOINTS_DIR

    @property
    def logs(self) -> Path:
        return self.root / LOGS_DIR

    @property
    def recipe(self) -> Path:
        return self.root / RECIPE_FILE

    @property
    def manifest(self) -> Path:
        return self.root / MANIFEST_FILE

    @property
    def metrics(self) -> Path:
        return self.root / METRICS_FILE

    @property
    def metrics_log(self) -> Path:
        return self.root / METRICS_LOG

    def history(self) -> list[dict]:
        """Every record of the metrics log, in the order logged (empty when the run has none yet)."""
        if not self.metrics_log.is_file():
            return []
        return [json.loads(line) for line in self.metrics_log.read_text().splitlines() if line.strip()]

    @property
    def files(self) -> tuple[Path, ...]:
        """Every file and folder training writes (anything else in the folder is not the run's)."""
        return tuple(self.root / name for name in RUN_FILES)

    def holds_run(self) -> bool:
        """True when any of the run's files or folders exists."""
        return any(path.exists() for path in self.files)

    def checkpoint(self, step: int) -> Path:
        """The folder of the checkpoint saved at ``step``."""
        return self.checkpoints / checkpoint_name(step)

    def checkpoint_dirs(self) -> list[Path]:
        """The ``checkpoint-<step>`` folders, complete or not, oldest step first."""
        if not self.checkpoints.is_dir():
            return []
        found = [p for p in self.checkpoints.iterdir() if p.is_dir() and checkpoint_step(p) is not None]
        return sorted(found, key=checkpoint_step)
