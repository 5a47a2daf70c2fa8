"""Symmetric InfoNCE (CLIP-style) with a learnable, clamped temperature, and its multi-positive
form (ct_encoder's three levels, text_seg's image-text term).

Under DDP the negatives are global: during a training step each rank scores its own rows against
the rows of every rank, gathered with a gradient (:func:`medfuse.dist.gather_rows`), and
:func:`medfuse.dist.global_mean` makes the loss and, after DDP's averaging, the gradients equal to
one process's over the whole global batch (open_clip's local loss with gather-with-grad). Outside a
training step (validation, evaluation) a rank scores its own batch. ``gather=False`` forces that.

Shapes: n rows on this rank, N over all ranks (N = n in one process), E embedding width.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from medfuse.dist import gather_rows, global_mean, hash_strings

__all__ = ["InfoNCE", "info_nce", "multi_positive_info_nce"]


def info_nce(a: torch.Tensor, b: torch.Tensor, logit_scale: torch.Tensor | float,
             gather: bool | None = None) -> torch.Tensor:
    """Symmetric InfoNCE between matched rows of ``a`` and ``b``.

    Args:
        a: (n, E) embeddings (normalised here).
        b: (n, E) embeddings; row i of ``b`` is the positive of row i of ``a``.
        logit_scale: multiplier of the cosine similarities (1 / temperature).
        gather: negatives from every rank (default: during a distributed training step).

    Returns:
        Scalar loss: mean of the a->b and b->a cross-entropies over the N rows of every rank.
    """
    a = F.normalize(a, dim=-1)
    b = F.normalize(b, dim=-1)
    (a_all, b_all), offset = gather_rows(a, b, gather=gather)
    target = torch.arange(a.shape[0], device=a.device) + offset  # row i's positive is global column offset + i
    ab = logit_scale * a @ b_all.t()  # (n, N)
    ba = logit_scale * b @ a_all.t()  # (n, N)
    rows = F.cross_entropy(ab, target, reduction="sum") + F.cross_entropy(ba, target, reduction="sum")
    return 0.5 * global_mean(rows, a.shape[0], gather=gather)


def multi_positive_info_nce(a: torch.Tensor, b: torch.Tensor, groups: Sequence[str],
                            scale: torch.Tensor | float, gather: bool | None = None) -> torch.Tensor:
    """Symmetric InfoNCE where rows with the same group (e.g. identical text) are all positives.

    Row i's target is uniform over the columns of its group (a soft-target cross-entropy), both
    ways; with distinct groups this is :func:`info_nce`. ct_encoder's global, region and CoT-step
    levels and text_seg's image-text term use it.

    Args:
        a: (n, E) image embeddings; b: (n, E) text embeddings (both normalised here, in float32).
        groups: n keys; equal keys are positives of each other (also across ranks).
        scale: 1 / temperature.
        gather: negatives from every rank (default: during a distributed training step).

    Returns:
        Scalar: mean of the image->text and text->image soft cross-entropies over the N rows.
    """
    if len(groups) != a.shape[0]:
        raise ValueError(f"got {len(groups)} groups for {a.shape[0]} rows")
    a, b = F.normalize(a.float(), dim=-1), F.normalize(b.float(), dim=-1)
    g = hash_strings(groups, device=a.device)  # (n,)
    (a_all, b_all, g_all), _ = gather_rows(a, b, g, gather=gather)
    same = (g[:, None] == g_all[None, :]).float()  # (n, N)
    target = same / same.sum(1, keepdim=True)
    ab = scale * a @ b_all.t()  # (n, N)
    ba = scale * b @ a_all.t()  # (n, N)
    rows = -(target * ab.log_softmax(1)).sum() - (target * ba.log_softmax(1)).sum()
    return 0.5 * global_mean(rows, a.shape[0], gather=gather)


class InfoNCE(nn.Module):
    """InfoNCE with a learnable temperature, clamped to ``[min_temp, max_temp]``.

    Args:
        init_temp: initial temperature (CLIP uses 0.07).
        min_temp: lower clamp; keeps the logits bounded (CLIP clamps the scale at 100).
        max_temp: upper clamp.
        learnable: if False the temperature is a buffer.
    """

    def __init__(self, init_temp: float = 0.07, min_temp: float = 0.01, max_temp: float = 1.0,
                 learnable: bool = True):
        super().__init__()
        init = torch.tensor(math.log(1.0 / init_temp))
        if learnable:
            self.log_scale = nn.Parameter(init)
        else:
            self.register_buffer("log_scale", init)
        self.min_log, self.max_log = math.log(1.0 / max_temp), math.log(1.0 / min_temp)

    @property
    def scale(self) -> torch.Tensor:
        return self.log_scale.clamp(self.min_log, self.max_log).exp()

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """a, b: (n, E) -> scalar loss (global negatives during a distributed training step)."""
        return info_nce(a, b, self.scale)
