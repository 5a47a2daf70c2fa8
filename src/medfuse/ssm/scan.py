"""The one selective-scan dispatcher (seed 000, Bi-Mamba; DESIGN "Fast paths").

Paths:

- ``cuda``: mamba-ssm's fused kernel (:mod:`.scan_cuda`), only for CUDA tensors when importable;
- ``triton``: medfuse's Triton kernels (:mod:`.scan_triton`), forward and backward, for CUDA tensors
  when Triton imports (it ships with torch's Linux wheels); on CPU only under ``TRITON_INTERPRET=1``
  (Triton's interpreter, for tests); fp32/bf16/fp16 inputs (fp64 goes to ``chunked``);
- ``chunked``: pure-PyTorch chunked scan (:mod:`.scan_chunked`), any device, O(L * Dm) memory;
  inside a chunk it steps sequentially on CPU and runs a Blelloch scan on CUDA
  (:mod:`.scan_parallel`); ``MEDFUSE_SCAN_INTRA=seq|parallel`` forces one (for ``triton`` it picks
  the forward kernel's in-chunk step loop or associative scan);
- ``ref``: the sequential loop (:mod:`.scan_ref`), the spec; slow, for tests and debugging.

The path is chosen by the ``path`` argument, else the ``MEDFUSE_SCAN`` environment variable
(``ref|chunked|triton|cuda|auto``), else automatically: on CUDA ``cuda`` when mamba-ssm imports (an
explicit opt-in: ``pip install 'medfuse[mamba]'``), else ``triton``, else ``chunked``; on CPU
``chunked``. When the requested path cannot run (``cuda`` or ``triton`` on CPU, mamba-ssm missing,
a Triton kernel that fails to compile), the scan falls back (``cuda`` -> ``triton`` -> ``chunked``)
and says so once per process with a :class:`ScanFallbackWarning`.
"""

from __future__ import annotations

import functools
import os
import warnings
from types import ModuleType

import torch
from torch import Tensor

from medfuse.errors import ConfigError, MedfuseError
from medfuse.ssm.scan_chunked import selective_scan_chunked
from medfuse.ssm.scan_cuda import cuda_scan_importable, cuda_scan_unavailable_reason, selective_scan_cuda
from medfuse.ssm.scan_ref import selective_scan_ref

PATHS = ("ref", "chunked", "triton", "cuda")
ENV_VAR = "MEDFUSE_SCAN"

_WARNED: set[str] = set()
_TRITON_BROKEN: dict[str, str] = {}  # device type -> why the Triton kernels failed at run time


class ScanFallbackWarning(UserWarning):
    """The requested scan path cannot run here; another one is used instead."""


def _warn_once(key: str, message: str) -> None:
    if key not in _WARNED:
        _WARNED.add(key)
        warnings.warn(message, ScanFallbackWarning, stacklevel=4)


@functools.lru_cache(maxsize=1)
def _load_triton() -> tuple[ModuleType | None, str]:
    """Import :mod:`.scan_triton` (and so Triton) once; returns (module or None, reason if None)."""
    try:
        from medfuse.ssm import scan_triton
    except Exception as exc:  # ImportError, or a Triton install that fails at import
        return None, f"{type(exc).__name__}: {exc}".splitlines()[0][:200]
    return scan_triton, ""


def triton_scan_unavailable_reason(device: torch.device | str) -> str:
    """Why the ``triton`` path cannot run for tensors on ``device`` (``""`` when it can)."""
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        return "CUDA is not available"
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET", "").strip() in ("", "0"):
        return f"tensors are on {device.type}, not CUDA"
    mod, reason = _load_triton()
    if mod is None:
        return f"Triton cannot be imported ({reason})"
    return _TRITON_BROKEN.get(device.type, "") or mod.triton_unavailable_reason(device)


def available_paths() -> list[str]:
    """Scan paths that can run in this process (``triton`` needs a GPU, or CPU under ``TRITON_INTERPRET=1``,
    and an importable Triton; ``cuda`` a GPU and an importable mamba-ssm)."""
    paths = ["ref", "chunked"]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if not triton_scan_unavailable_reason(device):
        paths.append("triton")
    if torch.cuda.is_available() and cuda_scan_importable():
        paths.append("cuda")
    return paths


def requested_path(path: str | None = None) -> str:
    """The path asked for by ``path`` or ``MEDFUSE_SCAN``: ``auto``, ``ref``, ``chunked``, ``triton`` or ``cuda``.

    Raises:
        ConfigError: ``MEDFUSE_SCAN`` holds an unknown value.
        ValueError: ``path`` is not a known path.
    """
    if path is not None:
        if path not in (*PATHS, "auto"):
            raise ValueError(f"unknown scan path {path!r}; expected one of {', '.join(PATHS)} or 'auto'")
        return path
    env = os.environ.get(ENV_VAR, "").strip().lower()
    if env in ("", "auto"):
        return "auto"
    if env not in PATHS:
        raise ConfigError(ENV_VAR, f"unknown scan path {env!r}",
                          f"set {ENV_VAR} to one of {', '.join(PATHS)} or auto, or unset it")
    return env


