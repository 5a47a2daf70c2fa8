"""Zarr (v2/v3, OME-NGFF multiscales) and N5 containers: EM volumes (CellMap, OpenOrganelle).

Kept out of :func:`medfuse.data.io.read_image`'s suffix dispatch: a Zarr/N5 "file" is a path
*inside* a container folder, and the reader needs the optional ``zarr`` package (extra
``medfuse[zarr]``; zarr 2 and 3 read Zarr v2 groups such as CellMap's; N5 needs zarr 2).

Two ways in:

* :func:`read_zarr` reads one whole array (a small crop, a label volume).
* :func:`read_region` and :func:`read_cellmap_crop` read **regions of interest only**: an OME-NGFF
  multiscales group gives every scale level's voxel size (``scale``) and the position of its first
  voxel's centre (``translation``), both in nm in (z, y, x) order; a box in world nm maps to voxels
  of one level by ``(box - (translation - scale / 2)) / scale``, so averaging-downscaled levels, whose
  translation moves by half a source voxel, stay aligned. Only the chunks that overlap the box are
  read (zarr slicing); a box reaching outside the array is padded with its edge values.

CellMap (seed 004) keeps the raw EM at ``<ds>.zarr/recon-1/em/fibsem-uint8/s0..sN`` and each crop's
annotation at ``recon-1/labels/groundtruth/crop<N>/<class>/s0..``, one array per class (0/1 for
semantic classes, object ids for instance classes, :data:`CELLMAP_INSTANCE_CLASSES`).
:func:`read_cellmap_crop` maps a crop to raw voxels through the translations, picks the raw level by
a target resolution, combines the chosen classes into one label map (value = 1 + the class's index
in the list; a later class wins where two overlap) and reads the context from a coarser level
around the crop.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from medfuse.data.io import _UNIT_MM, Volume, _finish, _reading
from medfuse.errors import DataError

CONTAINER_SUFFIXES: tuple[str, ...] = (".zarr", ".n5")
CELLMAP_INSTANCE_CLASSES = frozenset({"nuc", "mito", "ves", "endo", "lyso", "ld", "perox", "np", "mt", "vim", "cell"})
_NM = {"nanometer": 1.0, "nm": 1.0, "micrometer": 1e3, "um": 1e3, "\u00b5m": 1e3, "micron": 1e3,
       "millimeter": 1e6, "mm": 1e6, "angstrom": 0.1}


def split_container_path(path: str | Path) -> tuple[Path, str] | None:
    """``/d/crop.zarr/recon-1/em/s0`` -> ``(Path('/d/crop.zarr'), 'recon-1/em/s0')``.

    Returns:
        The container folder and the array/group path inside it ("" for the root), or None when no
        path component ends in ``.zarr`` or ``.n5``.
    """
    parts = Path(path).parts
    for i, part in enumerate(parts):
        if part.lower().endswith(CONTAINER_SUFFIXES):
            return Path(*parts[: i + 1]), "/".join(parts[i + 1 :])
    return None


def open_node(path: str | Path) -> Any:
    """The zarr group or array at ``path`` (a path through a ``.zarr``/``.n5`` container), read-only.

    Raises:
        DataError: not inside a container, the container or node is missing, zarr is not installed,
            or the container is N5 and the installed zarr cannot read N5 (each with its fix).
    """
    p = Path(path)
    split = split_container_path(p)
    if split is None:
        raise DataError(p, "is not inside a .zarr or .n5 container", "give container.zarr/path/to/array")
    root, inner = split
    if not root.exists():
        raise DataError(root, "file not found", "check the path" + ("" if root.is_absolute() else
                                                                    f" (relative paths start at {os.getcwd()})"))
    try:
        import zarr
    except ImportError:
        raise DataError(p, "reading Zarr/N5 needs the optional 'zarr' package",
                        "pip install 'medfuse[zarr]'  (N5 needs zarr 2: pip install 'zarr>=2.16,<3')") from None
    n5 = root.suffix.lower() == ".n5"
    if n5 and int(str(zarr.__version__).split(".")[0]) >= 3:
        raise DataError(p, f"zarr {zarr.__version__} cannot read N5 (zarr 3 dropped N5 support)",
                        "pip install 'zarr>=2.16,<3', or convert the container to Zarr")
    if inner and not (root / inner).exists():
        raise DataError(p, f"has no '{inner}' inside {root.name}", "check the path inside the container")
    with _reading(p, "N5" if n5 else "Zarr"):
        with warnings.catch_warnings():  # zarr 2 marks N5FSStore deprecated (it is gone in zarr 3)
            warnings.simplefilter("ignore", FutureWarning)
            top = zarr.open(zarr.N5FSStore(str(root)) if n5 else str(root), mode="r")
        return top[inner] if inner else top


def is_array(node: Any) -> bool:
    """A zarr array (it has a shape); groups have none."""
    return hasattr(node, "shape")


# ------------------------------------------------------------------------------- OME-NGFF levels


@dataclass(frozen=True)
class Level:
    """One scale level of an OME-NGFF multiscales group, in nm and (z, y, x) order.

    Attributes:
        path: the array's path inside the group (``"s0"``).
        scale: voxel size.
        translation: world position of voxel (0, 0, 0)'s centre.
        shape: array shape (z, y, x).
    """

    path: str
    scale: np.ndarray
    translation: np.ndarray
    shape: tuple[int, int, int]

    @property
    def edge(self) -> np.ndarray:
        """World position of the outer corner of voxel (0, 0, 0)."""
        return self.translation - self.scale / 2

    def box(self) -> tuple[np.ndarray, np.ndarray]:
        """The world box the array covers, (lo, hi) corners."""
        return self.edge, self.edge + self.scale * np.asarray(self.shape, float)

    def voxels(self, lo_nm: np.ndarray, hi_nm: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Voxel range [lo, hi) of this level covering the world box (rounded to whole voxels)."""
        lo = np.round((np.asarray(lo_nm, float) - self.edge) / self.scale).astype(int)
        hi = np.maximum(lo + 1, np.round((np.asarray(hi_nm, float) - self.edge) / self.scale).astype(int))
        return lo, hi


