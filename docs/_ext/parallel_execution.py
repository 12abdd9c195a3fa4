"""Execute the pages missing from the execution cache several at a time, before Sphinx reads them.

myst-nb executes a page when Sphinx reads it, so a cold build executes one page after
another, each kernel using every core. The pages' work (a 135M model on a few hundred
tokens) is too small to keep two cores busy from one process: on a 2-core CPU, 4 steps
of the demo recipe took 40 s with two threads and 52 s with one, while two one-thread
runs side by side took 58 s together. Running pages two at a time, one thread each,
therefore gets through them sooner.

Each page is turned into the notebook myst-nb would make of it, executed as myst-nb
executes it (same kernel, same timeout, a temporary working folder) and stored in the
same jupyter-cache, so that Sphinx then finds every page there and executes nothing. A
page that fails here is not stored: Sphinx executes it again and reports its error as
it always does. Pages that share a training run take it through
``qlora_guide.training.train_once``, whose lock makes one wait while the other trains.

``QLORA_GUIDE_DOCS_WORKERS`` sets how many pages execute at once (default: 2 where
there are at least 2 cores, 1 turns this off); the cores are shared out between them
through ``OMP_NUM_THREADS``.
"""

from __future__ import annotations

import json
import math
import os
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from tempfile import TemporaryDirectory
from typing import Any

from execution_times import times_path
from sphinx.util import logging

logger = logging.getLogger(__name__)


def workers() -> int:
    """How many pages execute at once."""
    default = 2 if (os.cpu_count() or 1) >= 2 else 1
    return max(1, int(os.environ.get("QLORA_GUIDE_DOCS_WORKERS", default)))


def _execute(notebook: Any, timeout: int | None, allow_errors: bool, threads: int) -> tuple[Any, float, str | None]:
    """Execute one notebook in a temporary folder, as myst-nb's cache mode does; (notebook, seconds, error)."""
    from jupyter_cache.executors.utils import single_nb_execution

    os.environ["OMP_NUM_THREADS"] = str(threads)  # the kernel inherits it
    with TemporaryDirectory() as cwd:
        result = single_nb_execution(notebook, cwd=os.path.abspath(cwd), timeout=timeout,
                                     allow_errors=allow_errors, meta_override=True)
    return result.nb, result.time, result.exc_string if result.err is not None else None


def previous_seconds(app: Any) -> dict[str, float]:
    """Each page's execution time in the last build of this language, if there was one (longest pages go first)."""
    try:
        return {row["page"]: row["seconds"] for row in json.loads(times_path(app).read_text())["pages"]}
    except (OSError, ValueError, KeyError):
        return {}


def uncached_pages(cache: Any, env: Any, docnames: list[str]) -> list[tuple[str, str, Any, Any]]:
    """(docname, path, notebook, read format) of each page to read that is a notebook missing from ``cache``."""
    from myst_nb.core.read import create_nb_reader

    pages = []
    for docname in docnames:
        path = str(env.doc2path(docname))
        text = Path(path).read_text(encoding="utf-8")
        reader = create_nb_reader(path, env.myst_config, env.mystnb_config, text)
        if reader is None:
            continue
        notebook = reader.read(text)
        if not any(cell.cell_type == "code" for cell in notebook.cells):
            continue
        try:
            cache.match_cache_notebook(notebook)
        except KeyError:
            pages.append((docname, path, notebook, reader.read_fmt))
    return pages


def execute_missing_pages(app: Any, env: Any, docnames: list[str]) -> None:
    """Fill the execution cache with every page it lacks, ``workers()`` pages at a time."""
    config = env.mystnb_config
    count = workers()
    if config.execution_mode != "cache" or count < 2:
        return
    from jupyter_cache import get_cache
    from jupyter_cache.base import CacheBundleIn

    cache = get_cache(config.execution_cache_path)
    pages = uncached_pages(cache, env, docnames)
    if len(pages) < 2:
        return  # nothing to run side by side: myst-nb executes it as usual
    # Longest first, so that no long page starts last: as timed by the previous build, else the
    # pages whose front matter says `execute_first: true`, then the others in the order of the site.
    seconds = previous_seconds(app)
    pages.sort(key=lambda page: -seconds.get(page[0], math.inf if page[2].metadata.get("execute_first") else 0.0))
    threads = max(1, (os.cpu_count() or 1) // count)
    logger.info(f"executing {len(pages)} pages, {count} at a time with {threads} thread(s) each")
    start = time.perf_counter()
    with ProcessPoolExecutor(max_workers=count) as pool:
        futures = {pool.submit(_execute, notebook, config.execution_timeout, config.execution_allow_errors,
                               threads): (docname, path, read_fmt)
                   for docname, path, notebook, read_fmt in pages}
        for future in as_completed(futures):
            docname, path, read_fmt = futures[future]
            notebook, run_time, error = future.result()
            if error is not None:
                logger.info(f"  {docname}: failed, Sphinx will execute it again and report the error")
                continue
            cache.add_nb_to_project(path, read_data=read_fmt)
            cache.cache_notebook_bundle(CacheBundleIn(notebook, path, data={"execution_seconds": run_time}),
                                        check_validity=False, overwrite=True)
            logger.info(f"  {docname}: {run_time:.1f} s")
    logger.info(f"pages executed in {time.perf_counter() - start:.1f} s of wall time")


def setup(app: Any) -> dict[str, Any]:
    app.connect("env-before-read-docs", execute_missing_pages)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
