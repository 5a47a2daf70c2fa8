"""Procedural chest/abdomen CT phantom with region masks and chain-of-thought reports for the
``ct_encoder`` family (seed 001: region-aware attention, CoT-aligned 3D encoder).

The family's key idea is that a finding's meaning depends on the anatomical region it lies in,
which the encoder learns from a region mask. This generator writes a data set in which that is
literally so: **the region a finding lies in can be read from the mask but not from the image**.

* **Anatomy** (randomised per patient: body size and position, organ sizes): body with a fat
  rim, two lungs (air), heart, descending aorta (contrast), liver, spine. Masks label 9 regions:
  right upper / middle / lower lobe, left upper / lower lobe, right / left hepatic lobe, heart,
  aorta.
* **Invisible boundaries.** Lung lobes are separated by fissures and the hepatic lobes by
  Cantlie's line; on this CT they are not visible (no intensity change), as fissures often are
  at CT-RATE's resolution. Their position is random per patient.
* **Identical-looking findings in different regions.** A nodule (lungs) or hypodense lesion
  (liver) is drawn first at a random position; then its lobe is drawn uniformly and the fissure
  (or Cantlie's line) is placed a random distance on the far side. The lobe is therefore
  independent of the finding's position and appearance: only the mask tells "right upper lobe"
  from "right lower lobe". The side (right/left lung), effusions and cardiomegaly are visible.
* **Reports** name region, finding and size (CT-RATE columns): findings have one sentence per
  region; the impression lists the abnormal findings (unique per volume); the chain-of-thought
  JSON (seed schema) has one step per finding with its ``mask_region`` (a region, or a group such
  as "right lung" for an effusion) and a "lungs otherwise clear" step over all lobes; a step about
  a nodule or liver lesion also names its ``lesion`` label in the lesion mask.
* **Generatable reports.** Findings (one templated sentence per region, in a fixed order) and
  impression are a function of what the volume and its mask show, so a generator conditioned on
  the encoder can write them; the keyword labeler of
  :mod:`~medfuse.families.ct_encoder.labeler` reads the 8 findings of ``labels.csv`` back from
  them exactly (a test checks it), which makes clinical efficacy (CE-F1) well defined.

Two volumes with the same findings in different lobes get different reports, so report <->
volume retrieval needs the anatomy; a region-blind encoder can at best guess the lobe.

Files (CT-RATE layout, see :mod:`medfuse.families.ct_encoder.data`): volumes stored as raw int16 (HU +
1024, with ``metadata.csv`` slope 1 / intercept -1024, i.e. CT-RATE v1 style) under
``train/train_<i>/train_<i>_a/``, ``masks/``, ``lesions/`` (finding k of a case labelled k where
it was drawn), ``reports.csv``, ``metadata.csv``, ``labels.csv``, ``cot.json`` and ``regions.json``.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np

REGIONS = ["right upper lobe", "right middle lobe", "right lower lobe", "left upper lobe", "left lower lobe",
           "right hepatic lobe", "left hepatic lobe", "heart", "aorta"]
GROUPS = {"right lung": [1, 2, 3], "left lung": [4, 5], "lungs": [1, 2, 3, 4, 5], "liver": [6, 7],
          "mediastinum": [8, 9]}
# zero-shot classes (every phantom has a lung nodule somewhere, so "lung nodule" itself is not one)
ABNORMALITIES = [*[f"{r.capitalize()} nodule" for r in REGIONS[:5]], "Liver lesion", "Pleural effusion",
                 "Cardiomegaly"]
SPACING = (5.0, 7.0, 7.0)  # (D, H, W) mm
HU = {"air": -1000, "fat": -100, "soft": 40, "lung": -850, "heart": 45, "aorta": 170, "liver": 65, "bone": 450,
      "nodule": 30, "lesion": -40, "fluid": 15}


def _ellipsoid(z, y, x, c, a) -> np.ndarray:
    return ((z - c[0]) / a[0]) ** 2 + ((y - c[1]) / a[1]) ** 2 + ((x - c[2]) / a[2]) ** 2


def _place(rng, inside: np.ndarray, r: float) -> np.ndarray:
    """A random voxel of ``inside`` (bool (D, H, W)) at least ~r voxels from its border."""
    from scipy import ndimage

    core = ndimage.binary_erosion(inside, iterations=max(1, int(np.ceil(r)) + 1))
    cand = np.argwhere(core if core.any() else inside)
    return cand[rng.integers(len(cand))].astype(np.float64) + rng.uniform(-0.4, 0.4, 3)


def _side_of(p: np.ndarray, normal: np.ndarray, rng, positive: bool, r: float) -> float:
    """Offset c of the plane normal . q = c that leaves p at distance r + 3..7 on the requested side."""
    d = r + rng.uniform(3.0, 7.0)
    return float(normal @ p - (d if positive else -d))


def sample_case(rng: np.random.Generator, shape=(32, 48, 48)) -> dict:
    """Draw one patient: anatomy parameters, findings, volume (HU) and region mask.

    Returns:
        ``{"hu": (D, H, W) float32, "mask": (D, H, W) uint8, "findings": [dict], "cardiomegaly": bool,
        "effusion": None | "right" | "left"}``; each finding has ``kind`` (nodule | lesion),
        ``region`` (1-based id) and ``size_mm``.
    """
    D, H, W = shape
    z, y, x = np.meshgrid(np.arange(D), np.arange(H), np.arange(W), indexing="ij")
    z, y, x = z.astype(np.float64), y.astype(np.float64), x.astype(np.float64)
    cy, cx = H / 2 + rng.uniform(-2, 2), W / 2 + rng.uniform(-2, 2)
    ay, ax = H * rng.uniform(0.30, 0.36), W * rng.uniform(0.40, 0.46)
    rb = ((y - cy) / ay) ** 2 + ((x - cx) / ax) ** 2
    hu = np.full(shape, HU["air"], np.float64)
    hu[rb <= 1] = HU["fat"]
    hu[rb <= 0.78] = HU["soft"]
    mask = np.zeros(shape, np.uint8)
    hu[((y - (cy + 0.72 * ay)) ** 2 + (x - cx) ** 2) <= (0.12 * ay) ** 2] = HU["bone"]  # spine

    z_apex, z_base = rng.uniform(0.5, 2.5), D * rng.uniform(0.62, 0.72)
    lz, zc = (z_base - z_apex) / 2, (z_base + z_apex) / 2
    lungs = {}
    for side, sgn in (("right", -1), ("left", 1)):
        c = (zc, cy - 0.05 * ay, cx + sgn * ax * rng.uniform(0.45, 0.52))
        a = (lz, ay * rng.uniform(0.62, 0.72), ax * rng.uniform(0.30, 0.36))
        lungs[side] = _ellipsoid(z, y, x, c, a) <= 1
    cardio = rng.random() < 0.15
    hs = rng.uniform(1.25, 1.4) if cardio else rng.uniform(0.9, 1.05)
    heart = _ellipsoid(z, y, x, (D * rng.uniform(0.5, 0.58), cy - 0.22 * ay, cx + 0.12 * ax),
                       (D * 0.14 * hs, 0.30 * ay * hs, 0.22 * ax * hs)) <= 1
    for side in lungs:
        lungs[side] &= ~heart
    liver = _ellipsoid(z, y, x, (D * 0.95, cy + 0.05 * ay, cx - 0.25 * ax), (D * 0.33, 0.75 * ay, 0.62 * ax)) <= 1
    liver &= (rb <= 0.78) & ~lungs["right"] & ~lungs["left"] & (z > z_base - 3)
    aorta = ((y - (cy + 0.45 * ay)) ** 2 + (x - (cx + 0.1 * ax)) ** 2) <= rng.uniform(1.6, 2.3) ** 2

    findings, p = [], {}
    has = {"right": rng.random() < 0.65, "left": rng.random() < 0.65}
    if not any(has.values()):
        has[("right", "left")[rng.integers(2)]] = True
    for side, region_ids in (("right", [1, 2, 3]), ("left", [4, 5])):
        theta = np.deg2rad(rng.uniform(30, 60))
        normal = np.array([np.cos(theta), np.sin(theta), 0.0])  # oblique fissure: inferior-posterior = lower lobe
        lung_pts = np.argwhere(lungs[side]).astype(np.float64)
        centre = lung_pts.mean(0) if len(lung_pts) else np.array([zc, cy, cx])
        c_obl = float(normal @ centre + rng.uniform(-3, 3))
        z_h = centre[0] - rng.uniform(1, 4)  # horizontal fissure (right lung): upper above, middle below
        if has[side]:
            r = rng.uniform(1.4, 2.8)
            pos = _place(rng, lungs[side], r)
            region = int(rng.choice(region_ids))
            lower = region in (3, 5)
            c_obl = _side_of(pos, normal, rng, positive=lower, r=r)
            if region == 1:
                z_h = pos[0] + r + rng.uniform(3, 6)
            elif region == 2:
                z_h = pos[0] - r - rng.uniform(3, 6)
            findings.append({"kind": "nodule", "region": region, "size_mm": int(round(2 * r * SPACING[1])),
                             "pos": pos, "r": r})
        pts = np.stack([z, y, x], -1) @ normal
        is_lower = pts > c_obl
        if side == "right":
            lobe = np.where(is_lower, 3, np.where(z < z_h, 1, 2))
        else:
            lobe = np.where(is_lower, 5, 4)
        mask[lungs[side]] = lobe[lungs[side]]
        hu[lungs[side]] = HU["lung"]
        p[side] = normal
    phi = np.deg2rad(rng.uniform(-25, 25))
    n_liv = np.array([0.0, np.sin(phi), np.cos(phi)])  # Cantlie's line: +x (patient's left) = left hepatic lobe
    liv_pts = np.argwhere(liver).astype(np.float64)
    c_liv = float(n_liv @ (liv_pts.mean(0) if len(liv_pts) else np.array([D - 4, cy, cx])) + rng.uniform(-3, 3))
    if rng.random() < 0.5 and liver.sum() > 200:
        r = rng.uniform(1.4, 2.6)
        pos = _place(rng, liver, r)
        region = int(rng.choice([6, 7]))
        c_liv = _side_of(pos, n_liv, rng, positive=(region == 7), r=r)
        findings.append({"kind": "lesion", "region": region, "size_mm": int(round(2 * r * SPACING[1])),
                         "pos": pos, "r": r})
    mask[liver] = np.where(np.stack([z, y, x], -1)[liver] @ n_liv > c_liv, 7, 6)
    hu[liver] = HU["liver"]
    mask[heart] = 8
    hu[heart] = HU["heart"]
    mask[aorta & (rb <= 0.78)] = 9
    hu[aorta & (rb <= 0.78)] = HU["aorta"]

    effusion = None
    if rng.random() < 0.15:
        effusion = ("right", "left")[rng.integers(2)]
        lung = lungs[effusion]
        ys = np.where(lung.any((0, 2)))[0]
        y_cut = ys.max() - rng.uniform(0.25, 0.4) * (ys.max() - ys.min())
        hu[lung & (y > y_cut) & (z > zc)] = HU["fluid"]  # dependent fluid at the posterior base
    for f in findings:
        ball = _ellipsoid(z, y, x, f["pos"], (f["r"],) * 3) <= 1
        hu[ball] = HU["nodule" if f["kind"] == "nodule" else "lesion"]
    from scipy import ndimage

    texture = ndimage.gaussian_filter(rng.standard_normal(shape), 1.0) * 60
    hu = hu + np.where(mask >= 1, 1.0, 0.3) * texture * (hu < -500) + rng.normal(0, 18, shape)
    return {"hu": hu.astype(np.float32), "mask": mask, "findings": findings, "cardiomegaly": bool(cardio),
            "effusion": effusion}


def write_reports(case: dict) -> dict:
    """Findings (one sentence per region), impression, CoT steps and labels of one case."""
    by_region = {f["region"]: (k, f) for k, f in enumerate(case["findings"], start=1)}
    findings, imp, steps = [], [], []
    for rid, name in enumerate(REGIONS, start=1):
        k, f = by_region.get(rid, (0, None))
        title = name.capitalize()
        if f is not None and f["kind"] == "nodule":
            findings.append(f"{title}: a {f['size_mm']} mm solid nodule.")
            imp.append(f"{f['size_mm']} mm nodule in the {name}.")
            steps.append((f"{title} - a {f['size_mm']} mm solid, well-circumscribed nodule.", name, k))
        elif f is not None:
            findings.append(f"{title}: a {f['size_mm']} mm hypodense lesion.")
            imp.append(f"{f['size_mm']} mm hypodense lesion in the {name}.")
            steps.append((f"{title} - a {f['size_mm']} mm hypodense lesion, likely a cyst.", name, k))
        elif rid <= 5:
            findings.append(f"{title}: clear.")
        elif rid <= 7:
            findings.append(f"{title}: homogeneous parenchyma.")
        elif rid == 8:
            findings.append("Heart: enlarged." if case["cardiomegaly"] else "Heart: normal size.")
        else:
            findings.append("Aorta: normal caliber.")
    if case["effusion"]:
        side = case["effusion"]
        findings.append(f"Small {side} pleural effusion.")
        imp.append(f"Small {side} pleural effusion.")
        steps.append((f"{side.capitalize()} pleural space - a small dependent effusion.", f"{side} lung", 0))
    if case["cardiomegaly"]:
        imp.append("Cardiomegaly.")
        steps.append(("Heart - the cardiac silhouette is enlarged.", "heart", 0))
    steps.append(("Lungs - otherwise clear.", "lungs", 0))
    nodule_regions = {f["region"] for f in case["findings"] if f["kind"] == "nodule"}
    labels = [*[int(r in nodule_regions) for r in range(1, 6)],
              int(any(f["kind"] == "lesion" for f in case["findings"])), int(case["effusion"] is not None),
              int(case["cardiomegaly"])]
    cot = [{"step": i + 1, "text": t, "anatomical_entities": [m], "mask_region": m, **({"lesion": k} if k else {})}
           for i, (t, m, k) in enumerate(steps)]
    return {"findings": " ".join(findings), "impression": " ".join(imp), "cot": cot, "labels": labels}


def lesion_mask(case: dict, shape: tuple[int, int, int]) -> np.ndarray:
    """(D, H, W) uint8: finding k (1-based, the order of ``case["findings"]``) where it was drawn, else 0."""
    z, y, x = np.meshgrid(*(np.arange(s, dtype=np.float64) for s in shape), indexing="ij")
    out = np.zeros(shape, np.uint8)
    for k, f in enumerate(case["findings"], start=1):
        out[_ellipsoid(z, y, x, f["pos"], (f["r"],) * 3) <= 1] = k
    return out


def make_ct_encoder_demo(out: str | Path, n_patients: int = 360, seed: int = 0, quick: bool = False,
                         shape: tuple[int, int, int] = (32, 48, 48)) -> Path:
    """Write the phantom in the CT-RATE layout (see module doc).

    Args:
        out: output folder (created).
        n_patients: number of patients (one volume each).
        seed: random seed; the same seed gives the same files.
        quick: a small set for smoke tests (at most 48 patients).
        shape: (D, H, W) of every volume.

    Returns:
        Path of ``reports.csv``.
    """
    import nibabel as nib

    out = Path(out)
    n = min(n_patients, 48) if quick else n_patients
    if n < 1:
        raise ValueError(f"n_patients must be >= 1, got {n_patients}")
    affine = np.diag([SPACING[2], SPACING[1], SPACING[0], 1.0])
    rows, meta, labels, cot, seen = [], [], [], [], set()
    (out / "masks").mkdir(parents=True, exist_ok=True)
    (out / "lesions").mkdir(parents=True, exist_ok=True)
    for i in range(n):
        rng = np.random.default_rng([seed, i])
        while True:  # identical impressions would be indistinguishable pairs in retrieval
            case = sample_case(rng, tuple(shape))
            rep = write_reports(case)
            if rep["impression"] not in seen:
                break
        seen.add(rep["impression"])
        name = f"train_{i + 1}_a_1"
        folder = out / "train" / f"train_{i + 1}" / f"train_{i + 1}_a"
        folder.mkdir(parents=True, exist_ok=True)
        stored = (np.clip(np.round(case["hu"]), -1024, 3071) + 1024).astype(np.int16)  # raw values, v1 style
        nib.save(nib.Nifti1Image(np.ascontiguousarray(stored.transpose(2, 1, 0)), affine), folder / f"{name}.nii.gz")
        nib.save(nib.Nifti1Image(np.ascontiguousarray(case["mask"].transpose(2, 1, 0)), affine),
                 out / "masks" / f"{name}.nii.gz")
        nib.save(nib.Nifti1Image(np.ascontiguousarray(lesion_mask(case, tuple(shape)).transpose(2, 1, 0)), affine),
                 out / "lesions" / f"{name}.nii.gz")
        rows.append({"VolumeName": f"{name}.nii.gz", "ClinicalInformation_EN": "Screening.",
                     "Technique_EN": "Non-contrast chest CT.", "Findings_EN": rep["findings"],
                     "Impressions_EN": rep["impression"]})
        meta.append({"VolumeName": f"{name}.nii.gz", "RescaleSlope": 1, "RescaleIntercept": -1024,
                     "XYSpacing": f"[{SPACING[1]}, {SPACING[2]}]", "ZSpacing": SPACING[0]})
        labels.append({"VolumeName": f"{name}.nii.gz", **dict(zip(ABNORMALITIES, rep["labels"], strict=True))})
        cot.append({"volumename": f"{name}.nii.gz", "region": "Chest", "category": rep["impression"],
                    "cot_reasoning": rep["cot"]})
    for fname, table in (("reports.csv", rows), ("metadata.csv", meta), ("labels.csv", labels)):
        with (out / fname).open("w", newline="", encoding="utf-8") as f:
            w = csv.DictWriter(f, fieldnames=list(table[0]))
            w.writeheader()
            w.writerows(table)
    (out / "cot.json").write_text(json.dumps(cot, indent=1) + "\n")
    (out / "regions.json").write_text(json.dumps({
        "region_names": {str(i): n for i, n in enumerate(REGIONS, start=1)}, "region_groups": GROUPS,
        "description": f"ct_encoder phantom: {n} patients, {tuple(shape)} (D, H, W) at {SPACING} mm; a finding's "
                       "lobe is visible only in the region mask."}, indent=2) + "\n")
    return out / "reports.csv"
