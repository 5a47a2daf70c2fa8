"""The ct_encoder HU step: stored values to Hounsfield units exactly once, and a check that air sits
where HU puts it (``data.params.hu``: ``none``, ``metadata`` or ``fixed``; ``hu_check``).

A NIfTI header that already rescales while a CSV/fixed conversion is configured, air far below
-1024 HU after conversion (rescaled twice) or, under ``hu: none``, air far above it (stored values,
CT-RATE v1) raise a one-line DataError instead of training on shifted volumes
(:func:`medfuse.data.hu.air_level`).
"""

from __future__ import annotations

from typing import Any

import monai.transforms as mt
import numpy as np

from medfuse.data.hu import ABOVE_AIR, AIR_HU, BELOW_AIR, air_level
from medfuse.errors import DataError


def _header_rescale(path: Any) -> tuple[float, float] | None:
    """The (slope, intercept) a NIfTI header applies on reading (nibabel moves scl_slope/scl_inter onto
    the array proxy; the header copy reads NaN), or None: not NIfTI, or no rescale."""
    if not str(path).endswith((".nii", ".nii.gz")):
        return None
    import nibabel as nib

    proxy = nib.load(str(path)).dataobj
    slope, inter = float(getattr(proxy, "slope", 1.0)), float(getattr(proxy, "inter", 0.0))
    return None if (slope, inter) == (1.0, 0.0) else (slope, inter)


class Hounsfieldd(mt.MapTransform):
    """Convert stored values to HU once: ``x * slope + intercept`` from ``item["hu"]`` (None: as is),
    then check that air sits where HU puts it (:func:`air_level`; ``check_air=False`` skips it).

    Raises:
        DataError: the NIfTI header already rescales while a CSV/fixed conversion is configured; the
            converted volume's air lies far below -1024 HU (a second rescale); or a volume read as HU
            (``hu: none``; after its NIfTI header's rescale, if any) has its air far above -1024 HU
            (stored values, CT-RATE v1: air near 0).
    """

    def __init__(self, keys: str = "image", check_air: bool = True):
        super().__init__(keys)
        self.check_air = check_air

    def __call__(self, data):
        d = dict(data)
        hu = d.pop("hu", None)
        path = next((p for p in d.get("image_path", []) if p), "image")
        if hu is not None and (header := _header_rescale(path)) is not None:
            raise DataError(path, f"the NIfTI header already rescales (slope {header[0]}, intercept {header[1]}), "
                            "so the CSV slope/intercept would be applied twice",
                            "set data.params.hu=none (the file is read in HU)")
        for key in self.key_iterator(d):
            if hu is not None:
                d[key] = d[key] * float(hu[0]) + float(hu[1])
            if self.check_air:
                self._check(np.asarray(d[key].detach().cpu()), path, converted=hu is not None)
        return d

    @staticmethod
    def _check(array: np.ndarray, path: Any, converted: bool) -> None:
        p1, fill = air_level(array)
        left_out = f" (the voxels at the minimum, {fill:.0f}, left out as fill)" if fill is not None else ""
        if converted and p1 < AIR_HU - BELOW_AIR:
            raise DataError(path, f"1st percentile is {p1:.0f} HU after slope/intercept{left_out}, far below air",
                            "the file is probably in HU already (CT-RATE v2): set data.params.hu=none")
        if not converted and p1 > AIR_HU + ABOVE_AIR:
            header = _header_rescale(path)
            read = f" after its header's slope {header[0]:g}/intercept {header[1]:g}" if header else ""
            raise DataError(path, f"read as HU (data.params.hu=none), but its 1st percentile is {p1:.0f}{read}"
                            f"{left_out}: air should be near -1000 HU",
                            "the volume holds stored values (CT-RATE v1): set data.params.hu=metadata with the "
                            "metadata CSV, or fixed with hu_slope/hu_intercept; for a CT without air (e.g. "
                            "cropped to the body) set data.params.hu_check=false")
