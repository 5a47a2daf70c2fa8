"""The ``ct_encoder`` family's per-case transform chain (seed 001, "Data Processing Pipeline"): a
case as a plain item (:func:`case_item`), the platform chain with the HU step right after loading
(:func:`ct_transforms`), the lesion mask riding along as a second mask channel
(:class:`AttachLesiond` / :class:`SplitLesiond`, so flips and crops move it with the image), and the
OmniAbnorm-CT slab loader (:class:`OmniAbnormLoadd`). The data module and ``medfuse predict`` both
build their datasets from these (:mod:`medfuse.families.ct_encoder.data`,
:mod:`medfuse.families.ct_encoder.predict`)."""

from __future__ import annotations

from typing import Any

import monai.transforms as mt
import numpy as np
import torch

from medfuse.config import Config, validate_params
from medfuse.data.layouts import Case
from medfuse.families.ct_encoder.hu import Hounsfieldd
from medfuse.families.ct_encoder.params import CTEncoderDataParams


class OmniAbnormLoadd(mt.MapTransform):
    """Load an OmniAbnorm-CT sample in place of :class:`~medfuse.data.transforms.LoadCased`: the slab
    (grey, (1, W, H, D) in MONAI's file order) and its region mask ((1 or 2, W, H, D): finding k = k on
    the centre slice, 0 elsewhere; the second channel is the same map as lesion labels)."""

    def __init__(self, lesions: bool = False):
        super().__init__("image")
        self.lesions = lesions

    def __call__(self, data):
        from monai.data import MetaTensor

        from medfuse.data.io import read_slice_folder
        from medfuse.data.layouts.omniabnorm import omni_region_map

        d = dict(data)
        rec = d.pop("omni")
        d.pop("lesion", None)
        vol = read_slice_folder(rec["image"], rec.get("context") or None)
        img = vol.array.astype(np.float32).mean(axis=0, keepdims=True)  # (1, D, H, W); RGB JPEGs -> grey
        lab = np.zeros(img.shape, np.int32)
        lab[0, vol.meta["centre"]] = omni_region_map(rec.get("mask"), rec.get("groups") or [], img.shape[-2:],
                                                     str(d.get("case_id", "?")))
        affine = torch.as_tensor(vol.affine)
        d["image"] = MetaTensor(torch.from_numpy(np.ascontiguousarray(img.transpose(0, 3, 2, 1))), affine=affine,
                                meta={"filename_or_obj": rec["image"]})
        chans = [lab, lab] if self.lesions else [lab]
        d["mask"] = MetaTensor(torch.from_numpy(np.ascontiguousarray(np.concatenate(chans).transpose(0, 3, 2, 1))),
                               affine=affine.clone(), meta={"filename_or_obj": str(rec.get("mask"))})
        d["present"] = torch.ones(1)
        d["orig_affine"] = affine.to(torch.float64).clone()
        d["orig_shape"] = torch.tensor(img.shape[1:], dtype=torch.long)
        return d


class AttachLesiond(mt.MapTransform):
    """Right after loading: read ``item["lesion"]`` (a lesion-mask path, or None) onto the image grid
    and stack it as channel 1 of the region mask, so that every spatial step (orientation, spacing,
    crop, flips) moves both alike; a case without one gets an empty channel."""

    def __init__(self, keys: str = "mask"):
        super().__init__(keys)

    def __call__(self, data):
        from monai.data import MetaTensor

        from medfuse.data.transforms import LoadCased

        d = dict(data)
        path = d.pop("lesion", None)
        mask = d["mask"]
        if path:
            lesion = LoadCased(["ct"])._mask(str(path), d["image"], {}, str(d.get("case_id", "?"))).as_tensor()
        else:
            lesion = torch.zeros_like(mask.as_tensor())
        d["mask"] = MetaTensor(torch.cat([mask.as_tensor(), lesion.to(mask.dtype)]), affine=mask.affine.clone(),
                               meta={k: v for k, v in mask.meta.items() if k != "affine"})
        return d


class SplitLesiond(mt.MapTransform):
    """Last step: channel 1 of ``mask`` (1 + 1, D, H, W) becomes ``lesion`` (1, D, H, W)."""

    def __init__(self, keys: str = "mask"):
        super().__init__(keys)

    def __call__(self, data):
        d = dict(data)
        d["lesion"] = d["mask"][1:2].clone()
        d["mask"] = d["mask"][:1].contiguous()
        return d


def ct_transforms(cfg: Config, train: bool, lesions: bool = False, regions: int | None = None):
    """The platform chain (load, orient, space, window, crop/pad) with the HU step after loading;
    with ``lesions`` the lesion masks ride along as a second mask channel and come out as ``lesion``;
    with ``regions`` (R) a region mask holding a value outside 0..R is refused naming its file."""
    from medfuse.data.transforms import MedfuseCompose, build_transforms

    p = validate_params(CTEncoderDataParams, cfg.data.params, "data.params")
    omni = p.source == "omniabnorm"
    check_air = p.hu_check and not omni  # OmniAbnorm-CT slices are windowed JPEGs (0..255), not HU
    values = None if regions is None or omni else list(range(int(regions) + 1))
    base = build_transforms(cfg.data.transforms, ["ct"], train=train, has_mask=True, mask_values=values)
    steps = [OmniAbnormLoadd(lesions) if omni else base.transforms[0], Hounsfieldd(check_air=check_air),
             *base.transforms[1:]]
    if lesions:
        steps = [steps[0], steps[1], *([] if omni else [AttachLesiond()]), *steps[2:], SplitLesiond()]
    chain = MedfuseCompose(steps)
    # "|air": items cached before volumes read as HU were checked (a v1 volume may sit in such a cache)
    air = "|air" if check_air and p.hu == "none" else ""
    chain.fingerprint = (base.fingerprint + "|hu-once" + air + ("|lesions" if lesions else "")
                         + ("|omni" if omni else ""))
    return chain


def case_item(case: Case) -> dict[str, Any]:
    """Plain item for the transform chain (pickles, hashes as a cache key)."""
    from medfuse.data.transforms import case_to_item

    item = case_to_item(case, ["ct"])
    item["image_path"] = list(item["image"])
    item["text"] = case.text
    for key in ("region_text", "steps", "labels", "hu"):
        item[key] = case.extra.get(key) or ([] if key != "hu" else None)
    item["findings"] = str(case.extra.get("findings") or "")
    item["step_lesions"] = list(case.extra.get("step_lesions") or [])
    if case.extra.get("lesion"):
        item["lesion"] = str(case.extra["lesion"])
    if case.extra.get("omni"):
        item["omni"] = dict(case.extra["omni"])
    item.pop("label", None)
    return item
