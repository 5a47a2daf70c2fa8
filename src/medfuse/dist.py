"""Collectives of a multi-process (DDP) run; each is a no-op in a single process.

Issue 15 ("Multi-GPU and multi-node training that gives the single-process answer"). Three uses:

* **Global negatives** for the contrastive losses (:mod:`medfuse.losses`): :func:`gather_rows`
  all-gathers embeddings with a gradient, and :func:`global_mean` turns each rank's sum of row
  losses into a loss whose value is the mean over every rank's rows and whose gradient, once DDP
  has averaged it over the ranks, is that of the single-process loss over the global batch. This
  is open_clip's "local loss" with gather-with-grad: local rows against all gathered columns,
  labels offset by the rank's first row. The backward of the gather is an all-reduce (sum) of the
  gathered gradient followed by this rank's slice, which needs only ``all_reduce`` and so runs on
  every backend (gloo has no reduce-scatter, which ``torch.distributed.nn.all_gather``'s backward
  uses; that backward also dropped gradients of non-contiguous buffers until PyTorch #120582).
* **Validation over the whole split**: :func:`gather_eval_outputs` gathers what every rank
  collected (numpy arrays as tensors, lists as JSON) in the split's order; :func:`broadcast_json`
  hands rank 0's metrics to every rank.
* Sizes and flags: :func:`global_count`, :func:`world_size`, :func:`rank`.

Collectives run only in a *training step* (:func:`training_collectives`: several processes and
autograd recording). Under ``no_grad`` (validation, evaluation) the ranks run different numbers of
batches (the validation sampler does not pad), so a loss there scores its own batch. Nothing here
pickles: objects travel as JSON.

Shapes: n rows on this rank, N rows over all ranks, ``*`` trailing axes.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

__all__ = ["all_gather_json", "all_reduce_sum", "broadcast_json", "gather_eval_outputs", "gather_rows", "global_count",
           "global_mean", "hash_strings", "is_distributed", "rank", "training_collectives", "world_size"]


def is_distributed() -> bool:
    """A process group with more than one process is initialised."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    """Processes in the default group (1 without one)."""
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    """This process's global rank (0 without a process group)."""
    return dist.get_rank() if is_distributed() else 0


def training_collectives() -> bool:
    """Whether a loss may run collectives now: several processes and autograd recording.

    Every rank runs the same training steps (the training sampler pads), but not the same number
    of validation batches, which run under ``no_grad``.
    """
    return is_distributed() and torch.is_grad_enabled()


