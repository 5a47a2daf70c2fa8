"""Guarded wrapper of mamba-ssm's fused CUDA selective scan (optional fast path, seed 000).

``mamba_ssm`` is an optional extra (``pip install 'medfuse[mamba]'``). It is imported lazily, the
first time :func:`cuda_scan_importable` or :func:`selective_scan_cuda` runs, never at module import:
importing it pulls in triton and a compiled extension whose ABI breaks often ("undefined symbol"),
and such a failure must only disable this path, not the package.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch import Tensor


@functools.lru_cache(maxsize=1)
def _load() -> tuple[Callable | None, str]:
    """Import mamba-ssm's ``selective_scan_fn`` once; returns (fn or None, reason if None)."""
    try:
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
    except Exception as exc:  # ImportError, OSError or RuntimeError from a broken build
        return None, f"{type(exc).__name__}: {exc}".splitlines()[0][:200]
    return selective_scan_fn, ""


def cuda_scan_importable() -> bool:
    """True when mamba-ssm's selective scan can be imported (says nothing about the device)."""
    return _load()[0] is not None


def cuda_scan_unavailable_reason(device: torch.device | None = None) -> str:
    """Why the CUDA path cannot run (``""`` when it can) for tensors on ``device``."""
    if not torch.cuda.is_available():
        return "CUDA is not available"
    if device is not None and device.type != "cuda":
        return f"tensors are on {device.type}, not CUDA"
    fn, reason = _load()
    if fn is None:
        return f"mamba-ssm cannot be imported ({reason}); install it with pip install 'medfuse[mamba]'"
    return ""


def selective_scan_cuda(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    z: Tensor | None = None,
    delta_bias: Tensor | None = None,
    delta_softplus: bool = False,
) -> Tensor:
    """Call mamba-ssm's fused kernel with the dtypes it expects.

    Same arguments and result as :func:`medfuse.ssm.scan_ref.selective_scan_ref`; all tensors on
    CUDA. ``u``, ``delta``, ``B``, ``C`` and ``z`` share ``u``'s dtype (fp32, fp16 or bf16) and the
    kernel accumulates in fp32; ``A``, ``D`` and ``delta_bias`` are passed in fp32.

    Raises:
        RuntimeError: when the path is unavailable (check :func:`cuda_scan_unavailable_reason`).
    """
    reason = cuda_scan_unavailable_reason(u.device)
    if reason:
        raise RuntimeError(f"mamba-ssm CUDA selective scan unavailable: {reason}")
    fn = _load()[0]
    dt = u.dtype
    return fn(
        u,
        delta.to(dt),
        A.float(),
        B.to(dt),
        C.to(dt),
        None if D is None else D.float(),
        None if z is None else z.to(dt),
        None if delta_bias is None else delta_bias.float(),
        delta_softplus,
    )
