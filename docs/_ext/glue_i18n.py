"""Let myst-nb's glue roles work inside translated messages.

``{glue:text}`key:.1f` `` pastes a value computed by a cell of the same page.
The French build parses each msgstr as a small document of its own, which
has none of the page's notebook outputs, so the role finds nothing there. In
that case these roles fall back to myst-nb's cross-document form,
``{glue:text}`/page.md::key:.1f` ``, which reads the outputs that the page
wrote to the build folder. Translators can then copy the role unchanged.

A pasted number is written in the page's language: ``74.2`` on the English
site, ``74,2`` on the French one (:func:`qlora_guide.i18n.localise_numbers`,
the same conventions as the localised cell outputs). A pasted value that
still reads as an English number on a translated page is a build warning.
"""

from __future__ import annotations

import re

from docutils import nodes
from myst_nb.core.variables import is_sphinx
from myst_nb.ext.glue.roles import PasteRoleAny, PasteTextRole
from sphinx.transforms.post_transforms import SphinxPostTransform
from sphinx.util import logging

from qlora_guide.i18n import localise_numbers

logger = logging.getLogger(__name__)
ENGLISH_DECIMAL = re.compile(r"\d\.\d")


def _needs_fallback(role) -> bool:
    """True for a same-page glue key in a document without the page's outputs."""
    return "::" not in role.text and "nb_renderer" not in role.document and is_sphinx(role.document)


def _as_cross_document(role) -> None:
    """Rewrite ``key`` into ``/<page source>::key`` (relative to the source folder)."""
    env = role.document.settings.env
    page = env.doc2path(env.docname, base=False)
    role.text = f"/{page.as_posix() if hasattr(page, 'as_posix') else page}::{role.text}"


class LocalisedPasteRoleAny(PasteRoleAny):
    """``{glue}`` / ``{glue:any}`` that also works in a translated message."""

    def run(self):
        if _needs_fallback(self):
            _as_cross_document(self)
        return super().run()


class LocalisedPasteTextRole(PasteTextRole):
    """``{glue:text}`` that also works in a translated message."""

    def run(self):
        if _needs_fallback(self):
            _as_cross_document(self)
        return super().run()


class LocalisePastedNumbers(SphinxPostTransform):
    """Write the numbers of every pasted value in the build's language."""

    default_priority = 6  # after myst-nb resolved the cross-document glue references (5)

    def run(self, **kwargs) -> None:
        lang = self.config.language or "en"
        for node in list(self.document.findall(nodes.inline)):
            if "pasted-text" not in node.get("classes", []):
                continue
            text = localise_numbers(node.astext(), lang)
            if lang != "en" and ENGLISH_DECIMAL.search(text):
                logger.warning("pasted value %r is still written as an English number", text, location=node)
            node.children = [nodes.Text(text)]


def setup(app):
    """Replace the glue roles registered by myst-nb (load after myst_nb)."""
    app.setup_extension("myst_nb")
    app.add_role("glue", LocalisedPasteRoleAny(), override=True)
    for name, role in (
        ("", LocalisedPasteRoleAny()),
        ("any", LocalisedPasteRoleAny()),
        ("text", LocalisedPasteTextRole()),
    ):
        app.add_role_to_domain("glue", name, role, override=True)
    app.add_post_transform(LocalisePastedNumbers)
    return {"version": "1.0", "parallel_read_safe": True, "parallel_write_safe": True}
