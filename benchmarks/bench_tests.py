"""The test suite as ``nox -s tests`` runs it, in one process and with its pytest-xdist workers, side by side.

    python benchmarks/bench_tests.py                           # serial, then the default workers
    QLORA_GUIDE_CPU_BF16=0 python benchmarks/bench_tests.py    # the float32 path, as on a CPU without native bf16

Both runs use the same nox environment (installed once, before them, untimed) and the
same converted model cache, so they differ only in how the tests are spread. Each
prints pytest's own summary; the wall times are printed together at the end.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RUNS = {
    "one process (-n 0)": ["-q", "-n", "0"],
    f"{min(4, os.cpu_count() or 1)} xdist workers (the default)": [],
}


def main() -> None:
    nox = [sys.executable, "-m", "nox", "-s", "tests"]
    subprocess.run([*nox, "--install-only"], cwd=REPO, check=True)
    seconds = {}
    for name, args in RUNS.items():
        start = time.perf_counter()
        code = subprocess.run([*nox, "--", *args] if args else nox, cwd=REPO).returncode
        seconds[name] = time.perf_counter() - start
        if code != 0:
            sys.exit(f"bench_tests: the {name} run failed with exit code {code}")
    print(f"\n{'nox -s tests':<32} {'wall s':>8} {'min':>6}")
    for name, s in seconds.items():
        print(f"{name:<32} {s:8.1f} {s / 60:6.1f}")
    cpu = "float32 path forced" if os.environ.get("QLORA_GUIDE_CPU_BF16") == "0" else "bf16 where the CPU has it"
    print(f"({os.cpu_count()} CPUs, {cpu})")


if __name__ == "__main__":
    main()
