"""One French terminology (docs/locales/fr/terminology.yaml) in the prose, the figures and the outputs.

Every French text a reader sees is checked: the msgstr of every catalogue of
the site, the package's figure labels, and the sentences and labels of the
pages' outputs. A word the term list says to avoid, an English decimal point
or a plain space before a percent sign fails, naming the file and the text.
"""

from __future__ import annotations

import re
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
FRENCH = REPO / "docs" / "locales" / "fr"
TERMINOLOGY = yaml.safe_load((FRENCH / "terminology.yaml").read_text(encoding="utf-8"))

ROLE = re.compile(r"\{(?P<name>[\w:-]+)\}`(?P<body>[^`]*)`")
TARGET = re.compile(r"\s*<[^<>]*>$")


def prose(text: str) -> str:
    """The words a reader reads in a msgstr: roles' visible text kept, code, math, glued values and URLs left out."""
    def visible(match: re.Match) -> str:
        name, body = match["name"], match["body"]
        if name.startswith("glue") or name in ("math", "eq", "numref", "ref") and "<" not in body:
            return " "
        return TARGET.sub("", body)

    text = re.sub(r"\$\$.*?\$\$|\$[^$]+\$", " ", text, flags=re.S)
    text = ROLE.sub(visible, text)
    text = re.sub(r"``.*?``|`[^`]*`", " ", text)
    return re.sub(r"https?://\S+|\]\([^)]*\)", " ", text)


def french_texts() -> list[tuple[str, str]]:
    """(where, text) for every msgstr of the site and every French output label and sentence."""
    from babel.messages.pofile import read_po

    texts = []
    for po in sorted((FRENCH / "LC_MESSAGES").rglob("*.po")):
        with po.open("rb") as f:
            catalog = read_po(f)
        texts += [(po.relative_to(REPO).as_posix(), m.string) for m in catalog if m.id and m.string]
    for path in [REPO / "qlora_guide" / "i18n" / "fr.yaml", *sorted((FRENCH / "outputs").glob("*.yaml"))]:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        # a template's {fields} are code: the values that fill them are checked where they are written
        texts += [(path.relative_to(REPO).as_posix(), re.sub(r"\{[\w.]*(?::[^{}]*)?\}", " ", value))
                  for value in data.values()]
    return texts


def test_the_term_list_is_well_formed():
    terms = TERMINOLOGY["terms"]
    assert len(terms) >= 20
    for term in terms:
        assert set(term) <= {"en", "fr", "avoid", "note"} and term["en"] and term["fr"], term
        for word in term.get("avoid", []):
            assert not re.search(rf"\b{re.escape(word)}\b", term["fr"], re.I), f"{term['en']}: avoids its own {word!r}"
    english = [t["en"].lower() for t in terms]
    assert len(english) == len(set(english)), "a term is listed twice"


AVOID = [(word, term["fr"]) for term in TERMINOLOGY["terms"] for word in term.get("avoid", [])]


def test_french_texts_use_the_term_list(french_figures):
    from conftest import figure_texts

    texts = french_texts() + [(f"figure {name}", t) for name, fig in french_figures.items() for t in figure_texts(fig)]
    assert len(texts) > 600  # every catalogue was read
    problems = []
    for where, text in texts:
        words = prose(text)
        for word, preferred in AVOID:
            if re.search(rf"(?<![\w-]){re.escape(word)}(?![\w-])", words, re.I):
                problems.append(f"{where}: {word!r} (write {preferred!r}) in {text[:90]!r}")
    assert not problems, "\n".join(problems)


VERSION = re.compile(rf"(?:{'|'.join(map(re.escape, TERMINOLOGY['versioned']))})[: ]?$", re.I)


def english_decimals(text: str) -> list[str]:
    """The numbers of ``text`` written with a decimal point, versions (peft 0.21, 127.0.0.1) left out."""
    found = []
    for match in re.finditer(r"(?<![\w.])\d+\.\d[\d.]*(?![\w])", text):
        if match[0].count(".") == 1 and not VERSION.search(text[: match.start()]):
            found.append(match[0])
    return found


def test_french_numbers_have_a_decimal_comma_and_a_narrow_space_before_percent():
    problems = []
    for where, text in french_texts():
        math = " ".join(re.findall(r"\$\$.*?\$\$|\$[^$]+\$", text, flags=re.S))
        if english_decimals(prose(text)) or re.search(r"(?<![\w.{])\d+\.\d", math):
            problems.append(f"{where}: English decimal point in {text[:90]!r}")
        if re.search(r"(\d|`) %", text):
            problems.append(f"{where}: a plain space before % (write U+202F) in {text[:90]!r}")
    assert not problems, "\n".join(problems)
