"""Global negatives with the single-process answer (issue 15): two gloo processes, each holding part
of the global batch, wrapped in DDP, give the same loss and the same parameter gradients (after
DDP's averaging) as one process holding the whole batch, for every contrastive loss of the package.

One ``torch.multiprocessing`` spawn runs every case; the ranks write their results as safetensors.
"""

from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from medfuse.losses import InfoNCE, multi_positive_info_nce
from medfuse.losses.ntxent import multilevel_nt_xent, nt_xent

pytestmark = pytest.mark.ddp

WORLD = 2
ROWS = {"info_nce": (3, 3), "multi_positive": (3, 2), "nt_xent": (3, 3), "multilevel_nt_xent": (2, 2)}
"""Rows per rank of each case: the multi-positive case (ct_encoder's region and step levels) has
ranks with different numbers of pairs."""
GROUPS = ["liver ok", "lung ok", "liver ok", "cyst", "lung ok"]  # positives shared across the two ranks
D, E = 6, 4


class Towers(nn.Module):
    """Two linear towers and one learnable temperature: the parameters whose gradients are compared."""

    def __init__(self):
        super().__init__()
        self.img, self.txt = nn.Linear(D, E), nn.Linear(D, E)
        self.nce = InfoNCE(init_temp=0.2)

    def forward(self, case: str, x1: torch.Tensor, x2: torch.Tensor, groups: list[str]) -> torch.Tensor:
        a, b = self.img(x1), self.txt(x2)  # (n, E) each
        if case == "info_nce":
            return self.nce(a, b)
        if case == "multi_positive":
            return multi_positive_info_nce(a, b, groups, self.nce.scale)
        if case == "nt_xent":
            return nt_xent(a, self.img(x2), 0.5) + 0.0 * (b.sum() + self.nce.scale)  # every parameter used
        f1 = [a[:, :, None, None], self.txt(x1)[:, :, None]]  # two "levels": (n, E, 1, 1) and (n, E, 1)
        f2 = [self.img(x2)[:, :, None, None], b[:, :, None]]
        return multilevel_nt_xent(f1, f2, 0.5) + 0.0 * self.nce.scale


def _inputs(case: str) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    n = sum(ROWS[case])
    g = torch.Generator().manual_seed(len(case))
    return torch.randn(n, D, generator=g), torch.randn(n, D, generator=g), GROUPS[:n]


def _model() -> Towers:
    torch.manual_seed(0)
    return Towers()


def _grads(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: p.grad.detach().clone() for k, p in model.named_parameters()}


def _worker(rank: int, store: str, out: str) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD)
    try:
        result: dict[str, torch.Tensor] = {}
        for case, sizes in ROWS.items():
            x1, x2, groups = _inputs(case)
            lo = sum(sizes[:rank])
            part = slice(lo, lo + sizes[rank])
            model = _model()
            ddp = DDP(model)
            loss = ddp(case, x1[part], x2[part], groups[part])
            loss.backward()  # DDP averages the gradients over the ranks
            result[f"{case}/loss"] = loss.detach()
            result.update({f"{case}/grad/{k}": v for k, v in _grads(model).items()})
            with torch.no_grad():  # no collective outside a training step: the rank's own rows only
                result[f"{case}/local"] = model(case, x1[part], x2[part], groups[part])
        save_file({k: v.contiguous() for k, v in result.items()}, os.path.join(out, f"rank{rank}.safetensors"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict[str, torch.Tensor]]:
    import torch.multiprocessing as mp

    out = tmp_path_factory.mktemp("ddp_losses")
    mp.spawn(_worker, args=(str(out / "store"), str(out)), nprocs=WORLD, join=True)
    return [load_file(str(out / f"rank{r}.safetensors")) for r in range(WORLD)]


@pytest.mark.parametrize("case", list(ROWS))
def test_two_ranks_give_the_single_process_loss_and_gradients(ranks, case):
    x1, x2, groups = _inputs(case)
    model = _model()
    ref = model(case, x1, x2, groups)  # one process, the whole global batch
    ref.backward()
    ref_grads = _grads(model)
    for r, res in enumerate(ranks):
        torch.testing.assert_close(res[f"{case}/loss"], ref.detach(), rtol=1e-5, atol=1e-6, msg=f"rank {r} loss")
        for k, g in ref_grads.items():
            torch.testing.assert_close(res[f"{case}/grad/{k}"], g, rtol=1e-4, atol=1e-6, msg=f"rank {r} grad {k}")


@pytest.mark.parametrize("case", list(ROWS))
def test_no_gradient_no_gather(ranks, case):
    """Under no_grad (validation) a rank scores its own rows: no collective, so ranks may run
    different numbers of validation batches."""
    x1, x2, groups = _inputs(case)
    model = _model()
    sizes = ROWS[case]
    with torch.no_grad():
        for r, res in enumerate(ranks):
            part = slice(sum(sizes[:r]), sum(sizes[: r + 1]))
            torch.testing.assert_close(res[f"{case}/local"], model(case, x1[part], x2[part], groups[part]))
