"""Short hash of the companion package's source, used to name the execution cache.

myst-nb keys its cache on a notebook's code only, so a change in ``qlora_guide``
would not re-execute the pages that call it. Putting this hash in the cache
path does: a package change starts a fresh cache, a prose-only change re-uses
the old one, and the English and French builds share it.
"""

from __future__ import annotations

import hashlib
from pathlib import Path


def package_files(package_dir: Path) -> list[Path]:
    """Every file the package ships (code, recipes, datasets, bundled model configs), bytecode caches left out."""
    return sorted(
        path for path in package_dir.rglob("*")
        if path.is_file() and "__pycache__" not in path.parts and path.suffix != ".pyc"
    )


def package_source_hash(package_dir: Path, length: int = 12) -> str:
    """sha256 over the names and bytes of every file of the package."""
    files = package_files(package_dir)
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.relative_to(package_dir).as_posix().encode())
        digest.update(b"\0")
        digest.update(path.read_bytes())
        digest.update(b"\0")
    return digest.hexdigest()[:length]
