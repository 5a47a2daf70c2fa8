"""Anatomical structure encoder and region-aware cross-attention (seed 001, sections 2 and 4).

A region-ID mask (e.g. TotalSegmentator output mapped to R regions; 0 = no region) becomes:

* **voxel fractions** per patch, (B, N, R + 1): the share of each patch's voxels lying in the
  background (index 0) and in each region, from pooling the one-hot mask over the patch. Rows sum
  to 1. The **assignment** (B, N, R) is the same without the background, renormalised over the
  covered voxels (rows sum to 1 where a patch touches any region, 0 elsewhere).
* **region embeddings**, (B, R + 1, C): a learned table entry per region plus a small 3D CNN over
  the mask (at sub-patch resolution, so it sees each region's shape inside the patches), pooled per
  region with the voxel fractions. Index 0 embeds "no region" (air, body wall, ...).

:class:`RegionAwareAttention` lets every patch attend to the region embeddings, and
:class:`CTBlock` puts it after the slice-aware self-attention in one transformer block. How the
assignment weights the logits is ``weighting``:

``log`` (default)
    ``logits + log(fraction + eps)``: a softmax over regions multiplied by the patch's overlap, so
    a region the patch does not touch gets weight ~eps relative to the ones it does.
``multiply``
    ``logits * fraction``, the seed's literal form. A region with zero overlap gets logit 0, which
    is *not* a small weight: when the overlapping regions' logits are negative it gets *more*
    weight than they do (tested in ``tests/layers/test_region_attention.py``).
``none``
    plain cross-attention to all regions; the assignment is ignored.

The seed's mask encoder runs three full-resolution convolutions with 64 -> 128 -> C channels: at
(64, 512, 512) that is > 8 GB of activations per volume; here the CNN runs on the pooled one-hot
mask at (pd, ph/4, pw/4) cells.

Shapes: B batch, N patch tokens, R regions (R + 1 with the background), C channels, H heads.
This module must never import ``medfuse.encoders``, ``medfuse.models`` or ``medfuse.engine``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from timm.layers import Mlp
from torch import nn

from medfuse.layers.patch_embed import pad_to_patches
from medfuse.layers.slice_attention import SliceAwareAttention

__all__ = ["WEIGHTINGS", "AnatomicalStructureEncoder", "CTBlock", "RegionAwareAttention", "RegionContext",
           "region_fractions", "region_pool"]

WEIGHTINGS = ("log", "multiply", "none")


def region_fractions(mask: torch.Tensor, num_regions: int, cell: Sequence[int],
                     dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Share of each cell's voxels in the background and in each region.

    Args:
        mask: (B, 1, D, H, W) or (B, D, H, W) integer region IDs in 0..R (0 = no region).
        num_regions: R.
        cell: (cd, ch, cw) voxels per cell; the mask is zero-padded to a multiple.
        dtype: output dtype.

    Returns:
        (B, R + 1, D/cd, H/ch, W/cw), summing to 1 over the region axis.

    Raises:
        ValueError: a mask value outside 0..R.
    """
    m = mask[:, 0] if mask.ndim == 5 else mask
    lo, hi = int(m.min()), int(m.max())
    if lo < 0 or hi > num_regions:
        raise ValueError(f"region mask values must be in 0..{num_regions}, got {lo}..{hi}")
    cd, ch, cw = (int(c) for c in cell)
    m = pad_to_patches(m.long(), (cd, ch, cw), value=0)
    b, d, h, w = m.shape
    gd, gh, gw, r1 = d // cd, h // ch, w // cw, num_regions + 1
    # One bincount over (cell, label) pairs: 8 bytes per voxel, where a one-hot would hold R + 1 floats.
    dev = m.device
    cell = (((torch.arange(b, device=dev).view(b, 1, 1, 1) * gd + (torch.arange(d, device=dev) // cd).view(1, d, 1, 1))
             * gh + (torch.arange(h, device=dev) // ch).view(1, 1, h, 1)) * gw
            + (torch.arange(w, device=dev) // cw).view(1, 1, 1, w))  # (B, D, H, W) cell index
    counts = torch.bincount((cell * r1 + m).flatten(), minlength=b * gd * gh * gw * r1)
    counts = counts.view(b, gd, gh, gw, r1).to(dtype) / (cd * ch * cw)
    return rearrange(counts, "b d h w r -> b r d h w")


def region_pool(feats: torch.Tensor, weights: torch.Tensor, eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted mean of token features per region.

    Args:
        feats: (B, N, C).
        weights: (B, N, R), e.g. voxel fractions: region r's mean weights patch n by its overlap.

    Returns:
        ``(pooled, mass)``: pooled (B, R, C) (zeros for a region with no mass), mass (B, R) the
        summed weights (patch-equivalents of voxels in the region).
    """
    mass = weights.sum(1)  # (B, R)
    pooled = torch.einsum("bnr,bnc->brc", weights, feats) / mass.clamp_min(eps)[..., None]
    return pooled, mass


@dataclass
class RegionContext:
    """What the anatomical encoder derives from a mask.

    Attributes:
        fractions: (B, N, R + 1) voxel shares per patch; column 0 = no region; rows sum to 1.
        assignment: (B, N, R) shares over covered voxels only (rows sum to 1 where coverage > 0).
        coverage: (B, N) share of each patch's voxels inside any region.
        present: (B, R) bool, region has at least one voxel.
        embeds: (B, R + 1, C) region embeddings (row 0 = no region), or ``None`` (``embed=False``).
        grid: the patch grid (d, h, w).
    """

    fractions: torch.Tensor
    assignment: torch.Tensor
    coverage: torch.Tensor
    present: torch.Tensor
    embeds: torch.Tensor | None
    grid: tuple[int, int, int]


def _sub(patch: tuple[int, int, int], sub: Sequence[int]) -> tuple[int, int, int]:
    out = tuple(max(1, min(int(s), p)) for s, p in zip(sub, patch, strict=True))
    if any(p % s for s, p in zip(out, patch, strict=True)):
        raise ValueError(f"sub-patch factors {tuple(sub)} must divide the patch size {patch}")
    return out  # type: ignore[return-value]


class AnatomicalStructureEncoder(nn.Module):
    """Region mask -> voxel fractions, assignment and region embeddings (seed section 2).

    Args:
        num_regions: R (mask values 1..R; 0 = no region).
        dim: embedding width C.
        patch_size: (pd, ph, pw) of the patch embedding.
        sub: cells per patch along each axis for the mask CNN (default (1, 4, 4)).
        hidden: channels of the mask CNN.
        embed: build the region embeddings (table + CNN). ``False`` computes only the fractions
            (the region-blind ablation needs them for region pooling, not the embeddings).
    """

    def __init__(self, num_regions: int, dim: int, patch_size: Sequence[int] = (4, 16, 16),
                 sub: Sequence[int] = (1, 4, 4), hidden: int = 32, embed: bool = True):
        super().__init__()
        if num_regions < 1:
            raise ValueError(f"num_regions must be >= 1, got {num_regions}")
        self.num_regions = num_regions
        self.patch_size = tuple(int(p) for p in patch_size)
        self.sub = _sub(self.patch_size, sub)  # type: ignore[arg-type]
        self.cell = tuple(p // s for p, s in zip(self.patch_size, self.sub, strict=True))
        self.table = nn.Embedding(num_regions + 1, dim) if embed else None
        self.cnn = nn.Sequential(
            nn.Conv3d(num_regions + 1, hidden, 3, padding=1), nn.GELU(),
            nn.Conv3d(hidden, hidden, kernel_size=self.sub, stride=self.sub), nn.GELU(),  # cells -> patches
            nn.Conv3d(hidden, dim, 1),
        ) if embed else None
        if self.table is not None:
            nn.init.normal_(self.table.weight, std=0.02)

    def forward(self, mask: torch.Tensor) -> RegionContext:
        """Encode a region mask.

        Args:
            mask: (B, 1, D, H, W) integer region IDs in 0..R, on the image's voxel grid.

        Returns:
            A :class:`RegionContext` on the patch grid of the same volume.
        """
        dtype = self.table.weight.dtype if self.table is not None else torch.float32
        cells = region_fractions(mask, self.num_regions, self.cell, dtype)  # (B, R+1, d*sd, h*sh, w*sw)
        patches = F.avg_pool3d(cells, self.sub, self.sub)  # (B, R+1, d, h, w)
        grid = tuple(int(s) for s in patches.shape[-3:])
        fractions = rearrange(patches, "b r d h w -> b (d h w) r")  # (B, N, R+1)
        coverage = 1.0 - fractions[..., 0]
        assignment = fractions[..., 1:] / coverage.clamp_min(1e-6)[..., None]
        assignment = torch.where(coverage[..., None] > 1e-6, assignment, torch.zeros_like(assignment))
        present = fractions[..., 1:].sum(1) > 0  # (B, R)
        embeds = None
        if self.table is not None and self.cnn is not None:
            feats = rearrange(self.cnn(cells), "b c d h w -> b (d h w) c")  # (B, N, C)
            pooled, _ = region_pool(feats, fractions)  # (B, R+1, C)
            embeds = self.table.weight[None] + pooled
        return RegionContext(fractions, assignment, coverage, present, embeds, grid)  # type: ignore[arg-type]


class RegionAwareAttention(nn.Module):
    """Patches attend to region embeddings, weighted by their overlap (seed section 4).

    Args:
        dim: token width C (divisible by ``num_heads``).
        num_heads: heads H.
        weighting: ``log`` | ``multiply`` | ``none`` (see module doc).
        eps: floor inside ``log(fraction + eps)``.
        qkv_bias: bias in the q and kv projections.
        proj_drop: dropout after the output projection.

    ``forward(..., return_attn=True)`` also returns the attention weights (B, H, N, R + 1), for the
    report's region-attention maps.
    """

    def __init__(self, dim: int, num_heads: int = 8, weighting: str = "log", eps: float = 1e-4,
                 qkv_bias: bool = True, proj_drop: float = 0.0):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        if weighting not in WEIGHTINGS:
            raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")
        self.num_heads, self.weighting, self.eps = num_heads, weighting, eps
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(dim, 2 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def weights(self, logits: torch.Tensor, fractions: torch.Tensor) -> torch.Tensor:
        """Attention weights from logits (B, H, N, R') and fractions (B, N, R') -> (B, H, N, R')."""
        a = fractions[:, None].to(logits.dtype)
        if self.weighting == "log":
            logits = logits + torch.log(a + self.eps)
        elif self.weighting == "multiply":
            logits = logits * a
        return logits.softmax(dim=-1)

    def forward(self, x: torch.Tensor, regions: torch.Tensor, fractions: torch.Tensor,
                return_attn: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Cross-attend patches to regions.

        Args:
            x: patch tokens, (B, N, C).
            regions: region embeddings, (B, R', C) (R' = R + 1 with the background row).
            fractions: (B, N, R') overlap of each patch with each region.
            return_attn: also return the detached attention weights (B, H, N, R').

        Returns:
            (B, N, C), and the weights when ``return_attn``.
        """
        q = rearrange(self.q(x), "b n (h d) -> b h n d", h=self.num_heads)
        kv = rearrange(self.kv(regions), "b r (two h d) -> two b h r d", two=2, h=self.num_heads)
        logits = (q @ kv[0].transpose(-2, -1)) * q.shape[-1] ** -0.5  # (B, H, N, R'): R' is small
        attn = self.weights(logits, fractions)
        out = self.proj_drop(self.proj(rearrange(attn @ kv[1], "b h n d -> b n (h d)")))
        return (out, attn.detach()) if return_attn else out


class CTBlock(nn.Module):
    """One block of the seed's encoder (section 5), pre-norm:
    LN -> slice-aware attention -> add -> LN -> region-aware attention -> add -> LN -> FFN -> add.

    Args:
        dim: token width C.
        num_heads: heads of both attentions.
        mlp_ratio: FFN hidden width / C.
        region_attention: include the region-aware cross-attention (``False``: region-blind).
        weighting: region attention weighting (``log`` | ``multiply`` | ``none``).
        slice_bias: the slice-distance bias of the self-attention.
        impl: slice-attention implementation (see :func:`~medfuse.layers.slice_attention.slice_attention`).
        drop: dropout after both attention projections and in the FFN.
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, region_attention: bool = True,
                 weighting: str = "log", slice_bias: bool = True, impl: str = "auto", drop: float = 0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = SliceAwareAttention(dim, num_heads, slice_bias=slice_bias, impl=impl, proj_drop=drop)
        self.norm2 = nn.LayerNorm(dim) if region_attention else None
        self.norm_r = nn.LayerNorm(dim) if region_attention else None
        self.region = RegionAwareAttention(dim, num_heads, weighting=weighting, proj_drop=drop) if region_attention \
            else None
        self.norm3 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop=drop)

    def forward(self, x: torch.Tensor, z: torch.Tensor, regions: torch.Tensor | None,
                fractions: torch.Tensor, return_attn: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor | None]:
        """x (B, N, C), z (N,), regions (B, R + 1, C) or None, fractions (B, N, R + 1) -> (B, N, C).

        With ``return_attn`` also the region attention weights (B, H, N, R + 1) (None without region attention).
        """
        x = x + self.attn(self.norm1(x), z)
        attn = None
        if self.region is not None and regions is not None:
            r, attn = self.region(self.norm2(x), self.norm_r(regions), fractions, return_attn=True)
            x = x + r
        x = x + self.mlp(self.norm3(x))
        return (x, attn) if return_attn else x
