"""``original-code``: a code block quoted from the French originals, in each site's language.

The page holds the English translation of the original's code; the French
site shows the original's own words (its French comments and names), kept in
``locales/fr/originals/<file>``::

    ```{original-code} python
    :caption: The original LoRA configuration
    :fr: part1/lora-config.py
    :emphasize-lines: 2

    # LoRA configuration
    ...
    ```

Every option of ``code-block`` works; ``fr-emphasize-lines`` replaces
``emphasize-lines`` on the French site when the lines differ.
"""

from __future__ import annotations

from pathlib import Path

from docutils.parsers.rst import directives
from docutils.statemachine import StringList
from sphinx.directives.code import CodeBlock


class OriginalCode(CodeBlock):
    """A ``code-block`` whose content, on a translated site, is the original's own code."""

    option_spec = {**CodeBlock.option_spec, "fr": directives.unchanged_required,
                   "fr-emphasize-lines": directives.unchanged_required}

    def run(self):
        env = self.state.document.settings.env
        lang = env.config.language or "en"
        original = self.options.pop("fr", None)
        french_lines = self.options.pop("fr-emphasize-lines", None)
        if original is None:
            raise self.error("original-code needs :fr: the file of the original's code in locales/fr/originals")
        path = Path(env.srcdir) / "locales" / "fr" / "originals" / original
        if not path.is_file():
            raise self.error(f"original-code: {path} does not exist")
        env.note_dependency(str(path))
        if lang == "fr":
            self.content = StringList(path.read_text(encoding="utf-8").rstrip("\n").splitlines(), str(path))
            if french_lines is not None:
                self.options["emphasize-lines"] = french_lines
        return super().run()


def setup(app):
    """Register the directive."""
    app.add_directive("original-code", OriginalCode)
    return {"version": "1.0", "parallel_read_safe": True, "parallel_write_safe": True}
