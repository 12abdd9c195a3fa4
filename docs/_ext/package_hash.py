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


def package_source_hash(package_dir: Path, *more: Path, length: int = 12) -> str:
    """sha256 over the names and bytes of every file of the package, and of the folders in ``more``.

    ``more`` holds what else the executions read: the docs pass the catalogues
    of their outputs' translations, which the cells read when they run.
    """
    digest = hashlib.sha256()
    for folder in (package_dir, *more):
        for path in package_files(folder):
            digest.update(f"{folder.name}/{path.relative_to(folder).as_posix()}".encode())
            digest.update(b"\0")
            digest.update(path.read_bytes())
            digest.update(b"\0")
    return digest.hexdigest()[:length]


def execution_cache_name(docs_dir: Path) -> str:
    """The name of the docs' execution cache: the hash of the package and of the outputs' catalogues.

    ``conf.py`` builds the cache path from it and ``tools/build_site.py`` prunes every other cache,
    so the two must compute the same name.
    """
    return package_source_hash(docs_dir.parent / "qlora_guide", *sorted((docs_dir / "locales").glob("*/outputs")))
