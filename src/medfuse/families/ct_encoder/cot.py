"""Report text and chain-of-thought records for the ``ct_encoder`` family (seed 001): the region
vocabulary (names and groups -> region ids), report sentences per region, CoT steps with their
regions and lesions, and the reader of CoT files (the seed's ``cot_reasoning`` schema and CT-RATE-style
thinking records). Nothing here opens a volume."""

from __future__ import annotations

import json
import re
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from medfuse.data.layouts.ctrate import volume_stem
from medfuse.errors import DataError

__all__ = ["RegionVocab", "check_cot_coverage", "cot_step_lesions", "cot_steps", "merge_cot", "read_cot", "region_sentences", "sentences",
           "thinking_text"]


class RegionVocab:
    """Region names and groups -> region ids, for ``mask_region`` fields and report sentences.

    Args:
        names: region id (1..R) -> name.
        groups: group name -> region ids (e.g. "right lung" -> the three right lobes).
    """

    def __init__(self, names: dict[int, str], groups: dict[str, list[int]] | None = None):
        self.names = {int(k): str(v).lower().strip() for k, v in names.items()}
        self.groups = {str(k).lower().strip(): [int(i) for i in v] for k, v in (groups or {}).items()}
        terms = [(n, [i]) for i, n in self.names.items()] + list(self.groups.items())
        self._terms = sorted(terms, key=lambda t: -len(t[0]))  # longest first: "left lung" before "lung"

    def resolve(self, phrase: str | None) -> list[int]:
        """Region ids of a ``mask_region``: a name, a group, names containing it, else names mentioned in it."""
        if not phrase:
            return []
        q = str(phrase).lower().strip()
        if q in self.groups:
            return sorted(set(self.groups[q]))
        exact = [i for i, n in self.names.items() if n == q]
        if exact:
            return exact
        within = [i for i, n in self.names.items() if q in n]
        return within or self.mentions(q)

    def mentions(self, text: str, groups: bool = True) -> list[int]:
        """Region ids named in ``text`` (whole words, longest names first, no overlaps)."""
        low, taken, ids = str(text).lower(), [], set()
        for term, rids in self._terms:
            if not groups and term in self.groups:
                continue
            for m in re.finditer(rf"\b{re.escape(term)}\b", low):
                if not any(a < m.end() and m.start() < b for a, b in taken):
                    taken.append((m.start(), m.end()))
                    ids.update(rids)
        return sorted(ids)


def sentences(text: str) -> list[str]:
    """Split report text into sentences."""
    parts = re.split(r"(?<=[.;!?])\s+|\n+", str(text or ""))
    return [s.strip() for s in parts if s.strip()]


def region_sentences(findings: str, vocab: RegionVocab) -> list[list[Any]]:
    """``[[region_id, text]]``: the findings' sentences that name exactly one region, joined per region."""
    per: dict[int, list[str]] = {}
    for s in sentences(findings):
        ids = vocab.mentions(s, groups=False)
        if len(ids) == 1:
            per.setdefault(ids[0], []).append(s)
    return [[rid, " ".join(ss)] for rid, ss in sorted(per.items())]


def cot_steps(record: dict[str, Any], vocab: RegionVocab) -> list[list[Any]]:
    """``[[text, [region ids]]]`` from one chain-of-thought record (seed schema or CT-RATE Q/A)."""
    steps = record.get("cot_reasoning")
    if isinstance(steps, list):
        out = []
        for s in sorted((s for s in steps if isinstance(s, dict)), key=lambda s: s.get("step", 0)):
            text = str(s.get("text") or "").strip()
            if text:
                ids = vocab.resolve(s.get("mask_region")) or vocab.mentions(" ".join(s.get("anatomical_entities") or []))
                out.append([text, ids])
        return out
    return [[s, vocab.mentions(s)] for s in sentences(record.get("answer", ""))]


def cot_step_lesions(record: dict[str, Any]) -> list[int]:
    """The lesion label each step of :func:`cot_steps` names (its ``lesion`` field; 0 = none), in step order."""
    steps = record.get("cot_reasoning")
    if not isinstance(steps, list):
        return [0] * len(sentences(record.get("answer", "")))
    ordered = sorted((s for s in steps if isinstance(s, dict)), key=lambda s: s.get("step", 0))
    return [int(s.get("lesion") or 0) for s in ordered if str(s.get("text") or "").strip()]


_VOLUME_KEYS = ("volumename", "VolumeName", "volume_name", "case_id", "volume", "image", "image_path", "img",
                "video", "id")
# CT-RATE-Thinking (its generator's spec, u2Tokenizer ``src/preprocess/DATA_SYNTHESIS_SPEC.md``):
#   vqa.jsonl    {image, question, thinking, answer} (+ refined_thinking, system_thinking, report in some stages)
#   report.jsonl {image, report, question, thinking_before, thinking_after}
# ``report`` there is the source radiology report (the generator's own target), ``system_thinking`` the raw
# LLM trace that quotes it and ``thinking_before`` the concatenated VQA traces: none of them is read.
_THINK_KEYS = ("thinking_after", "refined_thinking", "thinking", "think", "reasoning", "thought", "thoughts",
               "cot", "rationale")  # the first present is the record's reasoning
_ANSWER_KEYS = ("answer", "response", "output", "final_answer")
_REPORT_LEVEL_KEYS = ("thinking_after",)  # a report-level narrative: it restates the volume's VQA traces
_THINK_TAG = re.compile(r"<think>(.*?)</think>", re.DOTALL | re.IGNORECASE)


def _text(value: Any) -> str:
    if isinstance(value, list):
        return " ".join(_text(v) for v in value)
    if isinstance(value, dict):
        return _text(value.get("text") or value.get("value") or "")
    return "" if value is None else str(value).strip()


