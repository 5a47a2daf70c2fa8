"""Portable model packages: ``medfuse export RUN --out model.zip`` and ``medfuse predict model.zip ...``.

A package is a zip archive holding exactly these members (nothing else is accepted):

==========================  ==================================================================
``medfuse_package.json``    format tag, medfuse version, family, model, task, checkpoint, stage,
                            the data-derived model arguments, the sha256 of every other member
``config.yaml``             the run's resolved config
``weights.safetensors``     the selected checkpoint's model weights (``best.ckpt``)
``labels.json``             modalities (channel order), class names, mask labels and values
``preprocessing.json``      the ``data.transforms`` chain, the size divisor, the training image shape
``predictor.json``          what the family's predictor reads from its data module
                            (:meth:`~medfuse.engine.predict.Predictor.package_state`)
``splits.csv``              the run's patient-level split (when the run has one)
``model_card.md``           a short model card with the run's test metrics and their CIs
==========================  ==================================================================

Loading never unpickles and never extracts anything to disk: members are read into memory, JSON
and YAML are parsed safely, the weights are safetensors. A member that is not one of the names
above (a pickle such as ``model.pt``, a path such as ``../x``), a duplicate name, an encrypted or
oversized member, or one whose sha256 differs from the manifest's is refused with one line naming
the package. ``predict`` from a package needs neither the training data nor the run folder.
"""

from __future__ import annotations

import hashlib
import json
import zipfile
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import torch
import yaml

from medfuse.config import Config, apply_overrides, config_to_dict, validate
from medfuse.errors import MedfuseError, RunDirError, WeightsError

FORMAT = "medfuse-model-package-v1"
MANIFEST = "medfuse_package.json"
MEMBERS = ("config.yaml", "weights.safetensors", "labels.json", "preprocessing.json", "predictor.json",
           "splits.csv", "model_card.md")
