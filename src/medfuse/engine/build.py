"""Build a registered model from a config, checking its parameters against the factory."""

from __future__ import annotations

import inspect
from typing import Any

from torch import nn

from medfuse.config import Config
from medfuse.errors import ConfigError
from medfuse.registry import MODELS


def factory_params(name: str) -> dict[str, inspect.Parameter]:
    return dict(inspect.signature(MODELS.get(name)).parameters)


def build_model(cfg: Config, auto: dict[str, Any] | None = None) -> nn.Module:
    """Instantiate ``cfg.model.name`` with ``cfg.model.params``.

    Args:
        cfg: the experiment config.
        auto: values derived from the data (``in_channels``, ``num_classes``, ``modalities``) that
            fill factory arguments of the same name unless the config sets them.

    Raises:
        ConfigError: an unknown parameter (listing the valid ones) or a missing required one.
    """
    name = cfg.model.name
    factory = MODELS.get(name)
    sig = factory_params(name)
    accepts_kwargs = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in sig.values())
    params = dict(cfg.model.params)
    for key in params:
        if key not in sig and not accepts_kwargs:
            valid = [k for k, p in sig.items() if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
            raise ConfigError(f"model.params.{key}", f"unknown parameter of model '{name}'",
                              f"valid parameters are: {', '.join(valid)}")
    for key, value in (auto or {}).items():
        if key in sig and key not in params and value is not None:
            params[key] = value
    missing = [k for k, p in sig.items() if p.default is inspect.Parameter.empty
               and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD) and k not in params]
    if missing:
        raise ConfigError(f"model.params.{missing[0]}", f"required by model '{name}' but not set",
                          f"set model.params.{missing[0]}=...")
    model = factory(**params)
    if cfg.model.weights:
        from medfuse.encoders.weights import load_weights

        report = load_weights(model, cfg.model.weights, strict=True)
        model.load_report = report  # type: ignore[attr-defined]
    return model