def _unit_nm(axes: list[Any], where: str) -> np.ndarray:
    units = [a.get("unit", "nanometer") if isinstance(a, dict) else "nanometer" for a in axes[-3:]]
    factors = [_NM.get(str(u).strip().lower()) for u in units] if units else [1.0] * 3
    if any(f is None for f in factors):
        raise DataError(where, f"has axis units {units}, not lengths medfuse knows",
                        "use OME-NGFF units such as nanometer or micrometer")
    return np.asarray(factors or [1.0] * 3, float)


def multiscale_levels(group: Any, where: str | Path) -> list[Level]:
    """The scale levels of an OME-NGFF ``multiscales`` group (scale then translation), finest first.

    Also reads the older N5 form (``"transform": {"axes", "scale", "translate"}`` per dataset).

    Raises:
        DataError: no ``multiscales`` metadata, a level without a ``scale``, or a level array that
            is missing or not 3D (each naming ``where``).
    """
    where = str(where)
    ms = group.attrs.get("multiscales")
    if not isinstance(ms, list) or not ms or not isinstance(ms[0], dict):
        raise DataError(where, "has no OME-NGFF 'multiscales' metadata", "write multiscales with scale and translation "
                        "per level (OME-NGFF 0.4), or point at one array")
    first = ms[0]
    factor = _unit_nm(first.get("axes") or [], where)
    levels = []
    for ds in first.get("datasets") or []:
        path = str(ds.get("path", ""))
        scale = translation = None
        for t in ds.get("coordinateTransformations") or []:
            if t.get("type") == "scale":
                scale = np.asarray(t["scale"], float)[-3:] * factor
            elif t.get("type") == "translation":
                translation = np.asarray(t["translation"], float)[-3:] * factor
        if scale is None and isinstance(ds.get("transform"), dict):  # N5 (cosem / neuroglancer) form
            tr = ds["transform"]
            axes = [str(a).lower() for a in tr.get("axes", ["z", "y", "x"])]
            order = [axes.index(a) for a in ("z", "y", "x")] if set("zyx") <= set(axes) else [0, 1, 2]
            scale = np.asarray(tr.get("scale", [1, 1, 1]), float)[order]
            translation = np.asarray(tr.get("translate", [0, 0, 0]), float)[order]
        if scale is None or len(scale) != 3 or np.any(scale <= 0):
            raise DataError(where, f"level '{path}' has no positive 3D 'scale'", "fix the multiscales metadata")
        try:
            arr = group[path]
        except Exception:  # noqa: BLE001 - zarr raises KeyError/FileNotFoundError/... for a missing node
            raise DataError(f"{where}/{path}", "scale level listed in multiscales is missing",
                            "restore the array or remove it from the metadata") from None
        shape = tuple(int(n) for n in getattr(arr, "shape", ())[-3:])
        if len(shape) != 3:
            raise DataError(f"{where}/{path}", "is not a 3D array", "point at a (z, y, x) multiscales group")
        levels.append(Level(path, scale, np.zeros(3) if translation is None else translation, shape))
    if not levels:
        raise DataError(where, "lists no scale levels", "fix the multiscales metadata")
    return sorted(levels, key=lambda lv: float(np.prod(lv.scale)))


