"""Generation metrics: parity with the packages' own outputs on fixed strings, CE by hand, CIs."""

from __future__ import annotations

import numpy as np
import pytest

from medfuse.metrics.generation import (
    bleu_stats,
    ce_scores,
    corpus_bleu,
    generation_report,
    meteor_scores,
    rouge_scores,
)

HYPS = ["Right upper lobe: a 21 mm solid nodule. Heart: normal size.",
        "Left lower lobe: clear. Small right pleural effusion.",
        "the cat sat on the mat",
        "Aorta: normal caliber."]
REFS = ["Right upper lobe: a 14 mm solid nodule. Heart: normal size.",
        "Left lower lobe: a 20 mm solid nodule. Small left pleural effusion.",
        "the cat is sitting on a mat",
        "Aorta: normal caliber."]


@pytest.mark.parametrize("order", [1, 2, 3, 4])
def test_bleu_equals_sacrebleu_corpus_bleu(order):
    from sacrebleu.metrics import BLEU

    ref = BLEU(max_ngram_order=order).corpus_score(HYPS, [REFS]).score / 100
    assert corpus_bleu(HYPS, REFS, order) == pytest.approx(ref, abs=1e-12)
    rep = generation_report(HYPS, REFS, n_boot=20)
    assert rep["metrics"][f"bleu{order}"]["value"] == pytest.approx(ref, abs=1e-12)
    assert bleu_stats(HYPS, REFS, order).shape == (4, 2 + 2 * order)


def test_rouge_and_meteor_equal_the_packages():
    from nltk.translate.meteor_score import meteor_score
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL", "rouge1"])
    for kind in ("rougeL", "rouge1"):
        expected = [scorer.score(r, h)[kind].fmeasure for h, r in zip(HYPS, REFS, strict=True)]
        np.testing.assert_allclose(rouge_scores(HYPS, REFS, kind), expected)

    class NoSynonyms:
        def synsets(self, *a, **k):
            return []

    expected = [meteor_score([r.replace(".", " .").replace(":", " :").split()],
                             h.replace(".", " .").replace(":", " :").split(), wordnet=NoSynonyms())
                for h, r in zip(HYPS, REFS, strict=True)]
    np.testing.assert_allclose(meteor_scores(HYPS, REFS), expected)
    # hand values: identical strings score 1 - penalty; ROUGE-L of "the cat sat on the mat" vs
    # "the cat is sitting on a mat": LCS "the cat on mat" = 4 of 6 / 7 tokens
    assert rouge_scores(HYPS[2:3], REFS[2:3])[0] == pytest.approx(2 * (4 / 6) * (4 / 7) / (4 / 6 + 4 / 7))
    m = meteor_scores(["a b c d"], ["a b c d"])[0]  # one chunk of 4 matches: penalty 0.5 * (1/4)^3
    assert m == pytest.approx(1 - 0.5 * (1 / 4) ** 3)
    rep = generation_report(HYPS, REFS, n_boot=50)["metrics"]
    assert rep["rouge_l"]["value"] == pytest.approx(np.mean(rouge_scores(HYPS, REFS)))
    assert rep["meteor"]["value"] == pytest.approx(np.mean(meteor_scores(HYPS, REFS)))


def test_ce_f1_equals_a_hand_count():
    #            nodule effusion cardio
    true = np.array([[1, 0, 0], [1, 1, 0], [0, 0, 0], [0, 1, 0]])
    pred = np.array([[1, 0, 1], [0, 1, 0], [0, 0, 0], [1, 0, 0]])
    # nodule: TP 1, FP 1, FN 1 -> P 1/2, R 1/2, F1 1/2; effusion: TP 1, FP 0, FN 1 -> P 1, R 1/2, F1 2/3;
    # cardio: no reference positive -> left out of the macro means (its FP counts in micro)
    s = ce_scores(pred, true)
    assert s["f1"][:2] == pytest.approx([0.5, 2 / 3]) and np.isnan(s["f1"][2])
    assert s["macro_f1"] == pytest.approx((0.5 + 2 / 3) / 2)
    assert s["macro_precision"] == pytest.approx(0.75) and s["macro_recall"] == pytest.approx(0.5)
    assert s["micro_f1"] == pytest.approx(2 * 2 / (2 * 2 + 2 + 2))  # TP 2, FP 2 (one cardio), FN 2
    rep = generation_report(["x"] * 4, ["x"] * 4, pred, true, names=["nodule", "effusion", "cardio"], n_boot=200)
    f1 = rep["metrics"]["ce_f1"]
    assert f1["value"] == pytest.approx((0.5 + 2 / 3) / 2) and f1["n"] == 4 and f1["low"] <= f1["value"] <= f1["high"]
    assert rep["per_class"]["effusion"] == {"ce_precision": 1.0, "ce_recall": 0.5, "ce_f1": pytest.approx(2 / 3),
                                            "support": 2}


def test_report_names_and_cis():
    rep = generation_report(HYPS, REFS, n_boot=100, seed=1, prefix="generation/")["metrics"]
    assert set(rep) == {f"generation/{k}" for k in ("bleu1", "bleu2", "bleu3", "bleu4", "rouge_l", "rouge1", "meteor")}
    for v in rep.values():
        assert v["n"] == 4 and v["n_boot"] > 0 and v["low"] <= v["value"] <= v["high"]
    perfect = generation_report(REFS, REFS, n_boot=20)["metrics"]
    assert perfect["bleu4"]["value"] == pytest.approx(1.0) and perfect["rouge_l"]["value"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="hypotheses"):
        bleu_stats(HYPS, REFS[:2])


def test_rouge_leaves_the_root_logger_alone():
    """rouge-score's RougeScorer, left to choose its tokenizer, logs through absl, which calls
    logging.basicConfig(): every later medfuse log line then printed as ``WARNING:medfuse...:``."""
    import logging

    from medfuse.metrics.generation import rouge_scores

    before = list(logging.root.handlers)
    try:
        logging.root.handlers.clear()
        scores = rouge_scores(["the left lung is clear"], ["the right lung is clear"])
        assert logging.root.handlers == []
    finally:
        logging.root.handlers[:] = before
    assert 0.5 < scores[0] < 1.0
