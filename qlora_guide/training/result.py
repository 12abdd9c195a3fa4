"""What ``train`` returns: where the run's files are, its figures, and their text table."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qlora_guide.data import TokenStats


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
    if "eval_loss" in m:
        start = f"{m['initial_eval_loss']:.4f} -> " if "initial_eval_loss" in m else ""
        if "eval_perplexity" in m:
            end = f" (perplexity {m['eval_perplexity']:.2f})"
        elif "eval_rewards/accuracies" in m:  # a DPO run: the loss is DPO's, with TRL's reward figures
            end = f" (reward accuracy {m['eval_rewards/accuracies']:.2f}, margin {m['eval_rewards/margins']:.3f})"
        else:
            end = ""
        lines.append(f"validation loss:  {start}{m['eval_loss']:.4f}{end}")
    if m.get("stopped_early"):
        lines.append("stopped early:    the validation loss stopped improving")
    if result.resumed_from:
        lines.append(f"resumed from:     {result.resumed_from}")
    lines += [f"note:             {n}" for n in result.notes]
    return "\n".join(lines)
