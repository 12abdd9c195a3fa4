"""Figures of the guide's pages: each function takes what a package function returns and gives a Figure.

matplotlib is imported inside each function, so importing this module is
cheap and the package does not depend on matplotlib unless you plot. The
functions draw; they never compute the figures they show. Each takes ``lang``
("en" or "fr"): titles, axes, legends and numbers are then in that language,
from :mod:`qlora_guide.i18n`.
"""

from __future__ import annotations

from typing import Any

from qlora_guide.i18n import format_number, localise_numbers, translate, translator


def _localise_ticks(fig: Any, lang: str) -> None:
    """Write the numbers of every axis's tick labels in ``lang``'s conventions (decimal comma in French)."""
    from matplotlib.ticker import Formatter

    class Localised(Formatter):
        """Another formatter's tick labels, with their numbers localised."""

        def __init__(self, inner: Formatter):
            self.inner = inner

        def set_axis(self, axis: Any) -> None:
            super().set_axis(axis)
            self.inner.set_axis(axis)

        def set_locs(self, locs: Any) -> None:
            self.inner.set_locs(locs)

        def __call__(self, x: float, pos: int | None = None) -> str:
            return localise_numbers(self.inner(x, pos), lang)

        def format_ticks(self, values: Any) -> list[str]:
            return [localise_numbers(v, lang) for v in self.inner.format_ticks(values)]

        def get_offset(self) -> str:
            return localise_numbers(self.inner.get_offset(), lang)

    if lang == "en":
        return
    for ax in fig.axes:
        for axis in (ax.xaxis, ax.yaxis):
            axis.set_major_formatter(Localised(axis.get_major_formatter()))
            axis.set_minor_formatter(Localised(axis.get_minor_formatter()))

# --- Part 1 ---

# Colours of the guide's text roles (docs/_static/colours.css, light theme), so that
# a curve and the word that names it in the prose look alike.
PART1_COLOURS = {"green": "#1b7a3d", "orange": "#b45309", "blue": "#1a66b8", "red": "#c62828", "gray": "#5b6472"}


def plot_loss_curves(log_history: list[dict[str, Any]], title: str = "Training and validation loss",
                     lang: str = "en") -> Any:
    """Training loss (each logging step) and validation loss (each evaluation) against the optimizer step.

    ``log_history`` is a run's logged metrics, one dict per log: the lines of
    ``metrics.jsonl`` in a run folder, or transformers' ``TrainerState.log_history``.
    Entries with ``loss`` are training logs, entries with ``eval_loss`` are
    evaluations, both with their ``step``. A second evaluation at a step that
    was already evaluated is the final evaluation of the kept (best) adapter,
    which the trainer logs at the last step: it is drawn as a star, not as a
    point of the curve.
    """
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    from qlora_guide.errors import QLoRAGuideError

    t = translator(lang)

    train = [(e["step"], e["loss"]) for e in log_history if "loss" in e]
    valid: dict[int, float] = {}
    kept = None
    for e in log_history:
        if "eval_loss" in e:
            if e["step"] in valid:
                kept = (e["step"], e["eval_loss"])
            else:
                valid[e["step"]] = e["eval_loss"]
    if not train and not valid:
        raise QLoRAGuideError("the run's history holds no 'loss' nor 'eval_loss' entry: nothing to plot")
    fig, ax = plt.subplots(figsize=(7, 4), layout="constrained")
    if train:
        ax.plot(*zip(*train, strict=True), color=PART1_COLOURS["green"], label=t("training loss"))
    if valid:
        ax.plot(list(valid), list(valid.values()), color=PART1_COLOURS["orange"], marker="o", label=t("validation loss"))
    if kept is not None:
        ax.plot(*kept, color=PART1_COLOURS["blue"], marker="*", markersize=14, linestyle="none",
                label=t("validation loss of the kept adapter"))
    ax.set(xlabel=t("optimizer step"), ylabel=t("cross-entropy loss"), title=t(title))
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax.legend()
    _localise_ticks(fig, lang)
    plt.close(fig)  # the caller displays the returned figure; pyplot must not show it a second time
    return fig


