"""The ``medfuse`` command line (typer).

User mistakes (any :class:`~medfuse.errors.MedfuseError`, however deep it was raised) print one
line to stderr and exit with code 2; so does an operating-system refusal to write a file (no
permission, read-only or full disk, a file where a folder should be), naming the file. Ctrl-C
prints one line (for ``train``: the last checkpoint and how to resume) and exits with 130.
Anything else is a bug and shows its traceback.
"""

from __future__ import annotations

import errno
import os
import sys
import warnings
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

import medfuse.families  # noqa: F401  (registers the families)
from medfuse.errors import Interrupted, MedfuseError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="medfuse: context-aware, multi-modal 3D medical image analysis.")
data_app = typer.Typer(no_args_is_help=True, help="Data: demo generators and integrity checks.")
app.add_typer(data_app, name="data")
console = Console()
err_console = Console(stderr=True)

@app.command()
def demo(
    family: Annotated[str, typer.Argument(help="family whose demo to run")] = "staging",
    out: Annotated[Path, typer.Option(help="output folder (data + runs)")] = Path("runs/demo"),
    quick: Annotated[bool, typer.Option(help="tiny data and few epochs (smoke test)")] = False,
    main_only: Annotated[bool, typer.Option(help="train only the full model, not the ablation variants")] = False,
    seeds: Annotated[str | None, typer.Option(
        help="run the key comparison once per train seed, e.g. 0,1,2; writes OUT/seeds.md")] = None,
    overrides: Annotated[list[str] | None, typer.Argument(help="config overrides key=value")] = None,
) -> None:
    """Generate a family's demo data, train every ablation variant, evaluate on the test split, report."""
    from medfuse.engine.demo import parse_seeds, run_demo

    run_demo(family, out, quick=quick, overrides=overrides or [], console=console, main_only=main_only,
             seeds=parse_seeds(seeds) if seeds is not None else None)


@data_app.command("make-demo")
def make_demo_cmd(
    family: Annotated[str, typer.Argument(help="family whose demo data to generate")],
    out: Annotated[Path, typer.Option(help="output folder")],
    quick: Annotated[bool, typer.Option(help="a small dataset")] = False,
    seed: Annotated[int, typer.Option(help="generator seed")] = 0,
) -> None:
    """Write a family's procedural demo dataset (NIfTI + manifest)."""
    from medfuse.registry import FAMILIES

    with_demo = [f.name for f in FAMILIES if f.make_demo is not None]
    if family not in with_demo:
        raise MedfuseError(family, "no demo data generator for this family", f"use one of: {', '.join(with_demo)}")
    path = FAMILIES.get(family).make_demo(out, quick=quick, seed=seed)
    console.print(f"wrote demo data for [bold]{family}[/] -> {path}")


@data_app.command("check")
def data_check(
    path: Annotated[Path | None, typer.Argument(
        help="dataset folder or manifest (default with --config: its data.root)", show_default=False)] = None,
    overrides: Annotated[list[str] | None, typer.Argument(
        help="config overrides key=value, e.g. data.dicom.b_value=highest (without --config: data.dicom.* only)",
        show_default=False)] = None,
    config: Annotated[Path | None, typer.Option(
        help="a run's YAML config: check the dataset as that run reads it (data.dicom, data.modalities, "
             "data.class_names, data.label_map, the task's label rules)", show_default=False)] = None,
    layout: Annotated[str | None, typer.Option(
        help="auto|manifest|nnunet|msd|brats|busbra|cellmap|nsclc|ctrate|omniabnorm "
             "(default: auto, or the config's data.layout)", show_default=False)] = None,
) -> None:
    """Check a dataset's integrity; one line per problem; exit 0 when clean, 2 otherwise."""
    import re
    from contextlib import nullcontext

    from medfuse.config import load_config
    from medfuse.data.checks import run_check
    from medfuse.data.dicom import use_dicom_options

    overrides = list(overrides or [])
    if path is not None and not path.exists() and re.match(r"[A-Za-z_][\w.]*=", str(path)):
        path, overrides = None, [str(path), *overrides]  # `data check --config C.yaml key=value`: no PATH
    if config is None:
        if path is None:
            raise MedfuseError("PATH", "no dataset given", "medfuse data check PATH [--config CONFIG.yaml]")
        for text in overrides:
            if not text.startswith("data.dicom."):
                raise MedfuseError(text, "without --config data check takes only data.dicom.* overrides",
                                   "pass --config CONFIG.yaml (the run's config) or drop the override")
        dicom = load_config(None, overrides).data.dicom if overrides else None  # validated as in a config
        with use_dicom_options(dicom) if dicom is not None else nullcontext():
            raise typer.Exit(run_check(path, layout=layout or "auto", settings=" ".join(overrides) or None))
    from medfuse.engine.build import family_of, resolve

    cfg = resolve(load_config(config, overrides))  # family and task as train resolves them
    settings = config.name + (f" + {' '.join(overrides)}" if overrides else "")
    from medfuse.data.check_config import run_check_as_run

    partial = family_of(cfg)[1].predictor.partial_modalities
    raise typer.Exit(run_check_as_run(cfg, path, layout, partial_modalities=partial, settings=settings))


