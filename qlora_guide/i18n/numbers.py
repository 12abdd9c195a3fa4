"""Numbers as each language writes them.

English: ``74.2%``, ``1,234.5``, ``-0.25``. French: ``74,2 %``, ``1 234,5``,
``−0,25``, with a narrow no-break space (U+202F) between the digit groups and
before ``%``, and a true minus sign. The French form is made from the English
one that Python's ``format`` writes, so any format spec works in both.
"""

from __future__ import annotations

import numbers
import re

NARROW_NBSP = "\u202f"
MINUS = "\u2212"

# An English-formatted number: sign, digits grouped by commas or not, a decimal part, an exponent, a percent sign.
_NUMBER = re.compile(
    r"(?<![\w.,])(?P<sign>[-+]?)(?P<int>\d{1,3}(?:,\d{3})+|\d+)(?:\.(?P<frac>\d+))?"
    r"(?:[eE](?P<exp>[-+]?\d+))?(?P<pct>%?)(?![\w]|\.\d|,\d)"
)


def _french(match: re.Match) -> str:
    """One English-formatted number, written the French way."""
    digits = match["int"].replace(",", "")
    if len(digits) > 4 or "," in match["int"]:  # French groups from five digits on, and wherever English did
        digits = f"{int(digits):,}".replace(",", NARROW_NBSP)
    text = (MINUS if match["sign"] == "-" else match["sign"]) + digits
    if match["frac"] is not None:
        text += "," + match["frac"]
    if match["exp"] is not None:
        exp = match["exp"]
        text += "e" + (MINUS + exp[1:] if exp.startswith("-") else exp)
    if match["pct"]:
        text += NARROW_NBSP + "%"
    return text


def localise_numbers(text: str, lang: str = "en") -> str:
    """``text`` with every English-formatted number in it written in ``lang``'s conventions.

    >>> localise_numbers("4.127 bits, 74.2%, 65,536 values", "fr")
    '4,127 bits, 74,2\\u202f%, 65\\u202f536 values'
    """
    if lang == "en":
        return text
    if lang == "fr":
        return _NUMBER.sub(_french, text)
    raise ValueError(f"no number conventions for language {lang!r}")


def format_number(value: numbers.Number, spec: str = "", lang: str = "en") -> str:
    """``format(value, spec)`` in ``lang``'s conventions.

    >>> format_number(0.7421, ".1%", "fr")
    '74,2\\u202f%'
    >>> format_number(1234567, ",", "en")
    '1,234,567'
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Number):
        raise TypeError(f"format_number formats numbers, not {type(value).__name__} ({value!r})")
    return localise_numbers(format(value, spec), lang)
