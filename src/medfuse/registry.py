"""Name -> factory registries (timm style): YAML names entries, never import paths.

Families register with ``@MODELS.register("name")``. Lookup of an unknown name raises a
:class:`~medfuse.errors.ConfigError` that lists the valid names.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

from medfuse.errors import ConfigError


class Registry:
    """A mapping from names to factories with a helpful error on unknown names.

    Args:
        kind: what the entries are (used in messages), e.g. ``"model"``.
        config_key: the config key that selects an entry, e.g. ``"model.name"``.
    """

    def __init__(self, kind: str, config_key: str):
        self.kind = kind
        self.config_key = config_key
        self._items: dict[str, Callable[..., Any]] = {}
        self._help: dict[str, str] = {}

    def register(self, name: str, help: str = "") -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        """Decorator that registers ``fn`` under ``name`` (names are unique)."""

        def deco(fn: Callable[..., Any]) -> Callable[..., Any]:
            if name in self._items and self._items[name] is not fn:
                raise ValueError(f"{self.kind} '{name}' is registered twice")
            self._items[name] = fn
            doc = (fn.__doc__ or "").strip().splitlines()
            self._help[name] = help or (doc[0] if doc else "")
            return fn

        return deco

    def get(self, name: str) -> Callable[..., Any]:
        _import_builtin_entries()
        if name not in self._items:
            raise ConfigError(
                self.config_key,
                f"unknown {self.kind} '{name}'",
                f"use one of: {', '.join(sorted(self._items)) or '(none registered)'}",
            )
        return self._items[name]

    def names(self) -> list[str]:
        _import_builtin_entries()
        return sorted(self._items)

    def help(self, name: str) -> str:
        return self._help.get(name, "")

    def __contains__(self, name: str) -> bool:
        _import_builtin_entries()
        return name in self._items


MODELS = Registry("model", "model.name")
ENCODERS = Registry("encoder", "model.encoder")
TEXT_ENCODERS = Registry("text encoder", "model.text_encoder")
DEMOS = Registry("demo data generator", "family")
# A family whose data are not plain image volumes (2D images with text, raw + context pairs, CT with
# reports) registers a factory ``(cfg, run_dir) -> LightningDataModule`` under its family name; the
# engine uses it instead of the generic case data module.
DATAMODULES = Registry("data module", "family")
# family -> [(variant name, config overrides)] for ``medfuse demo FAMILY``; first = the full model.
DEMO_ABLATIONS: dict[str, list[tuple[str, list[str]]]] = {}

# Modules whose import registers built-in entries. Missing modules are skipped so a family can
# land without touching this list's neighbours; a module that exists but fails to import is a bug
# and raises.
_BUILTIN_MODULES = (
    "medfuse.encoders.tiny",
    "medfuse.encoders.medsam2",
    "medfuse.encoders.sam_vitb",
    "medfuse.encoders.dinov3",
    "medfuse.text.registry",
    "medfuse.models.baseline",
    "medfuse.models.baseline_tasks",
    "medfuse.models.staging",
    "medfuse.models.ct_encoder",
    "medfuse.models.text_seg",
    "medfuse.models.incomplete_seg",
    "medfuse.models.context_seg",
    "medfuse.data.demo",
    "medfuse.data.ct_encoder",
    "medfuse.data.text_seg",
    "medfuse.data.incomplete_seg",
    "medfuse.data.context_seg",
)
_imported = False


def _import_builtin_entries() -> None:
    global _imported
    if _imported:
        return
    _imported = True
    for mod in _BUILTIN_MODULES:
        try:
            importlib.import_module(mod)
        except ModuleNotFoundError as e:
            if e.name is not None and (e.name == mod or mod.startswith(e.name + ".")):
                continue
            raise
