"""Selective state-space models: the scan kernel boundary and the Mamba blocks (seed 000).

``selective_scan`` is the single dispatcher (``MEDFUSE_SCAN=ref|chunked|triton|cuda``); ``Mamba``
and ``BiMamba`` are the blocks built on it. Neither mamba-ssm nor Triton is imported here: only when
the ``cuda`` or ``triton`` path is first considered for a tensor that could use it.
"""

from medfuse.ssm.bimamba import BiMamba
from medfuse.ssm.mamba import Mamba, causal_depthwise_conv
from medfuse.ssm.scan import ScanFallbackWarning, available_paths, resolve_path, selective_scan
from medfuse.ssm.scan_chunked import selective_scan_chunked
from medfuse.ssm.scan_ref import selective_scan_ref

__all__ = [
    "BiMamba",
    "Mamba",
    "ScanFallbackWarning",
    "available_paths",
    "causal_depthwise_conv",
    "resolve_path",
    "selective_scan",
    "selective_scan_chunked",
    "selective_scan_ref",
]
