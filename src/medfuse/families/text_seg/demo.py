"""Ultrasound-like 2D phantom for the ``text_seg`` family (seed 002: text-guided MedSAM).

Talk2MedSAM's claim is that clinical text helps a box-prompted segmenter. This generator writes a
data set where the box alone *cannot* solve the task, so the demo measures whether the text is used:

* **Ultrasound-like images.** Layered breast-like tissue (bright skin line, hypoechoic fat,
  textured glandular tissue, deep muscle), depth attenuation, multiplicative speckle (the envelope
  of a spatially correlated complex Gaussian field, i.e. Rayleigh-like) and log compression.
* **Several lesions inside one box.** Each image holds 2-4 lesions placed in the slots of a 2 x 2
  grid; the box prompt (``box`` column) encloses all of them. Lesions differ in four attributes:
  echogenicity (``hypoechoic`` darker / ``hyperechoic`` brighter than the tissue), margin
  (``circumscribed`` smooth ellipse / ``irregular`` lobulated with spicules), size (``small`` /
  ``large``) and position (``superficial`` / ``deep``: the upper / lower row of the box).
* **The text names the target.** One lesion is the target (the mask); the text describes its four
  attributes. Every other lesion differs from it in at least one attribute, and which attribute
  tells them apart is random (often only one), so a model must read all four words: the lesion
  beside the target differs in one of echogenicity, margin and size; a lesion in the other row may
  look identical, so that only the position word separates them.
* **Patients.** About 40 % of patients have a second image (the same lesions re-imaged with a
  small shift and fresh speckle), so splits must be by patient.

Files: ``images/<case>.png`` (uint8 grey), ``masks/<case>.png`` (0/255), ``manifest.csv`` with
``case_id, patient_id, image_us, mask, size, echogenicity, margin, position, box, text`` and
``dataset.json``. 300 patients at 128 x 128 take about 20 s.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage

__all__ = ["ATTRIBUTES", "QUICK_OVERRIDES", "TEMPLATE", "Lesion", "make_text_seg_demo", "render_image",
           "sample_layout"]

ATTRIBUTES = {
    "echogenicity": ("hypoechoic", "hyperechoic"),
    "margin": ("circumscribed", "irregular"),
    "size": ("small", "large"),
    "position": ("superficial", "deep"),
}
TEMPLATE = "{size} {echogenicity} mass with {margin} margins, {position}"
_RADIUS = {"small": (5.5, 7.5), "large": (9.5, 12.0)}
_ECHO = {"hypoechoic": 0.25, "hyperechoic": 2.6}
REPEAT_FRACTION = 0.4

QUICK_OVERRIDES = ("data.params.image_size=64", "data.params.mask_size=64", "model.params.image_size=64",
                   "data.batch_size=4", "train.max_epochs=6")
"""Config overrides that let ``medfuse demo text_seg --quick`` learn, applied after the engine's quick
settings (``train.max_epochs=2``). The tiny image side and SAM decoder start from random weights and
first collapse to an all-background mask; on this phantom they leave it after about 30-40 optimizer
steps, whatever the target (even "the whole box" as the mask). The quick phantom (40 patients, about
36 training images) at batch 16 and 2 epochs gives 6 steps: test Dice 0.000 in every row. At 64 px
and batch 4 a step costs about a sixteenth, so 6 epochs (60 steps) cost about as much CPU and reach
test Dice 0.37 [0.21, 0.51] (n = 12 images of 7 patients; all-foreground 0.04, the whole box 0.15)."""


@dataclass(frozen=True)
class Lesion:
    """One lesion: centre (y, x) in pixels, radius, attributes and shape parameters."""

    cy: float
    cx: float
    radius: float
    aspect: float
    angle: float
    echogenicity: str
    margin: str
    size: str
    position: str
    harmonics: tuple[tuple[int, float, float], ...]
    spicules: tuple[float, ...]

    def attributes(self) -> dict[str, str]:
        return {"size": self.size, "echogenicity": self.echogenicity, "margin": self.margin, "position": self.position}


def _lesion_mask(les: Lesion, shape: tuple[int, int], dy: float = 0.0, dx: float = 0.0) -> np.ndarray:
    """Soft (H, W) occupancy in [0, 1] of a lesion (edge ramp: sharp if circumscribed, wide if irregular)."""
    out = np.zeros(shape)
    reach = int(np.ceil(2.7 * les.radius)) + 3  # the boundary never reaches 2.7 radii
    cy, cx = les.cy + dy, les.cx + dx
    y0, y1 = max(0, int(cy) - reach), min(shape[0], int(cy) + reach + 1)
    x0, x1 = max(0, int(cx) - reach), min(shape[1], int(cx) + reach + 1)
    if y0 >= y1 or x0 >= x1:
        return out
    yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float64)
    y, x = yy - cy, xx - cx
    c, s = np.cos(les.angle), np.sin(les.angle)
    u, v = c * x + s * y, (-s * x + c * y) / les.aspect
    r, theta = np.hypot(u, v), np.arctan2(v, u)
    bound = np.full_like(r, les.radius)
    for k, amp, phase in les.harmonics:
        bound = bound + les.radius * amp * np.cos(k * theta + phase)
    for ang in les.spicules:  # thin rays: the boundary reaches out in a narrow angular window
        d = (theta - ang + np.pi) % (2 * np.pi) - np.pi
        bound = bound + les.radius * 0.6 * np.exp(-(d / 0.12) ** 2)
    edge = 2.5 if les.margin == "irregular" else 0.8  # indistinct vs sharp boundary, in pixels
    out[y0:y1, x0:x1] = np.clip((bound - r) / edge + 0.5, 0.0, 1.0)
    return out


def _new_lesion(rng: np.random.Generator, attrs: dict[str, str], cy: float, cx: float) -> Lesion:
    lo, hi = _RADIUS[attrs["size"]]
    irregular = attrs["margin"] == "irregular"
    harmonics: tuple[tuple[int, float, float], ...] = ()
    spicules: tuple[float, ...] = ()
    if irregular:
        ks = rng.choice(np.arange(3, 8), size=3, replace=False)
        harmonics = tuple((int(k), float(rng.uniform(0.08, 0.14)), float(rng.uniform(0, 2 * np.pi))) for k in ks)
        spicules = tuple(float(a) for a in rng.uniform(0, 2 * np.pi, int(rng.integers(4, 8))))
    return Lesion(cy, cx, float(rng.uniform(lo, hi)), float(rng.uniform(0.7, 1.0) if not irregular else 1.0),
                  float(rng.uniform(0, np.pi)), attrs["echogenicity"], attrs["margin"], attrs["size"],
                  attrs["position"], harmonics, spicules)


def sample_layout(rng: np.random.Generator, shape: tuple[int, int] = (128, 128)) -> tuple[list[Lesion], int]:
    """Lesions of one patient (2-4, in distinct slots of a 2 x 2 grid) and the index of the target.

    The slot beside the target (same row, same position word) always holds a lesion that differs
    from the target in one of echogenicity, margin and size (two of them in 30 % of images), so each
    of these words alone decides about a third of the images. Lesions in the other row differ by
    position and, half of the time, in one more attribute.
    """
    h, w = shape
    n = int(rng.choice([2, 3, 4], p=[0.4, 0.35, 0.25]))
    keys = [k for k in ATTRIBUTES if k != "position"]
    for _ in range(100):
        slot_w, slot_h = rng.uniform(0.25, 0.29) * w, rng.uniform(0.23, 0.27) * h
        x0 = rng.uniform(0.06 * w, w - 2 * slot_w - 0.06 * w)
        y0 = rng.uniform(0.22 * h, h - 2 * slot_h - 0.05 * h)
        target_slot = int(rng.integers(4))
        row_t = target_slot // 2
        others = [s for s in range(4) if s // 2 != row_t]
        slots = [target_slot, target_slot ^ 1, *rng.choice(others, size=n - 2, replace=False).tolist()]
        t_attrs = {k: str(rng.choice(ATTRIBUTES[k])) for k in keys}
        lesions = []
        for i, slot in enumerate(slots):
            row, col = divmod(int(slot), 2)
            attrs = dict(t_attrs)
            n_flip = 0 if i == 0 else int(rng.choice([1, 2], p=[0.7, 0.3]) if i == 1 else rng.choice([0, 1]))
            for key in rng.choice(keys, size=n_flip, replace=False):
                attrs[key] = next(v for v in ATTRIBUTES[key] if v != t_attrs[key])
            attrs["position"] = ATTRIBUTES["position"][row]
            cy = y0 + (row + 0.5) * slot_h + rng.uniform(-0.12, 0.12) * slot_h
            cx = x0 + (col + 0.5) * slot_w + rng.uniform(-0.12, 0.12) * slot_w
            lesions.append(_new_lesion(rng, attrs, cy, cx))
        masks = [_lesion_mask(les, shape) > 0.5 for les in lesions]
        grown = [ndimage.binary_dilation(m, iterations=2) for m in masks]
        inside = all(m[:2].sum() + m[-2:].sum() + m[:, :2].sum() + m[:, -2:].sum() == 0 for m in grown)
        if inside and not any((grown[i] & grown[j]).any() for i in range(n) for j in range(i + 1, n)):
            order = rng.permutation(n)  # the target is not always lesion 0
            return [lesions[k] for k in order], int(np.argmax(order == 0))
    raise RuntimeError("could not place the lesions without overlap")  # pragma: no cover


def _tissue(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    """Echogenicity of the background tissue, (H, W)."""
    h, w = shape
    y = np.arange(h)[:, None] / h
    wobble = ndimage.gaussian_filter1d(rng.normal(0, 1, w), 12)[None, :]
    skin, fat = 0.04 + 0.005 * wobble, rng.uniform(0.14, 0.2) + 0.03 * wobble
    muscle = rng.uniform(0.86, 0.92) + 0.02 * wobble
    echo = np.where(y < skin, 1.4, np.where(y < fat, 0.45, np.where(y < muscle, 0.85, 0.6)))
    texture = ndimage.gaussian_filter(rng.normal(0, 1, shape), 4.0)
    echo = echo * (1 + 0.15 * texture / (texture.std() + 1e-8))
    stripes = 1 + 0.25 * np.sin(2 * np.pi * (y * h) / rng.uniform(4, 6))
    echo = np.where(y >= muscle, echo * stripes, echo)
    return np.clip(echo, 0.05, None) * np.exp(-rng.uniform(0.3, 0.7) * y)  # depth attenuation


def render_image(rng: np.random.Generator, lesions: list[Lesion], target: int, shape: tuple[int, int] = (128, 128),
                 shift: tuple[float, float] = (0.0, 0.0)) -> tuple[np.ndarray, np.ndarray]:
    """One ultrasound-like image (uint8 (H, W)) and the target mask (bool (H, W))."""
    echo = _tissue(rng, shape)
    target_mask = np.zeros(shape, dtype=bool)
    for i, les in enumerate(lesions):
        occ = _lesion_mask(les, shape, *shift)
        inner = 1 + (0.25 if les.echogenicity == "hyperechoic" else 0.1) * ndimage.gaussian_filter(
            rng.normal(0, 1, shape), 1.2)
        echo = echo * (1 - occ) + occ * np.clip(_ECHO[les.echogenicity] * echo * inner, 0.02, None)
        if i == target:
            target_mask = occ > 0.5
    z = ndimage.gaussian_filter(rng.normal(size=shape), 0.8) + 1j * ndimage.gaussian_filter(rng.normal(size=shape), 0.8)
    speckle = np.abs(z) / np.abs(z).mean()  # Rayleigh-like envelope, mean 1
    intensity = echo * speckle**0.7
    img = np.log1p(3.0 * intensity) / np.log1p(3.0 * np.percentile(intensity, 99.5))
    img = np.clip(img + rng.normal(0, 0.02, shape), 0, 1)
    return (img * 255).astype(np.uint8), target_mask


def _box(lesions: list[Lesion], shape: tuple[int, int], rng: np.random.Generator,
         shift: tuple[float, float]) -> list[int]:
    union = np.zeros(shape, dtype=bool)
    for les in lesions:
        union |= _lesion_mask(les, shape, *shift) > 0.5
    ys, xs = np.nonzero(union)
    m = rng.integers(2, 6, 4)
    return [max(0, int(xs.min() - m[0])), max(0, int(ys.min() - m[1])),
            min(shape[1] - 1, int(xs.max() + m[2])), min(shape[0] - 1, int(ys.max() + m[3]))]


def make_text_seg_demo(out: str | Path, n_patients: int = 300, seed: int = 0, quick: bool = False,
                       size: int = 128) -> Path:
    """Write the text_seg phantom data set (PNG images and masks, ``manifest.csv``, ``dataset.json``).

    Args:
        out: output folder (created).
        n_patients: number of patients (about 1.4 images each).
        seed: random seed; the same seed gives the same files.
        quick: a small set for smoke tests (at most 40 patients).
        size: image side in pixels.

    Returns:
        Path of the manifest.
    """
    from PIL import Image

    out = Path(out)
    n_patients = min(n_patients, 40) if quick else n_patients
    if n_patients < 1 or size < 64:
        raise ValueError(f"need n_patients >= 1 and size >= 64, got {n_patients}, {size}")
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "masks").mkdir(parents=True, exist_ok=True)
    shape = (size, size)
    rows = []
    for i in range(n_patients):
        rng = np.random.default_rng([seed, i])  # per patient: independent of n_patients
        lesions, target = sample_layout(rng, shape)
        pid = f"pt{i:04d}"
        for view in range(2 if rng.random() < REPEAT_FRACTION else 1):
            shift = (0.0, 0.0) if view == 0 else tuple(float(v) for v in rng.uniform(-3, 3, 2))
            img, mask = render_image(rng, lesions, target, shape, shift)
            cid = f"{pid}_v{view}"
            Image.fromarray(img).save(out / "images" / f"{cid}.png")
            Image.fromarray((mask * 255).astype(np.uint8)).save(out / "masks" / f"{cid}.png")
            attrs = lesions[target].attributes()
            rows.append({"case_id": cid, "patient_id": pid, "image_us": f"images/{cid}.png",
                         "mask": f"masks/{cid}.png", **attrs, "n_lesions": len(lesions),
                         "box": " ".join(str(v) for v in _box(lesions, shape, rng, shift)),
                         "text": TEMPLATE.format(**attrs)})
    manifest = out / "manifest.csv"
    with manifest.open("w", newline="", encoding="utf-8") as f:
        wr = csv.DictWriter(f, fieldnames=list(rows[0]))
        wr.writeheader()
        wr.writerows(rows)
    meta = {"modalities": ["us"], "generator": "text_seg", "seed": seed, "template": TEMPLATE,
            "description": (f"Ultrasound-like phantoms: {n_patients} patients, {len(rows)} images of {size}x{size}; "
                            "2-4 lesions inside the box prompt, the text's four attributes name the target.")}
    (out / "dataset.json").write_text(json.dumps(meta, indent=2) + "\n")
    return manifest

