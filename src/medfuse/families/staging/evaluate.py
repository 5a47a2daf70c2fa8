"""The staging family's evaluation: the classification report plus BGAMF gate maps, in one pass."""

from __future__ import annotations

from typing import Any

from medfuse.engine.evaluate import ClassificationEvaluator

GATE_CASES = 3


class StagingEvaluator(ClassificationEvaluator):
    """Adds ``gate_maps``: PNG overlays of the gate on T2W for the first cases of the split (BGAMF only)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.gate_maps: dict[str, Any] = {}

    def infer(self, batch):
        if self.task.model.fusion == "bgamf" and len(self.gate_maps) < GATE_CASES:
            return self.task.infer_intermediates(batch)
        return self.task.infer(batch)

    def update(self, batch, out):
        super().update(batch, out)
        if "gate" not in out:
            return
        from medfuse.reports.plots import plot_gate_overlay

        gate = out["gate"].float().cpu()  # (B, D, h, w)
        for i, cid in enumerate(batch["case_id"]):
            if len(self.gate_maps) >= GATE_CASES:
                break
            png = plot_gate_overlay(batch["image"][i, 0].cpu().numpy(), gate[i].numpy(),
                                    self.out_path("plots", f"gate_{cid}.png"),
                                    title=f"{cid}: BGAMF gate (1 = T2W, 0 = DWI)")
            self.gate_maps[cid] = {"png": str(png.relative_to(self.run_dir)), "mean_gate": float(gate[i].mean()),
                                   "per_slice": [float(v) for v in gate[i].mean(dim=(1, 2))]}

    def compute(self):
        rep = super().compute()
        if self.gate_maps:
            rep["gate_maps"] = self.gate_maps
        return rep
