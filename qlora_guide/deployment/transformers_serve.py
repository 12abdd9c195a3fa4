"""``transformers serve``, run beside the package's server: the ecosystem's own road for a merged model.

transformers 5 ships an OpenAI-compatible server (``transformers serve``, on
FastAPI and uvicorn, with continuous batching and 4-bit loading) that takes
a model folder but no PEFT adapter, so it serves a merged model.
:func:`transformers_serve` starts it in a subprocess on 127.0.0.1, waits until
it answers, yields the base URL of its API, and stops it, so that a page or a
test can ask it the same questions as the package's server.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from qlora_guide.errors import QLoRAGuideError


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def command(model_dir: str | os.PathLike, port: int, device: str = "cpu", dtype: str = "auto",
            continuous_batching: bool = False) -> list[str]:
    """The ``transformers serve`` command line for a merged model folder on 127.0.0.1 (``dtype`` auto: the folder's)."""
    executable = shutil.which("transformers", path=str(Path(sys.executable).parent)) or shutil.which("transformers")
    if executable is None:
        raise QLoRAGuideError("the `transformers` command is not installed: pip install 'transformers[serving]'")
    line = [executable, "serve", str(model_dir), "--host", "127.0.0.1", "--port", str(port), "--device", device, "--dtype", dtype]
    return line + (["--continuous-batching"] if continuous_batching else [])


@contextlib.contextmanager
def transformers_serve(model_dir: str | os.PathLike, device: str = "cpu", dtype: str = "auto",
                       continuous_batching: bool = False, timeout: float = 180.0) -> Iterator[str]:
    """Run ``transformers serve MODEL_DIR`` on a free loopback port; yield its ``/v1`` URL once ``/health`` answers."""
    if not (Path(model_dir) / "config.json").is_file():
        raise QLoRAGuideError(f"{model_dir} is not a model folder (no config.json): transformers serve takes a merged model")
    port = free_port()
    log = tempfile.TemporaryFile(mode="w+")  # a file, not a pipe: a chatty server never blocks on a full pipe
    process = subprocess.Popen(command(model_dir, port, device, dtype, continuous_batching), stdout=log, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + timeout
        while True:
            if process.poll() is not None:
                log.seek(0)
                last = log.read().strip().splitlines()[-1:] or ["no message"]
                raise QLoRAGuideError(f"transformers serve stopped before answering: {last[0]}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5):
                    break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                if time.monotonic() > deadline:
                    raise QLoRAGuideError(f"transformers serve did not answer within {timeout:.0f} s") from None
                time.sleep(0.5)
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()
