"""Training on several processes: the ``accelerate launch`` command of a recipe, and running it.

Past one process the package uses accelerate's launcher, as every Trainer script does: each
process loads its own copy of the (4-bit) model, trains on its share of each global batch, and
DDP averages the adapters' gradients. ``qlora-guide train`` needs nothing else; this module
writes the command (:func:`launch_command`) and runs it on this machine (:func:`launch`).

On CPUs, accelerate's ``--cpu`` flag starts a single process unless MPI is installed;
``--multi_gpu`` starts its processes with torchrun instead, and they talk over gloo when no GPU
is there. So the same command trains on 2 CPU processes here and on 2 GPUs elsewhere.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from qlora_guide.config import Recipe, load_recipe
from qlora_guide.errors import QLoRAGuideError
from qlora_guide.runs import RunFolder
from qlora_guide.training.checkpoints import check_output_dir


@dataclass
class LaunchResult:
    """A run on several processes: the command that ran it, its folder, its figures and its wall time."""

    command: list[str]
    output_dir: Path
    num_processes: int
    metrics: dict[str, Any]
    seconds: float

    @property
    def adapter_dir(self) -> Path:
        return RunFolder(self.output_dir).adapter

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready values (for ``qlora-guide launch --json``)."""
        return {"command": self.command, "output_dir": str(self.output_dir), "adapter_dir": str(self.adapter_dir),
                "num_processes": self.num_processes, "metrics": self.metrics, "seconds": self.seconds}


def launch_command(recipe: str | os.PathLike, overrides: list[str] | None = None, output_dir: str | os.PathLike | None = None,
                   num_processes: int = 2, config_file: str | os.PathLike | None = None,
                   main_process_port: int | None = None) -> list[str]:
    """The ``accelerate launch`` command, as typed in a shell, that runs ``qlora-guide train`` on
    ``num_processes`` processes.

    Without ``config_file`` it is data parallel (DDP, ``--multi_gpu``); with one (the bundled FSDP
    config, a DeepSpeed one) the file decides how the model is spread.
    """
    if num_processes < 1:
        raise QLoRAGuideError(f"num_processes must be at least 1, not {num_processes}")
    cmd = ["accelerate", "launch", "--num_processes", str(num_processes)]
    if config_file is not None:
        cmd += ["--config_file", str(config_file)]
    elif num_processes > 1:
        cmd += ["--multi_gpu"]
    if main_process_port is not None:
        cmd += ["--main_process_port", str(main_process_port)]
    cmd += ["-m", "qlora_guide", "train", str(recipe)]
    for override in overrides or []:
        cmd += ["--set", override]
    if output_dir is not None:
        cmd += ["--output-dir", str(output_dir)]
    return cmd


def free_port() -> int:
    """A TCP port of 127.0.0.1 that nothing listens on now, for the processes' rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(recipe: Recipe | str | Path | dict, overrides: list[str] | None = None,
           output_dir: str | Path | None = None, num_processes: int = 2, config_file: str | None = None,
           overwrite: bool = False, timeout: float | None = None) -> LaunchResult:
    """Train ``recipe`` on ``num_processes`` processes of this machine with ``accelerate launch``.

    The recipe, its overrides and the output folder are checked here first, so a mistake is one
    line before any process starts. Each process gets its share of the CPU cores
    (``OMP_NUM_THREADS``); on GPUs, one GPU each. A failed run raises the error its first
    process printed.
    """
    loaded = load_recipe(recipe.to_dict() if isinstance(recipe, Recipe) else recipe, overrides)
    out = Path(output_dir or loaded.output.dir).expanduser()
    check_output_dir(out, resume=False, overwrite=overwrite or loaded.output.overwrite)
    threads = max(1, (os.cpu_count() or 1) // num_processes)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false"}
    with tempfile.TemporaryDirectory() as tmp:
        recipe_file = Path(tmp) / f"{loaded.name}.yaml"
        recipe_file.write_text(yaml.safe_dump(loaded.to_dict(), sort_keys=False))
        extra = ["--overwrite"] if overwrite else []
        # accelerate's launcher from this interpreter, whatever the PATH holds
        cmd = [sys.executable, "-m", "accelerate.commands.launch",
               *launch_command(recipe_file, None, out, num_processes, config_file, free_port())[2:], *extra]
        start = time.perf_counter()
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
        seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise QLoRAGuideError(f"accelerate launch failed ({num_processes} processes): {_first_error(proc.stderr)}")
    folder = RunFolder(out)
    return LaunchResult(command=cmd, output_dir=out, num_processes=num_processes,
                        metrics=json.loads(folder.metrics.read_text()), seconds=seconds)


def _first_error(stderr: str) -> str:
    """The one-line error a process printed (``qlora-guide train: error: ...``), else the last line of output."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    for line in lines:
        if ": error: " in line:
            return line.split(": error: ", 1)[1]
    return lines[-1] if lines else "no output"


def format_launch_result(result: LaunchResult) -> str:
    """A few lines: the command, the processes, the steps and the final losses."""
    m = result.metrics
    lines = [
        f"processes:  {result.num_processes}",
        f"adapter:    {result.adapter_dir}",
        f"steps:      {m.get('global_step')} in {result.seconds:.0f} s (processes started, models loaded, trained)",
        f"train loss: {m.get('train_loss', float('nan')):.4f}",
    ]
    if "eval_loss" in m:
        lines.append(f"eval loss:  {m['eval_loss']:.4f}")
    return "\n".join(lines)
