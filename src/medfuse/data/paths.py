"""Case ids are names, never paths; every output file is built inside its root or refused.

A case id becomes part of output file names (``predictions/test/<case_id>.nii.gz``,
``plots/overlay_<case_id>.png``, ``<out>/<case_id>_pred.nii.gz``). So that a manifest row can never
make medfuse write outside the run or output folder, two rules hold everywhere:

* :func:`check_case_id`: a case id is 1 to 128 characters from ``A-Z a-z 0-9 . _ -`` and starts
  with a letter or a digit (:data:`CASE_ID_RULE`). Ids are checked once, where cases are loaded
  (:func:`medfuse.data.layouts.load_cases`, and where ``medfuse predict`` names a case after its
  input file); ``medfuse data check`` reports every bad id on its own line.
* :func:`output_path`: every writer (evaluators, predictors, plots) builds its file paths with it.
  It joins the parts under the root, resolves the result (following symbolic links) and refuses
  any path that is not inside the resolved root, and any part that is absolute, empty or ``..``.

:func:`output_dir` prepares an output folder (``--out``, the run directory): it must be a folder
(not an existing file) that medfuse can write into.
"""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path

from medfuse.errors import DataError, RunDirError

CASE_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
CASE_ID_RULE = "1-128 characters from A-Z a-z 0-9 . _ - starting with a letter or digit"
CASE_ID_FIX = f"rename the case: a case id is {CASE_ID_RULE} (it becomes part of output file names)"


def case_id_problem(case_id: object) -> str | None:
    """Why ``case_id`` is not a valid case id, or None when it is."""
    text = str(case_id)
    if CASE_ID_PATTERN.fullmatch(text):
        return None
    # readable characters as they are (a user must recognise their own id: 'rec 001 ü'); control
    # characters and undecodable bytes (surrogates) escaped, so the line stays one printable line
    shown = "".join(ch if ch.isprintable() else ch.encode("unicode_escape", "backslashreplace").decode("ascii")
                    for ch in text)
    shown = shown if len(shown) <= 60 else shown[:57] + "..."
    if not text:
        return "the case id is empty"
    if "/" in text or "\\" in text or text.startswith("."):
        return f"case id '{shown}' looks like a path"
    if len(text) > 128:
        return f"case id '{shown}' is longer than 128 characters"
    return f"case id '{shown}' has characters outside A-Z a-z 0-9 . _ -"


def check_case_id(case_id: object, where: str | Path) -> str:
    """``case_id`` as a string, or a :class:`DataError` naming ``where`` (a file, a manifest line)."""
    problem = case_id_problem(case_id)
    if problem is not None:
        raise DataError(where, problem, CASE_ID_FIX)
    return str(case_id)


def output_path(root: str | Path, *parts: str) -> Path:
    """``root/part/...`` when it lies inside ``root``, else a one-line :class:`DataError`.

    Args:
        root: the folder the file must stay in (the run directory, ``--out``, a plots folder).
        parts: relative path parts, e.g. ``f"{case_id}_pred.nii.gz"``; each may hold ``/`` for
            sub-folders but none may be absolute or climb with ``..``.

    Returns:
        The joined path (not resolved, so messages show what the user gave).
    """
    root = Path(root)
    rel = Path(*parts) if parts else Path(".")
    bad = not parts or any(p in ("", ".") for p in parts) or rel.is_absolute() or rel.drive \
        or ".." in rel.parts or "\x00" in str(rel)
    path = root / rel
    if not bad:
        base = root.resolve()
        target = path.resolve()
        bad = target == base or not target.is_relative_to(base)
    if bad:
        shown = str(rel).encode("utf-8", "backslashreplace").decode("ascii", "backslashreplace")
        raise DataError(root, f"refusing to write '{shown}': it is not a file name inside this folder",
                        CASE_ID_FIX)
    return path


def output_dir(path: str | Path, what: str = "output folder") -> Path:
    """Create ``path`` (with parents) and check that files can be written into it.

    Raises:
        RunDirError: ``path`` (or a parent) is an existing file, or the folder cannot be created or
            written (read-only, no permission).
    """
    p = Path(path)
    for parent in (p, *p.parents):
        if parent.exists() and not parent.is_dir():
            raise RunDirError(parent, f"is a file, not a folder (the {what} must be a folder)",
                              "pass a folder path (a new or an existing folder)")
    try:
        p.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=p, prefix=".medfuse-write-test.")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise RunDirError(p, f"cannot write into the {what} ({e.strerror or type(e).__name__})",
                          "choose a folder you can write to, or fix its permissions") from None
    return p
