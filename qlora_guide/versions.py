"""The versions of the stack: shown by ``qlora-guide check`` and recorded in every run's and merge's manifest."""

from __future__ import annotations

import platform
import sys
from importlib import metadata

STACK = ("qlora-guide", "torch", "transformers", "peft", "bitsandbytes", "accelerate", "datasets", "safetensors")


def package_versions(names: tuple[str, ...] = STACK) -> dict[str, str | None]:
    """Python's version and each package's (None when it is not installed), read from the install's metadata.

    Where torch is already imported its ``__version__`` is used: it names the
    build (``+cpu``, ``+cu130``), which the package metadata may not.
    """
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    if "torch" in names and "torch" in sys.modules:
        versions["torch"] = sys.modules["torch"].__version__
    return versions
