"""NT-Xent (SimCLR's normalised temperature-scaled cross-entropy) for UniMRSeg stage 2 (seed 003,
"Modality-invariant Contrastive Learning").

The positive pair is a case's complete-modality copy and its incomplete copy; every other case of
the batch, in either copy, is a negative. :func:`multilevel_nt_xent` averages the loss over the
globally pooled features of several encoder levels. Under DDP the negatives are the views of every
rank (see :func:`nt_xent`).

Shapes: B batch (cases), C channels, ``*S`` spatial axes.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from medfuse.dist import gather_rows, global_mean

__all__ = ["multilevel_nt_xent", "nt_xent"]


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.5,
            gather: bool | None = None) -> torch.Tensor:
    """Symmetric NT-Xent over 2B views.

    ``z = normalise([z1; z2])``, ``sim = z z^T / t`` with the diagonal removed; the loss is the mean
    over all 2B rows of ``-log softmax(sim)[i, partner(i)]`` where ``partner(i)`` is the other view
    of the same case (SimCLR eq. 1). During a distributed training step B is the global batch: each
    rank scores its 2b rows against the 2B views of every rank, gathered with a gradient
    (:mod:`medfuse.dist`), so loss and gradients equal one process's over the global batch.

    Args:
        z1: first views (b, C), e.g. complete-modality features.
        z2: second views (b, C), e.g. the same cases with modalities missing.
        temperature: t (UniMRSeg: 0.5).
        gather: views of every rank as negatives (default: during a distributed training step).

    Returns:
        Scalar loss. With B = 1 there is no negative and the loss is 0 (log of a one-way softmax).
    """
    if z1.shape != z2.shape or z1.ndim != 2:
        raise ValueError(f"nt_xent needs two (B, C) tensors of one shape, got {tuple(z1.shape)}, {tuple(z2.shape)}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    b = z1.shape[0]
    z1, z2 = F.normalize(z1.float(), dim=-1), F.normalize(z2.float(), dim=-1)
    (z1_all, z2_all), offset = gather_rows(z1, z2, gather=gather)
    n = z1_all.shape[0]  # B, the global batch
    rows = torch.cat([z1, z2])  # (2b, C): this rank's views
    cols = torch.cat([z1_all, z2_all])  # (2B, C): every rank's views, first views then second views
    sim = rows @ cols.T / temperature  # (2b, 2B)
    local = torch.arange(b, device=z1.device) + offset
    me = torch.cat([local, local + n])  # each row's own column
    partner = torch.cat([local + n, local])
    sim = sim.masked_fill(F.one_hot(me, 2 * n).bool(), float("-inf"))
    return global_mean(F.cross_entropy(sim, partner, reduction="sum"), 2 * b, gather=gather)


def multilevel_nt_xent(feats1: Sequence[torch.Tensor], feats2: Sequence[torch.Tensor],
                       temperature: float = 0.5, gather: bool | None = None) -> torch.Tensor:
    """Mean over levels of :func:`nt_xent` on globally average-pooled feature maps.

    Args:
        feats1: per level (B, C_l, *S_l) features of the first views.
        feats2: the same levels for the second views.
        temperature: NT-Xent temperature.
        gather: see :func:`nt_xent`.

    Returns:
        Scalar loss.
    """
    if len(feats1) != len(feats2) or not feats1:
        raise ValueError(f"need the same non-zero number of levels, got {len(feats1)} and {len(feats2)}")
    losses = []
    for a, b in zip(feats1, feats2, strict=True):
        dims = tuple(range(2, a.ndim))
        losses.append(nt_xent(a.mean(dim=dims), b.mean(dim=dims), temperature, gather))  # GAP -> (B, C_l)
    return torch.stack(losses).mean()
