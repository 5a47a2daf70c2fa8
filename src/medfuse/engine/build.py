"""From a config to the family's parts: its registry record, typed params, model and data module.

The engine finds a family only through :data:`medfuse.registry.FAMILIES` (``medfuse.families``
registers the built-in ones); it never imports a family.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Collection
from pathlib import Path
from typing import Any

from torch import nn

from medfuse.config import Config, validate_params
from medfuse.errors import ConfigError, MedfuseError, WeightsError
from medfuse.registry import FAMILIES, Family, ModelEntry

AUTO_FIELDS = ("in_channels", "num_classes", "modalities", "feature_cache")
"""Model params the engine fills from the data when the params model has them and the config left them unset."""


def resolve(cfg: Config) -> Config:
    """``cfg`` with ``family`` and ``task`` filled in from the registered model (refusing mismatches)."""
    family, entry = FAMILIES.find_model(cfg.model.name)
    if cfg.family is not None and cfg.family != family.name:
        if cfg.family not in FAMILIES:
            FAMILIES.get(cfg.family)  # raises: unknown family, listing the valid ones
        raise ConfigError("family", f"model '{cfg.model.name}' belongs to family '{family.name}', not '{cfg.family}'",
                          f"set family: {family.name} (or a model of {cfg.family}: "
                          f"{', '.join(m.name for m in FAMILIES.get(cfg.family).models)})")
    kind = entry.task.kind
    if cfg.task is not None and cfg.task != kind:
        raise ConfigError("task", f"model '{entry.name}' is a {kind} model, not {cfg.task}",
                          f"set task: {kind} or drop the key")
    if cfg.family == family.name and cfg.task == kind:
        return cfg
    return cfg.model_copy(update={"family": family.name, "task": kind})


def family_of(cfg: Config) -> tuple[Family, ModelEntry]:
    """The family record and model entry a config names."""
    cfg = resolve(cfg)
    fam = FAMILIES.get(cfg.family or "")
    return fam, fam.model(cfg.model.name)


def model_params(cfg: Config, auto: dict[str, Any] | None = None) -> Any:
    """``model.params`` validated by the model's params model, with :data:`AUTO_FIELDS` filled from ``auto``."""
    _, entry = family_of(cfg)
    params = validate_params(entry.params, cfg.model.params, "model.params")
    fill = {k: v for k, v in (auto or {}).items()
            if k in AUTO_FIELDS and k in type(params).model_fields and k not in cfg.model.params and v is not None}
    return params.model_copy(update=fill) if fill else params


def data_params(cfg: Config) -> Any:
    """``data.params`` validated by the family's data params model (refused when it takes none)."""
    fam, _ = family_of(cfg)
    if fam.data_params is None:
        if cfg.data.params:
            key = next(iter(cfg.data.params))
            raise ConfigError(f"data.params.{key}", f"family '{fam.name}' takes no data params", "remove data.params")
        return None
    return validate_params(fam.data_params, cfg.data.params, "data.params")


def build_model(cfg: Config, auto: dict[str, Any] | None = None, params: Any = None) -> nn.Module:
    """Instantiate the config's model with validated params (and ``model.weights`` if set).

    Args:
        params: the already validated :func:`model_params` (computed here when None).

    Raises:
        ConfigError: an unknown or ill-typed parameter (naming the key).
    """
    _, entry = family_of(cfg)
    model = entry.build(model_params(cfg, auto) if params is None else params)
    if cfg.model.weights:
        from medfuse.encoders.weights import load_weights

        check_weights_format(cfg.model.weights)
        try:
            report = load_weights(model, cfg.model.weights, strict=True)
        except MedfuseError:
            raise
        except Exception as e:  # noqa: BLE001 - a reader library's error on a bad file: name the file
            first = next((ln for ln in str(e).splitlines() if ln.strip()), "")[:120]
            raise WeightsError(cfg.model.weights, f"cannot load weights ({type(e).__name__}: {first})",
                               "check that the file is a safetensors or torch state dict") from e
        model.load_report = report  # type: ignore[attr-defined]
    return model


def check_weights_format(path: str | Path) -> None:
    """Refuse ``model.weights`` whose content is not the format its extension says (e.g. a torch
    pickle named ``.safetensors``), before any loader opens it.

    Raises:
        WeightsError: naming ``model.weights`` and the file.
    """
    p = Path(path)
    if not p.is_file():
        raise WeightsError(f"model.weights: {p}", "file not found", "give the path of a local weights file")
    with p.open("rb") as f:
        head = f.read(9)
    pickle_or_zip = head[:2] == b"PK" or head[:1] == b"\x80"
    if p.suffix.lower() == ".safetensors" and pickle_or_zip:
        raise WeightsError(f"model.weights: {p}", "is a torch/pickle file named .safetensors (wrong format for its "
                           "extension)", "convert it to safetensors, or give it the .pt extension it has")


