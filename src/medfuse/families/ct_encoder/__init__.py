"""Family ``ct_encoder``: a 3D CT encoder with slice- and region-aware attention, aligned to
chain-of-thought reports (seed 001).

Where things are: ``model.py`` (the network, ``forward_intermediates`` with the region attention,
text-to-patch step attention), ``params.py`` (``model.params`` and ``data.params``), ``task.py``
(the three-level loss, generation, CoT-anchored loss), ``generation.py`` (visual prefix + causal
LM report generator), ``labeler.py`` (findings labelers for clinical efficacy), ``evaluate.py``
(every metric of the seed's list: retrieval, volume-to-volume retrieval, zero-shot AUROC, linear
probe, region-text alignment, step-patch correlation, localization IoU, report generation with a
nearest-neighbour baseline), ``predict.py`` (embeddings and generated reports per volume),
``data.py`` (CT-RATE layout, CoT, masks, lesion masks, HU once), ``transforms.py`` (the per-case
transform chain: HU step, lesion masks as a second mask channel, OmniAbnorm-CT slabs), ``demo.py``
(the chest/abdomen phantom); the demo config is ``configs/ct_encoder_demo.yaml``.
"""

from __future__ import annotations

from medfuse.families.ct_encoder.data import ct_encoder_datamodule
from medfuse.families.ct_encoder.demo import make_ct_encoder_demo
from medfuse.families.ct_encoder.evaluate import CTEncoderEvaluator
from medfuse.families.ct_encoder.params import CTEncoderDataParams, CTEncoderParams, build_ct_encoder
from medfuse.families.ct_encoder.predict import CTEncoderPredictor
from medfuse.families.ct_encoder.task import CTEncoderTask
from medfuse.registry import Family, ModelEntry

FAMILY = Family(
    name="ct_encoder",
    help="3D CT encoder with slice- and region-aware attention, aligned to chain-of-thought reports",
    models=(
        ModelEntry("ct_encoder", CTEncoderParams, build_ct_encoder, CTEncoderTask, CTEncoderEvaluator,
                   CTEncoderPredictor,
                   help="3D CT ViT with slice-aware + region-aware attention, 3-level CoT alignment, "
                        "optional report generator"),
    ),
    data_params=CTEncoderDataParams,
    datamodule=ct_encoder_datamodule,
    make_demo=make_ct_encoder_demo,
    demo_ablations=(
        ("full: slice + region attention (log)", ()),
        ("region attention off", ("model.params.region_attention=false",)),
        ("region attention, seed 'multiply'", ("model.params.weighting=multiply",)),
    ),
)
