"""The staging family's evaluation: the classification report plus BGAMF's gate, in one pass.

With ``fusion: bgamf`` every batch is inferred once through ``forward_intermediates``, which also
returns the gate (the same cost as a plain forward). The report gets:

* ``gate_spread``: how far the learned gate departs from a constant, over all tokens of the split:
  mean and standard deviation over tokens (pooled, within a case, between cases), percentiles, the
  mean standard deviation over channels, and the two modality regions: the tokens where the gate
  favours T2W (g > 0.5) and those where it favours DWI (g < 0.5), with their share and mean gate.
  A gate that is 0.5 everywhere is an average of the two streams (the ``sum`` ablation).
* ``gate_maps``: for the first :data:`GATE_CASES` cases, a PNG of the gate over T2W on a diverging
  scale centred at the case's mean gate (its range printed), and the case's statistics.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from medfuse.engine.evaluate import ClassificationEvaluator

GATE_CASES = 3


def gate_statistics(gates: list[np.ndarray], channel_sd: list[np.ndarray] | None = None) -> dict[str, Any]:
    """Spread of a gate over tokens and cases.

    Args:
        gates: one array per case of the channel-mean gate, any shape (e.g. (D, h, w)), in (0, 1);
            1 = T2W, 0 = DWI.
        channel_sd: per case, the gate's standard deviation over channels, same shapes (optional).

    Returns:
        ``mean``, ``sd_tokens`` (over all tokens of all cases), ``sd_within_case`` (mean over cases of
        the per-case sd), ``sd_between_cases`` (sd of the case means), ``min``, ``p05``, ``p50``,
        ``p95``, ``max``, ``mean_channel_sd`` (when given), ``n_cases``, ``n_tokens``, and
        ``t2w_favoured`` / ``dwi_favoured``: ``fraction`` of tokens with g > 0.5 / g < 0.5 and their
        ``mean_gate`` (None when there are none).
    """
    if not gates:
        raise ValueError("no gate values")
    flat = [np.asarray(g, dtype=np.float64).ravel() for g in gates]
    allg = np.concatenate(flat)
    means = np.array([f.mean() for f in flat])
    q = np.percentile(allg, [5, 50, 95])

    def region(sel: np.ndarray) -> dict[str, Any]:
        return {"fraction": float(sel.mean()), "mean_gate": float(allg[sel].mean()) if sel.any() else None}

    out: dict[str, Any] = {
        "mean": float(allg.mean()), "sd_tokens": float(allg.std()),
        "sd_within_case": float(np.mean([f.std() for f in flat])), "sd_between_cases": float(means.std()),
        "min": float(allg.min()), "p05": float(q[0]), "p50": float(q[1]), "p95": float(q[2]), "max": float(allg.max()),
        "n_cases": len(flat), "n_tokens": int(allg.size),
        "t2w_favoured": region(allg > 0.5), "dwi_favoured": region(allg < 0.5),
    }
    if channel_sd:
        out["mean_channel_sd"] = float(np.concatenate([np.asarray(s, dtype=np.float64).ravel()
                                                       for s in channel_sd]).mean())
    return out


class StagingEvaluator(ClassificationEvaluator):
    """Adds ``gate_spread`` over the whole split and ``gate_maps`` for its first cases (BGAMF only)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.gate_maps: dict[str, Any] = {}
        self.gates: list[np.ndarray] = []
        self.gate_sds: list[np.ndarray] = []

    def infer(self, batch):
        if self.task.model.fusion == "bgamf":
            return self.task.infer_intermediates(batch)  # the same single forward, with the gate
        return self.task.infer(batch)

    def update(self, batch, out):
        super().update(batch, out)
        if "gate" not in out:
            return
        from medfuse.reports.plots import plot_gate_overlay

        gate = out["gate"].float().cpu().numpy()  # (B, D, h, w)
        sd = out["gate_channel_sd"].float().cpu().numpy() if "gate_channel_sd" in out else None
        for i, cid in enumerate(batch["case_id"]):
            self.gates.append(gate[i])
            if sd is not None:
                self.gate_sds.append(sd[i])
            if len(self.gate_maps) >= GATE_CASES:
                continue
            stats = gate_statistics([gate[i]], None if sd is None else [sd[i]])
            png = plot_gate_overlay(batch["image"][i, 0].cpu().numpy(), gate[i],
                                    self.out_path("plots", f"gate_{cid}.png"), center=stats["mean"],
                                    title=f"{cid}: BGAMF gate (> mean: more T2W, < mean: more DWI)")
            self.gate_maps[cid] = {"png": str(png.relative_to(self.run_dir)), "mean_gate": stats["mean"],
                                   "sd_gate": stats["sd_tokens"], "min_gate": stats["min"], "max_gate": stats["max"],
                                   "per_slice": [float(v) for v in gate[i].mean(axis=(1, 2))]}

    def compute(self):
        rep = super().compute()
        if self.gates:
            rep["gate_spread"] = gate_statistics(self.gates, self.gate_sds or None)
            s = rep["gate_spread"]
            rep.setdefault("notes", []).append(
                f"BGAMF gate over {s['n_tokens']} tokens of {s['n_cases']} cases: mean {s['mean']:.3f}, "
                f"sd {s['sd_tokens']:.3f} (within a case {s['sd_within_case']:.3f}), 5-95% "
                f"[{s['p05']:.3f}, {s['p95']:.3f}]; T2W favoured on {100 * s['t2w_favoured']['fraction']:.0f}% "
                "of tokens (1 = T2W, 0 = DWI)")
        if self.gate_maps:
            rep["gate_maps"] = self.gate_maps
        return rep
