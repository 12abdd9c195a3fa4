"""Print how long each page took to execute, and keep the figures in ``_build/execution-times-<lang>.json``.

myst-nb records every page's execution (its run time, and whether it came from
the execution cache) in the build environment; this prints them, longest
first, when the build finishes, so that a page that grows slow shows at once.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def execution_times(env: Any) -> list[dict[str, Any]]:
    """One row per executed page: its name, run time in seconds and how it ran (cache or executed now)."""
    from myst_nb.sphinx_ import NbMetadataCollector

    rows = []
    for docname in sorted(env.found_docs):
        data = NbMetadataCollector.get_exec_data(env, docname)
        if data:
            rows.append({"page": docname, "seconds": round(float(data.get("runtime") or 0.0), 1),
                         "method": data.get("method"), "succeeded": data.get("succeeded")})
    return sorted(rows, key=lambda r: -r["seconds"])


def times_path(app: Any) -> Path:
    """Where this language's build keeps its per-page times: ``_build/execution-times-<lang>.json``."""
    return Path(app.outdir).parent.parent / f"execution-times-{app.config.language or 'en'}.json"


def report(app: Any, exception: Exception | None) -> None:
    if exception is not None:
        return
    rows = execution_times(app.env)
    if not rows:
        return
    language = app.config.language or "en"
    out = times_path(app)
    total = sum(r["seconds"] for r in rows)
    out.write_text(json.dumps({"language": language, "total_seconds": round(total, 1), "pages": rows}, indent=2))
    print(f"execution time per page ({language}; a cached page shows the time of the run that filled the cache):")
    for row in rows:
        print(f"  {row['seconds']:8.1f} s  {row['page']}")
    print(f"  {total:8.1f} s  summed over the pages (several may have run at once) -> {out}")


def setup(app: Any) -> dict[str, Any]:
    app.connect("build-finished", report)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
