"""The one selective-scan dispatcher (seed 000, Bi-Mamba; DESIGN "Fast paths").

Paths:

- ``cuda``: mamba-ssm's fused kernel (:mod:`.scan_cuda`), only for CUDA tensors when importable;
- ``chunked``: pure-PyTorch chunked scan (:mod:`.scan_chunked`), any device, O(L * Dm) memory;
  inside a chunk it steps sequentially on CPU and runs a Blelloch scan on CUDA
  (:mod:`.scan_parallel`); ``MEDFUSE_SCAN_INTRA=seq|parallel`` forces one;
- ``ref``: the sequential loop (:mod:`.scan_ref`), the spec; slow, for tests and debugging.

The path is chosen by the ``path`` argument, else the ``MEDFUSE_SCAN`` environment variable
(``ref|chunked|cuda|auto``), else automatically: ``cuda`` when possible, otherwise ``chunked``.
When the requested path cannot run (``cuda`` on CPU, mamba-ssm missing or broken), the scan falls
back to ``chunked`` and says so once per process with a :class:`ScanFallbackWarning`.
"""

from __future__ import annotations

import os
import warnings

import torch
from torch import Tensor

from medfuse.errors import ConfigError
from medfuse.ssm.scan_chunked import selective_scan_chunked
from medfuse.ssm.scan_cuda import cuda_scan_importable, cuda_scan_unavailable_reason, selective_scan_cuda
from medfuse.ssm.scan_ref import selective_scan_ref

PATHS = ("ref", "chunked", "cuda")
ENV_VAR = "MEDFUSE_SCAN"

_WARNED: set[str] = set()


class ScanFallbackWarning(UserWarning):
    """The requested scan path cannot run here; another one is used instead."""


def _warn_once(key: str, message: str) -> None:
    if key not in _WARNED:
        _WARNED.add(key)
        warnings.warn(message, ScanFallbackWarning, stacklevel=4)


def available_paths() -> list[str]:
    """Scan paths that can run in this process (``cuda`` needs a GPU and an importable mamba-ssm)."""
    paths = ["ref", "chunked"]
    if torch.cuda.is_available() and cuda_scan_importable():
        paths.append("cuda")
    return paths


def requested_path(path: str | None = None) -> str:
    """The path asked for by ``path`` or ``MEDFUSE_SCAN``: one of ``auto``, ``ref``, ``chunked``, ``cuda``.

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
    reason = cuda_scan_unavailable_reason(device)
    if not reason:
        return "cuda"
    if warn and want == "cuda":
        _warn_once(f"cuda:{reason}", f"{ENV_VAR}/path 'cuda' cannot run ({reason}); using the 'chunked' "
                                     "pure-PyTorch selective scan instead")
    elif warn and device.type == "cuda":  # auto on a GPU without mamba-ssm: slower but correct
        _warn_once(f"auto:{reason}", f"fast CUDA selective scan unavailable ({reason}); using the 'chunked' "
                                     "pure-PyTorch scan")
    return "chunked"


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
        path: ``ref``, ``chunked``, ``cuda`` or ``auto``; ``None`` reads ``MEDFUSE_SCAN``.
        chunk_size: steps per chunk for the ``chunked`` path (ignored by the others).

    Returns:
        (B, Dm, L) in ``u``'s dtype; accumulation is fp32 on every path.
    """
    chosen = resolve_path(u.device, path)
    if chosen == "cuda":
        return selective_scan_cuda(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
    if chosen == "ref":
        return selective_scan_ref(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
    return selective_scan_chunked(u, delta, A, B, C, D, z, delta_bias, delta_softplus, chunk_size=chunk_size)
