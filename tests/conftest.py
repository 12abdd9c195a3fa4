"""Shared fixtures: offline hub, one converted copy of the embedded model per session, tiny data and recipe.

Nothing is downloaded: the hub is switched off before any test module imports
huggingface_hub (it reads the switch at import time). The embedded model is
converted once per session into ``$QLORA_GUIDE_CACHE`` when set (CI caches that
folder), else into pytest's temporary folder.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

for _name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
    os.environ[_name] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Under pytest-xdist (`nox -s tests` runs one worker per core) each worker gets its share of the
# cores, set before torch is imported: workers whose threads spin on the same cores slow each other.
if "PYTEST_XDIST_WORKER_COUNT" in os.environ:
    os.environ.setdefault("OMP_NUM_THREADS",
                          str(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))))

QUESTIONS = [
    ("en", "What does the r of LoRA set?", "The rank of the update B @ A: how many directions each adapted layer can learn."),
    ("fr", "Que règle le r de LoRA ?", "Le rang de la mise à jour B @ A : le nombre de directions que chaque couche adaptée peut apprendre."),
    ("en", "Why is NF4 used for the frozen weights?", "NF4 places its 16 levels at the quantiles of a normal distribution, which fits pretrained weights."),
    ("fr", "Pourquoi NF4 pour les poids gelés ?", "NF4 place ses 16 niveaux aux quantiles d'une loi normale, ce qui convient aux poids pré-entraînés."),
    ("en", "What does double quantization save?", "It quantizes the absmax constants too, saving about 0.37 bits per parameter."),
    ("fr", "Que fait gagner la double quantification ?", "Elle quantifie aussi les constantes absmax et gagne environ 0,37 bit par paramètre."),
    ("en", "What is lora_alpha?", "A scale: the update is multiplied by lora_alpha divided by r."),
    ("fr", "Qu'est-ce que lora_alpha ?", "Un facteur d'échelle : la mise à jour est multipliée par lora_alpha divisé par r."),
    ("en", "Which modules get adapters in the guide?", "q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj and down_proj."),
    ("fr", "Quels modules reçoivent des adaptateurs dans le guide ?", "q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj et down_proj."),
    ("en", "What are paged optimizers for?", "They move optimizer states to CPU memory when the GPU runs short, avoiding out-of-memory crashes."),
    ("fr", "À quoi servent les optimiseurs paginés ?", "Ils déplacent les états de l'optimiseur en mémoire CPU quand le GPU manque de place."),
    ("en", "What does gradient checkpointing trade?", "Compute for memory: activations are recomputed in the backward pass instead of being stored."),
    ("fr", "Qu'échange le gradient checkpointing ?", "Du calcul contre de la mémoire : les activations sont recalculées pendant la rétropropagation."),
    ("en", "What is the compute dtype?", "The dtype that 4-bit weights are dequantized to for each matrix multiplication, usually bfloat16."),
    ("fr", "Qu'est-ce que le dtype de calcul ?", "Le type vers lequel les poids 4 bits sont déquantifiés à chaque multiplication, souvent bfloat16."),
]


@pytest.fixture(scope="session", autouse=True)
def model_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The cache folder of the session: ``$QLORA_GUIDE_CACHE`` if set, else one under pytest's temp folder."""
    if not os.environ.get("QLORA_GUIDE_CACHE"):
        os.environ["QLORA_GUIDE_CACHE"] = str(tmp_path_factory.getbasetemp() / "qlora-guide-cache")
    return Path(os.environ["QLORA_GUIDE_CACHE"])


@pytest.fixture(scope="session")
def embedded_model(model_cache: Path) -> Path:
    """The Hugging Face folder of the embedded SmolLM2-135M-Instruct (converted once per session)."""
    from qlora_guide.models import embedded_model_path

    return embedded_model_path()


@pytest.fixture(scope="session")
def tokenizer(embedded_model: Path):
    """The embedded model's tokenizer (pad token set, right padding)."""
    from qlora_guide.models import load_tokenizer

    return load_tokenizer(str(embedded_model))


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def chat_rows(repeat: int = 2) -> list[dict]:
    """Small bilingual chat examples in the bundled dataset's format."""
    rows = []
    for k in range(repeat):
        for i, (lang, q, a) in enumerate(QUESTIONS):
            rows.append({
                "id": f"{lang}-{k}-{i}", "pair_id": f"{k}-{i // 2}", "lang": lang, "topic": "qlora",
                "messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}],
            })
    return rows


