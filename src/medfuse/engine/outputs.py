"""What ``medfuse predict`` keeps in its output folder besides the predictions, so that predicting
case after case into one folder loses nothing.

* ``inputs.csv`` (:func:`record_inputs`): which files each case id was predicted from. Outputs are
  named by case id, so a second case with the same id from other files (two patients' series
  folders both called ``T2W_AX``) would replace the first one's outputs without a word; it is
  refused before anything is written, naming the id and both inputs. The same case predicted
  again from the same files simply replaces its outputs. A case is recorded once its files have
  been read, just before its outputs are written: a refused case leaves no record.
* ``predictions.csv`` (:func:`write_rows`): one row per case; the rows of earlier runs for other
  cases are kept, a case predicted again gets its row replaced.
* ``embeddings.npz`` (:func:`write_embeddings`): case ids and their embeddings, merged by case
  the same way.
* ``refused.csv`` (:func:`record_refused`, ``medfuse predict --skip-refused``): one row per case that
  could not be predicted (case id, file, problem, fix), merged the same way; a case predicted in a
  later run leaves it (the file goes when no row is left).
"""

from __future__ import annotations

import csv
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from medfuse.data.paths import output_path
from medfuse.errors import DataError
from medfuse.fileio import atomic_open

INPUTS = "inputs.csv"
REFUSED = "refused.csv"


def _read(path: Path) -> tuple[list[str], list[list[str]]]:
    """(header, rows) of a CSV written here; ([], []) when the file does not exist."""
    if not path.exists():
        return [], []
    try:
        with path.open(newline="", encoding="utf-8") as f:
            rows = [r for r in csv.reader(f) if r]
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise DataError(path, f"cannot be read ({e})", "remove it, or write to another --out folder") from e
    return (rows[0], rows[1:]) if rows else ([], [])


def check_inputs(out_dir: Path, cases: Mapping[str, Mapping[str, str]]) -> dict[str, dict[str, str]]:
    """Refuse a case id that ``out_dir`` already holds from other files; write nothing.

    Args:
        out_dir: the output folder.
        cases: case id -> {modality: input path} of this run.

    Returns:
        What ``inputs.csv`` holds once ``cases`` are recorded (case id -> {modality: resolved path}).

    Raises:
        DataError: naming the case id, the earlier and the new inputs, and the fix.
    """
    path = output_path(out_dir, INPUTS)
    header, rows = _read(path)
    if rows and header != ["case_id", "modality", "path"]:
        raise DataError(path, f"has columns {header}, not a medfuse predict record",
                        "write to another --out folder")
    known: dict[str, dict[str, str]] = {}
    for cid, modality, p in (r[:3] for r in rows if len(r) >= 3):
        known.setdefault(cid, {})[modality] = p
    new = {str(cid): {str(m): str(Path(p).resolve()) for m, p in files.items() if p} for cid, files in cases.items()}
    for cid, files in new.items():
        if cid in known and known[cid] != files:
            before = ", ".join(sorted(known[cid].values()))
            raise DataError(output_path(out_dir, cid), f"case {cid} was predicted into this folder from {before}; "
                            f"now it comes from {', '.join(sorted(files.values()))}, which would replace it",
                            "name this case with --case-id, or write to another --out folder")
    known.update(new)
    return known


def record_inputs(out_dir: Path, cases: Mapping[str, Mapping[str, str]]) -> None:
    """Refuse a case id that ``out_dir`` already holds from other files (:func:`check_inputs`), then
    record ``cases``.

    Args:
        out_dir: the output folder.
        cases: case id -> {modality: input path} of this run.

    Raises:
        DataError: naming the case id, the earlier and the new inputs, and the fix.
    """
    known = check_inputs(out_dir, cases)
    with atomic_open(output_path(out_dir, INPUTS), "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["case_id", "modality", "path"])
        for cid in sorted(known):
            for m, p in known[cid].items():
                w.writerow([cid, m, p])


def record_refused(out_dir: Path, refused: Sequence[tuple[str, DataError]], predicted: Iterable[str]) -> Path | None:
    """Update ``refused.csv``: add (or replace) a row per refused case and drop the rows of the cases
    this run predicted; the file is removed when no row is left (and not created for none).

    Args:
        out_dir: the output folder.
        refused: (case id, the error that refused it) of this run.
        predicted: the case ids this run predicted.

    Returns:
        The file, or None when it holds no row.
    """
    path = output_path(out_dir, REFUSED)
    if not refused and not path.exists():
        return None
    rows = [[cid, e.where, e.problem, e.fix] for cid, e in refused]
    if write_rows(path, ["case_id", "file", "problem", "fix"], rows, drop=predicted) == 0:
        path.unlink()
        return None
    return path


def write_rows(path: Path, header: Sequence[str], rows: Sequence[Sequence[Any]], drop: Iterable[str] = ()) -> int:
    """Write ``rows`` (first column: case id) to the CSV ``path``, keeping the rows an earlier run wrote
    there for other cases (a case predicted again gets its new row) except those of the case ids in
    ``drop``; return the number of rows the file holds.

    Raises:
        DataError: ``path`` holds other columns (another kind of run wrote it).
    """
    header = [str(h) for h in header]
    old_header, old = _read(path)
    if old and old_header != header:
        raise DataError(path, f"holds other columns ({', '.join(old_header)}) than this run's predictions "
                        f"({', '.join(header)})", "write to another --out folder")
    ids = {str(r[0]) for r in rows} | {str(c) for c in drop}
    kept = [r for r in old if r and r[0] not in ids]
    with atomic_open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(kept)
        w.writerows([[str(v) for v in r] for r in rows])
    return len(kept) + len(rows)


def write_embeddings(path: Path, case_ids: Sequence[str], emb: np.ndarray) -> None:
    """Write ``case_id`` (N,) and ``image_emb`` (N, E) to the ``.npz`` file ``path``, keeping the rows an
    earlier run wrote there for other cases (a case predicted again gets its new row).

    Raises:
        DataError: ``path`` is not such a file, or holds embeddings of another width.
    """
    ids = [str(c) for c in case_ids]
    if path.exists():
        try:
            with np.load(path, allow_pickle=False) as old:  # never unpickles
                old_ids, old_emb = [str(c) for c in old["case_id"]], np.asarray(old["image_emb"])
        except (OSError, ValueError, KeyError) as e:
            raise DataError(path, f"is not an embeddings file of medfuse predict ({type(e).__name__})",
                            "write to another --out folder") from None
        if old_emb.ndim != 2 or old_emb.shape[1] != emb.shape[1]:
            raise DataError(path, f"holds embeddings of shape {tuple(old_emb.shape)}, this run's are {emb.shape[1]} wide",
                            "write to another --out folder")
        keep = [i for i, c in enumerate(old_ids) if c not in set(ids)]
        ids = [old_ids[i] for i in keep] + ids
        emb = np.concatenate([old_emb[keep].astype(emb.dtype), emb])
    with atomic_open(path, "wb") as f:
        np.savez(f, case_id=np.asarray(ids), image_emb=emb)
