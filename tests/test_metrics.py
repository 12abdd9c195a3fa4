"""Answer measures and paired bootstrap intervals (qlora_guide.metrics.answers, qlora_guide.metrics.intervals)."""

from __future__ import annotations

import numpy as np
import pytest
import sacrebleu

from qlora_guide.errors import QLoRAGuideError
from qlora_guide.metrics import answers, intervals

REFERENCES = [
    "NF4 places its sixteen levels at the quantiles of a normal distribution.",
    "NF4 place ses seize niveaux aux quantiles d'une loi normale.",
    "Double quantization quantizes the absmax constants too.",
    "La double quantification quantifie aussi les constantes absmax.",
] * 6


def test_language_of_answers_and_matches():
    found = answers.answer_languages(["The rank of the update sets how many directions it learns.",
                                      "Le rang de la mise à jour fixe le nombre de directions apprises.", "42"])
    assert found == ["en", "fr", ""]
    assert answers.language_matches(["The adapter is small and the base model stays frozen during training.", "L'adaptateur est petit et le modèle de base reste figé."], ["fr", "fr"]) == [0.0, 1.0]


def test_repeated_ngram_share_sees_loops_and_not_fluent_text():
    assert answers.repeated_ngram_share("NF4 stores four bits per weight and one scale per block") == 0.0
    looping = "de l'échelle, de l'échelle, de l'échelle, de l'échelle, de l'échelle"
    assert answers.repeated_ngram_share(looping) > 0.6
    assert answers.repeated_ngram_share("too short") == 0.0


def test_corpus_statistics_give_sacrebleu_scores_exactly():
    predictions = [r.replace("normal", "gaussian").replace("aussi", "") for r in REFERENCES]
    for name, corpus in (("chrf", sacrebleu.corpus_chrf), ("bleu", sacrebleu.corpus_bleu)):
        stats = intervals.sentence_statistics(name, predictions, REFERENCES)
        assert stats.shape[0] == len(predictions)
        assert intervals.corpus_score(name, stats) == pytest.approx(corpus(predictions, [REFERENCES]).score)


def test_a_real_difference_is_found_and_noise_is_called_noise():
    rng = np.random.default_rng(1)
    worse = [" ".join(r.split()[:3]) for r in REFERENCES]  # truncated answers: clearly worse
    better = intervals.corpus_difference("chrf", worse, REFERENCES, REFERENCES)
    assert better.significant and better.verdict == "higher" and better.low > 0
    assert better.a < better.difference + better.a == pytest.approx(better.b)
    # two models whose per-example scores differ by pure noise around the same mean
    a = rng.normal(50, 10, size=46)
    b = a + rng.normal(0, 5, size=46)
    b -= b.mean() - a.mean()
    noise = intervals.mean_difference("score", a.tolist(), b.tolist())
    assert noise.verdict == "within noise" and noise.low < 0 < noise.high


def test_perplexity_ratio_is_token_weighted_and_has_an_interval():
    a = [(2.0 * n, n) for n in range(5, 51)]  # mean NLL 2.0 per token
    b = [(1.5 * n, n) for n in range(5, 51)]  # 1.5 per token: lower perplexity
    ratio = intervals.perplexity_ratio(a, b)
    assert ratio.ratio and ratio.difference == pytest.approx(np.exp(1.5) / np.exp(2.0))
    assert ratio.verdict == "lower" and ratio.high < 1
    same = intervals.perplexity_ratio(a, a)
    assert same.difference == 1.0 and not same.significant


def test_paired_intervals_need_the_same_examples():
    with pytest.raises(QLoRAGuideError, match="same examples"):
        intervals.mean_difference("x", [1.0, 2.0, 3.0], [1.0, 2.0])
