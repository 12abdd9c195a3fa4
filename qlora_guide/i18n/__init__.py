"""The reader's language: numbers in its conventions, labels in its words, outputs in every language at once.

* :mod:`~qlora_guide.i18n.numbers`: one number, written as English or French readers write it.
* :mod:`~qlora_guide.i18n.catalogue`: the French words of what the package draws and prints.
* :mod:`~qlora_guide.i18n.outputs`: a cell's output in English and French together, so that one
  execution serves both sites; the docs build keeps the page's language.

English needs no catalogue: ``lang="en"`` (the default everywhere) never reads one.
"""

from qlora_guide.i18n.catalogue import LANGUAGES, MissingTranslation, translate, translator
from qlora_guide.i18n.numbers import format_number, localise_numbers

__all__ = ["LANGUAGES", "MissingTranslation", "format_number", "localise_numbers", "translate", "translator"]
