"""A cell's output in every language at once, so that one execution serves the English and the French site.

An output made here is a display object whose HTML holds one rendering per
language, each between ``<!--qg:LANG-->`` and ``<!--/qg:LANG-->``; its plain
text is the English one. The guide's build keeps the page's language and
drops the others (``docs/_ext/language_outputs.py``); a notebook shows them all.

* :func:`say` prints a sentence: the template is translated, the numbers in it
  are written in each language's conventions.
* :func:`show` shows a figure, a table or a text made by a function that takes
  ``lang`` (every function of :mod:`qlora_guide.plots` does), or a pandas
  table whose headers and row labels it translates.
"""

from __future__ import annotations

import base64
import html
import inspect
import io
import numbers
import string
from typing import Any

from qlora_guide.i18n.catalogue import LANGUAGES, catalogue, translate
from qlora_guide.i18n.numbers import localise_numbers

OPEN, CLOSE = "<!--qg:{}-->", "<!--/qg:{}-->"


class Localised:
    """One output in several languages: ``html`` maps a language to its HTML, ``text`` is the English plain text."""

    def __init__(self, html_by_lang: dict[str, str], text: str):
        self.html = html_by_lang
        self.text = text

    def _repr_html_(self) -> str:
        return "".join(OPEN.format(lang) + part + CLOSE.format(lang) for lang, part in self.html.items())

    def __repr__(self) -> str:
        return self.text


def select(markup: str, lang: str) -> str | None:
    """The part of a :class:`Localised` output's HTML written for ``lang``; None if ``markup`` is not one."""
    if not markup.lstrip().startswith("<!--qg:"):
        return None
    _, found, rest = markup.partition(OPEN.format(lang))
    return rest.partition(CLOSE.format(lang))[0] if found else None


# -- Sentences -------------------------------------------------------------------


class _NumberFormatter(string.Formatter):
    """``str.format`` that writes numbers in a language's conventions, booleans as yes or no in its words,
    and everything else as it is."""

    def __init__(self, lang: str):
        self.lang = lang

    def format_field(self, value: Any, format_spec: str) -> str:
        if isinstance(value, bool) and not format_spec:
            return translate("yes" if value else "no", self.lang)
        text = super().format_field(value, format_spec)
        if isinstance(value, numbers.Number) and not isinstance(value, bool):
            return localise_numbers(text, self.lang)
        return text


def _pre(text: str) -> str:
    """Text as the guide shows what a cell prints."""
    return f'<div class="output stream highlight-myst-ansi notranslate"><div class="highlight"><pre>{html.escape(text)}</pre></div></div>'


def sentence(template: str, lang: str = "en", **values: Any) -> str:
    """``template.format(**values)`` in ``lang``: the template translated, its numbers in the language's conventions."""
    return _NumberFormatter(lang).format(translate(template, lang), **values)


def say(template: str, **values: Any) -> Localised:
    """A printed sentence (one line or several) in every language; the English template is the key of its translation."""
    texts = {lang: sentence(template, lang, **values) for lang in LANGUAGES}
    return Localised({lang: _pre(text) for lang, text in texts.items()}, texts["en"])


# -- Figures, tables, texts ----------------------------------------------------------