REQUIRED = ("config.yaml", "weights.safetensors", "labels.json", "preprocessing.json", "predictor.json")
PICKLE_SUFFIXES = (".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".bin", ".npy", ".joblib")
MAX_MEMBER_BYTES = 32 * 2**30
"""Largest uncompressed member accepted (a guard against zip bombs; far above any medfuse model)."""
MAX_TEXT_BYTES = 64 * 2**20
_FIX = "re-export the package with medfuse export RUN --out model.zip (packages hold safetensors, JSON and YAML only)"


def is_package(path: str | Path) -> bool:
    """Whether ``path`` is a file to be read as a model package (a run directory is a folder)."""
    return Path(path).is_file()


# ------------------------------------------------------------------------------------------ export


def export(run_dir: str | Path, out: str | Path, which: str = "best", without_ids: bool = False) -> Path:
    """Write a run's model package (see the module docstring); return its path.

    Args:
        run_dir: a trained run (its data set is read once, for what the predictor needs).
        out: the package file to write, ending in ``.zip`` (refused when it exists).
        which: the checkpoint to pack (``best``: the one selected on the validation split).
        without_ids: leave ``splits.csv`` (every case and patient id of the split) and the data
            paths of ``config.yaml`` (``data.root``, ``data.cache_dir``) out of the package, for data
            whose ids must not travel; the model card keeps the split's counts.

    Raises:
        RunDirError: not a run directory, no such checkpoint, or ``out`` is not a new ``.zip`` path.
    """
    from medfuse.engine.lock import RunLock
    from medfuse.engine.trainer import load_run

    run_dir, out = Path(run_dir), Path(out)
    if out.suffix.lower() != ".zip":
        raise RunDirError(out, "a model package is a .zip file", f"use --out {out.with_suffix('.zip').name}")
    if out.exists():
        raise RunDirError(out, "already exists", "choose another file name or delete the old package")
    if not (run_dir / "config.yaml").is_file():
        load_run(run_dir)  # the one-line "not a run directory" error, before a lock file is made
    with RunLock(run_dir, "export"):
        members = _build_members(run_dir, which, without_ids)
    return _write_zip(out, members)


def _build_members(run_dir: Path, which: str, without_ids: bool = False) -> dict[str, bytes]:
    from safetensors.torch import save as st_save

    from medfuse.engine.build import auto_model_args, family_of
    from medfuse.engine.checkpoint import find_checkpoint, read_checkpoint
    from medfuse.engine.evaluate import load_trained
    from medfuse.engine.predict import training_image_shape
    from medfuse.engine.tasks import SegmentationTask

    ckpt_path = find_checkpoint(run_dir, which)
    cfg, dm, task = load_trained(run_dir, which)
    fam, entry = family_of(cfg)
    epoch = read_checkpoint(ckpt_path).get("epoch")
    # clones: safetensors refuses tensors that share memory (tied weights); loading re-ties them
    sd = {k: v.detach().cpu().clone().contiguous() for k, v in task.model.state_dict().items()}
    auto = {**auto_model_args(dm, cfg), "feature_cache": None}
    stages = cfg.train.stages
    labels = _jsonable({**entry.predictor.package_labels(dm, cfg), "num_classes": auto.get("num_classes")})
    ref = training_image_shape(dm) if dm.cases.get("train") else None
    prep = {"transforms": cfg.data.transforms.model_dump(mode="json"), "modalities": list(dm.modalities),
            "size_divisor": task.size_divisor if isinstance(task, SegmentationTask) else None,
            "reference_shape": list(ref) if ref else None,
            "axes": "(C, D, H, W); affines are RAS for voxel (w, h, d)"}
    state = _jsonable(entry.predictor.package_state(dm, cfg))
    external = external_files(entry.predictor.portable_config(cfg))
    report = _read_report(run_dir)
    members: dict[str, bytes] = {
        "config.yaml": yaml.safe_dump(_without_data_paths(config_to_dict(cfg)) if without_ids else config_to_dict(cfg),
                                      sort_keys=False).encode("utf-8"),
        "weights.safetensors": st_save(sd, metadata={"format": FORMAT, "checkpoint": f"{which}.ckpt"}),
        "labels.json": _dumps(labels),
        "preprocessing.json": _dumps(prep),
        "predictor.json": _dumps(state),
    }
    splits = run_dir / "splits.csv"
    if splits.is_file() and not without_ids:
        members["splits.csv"] = splits.read_bytes()
    members["model_card.md"] = model_card(cfg, fam.name, which, epoch, labels, prep, report,
                                          splits.read_text(encoding="utf-8") if splits.is_file() else None,
                                          external, ids_included=not without_ids).encode("utf-8")
    import medfuse

    manifest = {"format": FORMAT, "medfuse_version": medfuse.__version__, "torch_version": torch.__version__,
                "created": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
                "name": cfg.name, "family": fam.name, "model": cfg.model.name, "task": cfg.task,
                "checkpoint": f"{which}.ckpt", "epoch": epoch, "stage": stages[-1].name if stages else None,
                "auto": _jsonable(auto), "external_files": external,
                "sha256": {k: hashlib.sha256(v).hexdigest() for k, v in members.items()}}
    return {MANIFEST: _dumps(manifest), **members}


def _write_zip(out: Path, members: dict[str, bytes]) -> Path:
    from medfuse.fileio import atomic_open

    with atomic_open(out, "wb") as f, zipfile.ZipFile(f, "w") as zf:
        for name, data in members.items():
            info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_STORED if name.endswith(".safetensors") else zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            zf.writestr(info, data)
    return out


def _dumps(obj: Any) -> bytes:
    return (json.dumps(obj, indent=2, allow_nan=True) + "\n").encode("utf-8")


def _jsonable(obj: Any) -> Any:
    """Plain JSON types of ``obj`` (numpy/torch scalars and arrays, tuples, paths)."""
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (np.ndarray, torch.Tensor)):
        return _jsonable(np.asarray(obj.detach().cpu() if isinstance(obj, torch.Tensor) else obj).tolist())
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    if obj is None or isinstance(obj, (str, int, float, bool)):
        return obj
    raise TypeError(f"package state holds a {type(obj).__name__}, which is not JSON")


def _read_report(run_dir: Path) -> dict[str, Any] | None:
    path = run_dir / "report.json"
    if not path.is_file():
        return None
    try:
        rep = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return rep if isinstance(rep, dict) and rep.get("metrics") else None


def _fmt(v: Any) -> str:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return "n/a"
    return f"{f:.4g}" if np.isfinite(f) else "n/a"


