"""``medfuse data check PATH --config CONFIG``: the dataset loaded as the run of a config loads it.

:func:`config_table` loads the table through :func:`medfuse.data.datamodule.load_table` (train's own
loader) with :func:`medfuse.data.checks.validate_table` collecting its problems instead of raising
the first, and :func:`~medfuse.data.rules.modality_problems` reports cases without some of the
run's modalities, and a segmentation run's ``data.num_classes`` declares the mask values of a
dataset that declares none (train refuses other values when it reads them); a family data module
that refuses tables of its own (``table_problems(cfg, table) -> list[Problem]``, a classmethod of the
family's ``Family.datamodule``, e.g. the context_seg family's ``data.params.classes`` against the
classes its CellMap crops annotate) reports those too. :func:`check_as_run` / :func:`run_check_as_run`
then run every per-case rule of :func:`medfuse.data.checks.check_dataset` under the config's
``data.dicom``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from medfuse.data.checks import Problem, check_dataset, run_check
from medfuse.data.dicom import use_dicom_options
from medfuse.data.layouts import CaseTable
from medfuse.data.rules import modality_problems
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
    try:
        with use_dicom_options(cfg.data.dicom):  # load_table sets data.dicom; it goes no further than here
            return load_table(cfg, collect=sink), sink
    except MedfuseError as e:  # what train stops at (one line): a case id, data.label_map, a modality column
        rule = ("config" if isinstance(e, ConfigError) and e.where.startswith("data.") else
                "case-id" if e.fix == CASE_ID_FIX else "layout")
        return None, [Problem(str(e.where), rule, e.problem, e.fix)]


TableProblems = Callable[["Config", CaseTable], list[Problem]]


def family_table_problems(cfg: Config) -> TableProblems | None:
    """The ``table_problems`` hook of the config's family data module (``Family.datamodule``), if any."""
    from medfuse.registry import FAMILIES

    if not cfg.family or cfg.family not in FAMILIES:
        return None
    return getattr(FAMILIES.get(cfg.family).datamodule, "table_problems", None)


def _load_as_run(cfg: Config, path: str | Path | None, layout: str | None,
                 partial_modalities: bool, table_problems: TableProblems | None = None,
                 ) -> tuple[CaseTable | None, list[Problem]]:
    from medfuse.data.datamodule import mask_values, run_mask_values

    table, issues = config_table(cfg, path, layout)
    if table is None:
        return table, issues
    if not partial_modalities:
        issues += modality_problems(table)
    hook = table_problems or family_table_problems(cfg)
    if hook is not None:  # what the family's data module refuses in the table (train stops there)
        issues += hook(cfg, table)
    values = run_mask_values(table, cfg)
    if values is not None and mask_values(table) is None:  # data.num_classes declares them: the `label` rule
        table = dataclasses.replace(table, mask_labels={str(v): v for v in values})
    return table, issues


def check_as_run(cfg: Config, path: str | Path | None = None, layout: str | None = None,
                 partial_modalities: bool = False, max_cases: int | None = None,
                 table_problems: TableProblems | None = None) -> list[Problem]:
    """Every rule of :func:`~medfuse.data.checks.check_dataset` on the dataset as the run of ``cfg``
    reads it: DICOM under its ``data.dicom``, the table from :func:`config_table`, plus
    :func:`~medfuse.data.rules.modality_problems` unless the family takes partial inputs.

    Args:
        cfg: the run config, ``family`` and ``task`` resolved (``medfuse.engine.build.resolve``).
        path, layout: the dataset and its layout (defaults: ``data.root``, ``data.layout``).
        partial_modalities: the family takes cases without some of its modalities.
        max_cases: as for :func:`~medfuse.data.checks.check_dataset`.
        table_problems: the family data module's table rules (default: the ``table_problems``
            classmethod of the config's ``Family.datamodule``, when it has one).
    """
    with use_dicom_options(cfg.data.dicom):
        table, issues = _load_as_run(cfg, path, layout, partial_modalities, table_problems)
        return check_dataset(path, max_cases=max_cases, table=table, table_issues=issues)


def run_check_as_run(cfg: Config, path: str | Path | None = None, layout: str | None = None,
                     partial_modalities: bool = False, settings: str | None = None, console=None,
                     table_problems: TableProblems | None = None) -> int:
    """:func:`~medfuse.data.checks.run_check` of :func:`check_as_run` (``medfuse data check --config``)."""
    with use_dicom_options(cfg.data.dicom):
        table, issues = _load_as_run(cfg, path, layout, partial_modalities, table_problems)
        return run_check(path, console=console, cfg=cfg, settings=settings, table=table, table_issues=issues)
