"""The generic segmentation evaluator of ``medfuse evaluate``, and the helpers that put a prediction
back on its input's own grid (:func:`case_logits`, :func:`on_input_grid`), which ``predict`` shares.

:class:`SegmentationEvaluator` scores whole volumes on each case's own label grid (Dice, IoU, HD95
in mm per class, bootstrap CIs over cases, or over patients when one has several), writes the label
maps it scores under ``predictions/<split>/<case>.nii.gz`` and draws overlays. The base class and
the other generic evaluators are in :mod:`medfuse.engine.evaluate`.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medfuse.data.paths import output_path
from medfuse.engine.evaluate import Evaluator


def spacing_of(batch: dict[str, Any], i: int = 0) -> tuple[float, float, float] | None:
    """(D, H, W) voxel spacing of a batch item's affine (columns are the w, h, d axes), or None without affines."""
    if "affine" not in batch:
        return None
    a = np.asarray(torch.as_tensor(batch["affine"][i]).cpu())[:3, :3]
    sw, sh, sd = np.linalg.norm(a, axis=0)
    return (float(sd), float(sh), float(sw))


def spacing_from_affine(affine: Any) -> tuple[float, float, float]:
    """(D, H, W) voxel spacing in mm of a (4, 4) affine whose columns are the w, h, d axes."""
    a = np.asarray(torch.as_tensor(affine).cpu(), dtype=np.float64)[:3, :3]
    sw, sh, sd = np.linalg.norm(a, axis=0)
    return (float(sd), float(sh), float(sw))


def case_logits(logits: torch.Tensor, batch: dict[str, Any], i: int) -> torch.Tensor:
    """Case ``i``'s (K, D, H, W) outputs without the batch padding of different-size cases."""
    x = logits[i]
    shapes = batch.get("spatial_shape")
    if shapes is not None:
        d, h, w = (int(v) for v in shapes[i].tolist())
        x = x[..., :d, :h, :w]
    return x


def on_input_grid(x: torch.Tensor, batch: dict[str, Any], i: int) -> tuple[torch.Tensor, np.ndarray]:
    """Case ``i``'s (K, D, H, W) map moved from the processed grid onto its input file's grid (the
    inverse of orientation/spacing; :func:`~medfuse.engine.inference.to_input_grid`), with that
    grid's affine. Items without the input grid keep the processed one."""
    from medfuse.engine.inference import to_input_grid

    affine = np.asarray(torch.as_tensor(batch["affine"][i]).cpu(), dtype=np.float64) if "affine" in batch \
        else np.eye(4)
    if "orig_affine" not in batch or "orig_shape" not in batch:
        return x, affine
    dst = np.asarray(torch.as_tensor(batch["orig_affine"][i]).cpu(), dtype=np.float64)
    shape = [int(v) for v in torch.as_tensor(batch["orig_shape"][i]).tolist()]
    return to_input_grid(x.float(), affine, dst, shape), dst


def label_class_names(mask_labels: dict[str, int] | None, values: list[int] | None, k: int) -> list[str]:
    """Names of the class indices 0..k-1: class j's is the declared label (``mask_labels``, name ->
    value) whose value is ``values[j]`` (``values`` None: j itself); a class without one gets its
    value as its name (``class_<j>`` where that is a declared name already)."""
    by_value: dict[int, str] = {}
    for name, v in (mask_labels or {}).items():
        by_value.setdefault(int(v), str(name))
    declared = set(by_value.values())
    names = []
    for j in range(k):
        v = values[j] if values is not None and j < len(values) else j
        generic = str(v) if str(v) not in declared else f"class_{j}"
        names.append(by_value.get(v, generic))
    return names


