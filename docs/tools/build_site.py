"""Build the bilingual site: English, the French catalogue check, French, the root page.

Usage (from the repository root)::

    python docs/tools/build_site.py                  # both languages, warnings are errors
    python docs/tools/build_site.py --lang en        # English only
    python docs/tools/build_site.py --update-po      # refresh docs/locales/fr from the English text
    python docs/tools/build_site.py --check-po-only  # is the French catalogue complete?
    python docs/tools/build_site.py --strict         # also nitpicky, and stale msgids fail

The published tree is ``docs/_build/html``: ``en/``, ``fr/`` and an ``index.html``
that sends the reader to their language. Executed notebooks, doctrees and the
execution cache live beside it, in ``docs/_build``, never inside it.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

DOCS = Path(__file__).resolve().parents[1]
REPO = DOCS.parent
BUILD = DOCS / "_build"
HTML = BUILD / "html"
GETTEXT = BUILD / "gettext"
DOCTREES = BUILD / "doctrees"
CACHE_ROOT = BUILD / ".jupyter_cache"
LOCALES = DOCS / "locales"
SOURCE_LANGUAGE = "en"
LANGUAGES = ("en", "fr")
LANGUAGE_NAMES = {"en": "English", "fr": "Français"}

# What must never be published: executed notebooks, build environments,
# compiled catalogues, execution logs.
LEFTOVER_DIRS = ("jupyter_execute", ".doctrees", "reports", ".jupyter_cache")
LEFTOVER_FILE_PATTERNS = ("*.mo", "*.err.log", ".buildinfo.bak")


class BuildError(Exception):
    """A build step failed; the message says which and why."""


@contextmanager
def step(name: str) -> Iterator[None]:
    """Print a step's name, then how long it took."""
    print(f"==> {name}", flush=True)
    start = time.perf_counter()
    try:
        yield
    finally:
        print(f"<== {name}: {time.perf_counter() - start:.1f} s", flush=True)


def run(command: Sequence[str | Path], what: str) -> None:
    """Run a command from the repository root; raise BuildError if it fails."""
    command = [str(part) for part in command]
    completed = subprocess.run(command, cwd=REPO)
    if completed.returncode != 0:
        raise BuildError(f"{what} failed (exit {completed.returncode}): {' '.join(command)}")


# -- Sphinx builds -------------------------------------------------------------


def sphinx_build(
    builder: str, outdir: Path, doctrees: Path, options: Sequence[str] = (), strict: bool = False
) -> None:
    """Run sphinx-build from scratch (-E) with warnings as errors (-W --keep-going).

    An incremental build does not repeat the warnings of unchanged pages, so
    every build here rereads everything; the execution cache keeps that cheap.
    """
    command = [sys.executable, "-m", "sphinx", "-E", "-W", "--keep-going", "-b", builder, "-d", doctrees]
    if strict:
        command.append("-n")
    command += [*options, DOCS, outdir]
    run(command, f"sphinx-build -b {builder}")


def build_html(language: str, strict: bool = False) -> Path:
    """Build one language into docs/_build/html/<language> (emptied first)."""
    outdir = HTML / language
    shutil.rmtree(outdir, ignore_errors=True)
    options = [] if language == SOURCE_LANGUAGE else ["-D", f"language={language}"]
    sphinx_build("html", outdir, DOCTREES / language, options, strict)
    return outdir


def extract_messages(strict: bool = False) -> Path:
    """Extract the English text into .pot files under docs/_build/gettext.

    Only prose is translated (code cells and outputs are not), so the pages are
    not executed for this step, and glue roles, which need outputs, stay as
    they are written.
    """
    shutil.rmtree(GETTEXT, ignore_errors=True)
    options = ["-D", "nb_execution_mode=off", "-D", "suppress_warnings=mystnb.glue"]
    sphinx_build("gettext", GETTEXT, DOCTREES / "gettext", options, strict)
    return GETTEXT


# -- Catalogues ----------------------------------------------------------------


def update_catalogues(languages: Sequence[str]) -> None:
    """Merge the fresh .pot files into docs/locales/<lang>/LC_MESSAGES/*.po (sphinx-intl update)."""
    command = [sys.executable, "-m", "sphinx_intl", "update", "-p", GETTEXT, "-d", LOCALES]
    command += ["-w", "0", "--no-obsolete"]  # one line per message; drop the ones no page uses
    for language in languages:
        command += ["-l", language]
    run(command, "sphinx-intl update")


def compile_catalogues(languages: Sequence[str]) -> None:
    """Compile the .po files into .mo files beside them (sphinx-intl build).

    The old .mo files go first: sphinx-intl and Sphinx skip a .po that is older
    than its .mo (a .po restored from version control, for instance), and a
    stale .mo silently shows English.
    """
    for language in languages:
        for compiled in (LOCALES / language).rglob("*.mo"):
            compiled.unlink()
    command = [sys.executable, "-m", "sphinx_intl", "build", "-d", LOCALES]
    for language in languages:
        command += ["-l", language]
    run(command, "sphinx-intl build")