@app.command()
def train(
    config: Annotated[Path | None, typer.Argument(help="YAML config")] = None,
    overrides: Annotated[list[str] | None, typer.Argument(help="overrides like train.max_epochs=3")] = None,
    resume: Annotated[Path | None, typer.Option(help="continue a killed run from its last checkpoint")] = None,
    stage: Annotated[str | None, typer.Option(help="run a single stage (from the previous stage's best)")] = None,
) -> None:
    """Train a model from a config (or resume a run)."""
    from medfuse.engine.trainer import fit, resume_run

    if resume is not None:
        run_dir = resume_run(resume)
    else:
        if config is None:
            raise MedfuseError("CONFIG", "no config given", "medfuse train configs/<family>_<dataset>.yaml")
        from medfuse.config import load_config

        cfg = load_config(config, overrides or [])
        if stage is not None and stage.isdigit() and cfg.train.stages:
            idx = int(stage) - 1
            if not 0 <= idx < len(cfg.train.stages):
                raise MedfuseError("--stage", f"no stage {stage}", f"use 1..{len(cfg.train.stages)}")
            stage = cfg.train.stages[idx].name
        run_dir = fit(cfg, only_stage=stage, resume=stage is not None)
    from medfuse.engine.lock import is_rank_zero

    if is_rank_zero():  # under torchrun/srun every rank returns here
        console.print(f"run directory: {run_dir}")


@app.command()
def evaluate(
    run_dir: Annotated[Path, typer.Argument(help="a trained run directory")],
    split: Annotated[str, typer.Option(help="test | val | train")] = "test",
    n_boot: Annotated[int | None, typer.Option(help="bootstrap resamples (default from config)")] = None,
    counterfactual: Annotated[list[str] | None, typer.Option(
        help="FIELD=shuffle|wrong|VALUE[,FIELD=...]: rerun with wrong text and report the metric drop (repeatable)")] = None,
    overrides: Annotated[list[str] | None, typer.Argument(help="eval.* overrides like eval.tta=true")] = None,
) -> None:
    """Evaluate a run's best checkpoint with bootstrap CIs and write report.json/report.html."""
    from medfuse.engine.evaluate import evaluate as _evaluate
    from medfuse.reports import metrics_table

    if split not in ("test", "val", "train"):
        raise MedfuseError("--split", f"unknown split '{split}'", "use test, val or train")
    for spec in counterfactual or []:
        if "=" not in spec:
            raise MedfuseError("--counterfactual", f"'{spec}' is not FIELD=shuffle|wrong|VALUE[,FIELD=...]",
                               "e.g. --counterfactual margin=shuffle")
    report = _evaluate(run_dir, split=split, n_boot=n_boot, counterfactual=counterfactual, overrides=overrides)
    console.print(metrics_table(report.get("metrics", {}), ci=float(report.get("ci", 0.95))))
    console.print(f"report: {run_dir / 'report.html'}")


