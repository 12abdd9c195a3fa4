"""``qlora-guide export``: a merged model (or a run, merged first) in a file format other tools load.

One module per format beside this one; :data:`FORMATS` maps each format to its
exporter. GGUF (:mod:`~qlora_guide.deployment.gguf_export`) is what llama.cpp
and Ollama load.
"""

from __future__ import annotations

import os
from typing import Any, Literal

from qlora_guide.errors import QLoRAGuideError

FORMATS = {"gguf": "qlora_guide.deployment.gguf_export"}


def export(source: str | os.PathLike, out: str | os.PathLike, format: Literal["gguf"] = "gguf",
           outtype: Literal["q8_0", "f16", "f32"] = "q8_0",
           overwrite: bool = False, check_parity: bool = True) -> Any:
    """Write the merged model of ``source`` (a merged folder, or a run or adapter folder) to the file ``out``."""
    import importlib

    if format not in FORMATS:
        raise QLoRAGuideError(f"format must be one of {', '.join(FORMATS)}, not {format!r}")
    module = importlib.import_module(FORMATS[format])
    return module.export_gguf(source, out, outtype=outtype, overwrite=overwrite, check_parity=check_parity)


def format_export(result: Any) -> str:
    """The export as the CLI prints it."""
    from qlora_guide.deployment.gguf_export import format_gguf_export

    return format_gguf_export(result)
