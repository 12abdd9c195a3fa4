"""The French words of what the package draws and prints, looked up by their English text.

The package's own labels (figure titles, axes, legends, table headers) live
in ``fr.yaml`` beside this file. A project adds its own (the guide adds the
sentences its pages print) in more YAML files, named by the environment
variable ``QLORA_GUIDE_CATALOGUES``: files or folders of ``*.yaml`` files,
separated by ``os.pathsep``, where ``{lang}`` stands for the language (the
guide sets ``docs/locales/{lang}/outputs``).

Lookups are strict: a label with no French is an error that names it and the
files to add it to, so a French output can never fall back to English
unnoticed. English is the source language and reads no file.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from functools import cache
from pathlib import Path

import yaml

from qlora_guide.errors import QLoRAGuideError

LANGUAGES = ("en", "fr")
SOURCE_LANGUAGE = "en"
CATALOGUES_ENV = "QLORA_GUIDE_CATALOGUES"


class MissingTranslation(QLoRAGuideError):
    """A label asked for in a language whose catalogues do not have it."""


def catalogue_files(lang: str) -> tuple[Path, ...]:
    """The YAML files that hold ``lang``'s labels: the package's, then the project's."""
    own = Path(__file__).with_name(f"{lang}.yaml")
    extra = [Path(p.replace("{lang}", lang)) for p in os.environ.get(CATALOGUES_ENV, "").split(os.pathsep) if p]
    files = []
    for path in extra:
        files.extend(sorted(path.glob("*.yaml")) if path.is_dir() else [path])
    return (own, *files)


@cache
def _load(files: tuple[Path, ...]) -> dict[str, str]:
    """The labels of ``files`` in one mapping; the same label translated twice differently is an error."""
    table: dict[str, str] = {}
    for path in files:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        if not isinstance(data, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in data.items()):
            raise QLoRAGuideError(f"{path}: a catalogue maps English text to translated text, both strings")
        for english, translated in data.items():
            if table.get(english, translated) != translated:
                raise QLoRAGuideError(f"{path}: {english!r} is translated twice, as {table[english]!r} and {translated!r}")
            table[english] = translated
    return table


def catalogue(lang: str) -> dict[str, str]:
    """Every label known in ``lang``, English text to translated text."""
    if lang not in LANGUAGES:
        raise QLoRAGuideError(f"language must be one of {', '.join(LANGUAGES)}, not {lang!r}")
    if lang == SOURCE_LANGUAGE:
        return {}
    return _load(tuple(p for p in catalogue_files(lang) if p.is_file()))


def typeset(text: str, lang: str) -> str:
    """What Sphinx's smart quotes do to the prose, for text drawn or printed: in French, l'adaptateur -> l’adaptateur."""
    return re.sub(r"(?<=\w)'(?=\w)", "\u2019", text) if lang == "fr" else text


def translate(text: str, lang: str = "en", strict: bool = True) -> str:
    """``text`` (English) in ``lang``.

    With ``strict`` (the default, for the words of a label), a text no
    catalogue has is a :class:`MissingTranslation`; without, it is returned as
    it is (for data that may be a name or code: a layer's name, a dtype).
    """
    if lang == SOURCE_LANGUAGE:
        return text
    table = catalogue(lang)
    try:
        return typeset(table[text], lang)
    except KeyError:
        if not strict:
            return text
        files = ", ".join(str(p) for p in catalogue_files(lang))
        raise MissingTranslation(f"no {lang} text for {text!r}: add it to one of {files}") from None


def translator(lang: str = "en") -> Callable[[str], str]:
    """``translate`` with the language fixed: ``t = translator(lang); t("training loss")``."""
    catalogue(lang)  # an unknown language fails here, before anything is drawn
    return lambda text: translate(text, lang)