class SegmentationEvaluator(Evaluator):
    """Label maps -> per-case Dice/HD95 with CIs on the label file's own grid, NIfTI predictions on
    the input's grid, overlays, ``metrics_per_case.csv``.

    Every case's whole-volume logits (sliding window, padding and TTA by the task) are moved back
    onto the grid of its label file (orientation and spacing undone, exact for pure reorientation)
    and scored there against the label file as stored (HD95 in mm of that grid); the prediction is
    written as ``predictions/<split>/<case_id>.nii.gz`` with the input image's shape and affine.
    A case without a label file is scored on the processed grid.

    Declared mask labels that are not 0..K-1 (e.g. {0, 255}, {0, 1, 2, 4}) are the classes 0..K-1
    in increasing value order (:attr:`class_values`, as the data module trained them): a label file
    is scored after :meth:`label_values` turns its values into class indices, the written files
    hold the declared values again (:meth:`file_values`), and class k is named by the label whose
    value is class k's (:meth:`class_names`).

    ``out["logits"]`` holds per-voxel outputs, moved between grids as they are; :meth:`labels_of`
    turns them into class indices wherever a label map is needed (scores, written files, overlays),
    so one rule makes every label map of a case. A family whose outputs are not one score per class
    (e.g. nested region probabilities) overrides :meth:`num_classes_of` and :meth:`labels_of`, and
    :meth:`file_values` to write its data set's own label values.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.per_case: dict[str, list[np.ndarray]] = {}
        self.case_ids: list[str] = []
        self.num_classes: int | None = None
        self.shown = 0
        self.out_dir = self.run_dir / "predictions" / self.split
        self.out_dir.mkdir(parents=True, exist_ok=True)

    @property
    def class_values(self) -> list[int] | None:
        """The label-file value of each class index (None: the values are the class indices), from
        the data module's ``mask_labels`` and ``data.num_classes``
        (:func:`~medfuse.data.labels.label_class_values`)."""
        from medfuse.data.labels import label_class_values

        return label_class_values(self.dm.table.mask_labels, self.cfg.data.num_classes)

    def label_values(self, mask: np.ndarray) -> np.ndarray:
        """A label file's values -> the class indices the model predicts (default: class k = the
        k-th declared value, :attr:`class_values`; as stored when the values are the indices)."""
        from medfuse.data.labels import values_to_classes

        return values_to_classes(mask, self.class_values, "label file")

    def num_classes_of(self, logits: torch.Tensor) -> int:
        """How many classes (background included) a batch's outputs (B, K, D, H, W) score (default: K)."""
        return int(logits.shape[1])

    def labels_of(self, logits: torch.Tensor) -> torch.Tensor:
        """A case's outputs (K, D, H, W), on any grid -> its class indices (D, H, W) (default: argmax over K)."""
        return logits.argmax(0)

    def file_values(self, labels: np.ndarray) -> np.ndarray:
        """Class indices (D, H, W) -> the values written to ``predictions/<split>/`` (default: the
        declared value of each class, :attr:`class_values`); the inverse of :meth:`label_values`."""
        from medfuse.data.labels import classes_to_values

        return classes_to_values(labels, self.class_values)

    def file_dtype(self, k: int) -> type:
        """The dtype of the written label maps (uint8 unless a value needs more)."""
        from medfuse.data.labels import label_file_dtype

        return label_file_dtype(self.class_values, k)

    def reference(self, batch: dict[str, Any], i: int) -> tuple[np.ndarray, np.ndarray] | None:
        """Case ``i``'s label map (D, H, W) as stored in its label file and that file's affine, or
        None when the case has no label file."""
        from medfuse.data.io import read_image

        case = self._cases.get(batch["case_id"][i])
        path = case.mask if case is not None else None
        if not path or not isinstance(path, (str, Path)) or not Path(path).exists():
            return None
        from medfuse.errors import DataError

        vol = read_image(path)
        try:
            labels = self.label_values(np.asarray(vol.array[0]).round().astype(np.int64))
        except DataError as e:  # name the label file
            raise DataError(path, e.problem, e.fix) from None
        return labels, np.asarray(vol.affine)

    def update(self, batch, out):
        from medfuse.data.io import write_nifti
        from medfuse.engine.inference import to_input_grid
        from medfuse.metrics import segmentation_case_metrics
        from medfuse.reports.plots import plot_overlay

        logits = out["logits"]  # (B, K, D, H, W)
        self.num_classes = k = self.num_classes_of(logits)
        image = batch["image"].cpu()
        for i, cid in enumerate(batch["case_id"]):
            lg = case_logits(logits, batch, i).float().cpu()  # (K, D, H, W) processed grid
            proc_affine = np.asarray(torch.as_tensor(batch["affine"][i]).cpu()) if "affine" in batch else np.eye(4)
            ref = self.reference(batch, i)
            if ref is not None:
                target_np, t_affine = ref
                pred_t = self.labels_of(to_input_grid(lg, proc_affine, t_affine, target_np.shape))
                target = torch.from_numpy(target_np)
                spacing = spacing_from_affine(t_affine)
            else:
                pred_t = self.labels_of(lg)
                target = case_logits(batch["mask"], batch, i)[0].long().cpu()
                spacing = spacing_from_affine(proc_affine)
            m = segmentation_case_metrics(pred_t[None], target[None], num_classes=k, spacing=spacing)
            for key, v in m.items():
                self.per_case.setdefault(key, []).append(np.asarray(v))
            self.case_ids.append(str(cid))
            on_grid, affine = on_input_grid(lg, batch, i)
            write_nifti(self.file_values(self.labels_of(on_grid).numpy())[None].astype(self.file_dtype(k)),
                        output_path(self.out_dir, f"{cid}.nii.gz"), affine=affine)
            if self.shown < self.cfg.eval.overlays:
                mask = case_logits(batch["mask"], batch, i)[0].cpu().numpy() if "mask" in batch else None
                img = case_logits(image, batch, i)[0].numpy()
                self.plots[f"overlay {cid}"] = plot_overlay(img, self.labels_of(lg).numpy(), mask,
                                                            self.out_path("plots", f"overlay_{cid}.png"))
                self.shown += 1

    def per_case_table(self, names: list[str]) -> dict[str, Any]:
        """``{"columns", "rows"}``: one row per case, Dice/IoU/HD95 (mm) per scored class."""
        merged = {key: np.concatenate(v) for key, v in self.per_case.items()}
        keys = [k for k in ("dice", "iou", "hd95") if k in merged]
        columns = ["case_id", *[f"{k}_{n}" for k in keys for n in names]]
        rows = [[cid, *[float(merged[k][r, j]) for k in keys for j in range(len(names))]]
                for r, cid in enumerate(self.case_ids)]
        return {"columns": columns, "rows": rows}

    def write_per_case(self, names: list[str]) -> dict[str, Any]:
        """``metrics_per_case.csv`` (the :meth:`per_case_table` rows, with the split); returns the table."""
        table = self.per_case_table(names)
        with self.out_path("metrics_per_case.csv").open("w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(["split", *table["columns"]])
            for row in table["rows"]:
                w.writerow([self.split, row[0], *[f"{v:.6g}" for v in row[1:]]])
        return table

    def class_names(self) -> list[str]:
        """The name of each scored class index 0..K-1 (background first): the declared label whose
        value is that class's (:attr:`class_values`), whatever order the labels were declared in;
        a class without a declared label (``data.num_classes`` above the declared labels) is named
        by its value."""
        return label_class_names(self.dm.table.mask_labels, self.class_values, self.num_classes or 0)

    def compute(self):
        from medfuse.metrics import segmentation_report

        merged = {key: np.concatenate(v) for key, v in self.per_case.items()}
        per_case = self.write_per_case(self.class_names()[1:])
        rep = segmentation_report(merged, self.class_names()[1:], n_boot=self.n_boot, seed=self.seed,
                                  groups=self.patient_groups())
        extra = {k: rep.pop(k) for k in ("per_class", "class_names", "n", "n_patients") if k in rep}
        return {"metrics": rep, **extra, "per_case": per_case}
