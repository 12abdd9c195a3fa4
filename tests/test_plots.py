"""The guide's figures: each plot function returns a Figure that draws what it was given."""

import re
from pathlib import Path

import pytest

from qlora_guide import plots
from qlora_guide.errors import QLoRAGuideError

# --- Part 1 ---

LOG_HISTORY = [
    {"step": 5, "loss": 2.9, "learning_rate": 2e-4},
    {"step": 10, "loss": 2.4, "learning_rate": 2e-4},
    {"step": 10, "eval_loss": 2.6, "eval_runtime": 1.0},
    {"step": 15, "loss": 2.1, "learning_rate": 2e-4},
    {"step": 20, "loss": 1.9, "learning_rate": 2e-4},
    {"step": 20, "eval_loss": 2.3, "eval_runtime": 1.0},
    {"step": 20, "train_runtime": 60.0, "train_loss": 2.3},
]


def test_loss_curves_draw_training_and_validation_points():
    fig = plots.plot_loss_curves(LOG_HISTORY)
    (ax,) = fig.axes
    train, valid = ax.get_lines()
    assert list(train.get_xdata()) == [5, 10, 15, 20]
    assert list(train.get_ydata()) == [2.9, 2.4, 2.1, 1.9]
    assert list(valid.get_xdata()) == [10, 20]
    assert list(valid.get_ydata()) == [2.6, 2.3]
    # the summary entry ("train_loss") is not a point of the training curve
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["training loss", "validation loss"]


def test_the_final_evaluation_of_the_kept_adapter_is_a_separate_marker():
    history = [*LOG_HISTORY, {"step": 20, "eval_loss": 2.2}]  # the trainer's evaluation after training
    fig = plots.plot_loss_curves(history)
    train, valid, kept = fig.axes[0].get_lines()
    assert list(valid.get_xdata()) == [10, 20]  # still one point per evaluation step
    assert list(valid.get_ydata()) == [2.6, 2.3]
    assert (list(kept.get_xdata()), list(kept.get_ydata())) == ([20], [2.2])
    assert kept.get_marker() == "*"


def test_loss_curves_without_evaluation_draw_one_line():
    fig = plots.plot_loss_curves([e for e in LOG_HISTORY if "eval_loss" not in e])
    assert len(fig.axes[0].get_lines()) == 1


def test_loss_curves_refuse_an_empty_history():
    with pytest.raises(QLoRAGuideError, match="nothing to plot"):
        plots.plot_loss_curves([{"step": 1, "train_runtime": 3.0}])


def test_validation_curves_draw_one_line_per_run_in_its_order():
    curves = {"LoRA": [(0, 4.4), (10, 3.6), (20, 3.5)], "DoRA": [(0, 4.4), (20, 3.4)]}
    (ax,) = plots.plot_validation_curves(curves).axes
    lora, dora = ax.get_lines()
    assert (list(lora.get_xdata()), list(lora.get_ydata())) == ([0, 10, 20], [4.4, 3.6, 3.5])
    assert (list(dora.get_xdata()), list(dora.get_ydata())) == ([0, 20], [4.4, 3.4])
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["LoRA", "DoRA"]
    with pytest.raises(QLoRAGuideError, match="no validation loss"):
        plots.plot_validation_curves({"LoRA": []})


def test_preference_history_draws_training_and_validation_rewards():
    from conftest import PREFERENCE_HISTORY

    margins, accuracies = plots.plot_preference_history(PREFERENCE_HISTORY).axes
    train, valid = margins.get_lines()
    assert (list(train.get_xdata()), list(train.get_ydata())) == ([5, 10], [0.07, 0.46])
    assert (list(valid.get_xdata()), list(valid.get_ydata())) == ([0, 10], [0.0, 0.26])
    assert list(accuracies.get_lines()[1].get_ydata()) == [0.0, 0.5625]
    with pytest.raises(QLoRAGuideError, match="not a preference-tuning run"):
        plots.plot_preference_history(LOG_HISTORY)


