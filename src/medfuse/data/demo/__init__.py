"""Demo data generators: one procedural phantom per family, registered in :data:`medfuse.registry.DEMOS`.

Each family's generator lives in its own module here and registers itself with
``@DEMOS.register("<family>")``; importing this package imports every module listed in
``_FAMILY_MODULES``. A listed module that does not exist (yet) is skipped; any other import
error is a bug and raises.
"""

from __future__ import annotations

import importlib
from pathlib import Path

from medfuse.registry import DEMOS

__all__ = ["make_demo"]

_FAMILY_MODULES = ("staging", "ct_encoder", "text_seg", "incomplete_seg", "context_seg")

for _name in _FAMILY_MODULES:
    _module = f"{__name__}.{_name}"
    try:
        importlib.import_module(_module)
    except ModuleNotFoundError as _e:
        if _e.name != _module:
            raise


def make_demo(family: str, out: str | Path, **kw) -> Path:
    """Write the demo data set of ``family`` into ``out``.

    Args:
        family: a name registered in ``DEMOS`` (e.g. ``"staging"``); an unknown name raises
            :class:`~medfuse.errors.ConfigError` listing the valid ones.
        out: output folder.
        **kw: generator options (``n_patients``, ``seed``, ``quick``, ...).

    Returns:
        Path of the written manifest.
    """
    return DEMOS.get(family)(out, **kw)