def choose_level(levels: list[Level], target: float | Sequence[float] | None) -> Level:
    """The coarsest level whose voxels are no larger than ``target`` nm on every axis.

    ``None`` picks the finest level; a target finer than every level also gets the finest.
    """
    if target is None:
        return levels[0]
    want = np.broadcast_to(np.asarray(target, float), (3,))
    fit = [lv for lv in levels if np.all(lv.scale <= want * 1.001)]
    return fit[-1] if fit else levels[0]


def read_roi(array: Any, lo: Sequence[int], hi: Sequence[int]) -> np.ndarray:
    """Voxels [lo, hi) of a 3D zarr array; only the overlapping chunks are read, and the part of the
    box outside the array is padded with the nearest edge values."""
    shape = np.asarray(array.shape[-3:])
    lo, hi = np.asarray(lo, int), np.asarray(hi, int)
    a, b = np.clip(lo, 0, shape), np.clip(hi, 0, shape)
    if np.any(b <= a):  # nothing of the box lies inside: pad from the nearest edge voxel
        a, b = np.minimum(a, shape - 1), np.minimum(a, shape - 1) + 1
    data = np.asarray(array[(Ellipsis, *(slice(int(x), int(y)) for x, y in zip(a, b, strict=True)))])
    pad = [(int(x - lo_), int(hi_ - y)) for x, y, lo_, hi_ in zip(a, b, lo, hi, strict=True)]
    if any(p != (0, 0) for p in pad):
        data = np.pad(data, [(0, 0)] * (data.ndim - 3) + pad, mode="edge")
    return data


def _volume(arr: np.ndarray, scale_nm: np.ndarray, origin_nm: np.ndarray, path: str, meta: dict) -> Volume:
    """(z, y, x) voxels -> a (1, D, H, W) Volume with a mm affine (i = x, j = y, k = z)."""
    mm = 1e-6
    affine = np.diag([scale_nm[2] * mm, scale_nm[1] * mm, scale_nm[0] * mm, 1.0])
    affine[:3, 3] = origin_nm[::-1] * mm
    return _finish(arr[None], affine, Path(path), {"format": "zarr", "hu": None, "spacing_unit": "mm", **meta})


