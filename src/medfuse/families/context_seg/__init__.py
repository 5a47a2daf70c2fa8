"""Family ``context_seg``: a 3D UNet over frozen 2D foundation features, gated at the skips by a
coarse, wide context (seed 004).

Where things are: ``network.py`` (``ContextUNet3D``), ``fusion.py`` (``ContextAttentionFusion``),
``model.py`` (the registered model: stacked-input split, ``forward_intermediates``), ``params.py``
(``model.params`` and ``data.params``), ``data.py`` (the data module: cases -> two-stream frozen
features on the label grid, feature cache, CellMap table), ``features.py`` (the frozen slice
encoder, resampling onto the label grid, context placement), ``task.py`` (training and inference
with attention gates), ``evaluate.py`` (per-class scores, overlays, attention maps), ``predict.py``
(``medfuse predict RUN RAW [CONTEXT]``), ``demo.py`` (the EM cell phantom); configs are
``configs/context_seg_*.yaml``.
"""

from __future__ import annotations

from medfuse.families.context_seg.data import ContextSegDataModule
from medfuse.families.context_seg.demo import make_context_seg_demo
from medfuse.families.context_seg.evaluate import ContextSegEvaluator
from medfuse.families.context_seg.params import ContextSegDataParams, ContextSegParams, build_context_seg
from medfuse.families.context_seg.predict import ContextSegPredictor
from medfuse.families.context_seg.task import ContextSegTask
from medfuse.registry import Family, ModelEntry

FAMILY = Family(
    name="context_seg",
    help="3D UNet on frozen 2D features of raw + context volumes; context gates the skips (seed 004)",
    models=(
        ModelEntry("context_seg", ContextSegParams, build_context_seg, ContextSegTask, ContextSegEvaluator,
                   ContextSegPredictor,
                   help="3D UNet on frozen 2D features; context gates the skips (attention|concat|none)"),
    ),
    data_params=ContextSegDataParams,
    datamodule=ContextSegDataModule,  # its table_problems() is data check --config's view of the table
    make_demo=make_context_seg_demo,
    demo_ablations=(
        ("attention fusion", ()),
        ("concat (seed's old way)", ("model.params.fusion=concat",)),
        ("none (raw only)", ("model.params.fusion=none",)),
    ),
)
