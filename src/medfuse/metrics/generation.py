"""Report-generation metrics from well-kept packages, each with n and a bootstrap 95% CI.

* **BLEU-1..4** (``bleu1`` .. ``bleu4``): sacrebleu's corpus BLEU with ``max_ngram_order`` 1..4
  (the cumulative BLEU-n of the captioning literature, 13a tokenisation, case-sensitive, no
  smoothing), on a 0..1 scale (sacrebleu prints 0..100). The bootstrap resamples cases and sums
  their sentence statistics, so each resample is again a corpus BLEU (sacrebleu's own paired
  bootstrap does the same).
* **ROUGE-L** (``rouge_l``) and **ROUGE-1** (``rouge1``): Google's ``rouge-score`` F-measure per
  report (no stemming), averaged over reports. ROUGE-L is the sentence-level LCS variant
  (``rougeL``, not ``rougeLsum``). (M3D reports ROUGE-1 and calls it ROUGE.)
* **METEOR** (``meteor``): NLTK's ``meteor_score`` per report, averaged, with its exact and
  Porter-stem matching stages only. The WordNet synonym stage needs NLTK's WordNet data, which is
  a download (``nltk.download``) and never happens at run time here, so it is left out everywhere
  (the same numbers on every machine); it is Java-free, unlike pycocoevalcap's METEOR.
* **Clinical efficacy** (``ce_precision``, ``ce_recall``, ``ce_f1`` macro over findings, and
  ``ce_f1_micro``): precision / recall / F1 of the findings a labeler finds in the generated
  reports against the reference findings, per finding (``per_class``) and macro-averaged over
  findings with at least one reference positive (CheXpert-style CE; CT-RATE's CRG uses the same
  TP/FP/FN counts).

CIDEr is not computed: the Java-free implementation (pycocoevalcap's ``Cider``) ships inside a
104 MB wheel with the Java jars of METEOR and SPICE.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from .bootstrap import bootstrap_ci

BLEU_ORDERS = (1, 2, 3, 4)


class _NoWordNet:
    """Stands in for NLTK's WordNet in ``meteor_score``: no synonyms (exact and stem stages only)."""

    @staticmethod
    def synsets(*_args, **_kwargs) -> list:
        return []


def _tokenize(text: str) -> list[str]:
    """sacrebleu's 13a tokenisation (what BLEU uses), as tokens."""
    from sacrebleu.tokenizers.tokenizer_13a import Tokenizer13a

    return Tokenizer13a()(str(text)).split()


def bleu_stats(hyps: Sequence[str], refs: Sequence[str], order: int = 4) -> np.ndarray:
    """sacrebleu's sufficient statistics per report, (N, 2 + 2 * order): hypothesis length,
    reference length, matching n-grams (1..order), hypothesis n-grams (1..order)."""
    from sacrebleu.metrics import BLEU

    if len(hyps) != len(refs):
        raise ValueError(f"{len(hyps)} hypotheses for {len(refs)} references")
    stats = BLEU(max_ngram_order=order)._extract_corpus_statistics([str(h) for h in hyps], [[str(r) for r in refs]])
    return np.asarray(stats, dtype=np.float64).reshape(len(hyps), 2 + 2 * order)


def bleu_from_stats(stats: np.ndarray, order: int = 4) -> np.ndarray:
    """Corpus BLEU-``order`` (0..1) of summed statistics; (..., n, S) -> (...)."""
    from sacrebleu.metrics import BLEU

    tot = np.asarray(stats).sum(-2)
    flat = tot.reshape(-1, tot.shape[-1])
    out = [BLEU.compute_bleu(correct=[int(x) for x in row[2: 2 + order]], total=[int(x) for x in row[2 + order:]],
                             sys_len=int(row[0]), ref_len=int(row[1]), max_ngram_order=order).score / 100.0
           for row in flat]
    return np.asarray(out, dtype=np.float64).reshape(tot.shape[:-1])