def plot_validation_curves(curves: dict[str, list[tuple[int, float]]], title: str = "Validation loss of each variant",
                           lang: str = "en") -> Any:
    """Several runs' validation loss against the optimizer step, one line per run, on the same axes.

    ``curves`` maps a run's name (translated, so it must be in the catalogue)
    to its (step, validation loss) points, as
    :func:`qlora_guide.evaluation.variants.validation_history` reads them.
    """
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    from qlora_guide.errors import QLoRAGuideError

    if not any(curves.values()):
        raise QLoRAGuideError("no validation loss to plot: the runs logged no evaluation")
    t = translator(lang)
    fig, ax = plt.subplots(figsize=(7, 4), layout="constrained")
    colours = list(PART1_COLOURS.values()) + ["#7b3fa0", "#a16207", "#be185d"]
    for (name, points), colour in zip(curves.items(), colours, strict=False):
        ax.plot(*zip(*points, strict=True), color=colour, marker="o", label=t(name))
    ax.set(xlabel=t("optimizer step"), ylabel=t("validation loss"), title=t(title))
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax.legend()
    _localise_ticks(fig, lang)
    plt.close(fig)
    return fig


def plot_preference_history(log_history: list[dict[str, Any]], lang: str = "en") -> Any:
    """A DPO run's reward margin and reward accuracy against the step, training and validation.

    ``log_history`` is the run's ``metrics.jsonl`` (TRL's ``rewards/margins``
    and ``rewards/accuracies``, and their ``eval_`` versions): the margin is
    ``beta`` times how much more the model raised the chosen answer's
    log-probability than the rejected one's, relative to the reference; the
    accuracy is the share of pairs whose margin is positive.
    """
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    from qlora_guide.errors import QLoRAGuideError

    t = translator(lang)
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6), layout="constrained")
    drawn = False
    for ax, key, label in zip(axes, ("rewards/margins", "rewards/accuracies"),
                              ("reward margin", "reward accuracy"), strict=True):
        for prefix, colour, name in (("", PART1_COLOURS["green"], "training pairs"),
                                     ("eval_", PART1_COLOURS["orange"], "validation pairs")):
            points = [(e["step"], e[prefix + key]) for e in log_history if prefix + key in e and "step" in e]
            if points:
                drawn = True
                ax.plot(*zip(*points, strict=True), color=colour, marker="o", label=t(name))
        ax.set(xlabel=t("optimizer step"), title=t(label))
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    if not drawn:
        raise QLoRAGuideError("the run's history holds no reward: it is not a preference-tuning run")
    axes[1].set_ylim(-0.05, 1.05)
    axes[0].legend()
    _localise_ticks(fig, lang)
    plt.close(fig)
    return fig


def plot_memory_budget(check: dict[str, Any], lang: str = "en") -> Any:
    """Planned peak training memory per batch x sequence setting, with and without checkpointing, against a budget.

    ``check`` is what :func:`qlora_guide.memory.sixteen_gb_check` returns: the
    model name, ``budget_bytes`` and one row per setting with
    ``training_total`` and ``training_total_without_checkpointing`` in bytes.
    """
    import matplotlib.pyplot as plt

    t = translator(lang)
    gib = 1024**3
    rows = check["rows"]
    labels = [f"{format_number(r['batch_size'], lang=lang)} × {format_number(r['seq_len'], lang=lang)}" for r in rows]
    x = range(len(rows))
    width = 0.4
    fig, ax = plt.subplots(figsize=(7, 4), layout="constrained")
    ax.bar([i - width / 2 for i in x], [r["training_total"] / gib for r in rows], width,
           color=PART1_COLOURS["green"], label=t("with gradient checkpointing"))
    ax.bar([i + width / 2 for i in x], [r["training_total_without_checkpointing"] / gib for r in rows], width,
           color=PART1_COLOURS["gray"], label=t("without gradient checkpointing"))
    ax.axhline(check["budget_bytes"] / gib, color=PART1_COLOURS["red"], linestyle="--",
               label=t("{budget} GiB budget").format(budget=format_number(check["budget_bytes"] / gib, ".0f", lang)))
    ax.set_xticks(list(x), labels)
    ax.set_yscale("log")
    ax.set(xlabel=t("batch size × sequence length (tokens)"), ylabel=t("planned training peak (GiB, log scale)"),
           title=t("QLoRA on {model}: what fits").format(model=check["model"]))
    ax.legend()
    _localise_ticks(fig, lang)
    plt.close(fig)
    return fig


