"""MONAI dictionary transforms assembled from config (DESIGN "data/transforms.py", "Arrays" contract).

A case becomes a plain item with :func:`case_to_item` and then runs through the chain that
:func:`build_transforms` returns::

    LoadCased -> Orientationd -> Spacingd -> NormalizeIntensityPerModalityd -> crop/pad
        -> [train only: random augmentation] -> ToSliceMajord

Inside the chain arrays are MONAI's ``(C, i, j, k)`` file-index order (``i = w``, ``j = h``,
``k = d``) as :class:`monai.data.MetaTensor` carrying the affine, so every MONAI spatial
transform keeps the geometry right. The last step, :class:`ToSliceMajord`, turns them into the
medfuse contract: plain tensors ``(C, D, H, W)`` with ``D`` the slice axis, plus ``item["affine"]``
(the (4, 4) RAS affine of the final grid for voxel ``(w, h, d)``) for writing predictions back.

All deterministic steps come before the first random one, so
:func:`medfuse.data.cache.build_dataset` with a ``cache_dir`` (a MONAI ``PersistentDataset``) caches
everything up to the first random transform; for an eval chain that is the whole item.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import monai.transforms as mt
import numpy as np
import torch
from monai.data import MetaTensor

from medfuse.config import IntensityConfig, TransformsConfig
from medfuse.data.labels import (  # noqa: F401 - moved to labels.py, still importable here
    classes_to_values,
    label_class_values,
    label_file_dtype,
    values_to_classes,
)
from medfuse.data.load import LoadCased, raise_first  # noqa: F401 - moved to load.py, still importable here
from medfuse.errors import ConfigError, DataError, MedfuseError


def case_to_item(case: Any, modalities: list[str]) -> dict[str, Any]:
    """Turn a :class:`~medfuse.data.layouts.Case` into the plain dict the transform chain reads.

    Only plain Python types are used, so the item pickles into DataLoader workers and hashes as a
    PersistentDataset cache key.

    Args:
        case: a ``Case`` (``case_id``, ``patient_id``, ``images``, ``label``, ``mask``, ``text``,
            ``channel_index``).
        modalities: modality names in channel order.

    Returns:
        ``{"case_id", "patient_id", "image": [path or None per modality], "channel_index":
        [int or None per modality]}`` plus ``"label"``, ``"mask"`` (path) and ``"text"`` when the
        case has them.
    """
    chan = case.channel_index or {}
    item: dict[str, Any] = {
        "case_id": str(case.case_id),
        "patient_id": str(case.patient_id),
        "image": [str(case.images[m]) if case.images.get(m) else None for m in modalities],
        "channel_index": [None if chan.get(m) is None else int(chan[m]) for m in modalities],
    }
    if case.label is not None:
        item["label"] = case.label
    if case.mask:
        item["mask"] = str(case.mask)
    if case.text:
        item["text"] = str(case.text)
    return item


# ------------------------------------------------------------------------------------------ loading


# -------------------------------------------------------------------------------------- intensity


class NormalizeIntensityPerModalityd(mt.MapTransform):
    """Normalise each modality's channel with its own :class:`~medfuse.config.IntensityConfig`.

    ``intensity[modality]`` applies to that modality's channel, ``intensity["*"]`` to the others
    (``IntensityConfig()`` if there is no ``"*"``). Kinds:

    * ``percentile``: MONAI ``ScaleIntensityRangePercentiles`` semantics: clip to the ``lower`` /
      ``upper`` percentiles and scale to [0, 1]. With ``nonzero`` the percentiles are those of the
      nonzero voxels and voxels that were 0 stay 0 (MedSAM2's MR recipe).
    * ``ct_window``: ``ScaleIntensityRange(level - width/2, level + width/2, 0, 1, clip=True)``.
    * ``zscore``: ``NormalizeIntensity`` (``nonzero``: statistics of, and applied to, nonzero voxels).
    * ``none``: identity.

    A constant channel becomes 0. Channels of absent modalities (``item["present"] == 0``) stay 0.

    Args:
        modalities: modality names in channel order.
        intensity: modality -> config, ``"*"`` the default.
        keys: the image key, (M, ...) with M = len(modalities).
    """

    def __init__(self, modalities: Sequence[str], intensity: Mapping[str, IntensityConfig],
                 keys: str = "image") -> None:
        super().__init__(keys)
        self.modalities = list(modalities)
        default = intensity.get("*", IntensityConfig())
        self.configs = [intensity.get(m, default) for m in self.modalities]

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        present = d.get("present")
        for key in self.key_iterator(d):
            img = d[key]
            out = img.clone()
            for m, cfg in enumerate(self.configs):
                if present is not None and float(present[m]) == 0.0:
                    continue
                out[m] = self._normalize(torch.as_tensor(img[m]).float(), cfg)
            d[key] = out
        return d

    @staticmethod
    def _normalize(x: torch.Tensor, cfg: IntensityConfig) -> torch.Tensor:
        x = x.as_tensor() if isinstance(x, MetaTensor) else x
        if cfg.kind == "none":
            return x
        if cfg.kind == "zscore":
            return mt.NormalizeIntensity(nonzero=cfg.nonzero)(x)
        if cfg.kind == "ct_window":
            lo, hi = cfg.level - cfg.width / 2, cfg.level + cfg.width / 2
        else:  # percentile
            values = x[x != 0] if cfg.nonzero else x
            if values.numel() == 0:
                return torch.zeros_like(x)
            # numpy: torch.quantile refuses inputs above 16M elements.
            lo, hi = (float(v) for v in np.percentile(values.numpy(), [cfg.lower, cfg.upper]))
        if hi <= lo:
            return torch.zeros_like(x)
        y = torch.as_tensor(mt.ScaleIntensityRange(a_min=lo, a_max=hi, b_min=0.0, b_max=1.0, clip=True)(x))
        if cfg.kind == "percentile" and cfg.nonzero:
            y = torch.where(x == 0, torch.zeros_like(y), y)
        return y


# ------------------------------------------------------------------------------------------- output


class ToSliceMajord(mt.MapTransform):
    """Final step: MONAI ``(C, i, j, k)`` MetaTensors -> medfuse ``(C, D, H, W)`` plain tensors.

    ``image`` becomes a contiguous float32 tensor (M, D, H, W), with the channels of absent
    modalities (``item["present"] == 0``) set to exactly 0 again after any augmentation; ``mask``
    becomes a contiguous int64 tensor (1, D, H, W). ``item["affine"]`` is the (4, 4) float64 numpy
    RAS affine of the image's final grid (after reorientation, resampling, cropping) for voxel
    ``(w, h, d)``, i.e. what :func:`medfuse.data.io.write_nifti` needs to write a prediction back.

    Args:
        keys: image key (first) and mask key; missing keys are skipped.
    """

    def __init__(self, keys: Sequence[str] = ("image", "mask")) -> None:
        super().__init__(keys, allow_missing_keys=True)
        self.image_key = self.keys[0]

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        img = d[self.image_key]
        if not isinstance(img, MetaTensor):
            raise TypeError(f"ToSliceMajord needs a MetaTensor '{self.image_key}', got {type(img).__name__}")
        d["affine"] = img.affine.detach().cpu().numpy().astype(np.float64)
        for key in self.key_iterator(d):
            x = d[key].as_tensor() if isinstance(d[key], MetaTensor) else torch.as_tensor(d[key])
            x = x.permute(0, 3, 2, 1)  # (C, i, j, k) = (C, W, H, D) -> (C, D, H, W)
            if key == self.image_key:
                x = x.float()
                if "present" in d:
                    x = x * torch.as_tensor(d["present"], dtype=x.dtype).view(-1, 1, 1, 1)
            else:
                x = x.round().long() if x.is_floating_point() else x.long()
            d[key] = x.contiguous()
        return d


class _RandForegroundCropd(mt.RandCropByPosNegLabeld):
    """``RandCropByPosNegLabeld`` (pos=1, neg=1, one sample) returning one dict instead of a list.

    Unwrapping here, not in a later step, keeps the rest of the chain working on single items
    (MONAI's Compose would otherwise map every later transform over the list).
    """

    def __call__(self, data: Mapping[Hashable, Any], lazy: bool | None = None) -> dict[Hashable, Any]:
        if data.get(self.label_key) is None:
            raise DataError(f"case {data.get('case_id', '?')}", "has no mask but train_crop is 'foreground'",
                            "give every training case a mask, or set data.transforms.train_crop=random")
        return super().__call__(data, lazy=lazy)[0]


# ------------------------------------------------------------------------------------------- chain


def raise_user_error(exc: BaseException) -> None:
    """Re-raise the MedfuseError that MONAI wrapped in ``RuntimeError("applying transform ...")``."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, MedfuseError):
            raise seen
        seen = seen.__cause__


class MedfuseCompose(mt.Compose):
    """MONAI ``Compose`` that lets a :class:`~medfuse.errors.MedfuseError` out unwrapped.

    MONAI wraps every exception raised inside a transform in ``RuntimeError("applying transform
    ...")``; a user's data error must reach the CLI as itself, so it can print its one line.

    Attributes:
        fingerprint: JSON of everything that shapes the output (set by :func:`build_transforms`);
            part of the PersistentDataset cache key.
    """

    fingerprint: str = ""

    def __call__(self, input_: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return super().__call__(input_, *args, **kwargs)
        except RuntimeError as exc:
            raise_user_error(exc)
            raise



def _check(cfg: TransformsConfig, modalities: list[str]) -> None:
    unknown = sorted(set(cfg.intensity) - {"*", *modalities})
    if unknown:
        raise ConfigError(f"data.transforms.intensity.{unknown[0]}", "is not one of the modalities",
                          f"use '*' or one of: {', '.join(modalities)}")
    bad = [a for a in cfg.augment.flip_axes if a not in (0, 1, 2)]
    if bad:
        raise ConfigError("data.transforms.augment.flip_axes", f"axis {bad[0]} is not an axis of (D, H, W)",
                          "use 0 (D), 1 (H) and/or 2 (W)")


def build_transforms(cfg: TransformsConfig, modalities: list[str], *, train: bool,
                     has_mask: bool, mask_values: Sequence[int] | None = None,
                     crop_eval: bool = True, mask_classes: Sequence[int] | None = None) -> MedfuseCompose:
    """Assemble the dict-transform chain for items made by :func:`case_to_item`.

    Order: :class:`LoadCased` -> ``Orientationd(cfg.orientation)`` -> ``Spacingd`` (``cfg.spacing``
    (D, H, W) given to MONAI as (w, h, d); trilinear image, nearest mask) ->
    :class:`NormalizeIntensityPerModalityd` -> crop/pad to ``cfg.spatial_size`` -> (train only)
    augmentation -> :class:`ToSliceMajord`. Deterministic steps come first so that a
    PersistentDataset caches everything before the first random transform.

    Cropping. Eval: ``ResizeWithPadOrCropd`` (centre) when ``crop_eval``, else the whole volume
    (segmentation: metrics and predictions are never computed on a crop). Train, by ``cfg.train_crop``: ``center`` as
    eval; ``random``: ``SpatialPadd`` then ``RandSpatialCropd``; ``foreground``: ``SpatialPadd``
    then ``RandCropByPosNegLabeld`` (pos=1, neg=1, num_samples=1) unwrapped to a single dict, so
    the train chain also returns one dict per item. Without a mask ``foreground`` falls back to
    ``random`` with a warning.

    Augmentation (train only; a step with probability 0 is left out): ``RandFlipd`` per array axis
    of ``flip_axes`` (D, H, W -> MONAI spatial axes k, j, i); ``RandRotated`` by up to
    ``rotate_deg`` in the slice plane (about the slice axis); ``RandZoomd`` isotropic by up to
    ``1 +- scale_range`` keeping the size; ``RandScaleIntensityd`` / ``RandShiftIntensityd``
    (per channel); ``RandGaussianNoised``. The mask follows spatial steps with nearest-neighbour.

    The returned :class:`MedfuseCompose` carries ``fingerprint`` (a JSON string of everything that
    shapes its output), which :func:`build_dataset` puts into the cache key.

    Args:
        cfg: the ``data.transforms`` config section.
        modalities: modality names in channel order.
        train: build the training chain (random crop and augmentation).
        has_mask: items carry a segmentation mask to load and transform alongside the image.
        mask_values: the label values a mask may hold (the dataset's declared labels); a mask with
            another value is refused when its case is read. None: any whole number.
        crop_eval: an eval chain centre-crops/pads to ``cfg.spatial_size`` (fixed-size batches for
            classification/contrastive); False keeps whole volumes (segmentation).
        mask_classes: the file value of each class index (:func:`label_class_values`): masks are
            turned into class indices when read. None: the file values are the class indices.

    Returns:
        A Compose (raising MedfuseErrors unwrapped) mapping an item to ``{"image": (M, D, H, W)
        float32, "mask": (1, D, H, W) int64 (if has_mask), "present": (M,), "affine": (4, 4) float64
        numpy, "orig_affine": (4, 4) float64 and "orig_shape": (3,) long (the input file's grid,
        (D, H, W)), ...}``.

    Raises:
        ConfigError: an intensity key that is not a modality, or a flip axis outside 0..2.
    """
    _check(cfg, modalities)
    img, mask = "image", "mask"
    keys = [img, mask] if has_mask else [img]
    both = dict(keys=keys, allow_missing_keys=True)
    modes = ("bilinear", "nearest")[: len(keys)]
    t: list[Any] = [LoadCased(modalities, load_mask=has_mask, keys=img, mask_values=mask_values,
                              mask_classes=mask_classes)]
    if cfg.orientation:
        t.append(mt.Orientationd(axcodes=cfg.orientation, labels=None, **both))
    if cfg.spacing:
        t.append(mt.Spacingd(pixdim=tuple(reversed(cfg.spacing)), mode=modes, padding_mode="zeros", **both))
    t.append(NormalizeIntensityPerModalityd(modalities, cfg.intensity, keys=img))
    if cfg.spatial_size and (train or crop_eval):
        size = tuple(int(s) for s in reversed(cfg.spatial_size))  # (D, H, W) -> MONAI (i, j, k) = (w, h, d)
        crop = cfg.train_crop if train else "center"
        if crop == "foreground" and not has_mask:
            warnings.warn("train_crop 'foreground' needs masks; using 'random' crops instead", stacklevel=2)
            crop = "random"
        if crop == "center":
            t.append(mt.ResizeWithPadOrCropd(spatial_size=size, mode="constant", **both))
        else:
            t.append(mt.SpatialPadd(spatial_size=size, mode="constant", **both))
            if crop == "random":
                t.append(mt.RandSpatialCropd(roi_size=size, random_size=False, **both))
            else:
                t.append(_RandForegroundCropd(keys=keys, label_key=mask, spatial_size=size, pos=1, neg=1,
                                              num_samples=1, allow_smaller=True))
    if train:
        t.extend(_augmentations(cfg, keys))
    t.append(ToSliceMajord(keys=(img, mask)))
    compose = MedfuseCompose(t)
    shape = {"cfg": cfg.model_dump(mode="json"), "modalities": list(modalities), "train": train,
             "has_mask": has_mask, "crop_eval": bool(crop_eval or train), "items": 2}
    if mask_values is not None:  # cached items were checked against these values
        shape["mask_values"] = sorted(int(v) for v in mask_values)
    if mask_classes is not None and has_mask:  # cached masks hold class indices
        shape["mask_classes"] = [int(v) for v in mask_classes]
    compose.fingerprint = json.dumps(shape, sort_keys=True)
    return compose


def _augmentations(cfg: TransformsConfig, keys: list[str]) -> list[Any]:
    a = cfg.augment
    both = dict(keys=keys, allow_missing_keys=True)
    nearest = len(keys) > 1
    out: list[Any] = []
    if a.flip_prob > 0:
        for axis in sorted(set(a.flip_axes)):
            # array axis 0, 1, 2 = (D, H, W) is MONAI spatial axis 2, 1, 0 = (k, j, i)
            out.append(mt.RandFlipd(prob=a.flip_prob, spatial_axis=2 - axis, **both))
    if a.rotate_prob > 0 and a.rotate_deg > 0:
        # MONAI's 3D angles are (about i, about j, about k); range_z turns within the (i, j) slice
        # plane (checked by tests/data/test_transforms.py; MONAI's docstring words it differently).
        out.append(mt.RandRotated(range_z=float(np.deg2rad(a.rotate_deg)), prob=a.rotate_prob, keep_size=True,
                               mode=("bilinear", "nearest") if nearest else "bilinear",
                               padding_mode="zeros", **both))
    if a.scale_prob > 0 and a.scale_range > 0:
        out.append(mt.RandZoomd(prob=a.scale_prob, min_zoom=1 - a.scale_range, max_zoom=1 + a.scale_range,
                             keep_size=True, mode=("trilinear", "nearest") if nearest else "trilinear",
                             padding_mode="constant", **both))
    if a.intensity_prob > 0:
        if a.intensity_scale > 0:
            out.append(mt.RandScaleIntensityd(keys="image", factors=a.intensity_scale, prob=a.intensity_prob,
                                           channel_wise=True))
        if a.intensity_shift > 0:
            out.append(mt.RandShiftIntensityd(keys="image", offsets=a.intensity_shift, prob=a.intensity_prob,
                                           channel_wise=True))
    if a.noise_prob > 0 and a.noise_std > 0:
        out.append(mt.RandGaussianNoised(keys="image", prob=a.noise_prob, mean=0.0, std=a.noise_std))
    return out


def set_transform_seed(transform: Any, seed: int) -> None:
    """Re-seed every random transform of a Compose (``Compose.set_random_state``), for exact resume.

    Each DataLoader worker holds its own copy of the transform; seed workers separately (e.g.
    ``monai.data.utils.worker_init_fn``) or their augmentations repeat across workers.
    """
    if hasattr(transform, "set_random_state"):
        transform.set_random_state(seed=int(seed))