def test_memory_budget_has_two_bars_per_setting_and_the_budget_line():
    from qlora_guide.memory import sixteen_gb_check

    check = sixteen_gb_check()
    fig = plots.plot_memory_budget(check)
    (ax,) = fig.axes
    with_ckpt, without_ckpt = ax.containers
    n = len(check["rows"])
    assert len(with_ckpt) == len(without_ckpt) == n
    gib = 1024**3
    assert [b.get_height() for b in with_ckpt] == pytest.approx([r["training_total"] / gib for r in check["rows"]])
    # checkpointing only ever lowers the planned peak
    assert all(a.get_height() <= b.get_height() for a, b in zip(with_ckpt, without_ckpt, strict=True))
    (budget,) = ax.get_lines()
    assert budget.get_ydata()[0] == pytest.approx(check["budget_bytes"] / gib)
    assert len(ax.get_xticklabels()) == n


def test_answers_side_by_side_wraps_every_text_into_its_column():
    questions = ["What is NF4?", "Que veut dire déquantifier ?"]
    answers = {
        "4-bit base": ["A " * 40, "1" * 120],  # a long answer, and one unbreakable token
        "fine-tuned": ["NF4 is a 4-bit data type.", ""],
        "reference": ["Sixteen levels from normal quantiles.", "Reconvertir les codes en flottants."],
    }
    fig = plots.plot_answers_side_by_side(questions, answers, width=30)
    texts = [t.get_text() for t in fig.axes[0].texts]
    assert texts[:4] == ["question", "4-bit base", "fine-tuned", "reference"]
    assert len(texts) == 4 + 4 * len(questions)
    assert all(len(line) <= 30 for text in texts for line in text.splitlines())
    lines = [line for text in texts for line in text.splitlines()]
    assert "1" * 30 in lines  # the run of digits is cut, not left to stretch the column
    assert "(empty)" in texts


def test_answers_side_by_side_refuses_a_missing_answer():
    with pytest.raises(QLoRAGuideError, match="1 texts in column 'fine-tuned' for 2 questions"):
        plots.plot_answers_side_by_side(["a?", "b?"], {"fine-tuned": ["only one"]})


# --- Part 2 ---


def test_memory_breakdown_stacks_each_method_up_to_its_planned_total():
    from qlora_guide.memory import compare_methods

    estimates = compare_methods("mistral-7b") + compare_methods("llama-65b")
    fig = plots.plot_memory_breakdown(estimates, budgets_gib=(24, 48))
    gib = 1024**3
    panels = [ax for ax in fig.axes if ax.get_title()]
    assert [ax.get_title() for ax in panels] == ["mistral-7b-v0.1", "llama-65b"]
    for ax, mine in zip(panels, (estimates[:3], estimates[3:]), strict=True):
        assert len(ax.containers) == len(plots.MEMORY_PART_COLOURS)  # one stacked layer per part
        tops = [max(bar.get_y() + bar.get_height() for bar in stack) for stack in zip(*ax.containers, strict=True)]
        assert tops == pytest.approx([e.training_total / gib for e in mine])
        assert [t.get_text() for t in ax.get_xticklabels()] == ["full", "lora", "qlora"]
        assert [line.get_ydata()[0] for line in ax.get_lines()] == [24, 48]
    # QLoRA's weights bar is the 4-bit one: about a quarter of LoRA's 16-bit weights
    weights = panels[0].containers[0]
    assert 0.2 < weights[2].get_height() / weights[1].get_height() < 0.35


def test_memory_parts_add_up_to_the_planned_peak():
    from qlora_guide.memory import compare_methods

    for estimate in compare_methods("mistral-7b") + compare_methods("smollm2-135m", device="cpu"):
        parts = plots.memory_parts(estimate)
        assert list(parts) == list(plots.MEMORY_PART_COLOURS)
        assert sum(parts.values()) == estimate.training_total
        assert all(value >= 0 for value in parts.values())
        assert parts["weights"] == estimate.weights_bytes


def test_memory_breakdown_refuses_nothing():
    with pytest.raises(QLoRAGuideError, match="no memory estimate"):
        plots.plot_memory_breakdown([])