def plot_answers_side_by_side(questions: list[str], answers: dict[str, list[str]], width: int = 34,
                              max_lines: int = 12, lang: str = "en") -> Any:
    """Questions and the answers of several models (or the references) as a table of wrapped text.

    ``answers`` maps a column title ("4-bit base", "fine-tuned", "reference")
    to one text per question, as :func:`qlora_guide.evaluation.generate_answers`
    returns them. Each text is wrapped to ``width`` characters (long tokens
    are cut, so a run of digits cannot stretch a column) and shortened to
    ``max_lines`` lines.
    """
    import textwrap

    import matplotlib.pyplot as plt

    from qlora_guide.errors import QLoRAGuideError

    t = translator(lang)
    columns = {t("question"): list(questions), **{t(name): list(texts) for name, texts in answers.items()}}
    for name, texts in columns.items():
        if len(texts) != len(questions):
            raise QLoRAGuideError(f"{len(texts)} texts in column '{name}' for {len(questions)} questions")
    wrapped = {name: [textwrap.fill(" ".join(text.split()) or t("(empty)"), width, max_lines=max_lines,
                                    placeholder=" ...") for text in texts]
               for name, texts in columns.items()}
    colours = [PART1_COLOURS["gray"], PART1_COLOURS["orange"], PART1_COLOURS["green"], PART1_COLOURS["blue"]]
    line, pad, header = 0.17, 0.2, 0.4  # inches: one line of 8.5 pt text, padding per row, header row
    heights = [line * max(wrapped[name][i].count("\n") + 1 for name in wrapped) + pad for i in range(len(questions))]
    total = header + sum(heights)
    fig = plt.figure(figsize=(2.7 * len(columns), total))
    ax = fig.add_axes((0, 0, 1, 1))
    ax.set(xlim=(0, len(columns)), ylim=(total, 0))  # y in inches from the top
    ax.axis("off")
    for j, name in enumerate(wrapped):
        ax.text(j + 0.04, header / 2, name, va="center", fontsize=10, fontweight="bold",
                color=colours[j % len(colours)])
    top = header
    for i, height in enumerate(heights):
        if i % 2 == 0:
            ax.axhspan(top, top + height, color="#f1f3f5", zorder=0)
        for j, name in enumerate(wrapped):
            ax.text(j + 0.04, top + pad / 2, wrapped[name][i], va="top", fontsize=8.5,
                    fontweight="bold" if j == 0 else "normal")
        top += height
    _localise_ticks(fig, lang)
    plt.close(fig)
    return fig


# --- Part 2 ---

# The same palette as Part 1 (docs/_static/colours.css, light theme), with the other roles' colours.
PART2_COLOURS = {"blue": "#1a66b8", "green": "#1b7a3d", "orange": "#b45309", "purple": "#7b3fa8",
                 "red": "#c62828", "yellow": "#8a6a00", "gray": "#5b6472", "pink": "#c2185b"}

MEMORY_PART_COLOURS = {"weights": "blue", "LoRA weights": "green", "optimizer states": "purple",
                       "gradients and activations": "orange", "CUDA overhead": "gray"}


