"""A translated page whose heading is still the English one fails the build.

The catalogue check only sees that every message has a translation; Sphinx
still drops a translation that does not parse as the same kind of node (a
French heading "1. Sauvegarde" parses as a list, so the English "1. Saving"
stays). This extension remembers each heading's English text before the
translation is applied and warns when a translated build shows it unchanged,
unless the heading is code or a name that French writes the same
(``names`` in ``locales/<language>/terminology.yaml``).
"""

from __future__ import annotations

import re
from pathlib import Path

import yaml
from docutils import nodes
from sphinx.transforms import SphinxTransform
from sphinx.util import logging

logger = logging.getLogger(__name__)


def _same_words(app) -> set[str]:
    """Words a heading may keep in the translation: the names of the language's terminology file."""
    path = Path(app.srcdir) / "locales" / app.config.language / "terminology.yaml"
    if not path.is_file():
        return set()
    data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    return {word.lower() for name in data.get("names", []) for word in re.findall(r"\w+", name)}


def _prose(title: nodes.title) -> str:
    """The heading's text outside inline code."""
    return " ".join(t.astext() for t in title.findall(nodes.Text)
                    if not any(isinstance(p, nodes.literal) for p in _ancestors(t)))


def _ancestors(node: nodes.Node):
    while node.parent is not None:
        node = node.parent
        yield node


class RememberEnglishHeadings(SphinxTransform):
    """Store each section title's source text on the node, before the translation replaces it."""

    default_priority = 19  # sphinx.transforms.i18n.Locale runs at 20

    def apply(self, **kwargs) -> None:
        if (self.config.language or "en") == "en":
            return
        for title in self.document.findall(nodes.title):
            title["qg_source"] = title.astext()


class CheckTranslatedHeadings(SphinxTransform):
    """Warn about a section title left in the source language."""

    default_priority = 30  # after the translation

    def apply(self, **kwargs) -> None:
        if (self.config.language or "en") == "en":
            return
        names = _same_words(self.app)
        for title in self.document.findall(nodes.title):
            source = title.get("qg_source")
            if source is None or title.astext() != source:
                continue
            words = {w.lower() for w in re.findall(r"[^\W\d_]+", _prose(title))}
            if words - names:
                logger.warning("heading %r is the same as in English: translate it, or add its words to names in "
                               "locales/%s/terminology.yaml if French writes it the same", source,
                               self.config.language, location=title)


def setup(app):
    """Register the two transforms."""
    app.add_transform(RememberEnglishHeadings)
    app.add_transform(CheckTranslatedHeadings)
    return {"version": "1.0", "parallel_read_safe": True, "parallel_write_safe": True}
