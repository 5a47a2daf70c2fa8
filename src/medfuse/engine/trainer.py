"""Training runs: Trainer set-up, stages, checkpoints and resume.

Run directory (DESIGN "Run directory")::

    runs/<name>/config.yaml          resolved config
    runs/<name>/splits.csv           the patient-level split used by every command
    runs/<name>/checkpoints/         last.ckpt, best.ckpt (per stage in <stage>/ for staged runs)
    runs/<name>/metrics.csv          CSV log, append-only across resumes (TensorBoard under tb/ when installed)
    runs/<name>/environment.json     machine, versions and threads of each train / resume session
    runs/<name>/.medfuse.lock        held while a command runs in the directory (engine/lock.py)

Before anything is written: ``model.params``/``data.params`` are validated, ``train.monitor`` is
checked against the metrics the task logs and ``train.accelerator``/``train.devices`` against the
machine. ``--resume`` reads and checks ``last.ckpt`` (a medfuse checkpoint of this very model)
before it touches the run directory; it then drops only the log rows of the epoch the kill cut
short, so ``metrics.csv`` holds every epoch once. Ctrl-C raises
:class:`~medfuse.errors.Interrupted` (exit code 130) naming the last checkpoint and how to resume.

Multi-GPU and multi-node use Lightning's DDP (docs/scaling.md): set ``train.devices``,
``train.num_nodes`` and ``train.strategy=ddp``. Under ``torchrun`` or SLURM (``srun``) Lightning
reads the rank variables from the environment, so the same ``medfuse train`` command runs unchanged
on every process. Training batches come from Lightning's distributed sampler (padded, so every rank
runs the same steps); the validation loader is rebuilt with
:class:`~medfuse.engine.ddp.UnpaddedSampler`, so each validation case is scored once, on one rank,
and the task gathers the outputs (:mod:`medfuse.engine.tasks`). ``train.sync_batchnorm`` turns
BatchNorm layers into SyncBatchNorm. Only global rank 0 takes the run lock and writes the logs, the
stage markers and the merged files.

This module holds the Trainer set-up (:func:`build_trainer`), the stage loop (:func:`fit`), the
checks made before training and :func:`load_run`/:func:`resume_run`. The CSV log (``metrics.csv``
kept across resumes, stage logs merged) is in :mod:`medfuse.engine.runlog`; the multi-process
pieces (process counts, the launch check, the DDP strategy, the unpadded validation sampler) are in
:mod:`medfuse.engine.ddp`. Their names stay importable from here.
"""

from __future__ import annotations

import logging
import shutil
import signal
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from medfuse.config import Config, StageConfig, absolute_paths, config_to_dict, load_config, save_config
from medfuse.engine.build import (
    auto_model_args,
    build_datamodule,
    data_params,
    family_of,
    model_params,
    resolve,
)
from medfuse.engine.checkpoint import (
    AtomicCheckpointIO,
    check_checkpoint_fits,
    checkpoint_dir,
    load_model_weights,
)
from medfuse.engine.ddp import (  # noqa: F401 - the names that moved to ddp.py stay importable here
    FIND_UNUSED,
    UnpaddedSampler,
    _processes,
    _unpadded_call,
    check_launch,
    ddp_strategy,
    launched_processes,
    processes_per_node,
    unpad_validation,
    unpadded_loader,
)
from medfuse.engine.environment import record_training
from medfuse.engine.runlog import (  # noqa: F401 - the names that moved to runlog.py stay importable here
    HistoryCSVLogger,
    HistoryWriter,
    _write_csv_atomic,
    merge_stage_logs,
    prepare_log,
    stage_log,
)
from medfuse.engine.tasks import BaseTask
from medfuse.errors import ConfigError, Interrupted, MedfuseError, RunDirError
from medfuse.fileio import atomic_open

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
    loggers: list[Any] = [HistoryCSVLogger(save_dir=run_dir, name="stages" if stage else "", version=stage or "")]
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
        strategy=ddp_strategy(cfg),
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
        sync_batchnorm=sync_batchnorm(cfg),
    )


def sync_batchnorm(cfg: Config) -> bool:
    """``train.sync_batchnorm``: BatchNorm statistics over the global batch under DDP (Lightning
    converts every BatchNorm layer to ``torch.nn.SyncBatchNorm``; no effect in one process)."""
    return cfg.train.sync_batchnorm


def _stages(cfg: Config) -> list[StageConfig | None]:
    return list(cfg.train.stages) or [None]


def build_task(cfg: Config, dm: Any, stage: StageConfig | None) -> BaseTask:
    """The model's task (``ModelEntry.task``, a :class:`BaseTask` subclass) for one stage."""
    cfg = resolve(cfg)
    _, entry = family_of(cfg)
    return entry.task(config_to_dict(cfg), auto=auto_model_args(dm, cfg),
                      stage=stage.model_dump() if stage else None)