def corpus_bleu(hyps: Sequence[str], refs: Sequence[str], order: int = 4) -> float:
    """sacrebleu's corpus BLEU-``order`` on a 0..1 scale (one reference per hypothesis)."""
    return float(bleu_from_stats(bleu_stats(hyps, refs, order), order))


def rouge_scores(hyps: Sequence[str], refs: Sequence[str], kind: str = "rougeL") -> np.ndarray:
    """rouge-score F-measure per report, (N,); ``kind`` is ``rougeL`` or ``rouge1`` (no stemming)."""
    from rouge_score import rouge_scorer, tokenizers

    # the tokenizer given explicitly is the one RougeScorer would make; left to choose it, RougeScorer
    # logs through absl, which calls logging.basicConfig() and so reformats every later log line
    scorer = rouge_scorer.RougeScorer([kind], use_stemmer=False, tokenizer=tokenizers.DefaultTokenizer(False))
    return np.asarray([scorer.score(str(r), str(h))[kind].fmeasure for h, r in zip(hyps, refs, strict=True)],
                      dtype=np.float64)


def meteor_scores(hyps: Sequence[str], refs: Sequence[str]) -> np.ndarray:
    """NLTK METEOR per report (exact + Porter-stem stages, lower-cased, 13a tokens), (N,)."""
    from nltk.translate.meteor_score import meteor_score

    wn = _NoWordNet()
    return np.asarray([meteor_score([_tokenize(r)], _tokenize(h), wordnet=wn) for h, r in zip(hyps, refs, strict=True)],
                      dtype=np.float64)


def ce_counts(pred: np.ndarray, true: np.ndarray) -> np.ndarray:
    """TP, FP, FN per finding summed over reports: (..., n, K) 0/1 -> (..., 3, K)."""
    p, t = np.asarray(pred) > 0.5, np.asarray(true) > 0.5
    return np.stack([(p & t).sum(-2), (p & ~t).sum(-2), (~p & t).sum(-2)], axis=-2).astype(np.float64)