def resolve_path(device: torch.device | str, path: str | None = None, *, warn: bool = True) -> str:
    """The path that will run for tensors on ``device`` (after any fallback).

    Args:
        device: where the scan's tensors live.
        path: explicit request; ``None`` reads ``MEDFUSE_SCAN``.
        warn: emit the once-per-process fallback warning when the request cannot be honoured.
    """
    device = torch.device(device)
    want = requested_path(path)
    if want in ("ref", "chunked"):
        return want
    if want == "auto" and device.type != "cuda":
        return "chunked"  # CPU: the chunked scan is the fast path (the interpreter only on request)
    if want in ("auto", "cuda"):
        reason = cuda_scan_unavailable_reason(device)
        if not reason:
            return "cuda"
        triton_reason = triton_scan_unavailable_reason(device)
        fallback = "chunked" if triton_reason else "triton"
        if warn and want == "cuda":
            _warn_once(f"cuda:{reason}", f"{ENV_VAR}/path 'cuda' cannot run ({reason}); using the '{fallback}' "
                                         "selective scan instead")
        elif warn and fallback == "chunked" and device.type not in _TRITON_BROKEN:  # GPU, no Triton: slow but correct
            _warn_once(f"auto:{triton_reason}", f"fast selective scans unavailable (mamba-ssm: {reason}; Triton: "
                                                f"{triton_reason}); using the 'chunked' pure-PyTorch scan")
        return fallback
    reason = triton_scan_unavailable_reason(device)  # want == "triton"
    if not reason:
        return "triton"
    if warn and device.type not in _TRITON_BROKEN:  # a run-time failure was already reported
        _warn_once(f"triton:{reason}", f"{ENV_VAR}/path 'triton' cannot run ({reason}); using the 'chunked' "
                                       "pure-PyTorch selective scan instead")
    return "chunked"


def _triton_failed(device_type: str, exc: BaseException) -> None:
    """Disable the Triton path on ``device_type`` for this process and say so once."""
    reason = f"a Triton kernel failed: {type(exc).__name__}: {exc}".splitlines()[0][:300]
    _TRITON_BROKEN[device_type] = reason
    _warn_once(f"triton-run:{device_type}", f"the Triton selective scan failed ({reason}); using the 'chunked' "
                                            "pure-PyTorch scan from now on")


def selective_scan(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    z: Tensor | None = None,
    delta_bias: Tensor | None = None,
    delta_softplus: bool = False,
    *,
    path: str | None = None,
    chunk_size: int | None = None,
) -> Tensor:
    """Selective scan (Mamba's S6 recurrence), dispatched to the best available implementation.

    ``h_t = exp(delta_t A) h_{t-1} + delta_t u_t B_t``, ``y_t = <h_t, C_t> + D u_t``, times
    ``silu(z_t)`` when ``z`` is given; ``delta`` gets ``delta_bias`` and softplus first if asked.

    Args:
        u: input, (B, Dm, L).
        delta: step sizes, (B, Dm, L).
        A: (Dm, N), negative real (S4D-real parameterisation).
        B: (B, N, L).
        C: (B, N, L).
        D: skip connection, (Dm,).
        z: gate, (B, Dm, L).
        delta_bias: (Dm,).
        delta_softplus: apply softplus to ``delta + delta_bias``.
        path: ``ref``, ``chunked``, ``triton``, ``cuda`` or ``auto``; ``None`` reads ``MEDFUSE_SCAN``.
        chunk_size: steps per chunk for the ``chunked`` and ``triton`` paths (ignored by the others).

    Returns:
        (B, Dm, L) in ``u``'s dtype; accumulation is fp32 on every path.
    """
    chosen = resolve_path(u.device, path)
    if chosen == "cuda":
        return selective_scan_cuda(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
    if chosen == "triton":
        if any(t is not None and t.dtype == torch.float64 for t in (u, delta, A, B, C, D, z, delta_bias)):
            _warn_once("triton:fp64", "the Triton selective scan takes fp32/bf16/fp16; fp64 inputs use the "
                                      "'chunked' scan")
        else:
            mod = _load_triton()[0]
            on_error = functools.partial(_triton_failed, u.device.type)
            try:
                return mod.selective_scan_triton(u, delta, A, B, C, D, z, delta_bias, delta_softplus,
                                                 chunk_size=chunk_size, on_error=on_error)
            except (ValueError, MedfuseError, torch.OutOfMemoryError):  # the caller's mistake, a real OOM
                raise
            except Exception as exc:  # compile/launch failure: the chunked scan still answers
                on_error(exc)
    if chosen == "ref":
        return selective_scan_ref(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
    return selective_scan_chunked(u, delta, A, B, C, D, z, delta_bias, delta_softplus, chunk_size=chunk_size)
