"""Lengths of the context_seg family as people read them (seed 004 is about EM).

Affines are in mm everywhere (``read_zarr`` converts OME-Zarr nanometres to mm), so an 8 nm EM
voxel is 8e-06 mm and a HD95 of ten such voxels reads 8e-05. :func:`length_unit` picks nm when
every length of a set is under a micrometre (EM, super-resolution light microscopy) and keeps mm
otherwise (CT, MR, the demo phantom), so one set of numbers (a report, a model card) has one unit.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

NM_PER_MM = 1e6
_NM_BELOW_MM = 1e-3  # lengths all under 1 um (in mm): shown in nm


def length_unit(lengths_mm: Iterable[float]) -> tuple[str, float]:
    """``("nm", 1e6)`` when every (finite, positive) length in mm is under 1 um, else ``("mm", 1.0)``:
    the unit and the factor from mm to it."""
    v = np.asarray([float(x) for x in lengths_mm], dtype=np.float64)
    v = v[np.isfinite(v) & (v > 0)]
    if v.size and float(v.max()) < _NM_BELOW_MM:
        return "nm", NM_PER_MM
    return "mm", 1.0


def format_lengths(lengths_mm: Iterable[float]) -> str:
    """``(8e-06, 8e-06, 8e-06)`` mm -> ``"(8, 8, 8) nm"``; ``(1, 1, 1)`` -> ``"(1, 1, 1) mm"``."""
    values = [float(x) for x in lengths_mm]
    unit, factor = length_unit(values)
    return "(" + ", ".join(f"{v * factor:.4g}" for v in values) + f") {unit}"