def read_region(group_path: str | Path, lo_nm: Sequence[float], hi_nm: Sequence[float],
                resolution: float | Sequence[float] | None = None) -> Volume:
    """The world box [lo_nm, hi_nm) of a multiscales group at the level chosen by ``resolution``.

    Returns:
        A (1, D, H, W) Volume whose affine places voxel centres in mm; ``meta`` names the level.
    """
    group = open_node(group_path)
    levels = multiscale_levels(group, group_path)
    lv = choose_level(levels, resolution)
    lo, hi = lv.voxels(np.asarray(lo_nm, float), np.asarray(hi_nm, float))
    with _reading(Path(group_path), "Zarr"):
        data = read_roi(group[lv.path], lo, hi)
    return _volume(data, lv.scale, lv.translation + lo * lv.scale, str(group_path),
                   {"level": lv.path, "voxels": [lo.tolist(), hi.tolist()], "scale_nm": lv.scale.tolist()})


# ------------------------------------------------------------------------------------ CellMap


@dataclass
class CellMapCrop:
    """One CellMap crop read for training: raw, context and label on the raw crop's grid.

    Attributes:
        raw: (1, D, H, W) EM voxels of the crop box at the chosen raw level.
        context: (1, d, h, w) EM voxels of a wider box centred on the crop, at a coarser level.
        label: (1, D', H', W') label map (0 = background, k = classes[k - 1]) on the label grid,
            the raw grid scaled by raw voxel size / label voxel size.
        classes: the chosen classes the crop annotates.
    """

    raw: Volume
    context: Volume
    label: Volume
    classes: list[str]


def crop_classes(crop: str | Path) -> list[str]:
    """The classes a crop annotates: its class groups (folders), without CellMap's ``all``."""
    p = Path(crop)
    if not p.is_dir():
        return []
    return sorted(d.name for d in p.iterdir() if d.is_dir() and not d.name.startswith(".") and d.name != "all")


def crop_box(crop: str | Path, classes: Sequence[str] | None = None) -> tuple[np.ndarray, np.ndarray, Level]:
    """World box (lo, hi) in nm of a crop, from its first class's finest level (and that level)."""
    names = list(classes) if classes else crop_classes(crop)
    if not names:
        raise DataError(crop, "annotates no class", "point at a crop<N> folder holding one group per class")
    group_path = f"{crop}/{names[0]}"
    lv = multiscale_levels(open_node(group_path), group_path)[0]
    lo, hi = lv.box()
    return lo, hi, lv


def _nearest_onto(group_path: str, grid_lo: np.ndarray, voxel: np.ndarray, shape: tuple[int, ...],
                  resolution: np.ndarray) -> np.ndarray:
    """A class array resampled (nearest) onto a grid: voxel centres ``grid_lo + (i + 0.5) * voxel``."""
    group = open_node(group_path)
    lv = choose_level(multiscale_levels(group, group_path), resolution)
    idx = [np.floor((grid_lo[a] + (np.arange(shape[a]) + 0.5) * voxel[a] - lv.edge[a]) / lv.scale[a]).astype(int)
           for a in range(3)]
    inside = [(i >= 0) & (i < n) for i, n in zip(idx, lv.shape, strict=True)]
    out = np.zeros(shape, dtype=np.int64)
    if not all(m.any() for m in inside):
        return out
    lo = [int(i[m].min()) for i, m in zip(idx, inside, strict=True)]
    hi = [int(i[m].max()) + 1 for i, m in zip(idx, inside, strict=True)]
    with _reading(Path(group_path), "Zarr"):
        block = read_roi(group[lv.path], lo, hi)
    sub = np.ix_(*[np.clip(i - a, 0, b - a - 1) for i, a, b in zip(idx, lo, hi, strict=True)])
    keep = inside[0][:, None, None] & inside[1][None, :, None] & inside[2][None, None, :]
    out[...] = np.where(keep, block[sub], 0)  # outside the class array: not annotated -> 0
    return out


