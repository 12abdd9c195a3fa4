"""The test suite as ``nox -s tests`` runs it, in one process and with its pytest-xdist workers, side by side.

    python benchmarks/bench_tests.py                           # serial, then the default workers
    QLORA_GUIDE_CPU_BF16=0 python benchmarks/bench_tests.py    # the float32 path, as on a CPU without native bf16

Both runs use the same nox environment (installed once, before them, untimed) and the
same converted model cache, so they differ only in how the tests are spread. Each
prints pytest's own summary; wall time and peak memory (all the processes of the run
together) are printed side by side at the end.
"""

from __future__ import annotations

import os
import subprocess
import sys

from bench_docs import REPO, print_table, timed

RUNS = {
    "one process (-n 0)": ["--", "-q", "-n", "0"],
    f"{min(4, os.cpu_count() or 1)} xdist workers (the default)": [],
}


def main() -> None:
    nox = [sys.executable, "-m", "nox", "-s", "tests"]
    subprocess.run([*nox, "--install-only"], cwd=REPO, check=True)
    print_table("nox -s tests", {name: timed([*nox, *args]) for name, args in RUNS.items()})


if __name__ == "__main__":
    main()
