"""Multi-process (DDP) training set-up: process counts, the launch check, the strategy and the
unpadded validation sampler.

* :func:`processes_per_node`, :func:`launched_processes`: how many training processes the config
  asks for, and how many ``torchrun``/``srun`` started; :func:`check_launch` refuses a mismatch;
* :func:`ddp_strategy`: ``train.strategy`` for the Trainer (``ddp_find_unused_parameters_true``
  for a task that may leave parameters without a gradient);
* :class:`UnpaddedSampler`, :func:`unpadded_loader`, :func:`unpad_validation`: every validation
  case scored once, on one rank.

The collectives themselves (all-reduce, gathers, broadcasts; no-ops in one process) live one layer
down, in :mod:`medfuse.dist`. The trainer (:mod:`medfuse.engine.trainer`) uses these; see
docs/scaling.md.
"""

from __future__ import annotations

import functools
import itertools
import logging
import os
from typing import Any

import torch
from torch.utils.data import BatchSampler, DataLoader, DistributedSampler, Sampler

from medfuse import dist
from medfuse.config import Config
from medfuse.data.datamodule import SeededSampler
from medfuse.engine.build import family_of, resolve
from medfuse.errors import ConfigError, DataError

log = logging.getLogger("medfuse")


class UnpaddedSampler(DistributedSampler):
    """Rank r of W takes the items r, r + W, r + 2W, ... of ``sampler``'s order: every validation
    case once, on exactly one rank.

    Lightning's ``DistributedSampler`` pads the split with repeated cases so that every rank runs
    as many batches, which biases any metric computed over the split. Validation runs no
    collective per batch (:func:`medfuse.dist.training_collectives`), so ranks may run one batch
    more or less; DDP syncs buffers only in the first validation forward, which every rank runs
    (the split must hold at least W cases).

    Args:
        sampler: the data module's validation sampler (e.g. :class:`SeededSampler`, unshuffled).
        num_replicas: W, the number of processes.
        rank: this process's rank.
    """

    def __init__(self, sampler: Sampler, num_replicas: int, rank: int):
        n = len(sampler)  # type: ignore[arg-type]
        super().__init__(range(n), num_replicas=num_replicas, rank=rank, shuffle=False, drop_last=False)
        self.sampler = sampler
        self.total_size = n
        self.num_samples = len(range(rank, n, num_replicas))

    def __iter__(self):
        return itertools.islice(iter(self.sampler), self.rank, None, self.num_replicas)

    def __len__(self) -> int:
        return self.num_samples

    def set_epoch(self, epoch: int) -> None:
        super().set_epoch(epoch)
        if isinstance(self.sampler, SeededSampler):  # its per-sample seeds follow the epoch
            self.sampler.set_epoch(epoch)


def unpadded_loader(loader: Any) -> Any:
    """``loader`` with an :class:`UnpaddedSampler` when this process is one of several (a plain
    ``DataLoader`` with a sampler and a batch size; anything else is returned as is).

    Raises:
        DataError: the split has fewer cases than there are processes.
    """
    if not dist.is_distributed() or not isinstance(loader, DataLoader):
        return loader
    if isinstance(loader.sampler, DistributedSampler) or type(loader.batch_sampler) is not BatchSampler:
        return loader
    w = dist.world_size()
    if len(loader.sampler) < w:  # type: ignore[arg-type]
        raise DataError("validation split", f"has {len(loader.sampler)} cases, fewer than the {w} training "  # type: ignore[arg-type]
                        "processes", "add validation cases or train on fewer devices")
    nw = loader.num_workers
    return DataLoader(loader.dataset, batch_size=loader.batch_size,
                      sampler=UnpaddedSampler(loader.sampler, w, dist.rank()), num_workers=nw,
                      collate_fn=loader.collate_fn, pin_memory=loader.pin_memory, drop_last=loader.drop_last,
                      timeout=loader.timeout, worker_init_fn=loader.worker_init_fn, generator=loader.generator,
                      persistent_workers=loader.persistent_workers and nw > 0,
                      prefetch_factor=loader.prefetch_factor if nw > 0 else None,
                      multiprocessing_context=loader.multiprocessing_context if nw > 0 else None)


