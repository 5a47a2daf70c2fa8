"""Training runs: Trainer set-up, stages, checkpoints and resume.

Run directory (DESIGN "Run directory")::

    runs/<name>/config.yaml          resolved config
    runs/<name>/splits.csv           the patient-level split used by every command
    runs/<name>/checkpoints/         last.ckpt, best.ckpt (per stage in <stage>/ for staged runs)
    runs/<name>/metrics.csv          Lightning CSV log (TensorBoard under tb/ when installed)

Multi-GPU and multi-node use Lightning's DDP: set ``train.devices``, ``train.num_nodes`` and
``train.strategy=ddp``. Under ``torchrun`` or SLURM (``srun``) Lightning reads the rank variables
from the environment, so the same ``medfuse train`` command runs unchanged on every process.
"""

from __future__ import annotations

import logging
import shutil
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from medfuse.config import Config, StageConfig, config_to_dict, load_config, save_config
from medfuse.engine.build import (
    auto_model_args,
    build_datamodule,
    data_params,
    family_of,
    model_params,
    resolve,
)
from medfuse.engine.checkpoint import AtomicCheckpointIO, checkpoint_dir, load_model_weights
from medfuse.engine.tasks import BaseTask
from medfuse.errors import RunDirError

log = logging.getLogger("medfuse")


def precision_for(cfg: Config) -> str:
    if cfg.train.precision != "auto":
        return cfg.train.precision
    return "bf16-mixed" if torch.cuda.is_available() and cfg.train.accelerator in ("auto", "gpu", "cuda") else "32"


def build_trainer(cfg: Config, run_dir: Path, ckpt_dir: Path, max_epochs: int,
                  callbacks: list[Any] | None = None, stage: str | None = None) -> L.Trainer:
    """A Lightning Trainer writing ``last.ckpt``/``best.ckpt`` atomically into ``ckpt_dir``.

    The CSV log is ``run_dir/metrics.csv``; a stage of a staged run logs to
    ``run_dir/stages/<stage>/metrics.csv`` (merged into ``metrics.csv`` when the run ends).
    """
    from lightning.pytorch.loggers import CSVLogger

    t = cfg.train
    # Lightning's start-up banner (GPU/TPU availability, tips) is noise in a CLI run.
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logging.getLogger(name).setLevel(logging.WARNING)
    # Two callbacks: "best" on the validation metric, and "last" after every epoch (Lightning's
    # save_last only writes when a top-k save happened, which would break resume).
    best_cb = ModelCheckpoint(dirpath=ckpt_dir, filename="best", monitor=t.monitor, mode=t.mode, save_top_k=1,
                              enable_version_counter=False, auto_insert_metric_name=False)
    last_cb = ModelCheckpoint(dirpath=ckpt_dir, filename="last", monitor=None, save_top_k=1,
                              enable_version_counter=False, auto_insert_metric_name=False)
    cbs: list[Any] = [best_cb, last_cb, *(callbacks or [])]
    if t.progress_bar:
        from lightning.pytorch.callbacks import RichProgressBar

        cbs.append(RichProgressBar(leave=True))
    loggers: list[Any] = [CSVLogger(save_dir=run_dir, name="stages" if stage else "", version=stage or "")]
    try:
        import tensorboard  # noqa: F401
        from lightning.pytorch.loggers import TensorBoardLogger

        loggers.append(TensorBoardLogger(save_dir=run_dir, name="tb", version=ckpt_dir.name, default_hp_metric=False))
    except ImportError:
        pass
    return L.Trainer(
        default_root_dir=run_dir,
        max_epochs=max_epochs,
        accelerator=t.accelerator,
        devices=t.devices,
        num_nodes=t.num_nodes,
        strategy=t.strategy,
        precision=precision_for(cfg),
        accumulate_grad_batches=t.accumulate_grad_batches,
        gradient_clip_val=t.gradient_clip_val,
        deterministic=t.deterministic,
        callbacks=cbs,
        logger=loggers,
        log_every_n_steps=t.log_every_n_steps,
        enable_progress_bar=t.progress_bar,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        plugins=[AtomicCheckpointIO()],
        use_distributed_sampler=True,
    )


def _stages(cfg: Config) -> list[StageConfig | None]:
    return list(cfg.train.stages) or [None]


def build_task(cfg: Config, dm: Any, stage: StageConfig | None) -> BaseTask:
    """The model's task (``ModelEntry.task``, a :class:`BaseTask` subclass) for one stage."""
    cfg = resolve(cfg)
    _, entry = family_of(cfg)
    return entry.task(config_to_dict(cfg), auto=auto_model_args(dm, cfg),
                      stage=stage.model_dump() if stage else None)


