"""Frozen features for the ``context_seg`` family: volume -> per-stream features on the label grid (seed 004).

Seed section: "Feature Extraction Returns Separate Tensors".

:class:`FeatureBuilder` runs a stream (raw or context, a (D, H, W) volume) slice by slice through a
frozen 2D encoder (:class:`~medfuse.encoders.slicewise.SlicewiseExtractor`), optionally in all three
planes (XY, XZ, YZ; averaged), and resamples the features onto the label grid with
:func:`resample_to_grid`. ``_context_placement`` finds where the raw field of view lies in the
context from the two files' affines (the ``fraction`` and ``centre`` that the context stream is
resampled over). The data module that reads cases and caches their features is
:mod:`medfuse.families.context_seg.data`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from medfuse.errors import DataError
from medfuse.families.context_seg.params import ContextSegDataParams

__all__ = ["FeatureBuilder", "resample_to_grid"]


def resample_to_grid(feats: torch.Tensor, out_shape: Sequence[int], fraction: Sequence[float] = (1.0, 1.0, 1.0),
                     chunk: int = 64, centre: Sequence[float] = (0.0, 0.0, 0.0)) -> torch.Tensor:
    """Trilinear resampling of the ``fraction`` of a volume around ``centre`` onto ``out_shape``.

    Args:
        feats: (C, d, h, w).
        out_shape: (D, H, W) of the output grid.
        fraction: per axis, the share of the input extent that the output covers (centred); 1 =
            the whole input (plain resizing, voxel centres aligned as ``align_corners=False``).
        chunk: channels per ``grid_sample`` call (bounds memory).
        centre: per axis, the centre of the sampled part in the input's normalised coordinates
            (-1..1 = its edges; 0 = the input's centre).

    Returns:
        (C, D, H, W) float32.
    """
    axes = [((torch.arange(n, dtype=torch.float32) + 0.5) / n * 2 - 1) * float(f) + float(c)
            for n, f, c in zip(out_shape, fraction, centre, strict=True)]
    gz, gy, gx = torch.meshgrid(*axes, indexing="ij")
    grid = torch.stack([gx, gy, gz], dim=-1)[None].to(feats.device)  # (1, D, H, W, 3) as (x, y, z)
    out = [F.grid_sample(part[None].float(), grid, mode="bilinear", padding_mode="border", align_corners=False)[0]
           for part in feats.split(chunk)]
    return torch.cat(out)


class FeatureBuilder:
    """Frozen slice encoder -> per-stream features on the label grid (two separate tensors).

    Args:
        params: the family's data options.
        device: where the encoder runs (default: CUDA when available).
    """

    def __init__(self, params: ContextSegDataParams, device: str | torch.device | None = None):
        from medfuse.encoders.base import build_encoder
        from medfuse.encoders.slicewise import SlicewiseExtractor

        self.params = params
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(params.encoder_seed)  # the tiny encoder's random weights are part of the key
            enc = build_encoder(params.encoder, **params.encoder_params).freeze()
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.extractor = SlicewiseExtractor(enc.to(self.device), slice_batch_size=params.slice_batch_size,
                                            modality=params.intensity, window=params.window)
        self.out_channels = int(enc.out_channels)
        self.weights_id = enc.weights_id()

    @torch.no_grad()
    def stream(self, volume: np.ndarray, out_shape: Sequence[int], fraction: Sequence[float],
               input_size: int | None, tri_planar: bool = False,
               centre: Sequence[float] = (0.0, 0.0, 0.0)) -> torch.Tensor:
        """One stream: volume (D, H, W) -> features (C, *out_shape) float32 on the CPU.

        ``fraction`` and ``centre`` place the output field in the volume (:func:`resample_to_grid`);
        ``tri_planar`` averages the passes over XY (axial), XZ and YZ slices.
        """
        enc = self.extractor.encoder
        vol = torch.as_tensor(np.ascontiguousarray(volume), dtype=torch.float32)
        planes = (0, 1, 2) if tri_planar else (0,)
        acc = None
        keep = enc.input_size
        try:
            if input_size is not None:
                enc.input_size = int(input_size)
            for axis in planes:
                order = [axis] + [a for a in range(3) if a != axis]
                f = self.extractor(vol.permute(*order)[None, None])[0]  # (S, C, a, b): slices along `axis`
                f = f.movedim(1, 0)  # (C, S, a, b), axes in `order`
                f = f.permute(0, *(1 + order.index(t) for t in range(3)))  # (C, d', h', w') in (D, H, W) order
                f = resample_to_grid(f, out_shape, fraction, centre=centre).cpu()
                acc = f if acc is None else acc + f
        finally:
            enc.input_size = keep
        return acc / len(planes)


def _context_placement(raw_vol, ctx_vol, raw_shape: Sequence[int], ctx_shape: Sequence[int], scale: np.ndarray,
                       ctx_path: str) -> tuple[np.ndarray, np.ndarray]:
    """Where the raw field of view lies in the context: (``fraction``, ``centre``) per axis (d, h, w)
    in the context's normalised coordinates (see :func:`resample_to_grid`).

    The two files' affines place the raw crop in the context (the context is cropped around the raw
    crop's centre) when they agree with ``scale`` (always with ``context_scale: auto``); a context
    that does not contain the raw field of view, or whose axes are rotated or flipped against the
    raw's, is refused. When the affines' spacings contradict an explicit ``context_scale`` (files
    without geometry, e.g. TIFF stacks), the files carry no usable position and the context is
    taken as centred on the raw crop.
    """
    raw_shape, ctx_shape = np.asarray(raw_shape, float), np.asarray(ctx_shape, float)
    fraction = raw_shape / (ctx_shape * scale)
    centre = np.zeros(3)
    m = np.linalg.inv(np.asarray(ctx_vol.affine, float)) @ np.asarray(raw_vol.affine, float)  # raw (i,j,k) -> ctx
    lin = m[:3, :3]
    ratio = np.linalg.norm(lin, axis=0)[::-1]  # (d, h, w): raw voxel / context voxel
    if np.all(np.abs(ratio * scale - 1) <= 0.1):  # the affines describe this scale: trust their positions
        if np.any(np.diag(lin) <= 0) or np.abs(lin - np.diag(np.diag(lin))).max() > 0.01 * ratio.max():
            raise DataError(ctx_path, "is rotated or flipped against the raw volume (its affine's axes are not the "
                            "raw's)", "resample the context onto the raw volume's orientation")
        raw_c = (raw_shape[::-1] - 1) / 2  # raw centre, file order (i, j, k)
        offset = (m[:3, :3] @ raw_c + m[:3, 3])[::-1] - (ctx_shape - 1) / 2  # context voxels, (d, h, w)
        offset[np.abs(offset) < 1e-3] = 0.0  # a centred context samples exactly as before
        centre = offset * 2 / ctx_shape
    if np.any(np.abs(centre) + fraction > 1.001):
        off = np.round(centre * ctx_shape / 2, 2)
        raise DataError(ctx_path, f"does not contain the raw crop's field of view (raw/context extent "
                        f"{fraction.round(3)}, raw centre {off} context voxels off the context's centre (d, h, w))",
                        "give a context that covers the raw crop (check both files' origins/translations), "
                        "or fix context_scale")
    return fraction, centre