def unpad_validation(dm: Any) -> None:
    """Make ``dm.val_dataloader`` return :func:`unpadded_loader` of its loader (once per module).

    Lightning leaves a loader whose sampler is already a ``DistributedSampler`` as it is, so the
    validation split is not padded; the training loader keeps Lightning's sampler.
    """
    original = dm.val_dataloader
    if isinstance(original, functools.partial):  # already wrapped
        return
    dm.val_dataloader = functools.partial(_unpadded_call, original)


def _unpadded_call(original: Any) -> Any:
    return unpadded_loader(original())


FIND_UNUSED = "ddp_find_unused_parameters_true"


def processes_per_node(cfg: Config) -> int:
    """The training processes per node that ``train.devices`` asks for: a count, the number of
    GPU indices listed, or for ``auto``/``-1`` the visible GPUs (1 when training on the CPU)."""
    t = cfg.train
    text = str(t.devices).strip().strip(",")
    if text.isdigit():
        return int(text)
    if text in ("auto", "-1"):
        gpu = t.accelerator in ("gpu", "cuda") or (t.accelerator == "auto" and torch.cuda.is_available())
        return max(torch.cuda.device_count(), 1) if gpu else 1
    return len(text.split(","))


def _processes(cfg: Config) -> int:
    """All training processes: ``train.devices`` x ``train.num_nodes``, or what a launcher started."""
    launched = launched_processes()
    return max(processes_per_node(cfg) * cfg.train.num_nodes, launched[0] if launched else 1)


def ddp_strategy(cfg: Config) -> str:
    """``train.strategy`` for the Trainer: ``ddp`` (or ``auto`` with several processes) becomes
    ``ddp_find_unused_parameters_true`` for a task whose steps may leave parameters without a
    gradient (:attr:`~medfuse.engine.tasks.BaseTask.unused_parameters`: ct_encoder, whose step level
    is skipped when the ranks hold fewer than two CoT steps and whose anchor loss scores a rank's own
    steps; incomplete_seg, whose stages skip the adapters or the reconstruction head). Plain ``ddp``
    would stop such a run at its second step. Any other strategy is passed through as given."""
    t = cfg.train
    _, entry = family_of(resolve(cfg))
    if entry.task.unused_parameters and (t.strategy == "ddp" or (t.strategy == "auto" and _processes(cfg) > 1)):
        log.info("train.strategy: %s -> %s (%s's steps may leave parameters without a gradient)",
                 t.strategy, FIND_UNUSED, cfg.model.name)
        return FIND_UNUSED
    return t.strategy


def launched_processes() -> tuple[int, str] | None:
    """``(world size, launcher)`` when ``torchrun`` or SLURM (``srun``) started several processes of
    this command, else None (one process, or Lightning about to start its own)."""
    env = os.environ
    if env.get("TORCHELASTIC_RUN_ID") and env.get("WORLD_SIZE", "").isdigit():
        return int(env["WORLD_SIZE"]), "torchrun"
    ntasks = env.get("SLURM_NTASKS", "")
    if ntasks.isdigit() and env.get("SLURM_PROCID") is not None and env.get("SLURM_JOB_NAME") not in ("bash", "interactive"):
        return int(ntasks), "srun"
    return None


def check_launch(cfg: Config) -> None:
    """Under ``torchrun``/``srun`` the processes must be the config's ``train.devices`` x
    ``train.num_nodes``; otherwise every process would train on its own in the same run directory.

    Raises:
        ConfigError: naming ``train.devices``, with the per-node count the launcher asks for.
    """
    launched = launched_processes()
    if launched is None or launched[0] <= 1:
        return
    world, launcher = launched
    t = cfg.train
    per_node = processes_per_node(cfg)
    if per_node * t.num_nodes != world:
        want = max(world // t.num_nodes, 1)
        raise ConfigError("train.devices", f"is {t.devices} on {t.num_nodes} node(s), {per_node * t.num_nodes} "
                          f"process(es), but {launcher} started {world}",
                          f"set train.devices={want} (processes per node) and train.num_nodes to the node count, "
                          "with train.strategy=ddp")