def memory_parts(estimate: Any) -> dict[str, int]:
    """A planned training peak split into the parts a bar is stacked from, in bytes; they add up to the total.

    Weights, LoRA weights and optimizer states are in memory the whole run;
    gradients and activations come and go within a step, and the planner's
    total counts them at the step's peak, so they are one part here.
    """
    def row(name: str) -> int:
        return sum(r.bytes for r in estimate.training if r.name == name)

    persistent = {"weights": estimate.weights_bytes, "LoRA weights": row("LoRA weights"),
                  "optimizer states": row("optimizer states")}
    overhead = row("CUDA overhead")
    step = estimate.training_total - sum(persistent.values()) - overhead
    return {**persistent, "gradients and activations": step, "CUDA overhead": overhead}


def plot_memory_breakdown(estimates: list[Any], budgets_gib: tuple[float, ...] = (24, 48, 80), lang: str = "en") -> Any:
    """Planned training peak of full fine-tuning, LoRA and QLoRA, stacked by part, one panel per model.

    ``estimates`` is a list of :class:`qlora_guide.memory.MemoryEstimate`
    (e.g. :func:`qlora_guide.memory.compare_methods` for several models, joined
    in one list); a panel is drawn for each model, in the order they come, with
    a bar per method. Dashed lines mark the memory of common GPUs.
    """
    import matplotlib.pyplot as plt

    from qlora_guide.errors import QLoRAGuideError

    if not estimates:
        raise QLoRAGuideError("no memory estimate to plot")
    t = translator(lang)
    gib = 1024**3
    models = list(dict.fromkeys(e.model for e in estimates))
    fig, axes = plt.subplots(1, len(models), figsize=(3.2 * len(models), 4.6), layout="constrained", squeeze=False)
    for ax, model in zip(axes[0], models, strict=True):
        mine = [e for e in estimates if e.model == model]
        methods = [t(e.method) for e in mine]
        bottoms = [0.0] * len(mine)
        parts = [memory_parts(e) for e in mine]
        for part, colour in MEMORY_PART_COLOURS.items():
            heights = [p[part] / gib for p in parts]
            ax.bar(methods, heights, bottom=bottoms, color=PART2_COLOURS[colour], label=t(part))
            bottoms = [b + h for b, h in zip(bottoms, heights, strict=True)]
        for i, total in enumerate(bottoms):
            ax.annotate(format_number(total, ".0f" if total >= 10 else ".1f", lang), (i, total), ha="center", va="bottom",
                        xytext=(0, 2), textcoords="offset points", fontsize=9)
        for budget in budgets_gib:
            ax.axhline(budget, color=PART2_COLOURS["red"], linestyle="--", linewidth=0.9, alpha=0.7)
        ax.set_title(model, fontsize=11)
        ax.margins(y=0.12)
    axes[0][0].set_ylabel(t("planned training peak (GiB)"))
    handles, labels = axes[0][0].get_legend_handles_labels()
    budget_line = plt.Line2D([], [], color=PART2_COLOURS["red"], linestyle="--", linewidth=0.9)
    budgets = t("GPU memory: {budgets} GiB").format(budgets=", ".join(format_number(b, "g", lang) for b in budgets_gib))
    fig.legend([*handles, budget_line], [*labels, budgets],
               loc="outside lower center", ncol=4, fontsize=9, frameon=False)
    _localise_ticks(fig, lang)
    plt.close(fig)
    return fig


