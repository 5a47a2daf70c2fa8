"""Experiment configuration: pydantic v2 schemas, YAML loading and ``a.b=c`` overrides.

One YAML file describes one experiment (``configs/<family>_<dataset>.yaml``). It has four sections,
``data``, ``model``, ``train`` and ``eval``, plus a few top-level keys. Unknown keys and values of
the wrong type are refused with a one-line :class:`~medfuse.errors.ConfigError` that names the key
and lists the valid ones. Nothing in a config is executed or imported: models are registry names.

All spatial tuples (``spacing``, ``spatial_size``, ``roi_size``) are in array order ``(D, H, W)``.
"""

from __future__ import annotations

import copy
import os
import typing
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from medfuse.errors import ConfigError


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


Prob = Annotated[float, Field(ge=0.0, le=1.0)]
PosFloat = Annotated[float, Field(gt=0.0)]
NonNegFloat = Annotated[float, Field(ge=0.0)]
PosInt = Annotated[int, Field(ge=1)]
NonNegInt = Annotated[int, Field(ge=0)]
Fraction = Annotated[float, Field(ge=0.0, lt=1.0)]


class IntensityConfig(_Strict):
    """Intensity normalisation of one modality.

    ``percentile`` clips to the ``lower``/``upper`` percentiles (of nonzero voxels when ``nonzero``)
    and scales to [0, 1] (MR). ``ct_window`` clips HU to ``level +- width/2`` and scales to [0, 1].
    ``zscore`` subtracts the mean and divides by the std (of nonzero voxels when ``nonzero``).
    """

    kind: Literal["percentile", "ct_window", "zscore", "none"] = "percentile"
    lower: float = Field(0.5, ge=0.0, le=100.0)
    upper: float = Field(99.5, ge=0.0, le=100.0)
    level: float = 40.0
    width: PosFloat = 400.0
    nonzero: bool = False

    @model_validator(mode="after")
    def _ordered(self) -> IntensityConfig:
        if self.lower >= self.upper:
            raise ValueError(f"lower ({self.lower}) must be below upper ({self.upper})")
        return self


class AugmentConfig(_Strict):
    """Training-only random augmentation (MONAI ``Rand*d`` transforms). Probabilities are per sample."""

    flip_prob: Prob = 0.0
    flip_axes: list[int] = Field(default_factory=lambda: [1, 2], description="array axes of (D, H, W)")
    rotate_prob: Prob = 0.0
    rotate_deg: NonNegFloat = 10.0
    scale_prob: Prob = 0.0
    scale_range: Fraction = 0.1
    intensity_prob: Prob = 0.0
    intensity_shift: NonNegFloat = 0.1
    intensity_scale: NonNegFloat = 0.1
    noise_prob: Prob = 0.0
    noise_std: NonNegFloat = 0.05


class TransformsConfig(_Strict):
    """The MONAI dict-transform chain (see :mod:`medfuse.data.transforms`)."""

    orientation: str | None = "RAS"
    spacing: tuple[PosFloat, PosFloat, PosFloat] | None = None
    intensity: dict[str, IntensityConfig] = Field(
        default_factory=lambda: {"*": IntensityConfig()},
        description="per modality; the key '*' applies to modalities not named",
    )
    spatial_size: tuple[PosInt, PosInt, PosInt] | None = Field(
        None, description="training patch (D, H, W) cut by train_crop; optional. Segmentation evaluation "
        "and predict always use whole volumes (classification/contrastive chains centre-crop to it)")
    train_crop: Literal["center", "random", "foreground"] = "center"
    augment: AugmentConfig = Field(default_factory=AugmentConfig)


class SplitConfig(_Strict):
    """Patient-level train/val/test split; cases with a ``split`` column keep it."""

    val: Fraction = 0.15
    test: Fraction = 0.15
    seed: NonNegInt = 0
    stratify: bool = True
    fold: int | None = Field(
        None, ge=1, description="use the dataset's official folds (BUS-BRA 5-fold-cv.csv): this fold is the test "
        "split, the other folds are train/val by patient (val as above; test is then ignored)")

    @model_validator(mode="after")
    def _room_for_training(self) -> SplitConfig:
        if self.val + self.test >= 1.0:
            raise ValueError(f"val + test = {self.val + self.test:g} leaves no training cases (must be below 1)")
        return self


