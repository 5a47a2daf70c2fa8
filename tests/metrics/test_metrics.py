"""Tests for medfuse.metrics: classification, bootstrap CIs, segmentation, retrieval."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sklearn import metrics as skm

from medfuse.metrics import (
    CLASSIFICATION_METRICS,
    accuracy,
    balanced_accuracy,
    bootstrap_ci,
    classification_report,
    concat_case_metrics,
    confusion_stats,
    macro_f1,
    quadratic_kappa,
    recall_at_k,
    retrieval_ranks,
    retrieval_report,
    roc_auc,
    scores_from_stats,
    segmentation_case_metrics,
    segmentation_report,
)
from medfuse.metrics import classification as clf


def one_hot_probs(pred: list[int], k: int) -> np.ndarray:
    """Probabilities whose argmax is ``pred``."""
    p = np.full((len(pred), k), 0.1 / k)
    p[np.arange(len(pred)), pred] += 0.9
    return p


def noisy_problem(n: int, k: int, seed: int = 0, ties: bool = False) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, k, n)
    p = rng.dirichlet(np.ones(k), n)
    p[np.arange(n), y] += 0.4
    p /= p.sum(1, keepdims=True)
    return y, (np.round(p, 1) if ties else p)


# --- classification: hand-computed cases ------------------------------------------------------------

Y = [0, 0, 0, 0, 1, 1, 2, 2]
PRED = [0, 0, 0, 1, 1, 1, 2, 0]


def test_accuracy_and_balanced_accuracy_by_hand():
    p = one_hot_probs(PRED, 3)
    assert accuracy(Y, p) == pytest.approx(6 / 8)
    # recalls: class0 3/4, class1 2/2, class2 1/2
    assert balanced_accuracy(Y, p) == pytest.approx((0.75 + 1.0 + 0.5) / 3)


def test_macro_f1_by_hand():
    # class0: tp3 fp1 fn1 -> 0.75; class1: tp2 fp1 fn0 -> 0.8; class2: tp1 fp0 fn1 -> 2/3
    assert macro_f1(Y, one_hot_probs(PRED, 3)) == pytest.approx((0.75 + 0.8 + 2 / 3) / 3)


def test_quadratic_kappa_by_hand():
    y, pred = [0, 1, 2, 2], [0, 2, 2, 1]
    cm = np.zeros((3, 3))
    np.add.at(cm, (y, pred), 1)
    w = (np.arange(3)[:, None] - np.arange(3)[None]) ** 2
    expected = np.outer(cm.sum(1), cm.sum(0)) / cm.sum()
    by_hand = 1 - (w * cm).sum() / (w * expected).sum()
    assert quadratic_kappa(y, one_hot_probs(pred, 3)) == pytest.approx(by_hand)
    assert quadratic_kappa(y, one_hot_probs(y, 3)) == pytest.approx(1.0)


def test_binary_auc_by_hand():
    y = np.array([0, 0, 1, 1])
    s = np.array([0.1, 0.4, 0.35, 0.8])  # pairs (pos>neg): 0.35>0.1, 0.8>0.1, 0.8>0.4 -> 3/4
    probs = np.stack([1 - s, s], 1)
    assert roc_auc(y, probs) == pytest.approx(0.75)


def test_multiclass_auc_matches_sklearn_ovr():
    y, p = noisy_problem(60, 4)
    assert roc_auc(y, p) == pytest.approx(skm.roc_auc_score(y, p, multi_class="ovr", average="macro"))


def test_multiclass_auc_with_missing_class_averages_present_classes():
    y, p = noisy_problem(50, 4, seed=1)
    y = np.where(y == 3, 0, y)  # class 3 never occurs
    per_class = [skm.roc_auc_score(y == c, p[:, c]) for c in range(3)]
    assert roc_auc(y, p) == pytest.approx(np.mean(per_class))


def test_auc_single_class_is_nan():
    assert math.isnan(roc_auc([1, 1, 1], one_hot_probs([0, 1, 1], 2)))


def test_labels_out_of_range_raise():
    with pytest.raises(ValueError, match="labels must lie"):
        accuracy([0, 3], one_hot_probs([0, 1], 2))


# --- vectorised bootstrap path agrees with scikit-learn ---------------------------------------------


@pytest.mark.parametrize("name", sorted(CLASSIFICATION_METRICS))
@pytest.mark.parametrize("k,ties", [(2, False), (3, True), (5, False)])
def test_batch_metrics_match_sklearn_on_resamples(name, k, ties):
    y, p = noisy_problem(40, k, seed=k, ties=ties)
    idx = np.random.default_rng(7).integers(0, 40, size=(6, 40))
    batch = clf._BATCH_METRICS[name](y[idx], p[idx])
    reference = [CLASSIFICATION_METRICS[name](y[i], p[i]) for i in idx]
    np.testing.assert_allclose(batch, reference, rtol=1e-10, atol=1e-12)


def test_vectorized_and_loop_bootstrap_agree():
    y, p = noisy_problem(50, 3)
    loop = bootstrap_ci(balanced_accuracy, y, p, n_boot=50, seed=4)
    fast = bootstrap_ci(clf._batch_balanced_accuracy, y, p, n_boot=50, seed=4, vectorized=True)
    assert loop == pytest.approx(fast)


# --- bootstrap ----------------------------------------------------------------------------------------


def test_bootstrap_contains_value_and_is_deterministic():
    x = np.random.default_rng(0).normal(size=80)
    a = bootstrap_ci(np.mean, x, n_boot=300, seed=3)
    b = bootstrap_ci(np.mean, x, n_boot=300, seed=3)
    c = bootstrap_ci(np.mean, x, n_boot=300, seed=4)
    assert a == b
    assert a != c
    assert a["low"] <= a["value"] <= a["high"]
    assert a["n"] == 80 and a["n_boot"] == 300


def test_bootstrap_narrows_with_more_data():
    rng = np.random.default_rng(1)
    small = bootstrap_ci(np.mean, rng.normal(size=30), n_boot=300)
    large = bootstrap_ci(np.mean, rng.normal(size=3000), n_boot=300)
    assert large["high"] - large["low"] < (small["high"] - small["low"]) / 3


def test_bootstrap_skips_degenerate_resamples():
    # 1 positive in 12: many resamples contain no positive, where AUC is undefined
    y = np.zeros(12, dtype=int)
    y[0] = 1
    p = np.stack([np.linspace(1, 0, 12), np.linspace(0, 1, 12)], 1)
    out = bootstrap_ci(roc_auc, y, p, n_boot=200, seed=0)
    assert 0 < out["n_boot"] < 200
    assert out["low"] <= out["high"]


def test_bootstrap_empty_and_mismatched():
    assert bootstrap_ci(np.mean, np.array([]))["n"] == 0
    with pytest.raises(ValueError, match="differ in length"):
        bootstrap_ci(lambda a, b: 0.0, np.zeros(3), np.zeros(4))


def test_classification_report_structure_and_cis():
    y, p = noisy_problem(120, 3)
    rep = classification_report(y, p, class_names=["a", "b", "c"], n_boot=200, seed=0)
    for name, fn in CLASSIFICATION_METRICS.items():
        entry = rep[name]
        assert entry["value"] == pytest.approx(fn(y, p))
        assert entry["low"] <= entry["value"] <= entry["high"]
        assert entry["n"] == 120
    assert rep["n"] == 120
    assert np.array_equal(rep["confusion_matrix"], skm.confusion_matrix(y, p.argmax(1)))
    assert set(rep["per_class"]) == {"a", "b", "c"}
    assert sum(v["support"] for v in rep["per_class"].values()) == 120


def test_classification_report_rejects_empty():
    with pytest.raises(ValueError, match="at least one case"):
        classification_report(np.zeros(0, dtype=int), np.zeros((0, 3)))


def test_classification_report_accepts_tensors():
    y, p = noisy_problem(30, 2)
    rep = classification_report(torch.from_numpy(y), torch.from_numpy(p), n_boot=20)
    assert rep["accuracy"]["value"] == pytest.approx(accuracy(y, p))


# --- segmentation -----------------------------------------------------------------------------------


def cube_pair(shift: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Two 4^3 cubes of class 1 in a 12^3 volume, the prediction shifted by ``shift`` along D."""
    pred = torch.zeros(1, 12, 12, 12, dtype=torch.long)
    target = torch.zeros_like(pred)
    target[0, 4:8, 4:8, 4:8] = 1
    pred[0, 4 + shift : 8 + shift, 4:8, 4:8] = 1
    return pred, target


