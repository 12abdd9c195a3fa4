"""Per-answer measures a reader understands without a course in metrics.

* :func:`answer_languages`: the language each answer is written in (py3langid,
  restricted to the languages of the questions), so that "answers French
  questions in French" is counted, not guessed.
* :func:`repeated_ngram_share`: the share of an answer's word 4-grams that
  already occurred earlier in the same answer. A fluent answer scores near 0;
  a model stuck in a loop ("les mémoires, les mémoires, ...") scores high.
"""

from __future__ import annotations

import functools
import re
from typing import Any

WORD = re.compile(r"\w+", re.UNICODE)
LANGUAGES = ("en", "fr")
LETTER = re.compile(r"[^\W\d_]", re.UNICODE)


@functools.lru_cache(maxsize=4)
def _identifier(languages: tuple[str, ...]) -> Any:
    from py3langid.langid import MODEL_FILE, LanguageIdentifier

    identifier = LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)
    identifier.set_languages(list(languages))
    return identifier


def answer_languages(texts: list[str], languages: tuple[str, ...] = LANGUAGES) -> list[str]:
    """The most likely of ``languages`` for each text ("" for a text without a letter)."""
    identifier = _identifier(tuple(sorted(languages)))
    return [identifier.classify(text)[0] if LETTER.search(text) else "" for text in texts]


def language_matches(answers: list[str], question_languages: list[str]) -> list[float]:
    """1.0 where the answer is in the language of its question, else 0.0 (English and French always candidates)."""
    found = answer_languages(answers, tuple(sorted(set(question_languages) | set(LANGUAGES))))
    return [float(a == q) for a, q in zip(found, question_languages, strict=True)]


def repeated_ngram_share(text: str, n: int = 4) -> float:
    """Share of the word n-grams of ``text`` that repeat an earlier n-gram of the same text (0 when it has none)."""
    words = [w.lower() for w in WORD.findall(text)]
    grams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
    if not grams:
        return 0.0
    return 1.0 - len(set(grams)) / len(grams)
