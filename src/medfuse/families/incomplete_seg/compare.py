"""Paired comparison of two incomplete_seg runs over the modality combinations (seed 003 demo).

Two models evaluated on the same test cases can be compared case by case: for every modality
combination, the difference of their mean Dice over the regions is computed per case and its mean
gets a bootstrap CI over cases (paired: one resample draws the same cases for both models). That is
sharper than comparing two CIs that each carry the case-to-case spread. When a patient has several
cases (follow-up scans), the bootstrap resamples patients instead, still paired: one resample draws
the same patients, with all their cases, for both models.

The evaluator stores what this needs with :func:`save_combination_dice`
(``predictions/<split>/combinations_dice.csv``: one row per case and combination, the case's
patient, one column per region); :func:`compare_runs` reads two runs' files and
:func:`paired_differences` does the statistics; :func:`comparison_markdown` formats the table.

Shapes: N cases, C combinations, R regions.
"""

from __future__ import annotations

import csv
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from medfuse.errors import RunDirError

COMBINATIONS_FILE = "combinations_dice.csv"


def save_combination_dice(path: str | Path, case_ids: list[str], combinations: list[str], regions: list[str],
                          dice: np.ndarray, patient_ids: list[str] | None = None) -> Path:
    """Write per-case Dice (N, C, R) as ``case_id, [patient_id,] combination, dice_<region>...`` rows
    (NaN: not scored); ``patient_ids`` (N,), when given, is the patient of each case."""
    from medfuse.fileio import atomic_open

    d = np.asarray(dice, dtype=np.float64)
    if d.shape != (len(case_ids), len(combinations), len(regions)):
        raise ValueError(f"dice is {d.shape}, expected (cases, combinations, regions) = "
                         f"{(len(case_ids), len(combinations), len(regions))}")
    if patient_ids is not None and len(patient_ids) != len(case_ids):
        raise ValueError(f"{len(patient_ids)} patient ids for {len(case_ids)} cases")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_open(path, "w", newline="", encoding="utf-8") as f:
        wr = csv.writer(f)
        wr.writerow(["case_id", *(["patient_id"] if patient_ids is not None else []), "combination",
                     *[f"dice_{r}" for r in regions]])
        for i, cid in enumerate(case_ids):
            pid = [] if patient_ids is None else [patient_ids[i]]
            for c, name in enumerate(combinations):
                wr.writerow([cid, *pid, name, *("nan" if not np.isfinite(v) else f"{v:.6f}" for v in d[i, c])])
    return path