def _comm_device() -> torch.device:
    """Where small bookkeeping tensors live for the backend (NCCL moves only CUDA tensors)."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _sizes(n: int) -> list[int]:
    """Every rank's ``n``, in rank order."""
    t = torch.tensor([n], dtype=torch.long, device=_comm_device())
    out = [torch.zeros_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(out, t)
    return [int(x.item()) for x in out]


def _gather_padded(x: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """(n, *) on every rank -> (N, *) in rank order; ranks may hold different n."""
    top = max(sizes)
    pad = x.new_zeros((top - x.shape[0], *x.shape[1:]))
    parts = [x.new_empty((top, *x.shape[1:])) for _ in sizes]
    dist.all_gather(parts, torch.cat([x, pad]).contiguous())
    return torch.cat([p[:n] for p, n in zip(parts, sizes, strict=True)])


class _GatherRows(torch.autograd.Function):
    """All-gather of rows whose backward hands each rank the sum over ranks of the gradient of
    its own rows (every rank's loss reads every rank's rows)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, sizes: list[int], offset: int) -> torch.Tensor:
        ctx.offset, ctx.n = offset, x.shape[0]
        return _gather_padded(x, sizes)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[ctx.offset: ctx.offset + ctx.n], None, None


def gather_rows(*xs: torch.Tensor, gather: bool | None = None) -> tuple[list[torch.Tensor], int]:
    """Rows of every rank, with gradients flowing back to the rank that owns them.

    Args:
        *xs: tensors (n, *) with the same n on this rank (n may differ between ranks).
        gather: ``None`` = :func:`training_collectives`; ``False`` returns ``xs`` unchanged.

    Returns:
        ``([(N, *) per input], offset)``: the inputs of ranks 0, 1, ... concatenated, and where this
        rank's rows start. Without gathering: ``(list(xs), 0)``.
    """
    if gather is None:
        gather = training_collectives()
    if not gather or not is_distributed():
        return list(xs), 0
    sizes = _sizes(int(xs[0].shape[0]))
    offset = sum(sizes[: dist.get_rank()])
    return [_GatherRows.apply(x, sizes, offset) for x in xs], offset


def global_mean(local_sum: torch.Tensor, n_local: int, gather: bool | None = None) -> torch.Tensor:
    """The mean of per-row losses over every rank, from this rank's sum over its rows.

    The value is ``sum over ranks of local_sum / N`` on every rank. The gradient is that of
    ``local_sum * W / N``: DDP averages gradients over the W ranks, so the optimiser sees the
    gradient of the single-process mean over the N rows (no world-size factor).

    Args:
        local_sum: scalar, the sum of this rank's row losses.
        n_local: rows on this rank (may be 0).
        gather: ``None`` = :func:`training_collectives`.

    Returns:
        Scalar; ``local_sum / n_local`` without gathering.
    """
    if gather is None:
        gather = training_collectives()
    if not gather or not is_distributed():
        return local_sum / max(n_local, 1)
    stats = torch.stack([local_sum.detach().double(), torch.tensor(float(n_local), dtype=torch.float64,
                                                                  device=local_sum.device)])
    dist.all_reduce(stats, op=dist.ReduceOp.SUM)
    total, n = stats[0].to(local_sum.dtype), float(stats[1])
    if n == 0:
        return local_sum * 0.0
    grad_part = local_sum * (dist.get_world_size() / n)
    return grad_part + (total / n - grad_part).detach()


def global_count(n: int, gather: bool | None = None) -> int:
    """``n`` summed over ranks (during a training step; ``n`` otherwise), e.g. to decide on every
    rank alike whether a loss has enough pairs."""
    if gather is None:
        gather = training_collectives()
    if not gather or not is_distributed():
        return int(n)
    return sum(_sizes(int(n)))


def hash_strings(keys: Sequence[str], device: torch.device | str | None = None) -> torch.Tensor:
    """(n,) int64 ids, equal exactly for equal strings on every rank (blake2b, not ``hash()``,
    which differs between processes)."""
    ids = [int.from_bytes(hashlib.blake2b(str(k).encode("utf-8"), digest_size=8).digest(), "little", signed=True)
           for k in keys]
    return torch.tensor(ids, dtype=torch.long, device=device)


# ---------------------------------------------------------------------------------------------- objects


def _bytes_tensor(obj: Any) -> torch.Tensor:
    data = json.dumps(obj, sort_keys=True, allow_nan=True).encode("utf-8")
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).to(_comm_device())


def all_gather_json(obj: Any) -> list[Any]:
    """Every rank's JSON-serialisable ``obj``, in rank order (``[obj]`` in a single process)."""
    if not is_distributed():
        return [obj]
    t = _bytes_tensor(obj)
    sizes = _sizes(int(t.numel()))
    out = _gather_padded(t, sizes)
    parts, start = [], 0
    for n in sizes:
        parts.append(json.loads(bytes(out[start: start + n].cpu().tolist()).decode("utf-8")))
        start += n
    return parts


def broadcast_json(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s JSON-serialisable ``obj`` on every rank (floats round-trip exactly)."""
    if not is_distributed():
        return obj
    mine = obj if dist.get_rank() == src else None
    n = torch.tensor([_bytes_tensor(mine).numel() if mine is not None else 0], dtype=torch.long,
                     device=_comm_device())
    dist.broadcast(n, src)
    buf = _bytes_tensor(mine) if mine is not None else torch.zeros(int(n.item()), dtype=torch.uint8,
                                                                    device=_comm_device())
    dist.broadcast(buf, src)
    return json.loads(bytes(buf.cpu().tolist()).decode("utf-8"))


def gather_eval_outputs(local: dict[str, Any], n_seen: int) -> dict[str, Any]:
    """Every rank's validation outputs, merged as one process would have collected them.

    Args:
        local: this rank's outputs: key -> numpy array (rows first) or list (e.g. case ids); empty
            when the rank collected nothing.
        n_seen: samples this rank validated. The engine's validation sampler gives rank r the
            samples r, r + W, r + 2W, ... (no padding); when every key holds one row per sample on
            every rank, the rows are put back in the split's order, else concatenated in rank order.

    Returns:
        key -> the concatenated array or list (``local`` itself in a single process).
    """
    if not is_distributed():
        return local
    meta: dict[str, Any] = {}
    for key, v in local.items():
        if isinstance(v, np.ndarray):
            if v.dtype.kind not in "biuf":
                raise TypeError(f"validation output '{key}' is a {v.dtype} array; collect numbers or a list")
            meta[key] = {"kind": "array", "dtype": v.dtype.str, "tail": list(v.shape[1:]), "rows": int(v.shape[0])}
        else:
            meta[key] = {"kind": "list", "values": list(v), "rows": len(v)}
    metas = all_gather_json({"seen": int(n_seen), "keys": meta})
    keys = sorted({k for m in metas for k in m["keys"]})
    w = len(metas)
    aligned = all(k in m["keys"] and m["keys"][k]["rows"] == m["seen"] for m in metas for k in keys)
    pos = np.concatenate([r + w * np.arange(m["seen"]) for r, m in enumerate(metas)]) if aligned else None
    order = np.argsort(pos, kind="stable") if pos is not None else None
    out: dict[str, Any] = {}
    for key in keys:
        kinds = {m["keys"][key]["kind"] for m in metas if key in m["keys"]}
        if len(kinds) != 1:
            raise TypeError(f"validation output '{key}' is an array on some ranks and a list on others")
        if kinds == {"list"}:
            values = [x for m in metas if key in m["keys"] for x in m["keys"][key]["values"]]
            out[key] = [values[i] for i in order] if order is not None else values
            continue
        ref = next(m["keys"][key] for m in metas if key in m["keys"])
        dtype, tail = np.dtype(ref["dtype"]), ref["tail"]
        arr = local.get(key)
        if arr is None:
            arr = np.zeros((0, *tail), dtype=dtype)
        rows = [m["keys"][key]["rows"] if key in m["keys"] else 0 for m in metas]
        wire = np.uint8 if dtype.kind == "b" else dtype  # gloo gathers no bool tensors
        t = torch.from_numpy(np.ascontiguousarray(arr, dtype=wire)).to(_comm_device())
        full = _gather_padded(t, rows).cpu().numpy().astype(dtype, copy=False)
        out[key] = full[order] if order is not None else full
    return out


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """``t`` summed over ranks (in place, and returned; ``t`` itself in a single process)."""
    if is_distributed():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t
