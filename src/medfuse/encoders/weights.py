"""Safe local loading of pretrained weights (DESIGN "Weights" contract, "encoders/weights.py").

- ``weights:`` in a config is a local path; nothing is downloaded.
- ``.safetensors`` files are read with safetensors; torch files (``.pt``, ``.pth``, ``.ckpt``,
  ``.bin``) with ``torch.load(weights_only=True)``, so unpickling never runs code from the file:
  a pickle that needs code execution is refused with a :class:`~medfuse.errors.WeightsError`.
- Checkpoint keys can be filtered by prefix and rewritten (e.g. MedSAM2's ``image_encoder.trunk.``
  keys into timm's HieraDet names, with ``mlp.layers.0 -> mlp.fc1``).
- :func:`load_weights` returns a :class:`LoadReport` of missing, unexpected and shape-mismatched
  keys and raises when they matter. It always raises when *nothing* was loaded: a non-strict load
  whose key names don't line up (e.g. timm's ``features_only`` wrapper prefixing ``model.``)
  otherwise silently leaves the model at its random init.
"""

from __future__ import annotations

import fnmatch
import logging
import os
import pickle
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from medfuse.errors import WeightsError

__all__ = [
    "LoadReport",
    "RemapRules",
    "load_state_dict_file",
    "load_weights",
    "remap_keys",
    "save_safetensors",
]

log = logging.getLogger(__name__)

RemapRules = Sequence[tuple[str, str | None]] | Callable[[str], str | None]
TORCH_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin", ".tar")
WRAPPER_KEYS = ("state_dict", "model")
_UNSAFE_FIX = "convert it to safetensors, or re-save it with torch.save(model.state_dict())"


def _sniff_format(path: Path) -> str | None:
    """``"safetensors"``, ``"torch"`` or ``None``, from the first bytes of the file."""
    with open(path, "rb") as f:
        head = f.read(9)
    # safetensors first: its u64 header length may start with any byte, even 0x80.
    if len(head) == 9 and head[8:9] == b"{":  # u64 header length, then the JSON header
        return "safetensors"
    if head[:4] == b"PK\x03\x04" or head[:1] == b"\x80":  # torch zip archive / legacy pickle
        return "torch"
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        return "safetensors"
    if suffix in TORCH_SUFFIXES:
        return "torch"
    return None


def _first_sentence(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0].split(". ")[0].rstrip(".") if text else type(e).__name__


def _load_torch(path: Path, map_location: str | torch.device) -> object:
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        msg = str(e)
        found = re.search(r"GLOBAL ([\w.]+)", msg)
        if found or "unsupported global" in msg.lower():
            what = f": it references {found.group(1)}" if found else ""
            raise WeightsError(
                path,
                f"refused to unpickle: the file needs code execution (not a plain weights file){what}",
                _UNSAFE_FIX,
            ) from None
        raise WeightsError(
            path, "corrupt or not a PyTorch weights file (unpickling failed)", "re-download or re-export it"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError, KeyError) as e:
        first = _first_sentence(e)
        raise WeightsError(
            path,
            f"cannot read the torch file ({first})",
            "check that it is an intact PyTorch weights file (re-download or re-export it)",
        ) from None


def _load_safetensors(path: Path, map_location: str | torch.device) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    device = str(map_location) if isinstance(map_location, str | torch.device) else "cpu"
    try:
        return load_file(str(path), device=device)
    except Exception as e:  # safetensors raises SafetensorError / OSError / ValueError on bad files
        first = _first_sentence(e)
        raise WeightsError(
            path,
            f"cannot read the safetensors file, it looks corrupt or truncated ({first})",
            "re-download or re-export it",
        ) from None


def load_state_dict_file(
    path: str | Path, *, map_location: str | torch.device = "cpu", key: str | None = None
) -> dict[str, torch.Tensor]:
    """Read a state dict from a local weights file, safely.

    The format is recognised from the file's first bytes (then its suffix): safetensors, or a torch
    file read with ``weights_only=True``. If the file holds a dict that wraps the state dict, it is
    unwrapped: under ``key`` when given (which must exist), else under ``"state_dict"`` (Lightning
    checkpoints) or ``"model"`` (MedSAM2 / SAM2 checkpoints).

    Args:
        path: local file.
        map_location: device the tensors are loaded to.
        key: top-level key holding the state dict.

    Returns:
        name -> tensor.

    Raises:
        WeightsError: missing, unreadable, corrupt or unknown-format file; a pickle that needs code
            execution; ``key`` absent; no state dict of tensors inside.
    """
    path = Path(path)
    if not path.exists():
        raise WeightsError(
            path, "weights file not found", "check the path (weights are local files, never downloaded)"
        )
    if path.is_dir():
        raise WeightsError(
            path, "is a directory, not a weights file", "point to the .safetensors/.pt file inside it"
        )
    if path.stat().st_size == 0:
        raise WeightsError(path, "weights file is empty", "re-download or re-export it")
    try:
        fmt = _sniff_format(path)
    except OSError as e:
        raise WeightsError(path, f"cannot open the file ({e.strerror})", "check its permissions") from None
    if fmt is None:
        raise WeightsError(
            path,
            "unknown weights format",
            "use a .safetensors file or a torch .pt/.pth/.ckpt/.bin state dict",
        )
    obj: object = (
        _load_safetensors(path, map_location) if fmt == "safetensors" else _load_torch(path, map_location)
    )
    return _unwrap(path, obj, key)


