"""Symmetric InfoNCE (CLIP-style) with a learnable, clamped temperature."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def info_nce(a: torch.Tensor, b: torch.Tensor, logit_scale: torch.Tensor | float) -> torch.Tensor:
    """Symmetric InfoNCE between matched rows of ``a`` and ``b``.

    Args:
        a: (B, E) embeddings (normalised here).
        b: (B, E) embeddings; row i of ``b`` is the positive of row i of ``a``.
        logit_scale: multiplier of the cosine similarities (1 / temperature).

    Returns:
        Scalar loss: mean of the a->b and b->a cross-entropies.
    """
    a = F.normalize(a, dim=-1)
    b = F.normalize(b, dim=-1)
    logits = logit_scale * a @ b.t()  # (B, B)
    target = torch.arange(a.shape[0], device=a.device)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target))


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
        """a, b: (B, E) -> scalar loss."""
        return info_nce(a, b, self.scale)
