"""Registries: the family list and name -> factory tables (timm style). YAML names entries, never
import paths.

* :data:`FAMILIES`: one :class:`Family` record per model family (its models, task, params models,
  data module, evaluator, predictor, demo). ``medfuse.families`` registers the built-in families,
  listed once, explicitly; the engine looks families up here and never imports them.
* :data:`ENCODERS` and :data:`TEXT_ENCODERS`: frozen/trainable encoders shared by families; the
  ``medfuse.encoders`` and ``medfuse.text`` packages register theirs on import.

Lookup of an unknown name raises a :class:`~medfuse.errors.ConfigError` that lists the valid names.
This module sits at the bottom of the package: the record's fields are typed loosely (``type``,
``Callable``) so that it imports nothing above ``errors``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medfuse.errors import ConfigError

CONFIG_DIR = Path(__file__).parent / "configs"
"""Shipped configs, ``<family>_<dataset>.yaml`` (``configs/`` at the repository root links here)."""


class Registry:
    """A mapping from names to factories with a helpful error on unknown names.

    Args:
        kind: what the entries are (used in messages), e.g. ``"encoder"``.
        config_key: the config key that selects an entry, e.g. ``"model.params.encoder"``.
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
        if name not in self._items:
            raise ConfigError(
                self.config_key,
                f"unknown {self.kind} '{name}'",
                f"use one of: {', '.join(sorted(self._items)) or '(none registered)'}",
            )
        return self._items[name]

    def names(self) -> list[str]:
        return sorted(self._items)

    def help(self, name: str) -> str:
        return self._help.get(name, "")

    def __contains__(self, name: str) -> bool:
        return name in self._items


ENCODERS = Registry("encoder", "model.params.encoder")
TEXT_ENCODERS = Registry("text encoder", "model.params.text_encoder")


# ---------------------------------------------------------------------------------------------- families


@dataclass(frozen=True)
class ModelEntry:
    """One named model of a family: a thin factory plus its typed parameters.

    Attributes:
        name: the value of ``model.name`` that selects it.
        params: pydantic model of ``model.params`` (unknown or ill-typed keys are refused).
        build: ``build(params) -> nn.Module``; ``params`` is a validated instance of ``params``
            with the data-derived fields (``in_channels``, ``num_classes``, ``modalities``,
            ``feature_cache``) filled in where the params model has them and the config left them
            unset.
        task: the LightningModule class (an engine ``BaseTask`` subclass) that trains it.
        evaluator: the engine ``Evaluator`` subclass behind ``medfuse evaluate``.
        predictor: the engine ``Predictor`` subclass behind ``medfuse predict``.
        help: one line for ``medfuse models``.
    """

    name: str
    params: type
    build: Callable[[Any], Any]
    task: type
    evaluator: type
    predictor: type
    help: str = ""


@dataclass(frozen=True)
class Family:
    """Everything the engine needs to know about one family, in one record.

    Attributes:
        name: the value of the config's ``family`` key.
        help: one line for ``medfuse models``.
        models: the family's named models (the first is its main one).
        data_params: pydantic model of ``data.params`` (None: the family takes no data params).
        datamodule: ``datamodule(cfg, run_dir) -> LightningDataModule``, or None for the generic
            :class:`~medfuse.data.datamodule.CaseDataModule`.
        make_demo: ``make_demo(out, **demo_params) -> Path`` writes the family's demo phantom.
        demo_ablations: ``(variant name, config overrides)`` pairs run by ``medfuse demo``; the first
            is the full model.
        demo_compare: ``demo_compare(rows) -> {name: {"markdown": str, ...}}``, paired comparisons of
            the demo's trained variants added to its report (None: the ablation table only).
        demo_quick: config overrides that ``medfuse demo --quick`` adds after the engine's quick
            settings, for a family whose demo needs other sizes to learn on that budget.
    """

    name: str
    help: str
    models: tuple[ModelEntry, ...]
    data_params: type | None = None
    datamodule: Callable[..., Any] | None = None
    make_demo: Callable[..., Path] | None = None
    demo_ablations: tuple[tuple[str, tuple[str, ...]], ...] = (("full", ()),)
    demo_compare: Callable[[list[dict[str, Any]]], dict[str, Any]] | None = None
    demo_quick: tuple[str, ...] = ()

    @property
    def demo_config(self) -> Path:
        """The shipped demo config, ``configs/<family>_demo.yaml``."""
        return CONFIG_DIR / f"{self.name}_demo.yaml"

    def model(self, name: str) -> ModelEntry:
        for m in self.models:
            if m.name == name:
                return m
        raise ConfigError("model.name", f"family '{self.name}' has no model '{name}'",
                          f"use one of: {', '.join(m.name for m in self.models)}")


class FamilyRegistry:
    """The registered families, in registration order."""

    def __init__(self) -> None:
        self._families: dict[str, Family] = {}

    def register(self, family: Family) -> Family:
        old = self._families.get(family.name)
        if old is not None and old is not family:
            raise ValueError(f"family '{family.name}' is registered twice")
        for m in family.models:
            for other in self._families.values():
                if other.name != family.name and any(o.name == m.name for o in other.models):
                    raise ValueError(f"model '{m.name}' is registered by families '{other.name}' and '{family.name}'")
        self._families[family.name] = family
        return family

    def get(self, name: str) -> Family:
        if name not in self._families:
            hint = ", ".join(self._families) or "(none registered: import medfuse.families first)"
            raise ConfigError("family", f"unknown family '{name}'", f"use one of: {hint}")
        return self._families[name]

    def names(self) -> list[str]:
        return list(self._families)

    def __iter__(self) -> Iterator[Family]:
        return iter(list(self._families.values()))

    def __contains__(self, name: str) -> bool:
        return name in self._families

    def find_model(self, model_name: str) -> tuple[Family, ModelEntry]:
        """The family that registers ``model_name`` and its entry."""
        for fam in self._families.values():
            for m in fam.models:
                if m.name == model_name:
                    return fam, m
        names = sorted(m.name for f in self._families.values() for m in f.models)
        if not names:
            raise ConfigError("model.name", f"unknown model '{model_name}': no family is registered",
                              "import medfuse.families (or medfuse.api), which registers them")
        raise ConfigError("model.name", f"unknown model '{model_name}'", f"use one of: {', '.join(names)}")


FAMILIES = FamilyRegistry()
