"""Procedural brain-tumour phantom for the ``incomplete_seg`` family (seed 003, UniMRSeg: segmentation
with missing MRI modalities).

Each case is a brain with white matter, a cortical grey-matter shell and two ventricles, and a
glioma-like tumour: a necrotic core (NCR), an enhancing rim around it (ET) and irregular oedema
(ED) around that. Four modalities are written, and every sub-region shows only in some of them,
as in real BraTS scans, so a missing modality really removes information:

======== =================== ===================== ===================== ==========================
modality oedema (ED)         enhancing rim (ET)    necrotic core (NCR)   confounders
======== =================== ===================== ===================== ==========================
FLAIR    bright              bright (= core)       bright                CSF dark
T1       slightly dark       dark                  dark                  low contrast overall
T1ce     invisible           **bright, only here** dark                  bright vessel spots
T2       bright              bright (= oedema)     brightest             CSF as bright as the core
======== =================== ===================== ===================== ==========================

So the whole tumour (WT) needs FLAIR or T2, the tumour core (TC) is clearest in T1ce and partly
visible in T2/T1, and the enhancing tumour (ET) is only visible in T1ce (elsewhere it can at best
be guessed as the shell around a visible core). A network trained only on complete inputs leans on
all four channels and collapses when some are zero; one trained for missing modalities degrades
gracefully.

Layout: BraTS case folders ``<out>/<case>/<case>_{flair,t1,t1ce,t2,seg}.nii.gz`` with the classic
labels NCR = 1, ED = 2, ET = 4 (so the demo also exercises the BraTS layout and the ET = 4 region
mapping). Arrays are (D, H, W) on an isotropic grid (4 mm by default: a brain of ~130 mm across).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from scipy import ndimage

from medfuse.data.io import write_nifti

MODALITIES = ("flair", "t1", "t1ce", "t2")
LABELS = {"background": 0, "necrotic_core": 1, "edema": 2, "enhancing_tumor": 4}
SPACING = 4.0
# Tissue signal per modality (flair, t1, t1ce, t2).
_TISSUE = {
    "wm": (0.45, 0.80, 0.78, 0.40),
    "gm": (0.55, 0.60, 0.58, 0.60),
    "csf": (0.12, 0.20, 0.20, 0.95),
}
# Lesion signal per modality; None keeps the underlying tissue's signal (invisible there).
_LESION = {
    "ed": (0.90, None, None, 0.80),  # T1: tissue * 0.85 (handled below)
    "ncr": (0.82, 0.25, 0.12, 0.96),
    "et": (0.82, 0.42, 1.00, 0.80),
}


def _smooth_noise(shape: tuple[int, ...], sigma: float, rng: np.random.Generator) -> np.ndarray:
    n = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma, mode="wrap")
    return n / (n.std() + 1e-6)


def _grid(shape: tuple[int, int, int]) -> np.ndarray:
    return np.stack(np.meshgrid(*[np.arange(s, dtype=np.float32) for s in shape], indexing="ij"))  # (3, D, H, W)


def render_case(rng: np.random.Generator, shape: tuple[int, int, int] = (32, 32, 32)) -> dict[str, np.ndarray]:
    """Draw one case.

    Args:
        rng: random generator (consumed).
        shape: (D, H, W).

    Returns:
        ``{"flair", "t1", "t1ce", "t2"}`` float32 (D, H, W) volumes and ``"seg"`` uint8 BraTS labels
        (0, NCR 1, ED 2, ET 4).
    """
    d, h, w = shape
    g = _grid(shape)
    centre = np.array([d, h, w], dtype=np.float32)[:, None, None, None] / 2 - 0.5
    centre = centre + rng.uniform(-0.8, 0.8, (3, 1, 1, 1)).astype(np.float32)
    radii = np.array([d, h, w], dtype=np.float32) / 2 * rng.uniform(0.80, 0.92, 3).astype(np.float32)
    rel = (g - centre) / radii[:, None, None, None]
    r_brain = np.sqrt((rel ** 2).sum(0)) * (1 + 0.04 * _smooth_noise(shape, 3, rng))  # 1 at the brain edge
    brain = r_brain < 1.0
    gm = brain & (r_brain > rng.uniform(0.78, 0.85) + 0.05 * _smooth_noise(shape, 2, rng))
    vent = np.zeros(shape, bool)
    for side in (-1, 1):
        vc = centre[:, 0, 0, 0] + np.array([0, 0, side * w * rng.uniform(0.06, 0.1)])
        vr = np.array([d * 0.16, h * rng.uniform(0.12, 0.2), w * 0.05]) * rng.uniform(0.8, 1.2)
        vent |= (((g - vc[:, None, None, None]) / vr[:, None, None, None]) ** 2).sum(0) < 1
    tissue = {"wm": brain & ~gm & ~vent, "gm": gm & ~vent, "csf": vent}

    # Tumour: centre inside the brain, away from the ventricles' midline.
    for _ in range(100):
        tc = centre[:, 0, 0, 0] + rng.uniform(-0.5, 0.5, 3) * radii
        if abs(tc[2] - centre[2, 0, 0, 0]) > 0.18 * w:
            break
    dist = np.sqrt(((g - tc[:, None, None, None]) ** 2).sum(0)) * (1 + 0.18 * _smooth_noise(shape, 2.5, rng))
    kind = rng.choice(["ring", "solid", "non_enhancing"], p=[0.7, 0.2, 0.1])
    r_core = rng.uniform(2.0, 4.5) if kind != "solid" else 0.0
    rim = rng.uniform(1.5, 2.5) if kind != "solid" else rng.uniform(2.5, 4.0)
    r_tc = r_core + rim
    r_ed = r_tc + rng.uniform(2.0, 5.0)
    ed_noise = 1.5 * _smooth_noise(shape, 2.0, rng)
    seg = np.zeros(shape, np.uint8)
    seg[(dist + ed_noise < r_ed) & brain] = LABELS["edema"]
    if kind == "non_enhancing":
        seg[dist < r_tc] = LABELS["necrotic_core"]
    else:
        seg[dist < r_tc] = LABELS["enhancing_tumor"]
        seg[dist < r_core] = LABELS["necrotic_core"]
    seg[~brain] = 0

    vols = {}
    texture = 0.04 * _smooth_noise(shape, 1.5, rng)
    for k, mod in enumerate(MODALITIES):
        v = np.zeros(shape, np.float32)
        for name, where in tissue.items():
            v[where] = _TISSUE[name][k]
        v += texture * brain
        ed = seg == LABELS["edema"]
        if mod == "t1":
            v[ed] *= 0.85
        elif _LESION["ed"][k] is not None:
            v[ed] = _LESION["ed"][k]
        v[seg == LABELS["necrotic_core"]] = _LESION["ncr"][k]
        v[seg == LABELS["enhancing_tumor"]] = _LESION["et"][k]
        if mod == "t1ce":  # enhancing vessels / choroid plexus: bright spots that are not tumour
            spots = (_smooth_noise(shape, 0.8, rng) > 2.6) & brain & (seg == 0)
            v[spots] = 1.0
        v = ndimage.gaussian_filter(v, 0.6)  # partial volume
        bias = np.exp(0.1 * _smooth_noise(shape, 8, rng))
        v = v * bias * rng.uniform(0.7, 1.4) * 1000
        v = np.abs(v + rng.uniform(15, 35) * rng.standard_normal(shape)) * brain  # Rician-like, skull-stripped
        vols[mod] = v.astype(np.float32)
    vols["seg"] = seg
    return vols


def make_incomplete_seg_demo(out: str | Path, n_patients: int = 100, seed: int = 0, quick: bool = False,
                             shape: tuple[int, int, int] = (32, 32, 32)) -> Path:
    """Write the phantom as BraTS case folders.

    Args:
        out: output folder (created); one sub-folder per case.
        n_patients: number of cases (one scan per patient).
        seed: random seed; the same seed gives the same arrays.
        quick: a small set for tests (at most 24 cases).
        shape: (D, H, W), each at least 16.

    Returns:
        The output folder (a BraTS-layout root).
    """
    out = Path(out)
    if quick:
        n_patients = min(n_patients, 24)
    if n_patients < 1:
        raise ValueError(f"n_patients must be >= 1, got {n_patients}")
    shape = tuple(int(s) for s in shape)  # type: ignore[assignment]
    if len(shape) != 3 or min(shape) < 16:
        raise ValueError(f"shape must be (D, H, W) with every size >= 16, got {shape}")
    affine = np.diag([SPACING, SPACING, SPACING, 1.0])
    out.mkdir(parents=True, exist_ok=True)
    for i in range(n_patients):
        rng = np.random.default_rng([seed, i])  # per case: independent of n_patients
        case = f"Phantom_{i:04d}"
        (out / case).mkdir(exist_ok=True)
        for key, vol in render_case(rng, shape).items():
            write_nifti(vol, out / case / f"{case}_{key}.nii.gz", affine)
    meta = {"generator": "incomplete_seg", "seed": seed, "n_patients": n_patients, "shape_dhw": list(shape),
            "spacing_mm": SPACING, "modalities": list(MODALITIES), "labels": LABELS,
            "regions": {"WT": [1, 2, 4], "TC": [1, 4], "ET": [4]}}
    (out / "phantom.json").write_text(json.dumps(meta, indent=2) + "\n")
    return out
