"""Procedural rectal-cancer phantom for the ``staging`` family (seed 000: multi-modal MRI staging).

The staging design fuses T2-weighted (T2W) and diffusion-weighted (DWI) MRI to predict the T
stage. This generator writes a data set whose answer needs *both* modalities, so the demo doubles
as an ablation of the family's key idea (fusion):

* **T2W shows the anatomy.** Each axial slice holds a tube along z (with smooth centre drift):
  lumen, mucosa, submucosa (bright), muscularis propria (dark ring), mesorectal fat (bright),
  mesorectal fascia (thin dark line) and outside tissue. An intermediate-signal tumour arises from
  the mucosa over an angular sector and a z-range and invades radially. How deep it goes
  *defines* the label: T1 = into the submucosa, T2 = into the muscularis propria (not through),
  T3 = through it into the mesorectal fat, T4 = through the mesorectal fascia.
* **T2W alone is ambiguous.** Every case also has a *mimic* (fibrosis/oedema): the same
  intermediate T2 signal, the same shape distribution and an independent random invasion depth
  at another sector. On T2W alone one cannot tell which of the two regions is the tumour.
* **DWI alone is ambiguous.** DWI shows the tumour bright and the mimic dark on a low, uniform
  background (the anatomy is invisible), so it says *which* region is the tumour, but not how
  deep it goes: only the luminal, cellular core (the part bulging into the lumen plus 1-2 voxels
  of wall, whatever the stage) is diffusion-restricted, while the invasive front is no brighter
  than the background, as in practice, where DWI locates the tumour and T2W is read for the T
  stage.

Together the depth is readable: T2W gives the layers, DWI points at the tumour.

Grid and acquisition choices:

* Arrays are (D, H, W) with D the axial slice axis (DESIGN "Arrays"); the default grid is
  16 x 64 x 64 with 3 mm slices and 0.8 mm in-plane spacing. Files are NIfTI in the usual
  (x, y, z) = (W, H, D) axis order with a diagonal RAS+ affine centred on the volume.
* DWI is *acquired* on a grid :data:`DWI_FACTOR` times coarser in-plane (1.6 mm), where its
  Rician noise is drawn, then linearly interpolated back onto the T2W grid. Both modalities
  therefore share one grid and one affine, as if registered and resampled by the scanner or a
  preprocessing step; the effective DWI resolution stays low.
* About 10 % of patients have a repeat scan: same anatomy and stage, a slight shift, a fresh
  bias field and fresh noise. Patient-level splitting is therefore required.

Everything is vectorised numpy: 240 patients at 16 x 64 x 64 take a few seconds plus file writing.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage

from medfuse.data.io import write_nifti

__all__ = [
    "CLASS_NAMES",
    "DWI_FACTOR",
    "LAYERS",
    "SPACING",
    "STAGE_LAYER",
    "Lesion",
    "Patient",
    "make_staging_demo",
    "render_scan",
    "sample_patient",
    "staging_affine",
]

CLASS_NAMES = ("T1", "T2", "T3", "T4")
LAYERS = (
    "lumen",
    "mucosa",
    "submucosa",
    "muscularis_propria",
    "mesorectal_fat",
    "mesorectal_fascia",
    "outside",
)
#: Deepest layer (index into :data:`LAYERS`) the tumour reaches at T1..T4.
STAGE_LAYER = (2, 3, 4, 6)
#: Voxel spacing in mm along (D, H, W).
SPACING = (3.0, 0.8, 0.8)
#: DWI is acquired this many times coarser in-plane than T2W, then interpolated back.
DWI_FACTOR = 2
REPEAT_FRACTION = 0.1

# Signal levels per layer (lumen .. outside), before a per-patient jitter.
_T2_LEVELS = np.array([0.12, 0.40, 0.85, 0.22, 0.95, 0.18, 0.35])
_DWI_TISSUE = 0.12  # DWI of every layer: the anatomy is invisible on DWI
_EDGE = 1.0  # partial-volume ramp width of every boundary, in voxels (in-plane)
_CORE_WALL = (1.0, 2.0)  # voxels (64-wide grid) of wall invasion that are bright on DWI, any stage


@dataclass(frozen=True)
class Lesion:
    """A tumour or mimic: a sector of the wall, invaded from the mucosa outwards.

    Attributes:
        angle: sector centre (radians, in-plane).
        half_width: sector half-width (radians).
        z_centre: centre along D (slices).
        z_half: half-extent along D (slices).
        depth: outer radius reached on the plateau (voxels, in the wall's elliptic metric).
        protrusion: how far it bulges into the lumen on the plateau (voxels).
        t2: T2W signal.
        dwi: DWI signal of the core (bright for the tumour, dark for a mimic).
        core_depth: outer radius of the diffusion-restricted core (voxels); between it and
            ``depth`` lies the invasive front.
        dwi_front: DWI signal of the invasive front (close to the background).
    """

    angle: float
    half_width: float
    z_centre: float
    z_half: float
    depth: float
    protrusion: float
    t2: float
    dwi: float
    core_depth: float
    dwi_front: float


@dataclass(frozen=True)
class Patient:
    """The anatomy of one patient (shared by all their scans).

    Attributes:
        stage: label, 0..3 for T1..T4.
        radii: outer radius of lumen, mucosa, submucosa, muscularis, fat and fascia (voxels).
        centre: mean (y, x) centre of the tube (voxels).
        drift: (amp_y, amp_x, phase_y, phase_x) of the sinusoidal centre drift along D.
        ellipse: (axis ratio, orientation in radians) of the wall cross-section.
        tumour: the tumour.
        mimics: fibrosis/oedema regions that look like tumour on T2W only.
        t2_levels: per-layer T2W signal (7 values).
        dwi_levels: per-layer DWI signal (7 values).
    """

    stage: int
    radii: tuple[float, ...]
    centre: tuple[float, float]
    drift: tuple[float, float, float, float]
    ellipse: tuple[float, float]
    tumour: Lesion
    mimics: tuple[Lesion, ...]
    t2_levels: tuple[float, ...]
    dwi_levels: tuple[float, ...]


def staging_affine(shape: tuple[int, int, int]) -> np.ndarray:
    """The RAS+ NIfTI affine of a (D, H, W) volume stored as (x, y, z) = (W, H, D), centred on 0.

    Args:
        shape: (D, H, W).

    Returns:
        (4, 4) float64 affine with spacing :data:`SPACING`.
    """
    d, h, w = shape
    sz, sy, sx = SPACING
    aff = np.diag([sx, sy, sz, 1.0])
    aff[:3, 3] = [-(w - 1) / 2 * sx, -(h - 1) / 2 * sy, -(d - 1) / 2 * sz]
    return aff


def _depth_in_layer(radii: np.ndarray, layer: int, px: float, rng: np.random.Generator) -> float:
    """An outer radius well inside ``layer`` (not within a partial-volume edge of its borders)."""
    if layer == len(radii):  # outside tissue: a few voxels past the fascia
        return float(radii[-1] + rng.uniform(1.5, 3.0) * px)
    lo, hi = radii[layer - 1], radii[layer]
    # At least ~1 voxel into the layer, and ~1 voxel of it left intact beyond the front (a T1
    # keeps a bright submucosal rim, a T2 keeps the dark muscle ring).
    m_in, m_out = min(1.0 * px, 0.4 * (hi - lo)), min(1.2 * px, 0.45 * (hi - lo))
    return float(lo + m_in + rng.uniform(0.0, 1.0) * (hi - lo - m_in - m_out))


def _sample_radii(rng: np.random.Generator) -> np.ndarray:
    """Outer radii of the six inner layers (voxels on a 64-wide grid).

    Each layer's thickness varies by about +-10 % between patients: the layers are always
    readable on T2W, and an invasion depth maps onto one layer.
    """
    r_lumen = rng.uniform(5.0, 6.5)
    thick = [rng.uniform(1.8, 2.2), rng.uniform(3.6, 4.2), rng.uniform(3.6, 4.2), rng.uniform(4.5, 5.5),
             rng.uniform(1.2, 1.5)]  # mucosa, submucosa, muscularis, fat, fascia
    return np.cumsum([r_lumen, *thick])


def _sample_lesion(
    radii: np.ndarray,
    stage: int,
    angle: float,
    shape: tuple[int, int, int],
    rng: np.random.Generator,
    tumour: bool,
    narrow: float = 1.0,
) -> Lesion:
    depth_d, px = shape[0], min(shape[1:]) / 64.0
    depth = _depth_in_layer(radii, STAGE_LAYER[stage], px, rng)
    # Only the luminal, cellular core is diffusion-restricted; its wall extent does not depend on
    # the stage, and the invasive front is no brighter than the background on DWI (read on T2W).
    wall = min(rng.uniform(*_CORE_WALL) * px, depth - radii[0])
    protrusion = float(rng.uniform(0.3, 0.95) * radii[0])
    dwi = rng.uniform(0.75, 1.0) if tumour else rng.uniform(0.03, 0.07)
    return Lesion(
        angle=angle,
        half_width=float(np.deg2rad(rng.uniform(35, 65) * narrow)),
        z_centre=float(rng.uniform(0.4, 0.6) * (depth_d - 1)),
        z_half=float(rng.uniform(0.3, 0.5) * depth_d),
        depth=depth,
        protrusion=protrusion,
        t2=float(rng.uniform(0.52, 0.58)),
        dwi=float(dwi),
        core_depth=float(radii[0] + wall),
        dwi_front=float(_DWI_TISSUE * rng.uniform(0.95, 1.15) if tumour else dwi),
    )


def sample_patient(
    stage: int, rng: np.random.Generator, shape: tuple[int, int, int] = (16, 64, 64), n_mimics: int = 1
) -> Patient:
    """Draw one patient's anatomy, tumour and mimics.

    Args:
        stage: 0..3 (T1..T4).
        rng: random generator (consumed).
        shape: (D, H, W) grid the anatomy must fit in; radii scale with ``min(H, W) / 64``.
        n_mimics: number of T2W mimics (fibrosis/oedema) at other sectors.

    Returns:
        The patient's :class:`Patient`.
    """
    if stage not in range(len(CLASS_NAMES)):
        raise ValueError(f"stage must be 0..3, got {stage}")
    _, h, w = shape
    px = min(h, w) / 64.0
    radii = _sample_radii(rng) * px
    centre = (h / 2 - 0.5 + rng.uniform(-1.5, 1.5) * px, w / 2 - 0.5 + rng.uniform(-1.5, 1.5) * px)
    drift = (
        rng.uniform(0, 0.75) * px,
        rng.uniform(0, 0.75) * px,
        rng.uniform(0, 2 * np.pi),
        rng.uniform(0, 2 * np.pi),
    )
    ellipse = (rng.uniform(1.0, 1.15), rng.uniform(0, np.pi))
    t_angle = rng.uniform(-np.pi, np.pi)
    # Lesions are spread evenly around the wall; narrower sectors when there are more of them, so
    # that neighbours never overlap (half-widths 35-65 deg for two lesions, 26-49 deg for three).
    narrow = min(1.0, 2.25 / (n_mimics + 1))
    tumour = _sample_lesion(radii, stage, t_angle, shape, rng, tumour=True, narrow=narrow)
    mimics = []
    for i in range(n_mimics):
        # Spread the mimics evenly over the rest of the circle, with jitter, so sectors do not overlap.
        angle = t_angle + 2 * np.pi * (i + 1) / (n_mimics + 1) + rng.uniform(-0.3, 0.3)
        mimics.append(_sample_lesion(radii, int(rng.integers(4)), angle, shape, rng, tumour=False, narrow=narrow))
    jitter = rng.uniform(0.92, 1.08, size=len(LAYERS))
    return Patient(
        stage=stage,
        radii=tuple(float(r) for r in radii),
        centre=centre,
        drift=drift,
        ellipse=ellipse,
        tumour=tumour,
        mimics=tuple(mimics),
        t2_levels=tuple(float(v) for v in _T2_LEVELS * jitter),
        dwi_levels=(float(_DWI_TISSUE * rng.uniform(0.9, 1.1)),) * len(LAYERS),
    )


def _beyond(x: np.ndarray) -> np.ndarray:
    """Partial-volume fraction of a voxel lying beyond a boundary at signed distance ``x`` (voxels)."""
    return np.clip(x / _EDGE + 0.5, 0.0, 1.0)


def _lesion_mask(
    les: Lesion, r0: float, r: np.ndarray, theta: np.ndarray, z: np.ndarray, depth: float | None = None
) -> np.ndarray:
    """Soft (D, H, W) membership of a lesion (flat-topped in angle and z) from ``r0`` to ``depth``."""
    depth = les.depth if depth is None else depth
    dth = np.remainder(theta - les.angle + np.pi, 2 * np.pi) - np.pi  # wrapped to [-pi, pi)
    prof_a = np.clip(1.6 * (1 - (dth / les.half_width) ** 2), 0, 1)
    prof_z = np.clip(1.6 * (1 - ((z - les.z_centre) / les.z_half) ** 2), 0, 1)
    prof = prof_a * prof_z  # (D, H, W), 1 on the plateau
    r_out = r0 + (depth - r0) * prof
    r_in = r0 - les.protrusion * prof
    inside = _beyond(r_out - r) * _beyond(r - r_in)
    return inside * np.clip(4 * prof, 0, 1)  # fade out the zero-thickness sliver at the sector edge


def _rician(clean: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    sigma = np.float32(sigma)
    re = clean + sigma * rng.standard_normal(clean.shape, dtype=np.float32)
    im = sigma * rng.standard_normal(clean.shape, dtype=np.float32)
    return np.sqrt(re * re + im * im)


def _bias_field(shape: tuple[int, int, int], rng: np.random.Generator) -> np.ndarray:
    _, h, w = shape
    yn = np.linspace(-1, 1, h)[None, :, None]
    xn = np.linspace(-1, 1, w)[None, None, :]
    a = np.clip(rng.normal(0, 1, 3), -2, 2)
    return np.exp(0.08 * (a[0] * yn + a[1] * xn) + 0.05 * a[2] * (yn**2 + xn**2)).astype(np.float32)


def _acquire_dwi(clean: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    """Simulate a DWI acquisition :data:`DWI_FACTOR` times coarser in-plane, back on the T2W grid."""
    d, h, w = clean.shape
    hc, wc = max(1, round(h / DWI_FACTOR)), max(1, round(w / DWI_FACTOR))
    # Low-pass (what the coarse k-space sees), sample the coarse grid, add noise there, interpolate back.
    smooth = ndimage.gaussian_filter(clean, sigma=(0, DWI_FACTOR / 2.5, DWI_FACTOR / 2.5), mode="nearest")
    coarse = ndimage.zoom(smooth, (1, hc / h, wc / w), order=1, mode="nearest", grid_mode=True)
    coarse = _rician(coarse, sigma, rng)
    return ndimage.zoom(coarse, (1, h / hc, w / wc), order=1, mode="nearest", grid_mode=True)


def render_scan(
    patient: Patient,
    rng: np.random.Generator,
    shape: tuple[int, int, int] = (16, 64, 64),
    offset: tuple[float, float, float] = (0.0, 0.0, 0.0),
    return_debug: bool = False,
) -> dict[str, np.ndarray]:
    """Render one scan of a patient.

    Args:
        patient: anatomy from :func:`sample_patient`.
        rng: random generator for noise and bias field (consumed).
        shape: (D, H, W).
        offset: (z, y, x) shift of the anatomy in voxels (repeat scans).
        return_debug: also return the ground-truth maps.

    Returns:
        ``{"t2w": (D, H, W), "dwi": (D, H, W)}`` float32; with ``return_debug`` also ``"tumour"``,
        ``"core"`` (its DWI-bright part) and ``"mimic"`` (soft memberships in [0, 1]), ``"layers"`` (int8 index into
        :data:`LAYERS` of the clean anatomy) and ``"radius"`` (voxels, elliptic metric).
    """
    d, h, w = shape
    f32 = np.float32
    z = np.arange(d, dtype=f32)[:, None, None] - f32(offset[0])
    y = np.arange(h, dtype=f32)[None, :, None]
    x = np.arange(w, dtype=f32)[None, None, :]
    amp_y, amp_x, ph_y, ph_x = patient.drift
    cy = patient.centre[0] + offset[1] + amp_y * np.sin(2 * np.pi * z / max(d, 1) + ph_y)  # (D, 1, 1)
    cx = patient.centre[1] + offset[2] + amp_x * np.sin(2 * np.pi * z / max(d, 1) + ph_x)
    dy, dx = y - cy, x - cx  # (D, H, W) by broadcasting
    ratio, orient = patient.ellipse
    e = np.sqrt(ratio)
    u = dx * np.cos(orient) + dy * np.sin(orient)
    v = -dx * np.sin(orient) + dy * np.cos(orient)
    r = np.sqrt((u / e) ** 2 + (v * e) ** 2)
    theta = np.arctan2(dy, dx)

    radii = np.asarray(patient.radii, dtype=f32)
    outside_of = _beyond(r[None] - radii[:, None, None, None])  # (6, D, H, W): beyond boundary k
    t2l, dwil = np.asarray(patient.t2_levels, dtype=f32), np.asarray(patient.dwi_levels, dtype=f32)
    t2 = t2l[0] + np.tensordot(np.diff(t2l), outside_of, axes=1)
    dwi = dwil[0] + np.tensordot(np.diff(dwil), outside_of, axes=1)

    mimic = np.zeros_like(r)
    for les in patient.mimics:
        m = _lesion_mask(les, radii[0], r, theta, z)
        t2 += m * (les.t2 - t2)
        dwi += m * (les.dwi - dwi)
        mimic = np.maximum(mimic, m)
    tum = patient.tumour
    tumour = _lesion_mask(tum, radii[0], r, theta, z)
    core = _lesion_mask(tum, radii[0], r, theta, z, depth=tum.core_depth)
    t2 += tumour * (tum.t2 - t2)
    dwi += tumour * (tum.dwi_front - dwi)
    dwi += core * (tum.dwi - dwi)

    t2 = _rician(t2 * _bias_field(shape, rng), rng.uniform(0.02, 0.035), rng)
    dwi = _acquire_dwi(dwi * _bias_field(shape, rng), rng.uniform(0.05, 0.07), rng)
    out = {"t2w": t2.astype(np.float32), "dwi": dwi.astype(np.float32)}
    if return_debug:
        out["tumour"] = tumour.astype(np.float32)
        out["core"] = core.astype(np.float32)
        out["mimic"] = mimic.astype(np.float32)
        out["layers"] = np.searchsorted(radii, r, side="right").astype(np.int8)
        out["radius"] = r.astype(np.float32)
    return out



def make_staging_demo(
    out: str | Path,
    n_patients: int = 240,
    seed: int = 0,
    quick: bool = False,
    shape: tuple[int, int, int] = (16, 64, 64),
    n_mimics: int = 1,
) -> Path:
    """Write the staging phantom data set (NIfTI + ``manifest.csv`` + ``dataset.json``).

    Layout: ``<out>/images/<case_id>_{t2w,dwi}.nii.gz``, ``<out>/manifest.csv`` with columns
    ``case_id, patient_id, image_t2w, image_dwi, label`` (paths relative to ``out``; label 0..3 =
    T1..T4) and ``<out>/dataset.json``. Classes are balanced over patients; about 10 % of patients
    have a repeat scan.

    Args:
        out: output folder (created).
        n_patients: number of patients.
        seed: random seed; the same seed gives the same arrays.
        quick: a small set for tests (at most 60 patients).
        shape: (D, H, W) of every volume.
        n_mimics: T2W mimics (fibrosis/oedema) per case.

    Returns:
        Path of the manifest.
    """
    out = Path(out)
    if quick:
        n_patients = min(n_patients, 60)
    if n_patients < 1:
        raise ValueError(f"n_patients must be >= 1, got {n_patients}")
    shape = tuple(int(s) for s in shape)  # type: ignore[assignment]
    if len(shape) != 3 or shape[0] < 1 or min(shape[1:]) < 16:
        raise ValueError(f"shape must be (D, H, W) with D >= 1 and H, W >= 16, got {shape}")
    (out / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    stages = rng.permutation(np.arange(n_patients) % len(CLASS_NAMES))
    n_rep = int(round(REPEAT_FRACTION * n_patients))
    repeats = set(rng.choice(n_patients, size=n_rep, replace=False).tolist())
    affine = staging_affine(shape)

    rows = []
    for i, stage in enumerate(stages):
        prng = np.random.default_rng([seed, i])  # per patient: independent of n_patients
        patient = sample_patient(int(stage), prng, shape, n_mimics=n_mimics)
        pid = f"pt{i:04d}"
        for scan in range(2 if i in repeats else 1):
            offset = (0.0, 0.0, 0.0) if scan == 0 else (prng.uniform(-0.7, 0.7), *prng.uniform(-1.5, 1.5, 2))
            vols = render_scan(patient, prng, shape, offset=offset)
            case_id = f"{pid}_s{scan}"
            rel = {m: f"images/{case_id}_{m}.nii.gz" for m in ("t2w", "dwi")}
            for m, rel_path in rel.items():
                write_nifti(vols[m], out / rel_path, affine)
            rows.append([case_id, pid, rel["t2w"], rel["dwi"], int(stage)])

    manifest = out / "manifest.csv"
    with open(manifest, "w", newline="", encoding="utf-8") as f:
        wr = csv.writer(f)
        wr.writerow(["case_id", "patient_id", "image_t2w", "image_dwi", "label"])
        wr.writerows(rows)
    meta = {
        "modalities": ["t2w", "dwi"],
        "class_names": list(CLASS_NAMES),
        "task": "classification",
        "generator": "staging",
        "seed": seed,
        "description": (
            f"Procedural rectal-cancer phantom: {n_patients} patients, {len(rows)} scans of {shape} "
            f"(D, H, W) at {SPACING} mm. Label = T stage = how deep the DWI-bright tumour invades the "
            "wall layers seen on T2W; a T2W mimic and randomised layer geometry make both modalities "
            f"necessary. DWI acquired {DWI_FACTOR}x coarser in-plane and resampled to the T2W grid."
        ),
    }
    (out / "dataset.json").write_text(json.dumps(meta, indent=2) + "\n")
    return manifest
