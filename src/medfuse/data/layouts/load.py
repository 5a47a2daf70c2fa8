"""Detecting a dataset's layout and reading it: :func:`load_cases`."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from medfuse.data.layouts.brats import brats_case_dirs, load_brats
from medfuse.data.layouts.busbra import BUSBRA_CSV, load_busbra
from medfuse.data.layouts.cases import LAYOUTS, CaseTable
from medfuse.data.layouts.cellmap import cellmap_containers, load_cellmap
from medfuse.data.layouts.ctrate import ctrate_reports, load_ctrate
from medfuse.data.layouts.manifest import MANIFEST_NAMES, load_manifest
from medfuse.data.layouts.msd import load_msd
from medfuse.data.layouts.nnunet import dataset_json_kind, load_nnunet
from medfuse.data.layouts.nsclc import load_nsclc, nsclc_csv
from medfuse.data.layouts.omniabnorm import load_omniabnorm, omniabnorm_json
from medfuse.errors import ConfigError, DataError

LOADERS = {"manifest": load_manifest, "nnunet": load_nnunet, "msd": load_msd, "brats": load_brats,
           "busbra": load_busbra, "cellmap": load_cellmap, "nsclc": load_nsclc, "ctrate": load_ctrate,
           "omniabnorm": load_omniabnorm}
"""Layout name -> reader (the source :func:`load_cases` detected -> :class:`CaseTable`)."""
_LOOKED_FOR = (
    "a manifest (.csv/.json file, or manifest.csv/manifest.json in the folder), a dataset.json of "
    "nnU-Net v2 (channel_names + file_ending) or MSD (training + modality), or BraTS case folders "
    "(<case>/<case>_flair.nii.gz or <case>/<case>-t2f.nii.gz), BUS-BRA (bus_data.csv), CellMap "
    "(<ds>.zarr/recon-*/labels/groundtruth/crop*), NSCLC-Radiogenomics (clinical CSV with Case ID + patient "
    "folders), CT-RATE (a reports CSV with VolumeName, Findings_EN) or OmniAbnorm-CT (a JSON of records)"
)


def load_cases(path: str | Path, layout: str = "auto", modalities: list[str] | None = None,
               check_ids: bool = True) -> CaseTable:
    """Read a dataset description into a :class:`CaseTable` (no image is opened).

    Args:
        path: a manifest file, a ``dataset.json``, or a dataset folder.
        layout: ``"auto"`` (detect) or one of :data:`LAYOUTS`.
        modalities: keep only these modalities, in this order (default: all).
        check_ids: refuse a case id that is not a name (:func:`medfuse.data.paths.check_case_id`);
            ``medfuse data check`` passes False and reports every bad id on its own line.

    Raises:
        DataError: the path matches no layout, its description is incomplete or invalid, or a case
            id is not a name (the line names the manifest row).
        ConfigError: ``layout`` is not a known layout name.
    """
    path = Path(path).absolute()
    if layout not in ("auto", *LAYOUTS):
        raise ConfigError("layout", f"unknown layout '{layout}'", f"use one of auto, {', '.join(LAYOUTS)}")
    if not path.exists():
        raise DataError(path, "does not exist", "pass a manifest file or a dataset folder")
    found, source = _detect(path, layout)
    table = LOADERS[found](source)
    if check_ids:
        from medfuse.data.paths import check_case_id

        for i, c in enumerate(table.cases):
            check_case_id(c.case_id, case_where(table, i))
    if modalities is not None:
        _select_modalities(table, modalities)
    return table


def case_where(table: CaseTable, index: int) -> str:
    """Where case ``index`` of ``table`` is described: the manifest line or row, else the source."""
    source = table.source or table.root
    if table.layout == "manifest" and table.source is not None:
        csv_file = table.source.suffix.lower() == ".csv"
        return f"{source} ({'line' if csv_file else 'case'} {index + 2 if csv_file else index + 1})"
    return str(source)


def _detect(path: Path, layout: str) -> tuple[str, Path]:
    """Return (layout, source) where source is the describing file (or the BraTS root)."""
    if path.is_file():
        if path.suffix.lower() == ".csv":
            found = "manifest"
        elif path.suffix.lower() == ".json":
            found = dataset_json_kind(path) or ("omniabnorm" if layout in ("auto", "omniabnorm") and omniabnorm_json(path)
                                         else "manifest")
        else:
            raise DataError(
                path,
                f"is not a dataset description; looked for {_LOOKED_FOR}",
                "pass a .csv/.json manifest, a dataset.json, or the dataset folder",
            )
        if layout not in ("auto", found):
            raise DataError(
                path, f"is a {found} description, not layout '{layout}'", f"use --layout {found} or auto"
            )
        return found, path
    for kind, source in _candidates(path, layout):
        if layout in ("auto", kind):
            return kind, source
    wanted = _LOOKED_FOR if layout == "auto" else f"a dataset of layout '{layout}'"
    raise DataError(
        path,
        f"matches no dataset layout; looked for {wanted}",
        "point at the dataset folder or its manifest/dataset.json (see docs/data-formats.md)",
    )


def _candidates(path: Path, layout: str) -> Iterator[tuple[str, Path]]:
    """Layouts a folder matches, most specific first (a manifest wins over a dataset.json beside it)."""
    if layout in ("auto", "manifest"):
        yield from (("manifest", path / n) for n in MANIFEST_NAMES if (path / n).is_file())
    if layout in ("auto", "nnunet", "msd") and (path / "dataset.json").is_file():
        kind = dataset_json_kind(path / "dataset.json")
        if kind:
            yield kind, path / "dataset.json"
    if layout in ("auto", "brats") and brats_case_dirs(path):
        yield "brats", path
    if layout in ("auto", "busbra") and (path / BUSBRA_CSV).is_file():
        yield "busbra", path
    if layout in ("auto", "cellmap") and cellmap_containers(path):
        yield "cellmap", path
    if layout in ("auto", "nsclc") and (csv := nsclc_csv(path)) is not None:
        yield "nsclc", csv
    if layout in ("auto", "ctrate") and ctrate_reports(path):
        yield "ctrate", path
    if layout in ("auto", "omniabnorm") and (js := omniabnorm_json(path)) is not None:
        yield "omniabnorm", js


def _select_modalities(table: CaseTable, wanted: list[str]) -> None:
    """Restrict and reorder ``table`` to ``wanted`` (exact, then case-insensitive match); a modality
    matched case-insensitively takes the wanted name (a run trained on ``T1`` reads a manifest's
    ``image_t1`` as ``T1``)."""
    lower = {m.lower(): m for m in table.modalities}
    chosen = []
    for m in wanted:
        name = m if m in table.modalities else lower.get(m.lower())
        if name is None:
            raise DataError(
                table.source or table.root,
                f"has no {f'image column image_{m} for modality' if table.layout == 'manifest' else 'modality'} "
                f"'{m}' (it has: {', '.join(table.modalities)})",
                "pass modalities that the dataset provides",
            )
        chosen.append(name)
    table.modalities = list(wanted)
    for c in table.cases:
        c.images = {w: c.images[m] for w, m in zip(wanted, chosen, strict=True) if m in c.images}
        c.channel_index = {w: c.channel_index[m] for w, m in zip(wanted, chosen, strict=True) if m in c.channel_index}
