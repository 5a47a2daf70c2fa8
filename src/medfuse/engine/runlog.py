"""The CSV run log (``metrics.csv``): kept across resumes, cut back to a checkpoint, merged over stages.

* :class:`HistoryCSVLogger` (with :class:`HistoryWriter`): Lightning's CSV logger, but it appends
  to an existing ``metrics.csv`` instead of deleting it;
* :func:`stage_log`: where a run or one stage of a staged run logs;
* :func:`prepare_log`: before a fit, drop the rows of epochs a resumed checkpoint does not hold;
* :func:`merge_stage_logs`: concatenate the stages' logs into the run's ``metrics.csv``.

The trainer (:mod:`medfuse.engine.trainer`) uses these; only global rank 0 writes.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment

from medfuse.fileio import atomic_open


class HistoryWriter(ExperimentWriter):
    """Lightning's CSV writer, but it appends to an existing ``metrics.csv`` instead of deleting it."""

    def __init__(self, log_dir: str) -> None:
        super().__init__(log_dir)
        if os.path.isfile(self.metrics_file_path):
            with open(self.metrics_file_path, newline="", encoding="utf-8") as f:
                self.metrics_keys = list(csv.DictReader(f).fieldnames or [])

    def _check_log_dir_exists(self) -> None:  # keep the history (Lightning deletes the file here)
        return

    def _record_new_keys(self) -> set[str]:
        """New keys go after the file's columns (Lightning re-sorts them all, which would misalign
        rows appended under an existing header)."""
        new = set().union(*self.metrics) - set(self.metrics_keys)
        self.metrics_keys.extend(sorted(new))
        return new

    def _rewrite_with_new_header(self, fieldnames: list[str]) -> None:
        path = Path(self.metrics_file_path)
        with path.open(newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
        _write_csv_atomic(path, list(fieldnames), rows)


class HistoryCSVLogger(CSVLogger):
    """``CSVLogger`` whose ``metrics.csv`` survives a resume (see :func:`prepare_log`)."""

    @property
    @rank_zero_experiment
    def experiment(self) -> HistoryWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = HistoryWriter(log_dir=self.log_dir)
        return self._experiment


def stage_log(run_dir: Path, stage: str | None) -> Path:
    """The CSV log of a run (``metrics.csv``) or of one stage (``stages/<stage>/metrics.csv``)."""
    return run_dir / "stages" / stage / "metrics.csv" if stage else run_dir / "metrics.csv"


def prepare_log(path: Path, resume_epoch: int | None) -> None:
    """Make the CSV log ready for a fit: keep rows up to ``resume_epoch`` (the checkpoint's epoch),
    drop the rows of epochs the checkpoint does not hold (they are logged again), or start afresh
    (``None``: no checkpoint to continue from). The file is rewritten atomically."""
    from medfuse.engine.lock import is_rank_zero

    if not path.is_file() or not is_rank_zero():
        return
    if resume_epoch is None:
        path.unlink()
        return
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        fields = list(reader.fieldnames or [])
        rows = list(reader)

    def kept(r: dict[str, str]) -> bool:
        e = r.get("epoch")
        try:
            return e in (None, "") or int(float(e)) <= resume_epoch
        except ValueError:
            return True

    keep = [r for r in rows if kept(r)]
    if len(keep) == len(rows):
        return
    _write_csv_atomic(path, fields, keep)


def _write_csv_atomic(path: Path, fields: list[str], rows: list[dict[str, Any]]) -> None:
    with atomic_open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=fields, restval="", extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)


def merge_stage_logs(run_dir: Path, stages: list[str]) -> Path | None:
    """Concatenate the stages' CSV logs into ``run_dir/metrics.csv`` with a ``stage`` column.

    Epochs continue across stages (stage 2's epoch 0 follows stage 1's last epoch), so the training
    curves of a staged run read as one run. Returns the merged file, or None when no stage logged.
    """
    import csv

    rows: list[dict[str, str]] = []
    fields: list[str] = ["stage"]
    offset = 0
    for name in stages:
        path = run_dir / "stages" / name / "metrics.csv"
        if not path.is_file():
            continue
        with path.open(newline="", encoding="utf-8") as f:
            part = list(csv.DictReader(f))
        last = -1
        for r in part:
            if r.get("epoch") not in (None, ""):
                last = max(last, int(float(r["epoch"])))
                r["epoch"] = str(int(float(r["epoch"])) + offset)
            rows.append({"stage": name, **r})
            fields += [k for k in r if k not in fields]
        offset += last + 1
    if not rows:
        return None
    out = run_dir / "metrics.csv"
    _write_csv_atomic(out, fields, rows)
    return out
