"""What a number depends on besides the config: the machine, the library versions, the threads.

A demo run on these phantoms moves by up to ~0.1 with the number of CPU threads alone (the float
summation order changes; the family pages' 3-seed sections show it), so every training session
records where it ran: :func:`record_training` appends one :func:`environment` entry per ``train``
or ``train --resume`` to ``runs/<name>/environment.json`` (a JSON list; a resume on another machine
adds a second entry instead of overwriting the first). The seeds harness puts the same entry in
``seeds.json`` and a one-line summary (:func:`summary_line`) in ``seeds.md``.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from medfuse.fileio import atomic_open

ENV_FILE = "environment.json"
PACKAGES = ("medfuse", "torch", "lightning", "monai", "numpy", "transformers", "timm", "triton")
THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "CUDA_VISIBLE_DEVICES")


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo`` on Linux, else :func:`platform.processor`)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(world_size: int = 1) -> dict[str, Any]:
    """This process's machine and libraries.

    Returns:
        ``time`` (UTC, ISO 8601), ``python``, ``platform``, ``cpu``, ``cpu_count``,
        ``torch_threads`` (:func:`torch.get_num_threads`, the intra-op threads that set the
        summation order on CPU), ``env`` (the thread and device variables that are set),
        ``cuda`` (device names, empty without CUDA), ``world_size`` and ``versions`` (installed
        version per package, None when absent).
    """
    cuda = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] \
        if torch.cuda.is_available() else []
    return {
        "time": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "python": sys.version.split()[0],
        "platform": f"{platform.system()} {platform.machine()}",
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "env": {k: os.environ[k] for k in THREAD_VARS if k in os.environ},
        "cuda": cuda,
        "world_size": int(world_size),
        "versions": {p: _version(p) for p in PACKAGES},
    }


def summary_line(env: dict[str, Any]) -> str:
    """One line for a table caption: CPU, threads, GPUs and the main versions."""
    v = env.get("versions", {})
    gpus = f", {len(env['cuda'])} x {env['cuda'][0]}" if env.get("cuda") else ""
    return (f"{env.get('cpu')} ({env.get('cpu_count')} cores, {env.get('torch_threads')} torch threads{gpus}); "
            f"torch {v.get('torch')}, MONAI {v.get('monai')}, numpy {v.get('numpy')}, Python {env.get('python')}")


def record_training(run_dir: str | Path, resumed: bool, world_size: int = 1) -> Path:
    """Append this session's :func:`environment` (plus ``resumed``) to ``run_dir/environment.json``.

    An unreadable earlier file is kept aside as ``environment.json.bad`` rather than lost.
    """
    path = Path(run_dir) / ENV_FILE
    entries: list[Any] = []
    if path.exists():
        try:
            entries = json.loads(path.read_text(encoding="utf-8"))
            if not isinstance(entries, list):
                raise ValueError("not a list")
        except (ValueError, OSError):
            path.replace(path.with_name(ENV_FILE + ".bad"))
            entries = []
    entries.append({**environment(world_size), "resumed": bool(resumed)})
    with atomic_open(path, "w", encoding="utf-8") as f:
        json.dump(entries, f, indent=1)
        f.write("\n")
    return path
