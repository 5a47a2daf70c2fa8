"""Atomic file writes shared by every layer that writes run files (configs, checkpoints, logs, reports).

A file is written to a temporary name in its own folder and moved over the target with
``os.replace``, so a reader never sees half a file and a crash leaves the old one intact. The
temporary file is given the mode a plain ``open`` would have made (``0666 & ~umask``: 0644 under
the usual umask 022), not ``mkstemp``'s 0600.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any


@contextmanager
def atomic_open(path: str | Path, mode: str = "w", *, fsync: bool = False, **kwargs: Any) -> Iterator[IO[Any]]:
    """Open ``path`` for writing through a temporary file; the target appears when the block ends.

    Args:
        path: the target file (its folder is created).
        mode: ``"w"`` or ``"wb"``.
        fsync: flush the data to disk before the move (checkpoints).
        **kwargs: passed to ``open`` (``encoding``, ``newline``).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode, **kwargs) as f:
            yield f
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
