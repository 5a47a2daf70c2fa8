"""Recall@k with k at or above the gallery size is 1.0 for any model: the report leaves it out (a
split of one pair reported ``image_to_text/R@1 1.000 [1.000, 1.000] n=1``)."""

from __future__ import annotations

import numpy as np
import pytest

from medfuse.metrics.retrieval import retrieval_report


@pytest.mark.parametrize("n, ks, kept", [(1, (1, 5), []), (2, (1, 2, 5), [1]), (5, (1, 5, 10), [1]),
                                         (12, (1, 5, 10, 50), [1, 5, 10])])
def test_recall_at_or_above_the_gallery_size_is_left_out(n, ks, kept):
    rng = np.random.default_rng(0)
    rep = retrieval_report(rng.normal(size=(n, n)), ks=ks, n_boot=20)
    for direction in ("image_to_text", "text_to_image"):
        assert sorted(int(k.split("@")[1]) for k in rep if k.startswith(f"{direction}/R@")) == kept
    assert rep["n"] == n
    from medfuse.metrics.retrieval import trivial_ks

    assert trivial_ks(ks, n) == [k for k in ks if k not in kept]


def test_a_left_out_cutoff_is_trivial_for_a_random_and_a_collapsed_model():
    """Why they are left out: with k = N every query is retrieved, whatever the similarities."""
    from medfuse.metrics.retrieval import recall_at_k

    rng = np.random.default_rng(1)
    for sim in (rng.normal(size=(6, 6)), np.ones((6, 6)), -np.eye(6)):
        assert recall_at_k(sim, ks=(6,))["R@6"] == 1.0


@pytest.mark.parametrize("n, ks, kept", [(1, (1, 5, 10), []), (5, (1, 5, 10), [1]), (6, (1, 5, 10), [1, 5]),
                                         (11, (1, 5, 10), [1, 5, 10])])
def test_validation_recalls_follow_the_report_rule(n, ks, kept):
    """One rule for the per-epoch validation numbers and the evaluation report (trivial_ks)."""
    from medfuse.metrics.retrieval import paired_recalls, trivial_ks

    sim = np.random.default_rng(2).normal(size=(n, n))
    res, left = paired_recalls(sim, ks)
    assert left == trivial_ks(ks, n)
    assert sorted(k for k in res if k != "mean_recall") == sorted(f"{d}_R@{k}" for d in ("i2t", "t2i") for k in kept)
    rep = retrieval_report(sim, ks=ks, n_boot=10)
    for k in kept:
        assert res[f"i2t_R@{k}"] == rep[f"image_to_text/R@{k}"]["value"]
        assert res[f"t2i_R@{k}"] == rep[f"text_to_image/R@{k}"]["value"]
    if kept:
        assert res["mean_recall"] == pytest.approx(np.mean([v for k, v in res.items() if k != "mean_recall"]))
    else:
        assert res == {}
    full, none_left = paired_recalls(sim, ks, drop_trivial=False)
    assert none_left == [] and all(full[f"{d}_R@{k}"] == 1.0 for d in ("i2t", "t2i") for k in left)