class DicomConfig(_Strict):
    """How DICOM folders and SEGs are read (:class:`medfuse.data.dicom.DicomOptions`)."""

    series: str | None = Field(None, description="series to read from a folder holding several: UID, number or description")
    on_gap: Literal["error", "resample"] = Field(
        "error", description="missing slices / uneven spacing: refuse, or resample onto a uniform grid (logged)")
    seg_threshold: float = Field(0.5, gt=0, le=1, description="threshold of fractional DICOM SEG segments")
    reference: str | None = Field(None, description="image series a DICOM SEG is placed on (default: found by UID)")
    b_value: float | Literal["highest"] | None = Field(
        None, description='b-value (s/mm², within 1%) to read from a DWI series holding several, or "highest"; '
        "series with one b-value or none read as they are")

    @field_validator("b_value", mode="before")
    @classmethod
    def _b_value(cls, v: Any) -> Any:
        if v is None or (isinstance(v, str) and v.strip().lower() == "highest"):
            return None if v is None else "highest"
        try:
            b = float(v) if not isinstance(v, bool) else float("nan")
        except (TypeError, ValueError):
            b = float("nan")
        if not (b >= 0 and b != float("inf")):
            raise ValueError('is not a b-value: give a number of s/mm² >= 0 (e.g. 800) or "highest"')
        return b


class DataConfig(_Strict):
    """Where the cases are and how they become tensors."""

    root: str | None = None
    layout: Literal["auto", "manifest", "nnunet", "msd", "brats", "busbra", "cellmap", "nsclc", "ctrate",
                    "omniabnorm"] = "auto"
    demo: str | None = Field(None, description="generate this family's demo data into root if it is missing")
    demo_params: dict[str, Any] = Field(default_factory=dict)
    modalities: list[str] | None = None
    num_classes: PosInt | None = None
    class_names: list[str] | None = None
    label_map: dict[int, int] | None = Field(
        None, description="regroup case labels, e.g. {0: 0, 1: 0, 2: 1, 3: 1} for T1-2 vs T3-4 (set class_names too)")
    split: SplitConfig = Field(default_factory=SplitConfig)
    dicom: DicomConfig = Field(default_factory=DicomConfig)
    transforms: TransformsConfig = Field(default_factory=TransformsConfig)
    batch_size: PosInt = 2
    eval_batch_size: PosInt | None = None
    num_workers: NonNegInt = 0
    cache_dir: str | None = Field(None, description="MONAI PersistentDataset disk cache of deterministic transforms")
    params: dict[str, Any] = Field(default_factory=dict,
                                   description="family-specific data options, checked by the family's data module")


class ModelConfig(_Strict):
    """A registered model and its parameters (validated by the family's pydantic params model)."""

    name: str = "baseline_cnn3d"
    params: dict[str, Any] = Field(default_factory=dict)
    weights: str | None = Field(None, description="local path to initial weights (safetensors or .pt)")


class StageConfig(_Strict):
    """One stage of multi-stage training: its own epochs, trainable parts and loss weights."""

    name: str
    max_epochs: int = Field(1, ge=1)
    trainable: list[str] | None = Field(None, description="fnmatch patterns of parameter names; None = all")
    frozen: list[str] = Field(default_factory=list, description="fnmatch patterns frozen in this stage")
    losses: dict[str, NonNegFloat] = Field(default_factory=dict)
    lr: PosFloat | None = None


