"""Progress: bars on a terminal, none in scripts (no terminal, or --json)."""

from __future__ import annotations

import fcntl
import os
import pty
import struct
import subprocess
import sys
import termios

import pytest

from qlora_guide import progress


def test_bars_follow_the_terminal_and_the_setting(monkeypatch, capsys):
    monkeypatch.delenv(progress.PROGRESS_ENV, raising=False)
    assert not progress.enabled()  # pytest captures stderr: not a terminal
    monkeypatch.setenv(progress.PROGRESS_ENV, "1")
    assert progress.enabled()
    stages = progress.Stages("merge", 2)
    stages("loading the base")
    stages("saving")
    stages.close()
    assert "merge" in capsys.readouterr().err
    with progress.quiet():  # what --json asks
        assert not progress.enabled()
        list(progress.bar(range(3), desc="silent"))
    assert capsys.readouterr().err == "" and progress.enabled()


def _evaluate(extra: list[str], terminal: bool) -> str:
    """stderr of a short `qlora-guide evaluate`, run under a pseudo-terminal or with stderr on a pipe."""
    command = [sys.executable, "-m", "qlora_guide", "evaluate", "smollm2-135m", "--max-samples", "2",
               "--max-new-tokens", "2", "--no-performance", *extra]
    env = {k: v for k, v in os.environ.items() if k != progress.PROGRESS_ENV}
    if not terminal:
        return subprocess.run(command, capture_output=True, text=True, env=env, timeout=300, check=True).stderr
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # a terminal of 100 columns
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=follower, env=env)
    os.close(follower)
    chunks = []
    while True:
        try:
            data = os.read(leader, 4096)
        except OSError:  # the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    os.close(leader)
    assert proc.wait(timeout=300) == 0
    return b"".join(chunks).decode(errors="replace")


@pytest.mark.slow
def test_evaluate_shows_progress_on_a_terminal_only(model_cache):
    shown = _evaluate([], terminal=True)
    assert "perplexity" in shown and "generating" in shown and "batch" in shown
    for quiet in (_evaluate([], terminal=False), _evaluate(["--json"], terminal=True)):
        assert "batch" not in quiet and "it/s" not in quiet and "%|" not in quiet, quiet
