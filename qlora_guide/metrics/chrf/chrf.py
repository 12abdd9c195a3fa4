"""Corpus chrF (and chrF++) computed by sacrebleu, as an ``evaluate`` metric module that needs no network.

chrF compares character n-grams, so it rewards a paraphrase that shares word
stems and is less harsh than BLEU on short answers and on French inflection.
"""

import evaluate
import sacrebleu

from qlora_guide.metrics.references import FEATURES, reference_streams

_DESCRIPTION = """chrF (Popovic, 2015) as computed by sacrebleu: an F-score (beta = 2, recall weighted twice) over
character n-grams up to 6, plus word n-grams up to word_order (2 gives chrF++), on a 0-100 scale."""

_CITATION = """@inproceedings{popovic-2015-chrf,
  title = "chr{F}: character n-gram {F}-score for automatic {MT} evaluation",
  author = "Popovi{\\'c}, Maja",
  booktitle = "Proceedings of the Tenth Workshop on Statistical Machine Translation",
  year = "2015",
  pages = "392--395",
}"""

_KWARGS_DESCRIPTION = """
Args:
    predictions: list of generated texts.
    references: list of reference texts, or list of lists of references (the same count for every prediction).
    char_order: character n-gram order (6).
    word_order: word n-gram order (0: chrF, 2: chrF++).
    beta: weight of recall against precision (2).
    lowercase: compare lowercased text.
    whitespace: count whitespace characters in the character n-grams.
Returns:
    score: corpus chrF (0-100), char_order, word_order, beta.
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Chrf(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=FEATURES,
            reference_urls=["https://github.com/mjpost/sacrebleu"],
        )

    def _compute(
        self, predictions, references, char_order=6, word_order=0, beta=2, lowercase=False, whitespace=False
    ):
        streams = reference_streams(references)
        metric = sacrebleu.CHRF(
            char_order=char_order, word_order=word_order, beta=beta, lowercase=lowercase, whitespace=whitespace
        )
        chrf = metric.corpus_score(predictions, streams)
        return {"score": chrf.score, "char_order": char_order, "word_order": word_order, "beta": beta}