@dataclass(frozen=True)
class CatalogueProblem:
    """One message that will not appear translated."""

    po: str  # the .po file, with the line of the entry when there is one
    source: str  # where the English text is, page:line ("" for a stale message)
    kind: str  # "missing", "untranslated", "fuzzy" or "stale"
    msgid: str

    def __str__(self) -> str:
        text = self.msgid if len(self.msgid) <= 70 else self.msgid[:67] + "..."
        where = f" (English text at {self.source})" if self.source else ""
        return f"{self.po}: {self.kind}: {text!r}{where}"


def _source_location(locations: Sequence[tuple[str, int | None]]) -> str:
    """The first ``#:`` location of a message, as a path relative to the repository."""
    for filename, line in locations:
        path = (GETTEXT / filename).resolve()
        shown = path.relative_to(REPO).as_posix() if path.is_relative_to(REPO) else filename
        return f"{shown}:{line}" if line else shown
    return "unknown"


def catalogue_problems(
    language: str, pot_dir: Path = GETTEXT, locale_dir: Path = LOCALES
) -> list[CatalogueProblem]:
    """Compare every .pot with its .po: missing, empty, fuzzy and stale messages.

    Sphinx silently falls back to English for a missing, empty or fuzzy
    message, so this is the only place where an incomplete translation shows.
    """
    from babel.messages.pofile import read_po

    problems: list[CatalogueProblem] = []
    for pot_path in sorted(pot_dir.rglob("*.pot")):
        po_path = locale_dir / language / "LC_MESSAGES" / pot_path.relative_to(pot_dir).with_suffix(".po")
        po_shown = po_path.relative_to(REPO).as_posix() if po_path.is_relative_to(REPO) else str(po_path)
        with pot_path.open("rb") as handle:
            template = read_po(handle)
        catalogue = None
        if po_path.exists():
            with po_path.open("rb") as handle:
                catalogue = read_po(handle, locale=language)
        for message in template:
            if not message.id:
                continue
            source = _source_location(message.locations)
            entry = catalogue.get(message.id, message.context) if catalogue is not None else None
            if entry is None:
                problems.append(CatalogueProblem(po_shown, source, "missing", message.id))
            elif not entry.string or entry.fuzzy:
                kind = "fuzzy" if entry.string else "untranslated"
                problems.append(CatalogueProblem(f"{po_shown}:{entry.lineno}", source, kind, message.id))
        if catalogue is not None:
            known = {(message.id, message.context) for message in template}
            for entry in catalogue:
                if entry.id and (entry.id, entry.context) not in known:
                    problems.append(CatalogueProblem(f"{po_shown}:{entry.lineno}", "", "stale", entry.id))
    return problems


def check_catalogue(language: str, strict: bool = False) -> None:
    """Fail if a message of the English pages has no finished translation.

    Stale messages (no longer in the English text) are listed; they fail the
    check only with ``strict``.
    """
    problems = catalogue_problems(language)
    blocking = [p for p in problems if p.kind != "stale" or strict]
    for problem in problems:
        print(f"  {problem}")
    if blocking:
        raise BuildError(
            f"the {LANGUAGE_NAMES[language]} catalogue is incomplete: {len(blocking)} message(s) above "
            f"(run with --update-po, then translate in {LOCALES.relative_to(REPO)}/{language}/LC_MESSAGES)"
        )
    print(f"  {LANGUAGE_NAMES[language]} catalogue complete")


# -- Published tree ------------------------------------------------------------

ROOT_PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
  <meta charset="utf-8">
  <meta name="viewport" content="width=device-width, initial-scale=1">
  <title>QLoRA guide · Guide QLoRA</title>
  <link rel="alternate" hreflang="en" href="en/index.html">
  <link rel="alternate" hreflang="fr" href="fr/index.html">
  <script>
    // Send the reader to the first of their preferred languages that the site has.
    (function () {
      var preferred = navigator.languages || [navigator.language || ""];
      var target = "en";
      for (var i = 0; i < preferred.length; i++) {
        var code = String(preferred[i]).toLowerCase();
        if (code.indexOf("fr") === 0) { target = "fr"; break; }
        if (code.indexOf("en") === 0) { break; }
      }
      window.location.replace(target + "/index.html" + window.location.hash);
    })();
  </script>
  <noscript><meta http-equiv="refresh" content="0; url=en/index.html"></noscript>
</head>
<body>
  <p><a href="en/index.html" hreflang="en">QLoRA guide (English)</a></p>
  <p><a href="fr/index.html" hreflang="fr" lang="fr">Guide QLoRA (français)</a></p>
