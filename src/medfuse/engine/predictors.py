"""The generic predictors of the three task kinds (``medfuse predict`` on top of
:class:`~medfuse.engine.predict.Predictor`): a classification run's ``predictions.csv``, a
segmentation run's label maps on each input's own grid, a contrastive run's ``embeddings.npz``.
A family names one of these (or its own subclass) in its :class:`~medfuse.registry.ModelEntry`.
"""

from __future__ import annotations

import numpy as np
import torch

from medfuse.data.paths import output_path
from medfuse.engine.outputs import write_embeddings, write_rows
from medfuse.engine.predict import Predictor


class ClassificationPredictor(Predictor):
    """``predictions.csv``: case id, predicted class, one probability column per class."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.rows: list[tuple[str, np.ndarray]] = []

    def write(self, batch, out, out_dir):
        probs = out["logits"].float().softmax(-1).cpu().numpy()  # (B, K)
        self.rows += list(zip(batch["case_id"], probs, strict=True))

    def finish(self, out_dir):
        if not self.rows:
            return
        names = self.dm.table.class_names or [str(i) for i in range(len(self.rows[0][1]))]
        write_rows(output_path(out_dir, "predictions.csv"), ["case_id", "pred", *[f"p_{n}" for n in names]],
                   [[cid, names[int(p.argmax())], *[f"{v:.5f}" for v in p]] for cid, p in self.rows])


class SegmentationPredictor(Predictor):
    """One label map per case, ``<case_id>.nii.gz`` (nnU-Net naming) on the input image's own grid:
    its shape and affine exactly (orientation and spacing undone,
    :func:`~medfuse.engine.segmentation_evaluator.on_input_grid`). The label map holds the data set's declared
    values (``mask_labels``, e.g. 0/255: class k is the k-th declared value,
    :func:`~medfuse.data.labels.label_class_values`), as the files ``evaluate`` writes. With
    ``eval.save_probabilities`` also ``<case_id>_probs.nii.gz`` (K softmax channels in class order,
    float32, same grid)."""

    def class_values(self) -> list[int] | None:
        """The label value written for each class index (None: the index itself), from the run's (or
        package's) ``mask_labels`` and ``data.num_classes``."""
        from medfuse.data.labels import label_class_values

        return label_class_values(self.dm.table.mask_labels, self.cfg.data.num_classes)

    def write(self, batch, out, out_dir):
        from medfuse.data.io import write_nifti
        from medfuse.data.labels import classes_to_values, label_file_dtype
        from medfuse.engine.segmentation_evaluator import case_logits, on_input_grid

        logits = out["logits"]  # (B, K, D, H, W)
        values = self.class_values()
        dtype = label_file_dtype(values, int(logits.shape[1]))
        for j, cid in enumerate(batch["case_id"]):
            lg, affine = on_input_grid(case_logits(logits, batch, j).float().cpu(), batch, j)
            labels = classes_to_values(lg.argmax(0).numpy(), values)  # (D, H, W) declared values
            write_nifti(labels[None].astype(dtype), output_path(out_dir, f"{cid}.nii.gz"), affine=affine)
            if self.cfg.eval.save_probabilities:
                write_nifti(lg.softmax(0).numpy().astype(np.float32), output_path(out_dir, f"{cid}_probs.nii.gz"),
                            affine=affine)


class EmbeddingPredictor(Predictor):
    """``embeddings.npz``: case ids and L2-normalised image embeddings (E per case)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.ids: list[str] = []
        self.emb: list[np.ndarray] = []

    def write(self, batch, out, out_dir):
        self.ids += list(batch["case_id"])
        self.emb.append(torch.nn.functional.normalize(out["image_emb"].float(), dim=-1).cpu().numpy())

    def finish(self, out_dir):
        if self.emb:  # the rows of other cases an earlier run wrote there are kept
            write_embeddings(output_path(out_dir, "embeddings.npz"), self.ids, np.concatenate(self.emb))
