"""``msd`` layout: the Medical Segmentation Decathlon (``dataset.json`` with ``modality``,
``labels``, ``training``, ``test``; multi-modal 4D files). The ``test`` list's images have no labels
and are left out of the cases (as nnU-Net's ``imagesTs``); ``medfuse predict`` on the dataset folder
(or its ``imagesTs``) reads them (:func:`msd_test_cases`), each 4D file's channels as the modalities.
"""

from __future__ import annotations

from pathlib import Path

from medfuse.data.layouts.cases import Case, CaseTable, abs_path, read_json, unique_names
from medfuse.errors import DataError


def msd_test_cases(folder: Path) -> list[Case] | None:
    """The unlabelled ``test`` images of an MSD dataset as cases (no mask; channel ``k`` of a 4D file
    = modality ``k``), for ``folder`` = the dataset folder or its ``imagesTs``; None when ``folder``
    is neither or the dataset.json lists no test image."""
    for source in (folder / "dataset.json", folder.parent / "dataset.json"):
        if source.is_file() and (folder == source.parent or folder.name == "imagesTs"):
            meta = read_json(source)
            if isinstance(meta, dict) and "modality" in meta and meta.get("test"):
                table = _table(source, meta, include_unlabelled_test=True)
                return [c for c in table.cases if c.split == "test" and c.mask is None]
    return None


def load_msd(source: Path) -> CaseTable:
    return _table(source, read_json(source))


def _table(source: Path, meta: dict, include_unlabelled_test: bool = False) -> CaseTable:
    root = source.parent
    try:
        channels = sorted((int(k), str(v)) for k, v in meta["modality"].items())
        mask_labels = {str(v): int(k) for k, v in (meta.get("labels") or {}).items()} or None
    except (AttributeError, ValueError) as e:
        raise DataError(
            source,
            "has 'modality'/'labels' that do not map numbers to names",
            'fix dataset.json (e.g. "modality": {"0": "FLAIR"})',
        ) from e
    modalities = unique_names([name for _, name in channels])
    index = {m: k for (k, _), m in zip(channels, modalities, strict=True)}
    cases = []
    for split, entries in ((None, meta.get("training") or []), ("test", meta.get("test") or [])):
        for entry in entries:
            image = entry.get("image") if isinstance(entry, dict) else entry
            if not isinstance(image, str):
                raise DataError(
                    source,
                    f"has a {split or 'training'} entry without an image path: {entry!r}",
                    'give every entry an "image" path',
                )
            label = entry.get("label") if isinstance(entry, dict) else None
            if split == "test" and not label and not include_unlabelled_test:
                continue  # MSD's test images carry no labels: nothing to score (predict reads them)
            image_path = abs_path(root, image)
            case_id = _case_stem(Path(image_path).name)
            cases.append(
                Case(
                    case_id=case_id,
                    patient_id=case_id,
                    images=dict.fromkeys(modalities, image_path),
                    mask=abs_path(root, label) if label else None,
                    split=split,
                    channel_index=dict(index),
                )
            )
    return CaseTable(
        root=root, layout="msd", modalities=modalities, cases=cases, mask_labels=mask_labels, source=source
    )


def _case_stem(name: str) -> str:
    for suffix in (".nii.gz", ".nii", ".mha", ".mhd", ".nrrd", ".npz", ".npy"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return Path(name).stem
