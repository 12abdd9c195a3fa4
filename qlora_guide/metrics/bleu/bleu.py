"""Corpus BLEU computed by sacrebleu, as an ``evaluate`` metric module that needs no network.

Scores are sacrebleu's (0-100), on detokenized text with its default ``13a``
tokenizer, so they can be compared with any other sacrebleu BLEU.
"""

import evaluate
import sacrebleu

from qlora_guide.metrics.references import FEATURES, reference_streams

_DESCRIPTION = """BLEU (Papineni et al., 2002) as computed by sacrebleu (Post, 2018): the geometric mean of
modified n-gram precisions (n = 1..4) times a brevity penalty, over the whole corpus, on a 0-100 scale."""

_CITATION = """@inproceedings{post-2018-call,
  title = "A Call for Clarity in Reporting {BLEU} Scores",
  author = "Post, Matt",
  booktitle = "Proceedings of the Third Conference on Machine Translation",
  year = "2018",
  pages = "186--191",
}"""

_KWARGS_DESCRIPTION = """
Args:
    predictions: list of generated texts.
    references: list of reference texts, or list of lists of references (the same count for every prediction).
    tokenize: sacrebleu tokenizer ('13a' by default; 'intl', 'char', 'none', ...).
    lowercase: compare lowercased text.
    smooth_method: 'exp' (default), 'floor', 'add-k' or 'none'.
Returns:
    score: corpus BLEU (0-100), counts, totals, precisions, bp, sys_len, ref_len.
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Bleu(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=FEATURES,
            reference_urls=["https://github.com/mjpost/sacrebleu"],
        )

    def _compute(self, predictions, references, tokenize="13a", lowercase=False, smooth_method="exp"):
        streams = reference_streams(references)
        metric = sacrebleu.BLEU(tokenize=tokenize, lowercase=lowercase, smooth_method=smooth_method)
        bleu = metric.corpus_score(predictions, streams)
        return {
            "score": bleu.score,
            "counts": bleu.counts,
            "totals": bleu.totals,
            "precisions": bleu.precisions,
            "bp": bleu.bp,
            "sys_len": bleu.sys_len,
            "ref_len": bleu.ref_len,
        }
