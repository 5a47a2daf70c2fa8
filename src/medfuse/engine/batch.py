"""The batch and forward-output dictionaries of the tasks, with their shapes, and batch helpers.

* :class:`Batch`: a collated batch of the generic case data module (families extend it);
* :class:`ClassifierOutput`, :class:`SegmentationOutput`, :class:`EmbeddingOutput`: what the
  forwards of the classification, segmentation and contrastive tasks return;
* :func:`pad_batch` (pad to a size divisor), :func:`merge_outputs` (concatenate the validation
  outputs of an epoch) and ``_batch_size``.

The tasks (:mod:`medfuse.engine.tasks`) use these and re-export them.
"""

from __future__ import annotations

from typing import Any, TypedDict

import numpy as np
import torch
import torch.nn.functional as F


class Batch(TypedDict, total=False):
    """A collated batch of the generic case data module (families extend it with their own keys).

    Keys:
        image: (B, M, D, H, W) float, one channel per modality.
        label: (B,) long class labels (classification).
        mask: (B, 1, D, H, W) long voxel labels (segmentation) or region ids.
        present: (B, M) float, 1 where the modality was given.
        affine: (B, 4, 4) RAS affine of the processed grid.
        text: B strings (reports, prompts).
        case_id: B case ids.
    """

    image: torch.Tensor
    label: torch.Tensor
    mask: torch.Tensor
    present: torch.Tensor
    affine: torch.Tensor
    text: list[str]
    case_id: list[str]


class ClassifierOutput(TypedDict, total=False):
    """logits: (B, K)."""

    logits: torch.Tensor


class SegmentationOutput(TypedDict, total=False):
    """logits: (B, K, D, H, W)."""

    logits: torch.Tensor


class EmbeddingOutput(TypedDict, total=False):
    """image_emb: (B, E); text_emb: (B, E) (not yet normalised)."""

    image_emb: torch.Tensor
    text_emb: torch.Tensor


def _batch_size(batch: dict[str, Any]) -> int:
    x = batch.get("image")
    return int(x.shape[0]) if isinstance(x, torch.Tensor) else len(batch.get("case_id", [1]))


def pad_batch(batch: dict[str, Any], divisor: int) -> dict[str, Any]:
    """``image`` (B, M, D, H, W) and ``mask`` (B, 1, D, H, W) zero-padded at the far end of each
    spatial axis to a multiple of ``divisor`` (MONAI ``DivisiblePad``, ``method="end"``)."""
    image = batch.get("image")
    if divisor <= 1 or not isinstance(image, torch.Tensor) or image.ndim != 5:
        return batch
    spatial = image.shape[2:]
    if all(s % divisor == 0 for s in spatial):
        return batch
    pad: list[int] = []
    for s in reversed(spatial):
        pad += [0, -(-int(s) // divisor) * divisor - int(s)]
    out = dict(batch)
    out["image"] = F.pad(image, pad)
    mask = batch.get("mask")
    if isinstance(mask, torch.Tensor) and mask.shape[2:] == spatial:
        out["mask"] = F.pad(mask, pad)
    return out


def merge_outputs(outputs: list[dict[str, Any]]) -> dict[str, Any]:
    merged: dict[str, Any] = {}
    for key in outputs[0]:
        vals = [o[key] for o in outputs]
        merged[key] = np.concatenate(vals) if isinstance(vals[0], np.ndarray) else sum(vals, [])
    return merged