@pytest.fixture
def tiny_jsonl(tmp_path: Path) -> Path:
    """A 32-example chat JSONL file (no validation split: one is cut from it)."""
    return write_jsonl(tmp_path / "data" / "train.jsonl", chat_rows())


@pytest.fixture
def tiny_recipe(tiny_jsonl: Path, tmp_path: Path, embedded_model: Path) -> dict:
    """A recipe mapping that trains the embedded model for 4 steps in a few seconds (pass it to train or load_recipe)."""
    return {
        "name": "tiny",
        "model": {"name_or_path": "smollm2-135m"},
        "lora": {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]},
        "data": {"path": str(tiny_jsonl), "max_length": 96, "validation_size": 0.25},
        "training": {
            "max_steps": 4, "per_device_train_batch_size": 2, "gradient_accumulation_steps": 1,
            "learning_rate": 1e-3, "logging_steps": 1, "save_steps": 2, "save_total_limit": 2,
            "gradient_checkpointing": False, "report_to": ["none"], "seed": 7,
        },
        "output": {"dir": str(tmp_path / "run")},
    }


PREFERENCE_HISTORY = [
    {"step": 0, "eval_rewards/margins": 0.0, "eval_rewards/accuracies": 0.0, "eval_loss": 0.693},
    {"step": 5, "rewards/margins": 0.07, "rewards/accuracies": 0.625},
    {"step": 10, "rewards/margins": 0.46, "rewards/accuracies": 0.75},
    {"step": 10, "eval_rewards/margins": 0.26, "eval_rewards/accuracies": 0.5625, "eval_loss": 0.607},
]


def draw_every_figure(lang: str) -> dict:
    """Every figure of qlora_guide.plots drawn in ``lang`` on small inputs, by function name."""
    import torch

    from qlora_guide import plots
    from qlora_guide.memory import compare_methods, sixteen_gb_check
    from qlora_guide.quantization import error_table, fp4_code, nf4_code

    history = [{"step": 5, "loss": 2.95}, {"step": 10, "loss": 2.45}, {"step": 10, "eval_loss": 2.6},
               {"step": 10, "eval_loss": 2.55}]
    answers = {"bf16 base": ["a"], "4-bit base": ["b"], "fine-tuned": ["c"], "reference": [""]}
    return {
        "plot_loss_curves": plots.plot_loss_curves(history, lang=lang),
        "plot_validation_curves": plots.plot_validation_curves({"LoRA": [(0, 4.4), (10, 3.5)],
                                                                "DoRA": [(0, 4.4), (10, 3.45)]}, lang=lang),
        "plot_preference_history": plots.plot_preference_history(PREFERENCE_HISTORY, lang=lang),
        "plot_memory_budget": plots.plot_memory_budget(sixteen_gb_check(), lang=lang),
        "plot_answers_side_by_side": plots.plot_answers_side_by_side(["q?"], answers, lang=lang),
        "plot_memory_breakdown": plots.plot_memory_breakdown(compare_methods("mistral-7b"), lang=lang),
        "plot_nf4_codebook": plots.plot_nf4_codebook({"NF4": nf4_code(), "FP4": fp4_code()},
                                                     samples=torch.randn(2048, generator=torch.Generator().manual_seed(0)).clamp(-2, 2) / 2,
                                                     normal_std=0.541,
                                                     lang=lang),
        "plot_quantization_error": plots.plot_quantization_error(error_table(None, gaussian_size=1 << 12), lang=lang),
    }


def figure_texts(fig) -> list[str]:
    """Every text a reader sees on a drawn figure: titles, labels, legends, tick labels, annotations."""
    fig.canvas.draw()  # tick labels exist once the axes are drawn
    texts = [*fig.texts, *(t for legend in fig.legends for t in legend.get_texts())]
    for ax in fig.axes:
        texts += [ax.title, ax._left_title, ax._right_title, ax.xaxis.label, ax.yaxis.label, *ax.texts,
                  ax.xaxis.get_offset_text(), ax.yaxis.get_offset_text()]
        for axis in (ax.xaxis, ax.yaxis):
            texts += [*axis.get_ticklabels(), *axis.get_ticklabels(minor=True)]
        if ax.get_legend() is not None:
            texts += ax.get_legend().get_texts()
    return [t.get_text() for t in texts if t.get_visible() and t.get_text().strip()]


@pytest.fixture(scope="session")
def french_figures() -> dict:
    """draw_every_figure("fr"), drawn once for the tests of figures and of terminology."""
    return draw_every_figure("fr")
