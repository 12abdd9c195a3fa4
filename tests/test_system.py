"""Tests of the system check: true figures for this machine, and recommendations that follow the planner."""

from __future__ import annotations

import json
import os
import shutil

import psutil
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from qlora_guide import memory, system  # noqa: E402
from qlora_guide.memory import GiB  # noqa: E402


@pytest.fixture(scope="module")
def report():
    return system.check_system()


def test_report_has_true_figures_for_this_machine(report):
    import bitsandbytes
    import torch

    assert report.packages["torch"] == torch.__version__
    assert report.packages["bitsandbytes"] == bitsandbytes.__version__
    assert report.cuda_available == torch.cuda.is_available()
    assert report.cuda_runtime == torch.version.cuda
    assert report.cpu_logical == psutil.cpu_count(logical=True)
    assert 0 < report.cpu_usable <= report.cpu_logical
    assert report.ram_total == psutil.virtual_memory().total
    assert 0 < report.ram_available <= report.ram_total
    assert all(free > 0 for free in report.disk_free.values()) and len(report.disk_free) == 2
    assert any(key.startswith("cwd") for key in report.disk_free)


def test_cpu_only_machine(report):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert report.gpus == []
    if not shutil.which("nvidia-smi"):
        assert report.driver is None
    assert report.bnb_backend.startswith("cpu")
    assert report.bnb_checks["nf4 + double quant"] == "ok" and report.bnb_checks["fp4"] == "ok"
    assert report.bnb_checks["paged AdamW"].startswith("falls back")  # bitsandbytes has no paged memory on the CPU
    rec = report.recommendations
    assert rec.device.startswith("cpu") and rec.budget_source == "available RAM"
    assert not rec.paged_optimizers
    text = system.format_report(report)
    assert "none: everything runs on the CPU" in text and "slow" in text


@pytest.mark.parametrize("setting", ["auto", "0"])
def test_check_says_what_training_does_on_this_machine(monkeypatch, setting):
    import torch

    from qlora_guide.config import Recipe, load_recipe
    from qlora_guide.errors import QLoRAGuideError
    from qlora_guide.training import resolve_precision

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    monkeypatch.setenv("QLORA_GUIDE_CPU_BF16", setting)
    rec = system.recommend([], ram_available=64 * GiB, paged_ok=False)
    trained = resolve_precision(Recipe())  # a recipe's defaults: bf16 auto, bf16 compute, optim auto
    assert (rec.compute_dtype, rec.training_optim) == (trained.compute_dtype, trained.optim)
    if setting == "0":
        assert rec.compute_dtype == "float32" and "no native bf16" in rec.compute_dtype_note
    # the 8-bit AdamW that the check finds working is one that training accepts here; paged ones it refuses
    assert resolve_precision(load_recipe({"training": {"optim": "adamw_bnb_8bit"}})).optim == "adamw_bnb_8bit"
    with pytest.raises(QLoRAGuideError, match="training.optim: 'paged_adamw_32bit' pages optimizer states .* needs a CUDA GPU"):
        resolve_precision(load_recipe({"training": {"optim": "paged_adamw_32bit"}}))


def test_recommendations_follow_the_planner(report):
    rec = report.recommendations
    assert [r.parameters for r in rec.fits] == sorted(r.parameters for r in rec.fits)
    for row in rec.fits:
        est = memory.estimate(row.model, batch_size=system.TRAIN_BATCH, seq_len=system.TRAIN_SEQ,
                              optimizer=rec.optimizer, device="cuda" if report.gpus else "cpu")
        assert row.training_bytes == est.training_total and row.inference_bytes == est.inference_total
        assert row.fits_training == (row.training_bytes <= rec.budget_bytes)
    fitting = [r.model for r in rec.fits if r.fits_training]
    assert rec.largest_training == (fitting[-1] if fitting else None)


def test_report_formats_and_serialises(report):
    text = system.format_report(report)
    for section in ("System", "Packages", "GPU", "bitsandbytes", "CPU and memory", "Disk (free)",
                    "Recommendations", "QLoRA plans"):
        assert f"\n{section}\n" in f"\n{text}\n"
    data = json.loads(json.dumps(report.to_dict()))
    assert data["recommendations"]["fits"][0]["model"] == report.recommendations.fits[0].model


def _gpu(memory_gib: float, capability: str = "8.0") -> system.GPUInfo:
    return system.GPUInfo(0, "test GPU", int(memory_gib * GiB), capability, float(capability) >= 8.0, 100)


def test_a_48_gb_gpu_can_train_the_65b_model_as_in_the_paper():
    rec = system.recommend([_gpu(48)], ram_available=64 * GiB, paged_ok=True)
    assert rec.largest_training == "llama-65b"
    assert rec.optimizer == "paged_adamw_32bit" and rec.paged_optimizers


def test_an_older_16_gb_gpu_gets_fp16_with_a_warning():
    rec = system.recommend([_gpu(16, "7.5")], ram_available=64 * GiB, paged_ok=True)
    assert rec.compute_dtype == "float16" and rec.compute_dtype_note.startswith("warning")
    assert rec.largest_training in ("llama-2-13b", "llama-3-8b")
    assert not any(r.fits_training for r in rec.fits if r.parameters > 20e9)


def test_without_working_paged_optimizers_the_plan_uses_adamw():
    rec = system.recommend([_gpu(24)], ram_available=64 * GiB, paged_ok=False)
    assert rec.optimizer == "adamw" and not rec.paged_optimizers


@pytest.mark.gpu
def test_cuda_machine(report):
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    assert len(report.gpus) == torch.cuda.device_count()
    gpu = report.gpus[0]
    assert gpu.total_memory == torch.cuda.get_device_properties(0).total_memory
    assert gpu.bf16 == torch.cuda.is_bf16_supported(including_emulation=False)
    assert report.driver and report.bnb_backend.startswith("cuda")
    assert report.bnb_checks["paged AdamW"] == "ok" and report.recommendations.paged_optimizers
    assert report.recommendations.budget_bytes == max(g.total_memory for g in report.gpus)