def plot_nf4_codebook(codebooks: dict[str, Any], samples: Any = None, normal_std: float | None = None,
                      lang: str = "en") -> Any:
    """The NF4 values against the normal distribution they assume, and beside other 4-bit codebooks.

    ``codebooks`` maps a name to its values in [-1, 1], NF4 first (e.g.
    ``{"NF4": nf4_code(), "FP4": fp4_code(), "int4": ...}``). Top panel: the
    first codebook as vertical lines over the histogram of ``samples`` (weights
    divided by their block's absmax) and the density of N(0, ``normal_std``).
    Bottom panel: every codebook as a row of dots, to compare the spacing.
    """
    import math

    import matplotlib.pyplot as plt
    import numpy as np

    from qlora_guide.errors import QLoRAGuideError

    if not codebooks:
        raise QLoRAGuideError("no codebook to plot")
    t = translator(lang)
    names = list(codebooks)
    values = {name: np.asarray(codebooks[name], dtype=float).reshape(-1) for name in names}
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7.5, 5.2), height_ratios=(3, 1.3), sharex=True,
                                      layout="constrained")
    if samples is not None:
        data = np.asarray(samples, dtype=float).reshape(-1)
        top.hist(data, bins=161, range=(-1, 1), density=True, color=PART2_COLOURS["gray"], alpha=0.35,
                 label=t("model weights / block absmax"))
    if normal_std is not None:
        x = np.linspace(-1, 1, 401)
        density = np.exp(-0.5 * (x / normal_std) ** 2) / (normal_std * math.sqrt(2 * math.pi))
        top.plot(x, density, color=PART2_COLOURS["blue"], label=t("normal density NF4 assumes (std {std})").format(std=format_number(normal_std, ".3f", lang)))
    for i, value in enumerate(values[names[0]]):
        top.axvline(value, color=PART2_COLOURS["red"], linewidth=1.1, label=t("the 16 {name} values").format(name=names[0]) if i == 0 else None)
    top.set(ylabel=t("density"), title=t("{name} values and the distribution of the weights").format(name=names[0]))
    top.legend(fontsize=8, loc="upper left", framealpha=0.9)
    colours = [PART2_COLOURS[c] for c in ("red", "orange", "purple", "green", "blue")]
    for row, name in enumerate(names):
        bottom.scatter(values[name], [row] * len(values[name]), s=22, color=colours[row % len(colours)], zorder=3)
    bottom.set_yticks(range(len(names)), names)
    bottom.set_ylim(len(names) - 0.5, -0.5)
    bottom.grid(axis="x", alpha=0.3)
    bottom.set(xlabel=t("value, as a fraction of the block's absmax"), xlim=(-1.05, 1.05))
    _localise_ticks(fig, lang)
    plt.close(fig)
    return fig


def plot_quantization_error(rows: list[dict[str, Any]], lang: str = "en") -> Any:
    """Signal-to-noise ratio of each quantization method, grouped by the weights it was measured on.

    ``rows`` is what :func:`qlora_guide.quantization.error_table` returns: one
    dict per (``weights``, ``method``) with ``snr_db``. One group of bars per
    kind of weights, one bar per method, higher is better.
    """
    import matplotlib.pyplot as plt

    from qlora_guide.errors import QLoRAGuideError

    if not rows:
        raise QLoRAGuideError("no error measurement to plot")
    t = translator(lang)
    groups = list(dict.fromkeys(r["weights"] for r in rows))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    snr = {(r["weights"], r["method"]): r["snr_db"] for r in rows}
    colours = [PART2_COLOURS[c] for c in ("gray", "orange", "purple", "red", "pink", "blue", "green")]
    width = 0.8 / len(methods)
    fig, ax = plt.subplots(figsize=(8, 4.2), layout="constrained")
    for k, method in enumerate(methods):
        xs = [g + (k - (len(methods) - 1) / 2) * width for g in range(len(groups))]
        ax.bar(xs, [snr.get((group, method), float("nan")) for group in groups], width,
               color=colours[k % len(colours)], label=t(method))
    ax.set_xticks(range(len(groups)), [translate(g, lang, strict=False) for g in groups])  # layer names stay code
    ax.set(ylabel=t("signal-to-noise ratio (dB), higher is better"), xlabel=t("weights"),
           title=t("Quantization error by format"))
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, ncol=3, loc="upper center", bbox_to_anchor=(0.5, -0.16), frameon=False)
    _localise_ticks(fig, lang)
    plt.close(fig)
    return fig
