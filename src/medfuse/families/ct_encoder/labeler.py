"""Findings labelers for clinical efficacy (CE precision / recall / F1 of generated reports).

A labeler maps report texts to a (N, K) 0/1 matrix over the K abnormality names of the dataset's
``labels.csv``. ``data.params.labeler`` picks one:

* ``keyword`` (default): the built-in rules below, for the names they cover (the phantom's 8
  findings and CT-RATE's 18 abnormalities); names without a rule are left out of CE.
* ``keyword:<file.json>``: rules from a JSON file, ``{"<name>": [["regex", "regex"], ...]}``.
* ``<module>:<function>``: any classifier (e.g. a fine-tuned report labeler) called as
  ``function(texts, names) -> (N, K) array``.

**Keyword rules.** A report is split into sentences; a finding is positive when one sentence
matches every regular expression of one of its patterns (case-insensitive) and is not negated. A
sentence is negated when a cue (``no``, ``not``, ``without``, ``absence of``, ``free of``,
``negative for``) stands before the match, or it says ``not (seen|detected|observed|identified|
present)``. This is a NegEx-style approximation: good for templated text such as the phantom's
(checked against its labels by a test), rough for free text; CT-RATE's own labels come from a
trained classifier (RadBERT), so plug one in for published numbers.
"""

from __future__ import annotations

import importlib
import json
import re
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from medfuse.errors import ConfigError, DataError

_LOBES = ["right upper lobe", "right middle lobe", "right lower lobe", "left upper lobe", "left lower lobe"]

RULES: dict[str, list[list[str]]] = {
    # the ct_encoder phantom (families/ct_encoder/demo.py)
    **{f"{lobe} nodule": [[rf"\b{lobe}\b", r"\bnodul"]] for lobe in _LOBES},
    "liver lesion": [[r"\b(hepatic|liver)\b", r"\blesion"]],
    # shared with CT-RATE
    "pleural effusion": [[r"\bpleural\b", r"\beffusion"], [r"\bpleural fluid\b"]],
    "cardiomegaly": [[r"\bcardiomegaly\b"], [r"\b(heart|cardiac)\b", r"\b(enlarged|enlargement|increased)\b"]],
    # CT-RATE's 18 abnormalities (approximate keywords)
    "medical material": [[r"\b(catheter|stent|pacemaker|prosthe\w*|surgical clips?|port|tube|wires?|sternotomy)\b"]],
    "arterial wall calcification": [[r"\b(aort\w*|arter\w*|vascular)\b", r"\bcalcif"]],
    "pericardial effusion": [[r"\bpericardial\b", r"\b(effusion|fluid)\b"]],
    "coronary artery wall calcification": [[r"\bcoronary\b", r"\bcalcif"]],
    "hiatal hernia": [[r"\bhiatal?\b", r"\bhernia"], [r"\bhiatus hernia\b"]],
    "lymphadenopathy": [[r"\blymphadenopath"], [r"\blymph nodes?\b", r"\b(enlarged|pathologic\w*)\b"]],
    "emphysema": [[r"\bemphysema"]],
    "atelectasis": [[r"\batelecta"]],
    "lung nodule": [[r"\bnodul"]],
    "lung opacity": [[r"\bopacit"], [r"\bground[- ]glass\b"]],
    "pulmonary fibrotic sequela": [[r"\bfibro(tic|sis)\b"], [r"\bsequela"]],
    "mosaic attenuation pattern": [[r"\bmosaic\b"]],
    "peribronchial thickening": [[r"\bperibronchial\b", r"\bthicken"]],
    "consolidation": [[r"\bconsolidat"]],
    "bronchiectasis": [[r"\bbronchiectas"]],
    "interlobular septal thickening": [[r"\bseptal\b", r"\bthicken"]],
}
"""Built-in keyword rules, keyed by lower-case abnormality name."""

_NEG_BEFORE = re.compile(r"\b(no|not|without|absence of|free of|negative for)\b", re.I)
_NEG_AFTER = re.compile(r"\bnot\s+(been\s+)?(seen|detected|observed|identified|present)\b", re.I)


def _sentences(text: str) -> list[str]:
    return [s for s in re.split(r"(?<=[.;!?])\s+|\n+", str(text or "")) if s.strip()]


class KeywordLabeler:
    """Sentence-level keyword rules with a NegEx-style negation check (see the module doc).

    Args:
        rules: name -> patterns; each pattern is a list of regexes that must all match one sentence.
    """

    def __init__(self, rules: dict[str, list[list[str]]]):
        self.rules = {k.lower().strip(): [[re.compile(r, re.I) for r in pat] for pat in v] for k, v in rules.items()}

    def covers(self, names: Sequence[str]) -> list[bool]:
        """Which names have a rule."""
        return [str(n).lower().strip() in self.rules for n in names]

    def _positive(self, sentence: str, patterns) -> bool:
        for pat in patterns:
            hits = [r.search(sentence) for r in pat]
            if all(hits):
                first = min(h.start() for h in hits)
                if not _NEG_BEFORE.search(sentence[:first]) and not _NEG_AFTER.search(sentence):
                    return True
        return False

    def __call__(self, texts: Sequence[str], names: Sequence[str]) -> np.ndarray:
        """(N, K) 0/1 (NaN columns for names without a rule)."""
        out = np.full((len(texts), len(names)), np.nan)
        for k, name in enumerate(names):
            patterns = self.rules.get(str(name).lower().strip())
            if patterns is None:
                continue
            for i, text in enumerate(texts):
                out[i, k] = float(any(self._positive(s, patterns) for s in _sentences(text)))
        return out


def build_labeler(spec: str, root: str | Path | None = None) -> Callable[[Sequence[str], Sequence[str]], np.ndarray]:
    """The labeler ``data.params.labeler`` names (see the module doc); ``root`` resolves a relative rules file."""
    if spec == "keyword":
        return KeywordLabeler(RULES)
    if spec.startswith("keyword:"):
        path = Path(spec[len("keyword:"):])
        if not path.is_absolute() and root is not None:
            path = Path(root) / path
        try:
            rules = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as e:
            raise DataError(path, f"cannot be read as keyword rules ({e})",
                            'write {"<abnormality>": [["regex", ...], ...]} as JSON') from e
        return KeywordLabeler(rules)
    if ":" in spec:
        module, _, fn = spec.partition(":")
        try:
            return getattr(importlib.import_module(module), fn)
        except (ImportError, AttributeError) as e:
            raise ConfigError("data.params.labeler", f"cannot import '{spec}' ({e})",
                              "use keyword, keyword:<rules.json> or an importable <module>:<function>") from e
    raise ConfigError("data.params.labeler", f"unknown labeler '{spec}'",
                      "use keyword, keyword:<rules.json> or <module>:<function>")