def thinking_text(record: dict[str, Any]) -> str:
    """The reasoning and answer of one CT-RATE-style thinking record, as plain text.

    Reads the first reasoning field present (``thinking_after`` > ``refined_thinking`` > ``thinking``
    > ``think``/``reasoning``/...), the ``answer``/``response``/... fields, a ``<think>...</think>``
    block inside an answer, and LLaVA-style ``conversations`` (the ``gpt`` turns). Never the
    record's ``report`` (the source report), ``system_thinking`` or ``thinking_before``.
    """
    think = next((_text(record[k]) for k in _THINK_KEYS if _text(record.get(k))), "")
    parts = [think]
    answers = [_text(record[k]) for k in _ANSWER_KEYS if k in record]
    for turn in record.get("conversations") or []:
        if isinstance(turn, dict) and str(turn.get("from", turn.get("role", ""))).lower() in ("gpt", "assistant"):
            answers.append(_text(turn.get("value", turn.get("content", ""))))
    for a in answers:
        parts += [m.strip() for m in _THINK_TAG.findall(a)]
        parts.append(_THINK_TAG.sub(" ", a).strip())
    return " ".join(p for p in parts if p)


def _level(record: dict[str, Any]) -> int:
    """2: the seed's schema; 1: a report-level thinking narrative; 0: a VQA pair or plain answer."""
    if isinstance(record.get("cot_reasoning"), list):
        return 2
    return 1 if any(_text(record.get(k)) for k in _REPORT_LEVEL_KEYS) else 0


def merge_cot(into: dict[str, dict[str, Any]], new: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Merge CoT records by volume (``into`` is updated and returned). Per volume the highest level
    wins (the seed's schema, then a report-level narrative, then VQA pairs): a report narrative
    restates the volume's VQA traces, so both would double every step. Records of one level are
    joined into one ``answer``."""
    for key, rec in new.items():
        old = into.get(key)
        if old is None or _level(rec) > _level(old):
            into[key] = dict(rec)
        elif _level(rec) == _level(old) < 2:
            old["answer"] = f"{old.get('answer', '')} {rec.get('answer', '')}".strip()
    return into


def _volume_key(record: dict[str, Any]) -> str | None:
    for k in _VOLUME_KEYS:
        value = record.get(k)
        if isinstance(value, list) and value:
            value = value[0]
        if isinstance(value, str) and value.strip():
            return volume_stem(value.strip())
    return None


def _records(path: Path) -> Iterator[Any]:
    """The records of a CoT file: JSON lines one at a time (CT-RATE-Thinking's ``vqa.jsonl`` is 0.8 GB;
    it is never held whole), else a JSON list, ``{"records": [...]}`` or a mapping volume -> record."""
    try:
        if path.suffix == ".jsonl":
            with path.open(encoding="utf-8-sig") as f:
                for n, line in enumerate(f, start=1):
                    if line.strip():
                        try:
                            yield json.loads(line)
                        except json.JSONDecodeError as e:
                            raise DataError(f"{path} (line {n})", f"is not valid JSON ({e})",
                                            "write one JSON record per line") from e
            return
        data = json.loads(path.read_text(encoding="utf-8-sig"))
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(path, f"cannot be read ({e})", "save it as UTF-8 JSON") from e
    except json.JSONDecodeError as e:
        raise DataError(path, f"is not valid JSON ({e})", "write a JSON list of records (or JSON lines)") from e
    records = data.get("records", data) if isinstance(data, dict) else data
    if isinstance(records, dict):  # keyed by volume
        records = [{"volumename": k, **v} for k, v in records.items() if isinstance(v, dict)]
    if not isinstance(records, list):
        raise DataError(path, "must hold a list of chain-of-thought records", "see the seed's CoT schema")
    yield from records


def read_cot(path: Path) -> dict[str, dict[str, Any]]:
    """Chain-of-thought records by volume: the seed's schema (``cot_reasoning``) as is; CT-RATE-style
    thinking records (JSON lines, several per volume: VQA pairs, report narratives) merged per volume
    into one ``answer`` text whose sentences become the steps (see :func:`merge_cot`)."""
    out: dict[str, dict[str, Any]] = {}
    for r in _records(path):
        key = _volume_key(r) if isinstance(r, dict) else None
        if not key:
            continue
        if isinstance(r.get("cot_reasoning"), list):
            rec = r
        else:
            rec = {"answer": thinking_text(r), **{k: r[k] for k in _REPORT_LEVEL_KEYS if k in r}}
        merge_cot(out, {key: rec})
    return out


def check_cot_coverage(steps: dict[str, list[list[Any]]], records: dict[str, dict[str, Any]], files: list[Path],
                       reports: str) -> None:
    """Refuse CoT files none of whose volumes is a case; warn when only some cases have steps, or when no
    step names a region (e.g. a translated file: the region vocabulary is English).

    Args:
        steps: case id -> its CoT steps (``[[text, region ids]]``); records: the merged CoT records
            by volume; files: the CoT files; reports: the reports file's name (for the message).
    """
    with_steps = [s for s in steps.values() if s]
    if not with_steps:
        raise DataError(", ".join(map(str, files)), f"none of its {len(records)} volumes (e.g. {next(iter(records))}) "
                        f"is a volume of {reports}", "use the CoT records of this dataset's volumes")
    if len(with_steps) < len(steps):
        warnings.warn(f"chain-of-thought for {len(with_steps)} of {len(steps)} volumes; the others have no CoT "
                      "steps", stacklevel=3)
    if not any(rids for s in with_steps for _, rids in s):
        warnings.warn("no chain-of-thought step names a region of the region vocabulary (are the records in "
                      "another language?); every step is aligned to its whole volume", stacklevel=3)