</body>
</html>
"""


def write_root_page(html_dir: Path = HTML) -> None:
    """Write the language-choosing index.html and .nojekyll at the root of the site."""
    html_dir.mkdir(parents=True, exist_ok=True)
    (html_dir / "index.html").write_text(ROOT_PAGE, encoding="utf-8")
    (html_dir / ".nojekyll").write_text("", encoding="utf-8")


def leftovers(html_dir: Path = HTML) -> list[Path]:
    """Build by-products under the published tree."""
    found = [p for name in LEFTOVER_DIRS for p in html_dir.rglob(name) if p.is_dir()]
    found += [p for pattern in LEFTOVER_FILE_PATTERNS for p in html_dir.rglob(pattern) if p.is_file()]
    return sorted(set(found))


def remove_leftovers(html_dir: Path = HTML) -> None:
    """Remove build by-products (executed notebooks, logs, .mo files) from the published tree."""
    for path in leftovers(html_dir):
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def clean_published_tree(html_dir: Path = HTML) -> None:
    """Remove build by-products from the published tree, then make sure none is left."""
    remove_leftovers(html_dir)
    remaining = leftovers(html_dir)
    if remaining:
        raise BuildError("leftovers in the published tree: " + ", ".join(str(p) for p in remaining))


def prune_execution_caches(keep: str) -> None:
    """Delete execution caches of other package versions (they are never read again)."""
    if not CACHE_ROOT.is_dir():
        return
    for folder in CACHE_ROOT.iterdir():
        if folder.is_dir() and folder.name != keep:
            shutil.rmtree(folder)
            print(f"  removed the stale execution cache {folder.relative_to(REPO)}")


def current_cache_name() -> str:
    """The hash that conf.py puts in the execution cache path."""
    sys.path.insert(0, str(DOCS / "_ext"))
    try:
        from package_hash import execution_cache_name
    finally:
        sys.path.pop(0)
    return execution_cache_name(DOCS)


# -- The whole build -----------------------------------------------------------


def build_site(languages: Sequence[str] = LANGUAGES, strict: bool = False, update_po: bool = False) -> None:
    """Build the requested languages, check the translations, assemble the published tree."""
    translations = [lang for lang in languages if lang != SOURCE_LANGUAGE]
    cache = current_cache_name()
    print(f"execution cache: {(CACHE_ROOT / cache).relative_to(REPO)}")
    with step("prune old execution caches"):
        prune_execution_caches(keep=cache)
    try:
        if SOURCE_LANGUAGE in languages:
            with step(f"{LANGUAGE_NAMES[SOURCE_LANGUAGE]} HTML"):
                build_html(SOURCE_LANGUAGE, strict)
        if translations:
            with step("extract messages (gettext)"):
                extract_messages(strict)
            if update_po:
                with step("update catalogues (sphinx-intl update)"):
                    update_catalogues(translations)
            with step("compile catalogues (sphinx-intl build)"):
                compile_catalogues(translations)
            for language in translations:
                with step(f"check the {LANGUAGE_NAMES[language]} catalogue"):
                    check_catalogue(language, strict)
            for language in translations:
                with step(f"{LANGUAGE_NAMES[language]} HTML"):
                    build_html(language, strict)
    finally:
        remove_leftovers()  # even after a failure, no by-product stays in the published tree
    with step("assemble the published tree"):
        write_root_page()
        clean_published_tree()


def check_po_only(languages: Sequence[str], strict: bool = False, update_po: bool = False) -> None:
    """Extract the English messages and check the catalogues, without building HTML."""
    translations = [lang for lang in languages if lang != SOURCE_LANGUAGE]
    translations = translations or [lang for lang in LANGUAGES if lang != SOURCE_LANGUAGE]
    with step("extract messages (gettext)"):
        extract_messages(strict)
    if update_po:
        with step("update catalogues (sphinx-intl update)"):
            update_catalogues(translations)
    for language in translations:
        with step(f"check the {LANGUAGE_NAMES[language]} catalogue"):
            check_catalogue(language, strict)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--lang", nargs="+", choices=LANGUAGES, default=list(LANGUAGES), help="languages to build"
    )
    parser.add_argument(
        "--strict", action="store_true", help="nitpicky references; stale msgids fail the check"
    )
    parser.add_argument(
        "--update-po", action="store_true", help="refresh the .po files from the English text"
    )
    parser.add_argument(
        "--check-po-only", action="store_true", help="only check that the catalogues are complete"
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: 0 when everything built and checked, 1 otherwise."""
    args = parse_args(argv)
    start = time.perf_counter()
    try:
        if args.check_po_only:
            check_po_only(args.lang, args.strict, args.update_po)
        else:
            build_site(args.lang, args.strict, args.update_po)
    except BuildError as error:
        print(f"build_site: error: {error}", file=sys.stderr)
        return 1
    print(f"build_site: done in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
