"""The text prompt of each text_seg record (seed 002, Talk2MedSAM): a free ``text`` column, or
attribute columns filled into ``data.params.text_template``; and the up-front checks that every case
of a table can be given its text (:func:`check_text_fields`), run before a split is saved or a pixel
is read, so a template typo or a renamed column is one line naming the key, the field and the
columns, not a late error on one slice record.
"""

from __future__ import annotations

import csv
import string
from pathlib import Path
from typing import Any

from medfuse.errors import ConfigError, DataError

__all__ = ["case_fields", "check_text_fields", "missing_text_field", "render_text", "row_where", "template_fields"]


def case_fields(case: Any) -> dict[str, str]:
    """A case's text fields, as its records get them: the manifest's other columns (the layout's
    fields for BUS-BRA and NSCLC), ``text`` and ``label``; empty cells are ``""``."""
    fields = {str(k): "" if v is None else str(v) for k, v in case.extra.items()}
    if case.text is not None:
        fields["text"] = case.text
    if case.label is not None:
        fields.setdefault("label", str(case.label))
    return fields


def template_fields(template: str) -> list[str]:
    """The field names of a text template (``"{birads} lesion"`` -> ``["birads"]``)."""
    return [name for _, name, _, _ in string.Formatter().parse(template) if name]


def missing_text_field(fields: dict[str, str], template: str | None) -> str | None:
    """The first field a text needs that ``fields`` leaves empty (``text`` without a template), or None."""
    if template is None:
        return None if fields.get("text", "").strip() else "text"
    return next((f for f in template_fields(template) if fields.get(f, "") == ""), None)


def render_text(rec: Any, template: str | None, fields: dict[str, str] | None = None) -> str:
    """The prompt of a record (:class:`~medfuse.families.text_seg.data.Record`): ``template`` filled
    from its fields (or ``fields``), or its ``text`` field."""
    fields = rec.fields if fields is None else fields
    missing = missing_text_field(fields, template)
    if missing == "text" and template is None:
        raise DataError(rec.case_id, "has no text", "fill the text column or set data.params.text_template")
    if missing is not None:
        raise DataError(rec.case_id, f"has no value for '{missing}' used by data.params.text_template",
                        f"fill the {missing} column or change the template")
    return template.format(**fields) if template is not None else fields["text"]


def row_where(table: Any, index: int) -> str:
    """Where case ``index`` of a table is written: the manifest's line, else the line of the layout's
    CSV (BUS-BRA's ``bus_data.csv``, NSCLC's clinical CSV) whose cell holds the case's id (or,
    failing that, its patient id), else the table's source."""
    from medfuse.data.layouts.load import case_where

    source = table.source
    if table.layout == "manifest" or source is None or Path(source).suffix.lower() != ".csv":
        return case_where(table, index)
    case = table.cases[index]
    try:
        with open(source, newline="", encoding="utf-8-sig") as f:
            reader, start, rows = csv.reader(f), 1, []
            for row in reader:
                rows.append((start, {cell.strip() for cell in row}))
                start = reader.line_num + 1
    except (OSError, UnicodeDecodeError, csv.Error):
        return str(source)
    for key in (case.case_id, case.patient_id):
        line = next((n for n, cells in rows[1:] if key in cells), None)
        if line is not None:
            return f"{source} (line {line})"
    return str(source)


def check_text_fields(table: Any, template: str | None) -> None:
    """Refuse, before any pixel is read, a table whose cases cannot all be given their text.

    A template field that no case has a value for (a typo such as ``{histolgy}``, a renamed or
    missing CSV column) is one line naming ``data.params.text_template``, the field and the table's
    columns; a case whose value is empty is one line naming the table's file and line (or the
    case) and the field. Without a template every case needs its ``text`` column.

    Raises:
        ConfigError: a field that no case fills.
        DataError: the first case with an empty field.
    """
    import difflib

    filled: dict[str, bool] = {}  # column -> some case has a value
    for c in table.cases:
        for k, v in case_fields(c).items():
            filled[k] = filled.get(k, False) or v.strip() != ""
    name = Path(table.source or table.root).name
    for field in template_fields(template) if template is not None else ["text"]:
        if filled.get(field):
            continue
        if template is None:
            raise ConfigError("data.params.text_template", f"is not set, and no case of {name} has a text",
                              "add a text column, or set data.params.text_template to fill the text from columns "
                              "(e.g. '{birads} lesion, {margin} margins')")
        close = difflib.get_close_matches(field, list(filled), n=1)
        absent = field not in filled
        raise ConfigError("data.params.text_template", f"field '{field}' is "
                          f"{'not a column' if absent else 'empty in every row'} of {name} "
                          f"({f'did you mean {close[0]!r}? ' if close and absent else ''}columns: {', '.join(filled)})",
                          f"name one of these columns in the template, or add a '{field}' column" if absent else
                          f"fill the {field} column, or name another column in the template")
    for i, c in enumerate(table.cases):
        missing = missing_text_field(case_fields(c), template)
        if missing is not None:
            raise DataError(row_where(table, i), f"case {c.case_id} has no value for '{missing}'"
                            + (" used by data.params.text_template" if template is not None else ""),
                            f"fill its {missing} cell in {name}"
                            + (", or change data.params.text_template" if template is not None else ""))
