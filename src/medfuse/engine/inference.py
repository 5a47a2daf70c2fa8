"""Whole-volume inference and the way back to the input's own grid.

* :func:`size_divisor` - what a network needs each spatial size to be divisible by (from its params).
* :func:`infer_padded` - pad a (B, C, D, H, W) volume to that multiple (zeros, at the far end, so the
  affine's origin voxel is unchanged), run, crop the outputs back (MONAI ``DivisiblePad`` semantics
  with ``method="end"``, undone).
* :func:`sliding_window` - MONAI ``sliding_window_inference`` with ``eval.roi_size``,
  ``eval.sw_overlap``, ``eval.sw_mode`` and ``eval.sw_batch_size``.
* :func:`mirror_tta` - nnU-Net's mirroring test-time augmentation: every combination of the
  spatial axes (8 passes in 3D, identity included), outputs flipped back and averaged.
* :func:`to_input_grid` - a (K, D, H, W) map on the processed grid (after ``Orientationd`` /
  ``Spacingd``) resampled onto the input file's grid (its shape and affine exactly): an exact index
  permutation/flip when the two grids share voxel centres (orientation changes, oblique or
  anisotropic voxels), MONAI ``ResampleToMatch`` otherwise (a changed spacing).

Outputs of a predictor may be a tensor or a dict of tensors (all with the input's spatial size).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from medfuse.errors import ConfigError

DEFAULT_DIVISOR = 16
"""Divisor assumed for a model that declares none (enough for four 2x downsamplings)."""

Out = torch.Tensor | dict[str, torch.Tensor]


def size_divisor(params: Any) -> int:
    """Spatial divisibility of a network from its typed params: the product of ``strides`` (MONAI
    UNet) when they have them, else :data:`DEFAULT_DIVISOR`. A family task whose network needs
    another multiple overrides :attr:`~medfuse.engine.tasks.SegmentationTask.size_divisor`."""
    strides = dict(params or {}).get("strides")
    if strides:
        return int(np.prod([int(np.max(s)) for s in strides]))
    return DEFAULT_DIVISOR


def _map(out: Out, fn: Callable[[torch.Tensor], torch.Tensor]) -> Out:
    if isinstance(out, dict):
        return {k: fn(v) if isinstance(v, torch.Tensor) and v.ndim >= 3 else v for k, v in out.items()}
    return fn(out)


def infer_padded(fn: Callable[[torch.Tensor], Out], image: torch.Tensor, divisor: int) -> Out:
    """``fn`` on ``image`` (B, C, *S) zero-padded at the end of each spatial axis to a multiple of
    ``divisor``; outputs cropped back to ``*S``."""
    spatial = tuple(int(s) for s in image.shape[2:])
    target = [-(-s // divisor) * divisor for s in spatial]
    if list(spatial) == target:
        return fn(image)
    pad: list[int] = []
    for s, t in zip(reversed(spatial), reversed(target), strict=True):
        pad += [0, t - s]
    out = fn(F.pad(image, pad))
    idx = (Ellipsis, *(slice(0, s) for s in spatial))
    return _map(out, lambda v: v[idx])


def check_roi(roi: Sequence[int] | None, divisor: int, key: str = "eval.roi_size") -> None:
    """A sliding-window ROI the network cannot take is a one-line ConfigError naming ``key``."""
    if roi is None:
        return
    bad = [int(r) for r in roi if int(r) % divisor]
    if bad:
        fix = [-(-int(r) // divisor) * divisor for r in roi]
        raise ConfigError(key, f"{list(roi)} is not divisible by {divisor}, which the network needs",
                          f"set {key}={fix}")


def sliding_window(fn: Callable[[torch.Tensor], Out], image: torch.Tensor, roi: Sequence[int],
                   overlap: float = 0.5, mode: str = "gaussian", sw_batch_size: int = 2) -> Out:
    """MONAI sliding-window inference over (B, C, *S) (windows of ``roi``; a volume smaller than the
    ROI is padded by MONAI and cropped back)."""
    from monai.inferers import sliding_window_inference

    out = sliding_window_inference(image, tuple(int(r) for r in roi), sw_batch_size, fn, overlap=overlap,
                                   mode=mode)
    return dict(out) if isinstance(out, dict) else out


def mirror_tta(fn: Callable[[torch.Tensor], Out], image: torch.Tensor,
               axes: Sequence[int] = (0, 1, 2)) -> Out:
    """Average of ``fn`` over every mirroring of the spatial ``axes`` (array axes of (D, H, W)),
    each output flipped back (nnU-Net v2: 2^len(axes) passes, identity included)."""
    dims = [2 + int(a) for a in axes]
    total: Out | None = None
    n = 0
    for r in range(len(dims) + 1):
        for flip in itertools.combinations(dims, r):
            x = image.flip(flip) if flip else image
            out = fn(x)
            if flip:
                out = _map(out, lambda v, f=flip: v.flip(f))
            if total is None:
                total = _map(out, lambda v: v.float().clone())
            elif isinstance(total, dict):
                for k, v in out.items():  # type: ignore[union-attr]
                    if isinstance(v, torch.Tensor) and v.ndim >= 3:
                        total[k] = total[k] + v.float()
            else:
                total = total + out.float()  # type: ignore[operator]
            n += 1
    assert total is not None
    return _map(total, lambda v: v / n)


# ---------------------------------------------------------------------------------- input grid


def _as_np(a: Any) -> np.ndarray:
    return np.asarray(a.detach().cpu() if isinstance(a, torch.Tensor) else a, dtype=np.float64)


def _index_map(src_affine: np.ndarray, dst_affine: np.ndarray, src_shape: Sequence[int],
               dst_shape: Sequence[int], atol: float = 1e-3) -> tuple[list[int], list[bool]] | None:
    """When every voxel (i, j, k) of the destination grid is exactly a voxel of the source grid
    (a signed axis permutation with integer offsets and the same extent), return, for each
    destination file axis, the source file axis and whether it is flipped; else None."""
    m = np.linalg.solve(src_affine, dst_affine)  # dst voxel -> src voxel
    r, t = m[:3, :3], m[:3, 3]
    perm, flips = [], []
    for col in range(3):
        c = r[:, col]
        row = int(np.argmax(np.abs(c)))
        if not (abs(abs(c[row]) - 1) < atol and np.all(np.abs(np.delete(c, row)) < atol)):
            return None
        perm.append(row)
        flips.append(bool(c[row] < 0))
    if sorted(perm) != [0, 1, 2]:
        return None
    for col, (row, flip) in enumerate(zip(perm, flips, strict=True)):
        n_src, n_dst = int(src_shape[row]), int(dst_shape[col])
        start = t[row]
        expect = (n_src - 1) if flip else 0.0
        if n_src != n_dst or abs(start - expect) > atol:
            return None
    return perm, flips


def to_input_grid(x: torch.Tensor, affine: Any, dst_affine: Any, dst_shape: Sequence[int],
                  mode: str = "bilinear") -> torch.Tensor:
    """Resample ``x`` (K, D, H, W) on the grid of ``affine`` onto ``dst_shape`` (D, H, W) with
    ``dst_affine`` (both (4, 4) RAS affines of file voxel (w, h, d)).

    Exact (index permutation and flips) when the grids share voxel centres; otherwise MONAI
    ``ResampleToMatch`` (``mode``: ``bilinear`` for probabilities/logits, ``nearest`` for labels;
    zeros outside the field of view). Returns (K, D0, H0, W0) on ``x``'s device and dtype.
    """
    src_a, dst_a = _as_np(affine), _as_np(dst_affine)
    dst_shape = tuple(int(s) for s in dst_shape)
    xi = x.permute(0, 3, 2, 1)  # (K, i, j, k)
    src_ijk = tuple(int(s) for s in xi.shape[1:])
    dst_ijk = tuple(reversed(dst_shape))
    mapping = _index_map(src_a, dst_a, src_ijk, dst_ijk)
    if mapping is not None:
        perm, flips = mapping
        y = xi.permute(0, *(1 + p for p in perm))
        flip_dims = [1 + col for col, f in enumerate(flips) if f]
        if flip_dims:
            y = y.flip(flip_dims)
    else:
        from monai.data import MetaTensor
        from monai.transforms import ResampleToMatch

        src = MetaTensor(xi.float(), affine=torch.as_tensor(src_a))
        dst = MetaTensor(torch.zeros((1, *dst_ijk), dtype=torch.float32, device=x.device),
                         affine=torch.as_tensor(dst_a))
        y = ResampleToMatch(mode=mode, padding_mode="zeros")(src, img_dst=dst).as_tensor().to(x.dtype)
    return y.permute(0, 3, 2, 1).contiguous()
