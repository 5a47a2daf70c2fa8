"""Family ``incomplete_seg``: UniMRSeg, brain-tumour segmentation from any subset of MRI modalities
(seed 003, "Understanding UniMRSeg": three stages of hierarchical self-supervised compensation).

Where things are: ``model.py`` (the 3D UNet + ASPP network with modality presence and adapters),
``params.py`` (``model.params`` and ``data.params``), ``task.py`` (the three stages' forward and
losses, validation over modality combinations), ``evaluate.py`` (Dice/HD95 for every modality
combination in one pass), ``predict.py`` (any modality subset), ``data.py`` (regions, modality subsets,
masking, the data module, predict inputs), ``demo.py`` (the brain-tumour phantom); configs are
``configs/incomplete_seg_*.yaml``.
"""

from __future__ import annotations

from medfuse.families.incomplete_seg.compare import demo_comparison
from medfuse.families.incomplete_seg.data import IncompleteSegDataModule
from medfuse.families.incomplete_seg.demo import make_incomplete_seg_demo
from medfuse.families.incomplete_seg.evaluate import IncompleteSegEvaluator
from medfuse.families.incomplete_seg.params import (
    IncompleteSegDataParams,
    IncompleteSegParams,
    build_incomplete_seg,
)
from medfuse.families.incomplete_seg.predict import IncompleteSegPredictor
from medfuse.families.incomplete_seg.task import IncompleteSegTask
from medfuse.registry import Family, ModelEntry

FAMILY = Family(
    name="incomplete_seg",
    help="brain-tumour regions (WT/TC/ET) from any subset of MRI modalities (UniMRSeg, 3-stage training)",
    models=(
        ModelEntry("incomplete_seg", IncompleteSegParams, build_incomplete_seg, IncompleteSegTask,
                   IncompleteSegEvaluator, IncompleteSegPredictor,
                   help="UniMRSeg: 3D UNet + ASPP, 3-stage training for any modality subset"),
    ),
    data_params=IncompleteSegDataParams,
    datamodule=IncompleteSegDataModule,
    make_demo=make_incomplete_seg_demo,
    # The first variant is the full model. The baselines are single-stage runs with the demo
    # config's ``train.max_epochs`` (as many epochs as the three stages together) and the same
    # selection rule (mean validation Dice over the modality combinations).
    demo_ablations=(
        ("UniMRSeg, 3 stages", ()),
        ("UNet + modality dropout", ("train.stages=[]", "model.params.modality_dropout=0.5",
                                     "model.params.adapters=false")),
    ),
    demo_compare=demo_comparison,
)