def check_monitor(cfg: Config) -> None:
    """``train.monitor`` must be a metric the model's task logs (checked before training starts).

    Raises:
        ConfigError: naming ``train.monitor`` and listing the names the task logs.
    """
    _, entry = family_of(cfg)
    task = entry.task
    if not task.logs_metric(cfg.train.monitor, cfg):
        names = ", ".join(n.replace("<n>", "N") for n in task.logged_metrics(cfg))
        raise ConfigError("train.monitor", f"'{cfg.train.monitor}' is not a metric that model "
                          f"'{cfg.model.name}' logs", f"use one of: {names}")


def check_hardware(cfg: Config) -> None:
    """``train.accelerator`` and ``train.devices`` must exist on this machine.

    Raises:
        ConfigError: a GPU (or Apple MPS) asked for and absent, or more devices than the machine has.
    """
    t = cfg.train
    acc, devices = t.accelerator, t.devices
    n_cuda = torch.cuda.device_count() if torch.cuda.is_available() else 0
    mps = bool(torch.backends.mps.is_available())
    if acc in ("gpu", "cuda") and n_cuda == 0:
        raise ConfigError("train.accelerator", f"'{acc}' asks for a CUDA GPU, but this machine has none "
                          f"(torch {torch.__version__}, torch.cuda.is_available() is False)",
                          "set train.accelerator=cpu (or auto), or run on a machine with a GPU")
    if acc == "mps" and not mps:
        raise ConfigError("train.accelerator", "'mps' asks for an Apple GPU, but MPS is not available here",
                          "set train.accelerator=cpu (or auto)")
    on_gpu = acc in ("gpu", "cuda") or (acc == "auto" and n_cuda > 0)
    if devices == "auto" or devices == -1:
        return
    if on_gpu:
        text = str(devices).strip().strip(",")
        if isinstance(devices, int) or text.isdigit():
            if int(text) > n_cuda:
                raise ConfigError("train.devices", f"asks for {int(text)} GPUs, but this machine has {n_cuda}",
                                  f"set train.devices to at most {n_cuda} (or auto)")
        else:
            bad = [int(i) for i in text.split(",") if int(i) >= n_cuda]
            if bad:
                raise ConfigError("train.devices", f"names GPU {bad[0]}, but this machine has GPUs 0..{n_cuda - 1}",
                                  f"use indices below {n_cuda} (or auto)")
    elif not isinstance(devices, int) and not str(devices).strip().lstrip("-").isdigit():
        raise ConfigError("train.devices", f"'{devices}' names GPU indices, but training runs on the "
                          f"{'Apple GPU' if acc == 'mps' else 'CPU'}",
                          "give a process count (e.g. 1) or auto, or set train.accelerator=gpu on a GPU machine")


def fit(cfg: Config, resume: bool = False, callbacks: list[Any] | None = None,
        only_stage: str | None = None) -> Path:
    """Train a config, stage by stage; return the run directory.

    Args:
        cfg: the resolved config (``cfg.run_dir`` is the run directory).
        resume: continue from each unfinished stage's ``last.ckpt``.
        callbacks: extra Lightning callbacks (tests use this to interrupt runs).
        only_stage: run just this stage, initialised from the previous stage's best checkpoint.

    Raises:
        ConfigError: bad params, an unknown ``train.monitor``, hardware the machine lacks, or a
            ``torchrun``/``srun`` process count other than ``train.devices`` x ``train.num_nodes``
            (all before anything is written).
        RunDirError: the run directory is in use by another process, is not writable, or holds
            checkpoints of a run that was not asked to resume.
        WeightsError: ``--resume`` found a ``last.ckpt`` that is not this model's checkpoint.
        Interrupted: Ctrl-C (naming the last checkpoint).
    """
    from medfuse.data.paths import output_dir
    from medfuse.engine.lock import RunLock, is_rank_zero

    cfg = resolve(cfg)  # family and task filled in (and checked) before anything is written
    cfg = absolute_paths(cfg)  # evaluate and predict may run from another folder
    model_params(cfg)
    data_params(cfg)
    check_monitor(cfg)
    check_hardware(cfg)
    check_launch(cfg)
    run_dir = cfg.run_dir
    new_dir = not run_dir.exists()
    output_dir(run_dir, "run directory")
    split_file = run_dir / "splits.csv"
    try:
        with RunLock(run_dir, "train"):
            new_split = not split_file.exists()
            try:
                return _fit(cfg, run_dir, resume, callbacks, only_stage)
            except KeyboardInterrupt:
                raise _interrupted(cfg, run_dir) from None
            except MedfuseError:
                # a run refused before its first checkpoint keeps no split: the rerun on mended data
                # (an empty validation split, a NaN volume) splits afresh instead of meeting a stale one
                if new_split and not _has_checkpoint(run_dir):
                    split_file.unlink(missing_ok=True)
                raise
    except MedfuseError as e:
        # ... and a run directory this call created goes with it (its logs and config are of a run
        # that never trained), so a refused run leaves no empty runs/<name>/ behind
        if new_dir and not isinstance(e, Interrupted) and is_rank_zero() and not _has_checkpoint(run_dir):
            shutil.rmtree(run_dir, ignore_errors=True)
        raise