def external_files(cfg: Config) -> dict[str, str]:
    """``{config key: path}`` of the local files and folders that ``model.params`` / ``data.params``
    name (frozen foundation weights such as ``image_weights``, ``hf:<folder>`` encoders): the model
    is built from them, so the machine that runs the package needs them at the same path."""
    found: dict[str, str] = {}

    def walk(node: Any, key: str) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, f"{key}.{k}")
        elif isinstance(node, (list, tuple)):
            for i, v in enumerate(node):
                walk(v, f"{key}.{i}")
        elif isinstance(node, str):
            text = node[3:] if node.startswith("hf:") else node
            if ("/" in text or "\\" in text) and Path(text).exists():
                found[key] = text

    walk(cfg.model.params, "model.params")
    walk(cfg.data.params, "data.params")
    return found


def _without_data_paths(raw: dict[str, Any]) -> dict[str, Any]:
    """A config dict without the training machine's data paths (``data.root``, ``data.cache_dir``)."""
    data = {**raw.get("data", {}), "root": None, "cache_dir": None}
    return {**raw, "data": data}


def model_card(cfg: Config, family: str, which: str, epoch: Any, labels: dict[str, Any], prep: dict[str, Any],
               report: dict[str, Any] | None, splits_csv: str | None, external: dict[str, str] | None = None,
               ids_included: bool = True) -> str:
    """The package's ``model_card.md``: model, inputs, outputs, data split and the run's evaluation
    (metrics with their bootstrap CIs and n, from ``report.json``; "not evaluated" without one).

    ``labels["card"]`` (optional, filled by a family's ``package_labels``) replaces the generic
    ``inputs``, ``preprocessing`` and ``outputs`` (grid) texts where the family's differ."""
    t = prep["transforms"]
    card = labels.get("card") or {}
    lines = [f"# {cfg.name}", "",
             f"- family `{family}`, model `{cfg.model.name}`, task `{cfg.task}`",
             f"- weights: `{which}.ckpt`" + (f" (epoch {epoch})" if isinstance(epoch, int) else "")
             + (f", selected on `{cfg.train.monitor}` ({cfg.train.mode}) on the validation split" if which == "best"
                else ""),
             "- inputs: " + (card.get("inputs")
                             or f"{', '.join(labels['modalities'])} (one image per modality, in this channel order)"),
             "- preprocessing: " + (card.get("preprocessing")
                                    or f"orientation {t.get('orientation')}, spacing {t.get('spacing') or 'as stored'}, "
                                    f"intensity {json.dumps(t.get('intensity'))}"
                                    + (f"; sizes padded to a multiple of {prep['size_divisor']}"
                                       if prep.get("size_divisor") else "")),
             ]
    out_labels = labels.get("output_labels") or labels.get("mask_labels")
    if out_labels:
        lines.append(f"- outputs: label map with {json.dumps(out_labels)}, "
                     + (card.get("outputs") or "on each input's own grid"))
    elif labels.get("class_names"):
        lines.append(f"- outputs: classes {', '.join(labels['class_names'])}")
    if splits_csv:
        import csv
        import io

        counts: dict[str, int] = {}
        patients: dict[str, set[str]] = {}
        own_patient = True  # every case its own patient: the data set gave no patient ids
        for r in csv.DictReader(io.StringIO(splits_csv)):
            split = str(r.get("split") or "?").strip()
            counts[split] = counts.get(split, 0) + 1
            pid = str(r.get("patient_id") or r.get("case_id") or "")
            patients.setdefault(split, set()).add(pid)
            own_patient &= pid == str(r.get("case_id") or "")
        where = ("`splits.csv`, which names every case and patient id" if ids_included
                 else "counts only: `splits.csv` was left out of this package (`--without-ids`)")
        how = "by case: the data set gives no patient ids" if own_patient else "by patient"
        lines.append(f"- split ({how}, {where}): " + ", ".join(
            f"{k} {v} cases" + (f" of {len(patients[k])} patients" if len(patients[k]) != v else "")
            for k, v in sorted(counts.items())))
    for key, path in (external or {}).items():
        lines.append(f"- needs `{path}` (`{key}`) on the machine that runs the package: the model is built from it")
    lines += ["", "## Evaluation", ""]
    if report is None:
        lines += ["not evaluated (run `medfuse evaluate RUN` before `medfuse export` to include the test metrics)"]
    else:
        ci = float(report.get("ci", 0.95))
        cases = f"n = {report.get('n', '?')} cases" + (f" of {report['n_patients']} patients (CIs resample patients)"
                                                        if report.get("n_patients") else "")
        lines += [f"`{report.get('split', 'test')}` split, {cases}, {100 * ci:g}% bootstrap CIs "
                  f"({report.get('n_boot', '?')} resamples)", "",
                  f"| metric | value | {100 * ci:g}% CI | n |", "|---|---|---|---|"]
        for name, m in report["metrics"].items():
            if isinstance(m, dict) and "value" in m:
                lines.append(f"| {name} | {_fmt(m.get('value'))} | [{_fmt(m.get('low'))}, {_fmt(m.get('high'))}] "
                             f"| {m.get('n', '')} |")
    lines += ["", "## Use", "", "```", "medfuse predict model.zip INPUT... --out DIR [eval.key=value ...]", "```", ""]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ reading