class TrainConfig(_Strict):
    """Optimisation and the Lightning Trainer."""

    max_epochs: int = Field(10, ge=1)
    lr: PosFloat = 1e-3
    weight_decay: NonNegFloat = 1e-4
    optimizer: Literal["adamw", "adam", "sgd"] = "adamw"
    scheduler: Literal["cosine", "none"] = "cosine"
    warmup_epochs: NonNegInt = 0
    accumulate_grad_batches: int = Field(1, ge=1)
    gradient_clip_val: NonNegFloat | None = 1.0
    precision: Literal["auto", "32", "bf16-mixed", "16-mixed"] = Field(
        "auto", description="auto = bf16-mixed on CUDA, 32 on CPU"
    )
    accelerator: Literal["auto", "cpu", "gpu", "cuda", "mps"] = Field(
        "auto", description="checked against the machine before training starts")
    devices: int | str = Field("auto", description="a count (-1 = all), 'auto', or GPU indices like '0,1'")
    num_nodes: PosInt = 1
    strategy: str = "auto"
    sync_batchnorm: bool = Field(False, description="under DDP, BatchNorm statistics over the global batch "
                                 "(torch.nn.SyncBatchNorm); no effect in one process")
    monitor: str = "val/loss"
    mode: Literal["min", "max"] = "min"
    seed: int = Field(0, ge=0, le=2**32 - 1)
    deterministic: bool | Literal["warn"] = "warn"
    log_every_n_steps: PosInt = 10
    progress_bar: bool = True
    loss: dict[str, float] = Field(default_factory=dict, description="loss weights, task-specific names")
    seg_loss: Literal["dice_ce", "dice_focal", "dice"] = "dice_ce"
    class_weights: list[NonNegFloat] | None = None
    label_smoothing: Fraction = 0.0
    stages: list[StageConfig] = Field(default_factory=list)

    @field_validator("stages")
    @classmethod
    def _unique_stage_names(cls, v: list[StageConfig]) -> list[StageConfig]:
        names = [s.name for s in v]
        if len(set(names)) != len(names):
            raise ValueError(f"stage names must be unique, got {names}")
        return v

    @field_validator("devices")
    @classmethod
    def _devices(cls, v: int | str) -> int | str:
        if isinstance(v, int) and not (v == -1 or v >= 1):
            raise ValueError(f"devices must be -1 (all) or at least 1, got {v}")
        if isinstance(v, str) and v != "auto":
            text = v.strip().strip(",")
            if text.lstrip("-").isdigit():
                return cls._devices(int(text))
            if not all(p.strip().isdigit() for p in text.split(",")):
                raise ValueError(f"devices must be a count, 'auto' or device indices like '0,1', got {v!r}")
        return v


class PostprocessConfig(_Strict):
    """Optional post-processing of predicted label maps (off by default), applied alike by
    ``evaluate`` and ``predict`` of the models that support it (others refuse a set key)."""

    min_et_voxels: NonNegInt = Field(
        0, description="nested regions (BraTS WT/TC/ET): a case whose predicted enhancing tumour (the innermost "
        "region) has fewer voxels than this loses it to the region around it (ET -> NCR/TC), as the BraTS 2020 "
        "nnU-Net (Isensee et al. 2021); 0 = off")


class EvalConfig(_Strict):
    """Evaluation: which split, bootstrap settings, inference settings."""

    split: Literal["val", "test", "train"] = "test"
    n_boot: NonNegInt = 1000
    ci: float = Field(0.95, gt=0.0, lt=1.0)
    roi_size: tuple[PosInt, PosInt, PosInt] | None = Field(None, description="sliding-window ROI; None = whole volume")
    sw_overlap: Fraction = Field(0.25, description="sliding-window overlap between neighbouring windows")
    sw_mode: Literal["gaussian", "constant"] = Field(
        "gaussian", description="blending of overlapping windows (gaussian weights the window centre)")
    sw_batch_size: PosInt = Field(2, description="windows per forward pass")
    tta: bool = Field(False, description="mirroring test-time augmentation: every flip combination of the "
                      "spatial axes (8 passes in 3D), outputs averaged (nnU-Net)")
    save_probabilities: bool = Field(False, description="predict also writes <case>_probs.nii.gz (K channels)")
    postprocess: PostprocessConfig = Field(default_factory=PostprocessConfig)
    overlays: NonNegInt = 3


class Config(_Strict):
    """A whole experiment."""

    name: str = "run"
    family: str | None = Field(None, description="the model family; None = the family that registers model.name")
    task: Literal["classification", "segmentation", "contrastive"] | None = Field(
        None, description="the model's task kind; None = the registered model's own (a mismatch is refused)")
    output_dir: str = "runs"
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.name


# ----------------------------------------------------------------------------------------------
# errors


def _model_at(loc: tuple, root: type[BaseModel] | None = None) -> type[BaseModel] | None:
    """The pydantic model class that owns the field at ``loc`` (for listing valid keys)."""
    model: Any = root or Config
    for part in loc:
        if not (isinstance(model, type) and issubclass(model, BaseModel)):
            return None
        field = model.model_fields.get(str(part))
        if field is None:
            return model
        model = _unwrap(field.annotation)
    return model if isinstance(model, type) and issubclass(model, BaseModel) else None


