"""Launching ``ddp_worker.py`` on two CPU ranks (gloo) for the DDP tests (not a test module)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

WORKER = Path(__file__).with_name("ddp_worker.py")


def torchrun(*args: str, timeout: int = 500) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc_per_node 2 ARGS`` (a script such as :data:`WORKER`, or ``-m
    medfuse ...``) with one thread per rank."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           *args], capture_output=True, text=True, encoding="utf-8", errors="replace",
                          timeout=timeout, env=env)