def test_nf4_codebook_draws_each_value_and_each_codebook_row():
    import numpy as np
    import torch

    from qlora_guide.quantization import fp4_code, nf4_code

    samples = torch.randn(4096).clamp(-2, 2) / 2
    fig = plots.plot_nf4_codebook({"NF4": nf4_code(), "FP4": fp4_code()}, samples=samples, normal_std=0.541)
    top, bottom = fig.axes
    vertical = [line for line in top.get_lines() if len(set(line.get_xdata())) == 1]
    assert sorted(line.get_xdata()[0] for line in vertical) == pytest.approx(sorted(nf4_code().tolist()))
    (density,) = [line for line in top.get_lines() if line not in vertical]
    # the normal curve peaks at 1 / (std * sqrt(2 pi)) at zero
    assert max(density.get_ydata()) == pytest.approx(1 / (0.541 * np.sqrt(2 * np.pi)), rel=1e-3)
    assert len(top.patches) == 161  # the histogram of the samples
    rows = bottom.collections
    assert [len(c.get_offsets()) for c in rows] == [16, 16]
    assert [t.get_text() for t in bottom.get_yticklabels()] == ["NF4", "FP4"]


def test_nf4_codebook_without_samples_draws_only_the_values():
    from qlora_guide.quantization import nf4_code

    fig = plots.plot_nf4_codebook({"NF4": nf4_code()})
    assert len(fig.axes[0].patches) == 0 and len(fig.axes[0].get_lines()) == 16
    with pytest.raises(QLoRAGuideError, match="no codebook"):
        plots.plot_nf4_codebook({})


def test_quantization_error_has_one_bar_per_group_and_method():
    from qlora_guide.quantization import error_table

    rows = error_table(None, gaussian_size=1 << 14)
    rows += [dict(r, weights="scaled") for r in rows]
    fig = plots.plot_quantization_error(rows)
    (ax,) = fig.axes
    methods = list(dict.fromkeys(r["method"] for r in rows))
    assert len(ax.containers) == len(methods)
    for method, bars in zip(methods, ax.containers, strict=True):
        expected = [r["snr_db"] for r in rows if r["method"] == method]
        assert [b.get_height() for b in bars] == pytest.approx(expected)
    assert [t.get_text() for t in ax.get_xticklabels()] == ["N(0,1)", "scaled"]
    # NF4 beats evenly spaced int4 on normal data: the plot shows what the table measured
    snr = {r["method"]: r["snr_db"] for r in rows if r["weights"] == "N(0,1)"}
    assert snr["nf4 (block 64)"] > snr["int4 absmax (block 64)"] > snr["fp4 (block 64)"]
    with pytest.raises(QLoRAGuideError, match="no error measurement"):
        plots.plot_quantization_error([])


# --- Every figure in French ---


def test_every_figure_is_drawn_in_french_with_french_numbers(french_figures):
    import yaml
    from conftest import draw_every_figure, figure_texts

    labels = yaml.safe_load((Path(plots.__file__).parent / "i18n" / "fr.yaml").read_text(encoding="utf-8"))
    english = {name: figure_texts(fig) for name, fig in draw_every_figure("en").items()}
    assert set(french_figures) == {name for name in dir(plots) if name.startswith("plot_")}, "a plot is not tested"
    decimal = re.compile(r"(?<![\w.])\d+\.\d+")  # a number's decimal point, not a version's (v0.1)
    for name, fig in french_figures.items():
        french = figure_texts(fig)
        assert len(french) == len(english[name]), name
        for en_text, fr_text in zip(english[name], french, strict=True):
            # no English label is left: each one the catalogue translates differently is gone
            assert not any(fr_text == en for en, fr in labels.items() if fr != en), f"{name}: {fr_text!r} is English"
            assert not decimal.search(fr_text), f"{name}: {fr_text!r} has an English decimal point"
            for number in decimal.findall(en_text):  # each English decimal is there, with a comma
                assert number.replace(".", ",") in fr_text.replace("\u2212", "-"), f"{name}: {en_text!r} -> {fr_text!r}"
