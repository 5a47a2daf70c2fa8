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

