"""One process at a time in a run directory: an exclusive lock file holding the owner's pid.

``medfuse train`` (and ``evaluate``, which writes the report and plots into the run) hold
``<run_dir>/.medfuse.lock`` while they run. The file is created with ``O_CREAT | O_EXCL`` (atomic
on local and NFS v3+ file systems) and holds ``pid host command``. A second command on the same
run directory is refused with one line naming the owner. A lock left by a process that no longer
exists on this host (``kill -9``, a crash, a power cut) is stale: it is taken over with a message
on stderr. A lock from another host cannot be checked and is never taken over.

Under DDP every rank runs the same command: only the global rank 0 process takes the lock.
"""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

from medfuse.errors import RunDirError

LOCK_NAME = ".medfuse.lock"


def _rank() -> int:
    for var in ("RANK", "SLURM_PROCID", "LOCAL_RANK", "NODE_RANK"):
        value = os.environ.get(var)
        if value not in (None, "") and value.lstrip("-").isdigit() and int(value) != 0:
            return int(value)
    return 0


def is_rank_zero() -> bool:
    """This process is the global rank 0 of a DDP job (or not part of one)."""
    return _rank() == 0


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    except OSError:
        return True
    return True


class RunLock:
    """Context manager holding ``<run_dir>/.medfuse.lock``.

    Args:
        run_dir: the run directory (created if missing).
        command: what holds the lock, for the other process's message (e.g. ``"train"``).
        announce: where a stale-lock takeover is reported (default: stderr).

    Raises:
        RunDirError: another live process holds the lock, or the lock cannot be created.
    """

    def __init__(self, run_dir: str | Path, command: str = "train", announce=None):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_NAME
        self.command = command
        self.announce = announce or (lambda msg: print(msg, file=sys.stderr, flush=True))
        self.held = False

    def _read_owner(self) -> tuple[int | None, str, str]:
        try:
            parts = self.path.read_text(encoding="utf-8", errors="replace").split(maxsplit=2)
        except OSError:
            return None, "", ""
        pid = int(parts[0]) if parts and parts[0].isdigit() else None
        host = parts[1] if len(parts) > 1 else ""
        what = parts[2].strip() if len(parts) > 2 else ""
        return pid, host, what

    def acquire(self) -> RunLock:
        if _rank() != 0:
            return self
        from medfuse.data.paths import output_dir

        output_dir(self.run_dir, "run directory")
        me = f"{os.getpid()} {socket.gethostname()} {self.command}\n"
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                pid, host, what = self._read_owner()
                here = host in ("", socket.gethostname())
                if pid is not None and here and pid != os.getpid() and not _alive(pid):
                    self.announce(f"note: {self.path}: taking over the stale lock of process {pid} "
                                  f"({what or 'medfuse'}), which no longer runs")
                    try:
                        self.path.unlink()
                    except FileNotFoundError:
                        pass
                    continue
                owner = f"process {pid}" if pid is not None else "another process"
                owner += f" on {host}" if host and not here else ""
                owner += f" (medfuse {what})" if what else ""
                raise RunDirError(self.run_dir, f"is in use by {owner} (lock file {self.path})",
                                  "wait for it to finish or use another run name (name=...); if that process "
                                  "no longer runs, delete the lock file") from None
            except OSError as e:
                raise RunDirError(self.path, f"cannot create the run lock ({e.strerror})",
                                  "check that the run directory is writable") from None
            with os.fdopen(fd, "w") as f:
                f.write(me)
            self.held = True
            return self
        raise RunDirError(self.path, "the run lock keeps changing hands", "retry when the other command has ended")

    def release(self) -> None:
        if not self.held:
            return
        self.held = False
        pid, _, _ = self._read_owner()
        if pid == os.getpid():
            try:
                self.path.unlink()
            except FileNotFoundError:
                pass

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