@app.command()
def predict(
    run_dir: Annotated[Path, typer.Argument(help="a trained run directory or an exported model.zip")],
    inputs: Annotated[list[str], typer.Argument(
        help="a folder of <case>_<XXXX>.<ending> images (e.g. imagesTs), a dataset folder or manifest, "
             "nnU-Net-style files, or one image per modality; then eval.* or data.dicom.* overrides key=value")],
    out: Annotated[Path, typer.Option(help="output folder")] = Path("predictions"),
    modalities: Annotated[str | None, typer.Option(help="comma-separated modality names of INPUTS")] = None,
    case_id: Annotated[str | None, typer.Option(
        "--case-id", help="name of the one case INPUTS hold (default: from the first file, or the DICOM folder)",
        show_default=False)] = None,
    skip_refused: Annotated[bool, typer.Option(
        "--skip-refused", help="skip a case that cannot be predicted (2D among 3D, missing modality, unreadable "
        "file, DICOM gap) instead of stopping; the others are predicted one at a time and the refused ones "
        "listed in OUT/refused.csv (exit 2 only if every case is refused)")] = False,
) -> None:
    """Predict new cases with a trained run or package; outputs lie on each input's own grid."""
    from medfuse.engine.predict import predict as _predict

    mods = [m.strip() for m in modalities.split(",")] if modalities else None
    overrides = [a for a in inputs if "=" in a and not Path(a).exists()]
    files = [a for a in inputs if a not in overrides]
    if not files:
        raise MedfuseError("INPUTS", "no input given", "give an imagesTs folder, a manifest or image files")
    path = _predict(run_dir, files, out, modalities=mods, overrides=overrides, progress=True, case_id=case_id,
                    skip_refused=skip_refused)
    console.print(f"predictions: {path}")


@app.command()
def export(
    run_dir: Annotated[Path, typer.Argument(help="a trained run directory")],
    out: Annotated[Path, typer.Option(help="the package to write (a new .zip file)")] = Path("model.zip"),
    without_ids: Annotated[bool, typer.Option(
        "--without-ids", help="leave splits.csv (every case and patient id) out; the model card keeps the counts")] = False,
) -> None:
    """Pack a run into a portable model package (config, safetensors weights, labels, preprocessing,
    split, model card) that `medfuse predict model.zip ...` runs on another machine."""
    from medfuse.engine.package import export as _export

    path = _export(run_dir, out, without_ids=without_ids)
    console.print(f"model package: {path}")


@app.command()
def models(
    name: Annotated[str | None, typer.Argument(help="a family or model name: print its parameters")] = None,
) -> None:
    """List the families, their models, encoders and text encoders; with NAME, every parameter of it."""
    from rich.markup import escape
    from rich.table import Column, Table

    import medfuse.encoders  # noqa: F401  (registers the encoders)
    import medfuse.text  # noqa: F401  (registers the text encoders)
    from medfuse.registry import ENCODERS, FAMILIES, TEXT_ENCODERS

    if name is None:
        table = Table("kind", "name", "description")
        for fam in FAMILIES:
            table.add_row("family", fam.name, fam.help)
            for m in fam.models:
                table.add_row("  model", m.name, f"{m.help} [{m.task.kind}]")
        for label, reg in (("encoder", ENCODERS), ("text encoder", TEXT_ENCODERS)):
            for n in reg.names():
                table.add_row(label, n, reg.help(n))
        console.print(table)
        return
    if name in FAMILIES:
        fam = FAMILIES.get(name)
        sections = [(f"model.params of {m.name} ({m.task.kind})", m.params) for m in fam.models]
    else:
        fam, entry = FAMILIES.find_model(name)
        sections = [(f"model.params of {entry.name} ({entry.task.kind})", entry.params)]
    if fam.data_params is not None:
        sections.append((f"data.params of family {fam.name}", fam.data_params))
    for title, model in sections:
        # keys never wrap or shorten: the description column gives way on a narrow terminal
        key_col = Column("key", no_wrap=True, min_width=max(map(len, model.model_fields), default=3))
        table = Table(key_col, "type", "default", "description", title=title)
        for key, field in model.model_fields.items():
            default = repr(field.get_default(call_default_factory=True))
            table.add_row(key, escape(_type_name(field.annotation)), escape(default), escape(field.description or ""))
        console.print(table)


