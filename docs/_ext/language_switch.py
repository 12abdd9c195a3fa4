"""Link every page to the same page in the other language.

The site is published as two trees side by side, ``en/`` and ``fr/``. For a
page ``part1/setup`` built in English, the link is
``../../fr/part1/setup.html``: a relative link, so it works over http and on
file:// alike. The template ``_templates/lang-switch.html`` renders it.
"""

from __future__ import annotations

LANGUAGES = {"en": "English", "fr": "Français"}


def other_language(language: str) -> str:
    """The language the switcher leads to (English for anything but English)."""
    return "fr" if language == "en" else "en"


def switch_url(pagename: str, target_uri: str, target_language: str) -> str:
    """Relative URL of ``pagename`` in the tree of ``target_language``.

    ``target_uri`` is the page's file name in the output (``part1/setup.html``);
    one ``../`` per folder level, plus one to leave the language folder.
    """
    depth = pagename.count("/") + 1
    return "../" * depth + f"{target_language}/{target_uri}"


def add_switch_context(app, pagename, templatename, context, doctree) -> None:
    """Give the template the other language's link, label and code."""
    language = app.config.language or "en"
    target = other_language(language)
    url = switch_url(pagename, app.builder.get_target_uri(pagename), target)
    context["qg_language"] = language
    context["qg_other_language"] = target
    context["qg_other_language_label"] = LANGUAGES[target]
    context["qg_other_language_url"] = url
    context["metatags"] = context.get("metatags", "") + (
        f'\n    <link rel="alternate" hreflang="{target}" href="{url}" />'
    )


def setup(app):
    """Connect the context hook (HTML builders only use it)."""
    app.connect("html-page-context", add_switch_context)
    return {"version": "1.0", "parallel_read_safe": True, "parallel_write_safe": True}
