"""Cell outputs in the page's language, from one execution for every language.

A cell that shows :mod:`qlora_guide.i18n` outputs (``say``, ``show``) writes
HTML holding one rendering per language; this post-transform keeps the one
of the build's language (``-D language=fr``), so the French build reuses the
English executions and executes nothing again.

In a translated build it also refuses what a reader would see in English: a
cell output that is not localised (a plain DataFrame, a printed sentence, a
figure drawn in English), unless the cell is tagged ``output-is-code`` because
what it prints is code (a module's repr, a library's message), which stays as
code prints it.
"""

from __future__ import annotations

from docutils import nodes
from sphinx.transforms.post_transforms import SphinxPostTransform
from sphinx.util import logging

from qlora_guide.i18n.outputs import select

logger = logging.getLogger(__name__)
CODE_TAG = "tag_output-is-code"


def _is_cell_output(node: nodes.Node) -> bool:
    return isinstance(node, nodes.container) and node.get("nb_element") == "cell_code_output"


class SelectLanguage(SphinxPostTransform):
    """Keep each localised output's rendering in the build's language; in a translated build, refuse the others."""

    default_priority = 6  # after myst-nb chose each output's mime type (4) and pasted glued values (5)

    def run(self, **kwargs) -> None:
        lang = self.config.language or "en"
        for raw in list(self.document.findall(nodes.raw)):
            if "html" not in raw.get("format", "").split():
                continue
            part = select(raw.astext(), lang)
            if part is not None:
                raw.parent.replace(raw, nodes.raw("", part, format="html", classes=["qg-localised"]))
            elif raw.astext().lstrip().startswith("<!--qg:"):
                logger.warning("a localised output has no %s rendering", lang, location=raw)
        if lang != "en":
            for output in self.document.findall(_is_cell_output):
                self._check(output)

    def _check(self, output: nodes.container) -> None:
        """Warn about the parts of a cell's outputs that a reader of a translated page would see in English."""
        cell = output.parent
        if CODE_TAG in cell.get("classes", []):
            return
        for child in output.children:
            if isinstance(child, nodes.raw) and "qg-localised" in child.get("classes", []):
                continue
            what = "a figure" if any(True for _ in child.findall(nodes.image)) else "an output"
            text = " ".join(child.astext().split())[:70]
            logger.warning(
                "%s that is not in %s (%r): show it with qlora_guide.i18n.show or say, "
                "or tag the cell output-is-code if it is code",
                what, self.config.language, text, location=output,
            )


def setup(app):
    """Register the post-transform."""
    app.add_post_transform(SelectLanguage)
    return {"version": "1.0", "parallel_read_safe": True, "parallel_write_safe": True}