class Package:
    """The members of a model package, read into memory and checked (see the module docstring)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.members = _read_members(self.path)
        self.manifest = self.json(MANIFEST)
        if self.manifest.get("format") != FORMAT:
            raise WeightsError(self.path, f"is not a medfuse model package (format {self.manifest.get('format')!r})",
                               _FIX)
        sums = self.manifest.get("sha256") or {}
        for name in REQUIRED:
            if name not in self.members:
                raise WeightsError(self.path, f"has no '{name}'", _FIX)
        for name, data in self.members.items():
            if name == MANIFEST:
                continue
            if sums.get(name) != hashlib.sha256(data).hexdigest():
                raise WeightsError(self.path, f"member '{name}' does not match the manifest's checksum (corrupt or "
                                   "edited)", _FIX)

    def json(self, name: str) -> Any:
        try:
            return json.loads(self.members[name].decode("utf-8"))
        except KeyError:
            raise WeightsError(self.path, f"has no '{name}'", _FIX) from None
        except ValueError as e:
            raise WeightsError(self.path, f"member '{name}' is not valid JSON ({type(e).__name__})", _FIX) from None

    def config(self, overrides: list[str] | None = None) -> Config:
        """The packed config with ``overrides`` (``eval.*``) applied."""
        try:
            raw = yaml.safe_load(self.members["config.yaml"].decode("utf-8")) or {}
        except (UnicodeDecodeError, yaml.YAMLError):
            raise WeightsError(self.path, "member 'config.yaml' is not plain YAML (tags are refused)", _FIX) from None
        if not isinstance(raw, dict):
            raise WeightsError(self.path, "member 'config.yaml' is not a mapping", _FIX)
        return validate(apply_overrides(raw, overrides or []), f"{self.path}:config.yaml")

    def state_dict(self) -> dict[str, torch.Tensor]:
        from safetensors.torch import load as st_load

        try:
            return st_load(self.members["weights.safetensors"])
        except Exception as e:  # noqa: BLE001 - safetensors raises its own error types on bad bytes
            raise WeightsError(self.path, f"member 'weights.safetensors' is not a safetensors file ({type(e).__name__})",
                               _FIX) from None


def _unsafe_name(name: str) -> str | None:
    """Why a member name is refused, or None."""
    p = PurePosixPath(name)
    if "\\" in name or name.startswith("/") or (len(name) > 1 and name[1] == ":") or ".." in p.parts \
            or "\x00" in name:
        return f"member '{name}' is a path outside the package (path traversal)"
    if p.suffix.lower() in PICKLE_SUFFIXES:
        return f"member '{name}' is a pickle/torch file; loading a package never unpickles"
    if name != MANIFEST and name not in MEMBERS:
        return f"has an unexpected member '{name}'"
    return None


def _read_members(path: Path) -> dict[str, bytes]:
    if not path.is_file():
        raise RunDirError(path, "not found", "give a run directory or a model package (.zip) from medfuse export")
    if not zipfile.is_zipfile(path):
        raise WeightsError(path, "is neither a run directory nor a model package (not a zip file)",
                           "give runs/<name> or the .zip written by medfuse export")
    out: dict[str, bytes] = {}
    try:
        with zipfile.ZipFile(path) as zf:
            infos = zf.infolist()
            for info in infos:
                problem = _unsafe_name(info.filename)
                if problem is None and info.filename in out:
                    problem = f"has member '{info.filename}' twice"
                if problem is None and info.flag_bits & 0x1:
                    problem = f"member '{info.filename}' is encrypted"
                limit = MAX_MEMBER_BYTES if info.filename.endswith(".safetensors") else MAX_TEXT_BYTES
                if problem is None and info.file_size > limit:
                    problem = f"member '{info.filename}' declares {info.file_size} bytes (more than {limit})"
                if problem is not None:
                    raise WeightsError(path, problem, _FIX)
                with zf.open(info) as f:
                    data = f.read(limit + 1)
                if len(data) > limit:
                    raise WeightsError(path, f"member '{info.filename}' is larger than it declares", _FIX)
                if data[:1] == b"\x80" and not info.filename.endswith(".safetensors"):
                    raise WeightsError(path, f"member '{info.filename}' holds a pickle; loading never unpickles", _FIX)
                out[info.filename] = data
    except MedfuseError:
        raise
    except (zipfile.BadZipFile, OSError, EOFError, ValueError, NotImplementedError) as e:
        raise WeightsError(path, f"cannot read the package ({type(e).__name__}: {str(e)[:100]})",
                           "the file is corrupt or truncated; export it again") from None
    if MANIFEST not in out:
        raise WeightsError(path, f"has no '{MANIFEST}' (not a medfuse model package)", _FIX)
    return out


def load_package(path: str | Path, overrides: list[str] | None = None) -> Any:
    """A package's predictor, ready to run: the family's ``Predictor`` over the packed model (in
    eval mode, on the config's device) and the packed data view (no data set is read).

    Args:
        path: the ``.zip`` written by :func:`export`.
        overrides: ``eval.*=value`` overrides.

    Raises:
        WeightsError: a refused or corrupt package, or weights that do not fit the packed model.
        ConfigError: a bad override, or a packed config this medfuse cannot build.
    """
    from medfuse.engine.build import check_postprocess, family_of, resolve
    from medfuse.engine.checkpoint import mismatch_summary
    from medfuse.engine.evaluate import device_for
    from medfuse.engine.predict import PackagedData, PackagedTable

    pkg = Package(path)
    man = pkg.manifest
    cfg = resolve(pkg.config(overrides))
    fam, entry = family_of(cfg)
    if (fam.name, cfg.model.name) != (man.get("family"), man.get("model")):
        raise WeightsError(pkg.path, f"manifest names {man.get('family')}/{man.get('model')} but config.yaml "
                           f"{fam.name}/{cfg.model.name}", _FIX)
    check_postprocess(cfg, entry.predictor.postprocess_keys)
    cfg = entry.predictor.portable_config(cfg)
    for key, where in (man.get("external_files") or {}).items():
        if not Path(where).exists():
            raise WeightsError(pkg.path, f"needs {key} = {where}, which is not on this machine (the model is built "
                               "from it; the package holds the trained weights only)",
                               f"put the file or folder at {where}")
    stage = next((s for s in cfg.train.stages if s.name == man.get("stage")), None)
    task = entry.task(config_to_dict(cfg), auto=dict(man.get("auto") or {}),
                      stage=stage.model_dump() if stage else None)
    sd = pkg.state_dict()
    diff = mismatch_summary(task.model.state_dict(), sd)
    if diff:
        raise WeightsError(pkg.path, f"weights do not match the packed model: {diff}", _FIX)
    task.model.load_state_dict(sd, strict=True)
    task.eval()
    task = task.to(device_for(cfg))
    labels, prep = pkg.json("labels.json"), pkg.json("preprocessing.json")
    data = PackagedData(labels["modalities"], labels.get("mask_values"),
                        PackagedTable(labels.get("class_names"), labels.get("mask_labels")),
                        prep.get("reference_shape"))
    view = entry.predictor.package_data(data, cfg, pkg.json("predictor.json"))
    return entry.predictor(task, view, cfg)