def load_combination_dice(path: str | Path) -> tuple[list[str], list[str], list[str], np.ndarray]:
    """Read :func:`save_combination_dice`'s file -> (case ids, combinations, regions, dice (N, C, R)).

    Raises:
        RunDirError: the file is missing (the run was evaluated before the file existed).
    """
    path = Path(path)
    if not path.is_file():
        raise RunDirError(path, "no per-case Dice per modality combination",
                          "evaluate the run again (medfuse evaluate RUN) with this version")
    with path.open(newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    regions = [k[len("dice_"):] for k in (rows[0] if rows else {}) if k.startswith("dice_")]
    cases = list(dict.fromkeys(r["case_id"] for r in rows))
    combos = list(dict.fromkeys(r["combination"] for r in rows))
    index = {(r["case_id"], r["combination"]): r for r in rows}
    dice = np.array([[[float(index[(c, k)][f"dice_{r}"]) for r in regions] for k in combos] for c in cases])
    return cases, combos, regions, dice.reshape(len(cases), len(combos), len(regions))


def load_patient_ids(path: str | Path) -> dict[str, str]:
    """``case_id -> patient_id`` from :func:`save_combination_dice`'s file; empty when the file has
    no ``patient_id`` column (written before patient ids were stored) or does not exist."""
    path = Path(path)
    if not path.is_file():
        return {}
    with path.open(newline="", encoding="utf-8") as f:
        return {r["case_id"]: r["patient_id"] for r in csv.DictReader(f) if r.get("patient_id")}


def _case_means(dice: np.ndarray) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a case with no scored region stays NaN
        return np.nanmean(dice, axis=-1)


def paired_differences(a: np.ndarray, b: np.ndarray, combinations: list[str], n_boot: int = 1000,
                       seed: int = 0, groups: list[str] | None = None) -> dict[str, Any]:
    """Per combination, the mean over cases of (Dice of ``a`` - Dice of ``b``), with a paired bootstrap CI.

    Args:
        a, b: per-case Dice (N, C, R) of the two models on the same cases (same order).
        combinations: C names; the last is the complete set (as ``modality_combinations`` orders them).
        n_boot: bootstrap resamples.
        seed: bootstrap seed.
        groups: (N,) the patient of each case, or None. When some patient has several cases the
            bootstrap resamples patients (:func:`~medfuse.metrics.bootstrap.mean_ci`): ``a``, ``b``
            and the difference are computed on the same cases with the same groups and seed, so
            one resample draws the same patients, with all their cases, for both models; ``n``
            then counts patients and ``n_items`` cases. With one case per patient (or None) the
            bootstrap is over cases, as before.

    Returns:
        ``rows``: per combination ``{"combination", "a", "b", "difference"}`` (CI dicts over the cases
        both models scored), ``incomplete`` and ``all``: the same for the per-case mean over the
        incomplete (all but the last) and over all combinations, ``a_better`` / ``b_better``:
        the combinations whose difference CI lies above / below 0, ``n_boot``, and
        ``n_patients`` when the bootstrap resampled patients.
    """
    from medfuse.metrics import mean_ci, repeated_groups

    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 3 or a.shape[1] != len(combinations):
        raise ValueError(f"a and b must be (cases, {len(combinations)} combinations, regions) alike; "
                         f"got {a.shape}, {b.shape}")
    if groups is not None and len(groups) != a.shape[0]:
        raise ValueError(f"{len(groups)} groups for {a.shape[0]} cases")
    g = repeated_groups(groups) if groups is not None else None
    g = None if g is None else np.asarray(g, dtype=str)
    ma, mb = _case_means(a), _case_means(b)  # (N, C)

    def entry(xa: np.ndarray, xb: np.ndarray) -> dict[str, Any]:
        ok = np.isfinite(xa) & np.isfinite(xb)  # the same cases (and groups) for a, b and the difference
        return {k: mean_ci(v[ok], None if g is None else g[ok], n_boot=n_boot, seed=seed)
                for k, v in (("a", xa), ("b", xb), ("difference", xa - xb))}

    rows = [{"combination": name, **entry(ma[:, c], mb[:, c])} for c, name in enumerate(combinations)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        inc = entry(np.nanmean(ma[:, :-1], 1), np.nanmean(mb[:, :-1], 1))
        allc = entry(np.nanmean(ma, 1), np.nanmean(mb, 1))
    out = {"rows": rows, "incomplete": inc, "all": allc,
           "a_better": [r["combination"] for r in rows if r["difference"]["low"] > 0],
           "b_better": [r["combination"] for r in rows if r["difference"]["high"] < 0],
           "n_boot": n_boot}
    if g is not None:
        out["n_patients"] = len(set(g.tolist()))
    return out


def compare_runs(run_a: str | Path, run_b: str | Path, split: str = "test", n_boot: int = 1000,
                 seed: int = 0) -> dict[str, Any]:
    """:func:`paired_differences` of two evaluated runs (``a`` minus ``b``) on their common cases,
    resampling patients when a patient has several of them (patient ids from the runs' files, run
    ``a``'s first; a case without one is its own patient).

    Raises:
        RunDirError: a run lacks the per-case file, or the runs share no case or no combination list.
    """
    file_a = Path(run_a) / "predictions" / split / COMBINATIONS_FILE
    file_b = Path(run_b) / "predictions" / split / COMBINATIONS_FILE
    ca, ka, ra, da = load_combination_dice(file_a)
    cb, kb, rb, db = load_combination_dice(file_b)
    if ka != kb or ra != rb:
        raise RunDirError(run_b, "has other modality combinations or regions than " + str(run_a),
                          "compare runs of the same data")
    common = [c for c in ca if c in set(cb)]
    if not common:
        raise RunDirError(run_b, f"shares no {split} case with {run_a}", "compare runs with the same split")
    ia, ib = [ca.index(c) for c in common], [cb.index(c) for c in common]
    patient = {**load_patient_ids(file_b), **load_patient_ids(file_a)}
    out = paired_differences(da[ia], db[ib], ka, n_boot=n_boot, seed=seed,
                             groups=[patient.get(c, c) for c in common])
    out.update({"a": str(run_a), "b": str(run_b), "split": split, "n": len(common), "regions": ra})
    return out


def comparison_markdown(cmp: dict[str, Any], name_a: str = "a", name_b: str = "b") -> str:
    """The per-combination table: mean Dice over regions of each model and the paired difference [CI]."""
    def ci(e: dict[str, Any]) -> str:
        return f"{e['value']:.3f} [{e['low']:.3f}, {e['high']:.3f}]"

    lines = [f"| combination | {name_a} | {name_b} | difference ({name_a} - {name_b}) [95% CI] |",
             "|---|---:|---:|---|"]
    if cmp.get("n_patients") is not None:  # the CIs resampled patients: say so above the table
        lines.insert(0, f"CIs over {cmp['n_patients']} patients ({cmp.get('n', '?')} cases, paired)\n")
    for r in cmp["rows"]:
        lines.append(f"| {r['combination']} | {r['a']['value']:.3f} | {r['b']['value']:.3f} | {ci(r['difference'])} |")
    for key, label in (("incomplete", "mean of the incomplete combinations"), ("all", "mean of all combinations")):
        e = cmp[key]
        lines.append(f"| **{label}** | {ci(e['a'])} | {ci(e['b'])} | {ci(e['difference'])} |")
    return "\n".join(lines) + "\n"


def demo_comparison(rows: list[dict[str, Any]], n_boot: int = 1000) -> dict[str, Any]:
    """The demo's paired table: the first variant (UniMRSeg) against each other trained variant.

    Args:
        rows: the demo harness's rows (``name``, ``run``), the full model first.
        n_boot: bootstrap resamples.

    Returns:
        ``{other variant name: compare_runs(...) + {"markdown": table}}``.
    """
    first = rows[0]
    out: dict[str, Any] = {}
    for row in rows[1:]:
        cmp = compare_runs(first["run"], row["run"], n_boot=n_boot)
        cmp["markdown"] = comparison_markdown(cmp, first["name"], row["name"])
        out[row["name"]] = cmp
    return out