def fit(cfg: Config, resume: bool = False, callbacks: list[Any] | None = None,
        only_stage: str | None = None) -> Path:
    """Train a config, stage by stage; return the run directory.

    Args:
        cfg: the resolved config (``cfg.run_dir`` is the run directory).
        resume: continue from each unfinished stage's ``last.ckpt``.
        callbacks: extra Lightning callbacks (tests use this to interrupt runs).
        only_stage: run just this stage, initialised from the previous stage's best checkpoint.
    """
    cfg = resolve(cfg)  # family and task filled in (and checked) before anything is written
    model_params(cfg)
    data_params(cfg)
    run_dir = cfg.run_dir
    ckpt_root = checkpoint_dir(run_dir)
    if not resume and ckpt_root.exists() and any(ckpt_root.rglob("*.ckpt")) and only_stage is None:
        raise RunDirError(run_dir, "already holds checkpoints",
                          f"continue it with `medfuse train --resume {run_dir}` or set name=<new name>")
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run_dir / "config.yaml")
    L.seed_everything(cfg.train.seed, workers=True, verbose=False)
    dm = build_datamodule(cfg, run_dir)
    stages = _stages(cfg)
    names = [s.name for s in stages if s is not None]
    if only_stage is not None and only_stage not in names:
        raise RunDirError(only_stage, "no such stage in train.stages", f"use one of: {', '.join(names)}")
    prev_best: Path | None = None
    for stage in stages:
        sname = stage.name if stage else None
        ckdir = checkpoint_dir(run_dir, sname)
        done = ckdir / "done"
        skip = (only_stage is not None and sname != only_stage) or (resume and done.exists())
        if skip:
            if (ckdir / "best.ckpt").exists():
                prev_best = ckdir / "best.ckpt"
            continue
        task = build_task(cfg, dm, stage)
        last = ckdir / "last.ckpt"
        ckpt_path = str(last) if resume and last.exists() else None
        if ckpt_path is None and prev_best is not None:
            load_model_weights(task.model, prev_best)
        epochs = stage.max_epochs if stage else cfg.train.max_epochs
        trainer = build_trainer(cfg, run_dir, ckdir, epochs, callbacks, stage=sname)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*exists and is not empty.*")
            warnings.filterwarnings("ignore", message=".*does not have many workers.*")
            warnings.filterwarnings("ignore", message=".*Checkpoint directory.*exists and is not empty.*")
            warnings.filterwarnings("ignore", message=".*LeafSpec.*")
            trainer.fit(task, datamodule=dm, ckpt_path=ckpt_path)
        if trainer.interrupted:
            return run_dir
        done.write_text("ok\n")
        prev_best = ckdir / "best.ckpt"
    if cfg.train.stages:
        merge_stage_logs(run_dir, [s.name for s in cfg.train.stages])
    if cfg.train.stages and prev_best is not None:
        final = checkpoint_dir(run_dir, cfg.train.stages[-1].name)
        for which in ("best", "last"):
            if (final / f"{which}.ckpt").exists():
                shutil.copyfile(final / f"{which}.ckpt", ckpt_root / f"{which}.ckpt")
    return run_dir


def merge_stage_logs(run_dir: Path, stages: list[str]) -> Path | None:
    """Concatenate the stages' CSV logs into ``run_dir/metrics.csv`` with a ``stage`` column.

    Epochs continue across stages (stage 2's epoch 0 follows stage 1's last epoch), so the training
    curves of a staged run read as one run. Returns the merged file, or None when no stage logged.
    """
    import csv

    rows: list[dict[str, str]] = []
    fields: list[str] = ["stage"]
    offset = 0
    for name in stages:
        path = run_dir / "stages" / name / "metrics.csv"
        if not path.is_file():
            continue
        with path.open(newline="") as f:
            part = list(csv.DictReader(f))
        last = -1
        for r in part:
            if r.get("epoch") not in (None, ""):
                last = max(last, int(float(r["epoch"])))
                r["epoch"] = str(int(float(r["epoch"])) + offset)
            rows.append({"stage": name, **r})
            fields += [k for k in r if k not in fields]
        offset += last + 1
    if not rows:
        return None
    out = run_dir / "metrics.csv"
    with out.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields, restval="")
        w.writeheader()
        w.writerows(rows)
    return out


def load_run(run_dir: str | Path, overrides: list[str] | None = None) -> Config:
    """The resolved config of a run directory (optionally with overrides)."""
    run_dir = Path(run_dir)
    cfg_path = run_dir / "config.yaml"
    if not cfg_path.is_file():
        raise RunDirError(run_dir, "is not a run directory (no config.yaml)", "pass runs/<name> of a trained run")
    cfg = load_config(cfg_path, overrides)
    # A run directory may have been moved: trust its location over the saved output_dir.
    cfg = cfg.model_copy(update={"output_dir": str(run_dir.parent), "name": run_dir.name})
    return cfg


def resume_run(run_dir: str | Path, callbacks: list[Any] | None = None) -> Path:
    """``medfuse train --resume RUN_DIR``: continue every unfinished stage from its last checkpoint."""
    cfg = load_run(run_dir)
    return fit(cfg, resume=True, callbacks=callbacks)
