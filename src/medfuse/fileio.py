"""Atomic file writes shared by every layer that writes run files (configs, checkpoints, logs, reports).

A file is written to a temporary name in its own folder and moved over the target with
``os.replace``, so a reader never sees half a file and a crash leaves the old one intact. The
temporary file is given the mode a plain ``open`` would have made (``0666 & ~umask``: 0644 under
the usual umask 022), not ``mkstemp``'s 0600.

:func:`claim` gives a cache entry one writer across processes (DDP ranks, data-loader workers,
runs sharing a cache folder): the others wait for the file instead of computing it again.
"""

from __future__ import annotations

import os
import tempfile
import time
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


@contextmanager
def claim(path: str | Path, wait_s: float = 3600.0, stale_s: float = 900.0,
          poll_s: float = 0.1) -> Iterator[bool]:
    """One writer per file across processes: ``with claim(path) as mine: if mine: write path``.

    Yields True to the process that should write ``path``: it created ``.<name>.lock`` beside it
    (``O_CREAT | O_EXCL``) and the lock goes when the block ends. Yields False when ``path``
    exists, also after waiting for another process's lock to go (the caller then reads the file,
    and computes it itself if it is still missing: its writer failed).

    Args:
        path: the file to be written (atomically, e.g. with :func:`atomic_open`).
        wait_s: longest wait for another writer; then yields True without the lock (the work is
            done twice, the atomic writes keep the file whole).
        stale_s: a lock untouched this long belongs to a killed writer and is taken over.
        poll_s: how often a waiting process looks again.
    """
    path = Path(path)
    lock = path.with_name(f".{path.name}.lock")
    path.parent.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + wait_s
    held = False
    while not path.exists():
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                stale = time.time() - lock.stat().st_mtime > stale_s
            except FileNotFoundError:  # its writer just finished
                continue
            if stale:
                lock.unlink(missing_ok=True)
                continue
            if time.monotonic() > deadline:
                break
            time.sleep(poll_s)
            continue
        os.write(fd, f"{os.getpid()}\n".encode())
        os.close(fd)
        held = True
        break
    try:
        yield not path.exists()
    finally:
        if held:
            lock.unlink(missing_ok=True)