def check_postprocess(cfg: Config, supported: Collection[str]) -> None:
    """Refuse an ``eval.postprocess`` option that the model's predictor and evaluator do not apply
    (``supported``: :attr:`~medfuse.engine.predict.Predictor.postprocess_keys`), rather than ignore it.

    Raises:
        ConfigError: naming ``eval.postprocess.<key>``.
    """
    for key, value in cfg.eval.postprocess.model_dump().items():
        if value and key not in supported:
            raise ConfigError(f"eval.postprocess.{key}", f"model '{cfg.model.name}' has no such post-processing",
                              "remove the key (it applies to nested-region models, e.g. incomplete_seg on BraTS)")


PHANTOM_RECORD = ".medfuse-phantom.json"
"""The file in a generated phantom folder that records what made it (family and ``data.demo_params``)."""


def prepare_demo_data(cfg: Config) -> None:
    """Generate ``data.demo``'s phantom into ``data.root`` when the root does not exist yet.

    The folder gets :data:`PHANTOM_RECORD`. A root that exists is used as it is, unless its record
    names another family or other ``data.demo_params``: then this refuses it (one line), rather
    than train on a phantom the config does not describe (e.g. a ``--quick`` one).

    Raises:
        ConfigError: ``data.demo`` names a family without demo data, or ``data.root`` holds a
            phantom made with other parameters.
    """
    if not cfg.data.demo or cfg.data.root is None:
        return
    fam = FAMILIES.get(cfg.data.demo)
    if fam.make_demo is None:
        raise ConfigError("data.demo", f"family '{fam.name}' has no demo data", "remove data.demo")
    want = {"family": fam.name, "demo_params": json.loads(json.dumps(dict(cfg.data.demo_params), default=str))}
    if Path(cfg.data.root).exists():
        record = Path(cfg.data.root) / PHANTOM_RECORD
        try:
            have = json.loads(record.read_text(encoding="utf-8")) if record.is_file() else None
        except (OSError, ValueError):
            have = None
        if have is not None and have != want:
            raise ConfigError("data.root", f"{cfg.data.root} holds the {have.get('family')} phantom made with "
                              f"data.demo_params={have.get('demo_params')}, not {want['demo_params']}",
                              "give another data.root (medfuse demo: another --out) or delete that folder")
        return
    # Several DDP ranks may get here at once: each writes a private copy and renames it into place;
    # the first rename wins and the others drop theirs (the phantom depends only on its parameters).
    root = Path(cfg.data.root)
    tmp = root.with_name(f".{root.name}.tmp-{os.getpid()}")
    try:
        fam.make_demo(tmp, **cfg.data.demo_params)
        (tmp / PHANTOM_RECORD).write_text(json.dumps(want, sort_keys=True) + "\n", encoding="utf-8")
        os.rename(tmp, root)
    except OSError:
        if not root.exists():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def build_datamodule(cfg: Config, run_dir: Path | None = None):
    """The family's data module (``Family.datamodule``) or the generic :class:`CaseDataModule`.

    A family data module must offer what the engine uses: ``loader(split)``, ``modalities``,
    ``table`` (with ``class_names``) and the Lightning dataloader methods; subclassing
    :class:`~medfuse.data.datamodule.CaseDataModule` gives all of them.
    """
    from medfuse.data.datamodule import CaseDataModule

    cfg = resolve(cfg)
    prepare_demo_data(cfg)
    fam, _ = family_of(cfg)
    data_params(cfg)  # refuse bad data.params before any data is read
    if fam.datamodule is not None:
        return fam.datamodule(cfg, run_dir)
    return CaseDataModule(cfg, run_dir)


def auto_model_args(dm: Any, cfg: Config) -> dict[str, Any]:
    """Model arguments derived from the data: channel count, class count, modality names, feature cache.

    A segmentation model has one class per declared mask value (``mask_labels``; class k = the k-th
    value in increasing order, :func:`~medfuse.data.labels.label_class_values`), unless
    ``data.num_classes`` says otherwise.
    """
    num_classes = cfg.data.num_classes
    kind = resolve(cfg).task
    if num_classes is None:
        if kind == "classification" and dm.table.class_names:
            num_classes = len(dm.table.class_names)
        elif kind == "segmentation" and dm.table.mask_labels:
            num_classes = len({int(v) for v in dm.table.mask_labels.values()})
    cache = str(Path(cfg.data.cache_dir) / "features") if cfg.data.cache_dir else None
    return {"in_channels": len(dm.modalities), "num_classes": num_classes, "modalities": list(dm.modalities),
            "feature_cache": cache}


def demo_family(name: str) -> Family:
    """The family whose demo ``medfuse demo NAME`` runs (one-line error for unknown names)."""
    if name not in FAMILIES:
        raise MedfuseError(name, "no demo for this family", f"use one of: {', '.join(FAMILIES.names())}")
    return FAMILIES.get(name)
