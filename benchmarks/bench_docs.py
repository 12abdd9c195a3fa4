"""The docs build as a reader runs it: cold, again with nothing changed, and after a prose-only change.

    python benchmarks/bench_docs.py            # the three builds, then the figures side by side
    python benchmarks/bench_docs.py --workers 1,2   # a cold build per page-worker count, side by side
    QLORA_GUIDE_CPU_BF16=0 python benchmarks/bench_docs.py   # the float32 path, as on a CPU without native bf16

"Cold" is ``nox -s docs`` in a fresh nox environment folder with no build folder
and no execution cache: the installs, every page executed in English, the French
build from the same cache, the embedded model converted into a fresh
cache folder. The existing ``docs/_build`` is moved aside to
``.bench-docs-previous-build`` first (nothing is deleted). The prose-only change
appends an HTML comment to ``docs/index.md`` and takes it out again afterwards.
Peak memory is the largest sum of the resident memory of the build's processes,
sampled every half second. Per-page execution times come from the build's own
``docs/_build/execution-times-en.json``.

``--workers 1,2`` times one cold build per count, with ``QLORA_GUIDE_DOCS_WORKERS``
set to it (1: pages one after another, each with every core; 2: two at a time, a core
each), each in a fresh build folder. The installs and the model's conversion are done
once before them, untimed, so that the rows differ only in how the pages were executed;
the last count then runs the two warm builds.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BUILD = REPO / "docs" / "_build"
PROSE_PAGE = REPO / "docs" / "index.md"


def tree_rss(pid: int) -> int:
    """Resident bytes of a process and all its descendants (0 when psutil is missing or the process ended)."""
    try:
        import psutil

        parent = psutil.Process(pid)
        return sum(p.memory_info().rss for p in [parent, *parent.children(recursive=True)])
    except Exception:
        return 0


def timed(command: list[str]) -> dict[str, float]:
    """Run a command from the repository root; its wall time and peak tree memory. Fails loudly."""
    start = time.perf_counter()
    process = subprocess.Popen(command, cwd=REPO)
    peak = 0

    def watch() -> None:
        nonlocal peak
        while process.poll() is None:
            peak = max(peak, tree_rss(process.pid))
            time.sleep(0.5)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    code = process.wait()
    watcher.join()
    if code != 0:
        sys.exit(f"bench_docs: {' '.join(command)} failed with exit code {code}")
    return {"seconds": time.perf_counter() - start, "peak_gib": peak / 2**30}


def print_table(title: str, results: dict[str, dict[str, float]]) -> None:
    """The runs' wall times and peak memory side by side, and which CPU path they took."""
    width = max(24, *(len(name) for name in results))
    print(f"\n{title:<{width}} {'wall s':>8} {'min':>6} {'peak GiB':>9}")
    for name, r in results.items():
        print(f"{name:<{width}} {r['seconds']:8.1f} {r['seconds'] / 60:6.1f} {r['peak_gib']:9.2f}")
    cpu = "float32 path forced" if os.environ.get("QLORA_GUIDE_CPU_BF16") == "0" else "bf16 where the CPU has it"
    print(f"({os.cpu_count()} CPUs, {cpu})")
    if not any(r["peak_gib"] for r in results.values()):
        print("(peak memory reads 0: psutil is not installed for this Python; pip install psutil)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--envdir", help="nox environment folder to use (default: a new temporary one)")
    parser.add_argument("--workers", help="comma-separated page-worker counts to compare in cold builds, e.g. 1,2")
    args = parser.parse_args()
    counts = [int(n) for n in args.workers.split(",")] if args.workers else []
    if BUILD.exists():
        aside = REPO / ".bench-docs-previous-build"  # outside docs/: Sphinx would read it as sources
        if aside.exists():
            sys.exit(f"bench_docs: {aside} already exists: remove it or move it away first")
        os.replace(BUILD, aside)
        print(f"bench_docs: the previous build folder is now {aside}")
    envdir = args.envdir or tempfile.mkdtemp(prefix="qlora-guide-bench-nox-")
    os.environ["QLORA_GUIDE_CACHE"] = str(Path(envdir) / "model-cache")  # the embedded model is converted too
    nox = [sys.executable, "-m", "nox", "--envdir", envdir, "-s", "docs"]
    results = {}
    if counts:
        subprocess.run([*nox, "--install-only"], cwd=REPO, check=True)
        python = Path(envdir) / "docs" / "bin" / "python"
        subprocess.run([str(python), "-c", "from qlora_guide.models import embedded_model_path; embedded_model_path()"],
                       cwd=REPO, check=True)
    for count in counts[:-1]:  # the last count runs the usual three builds below
        os.environ["QLORA_GUIDE_DOCS_WORKERS"] = str(count)
        results[f"cold, {count} worker(s)"] = timed(nox)
        shutil.rmtree(BUILD)  # this run's own build: the next one is cold again
    if counts:
        os.environ["QLORA_GUIDE_DOCS_WORKERS"] = str(counts[-1])
    results[f"cold, {counts[-1]} worker(s)" if counts else "cold"] = timed(nox)
    pages = json.loads((BUILD / "execution-times-en.json").read_text())
    results["nothing changed"] = timed(nox)
    original = PROSE_PAGE.read_text(encoding="utf-8")
    try:
        PROSE_PAGE.write_text(original + "\n<!-- a prose-only change -->\n", encoding="utf-8")
        results["prose-only change"] = timed(nox)
    finally:
        PROSE_PAGE.write_text(original, encoding="utf-8")
    if not args.envdir:
        shutil.rmtree(envdir, ignore_errors=True)

    print("\nexecution time per page (English, cold build):")
    for row in pages["pages"]:
        print(f"  {row['seconds']:8.1f} s  {row['page']}")
    print(f"  {pages['total_seconds']:8.1f} s  summed over the pages")
    print_table("nox -s docs", results)


if __name__ == "__main__":
    main()
