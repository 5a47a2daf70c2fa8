"""EM-like cell phantom for the ``context_seg`` family (seed 004, "Better Disambiguation").

The context-fusion design segments high-resolution EM (raw, small field of view) with the help of
a low-resolution, large-field-of-view view of the same place (context). This generator builds the
seed's own examples so that the *local patch is identical* across pairs of classes and only the
context tells them apart:

* small dark blobs inside the (large) nucleus are class 1, ``nuclear_pore``;
* identical blobs in the cytoplasm are class 2, ``mitochondrion``;
* bright membrane patches near the cell edge (closer than :data:`BAND` raw voxels to the plasma
  membrane) are class 3, ``peripheral_membrane``;
* identical membrane patches anywhere else (cytoplasm or nucleus) are class 4, ``inner_membrane``.

One case is one raw crop of ``size``^3 voxels at the finest scale, placed at random inside a
large spherical cell (radius ~260 raw voxels) with a spherical nucleus (radius 50-70). The crop lies
in exactly one *compartment*: inside the nucleus, in the cytoplasm far from the edge, or in the
band near the edge. It never contains the nuclear envelope or the cell edge, so the raw crop by
itself cannot say where it is: blob and membrane shapes, sizes, contrasts and densities are the same
everywhere, and the nucleus' darker background is an offset that the per-slice intensity
normalisation of the encoders removes. The context crop, ``fov`` times wider and imaged with
``factor`` times coarser voxels (the same scene, rendered with partial-volume profiles), shows the
nucleus, the envelope, the plasma membrane and the bright extracellular space.

Files per case (NIfTI, array order (D, H, W); affines in raw-voxel units, both centred on the
crop): ``images/<case>_raw.nii.gz`` (float32), ``images/<case>_context.nii.gz`` (float32) and
``labels/<case>.nii.gz`` (uint8, on a label grid ``label_scale`` times the raw one: by default twice
as coarse, as EM labels often are). ``manifest.csv`` has ``case_id, patient_id,
image_raw, image_context, mask, compartment``; about 15 % of cells give two crops (same patient), so
splits must be by patient. ``dataset.json`` declares the modalities and mask labels.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = ["BAND", "CLASS_NAMES", "COMPARTMENTS", "Scene", "make_context_seg_demo", "render_case", "sample_scene"]

CLASS_NAMES = ("background", "nuclear_pore", "mitochondrion", "peripheral_membrane", "inner_membrane")
COMPARTMENTS = ("nucleus", "cytoplasm", "periphery")
#: A membrane patch whose centre is closer than this (raw voxels) to the cell edge is "peripheral".
BAND = 112.0
# Raw voxels between the crop's corners and any boundary it must not contain: the largest object
# reach, so that an object poking into the crop is in the crop's compartment too.
_MARGIN = 11.0
_LEVELS = {"cytoplasm": 0.55, "nucleus": 0.43, "outside": 0.80}
_BLOB_RADIUS = (2.5, 3.5)  # raw voxels
_BLOB_CONTRAST = -0.32
_MEMBRANE_RADIUS = (5.0, 8.0)  # in-plane radius of a membrane patch
_MEMBRANE_SIGMA = 0.7  # thickness (Gaussian sigma across the sheet)
_MEMBRANE_CONTRAST = 0.32
_ENVELOPE_CONTRAST = 0.28  # nuclear envelope and plasma membrane, same profile as a patch
_BLOB_DENSITY = 6e-5  # objects per raw voxel inside the cell
_MEMBRANE_DENSITY = 4e-5


@dataclass
class Scene:
    """One cell around one raw crop; coordinates in raw voxels, the crop centred at the origin.

    Attributes:
        cell_center, cell_radius: the cell (a sphere; its surface is the plasma membrane).
        nucleus_center, nucleus_radius: the nucleus (a sphere inside the cell).
        blobs: (N, 4) centre (z, y, x) and radius of each dark blob.
        membranes: (M, 8) centre (3), unit normal (3), in-plane radius and thickness sigma.
        compartment: where the crop lies (one of :data:`COMPARTMENTS`).
    """

    cell_center: np.ndarray
    cell_radius: float
    nucleus_center: np.ndarray
    nucleus_radius: float
    blobs: np.ndarray
    membranes: np.ndarray
    compartment: str

    def in_nucleus(self, p: np.ndarray) -> np.ndarray:
        return np.linalg.norm(p - self.nucleus_center, axis=-1) < self.nucleus_radius

    def edge_distance(self, p: np.ndarray) -> np.ndarray:
        return self.cell_radius - np.linalg.norm(p - self.cell_center, axis=-1)


def _unit(rng: np.random.Generator, n: int | None = None) -> np.ndarray:
    v = rng.normal(size=(3,) if n is None else (n, 3))
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


def sample_scene(compartment: str, rng: np.random.Generator, size: int, fov: float) -> Scene:
    """A random cell whose ``size``^3 crop at the origin lies entirely in ``compartment``.

    Objects are scattered over the whole context field of view (``fov * size`` wide) inside the
    cell, without overlaps.
    """
    if compartment not in COMPARTMENTS:
        raise ValueError(f"compartment must be one of {COMPARTMENTS}, got {compartment!r}")
    half = size / 2 * np.sqrt(3.0) + _MARGIN  # the crop's corners must clear every boundary
    if BAND < 2 * half + 4:
        raise ValueError(f"crop size {size} too large for the peripheral band ({BAND} voxels)")
    for _ in range(10_000):
        rn = rng.uniform(max(50.0, half + 6), max(70.0, half + 20))
        rc = rng.uniform(250.0, 290.0)
        if compartment == "nucleus":
            nuc = _unit(rng) * rng.uniform(0.0, rn - half)
            cell = nuc + _unit(rng) * rng.uniform(0.0, 15.0)
        else:
            if compartment == "periphery":
                r = rc - rng.uniform(half, BAND - half)
            else:
                r = rng.uniform(0.0, rc - BAND - half)
            cell = _unit(rng) * r
            nuc = cell + _unit(rng) * rng.uniform(0.0, 15.0)
            if np.linalg.norm(nuc) - rn < half:
                continue
        if rc - np.linalg.norm(cell) < half:
            continue
        break
    else:  # pragma: no cover - the ranges above always admit a placement
        raise RuntimeError("could not place the crop")
    extent = fov * size / 2 + 8
    blobs = _scatter(rng, extent, _BLOB_DENSITY, cell, rc, lambda n: rng.uniform(*_BLOB_RADIUS, n))
    mems = _scatter(rng, extent, _MEMBRANE_DENSITY, cell, rc, lambda n: rng.uniform(*_MEMBRANE_RADIUS, n))
    blobs, mems = _drop_overlaps(blobs, mems)
    normals = _unit(rng, len(mems))
    membranes = np.concatenate([mems[:, :3], normals, mems[:, 3:4], np.full((len(mems), 1), _MEMBRANE_SIGMA)], 1)
    scene = Scene(cell, float(rc), nuc, float(rn), blobs, membranes, compartment)
    # objects straddling the envelope or the cell edge would make labels ambiguous: drop them
    for name in ("blobs", "membranes"):
        obj = getattr(scene, name)
        rad = obj[:, 6] if name == "membranes" else obj[:, 3]
        d_nuc = np.abs(np.linalg.norm(obj[:, :3] - nuc, axis=1) - rn)
        keep = (d_nuc > rad + 3) & (scene.edge_distance(obj[:, :3]) > rad + 3)
        setattr(scene, name, obj[keep])
    return scene


def _scatter(rng, extent, density, cell, rc, radii) -> np.ndarray:
    n = rng.poisson(density * (2 * extent) ** 3)
    pts = rng.uniform(-extent, extent, size=(n, 3))
    pts = pts[np.linalg.norm(pts - cell, axis=1) < rc]
    return np.concatenate([pts, radii(len(pts))[:, None]], axis=1)


def _drop_overlaps(blobs: np.ndarray, mems: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Greedily keep objects whose bounding spheres stay 2 voxels apart."""
    objs = np.concatenate([blobs, mems])
    keep = np.ones(len(objs), bool)
    if len(objs):
        from scipy.spatial import cKDTree

        tree = cKDTree(objs[:, :3])
        rmax = float(objs[:, 3].max())
        for i in range(len(objs)):
            if not keep[i]:
                continue
            for j in tree.query_ball_point(objs[i, :3], objs[i, 3] + rmax + 2):
                if j > i and keep[j] and np.linalg.norm(objs[i, :3] - objs[j, :3]) < objs[i, 3] + objs[j, 3] + 2:
                    keep[j] = False
    nb = len(blobs)
    return objs[:nb][keep[:nb]], objs[nb:][keep[nb:]]


