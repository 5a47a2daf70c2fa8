"""The Python API: what the command line does, as functions (importing this registers the families).

    from medfuse.api import fit, evaluate, export, predict, run_demo, load_config

``predict`` takes a run directory or a model package written by ``export`` (``model.zip``).
"""

from __future__ import annotations

import medfuse.families  # noqa: F401  (registers the families)
from medfuse.config import load_config
from medfuse.engine.demo import run_demo
from medfuse.engine.evaluate import evaluate
from medfuse.engine.package import export
from medfuse.engine.predict import predict
from medfuse.engine.trainer import fit, resume_run

__all__ = ["evaluate", "export", "fit", "load_config", "predict", "resume_run", "run_demo"]