def _has_checkpoint(run_dir: Path) -> bool:
    ckpts = checkpoint_dir(run_dir)
    return ckpts.exists() and any(ckpts.rglob("*.ckpt"))


def _fit(cfg: Config, run_dir: Path, resume: bool, callbacks: list[Any] | None, only_stage: str | None) -> Path:
    from medfuse.engine.lock import is_rank_zero

    ckpt_root = checkpoint_dir(run_dir)
    if not resume and ckpt_root.exists() and any(ckpt_root.rglob("*.ckpt")) and only_stage is None:
        raise RunDirError(run_dir, "already holds checkpoints",
                          f"continue it with `medfuse train --resume {run_dir}` or set name=<new name>")
    stages = _stages(cfg)
    names = [s.name for s in stages if s is not None]
    if only_stage is not None and only_stage not in names:  # before the data module writes splits.csv
        raise RunDirError(only_stage, "no such stage in train.stages",
                          f"use one of: {', '.join(names)}" if names else "the config has no train.stages: drop --stage")
    L.seed_everything(cfg.train.seed, workers=True, verbose=False)
    dm = build_datamodule(cfg, run_dir)  # saves the split (splits.csv) of a new run
    dm.setup("fit")  # Lightning's own hook, called early: data errors come before anything is written
    unpad_validation(dm)
    config_saved = False
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
        ckpt_path = None
        resume_epoch: int | None = None
        if resume and last.exists():
            # read and check the checkpoint before anything in the run directory changes
            resume_epoch = int(check_checkpoint_fits(last, task)["epoch"])
            ckpt_path = str(last)
        if ckpt_path is None and prev_best is not None:
            load_model_weights(task.model, prev_best)
        if not config_saved:
            save_config(cfg, run_dir / "config.yaml")
            config_saved = True
            if is_rank_zero():
                record_training(run_dir, resumed=resume, world_size=_processes(cfg))
        prepare_log(stage_log(run_dir, sname), resume_epoch)
        epochs = stage.max_epochs if stage else cfg.train.max_epochs
        trainer = build_trainer(cfg, run_dir, ckdir, epochs, callbacks, stage=sname)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*exists and is not empty.*")
            warnings.filterwarnings("ignore", message=".*does not have many workers.*")
            warnings.filterwarnings("ignore", message=".*Checkpoint directory.*exists and is not empty.*")
            warnings.filterwarnings("ignore", message=".*LeafSpec.*")
            warnings.filterwarnings("ignore", message=".*overridden `on_before_batch_transfer`.*")
            try:
                trainer.fit(task, datamodule=dm, ckpt_path=ckpt_path)
            except SystemExit:
                if trainer.interrupted:  # Lightning turns Ctrl-C into sys.exit(1)
                    raise KeyboardInterrupt from None
                raise
        if trainer.interrupted:
            raise KeyboardInterrupt
        if is_rank_zero():
            with atomic_open(done, "w") as f:
                f.write("ok\n")
        prev_best = ckdir / "best.ckpt"
    if not config_saved:
        save_config(cfg, run_dir / "config.yaml")
    if not is_rank_zero():  # the logs and checkpoints are rank 0's; the other ranks are done
        return run_dir
    if cfg.train.stages:
        merge_stage_logs(run_dir, [s.name for s in cfg.train.stages])
    if cfg.train.stages and prev_best is not None:
        final = checkpoint_dir(run_dir, cfg.train.stages[-1].name)
        for which in ("best", "last"):
            if (final / f"{which}.ckpt").exists():
                with (final / f"{which}.ckpt").open("rb") as src, atomic_open(ckpt_root / f"{which}.ckpt", "wb") as dst:
                    shutil.copyfileobj(src, dst)
    return run_dir


def _interrupted(cfg: Config, run_dir: Path) -> Interrupted:
    """The Ctrl-C report: the newest ``last.ckpt`` of the run (and its epoch) and how to resume."""
    from medfuse.engine.checkpoint import safe_torch_load

    try:  # Lightning ignores further Ctrl-C while it shuts down; give the user theirs back
        signal.signal(signal.SIGINT, signal.default_int_handler)
    except ValueError:  # not the main thread
        pass
    lasts = sorted(checkpoint_dir(run_dir).rglob("last.ckpt"), key=lambda p: p.stat().st_mtime)
    fix = f"resume with `medfuse train --resume {run_dir}`"
    if not lasts:
        return Interrupted(run_dir, "training interrupted before the first checkpoint was written", fix)
    last = lasts[-1]
    try:
        epoch = int(safe_torch_load(last)["epoch"])
        when = f" (after epoch {epoch + 1})"
    except Exception:  # noqa: BLE001 - the report must not fail
        when = ""
    return Interrupted(run_dir, f"training interrupted; the last checkpoint is {last}{when}", fix)


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