# ------------------------------------------------------------------------------------------ rendering


def _axes(n: int, origin: float) -> np.ndarray:
    """Voxel-centre coordinates of ``n`` voxels starting at ``origin`` (raw voxel units)."""
    return origin + np.arange(n, dtype=np.float32) + 0.5


def _dist(z, y, x, c) -> np.ndarray:
    c = np.asarray(c, dtype=np.float32)  # float32 throughout: the context block is ~7M voxels
    return np.sqrt((z[:, None, None] - c[0]) ** 2 + (y[None, :, None] - c[1]) ** 2 + (x[None, None, :] - c[2]) ** 2)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1 / (1 + np.exp(-np.clip(x, -40, 40)))


def _window(center, reach, origin, shape, spacing=1.0):
    lo = [max(0, int(np.floor((center[a] - reach - origin) / spacing))) for a in range(3)]
    hi = [min(shape[a], int(np.ceil((center[a] + reach - origin) / spacing)) + 1) for a in range(3)]
    return lo, hi


def render_scene(scene: Scene, width: int, labels: bool = False,
                 spacing: float = 1.0) -> tuple[np.ndarray, np.ndarray | None]:
    """Noise-free intensities (and labels) of the ``width``^3 block (raw voxels) centred at the origin.

    On a grid coarser than the raw one (``spacing`` > 1) every edge and sheet profile is widened by
    the voxel size with its integral kept, which approximates the partial-volume average of the
    raw-resolution rendering.

    Args:
        scene: the cell.
        width: block edge in raw voxels.
        labels: also return the label map (a voxel takes the class of the object at its centre).
        spacing: voxel size in raw voxels (2 = a grid twice as coarse).

    Returns:
        (image (n, n, n) float32, labels (n, n, n) uint8 or None), n = width / spacing.
    """
    n = int(round(width / spacing))
    origin = -width / 2
    ax = origin + (np.arange(n, dtype=np.float32) + 0.5) * np.float32(spacing)
    shape = (n, n, n)
    blur = (spacing / 2) ** 2 if spacing > 1 else 0.0
    sig = float(np.sqrt(_MEMBRANE_SIGMA**2 + blur))
    sheet = _MEMBRANE_SIGMA / sig  # amplitude that keeps a sheet's integral across the blur
    edge = float(np.sqrt(0.7**2 + blur))
    d_cell = scene.cell_radius - _dist(ax, ax, ax, scene.cell_center)  # > 0 inside the cell
    d_nuc = scene.nucleus_radius - _dist(ax, ax, ax, scene.nucleus_center)
    inside = _sigmoid(d_cell / edge)
    nucl = _sigmoid(d_nuc / edge)
    img = _LEVELS["outside"] + inside * (_LEVELS["cytoplasm"] - _LEVELS["outside"])
    img += inside * nucl * (_LEVELS["nucleus"] - _LEVELS["cytoplasm"])
    img += sheet * _ENVELOPE_CONTRAST * (np.exp(-0.5 * (d_cell / sig) ** 2) + np.exp(-0.5 * (d_nuc / sig) ** 2))
    img = img.astype(np.float32)
    lab = np.zeros(shape, np.uint8) if labels else None
    soft = float(np.sqrt(0.5**2 + blur))
    for c in scene.blobs:
        lo, hi = _window(c, c[3] + 3 + spacing, origin, shape, spacing)
        if any(h <= low for low, h in zip(lo, hi, strict=True)):
            continue
        sl = tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))
        d = _dist(ax[lo[0]:hi[0]], ax[lo[1]:hi[1]], ax[lo[2]:hi[2]], c)
        img[sl] += _BLOB_CONTRAST * _sigmoid((c[3] - d) / soft)
        if lab is not None:
            cls = 1 if scene.in_nucleus(c[:3]) else 2
            lab[sl][d <= c[3]] = cls
    for m in scene.membranes:
        center, normal, rad, msig = m[:3], m[3:6], m[6], m[7]
        lo, hi = _window(center, rad + 3 + spacing, origin, shape, spacing)
        if any(h <= low for low, h in zip(lo, hi, strict=True)):
            continue
        sl = tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))
        z, y, x = ax[lo[0]:hi[0]] - center[0], ax[lo[1]:hi[1]] - center[1], ax[lo[2]:hi[2]] - center[2]
        across = z[:, None, None] * normal[0] + y[None, :, None] * normal[1] + x[None, None, :] * normal[2]
        radial = np.sqrt(np.maximum(z[:, None, None] ** 2 + y[None, :, None] ** 2 + x[None, None, :] ** 2
                                    - across**2, 0.0))
        s_eff = float(np.sqrt(msig**2 + blur))
        profile = (msig / s_eff) * np.exp(-0.5 * (across / s_eff) ** 2) * _sigmoid((rad - radial) / soft)
        img[sl] += _MEMBRANE_CONTRAST * profile
        if lab is not None:
            cls = 3 if scene.edge_distance(center) < BAND else 4
            lab[sl][(np.abs(across) <= max(1.0, spacing / 2)) & (radial <= rad)] = cls
    return img, lab