def _figure_html(fig: Any, lang: str) -> str:
    """A matplotlib figure as an inline PNG, its alt text the figure's title."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    titles = [fig.get_suptitle()] + [ax.get_title() for ax in fig.axes]
    alt = " · ".join(t for t in titles if t) or translate("Figure", lang)
    data = base64.b64encode(buffer.getvalue()).decode("ascii")
    return f'<img src="data:image/png;base64,{data}" alt="{html.escape(alt)}" lang="{lang}" class="qg-figure">'


def _label(value: Any, lang: str) -> Any:
    """A header or row label in ``lang``: text is translated (strictly), numbers are localised."""
    if isinstance(value, str):
        return translate(value, lang)
    if isinstance(value, tuple):
        return tuple(_label(v, lang) for v in value)
    if isinstance(value, numbers.Number) and not isinstance(value, bool):
        return localise_numbers(str(value), lang)
    return value


def _labels(index: Any, lang: str) -> Any:
    """A pandas index (columns or rows, one level or several) with its labels and names in ``lang``."""
    import pandas as pd

    names = [_label(name, lang) for name in index.names]
    if isinstance(index, pd.MultiIndex):
        return pd.MultiIndex.from_tuples([_label(i, lang) for i in index], names=names)
    return pd.Index([_label(i, lang) for i in index], name=names[0])


def _cells(values: Any, lang: str, known: dict[str, str]) -> list[Any]:
    """One column's cells in ``lang``: numbers as pandas prints the column, localised; booleans as yes or no;
    known words translated."""
    import pandas as pd

    if pd.api.types.is_bool_dtype(values):
        return [translate("yes" if v else "no", lang) for v in values]
    if pd.api.types.is_numeric_dtype(values):
        printed = values.to_string(index=False, header=False).splitlines()
        return [localise_numbers(cell.strip(), lang) for cell in printed]
    return [_cell(v, lang, known) for v in values]


def _cell(value: Any, lang: str, known: dict[str, str]) -> Any:
    """One cell of a column of mixed values (a recipe's settings): each kind written as :func:`_cells` writes it."""
    if isinstance(value, bool):
        return translate("yes" if value else "no", lang)
    if isinstance(value, numbers.Number):
        return localise_numbers(str(value), lang)
    return known.get(value, value) if isinstance(value, str) else value


def localise_table(table: Any, lang: str) -> Any:
    """A pandas DataFrame or Series as readers of ``lang`` read it.

    Headers and row labels are translated; numbers are written as pandas shows
    them (same precision, column by column), in the language's conventions; a
    text cell is translated where a catalogue has it, and kept otherwise (it
    is data: an answer, a dtype, a module name).
    """
    import pandas as pd

    if lang == "en":
        return table
    frame = table.to_frame() if isinstance(table, pd.Series) else table
    known = catalogue(lang)
    columns = {i: _cells(frame.iloc[:, i], lang, known) for i in range(frame.shape[1])}
    shown = pd.DataFrame(columns, index=_labels(frame.index, lang))
    shown.columns = _labels(frame.columns, lang)
    return shown if isinstance(table, pd.DataFrame) else shown.iloc[:, 0]


def _render(result: Any, lang: str) -> str:
    """The HTML of one language's rendering: a figure, a table, or a text."""
    if hasattr(result, "savefig"):
        return _figure_html(result, lang)
    if hasattr(result, "to_html") or hasattr(result, "to_frame"):
        table = localise_table(result, lang)
        frame = table.to_frame() if not hasattr(table, "columns") else table
        return frame._repr_html_()
    if isinstance(result, str):
        return _pre(result)
    raise TypeError(f"show cannot display a {type(result).__name__}: give a figure, a pandas table or a text")


def show(what: Any, *args: Any, **kwargs: Any) -> Localised:
    """``what`` in every language.

    ``what`` is a pandas table (its labels are translated), or a function that
    takes ``lang`` and returns a figure, a table or a text: it is called once
    per language with ``*args`` and ``**kwargs``, e.g.
    ``show(plots.plot_loss_curves, history)``.
    """
    if callable(what) and not hasattr(what, "to_html"):
        if "lang" not in inspect.signature(what).parameters:
            raise TypeError(f"{what.__name__} takes no 'lang': it cannot draw or write in several languages")
        results = {lang: what(*args, lang=lang, **kwargs) for lang in LANGUAGES}
    else:
        results = {lang: what for lang in LANGUAGES}
    english = results["en"]
    text = english if isinstance(english, str) else (english.to_string() if hasattr(english, "to_string")
                                                     else repr(english))
    return Localised({lang: _render(result, lang) for lang, result in results.items()}, text)