def _unwrap(ann: Any) -> Any:
    """Strip Optional/list/dict wrappers down to a pydantic model class if there is one."""
    for arg in (ann, *typing.get_args(ann)):
        if isinstance(arg, type) and issubclass(arg, BaseModel):
            return arg
        for sub in typing.get_args(arg):
            if isinstance(sub, type) and issubclass(sub, BaseModel):
                return sub
    return ann


def _key_path(loc: tuple) -> str:
    return ".".join(str(p) for p in loc if not str(p).startswith(("function-after", "tagged-union", "[key]")))


def _to_config_error(err: ValidationError, source: str, root: type[BaseModel] | None = None,
                     prefix: str = "") -> ConfigError:
    e = err.errors()[0]
    loc = tuple(e["loc"])
    key = ".".join(p for p in (prefix, _key_path(loc)) if p)
    where = f"{source}: {key}" if source else key
    if e["type"] == "extra_forbidden":
        parent = _model_at(loc[:-1], root)
        valid = sorted(parent.model_fields) if parent else []
        return ConfigError(where, "unknown key", f"valid keys here are: {', '.join(valid)}")
    parent = _model_at(loc[:-1], root)
    field = parent.model_fields.get(str(loc[-1])) if parent is not None and loc else None
    expected = _describe(field.annotation) if field is not None else ""
    got = e.get("input")
    fix = f"give {expected}" if expected else "fix the value"
    if e["type"] in _BOUND_ERRORS:
        fix = "give a value " + str(e["msg"]).removeprefix("Input should be ")
    elif e["type"] == "value_error":
        fix = "fix the value"
    msg = str(e["msg"]).removeprefix("Value error, ")
    return ConfigError(where, f"{msg} (got {got!r})", fix)


_BOUND_ERRORS = ("greater_than", "greater_than_equal", "less_than", "less_than_equal", "too_short", "too_long")


def _describe(ann: Any) -> str:
    origin = typing.get_origin(ann)
    if origin is Literal:
        return "one of: " + ", ".join(repr(a) for a in typing.get_args(ann))
    text = (getattr(ann, "__name__", None) if origin is None else None) or str(ann)
    return "a value of type " + text.replace("typing.", "").replace("NoneType", "None")


# ----------------------------------------------------------------------------------------------
# loading


