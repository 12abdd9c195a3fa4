"""Text-colour roles: ``{red}`text` `` in MyST, ``:red:`text` `` in reST.

Each role wraps its text in an inline node with the class ``qg-<colour>``,
which HTML writes as ``<span class="qg-red">``; ``_static/colours.css`` gives
the colours for the light and the dark theme. The roles are ordinary Sphinx
roles, so they keep working inside translated messages (msgstr).
"""

from __future__ import annotations

from docutils import nodes
from docutils.utils import unescape

COLOURS = ("red", "green", "blue", "orange", "purple", "yellow", "gray", "pink")


def make_colour_role(colour: str):
    """Build the role function for one colour."""

    def colour_role(name, rawtext, text, lineno, inliner, options=None, content=None):
        node = nodes.inline(rawtext, unescape(text), classes=[f"qg-{colour}"])
        return [node], []

    colour_role.__doc__ = f"Wrap the text in <span class='qg-{colour}'>."
    return colour_role


def setup(app):
    """Register one role per colour."""
    for colour in COLOURS:
        app.add_role(colour, make_colour_role(colour))
    return {"version": "1.0", "parallel_read_safe": True, "parallel_write_safe": True}