def read_cellmap_crop(raw: str | Path, crop: str | Path, classes: Sequence[str],
                      raw_resolution: float | Sequence[float] | None = None,
                      label_resolution: float | Sequence[float] | None = None,
                      context_resolution: float | Sequence[float] | None = None,
                      context_extent: float = 4.0) -> CellMapCrop:
    """Read one CellMap crop: raw and context regions of the EM volume and the combined label map.

    Args:
        raw: the EM multiscales group, e.g. ``jrc_hela-2.zarr/recon-1/em/fibsem-uint8``.
        crop: the crop group, e.g. ``jrc_hela-2.zarr/recon-1/labels/groundtruth/crop155``.
        classes: the classes of the label map, in order (value k = ``classes[k - 1]``); classes the
            crop does not annotate stay 0.
        raw_resolution: target raw voxel size in nm (the coarsest level not coarser); None = s0.
        label_resolution: label voxel size in nm; None = the chosen raw level's.
        context_resolution: target context voxel size in nm; None = raw voxel size x ``context_extent``.
        context_extent: the context box's size / the crop box's size, per axis (centred on the crop).

    Returns:
        The :class:`CellMapCrop`; nothing but the crop's and the context's regions is read.
    """
    raw, crop = str(raw), str(crop)
    present = [c for c in classes if (Path(crop) / c).is_dir()]
    box_lo, box_hi, _ = crop_box(crop, present or None)
    group = open_node(raw)
    levels = multiscale_levels(group, raw)
    lv = choose_level(levels, raw_resolution)
    lo, hi = lv.voxels(box_lo, box_hi)
    with _reading(Path(raw), "Zarr"):
        raw_arr = read_roi(group[lv.path], lo, hi)
    grid_lo = lv.edge + lo * lv.scale
    extent = (hi - lo) * lv.scale  # the crop box snapped to whole raw voxels
    raw_vol = _volume(raw_arr, lv.scale, lv.translation + lo * lv.scale, raw,
                      {"level": lv.path, "voxels": [lo.tolist(), hi.tolist()], "scale_nm": lv.scale.tolist()})
    lab_res = lv.scale if label_resolution is None else np.broadcast_to(np.asarray(label_resolution, float), (3,))
    lab_shape = tuple(int(max(1, round(float(e / r)))) for e, r in zip(extent, lab_res, strict=True))
    voxel = extent / np.asarray(lab_shape, float)
    label = np.zeros(lab_shape, dtype=np.uint8 if len(classes) < 255 else np.uint16)
    for k, name in enumerate(classes, start=1):
        if name in present:
            label[_nearest_onto(f"{crop}/{name}", grid_lo, voxel, lab_shape, voxel) > 0] = k
    label_vol = _volume(label, voxel, grid_lo + voxel / 2, crop, {"classes": list(classes)})
    ctx_res = lv.scale * context_extent if context_resolution is None else context_resolution
    centre = grid_lo + extent / 2
    ctx_box = extent * float(context_extent)
    ctx_vol = read_region(raw, centre - ctx_box / 2, centre + ctx_box / 2, ctx_res)
    return CellMapCrop(raw_vol, ctx_vol, label_vol, present)


