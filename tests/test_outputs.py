"""Output folders (qlora_guide.outputs): --overwrite replaces only what the package wrote, never an input."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import pytest

from qlora_guide import outputs
from qlora_guide.errors import QLoRAGuideError


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` with the SHA-256 of its content."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "qlora_guide", *args], capture_output=True, text=True)


def test_overwrite_refuses_a_folder_the_package_did_not_write(tmp_path):
    folder = tmp_path / "out"
    folder.mkdir()
    (folder / "important.txt").write_text("not yours")
    before = snapshot(tmp_path)
    with pytest.raises(QLoRAGuideError, match="did not write as a quantized folder .*important.txt.*nothing was deleted"):
        outputs.check_output_folder(folder, overwrite=True, kind="quantized")
    result = cli("quantize", "smollm2-135m", "--output-dir", str(folder), "--overwrite")
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "important.txt" in result.stderr
    assert snapshot(tmp_path) == before


def test_overwrite_replaces_a_folder_of_the_same_kind_only(tmp_path):
    staging = outputs.staging_folder(tmp_path / "merged", "merged")
    (staging / "model.safetensors").write_bytes(b"old")
    outputs.replace_folder(staging, tmp_path / "merged")
    assert outputs.check_output_folder(tmp_path / "merged", overwrite=True, kind="merged") == tmp_path / "merged"
    with pytest.raises(QLoRAGuideError, match="did not write as a quantized folder"):
        outputs.check_output_folder(tmp_path / "merged", overwrite=True, kind="quantized")
    newer = outputs.staging_folder(tmp_path / "merged", "merged")
    (newer / "model.safetensors").write_bytes(b"new")
    outputs.replace_folder(newer, tmp_path / "merged")
    assert (tmp_path / "merged" / "model.safetensors").read_bytes() == b"new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"], "no staging or old folder left behind"


def test_an_output_is_never_its_own_input_nor_contains_it(tmp_path):
    run = tmp_path / "run"
    (run / "adapter").mkdir(parents=True)
    for out, word in ((run, "is"), (tmp_path, "contains")):
        with pytest.raises(QLoRAGuideError, match=f"{word} the input"):
            outputs.check_output_folder(out, overwrite=True, kind="merged", inputs=(run,))
    inside = outputs.check_output_folder(run / "merged", overwrite=True, kind="merged", inputs=(run,))
    assert inside == run / "merged"
    (tmp_path / "file").write_text("x")
    with pytest.raises(QLoRAGuideError, match="is a file"):
        outputs.check_output_folder(tmp_path / "file", overwrite=True, kind="merged")


def test_merge_into_its_own_run_is_refused_before_anything_is_touched(tmp_path, model_cache):
    from test_deployment import make_adapter_run

    run = make_adapter_run(tmp_path / "run")
    before = snapshot(tmp_path)
    result = cli("merge", str(run), "--output-dir", str(run), "--overwrite")
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "is the input" in result.stderr
    result = cli("merge", str(run / "adapter"), "--output-dir", str(tmp_path), "--overwrite")
    assert result.returncode == 2 and "contains the input" in result.stderr, result.stderr
    assert snapshot(tmp_path) == before