def render_case(scene: Scene, rng: np.random.Generator, size: int, fov: int, factor: int,
                label_scale: float = 1.0, raw_noise: float = 0.05,
                context_noise: float = 0.02) -> dict[str, np.ndarray]:
    """Raw crop, context crop and labels of one scene.

    The raw crop is rendered at raw resolution. The context field of view is rendered at half the
    context voxel size (partial-volume profiles, :func:`render_scene`) and 2x2x2 block-averaged
    onto the context grid. Each gets its own noise (weaker in the context, whose voxels average
    more signal) and a random gain and offset, so absolute intensities are uninformative.

    Returns:
        ``{"raw": (size,)*3 float32, "context": (fov*size/factor,)*3 float32, "label": uint8 on the
        label grid, (size * label_scale,)*3}``.
    """
    width = fov * size
    if width % factor:
        raise ValueError(f"fov * size ({width}) must be divisible by factor ({factor})")
    crop, _ = render_scene(scene, size)
    _, lab = render_scene(scene, size, labels=True, spacing=1.0 / label_scale)
    sub = 2 if factor % 2 == 0 else 1
    n = width // factor
    fine, _ = render_scene(scene, width, spacing=factor / sub)
    ctx = fine.reshape(n, sub, n, sub, n, sub).mean(axis=(1, 3, 5))
    out = {}
    for key, vol, noise in (("raw", crop, raw_noise), ("context", ctx, context_noise)):
        gain, offset = rng.uniform(0.85, 1.15), rng.uniform(-0.05, 0.05)
        vol = gain * (vol + rng.normal(0.0, noise, vol.shape)) + offset
        out[key] = np.clip(vol, 0.01, None).astype(np.float32)  # EM intensities are positive
    out["label"] = lab
    return out


