"""The Python API: what the command line does, as functions (importing this registers the families).

    from medfuse.api import fit, evaluate, predict, run_demo, load_config
"""

from __future__ import annotations

import medfuse.families  # noqa: F401  (registers the families)
from medfuse.config import load_config
from medfuse.engine.demo import run_demo
from medfuse.engine.evaluate import evaluate
from medfuse.engine.predict import predict
from medfuse.engine.trainer import fit, resume_run

__all__ = ["evaluate", "fit", "load_config", "predict", "resume_run", "run_demo"]