def _prf(counts: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    tp, fp, fn = counts[..., 0, :], counts[..., 1, :], counts[..., 2, :]
    with np.errstate(invalid="ignore", divide="ignore"):
        prec = np.where(tp + fp > 0, tp / (tp + fp), 0.0)
        rec = np.where(tp + fn > 0, tp / (tp + fn), np.nan)
        f1 = np.where(tp + fn > 0, np.where(tp > 0, 2 * tp / (2 * tp + fp + fn), 0.0), np.nan)
    prec = np.where(tp + fn > 0, prec, np.nan)  # a finding never present in the references is left out
    return prec, rec, f1


def _nanmean(x: np.ndarray) -> np.ndarray:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmean(x, axis=-1)


def ce_scores(pred: np.ndarray, true: np.ndarray) -> dict[str, Any]:
    """Clinical-efficacy scores: per finding precision/recall/F1 (NaN for a finding with no
    reference positive) and their macro means; micro F1 over all findings.

    Args:
        pred: (N, K) 0/1 findings of the generated reports.
        true: (N, K) 0/1 reference findings.
    """
    c = ce_counts(pred, true)
    prec, rec, f1 = _prf(c)
    tp, fp, fn = c.sum(-1)
    micro = 2 * tp / (2 * tp + fp + fn) if (2 * tp + fp + fn) > 0 else float("nan")
    return {"precision": prec, "recall": rec, "f1": f1, "macro_precision": float(_nanmean(prec)),
            "macro_recall": float(_nanmean(rec)), "macro_f1": float(_nanmean(f1)), "micro_f1": float(micro)}


def generation_report(hyps: Sequence[str], refs: Sequence[str], pred_labels: np.ndarray | None = None,
                      true_labels: np.ndarray | None = None, names: Sequence[str] | None = None,
                      n_boot: int = 1000, seed: int = 0, prefix: str = "",
                      groups: Sequence[str] | None = None) -> dict[str, Any]:
    """Every generation metric of the module doc with a bootstrap CI over reports, or over patients.

    Args:
        hyps: N generated reports.
        refs: N reference reports.
        pred_labels, true_labels: (N, K) 0/1 findings of the generated and the reference reports
            (clinical efficacy is skipped without them).
        names: the K finding names (for ``per_class``).
        n_boot, seed: bootstrap resamples and seed.
        prefix: prepended to every metric name (e.g. ``"generation/"``).
        groups: (N,) the patient of each report when a patient has several (CT-RATE scans): the
            bootstrap resamples patients (``n`` = patients, ``n_items`` = reports). None: reports
            are independent.

    Returns:
        ``{"metrics": {prefix + "bleu1".."bleu4", "rouge_l", "rouge1", "meteor", "ce_precision",
        "ce_recall", "ce_f1", "ce_f1_micro": ci}, "per_class": {name: {"ce_precision",
        "ce_recall", "ce_f1", "support"}}}``; each ``ci`` is ``{"value", "low", "high", "n", "n_boot"}``.
    """
    hyps, refs = [str(h) for h in hyps], [str(r) for r in refs]
    m: dict[str, Any] = {}
    stats = bleu_stats(hyps, refs, max(BLEU_ORDERS))
    for k in BLEU_ORDERS:
        # BLEU-k needs only the first k n-gram orders of the order-4 statistics
        sub = np.concatenate([stats[:, :2], stats[:, 2: 2 + k], stats[:, 6: 6 + k]], axis=1)
        m[f"{prefix}bleu{k}"] = bootstrap_ci(lambda s, k=k: bleu_from_stats(s, k), sub, n_boot=n_boot, seed=seed,
                                             vectorized=True, groups=groups)
    for name, values in (("rouge_l", rouge_scores(hyps, refs, "rougeL")), ("rouge1", rouge_scores(hyps, refs, "rouge1")),
                         ("meteor", meteor_scores(hyps, refs))):
        m[f"{prefix}{name}"] = bootstrap_ci(lambda v: v.mean(-1), values, n_boot=n_boot, seed=seed, vectorized=True,
                                            groups=groups)
    per_class: dict[str, Any] = {}
    if pred_labels is not None and true_labels is not None and np.asarray(true_labels).size:
        p, t = np.asarray(pred_labels, dtype=np.float64), np.asarray(true_labels, dtype=np.float64)
        if p.shape != t.shape or p.shape[0] != len(hyps):
            raise ValueError(f"label shapes {p.shape} and {t.shape} do not match {len(hyps)} reports")
        both = np.concatenate([p, t], axis=-1)
        kk = p.shape[-1]

        def split(x):
            return x[..., :kk], x[..., kk:]

        m[f"{prefix}ce_precision"] = bootstrap_ci(lambda x: _nanmean(_prf(ce_counts(*split(x)))[0]), both,
                                                  n_boot=n_boot, seed=seed, vectorized=True, groups=groups)
        m[f"{prefix}ce_recall"] = bootstrap_ci(lambda x: _nanmean(_prf(ce_counts(*split(x)))[1]), both,
                                               n_boot=n_boot, seed=seed, vectorized=True, groups=groups)
        m[f"{prefix}ce_f1"] = bootstrap_ci(lambda x: _nanmean(_prf(ce_counts(*split(x)))[2]), both,
                                           n_boot=n_boot, seed=seed, vectorized=True, groups=groups)

        def micro(x):
            c = ce_counts(*split(x)).sum(-1)  # (..., 3)
            with np.errstate(invalid="ignore", divide="ignore"):
                return 2 * c[..., 0] / (2 * c[..., 0] + c[..., 1] + c[..., 2])

        m[f"{prefix}ce_f1_micro"] = bootstrap_ci(micro, both, n_boot=n_boot, seed=seed, vectorized=True, groups=groups)
        scores = ce_scores(p, t)
        for j, name in enumerate(names or [str(i) for i in range(kk)]):
            per_class[str(name)] = {"ce_precision": float(scores["precision"][j]),
                                    "ce_recall": float(scores["recall"][j]), "ce_f1": float(scores["f1"][j]),
                                    "support": int((t[:, j] > 0.5).sum())}
    return {"metrics": m, "per_class": per_class}