def _write(path: Path, arr: np.ndarray, spacing: float) -> None:
    from medfuse.data.io import write_nifti

    n = arr.shape[0]
    affine = np.diag([spacing, spacing, spacing, 1.0])
    affine[:3, 3] = -n * spacing / 2 + spacing / 2  # both grids centred on the crop
    write_nifti(arr[None], path, affine=affine)


def make_context_seg_demo(out: str | Path, n_cells: int = 48, seed: int = 0, quick: bool = False,
                          size: int = 48, fov: int = 4, factor: int = 4, label_scale: float = 0.5,
                          repeat_fraction: float = 0.15) -> Path:
    """Write the context_seg phantom (NIfTI + ``manifest.csv`` + ``dataset.json``).

    Args:
        out: output folder (created).
        n_cells: number of cells (patients); compartments are balanced over cells.
        seed: random seed; the same seed gives the same arrays.
        quick: a small, fast set for tests (12 cells of 32^3 crops).
        size: raw crop edge (raw voxels).
        fov: context field of view / raw field of view.
        factor: context voxel size / raw voxel size.
        label_scale: label voxels per raw voxel (0.5: labels on a grid twice as coarse as the raw).
        repeat_fraction: fraction of cells with a second crop (same compartment, same patient).

    Returns:
        Path of the manifest.
    """
    out = Path(out)
    if quick:
        n_cells, size = min(n_cells, 12), min(size, 32)
    if n_cells < 1 or size < 16 or fov < 1 or factor < 1 or not 0 < label_scale <= 1 or (size * label_scale) % 1:
        raise ValueError("need n_cells >= 1, size >= 16, fov >= 1, factor >= 1, 0 < label_scale <= 1 with an "
                         f"integer label grid; got {n_cells}, {size}, {fov}, {factor}, {label_scale}")
    rng = np.random.default_rng(seed)
    comps = rng.permutation(np.arange(n_cells) % len(COMPARTMENTS))
    repeats = set(rng.choice(n_cells, size=int(round(repeat_fraction * n_cells)), replace=False).tolist())
    rows = []
    for i, comp in enumerate(comps):
        crng = np.random.default_rng([seed, i])
        pid = f"cell{i:03d}"
        for k in range(2 if i in repeats else 1):
            scene = sample_scene(COMPARTMENTS[comp], crng, size, fov)
            case = render_case(scene, crng, size, fov, factor, label_scale)
            cid = f"{pid}_c{k}"
            rel = {"raw": f"images/{cid}_raw.nii.gz", "context": f"images/{cid}_context.nii.gz",
                   "mask": f"labels/{cid}.nii.gz"}
            _write(out / rel["raw"], case["raw"], 1.0)
            _write(out / rel["context"], case["context"], float(factor))
            _write(out / rel["mask"], case["label"], 1.0 / label_scale)
            rows.append([cid, pid, rel["raw"], rel["context"], rel["mask"], COMPARTMENTS[comp]])
    manifest = out / "manifest.csv"
    with open(manifest, "w", newline="", encoding="utf-8") as f:
        wr = csv.writer(f)
        wr.writerow(["case_id", "patient_id", "image_raw", "image_context", "mask", "compartment"])
        wr.writerows(rows)
    meta = {
        "modalities": ["raw", "context"],
        "mask_labels": {name: k for k, name in enumerate(CLASS_NAMES)},
        "generator": "context_seg",
        "seed": seed,
        "description": (
            f"EM-like cell phantom: {n_cells} cells, {len(rows)} crops of {size}^3 raw voxels with a "
            f"context {fov}x wider at {factor}x coarser voxels. Blobs are nuclear pores inside the "
            f"nucleus and mitochondria outside; membrane patches are peripheral within {BAND:g} voxels "
            "of the cell edge and inner elsewhere. Raw crops never show the boundaries; only the context does."
        ),
    }
    (out / "dataset.json").write_text(json.dumps(meta, indent=2) + "\n")
    return manifest