@pytest.mark.parametrize("shift", [0, 1, 2, 3])
def test_dice_iou_of_shifted_cubes(shift):
    pred, target = cube_pair(shift)
    m = segmentation_case_metrics(pred, target, num_classes=2)
    overlap = (4 - shift) / 4  # fraction of the cube that overlaps
    assert m["dice"].shape == (1, 1)
    assert m["dice"][0, 0] == pytest.approx(overlap)
    assert m["iou"][0, 0] == pytest.approx(overlap / (2 - overlap))


@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), (3.0, 1.0, 1.0), (1.0, 2.0, 2.0)])
def test_hd95_scales_with_spacing_along_shift_axis(spacing):
    pred, target = cube_pair(2)
    m = segmentation_case_metrics(pred, target, num_classes=2, spacing=spacing)
    iso = segmentation_case_metrics(pred, target, num_classes=2)
    # the shift is along D only, so HD95 scales with the D spacing and ignores in-plane spacing
    assert iso["hd95"][0, 0] > 0
    assert m["hd95"][0, 0] == pytest.approx(iso["hd95"][0, 0] * spacing[0])


def test_empty_conventions():
    pred = torch.zeros(3, 6, 6, 6, dtype=torch.long)
    target = torch.zeros_like(pred)
    target[1, 1:3, 1:3, 1:3] = 1  # case 1: empty prediction, non-empty target
    pred[2, 1:3, 1:3, 1:3] = 1  # case 2: non-empty prediction, empty target
    m = segmentation_case_metrics(pred, target, num_classes=2)
    np.testing.assert_allclose(m["dice"][:, 0], [1.0, 0.0, 0.0])
    np.testing.assert_allclose(m["iou"][:, 0], [1.0, 0.0, 0.0])
    assert np.isnan(m["hd95"]).all()


