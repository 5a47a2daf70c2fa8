"""Checkpoint IO: atomic writes and safe (``weights_only``) reads for Lightning checkpoints.

A checkpoint is first written to a temporary file in the same directory, flushed and fsynced, then
moved over the target with :func:`os.replace`. A run killed mid-write therefore leaves the previous
``last.ckpt`` intact. Reads use ``torch.load(weights_only=True)``: our checkpoints hold only
tensors and plain Python containers, so no code from a file is ever run.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from medfuse.errors import RunDirError, WeightsError
from medfuse.fileio import atomic_open


def atomic_torch_save(obj: Any, path: str | Path) -> Path:
    """``torch.save`` to ``path`` atomically (tmp file + fsync + os.replace)."""
    p = Path(path)
    with atomic_open(p, "wb", fsync=True) as f:
        torch.save(obj, f)
    return p


def safe_torch_load(path: str | Path, map_location: Any = "cpu") -> Any:
    """``torch.load(weights_only=True)`` with one-line errors naming the file.

    Raises:
        WeightsError: missing, empty, unreadable, not a torch file (e.g. safetensors under a
            ``.ckpt`` name), or a pickle that needs code execution.
    """
    p = Path(path)
    if not p.is_file():
        raise WeightsError(p, "checkpoint not found", "check the path (runs/<name>/checkpoints/)")
    try:
        size = p.stat().st_size
    except OSError as e:
        raise WeightsError(p, f"cannot open the checkpoint ({e.strerror})", "check its permissions") from None
    if size == 0:
        raise WeightsError(p, "checkpoint file is empty", "the write was cut short; use another checkpoint "
                           "(last.ckpt / best.ckpt) or train again")
    with p.open("rb") as f:
        head = f.read(9)
    if len(head) == 9 and head[8:9] == b"{" and not head.startswith(b"PK"):
        raise WeightsError(p, "is a safetensors file, not a torch checkpoint",
                           "use a checkpoint written by medfuse train (safetensors go in model.weights)")
    try:
        return torch.load(p, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        raise WeightsError(p, "refused to unpickle: the file needs code execution",
                           "only load checkpoints written by medfuse or plain state dicts") from e
    except MemoryError as e:
        raise WeightsError(p, "not enough memory to load the checkpoint", "check that this is a medfuse checkpoint") from e
    except Exception as e:  # noqa: BLE001 - torch raises RuntimeError/EOFError/ValueError/... on bad files
        first = next((ln for ln in str(e).splitlines() if ln.strip()), type(e).__name__)
        raise WeightsError(p, f"cannot read checkpoint ({type(e).__name__}: {first[:120]})",
                           "the file is corrupt or truncated; use another checkpoint") from e


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """A Lightning checkpoint written by medfuse: a dict with a ``state_dict`` of tensors.

    Raises:
        WeightsError: one line naming the file: unreadable (see :func:`safe_torch_load`), a plain
            state dict, or another container.
    """
    ckpt = safe_torch_load(path)
    fix = "use a checkpoint written by medfuse train (runs/<name>/checkpoints/last.ckpt or best.ckpt)"
    if not isinstance(ckpt, dict):
        raise WeightsError(path, f"holds a {type(ckpt).__name__}, not a checkpoint (a dict with a state_dict)", fix)
    sd = ckpt.get("state_dict")
    if sd is None:
        if ckpt and all(isinstance(v, torch.Tensor) for v in ckpt.values()):
            raise WeightsError(path, "is a plain state dict, not a medfuse checkpoint (no 'state_dict', 'epoch')",
                               f"{fix}; to start from these weights set model.weights={path}")
        raise WeightsError(path, f"is not a medfuse checkpoint (keys: {', '.join(map(str, list(ckpt)[:5]))})", fix)
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise WeightsError(path, "has a 'state_dict' that is not a mapping of tensors", fix)
    return ckpt


def mismatch_summary(expected: dict[str, Any], found: dict[str, Any]) -> str | None:
    """Missing / unexpected / shape-mismatched keys of ``found`` against ``expected`` (tensors), or None."""
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    shapes = [f"{k} {tuple(found[k].shape)} vs {tuple(expected[k].shape)}" for k in expected
              if k in found and tuple(found[k].shape) != tuple(expected[k].shape)]
    parts = []
    for what, keys in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", shapes)):
        if keys:
            parts.append(f"{len(keys)} {what} (e.g. {', '.join(keys[:2])})")
    return "; ".join(parts) or None


def check_checkpoint_fits(path: str | Path, module: torch.nn.Module) -> dict[str, Any]:
    """Read ``path`` (:func:`read_checkpoint`) and check its ``state_dict`` fits ``module``'s.

    Used before ``--resume`` touches anything in the run directory. Returns the checkpoint.

    Raises:
        WeightsError: the file is not a checkpoint, or it was written by another model (the
            missing, unexpected and shape-mismatched keys are summarised).
    """
    ckpt = read_checkpoint(path)
    diff = mismatch_summary(module.state_dict(), ckpt["state_dict"])
    if diff:
        raise WeightsError(path, f"was written by another model: {diff}",
                           "resume with the config this checkpoint was trained with, or start a new run")
    if not isinstance(ckpt.get("epoch"), int):
        raise WeightsError(path, "has no epoch counter (not a training checkpoint)", "use last.ckpt of a medfuse run")
    return ckpt


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
    """Load the ``model.*`` weights of a Lightning checkpoint into a bare model, strictly.

    Raises:
        WeightsError: one line naming the file (see :func:`read_checkpoint`), or a checkpoint of
            another model (missing, unexpected and shape-mismatched keys summarised).
    """
    ckpt = read_checkpoint(ckpt_path)
    sd = {k[len(prefix):]: v for k, v in ckpt["state_dict"].items() if k.startswith(prefix)}
    diff = mismatch_summary(model.state_dict(), sd)
    if diff:
        raise WeightsError(ckpt_path, f"checkpoint does not match the model: {diff}",
                           "use the config the checkpoint was trained with")
    model.load_state_dict(sd, strict=True)
