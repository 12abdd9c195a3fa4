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