def test_include_background_and_region_mode():
    pred, target = cube_pair(1)
    with_bg = segmentation_case_metrics(pred, target, num_classes=2, include_background=True)
    assert with_bg["dice"].shape == (1, 2)
    assert with_bg["dice"][0, 0] > with_bg["dice"][0, 1]  # background overlaps almost entirely
    regions_p = torch.stack([pred > 0, pred > 0], 1)  # (B, 2, D, H, W)
    regions_t = torch.stack([target > 0, torch.zeros_like(target, dtype=torch.bool)], 1)
    reg = segmentation_case_metrics(regions_p, regions_t, num_classes=0, region_mode=True)
    assert reg["dice"].shape == (1, 2)
    assert reg["dice"][0, 0] == pytest.approx(with_bg["dice"][0, 1])
    assert reg["dice"][0, 1] == 0.0 and np.isnan(reg["hd95"][0, 1])


def test_segmentation_report_means_and_nan_counts():
    per_case = {
        "dice": np.array([[0.5, 1.0], [0.7, 0.0], [0.9, 0.5]]),
        "hd95": np.array([[2.0, np.nan], [4.0, np.nan], [6.0, 1.0]]),
    }
    rep = segmentation_report(per_case, ["liver", "tumour"], n_boot=200, seed=0)
    assert rep["per_class"]["liver"]["dice"]["value"] == pytest.approx(0.7)
    assert rep["per_class"]["tumour"]["hd95"]["value"] == pytest.approx(1.0)
    assert rep["per_class"]["tumour"]["hd95"]["n"] == 1
    assert rep["per_class"]["tumour"]["hd95"]["n_nan"] == 2
    assert rep["dice"]["value"] == pytest.approx(np.mean([0.75, 0.35, 0.7]))
    assert rep["hd95"]["value"] == pytest.approx(np.mean([2.0, 4.0, 3.5]))
    assert rep["hd95"]["n_nan"] == 2
    assert rep["dice"]["low"] <= rep["dice"]["value"] <= rep["dice"]["high"]
    assert rep["n"] == 3


def test_concat_case_metrics_stacks_batches():
    a = segmentation_case_metrics(*cube_pair(1), num_classes=2)
    b = segmentation_case_metrics(*cube_pair(2), num_classes=2)
    both = concat_case_metrics([a, b])
    assert both["dice"].shape == (2, 1)
    assert both["dice"][1, 0] == pytest.approx(b["dice"][0, 0])


def test_confusion_stats_and_scores():
    target = np.array([[0, 0, 1, 1, 2, 2]])
    pred = np.array([[0, 1, 1, 1, 0, 0]])
    stats = confusion_stats(torch.from_numpy(pred), torch.from_numpy(target), 3)
    np.testing.assert_array_equal(stats["tp"], [1, 2, 0])
    np.testing.assert_array_equal(stats["fp"], [2, 1, 0])
    np.testing.assert_array_equal(stats["fn"], [1, 0, 2])
    s = scores_from_stats(stats)
    np.testing.assert_allclose(s["precision"][:2], [1 / 3, 2 / 3])
    np.testing.assert_allclose(s["recall"], [0.5, 1.0, 0.0])
    np.testing.assert_allclose(s["iou"], [0.25, 2 / 3, 0.0])
    np.testing.assert_allclose(s["f1"], s["dice"])
    assert np.isnan(s["precision"][2])  # class 2 never predicted


def test_confusion_stats_ignore_index_and_dice_parity():
    pred, target = cube_pair(1)
    t = target.clone()
    t[0, 0] = 255
    stats = confusion_stats(pred, t, 2, ignore_index=255)
    assert stats["tp"].sum() + stats["fp"].sum() == pred.numel() - 144
    full = scores_from_stats(confusion_stats(pred, target, 2))
    monai = segmentation_case_metrics(pred, target, 2)
    assert full["dice"][1] == pytest.approx(monai["dice"][0, 0])


