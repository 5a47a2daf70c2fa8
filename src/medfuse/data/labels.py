"""Mask label values <-> class indices of a segmentation model (DESIGN "Arrays": labels are the
file's values). Declared labels {0, 255} or {0, 1, 2, 4} train as classes 0..K-1
(:func:`label_class_values`); the loader maps file values to classes (:func:`values_to_classes`),
and evaluate and predict write the declared values back (:func:`classes_to_values`, in the
smallest dtype that holds them, :func:`label_file_dtype`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from medfuse.errors import ConfigError, DataError

__all__ = ["classes_to_values", "label_class_values", "label_file_dtype", "values_to_classes"]




def label_class_values(mask_labels: Mapping[str, int] | None, num_classes: int | None = None) -> list[int] | None:
    """The label-file value of each class index of a segmentation model, or None when the file
    values are the class indices themselves.

    Class ``k`` is the ``k``-th declared value in increasing order (background 0 first): declared
    labels {0, 255} or {0, 1, 2, 4} train as classes 0..K-1, and predictions are written back with
    the declared values. The values stay the class indices (None) when nothing is declared, when the
    declared values are 0..K-1 already, or when ``num_classes`` (``data.num_classes``) is above every
    declared value (the classes are then the values as stored). Classes past the K declared ones (a
    ``num_classes`` above K) get the values after the largest declared one.

    Args:
        mask_labels: ``{name: value}`` as declared (``table.mask_labels``).
        num_classes: ``data.num_classes`` (None: the number of declared values).

    Raises:
        ConfigError: the values must be mapped but 0 (background) is not the lowest of them, or
            ``num_classes`` is below the number of declared values.
    """
    if not mask_labels:
        return None
    values = sorted({int(v) for v in mask_labels.values()})
    if values == list(range(len(values))) or (num_classes is not None and num_classes > values[-1]):
        return None
    shown = "{" + ", ".join(str(v) for v in values) + "}"
    if values[0] != 0:
        raise ConfigError("mask_labels", f"declares the values {shown} without background 0 as the lowest",
                          "declare background: 0 (the class the metrics leave out) and positive values for the others")
    k = len(values)
    if num_classes is not None and num_classes < k:
        raise ConfigError("data.num_classes", f"is {num_classes}, but mask_labels declare {k} values {shown}",
                          f"remove data.num_classes or set it to at least {k}")
    n = k if num_classes is None else num_classes
    return values + [values[-1] + 1 + j for j in range(n - k)]


def values_to_classes(mask: np.ndarray, values: Sequence[int] | None, path: str = "mask") -> np.ndarray:
    """A label map's file values -> class indices (int64) by :func:`label_class_values`' ``values``
    (None: as stored).

    Raises:
        DataError: a value that no class has (naming ``path``).
    """
    if values is None:
        return mask
    table = np.asarray(values, dtype=np.int64)
    pos = np.clip(np.searchsorted(table, mask), 0, len(table) - 1)
    hit = table[pos] == mask
    if not hit.all():
        bad = sorted({float(v) for v in np.unique(np.asarray(mask)[~hit])[:10].tolist()})
        raise DataError(path, f"holds label values {{{', '.join(f'{v:g}' for v in bad)}}} that no class has "
                        f"(the classes are the values {{{', '.join(str(v) for v in values)}}})",
                        "declare every mask value (mask_labels), or remap the label file")
    return pos.astype(np.int64)


def classes_to_values(labels: np.ndarray, values: Sequence[int] | None) -> np.ndarray:
    """Class indices -> the label-file values (the inverse of :func:`values_to_classes`; None: as they are)."""
    if values is None:
        return labels
    return np.asarray(values, dtype=np.int64)[np.asarray(labels, dtype=np.int64)]


def label_file_dtype(values: Sequence[int] | None, num_classes: int) -> type:
    """The smallest unsigned dtype for a written label map: uint8 up to 255, then uint16, else int32."""
    top = int(values[-1]) if values else int(num_classes) - 1
    return np.uint8 if top <= 255 else np.uint16 if top <= 65535 else np.int32