def parse_override(text: str) -> tuple[list[str], Any]:
    """Parse ``a.b.c=value`` (value as YAML: numbers, lists, null, true) into (path, value)."""
    if "=" not in text:
        raise ConfigError(text, "an override must look like key.path=value", "e.g. train.max_epochs=3")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(text, "empty key in override", "e.g. train.max_epochs=3")
    try:
        value = yaml.safe_load(raw) if raw.strip() != "" else ""
    except yaml.YAMLError as e:
        tag = refused_tag(e)
        if tag:
            raise ConfigError(key, f"refused the YAML tag '{tag}': a config holds plain values, nothing is executed",
                              "give a plain value (number, string, list)") from None
        raise ConfigError(key, f"cannot parse value {raw!r}: {getattr(e, 'problem', e)}",
                          "quote it or use YAML syntax") from e
    return key.split("."), value


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``a.b=c`` overrides to a raw config dict (returns a new dict)."""
    out = copy.deepcopy(raw)
    for text in overrides:
        path, value = parse_override(text)
        node = out
        for i, part in enumerate(path[:-1]):
            nxt = node.get(part)
            if nxt is None:
                nxt = node[part] = {}
            if not isinstance(nxt, dict):
                key = ".".join(path[: i + 1])
                raise ConfigError(key, f"is a value ({nxt!r}), not a section", "override the whole value instead")
            node = nxt
        node[path[-1]] = value
    return out


def read_yaml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(p, "config file not found", "pass the path of a YAML config (see configs/)")
    try:
        raw = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError as e:
        raise ConfigError(p, f"is not UTF-8 text (byte {e.start})", "save the config as UTF-8") from None
    except OSError as e:
        raise ConfigError(p, f"cannot be read ({e.strerror})", "check the file's permissions") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark is not None else ""
        tag = refused_tag(e)
        if tag:
            raise ConfigError(p, f"refused the YAML tag '{tag}'{at}: a config holds plain values and nothing in it "
                              "is executed or imported", "remove the tag and write the plain value") from None
        raise ConfigError(p, f"invalid YAML{at}", "fix the syntax") from e
    if not isinstance(raw, dict):
        raise ConfigError(p, "the top level must be a mapping of sections", "see configs/ for examples")
    return raw


def refused_tag(err: yaml.YAMLError) -> str | None:
    """The tag (e.g. ``!!python/object/apply:os.system``) that ``yaml.safe_load`` refused, else None."""
    import re

    if not isinstance(err, yaml.constructor.ConstructorError):
        return None
    m = re.search(r"tag '([^']+)'", str(getattr(err, "problem", "") or err))
    if m is None:
        return None
    return m.group(1).replace("tag:yaml.org,2002:", "!!")


def validate(raw: dict[str, Any], source: str = "") -> Config:
    """Validate a raw dict into a :class:`Config`, turning pydantic errors into one-line ConfigErrors."""
    try:
        return Config.model_validate(raw)
    except ValidationError as e:
        raise _to_config_error(e, source) from None


class Params(_Strict):
    """Base of every family's ``model.params`` and ``data.params`` models: unknown keys are refused.

    Each field carries a ``description`` (``medfuse models NAME`` prints them with types and defaults).
    """


def validate_params(model: type[BaseModel], raw: dict[str, Any] | None, prefix: str) -> Any:
    """Validate a params section (``model.params``, ``data.params``) into ``model``.

    Errors take the same one-line path as the top-level config, naming the key under ``prefix``.
    """
    try:
        return model.model_validate(dict(raw or {}))
    except ValidationError as e:
        raise _to_config_error(e, "", root=model, prefix=prefix) from None


def load_config(path: str | Path | None = None, overrides: list[str] | None = None,
                base: dict[str, Any] | None = None) -> Config:
    """Load a YAML config (or ``base`` dict), apply overrides, validate.

    Relative ``data.root`` and ``data.cache_dir`` paths stay relative to the working directory.
    """
    raw = read_yaml(path) if path is not None else copy.deepcopy(base or {})
    raw = apply_overrides(raw, overrides or [])
    try:
        return validate(raw, str(path) if path is not None else "")
    except ConfigError as e:  # a bad value given as an override is named as one, not as the file's
        given = {o.split("=", 1)[0].strip() for o in overrides or [] if "=" in o}
        key = e.where.split(": ", 1)[-1]
        if path is not None and any(key == g or key.startswith(g + ".") for g in given):
            raise ConfigError(f"override {key}", e.problem, e.fix) from None
        raise


_PATH_KEYS = ("weights", "checkpoint", "path")


def absolute_paths(cfg: Config) -> Config:
    """``cfg`` with its working-directory-relative paths made absolute, as a run saves them.

    ``data.root``, ``data.cache_dir`` and ``model.weights`` are relative to the working directory
    of ``train``; so are the files named in ``model.params`` (keys containing ``weights``,
    ``checkpoint`` or ``path``, at any depth) that exist there. Saved as given, a run's
    ``evaluate`` or ``predict`` from another folder could not find them. ``data.params`` paths are
    relative to ``data.root`` and are left as they are.
    """

    def absolute(value: Any) -> Any:
        return os.path.abspath(os.path.expanduser(value)) if isinstance(value, str) and value else value

    def walk(node: Any) -> Any:
        if isinstance(node, dict):
            return {k: absolute(v) if any(t in str(k).lower() for t in _PATH_KEYS) and isinstance(v, str)
                    and not os.path.isabs(v) and os.path.exists(v) else walk(v) for k, v in node.items()}
        if isinstance(node, list):
            return [walk(v) for v in node]
        return node

    data = cfg.data.model_copy(update={"root": absolute(cfg.data.root), "cache_dir": absolute(cfg.data.cache_dir)})
    model = cfg.model.model_copy(update={"weights": absolute(cfg.model.weights), "params": walk(cfg.model.params)})
    return cfg.model_copy(update={"data": data, "model": model})


def config_to_dict(cfg: Config) -> dict[str, Any]:
    return cfg.model_dump(mode="json")


def save_config(cfg: Config, path: str | Path) -> Path:
    """Write the resolved config as YAML, atomically."""
    from medfuse.fileio import atomic_open

    p = Path(path)
    text = yaml.safe_dump(config_to_dict(cfg), sort_keys=False)
    with atomic_open(p, "w", encoding="utf-8") as f:
        f.write(text)
    return p