# --- retrieval ----------------------------------------------------------------------------------------


def test_recall_identity_is_one():
    r = recall_at_k(np.eye(20), ks=(1, 5, 50))
    assert r == {"R@1": 1.0, "R@5": 1.0}  # R@50 is dropped: larger than the gallery


def test_recall_permuted_known_value():
    n = 10
    # query i's match sits at rank i: similarity decreases along a row, the positive placed i-th
    sim = np.zeros((n, n))
    for i in range(n):
        order = [j for j in range(n) if j != i]
        order.insert(i, i)
        sim[i, order] = np.arange(n, 0, -1)
    np.testing.assert_array_equal(retrieval_ranks(sim), np.arange(n))
    r = recall_at_k(sim, ks=(1, 5, 10))
    assert r == pytest.approx({"R@1": 0.1, "R@5": 0.5, "R@10": 1.0})


def test_recall_with_gt_indices_and_ties():
    perm = np.random.default_rng(0).permutation(8)
    sim = np.eye(8)[perm]  # query i matches gallery perm[i]
    assert recall_at_k(sim, ks=(1,), gt=perm)["R@1"] == 1.0
    assert recall_at_k(sim, ks=(1,))["R@1"] == pytest.approx(np.mean(perm == np.arange(8)))
    assert recall_at_k(np.ones((8, 8)), ks=(1, 8)) == {"R@1": 0.0, "R@8": 1.0}  # ties count against


def test_retrieval_report_both_directions():
    rng = np.random.default_rng(0)
    sim = np.eye(30) + rng.normal(scale=0.8, size=(30, 30))
    rep = retrieval_report(torch.from_numpy(sim), ks=(1, 5), n_boot=200, seed=0)
    assert rep["image_to_text/R@1"]["value"] == pytest.approx(recall_at_k(sim, ks=(1,))["R@1"])
    assert rep["text_to_image/R@5"]["value"] == pytest.approx(recall_at_k(sim.T, ks=(5,))["R@5"])
    entry = rep["image_to_text/R@5"]
    assert entry["low"] <= entry["value"] <= entry["high"] and entry["n"] == 30
    assert rep["n"] == 30


def test_ci_level_sets_the_default_coverage_inside_the_block():
    import numpy as np

    from medfuse.metrics import bootstrap_ci, ci_level, default_ci

    x = np.random.default_rng(0).normal(size=200)
    base = bootstrap_ci(np.mean, x, n_boot=400, seed=1)
    with ci_level(0.5) as level:
        assert level == default_ci() == 0.5
        inner = bootstrap_ci(np.mean, x, n_boot=400, seed=1)
        explicit = bootstrap_ci(np.mean, x, n_boot=400, seed=1, ci=0.95)
    assert default_ci() == 0.95
    assert inner["high"] - inner["low"] < base["high"] - base["low"]
    assert explicit == base


def test_cluster_bootstrap_resamples_patients_not_their_items():
    """20 slices of 2 patients (0.9 and 0.1 each): resampling slices pretends there are 20 independent
    values; resampling patients gives the honest, wide interval. Same point estimate."""
    from medfuse.metrics import bootstrap_ci, cluster_mean_ci, segmentation_report

    values = np.r_[np.full(10, 0.9), np.full(10, 0.1)] + np.linspace(0, 0.01, 20)
    groups = ["a"] * 10 + ["b"] * 10
    items = bootstrap_ci(lambda x: x.mean(-1), values, n_boot=500, vectorized=True)
    pats = cluster_mean_ci(values, groups, n_boot=500)
    assert pats["value"] == pytest.approx(items["value"]) and pats["n"] == 2 and pats["n_items"] == 20
    assert pats["low"] < 0.15 and pats["high"] > 0.85  # either patient alone
    assert items["low"] > 0.3 and items["high"] < 0.7
    rep = segmentation_report({"dice": values[:, None]}, ["t"], n_boot=200, groups=groups)
    assert rep["dice"]["n"] == 2 and rep["per_class"]["t"]["dice"]["n_items"] == 20 and rep["n_patients"] == 2
    with pytest.raises(ValueError, match="groups"):
        cluster_mean_ci(values, groups[:5])


def test_nan_similarities_are_not_retrieved():
    """NaN embeddings (a diverged model) must not score a perfect recall."""
    from medfuse.metrics.retrieval import recall_at_k, retrieval_ranks

    assert recall_at_k(np.full((5, 5), np.nan), ks=(1,)) == {"R@1": 0.0}
    sim = np.eye(4)
    sim[2, 0] = np.nan
    assert retrieval_ranks(sim).tolist() == [0, 0, 4, 0]
