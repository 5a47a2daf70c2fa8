"""Family ``staging``: rectal cancer T-staging from T2W + DWI MRI (seed 000).

Where things are: ``model.py`` (the network), ``bgamf.py`` (the fusion block), ``params.py``
(``model.params``), ``task.py`` (training), ``evaluate.py`` (gate maps), ``demo.py`` (the rectal
phantom); configs are ``configs/staging_*.yaml``.
"""

from __future__ import annotations

from medfuse.engine.predictors import ClassificationPredictor
from medfuse.families.staging.demo import make_staging_demo
from medfuse.families.staging.evaluate import StagingEvaluator
from medfuse.families.staging.params import StagingParams, build_staging
from medfuse.families.staging.task import StagingTask
from medfuse.registry import Family, ModelEntry

FAMILY = Family(
    name="staging",
    help="rectal cancer T-staging from T2W + DWI (MedSAM2 slices, MemoryBlock, BGAMF, Bi-Mamba)",
    models=(
        ModelEntry("staging", StagingParams, build_staging, StagingTask, StagingEvaluator, ClassificationPredictor,
                   help="MedSAM2-Mamba T-staging (T2W + DWI): MemoryBlock + BGAMF + Bi-Mamba"),
    ),
    make_demo=make_staging_demo,
    # ``sum`` is BGAMF's blend with the gate fixed at 0.5 (and no alignment, no per-modality Mamba);
    # ``gate only`` is BGAMF's learned gate without the alignment and per-modality Mamba. Together
    # they show what the gate and the two mixers each add.
    demo_ablations=(
        ("BGAMF (T2W + DWI)", ()),
        ("concat (T2W + DWI)", ("model.params.fusion=concat",)),
        ("sum (T2W + DWI, no gate)", ("model.params.fusion=sum",)),
        ("gate only (no alignment, no per-modality Bi-Mamba)", ("model.params.bgamf_align=false",
                                                               "model.params.bgamf_mamba=false")),
        ("T2W only", ("model.params.fusion=t2w_only",)),
        ("DWI only", ("model.params.fusion=dwi_only",)),
    ),
)
