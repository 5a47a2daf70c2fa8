"""The model families, listed once: importing this package registers each in
:data:`medfuse.registry.FAMILIES`.

Adding a family is one folder ``families/<name>/`` (whose ``__init__`` defines ``FAMILY``) plus
one ``FAMILIES.register`` line below (and its name in the import).
"""

from __future__ import annotations

from medfuse.families import baseline, context_seg, ct_encoder, incomplete_seg, staging, text_seg
from medfuse.registry import FAMILIES

FAMILIES.register(baseline.FAMILY)
FAMILIES.register(staging.FAMILY)
FAMILIES.register(ct_encoder.FAMILY)
FAMILIES.register(text_seg.FAMILY)
FAMILIES.register(incomplete_seg.FAMILY)
FAMILIES.register(context_seg.FAMILY)
