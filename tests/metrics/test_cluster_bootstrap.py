"""Cluster (patient) bootstrap for any statistic: ``bootstrap_ci(groups=...)`` draws patients with
replacement and takes all of their cases; ``classification_report`` and ``retrieval_report`` pass
patient groups through. Without groups (or with one case per patient) the numbers are today's."""

from __future__ import annotations

import numpy as np
import pytest

from medfuse.metrics import bootstrap_ci, classification_report, cluster_mean_ci, retrieval_report
from medfuse.metrics import classification as clf


def one_big_patient(n_small: int = 12, n_big: int = 30, seed: int = 0):
    """Labels (N,), probs (N, 2) and patient ids (N,), N = n_big + n_small: patient "big" has
    ``n_big`` identical, correctly classified scans; each of ``n_small`` other patients has one
    scan, half of them misclassified. Counted per case the model looks good and sure of it."""
    rng = np.random.default_rng(seed)
    y_small = np.arange(n_small) % 2
    right = rng.permutation(np.arange(n_small) < n_small // 2)
    pred_small = np.where(right, y_small, 1 - y_small)
    y = np.r_[np.ones(n_big, dtype=np.int64), y_small]
    pred = np.r_[np.ones(n_big, dtype=np.int64), pred_small]
    p1 = np.clip(0.1 + 0.8 * pred + rng.uniform(-0.05, 0.05, pred.size), 0.0, 1.0)
    probs = np.stack([1.0 - p1, p1], axis=1)
    groups = ["big"] * n_big + [f"p{i}" for i in range(n_small)]
    return y, probs, groups


def width(entry: dict) -> float:
    return entry["high"] - entry["low"]


def test_patient_bootstrap_of_a_non_mean_metric_is_wider_and_counts_patients():
    """Balanced accuracy and AUC are no means of per-case values: the cluster option of bootstrap_ci
    resamples the 13 patients (not the 42 scans); the point estimate stays the all-cases value."""
    y, probs, groups = one_big_patient()
    for name, fn in clf._BATCH_METRICS.items():
        cases = bootstrap_ci(fn, y, probs, n_boot=1000, vectorized=True)
        pats = bootstrap_ci(fn, y, probs, n_boot=1000, vectorized=True, groups=groups)
        assert pats["value"] == cases["value"], name
        assert pats["n"] == 13 and pats["n_items"] == 42 and cases["n"] == 42, name
        assert width(pats) > 1.1 * width(cases), (name, pats, cases)
    acc = bootstrap_ci(clf._batch_accuracy, y, probs, n_boot=1000, vectorized=True, groups=groups)
    cases = bootstrap_ci(clf._batch_accuracy, y, probs, n_boot=1000, vectorized=True)
    assert acc["low"] < 0.5 < 0.7 < cases["low"]  # without the big patient about half are right
    assert width(acc) > 2.5 * width(cases)


def test_every_resample_holds_whole_patients_g_draws_each():
    """Each resample is G patients drawn with replacement, each with all of its cases (loop path),
    and the vectorised path gets whole resamples of one length per call (no padding)."""
    groups = ["a"] * 3 + ["b"] + ["c"] * 5 + ["d"] * 2
    g = np.asarray(groups)
    sizes = {k: int((g == k).sum()) for k in "abcd"}
    seen: list[np.ndarray] = []

    def record(ids):
        seen.append(np.asarray(ids))
        return float(np.mean(ids))

    ids = np.arange(len(groups))
    bootstrap_ci(record, ids, n_boot=200, seed=3, groups=groups)
    resamples = seen[1:]  # the first call is the point estimate on all cases
    assert len(resamples) == 200
    for r in resamples:
        drawn = 0
        for k in sizes:
            members = ids[g == k]
            counts = [int((r == m).sum()) for m in members]
            assert len(set(counts)) == 1  # all cases of a patient, equally often
            drawn += counts[0]
        assert drawn == 4  # G = 4 patients per resample
        firsts = r[np.isin(r, [0, 3, 4, 9])]  # each patient's first case: once per draw of the patient
        assert len(r) == sum(sizes[groups[i]] for i in firsts)  # nothing but the drawn patients' cases

    shapes: list[tuple[int, ...]] = []

    def batched(x):
        shapes.append(x.shape)
        return x.mean(-1)

    bootstrap_ci(batched, ids.astype(np.float64), n_boot=200, seed=3, vectorized=True, groups=groups)
    assert sum(s[0] for s in shapes[1:]) == 200 and len({s[1] for s in shapes[1:]}) == len(shapes) - 1


def test_one_case_per_patient_reproduces_todays_bootstrap_exactly():
    """With every patient's single case, the cluster draws are the case draws: same numbers, both
    code paths, plus ``n_items``."""
    rng = np.random.default_rng(1)
    x = rng.normal(size=37)
    ids = [f"pt{i}" for i in range(37)]
    for vectorized, fn in ((True, lambda v: v.mean(-1)), (False, np.median)):
        plain = bootstrap_ci(fn, x, n_boot=300, seed=5, vectorized=vectorized)
        single = bootstrap_ci(fn, x, n_boot=300, seed=5, vectorized=vectorized, groups=ids)
        assert single == {**plain, "n_items": 37}
    y, probs, _ = one_big_patient()
    plain = classification_report(y, probs, n_boot=200, seed=2)
    single = classification_report(y, probs, n_boot=200, seed=2, groups=[f"c{i}" for i in range(len(y))])
    for name in clf.CLASSIFICATION_METRICS:
        assert single[name] == {**plain[name], "n_items": len(y)}, name
    assert single["n_patients"] == len(y) and "n_patients" not in plain


def test_cluster_bootstrap_is_seeded_and_both_paths_agree():
    y, probs, groups = one_big_patient(seed=4)
    a = bootstrap_ci(clf._batch_balanced_accuracy, y, probs, n_boot=300, seed=7, vectorized=True, groups=groups)
    b = bootstrap_ci(clf._batch_balanced_accuracy, y, probs, n_boot=300, seed=7, vectorized=True, groups=groups)
    c = bootstrap_ci(clf._batch_balanced_accuracy, y, probs, n_boot=300, seed=8, vectorized=True, groups=groups)
    loop = bootstrap_ci(clf.balanced_accuracy, y, probs, n_boot=300, seed=7, groups=groups)
    assert a == b and (a["low"], a["high"]) != (c["low"], c["high"])
    assert loop["n_boot"] == a["n_boot"] and loop["n"] == a["n"] == 13
    assert loop["low"] == pytest.approx(a["low"]) and loop["high"] == pytest.approx(a["high"])


def test_cluster_bootstrap_of_a_mean_matches_cluster_mean_ci():
    """For a mean, concatenating the drawn patients' cases is cluster_mean_ci's pooled mean (whose
    groups are numbered in sorted order: here the same as the order of appearance)."""
    rng = np.random.default_rng(2)
    sizes = rng.integers(1, 6, 15)
    groups = np.repeat([f"g{i:02d}" for i in range(15)], sizes)
    v = rng.normal(np.repeat(rng.normal(0, 1, 15), sizes), 0.3)
    ours = bootstrap_ci(lambda x: x.mean(-1), v, n_boot=500, seed=4, vectorized=True, groups=groups)
    ref = cluster_mean_ci(v, groups, n_boot=500, seed=4)
    assert ours["n"] == ref["n"] == 15 and ours["n_items"] == ref["n_items"] == len(v)
    for key in ("value", "low", "high"):
        assert ours[key] == pytest.approx(ref[key], abs=1e-12), key


def test_classification_report_with_patient_groups():
    y, probs, groups = one_big_patient()
    rep = classification_report(y, probs, class_names=["neg", "pos"], n_boot=300, groups=groups)
    per_case = classification_report(y, probs, class_names=["neg", "pos"], n_boot=300)
    for name in clf.CLASSIFICATION_METRICS:
        assert rep[name]["n"] == 13 and rep[name]["n_items"] == 42, name
        assert rep[name]["value"] == per_case[name]["value"], name
    assert rep["n"] == 42 and rep["n_patients"] == 13
    assert rep["per_class"] == per_case["per_class"] and rep["confusion_matrix"] == per_case["confusion_matrix"]
    assert width(rep["accuracy"]) > 2.5 * width(per_case["accuracy"])
    with pytest.raises(ValueError, match="groups"):
        classification_report(y, probs, groups=groups[:5])


def test_retrieval_ranks_use_the_whole_gallery_and_the_bootstrap_resamples_patients():
    """Patient "big" owns 20 of 30 pairs, all retrieved first; the other 10 pairs are never retrieved
    first. The ranks (and R@k values) are the same with groups; the interval is over 11 patients."""
    n = 30
    sim = np.zeros((n, n))
    sim[np.arange(20), np.arange(20)] = 1.0  # the big patient's pairs: rank 0
    sim[np.arange(20, n), (np.arange(20, n) + 1 - 20) % 10 + 20] = 1.0  # the others: a wrong text first
    groups = ["big"] * 20 + [f"p{i}" for i in range(10)]
    plain = retrieval_report(sim, ks=(1,), n_boot=500)
    pats = retrieval_report(sim, ks=(1,), n_boot=500, groups=groups)
    for key in ("image_to_text/R@1", "text_to_image/R@1"):
        assert pats[key]["value"] == plain[key]["value"] == pytest.approx(20 / 30), key
        assert pats[key]["n"] == 11 and pats[key]["n_items"] == 30 and plain[key]["n"] == 30
        assert width(pats[key]) > 2 * width(plain[key])
    assert pats["n"] == 30 and pats["n_patients"] == 11
    with pytest.raises(ValueError, match="groups"):
        retrieval_report(sim, groups=groups[:3])


def test_group_count_must_match_the_cases():
    with pytest.raises(ValueError, match="groups"):
        bootstrap_ci(np.mean, np.arange(4.0), groups=["a", "b"])
    empty = bootstrap_ci(np.mean, np.zeros(0), groups=[])
    assert empty["n"] == 0 and empty["n_items"] == 0 and empty["n_boot"] == 0


def test_a_single_case_or_patient_gives_no_interval():
    """One resampling unit resamples to itself: a [v, v] 'CI' over one CellMap dataset said nothing."""
    import math

    import numpy as np

    from medfuse.metrics.bootstrap import bootstrap_ci, cluster_mean_ci

    one = bootstrap_ci(lambda x: x.mean(-1), np.array([0.062]), vectorized=True)
    assert one["value"] == 0.062 and math.isnan(one["low"]) and math.isnan(one["high"]) and one["n"] == 1
    pooled = cluster_mean_ci(np.array([0.2, 0.4, 0.6]), ["ds1", "ds1", "ds1"])
    assert math.isclose(pooled["value"], 0.4) and math.isnan(pooled["low"]) and pooled["n"] == 1
    assert pooled["n_items"] == 3
    two = cluster_mean_ci(np.array([0.2, 0.4, 0.6]), ["ds1", "ds1", "ds2"], n_boot=200)
    assert two["low"] < two["high"] and two["n"] == 2  # two patients: an interval again
