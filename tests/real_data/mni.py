"""A small nnU-Net v2 dataset of real anatomy from the MNI152 files shipped inside ``nilearn``.

Cases are boxes of odd, different sizes cut from the 2 mm MNI152 T1 template (plus a little noise),
labelled 1 = grey matter and 2 = white matter from nilearn's GM/WM probability maps (the larger of
the two above 0.5). Test images are stored four ways: RAS as the template, LPS (the first two axes
flipped, affine adjusted), oblique (the affine rotated by 20 degrees about the slice axis) and
anisotropic (every other slice, 4 mm along k). Nothing is downloaded: nilearn ships these files.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

SIZES = [(35, 41, 33), (39, 37, 31), (33, 45, 35), (41, 39, 29), (37, 35, 37), (31, 43, 33)]
TEST_STORAGE = ["ras", "lps", "oblique", "anisotropic"]


def _mni() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    from nilearn import datasets

    t1 = datasets.load_mni152_template(resolution=2)
    gm = np.asarray(datasets.load_mni152_gm_template(resolution=2).get_fdata(), dtype=np.float32)
    wm = np.asarray(datasets.load_mni152_wm_template(resolution=2).get_fdata(), dtype=np.float32)
    img = np.asarray(t1.get_fdata(), dtype=np.float32)
    label = np.zeros(img.shape, np.uint8)
    label[(gm > 0.5) & (gm >= wm)] = 1
    label[(wm > 0.5) & (wm > gm)] = 2
    return img, label, np.asarray(t1.affine, dtype=np.float64)


def _box(shape: tuple[int, ...], size: tuple[int, int, int], rng: np.random.Generator) -> tuple[slice, ...]:
    centre = [s // 2 for s in shape]
    out = []
    for c, n, s in zip(centre, size, shape, strict=True):
        start = int(np.clip(c - n // 2 + rng.integers(-6, 7), 0, s - n))
        out.append(slice(start, start + n))
    return tuple(out)


def _store(img: np.ndarray, label: np.ndarray, affine: np.ndarray, how: str):
    """(i, j, k) arrays + affine -> the same anatomy stored ``how``."""
    if how == "ras":
        return img, label, affine
    if how == "lps":
        flip = np.diag([-1.0, -1.0, 1.0, 1.0])
        flip[0, 3], flip[1, 3] = img.shape[0] - 1, img.shape[1] - 1  # new voxel -> old voxel
        return img[::-1, ::-1].copy(), label[::-1, ::-1].copy(), affine @ flip
    if how == "oblique":
        a = np.deg2rad(20.0)
        rot = np.eye(4)
        rot[:2, :2] = [[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]]
        return img, label, rot @ affine
    if how == "anisotropic":
        scale = np.diag([1.0, 1.0, 2.0, 1.0])
        return img[:, :, ::2].copy(), label[:, :, ::2].copy(), affine @ scale
    raise ValueError(how)


def make_mni_dataset(root: str | Path, n_train: int = 6, seed: int = 0) -> Path:
    """Write ``root/Dataset901_MNI`` (nnU-Net v2: dataset.json, imagesTr, labelsTr), ``root/imagesTs``
    (a plain folder of ``<case>_0000.nii.gz``) and ``root/labelsTs`` (the references); return the dataset. Training cases are RAS with odd, different sizes; test cases
    ``ts_<storage>`` cover :data:`TEST_STORAGE`."""
    import nibabel as nib

    rng = np.random.default_rng(seed)
    img, label, affine = _mni()
    img = img / max(float(img.max()), 1.0)
    out = Path(root) / "Dataset901_MNI"
    for sub in ("imagesTr", "labelsTr"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    # test images and references outside the dataset (data.layouts reads imagesTs as unlabelled cases)
    for sub in ("imagesTs", "labelsTs"):
        (Path(root) / sub).mkdir(parents=True, exist_ok=True)

    def write(name: str, split: str, size, how: str) -> None:
        box = _box(img.shape, size, rng)
        x = img[box] + rng.normal(0, 0.03, size).astype(np.float32)
        y = label[box]
        shift = np.eye(4)
        shift[:3, 3] = [s.start for s in box]
        x, y, aff = _store(x.astype(np.float32), y, affine @ shift, how)
        images = out / "imagesTr" if split == "Tr" else Path(root) / "imagesTs"
        nib.save(nib.Nifti1Image(x, aff), images / f"{name}_0000.nii.gz")
        labels = out / "labelsTr" if split == "Tr" else Path(root) / "labelsTs"
        nib.save(nib.Nifti1Image(y.astype(np.uint8), aff), labels / f"{name}.nii.gz")

    for i in range(n_train):
        write(f"mni_{i:03d}", "Tr", SIZES[i % len(SIZES)], "ras")
    for i, how in enumerate(TEST_STORAGE):
        write(f"ts_{how}", "Ts", SIZES[(i + 1) % len(SIZES)], how)
    meta = {"channel_names": {"0": "T1"}, "labels": {"background": 0, "GM": 1, "WM": 2},
            "numTraining": n_train, "file_ending": ".nii.gz", "name": "MNI152 boxes (nilearn)"}
    (out / "dataset.json").write_text(json.dumps(meta, indent=2))
    return out