def cellmap_problems(raw: str, crop: str, case_id: str) -> list[tuple[str, str, str]]:
    """The ``data check`` rules of one CellMap crop, as ``(path, rule, message)``.

    Reads metadata, the crop's class arrays (crop-sized) and nothing of the raw volume but its
    headers: a missing or unreadable group or array (``missing``/``unreadable``), multiscales
    without scale levels (``unreadable``), a crop whose box lies outside the raw volume or whose
    classes disagree on the box (``geometry``), a semantic class holding values other than 0/1 or
    an instance class holding negative ids (``label``).
    """
    out: list[tuple[str, str, str]] = []
    try:
        raw_levels = multiscale_levels(open_node(raw), raw)
    except DataError as e:
        rule = "missing" if "not found" in e.problem or "has no '" in e.problem else "unreadable"
        return [(str(e.where), rule, f"raw EM of case '{case_id}': {e.problem}")]
    names = crop_classes(crop)
    if not Path(crop).is_dir():
        return [(crop, "missing", f"crop of case '{case_id}' does not exist")]
    if not names:
        return [(crop, "missing", f"crop of case '{case_id}' annotates no class")]
    r_lo, r_hi = raw_levels[0].box()
    boxes = {}
    for name in names:
        path = f"{crop}/{name}"
        try:
            group = open_node(path)
            levels = multiscale_levels(group, path)
            with _reading(Path(path), "Zarr"):
                arr = np.asarray(group[levels[0].path][...])
        except DataError as e:
            out.append((str(e.where), "unreadable", f"class '{name}' of case '{case_id}': {e.problem}"))
            continue
        boxes[name] = levels[0].box()
        if arr.dtype.kind == "f" and not np.isfinite(arr).all():
            out.append((path, "nonfinite", f"class '{name}' of case '{case_id}' has NaN/Inf voxels"))
            continue
        values = np.unique(arr)
        if name in CELLMAP_INSTANCE_CLASSES:
            if values.size and values.min() < 0:
                out.append((path, "label", f"instance class '{name}' of case '{case_id}' has negative ids"))
        elif not np.isin(values, [0, 1]).all():
            bad = ", ".join(f"{v:g}" for v in values[~np.isin(values, [0, 1])][:5])
            out.append((path, "label", f"semantic class '{name}' of case '{case_id}' has values {{{bad}}}, not 0/1"))
    for name, (lo, hi) in boxes.items():
        if np.any(lo < r_lo - 1e-6) or np.any(hi > r_hi + 1e-6):
            out.append((f"{crop}/{name}", "geometry", f"class '{name}' of case '{case_id}' covers "
                        f"{_nm(lo)}..{_nm(hi)} nm, outside the raw volume {_nm(r_lo)}..{_nm(r_hi)} nm"))
    if boxes:
        ref_name, (ref_lo, ref_hi) = next(iter(boxes.items()))
        tol = raw_levels[0].scale
        for name, (lo, hi) in boxes.items():
            if np.any(np.abs(lo - ref_lo) > tol) or np.any(np.abs(hi - ref_hi) > tol):
                out.append((f"{crop}/{name}", "geometry", f"class '{name}' of case '{case_id}' covers "
                            f"{_nm(lo)}..{_nm(hi)} nm but '{ref_name}' covers {_nm(ref_lo)}..{_nm(ref_hi)} nm"))
    return out


def _nm(v: np.ndarray) -> str:
    return "(" + ", ".join(f"{float(x):g}" for x in v) + ")"


# ------------------------------------------------------------------------------- whole arrays


