"""Output folders the package writes: never overwritten unasked, never anything but what it wrote, written atomically.

Every command that writes a folder (``train``, ``quantize``, ``merge``,
``evaluate --out``) goes through two functions:

* :func:`check_output_folder`, before any work: an existing file is refused;
  a non-empty folder is refused unless ``overwrite``; with ``overwrite``, a
  folder that holds something the package did not write (no marker of the
  same kind) is still refused, so ``--overwrite`` can never delete unrelated
  files; and an output that is one of the command's inputs, or contains one,
  or lies inside one, is refused.
* :func:`replace_folder`, at the end: the finished staging folder takes the
  output's place by rename; an old folder is set aside first and removed last.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from filelock import FileLock

from qlora_guide.errors import QLoRAGuideError

MARKER = ".qlora-guide-output.json"


def sha256_file(path: str | os.PathLike) -> str:
    """The SHA-256 of a file's content, read in 1 MiB blocks (what caches and checkpoint markers record)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary path beside ``path`` to write the file to: readers see the old file or the new one, never a part.

    When the block ends, the file is synced to disk and renamed over ``path``;
    when it raises, the temporary file is removed and ``path`` is untouched.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def lock_beside(path: str | os.PathLike) -> FileLock:
    """A lock between processes on ``path``, held through a hidden ``.<name>.lock`` file beside it.

    For work that several processes may start at once and only one must do (converting
    the embedded model, training a run that pages share): the first takes the lock and
    does it, the others wait, then find it done.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return FileLock(path.with_name(f".{path.name}.lock"))


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` through :func:`atomic_file`."""
    with atomic_file(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json_atomic(path: str | os.PathLike, data: object) -> None:
    """:func:`write_text_atomic` of ``data`` as indented JSON."""
    write_text_atomic(path, json.dumps(data, indent=2, ensure_ascii=False, default=str) + "\n")


def _inside(path: Path, folder: Path) -> bool:
    """True when ``path`` is ``folder`` or lies somewhere under it."""
    return path == folder or folder in path.parents


def check_output_folder(out: str | os.PathLike, overwrite: bool, kind: str, inputs: tuple[str | os.PathLike, ...] = (),
                        legacy: tuple[str, ...] = ()) -> Path:
    """Refuse, before any work, an output folder whose writing could lose data; return it as a Path.

    ``kind`` names what the package writes there (``merged``, ``quantized``);
    with ``overwrite``, only a folder that the package wrote for the same kind
    (its marker file, or for folders written before markers existed one of the
    ``legacy`` files) is replaced. ``inputs`` are the local paths the command
    reads: the output may not be one of them nor contain one.
    """
    out = Path(out).expanduser()
    resolved = out.resolve()
    for source in inputs:
        path = Path(source).expanduser()
        if path.exists() and _inside(path.resolve(), resolved):
            what = "is" if path.resolve() == resolved else "contains"
            raise QLoRAGuideError(f"output {out} {what} the input {source}: writing it would destroy what it is made from; choose another folder")
    if out.exists() and not out.is_dir():
        raise QLoRAGuideError(f"output {out} is a file, not a folder: choose another path")
    if not out.is_dir() or not any(out.iterdir()):
        return out
    if not overwrite:
        raise QLoRAGuideError(f"{out} already exists and is not empty: choose another folder or pass overwrite=True (--overwrite)")
    if not written_by_package(out, kind, legacy):
        example = next(p.name for p in sorted(out.iterdir()))
        raise QLoRAGuideError(
            f"--overwrite: {out} holds files that qlora-guide did not write as a {kind} folder (for example {example}): "
            "nothing was deleted; choose another folder"
        )
    return out


def written_by_package(folder: Path, kind: str, legacy: tuple[str, ...] = ()) -> bool:
    """True when ``folder`` carries the package's marker for ``kind`` (or one of the ``legacy`` signs)."""
    marker = folder / MARKER
    if marker.is_file():
        try:
            return json.loads(marker.read_text(encoding="utf-8")).get("kind") == kind
        except (OSError, ValueError):
            return False
    return any(_legacy_sign(folder, sign, kind) for sign in legacy)


def _legacy_sign(folder: Path, sign: str, kind: str) -> bool:
    """A folder written before markers existed: ``manifest.json`` saying the kind."""
    if sign != "manifest.json" or not (folder / sign).is_file():
        return False
    try:
        return json.loads((folder / sign).read_text(encoding="utf-8")).get("kind") == kind
    except (OSError, ValueError):
        return False


def staging_folder(out: Path, kind: str) -> Path:
    """A new temporary folder beside ``out`` (same file system, so the final rename is atomic), already marked."""
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.writing-", dir=out.parent))
    (staging / MARKER).write_text(json.dumps({"kind": kind, "writer": "qlora-guide"}) + "\n", encoding="utf-8")
    return staging


def replace_folder(staging: Path, out: Path) -> None:
    """Move the finished ``staging`` folder to ``out``; an old ``out`` is set aside first and removed last."""
    if not out.exists():
        os.replace(staging, out)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
    os.replace(out, old / out.name)
    os.replace(staging, out)
    shutil.rmtree(old, ignore_errors=True)
