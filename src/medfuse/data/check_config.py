"""``medfuse data check PATH --config CONFIG``: the dataset loaded as the run of a config loads it.

:func:`config_table` loads the table through :func:`medfuse.data.datamodule.load_table` (train's own
loader) with :func:`medfuse.data.checks.validate_table` collecting its problems instead of raising
the first; :func:`modality_problems` reports cases without some of the run's modalities. The
rest of the check (every per-case rule, under the config's ``data.dicom``) is
:func:`medfuse.data.checks.check_dataset`.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from medfuse.data.checks import _COLLECT, Problem
from medfuse.data.dicom import use_dicom_options
from medfuse.data.layouts import CaseTable, case_where
from medfuse.errors import ConfigError, MedfuseError

if TYPE_CHECKING:
    from medfuse.config import Config


def config_table(cfg: Config, path: str | Path | None = None,
                 layout: str | None = None) -> tuple[CaseTable | None, list[Problem]]:
    """Load a dataset as the run of ``cfg`` loads it, collecting its table-wide problems.

    The table comes from :func:`medfuse.data.datamodule.load_table` (train's own loader: layout,
    ``data.modalities``, ``data.class_names``, ``data.label_map``, class-name labels as indices, the
    classification label rules), with :func:`validate_table` collecting instead of raising.

    Args:
        cfg: the run config, ``task`` resolved.
        path: the dataset (default: ``data.root``).
        layout: the layout (default: ``data.layout``).

    Returns:
        (the table, its table-wide problems), or (None, the one problem that stopped the load).
    """
    from medfuse.data.datamodule import load_table
    from medfuse.data.paths import CASE_ID_FIX

    if path is not None and not Path(path).exists():  # the same line as without a config
        return None, [Problem(str(Path(path).absolute()), "layout", "does not exist",
                              "pass a manifest file or a dataset folder")]
    data = {"root": str(path) if path is not None else cfg.data.root, "layout": layout or cfg.data.layout}
    cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update=data)})
    sink: list[Problem] = []
    token = _COLLECT.set(sink)
    try:
        with use_dicom_options(cfg.data.dicom):  # load_table sets data.dicom; it goes no further than here
            return load_table(cfg), sink
    except MedfuseError as e:  # what train stops at (one line): a case id, data.label_map, a modality column
        rule = ("config" if isinstance(e, ConfigError) and e.where.startswith("data.") else
                "case-id" if e.fix == CASE_ID_FIX else "layout")
        return None, [Problem(str(e.where), rule, e.problem, e.fix)]
    finally:
        _COLLECT.reset(token)


def modality_problems(table: CaseTable) -> list[Problem]:
    """A case that has some of the run's modalities but not all (``missing``; table order).

    Train refuses such a case (:meth:`medfuse.data.datamodule.CaseDataModule.setup`; it used to
    read the absent modality as zeros) and ``medfuse predict`` refuses it, so a run config's data
    check reports it (families built for partial inputs skip this rule).
    """
    problems = []
    for i, c in enumerate(table.cases):
        missing = [m for m in table.modalities if not c.images.get(m)]
        if missing and len(missing) < len(table.modalities):  # no image at all: the per-case rule says so
            problems.append(Problem(
                case_where(table, i), "missing",
                f"case '{c.case_id}' has no {' / '.join(repr(m) for m in missing)} image of the run's modalities "
                f"({', '.join(table.modalities)})",
                f"give the case every modality ({', '.join(table.modalities)}), or drop it (incomplete_seg "
                "trains on cases with missing modalities)",
                case_id=c.case_id))
    return problems