def read_zarr(path: str | Path, *, level: int | str = 0) -> Volume:
    """Read one whole array of a Zarr (v2/v3, including OME-Zarr multiscales) or N5 container.

    ``path`` runs through the container into the array, e.g. ``crop.zarr/recon-1/em/fibsem-uint8/s0``
    or ``jrc_hela.n5/em/fibsem-uint8/s1``. A path naming an OME-Zarr multiscales *group* reads scale
    ``level`` (index or dataset path). Arrays are read in their stored (C-order) axis order, which
    for OME-Zarr and for N5 through zarr's N5 store is (z, y, x), i.e. (D, H, W); 4D arrays are
    (C, D, H, W) and 5D (T=1, C, D, H, W). Voxel sizes come from OME ``coordinateTransformations`` or
    N5 ``pixelResolution``/``resolution`` and are converted to mm where the unit is known (nm for
    EM); otherwise they stay in file units (``meta["spacing_unit"] = "pixel"``). An OME ``translation``
    (where voxel 0's centre lies) is the affine's origin, so predictions land where the array is. For regions of a
    large volume use :func:`read_region`.

    Raises:
        DataError: the container or array is missing or unreadable, zarr is not installed (with the
            install hint), or the array is not 3D-5D.
    """
    p = Path(path)
    node = open_node(p)
    root, inner = split_container_path(p)  # type: ignore[misc]
    n5 = root.suffix.lower() == ".n5"
    fmt = "N5" if n5 else "Zarr"
    scale, unit, shift = None, "", None
    with _reading(p, fmt):
        if not is_array(node):  # a group: OME-Zarr multiscales
            sub, scale, unit, shift = _ome_dataset(node, level)
            node = node[sub]
        elif not n5 and inner:  # an array inside a multiscales group: the group holds its scale
            parent, _, name = inner.rpartition("/")
            group = open_node(root / parent) if parent else open_node(root)
            if isinstance(group.attrs.get("multiscales"), list):
                try:
                    _, scale, unit, shift = _ome_dataset(group, name)
                except ValueError:
                    scale, unit, shift = None, "", None
        attrs = dict(node.attrs)
        arr = np.asarray(node[...])
    if scale is None and n5:
        scale, unit = _zarr_spacing_n5(attrs)
    if arr.ndim == 5 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.ndim == 3:
        arr = arr[None]
    if arr.ndim != 4:
        raise DataError(p, f"{fmt} array of shape {arr.shape} is not a 3D volume",
                        "point at a (z, y, x) or (c, z, y, x) array")
    spacing = [1.0, 1.0, 1.0] if scale is None else list(scale[-3:])
    mm = _UNIT_MM.get(unit.strip().lower())
    if mm is not None:
        spacing = [s * mm for s in spacing]
    affine = np.diag([spacing[2], spacing[1], spacing[0], 1.0])  # i = x (W), j = y (H), k = z (D)
    if shift is not None and len(shift) >= 3:  # OME translation: where voxel 0's centre lies
        origin = list(shift[-3:]) if mm is None else [v * mm for v in shift[-3:]]
        affine[:3, 3] = origin[::-1]
    meta = {"format": fmt.lower(), "container": str(root), "array": inner, "hu": None,
            "spacing_unit": "mm" if mm is not None else "pixel"}
    return _finish(arr, affine, p, meta)


def _zarr_spacing_n5(attrs: dict) -> tuple[list[float] | None, str]:
    """N5 (x, y, z) voxel size from ``pixelResolution`` or ``resolution`` (+ ``units``), reversed to (z, y, x)."""
    res = attrs.get("pixelResolution")
    if isinstance(res, dict) and "dimensions" in res:
        return [float(v) for v in res["dimensions"]][::-1], str(res.get("unit", ""))
    if isinstance(attrs.get("resolution"), list):
        units = attrs.get("units")
        unit = str(units[0]) if isinstance(units, list) and units else ""
        return [float(v) for v in attrs["resolution"]][::-1], unit
    return None, ""


def _ome_dataset(group, level: int | str) -> tuple[str, list[float] | None, str, list[float] | None]:
    """(array path, spacing, unit, translation) of one scale level of an OME-Zarr multiscales group;
    spacing and translation (the position of voxel 0's centre) in array order and file units."""
    ms = group.attrs.get("multiscales")
    if not isinstance(ms, list) or not ms:
        raise ValueError("a group without OME-NGFF 'multiscales' metadata; name the array inside it")
    first = ms[0]
    datasets = first.get("datasets", [])
    if isinstance(level, str):
        found = [d for d in datasets if d.get("path") == level]
        if not found:
            raise ValueError(f"no scale level '{level}' (have {[d.get('path') for d in datasets]})")
        ds = found[0]
    else:
        ds = datasets[level]
    scale = translation = None
    for t in ds.get("coordinateTransformations", []):
        if t.get("type") == "scale":
            scale = [float(v) for v in t["scale"]]
        elif t.get("type") == "translation":
            translation = [float(v) for v in t["translation"]]
    axes = first.get("axes", [])
    units = [a.get("unit", "") for a in axes if isinstance(a, dict)]
    unit = next((u for u in units[-3:] if u), "")
    return str(ds["path"]), scale, unit, translation
