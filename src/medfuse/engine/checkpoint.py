"""Checkpoint IO: atomic writes and safe (``weights_only``) reads for Lightning checkpoints.

A checkpoint is first written to a temporary file in the same directory, flushed and fsynced, then
moved over the target with :func:`os.replace`. A run killed mid-write therefore leaves the previous
``last.ckpt`` intact. Reads use ``torch.load(weights_only=True)``: our checkpoints hold only
tensors and plain Python containers, so no code from a file is ever run.
"""

from __future__ import annotations

import os
import pickle
import tempfile
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from medfuse.errors import RunDirError, WeightsError


def atomic_torch_save(obj: Any, path: str | Path) -> Path:
    """``torch.save`` to ``path`` atomically (tmp file + fsync + os.replace)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=p.parent, prefix=f".{p.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, p)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return p


def safe_torch_load(path: str | Path, map_location: Any = "cpu") -> Any:
    """``torch.load(weights_only=True)`` with one-line errors naming the file."""
    p = Path(path)
    if not p.is_file():
        raise WeightsError(p, "checkpoint not found", "check the path (runs/<name>/checkpoints/)")
    try:
        return torch.load(p, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        raise WeightsError(p, "refused to unpickle: the file needs code execution",
                           "only load checkpoints written by medfuse or plain state dicts") from e
    except (RuntimeError, EOFError, OSError) as e:
        raise WeightsError(p, f"cannot read checkpoint ({str(e).splitlines()[0][:120]})",
                           "the file is corrupt or truncated; use another checkpoint") from e


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning CheckpointIO with atomic local writes and ``weights_only`` reads."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        atomic_torch_save(checkpoint, path)

    def load_checkpoint(self, path: Any, map_location: Any = None, weights_only: bool | None = None) -> dict:
        return safe_torch_load(path, map_location=map_location or "cpu")


def checkpoint_dir(run_dir: str | Path, stage: str | None = None) -> Path:
    """``run_dir/checkpoints`` for single-stage runs, ``run_dir/checkpoints/<stage>`` per stage."""
    d = Path(run_dir) / "checkpoints"
    return d / stage if stage else d


def find_checkpoint(run_dir: str | Path, which: str = "best", stage: str | None = None) -> Path:
    """Path of ``best.ckpt`` or ``last.ckpt`` of a run (or a stage), with a clear error if absent."""
    p = checkpoint_dir(run_dir, stage) / f"{which}.ckpt"
    if not p.is_file():
        raise RunDirError(p, f"no {which} checkpoint", "train the run first (medfuse train CONFIG) or check the run directory")
    return p


def load_model_weights(model: torch.nn.Module, ckpt_path: str | Path, prefix: str = "model.") -> None:
    """Load the ``model.*`` weights of a Lightning checkpoint into a bare model, strictly."""
    ckpt = safe_torch_load(ckpt_path)
    sd = {k[len(prefix):]: v for k, v in ckpt["state_dict"].items() if k.startswith(prefix)}
    result = model.load_state_dict(sd, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise WeightsError(
            ckpt_path,
            f"checkpoint does not match the model (missing {result.missing_keys[:3]}, "
            f"unexpected {result.unexpected_keys[:3]})",
            "use the config the checkpoint was trained with",
        )