def _type_name(ann) -> str:
    import typing

    text = getattr(ann, "__name__", None) if typing.get_origin(ann) is None else None
    return text or str(ann).replace("typing.", "")


@app.command()
def info() -> None:
    """Versions, devices, fast paths and installed extras."""
    import importlib.util

    import torch

    import medfuse

    rows = [("medfuse", medfuse.__version__), ("python", sys.version.split()[0]), ("torch", torch.__version__),
            ("cuda available", str(torch.cuda.is_available())),
            ("cuda devices", ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())) or "-"),
            ("bf16 on cuda", str(torch.cuda.is_available() and torch.cuda.is_bf16_supported())),
            ("MEDFUSE_SCAN", os.environ.get("MEDFUSE_SCAN", "(auto)"))]
    from medfuse.ssm import available_paths

    rows.append(("selective-scan paths", ", ".join(available_paths())))
    for pkg, extra in (("monai", "core"), ("lightning", "core"), ("timm", "core"), ("transformers", "core"),
                       ("mamba_ssm", "mamba"), ("sam2", "oracles"), ("segment_anything", "oracles"),
                       ("zarr", "zarr"), ("tensorboard", "dev")):
        ok = importlib.util.find_spec(pkg) is not None
        rows.append((f"{pkg} [{extra}]", "installed" if ok else "not installed"))
    from rich.table import Table

    table = Table("item", "value")
    for r in rows:
        table.add_row(*r)
    console.print(table)


_OS_REFUSALS = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.EISDIR, errno.ENOTDIR,
                errno.EEXIST, errno.ENAMETOOLONG}


def _user_error(exc: BaseException) -> MedfuseError | None:
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, MedfuseError):
            return exc
        if isinstance(exc, OSError) and exc.errno in _OS_REFUSALS and exc.filename is not None:
            return MedfuseError(exc.filename, f"cannot write or create it ({exc.strerror})",
                                "check the path: an existing folder you can write to, with free space")
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__  # type: ignore[assignment]
    return None


def _print_error(err: MedfuseError) -> None:
    label = "interrupted" if isinstance(err, Interrupted) else "error"
    err_console.print(f"{label}: {err.one_line()}", markup=False, highlight=False, soft_wrap=True)


_python_format_warning = warnings.formatwarning
_PACKAGE_DIR = str(Path(__file__).resolve().parent) + os.sep


def _format_warning(message, category, filename, lineno, line=None) -> str:  # noqa: ANN001
    """medfuse's own warnings as one ``warning: ...`` line; other libraries' in Python's format.

    Python's format prints the file, line number and the source line that raised the warning,
    which reads like a fragment of a traceback; a medfuse warning is a note to the user."""
    if os.path.realpath(filename).startswith(_PACKAGE_DIR):
        return f"warning: {' '.join(str(message).split())}\n"
    return _python_format_warning(message, category, filename, lineno, line)


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point: runs the typer app and maps user errors to exit code 2."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    warnings.formatwarning = _format_warning
    try:
        app(args=argv, standalone_mode=True)
    except SystemExit as e:
        if e.code == Interrupted.exit_code:  # typer turns Ctrl-C into a silent exit 130
            _print_error(Interrupted("medfuse", "stopped by Ctrl-C", "run the command again"))
        raise
    except KeyboardInterrupt:
        _print_error(Interrupted("medfuse", "stopped by Ctrl-C", "run the command again"))
        sys.exit(Interrupted.exit_code)
    except Exception as e:  # noqa: BLE001
        user = _user_error(e)
        if user is None:
            raise
        _print_error(user)
        sys.exit(user.exit_code)


if __name__ == "__main__":
    main()