def _unwrap(path: Path, obj: object, key: str | None) -> dict[str, torch.Tensor]:
    if not isinstance(obj, Mapping):
        raise WeightsError(
            path,
            f"holds a {type(obj).__name__}, not a state dict",
            "re-save it with torch.save(model.state_dict())",
        )
    if key is not None:
        if key not in obj:
            raise WeightsError(
                path, f"has no key '{key}' (top-level keys: {_head(list(obj))})", "pass the right key"
            )
        obj = obj[key]
    else:
        for k in WRAPPER_KEYS:
            if isinstance(obj.get(k), Mapping):
                obj = obj[k]
                break
    if not isinstance(obj, Mapping):
        raise WeightsError(
            path, f"key '{key}' holds a {type(obj).__name__}, not a state dict", "pass the right key"
        )
    bad = [str(k) for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise WeightsError(
            path,
            f"does not hold a plain state dict of tensors (non-tensor entries: {_head(bad)})",
            "pass the key that holds the state dict, or re-save it with torch.save(model.state_dict())",
        )
    if not obj:
        raise WeightsError(path, "holds no tensors", "check that this is the right weights file")
    return {str(k): v for k, v in obj.items()}


def _head(names: Sequence[str], n: int = 3) -> str:
    shown = ", ".join(str(x) for x in list(names)[:n])
    return shown + (f", ... ({len(names)} in all)" if len(names) > n else "")


def remap_keys(sd: Mapping[str, torch.Tensor], rules: RemapRules) -> dict[str, torch.Tensor]:
    """Rename (or drop) state-dict keys.

    Args:
        sd: name -> tensor.
        rules: either a function ``old -> new`` (``None`` drops the key), or a list of
            ``(pattern, replacement)`` regex rules applied in order with ``re.sub`` to each key; a
            rule whose replacement is ``None`` drops every key its pattern matches. Keys no rule
            matches are kept unchanged. Example (MedSAM2 -> timm HieraDet)::

                [(r"^image_encoder\\.trunk\\.", ""), (r"^image_encoder\\.neck\\..*", None),
                 (r"\\.mlp\\.layers\\.0\\.", ".mlp.fc1."), (r"\\.mlp\\.layers\\.1\\.", ".mlp.fc2.")]

    Returns:
        A new dict.

    Raises:
        ValueError: two keys end up with the same name.
    """
    if callable(rules):
        fn = rules
    else:
        compiled = [(re.compile(p), r) for p, r in rules]

        def fn(k: str) -> str | None:
            for pat, rep in compiled:
                if rep is None:
                    if pat.search(k):
                        return None
                else:
                    k = pat.sub(rep, k)
            return k

    out: dict[str, torch.Tensor] = {}
    source: dict[str, str] = {}
    for k, v in sd.items():
        new = fn(k)
        if new is None:
            continue
        if new in out:
            raise ValueError(f"remap rules map both '{source[new]}' and '{k}' to '{new}'")
        out[new], source[new] = v, k
    return out


@dataclass
class LoadReport:
    """What :func:`load_weights` did.

    Attributes:
        missing: model keys absent from the checkpoint that matter (not in ``allow_missing``).
        unexpected: checkpoint keys the model does not have.
        shape_mismatch: ``(key, checkpoint_shape, model_shape)`` for keys present in both with
            different shapes (these are not loaded).
        loaded: number of tensors copied into the model.
        allowed_missing: missing model keys matched by ``allow_missing`` patterns.
    """

    missing: list[str]
    unexpected: list[str]
    shape_mismatch: list[tuple[str, tuple, tuple]]
    loaded: int
    allowed_missing: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when something was loaded and nothing that matters is missing, unexpected or mismatched."""
        return self.loaded > 0 and not (self.missing or self.unexpected or self.shape_mismatch)

    def summary(self) -> str:
        """One line: counts and the first few names of each kind of problem."""
        parts = [f"loaded {self.loaded} tensors"]
        if self.missing:
            parts.append(f"{len(self.missing)} missing ({_head(self.missing)})")
        if self.unexpected:
            parts.append(f"{len(self.unexpected)} unexpected ({_head(self.unexpected)})")
        if self.shape_mismatch:
            shown = [f"{k}: {tuple(a)} vs model {tuple(b)}" for k, a, b in self.shape_mismatch]
            parts.append(f"{len(self.shape_mismatch)} shape mismatches ({_head(shown)})")
        if self.allowed_missing:
            parts.append(f"{len(self.allowed_missing)} allowed missing")
        return "; ".join(parts)


def load_weights(
    model: nn.Module,
    path: str | Path,
    *,
    remap: RemapRules | None = None,
    prefix: str | None = None,
    strict: bool = True,
    allow_missing: Sequence[str] = (),
    key: str | None = None,
    map_location: str | torch.device = "cpu",
) -> LoadReport:
    """Load a local weights file into ``model`` and report what matched.

    Steps: read the file safely (:func:`load_state_dict_file`), keep only keys under ``prefix``
    (with the prefix stripped), apply ``remap`` (:func:`remap_keys`), compare with
    ``model.state_dict()``, and copy every tensor whose name and shape match. Nothing is copied when
    the load raises.

    Args:
        model: the module to fill.
        path: local weights file.
        remap: key rewrite rules, see :func:`remap_keys`.
        prefix: keep only checkpoint keys starting with this string, e.g. ``"image_encoder."``.
        strict: raise when a key that matters is missing, a key is unexpected, or a shape differs.
        allow_missing: fnmatch patterns of model keys that may be absent (e.g. ``"head.*"``).
        key: top-level key of a wrapped checkpoint, see :func:`load_state_dict_file`.
        map_location: device the checkpoint is read to.

    Returns:
        The :class:`LoadReport` (also logged as a warning when not ``ok`` and not strict).

    Raises:
        WeightsError: unreadable file, no key loaded (always, even when ``strict=False``), or, when
            ``strict``, any missing/unexpected/mismatched key.
    """
    path = Path(path)
    sd = load_state_dict_file(path, map_location=map_location, key=key)
    n_file = len(sd)
    if prefix:
        sd = {k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)}
        if not sd:
            raise WeightsError(
                path,
                f"no key starts with prefix '{prefix}' ({n_file} keys in the file)",
                "pass the right prefix",
            )
    if remap is not None:
        try:
            sd = remap_keys(sd, remap)
        except ValueError as e:
            raise WeightsError(path, str(e), "fix the key remap rules") from None

    target = model.state_dict()
    missing_all = [k for k in target if k not in sd]
    allowed = [k for k in missing_all if any(fnmatch.fnmatchcase(k, p) for p in allow_missing)]
    missing = [k for k in missing_all if k not in set(allowed)]
    unexpected = [k for k in sd if k not in target]
    mismatch = [
        (k, tuple(v.shape), tuple(target[k].shape))
        for k, v in sd.items()
        if k in target and v.shape != target[k].shape
    ]
    bad = {k for k, _, _ in mismatch}
    to_load = {k: v for k, v in sd.items() if k in target and k not in bad}
    report = LoadReport(missing, unexpected, mismatch, len(to_load), allowed)
    fix = f"check that the checkpoint matches model {type(model).__name__} / pass the right weights path"

    if not to_load:
        raise WeightsError(
            path,
            f"no weights loaded: none of the {len(sd)} checkpoint keys (e.g. {_head(list(sd), 2)}) "
            f"match the {len(target)} model keys (e.g. {_head(list(target), 2)}) with the same shape",
            fix + " (or the prefix/remap rules)",
        )
    if strict and not report.ok:
        raise WeightsError(path, f"checkpoint does not match the model: {report.summary()}", fix)
    model.load_state_dict(to_load, strict=False)
    if not report.ok:
        log.warning("%s: partial load into %s: %s", path, type(model).__name__, report.summary())
    return report


def save_safetensors(
    model_or_sd: nn.Module | Mapping[str, torch.Tensor],
    path: str | Path,
    metadata: dict[str, str] | None = None,
) -> Path:
    """Write a state dict (or a module's) as safetensors, atomically (temp file + ``os.replace``).

    Tensors are moved to CPU and made contiguous; tensors sharing storage (tied weights) are
    cloned, since safetensors refuses shared storage.

    Args:
        model_or_sd: a module or a name -> tensor mapping.
        path: destination file (parent directories are created).
        metadata: optional string -> string metadata stored in the header.

    Returns:
        ``path`` as a Path.
    """
    from safetensors.torch import save_file

    sd = model_or_sd.state_dict() if isinstance(model_or_sd, nn.Module) else model_or_sd
    tensors: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for k, v in sd.items():
        t = v.detach().to("cpu").contiguous()
        ptr = t.untyped_storage().data_ptr()
        if ptr in seen and t.numel():
            t = t.clone()
        seen.add(t.untyped_storage().data_ptr())
        tensors[k] = t
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        save_file(tensors, str(tmp), metadata=metadata)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path
