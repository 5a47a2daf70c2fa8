"""Family ``text_seg``: text-guided box-prompted 2D segmentation on a frozen MedSAM (seed 002, Talk2MedSAM).

Where things are: ``model.py`` (the network), ``fusion.py`` (the text fusion blocks),
``sam_prompt.py`` (the promptable image side and MedSAM preprocessing), ``params.py``
(``model.params`` and ``data.params``), ``task.py`` (loss and validation Dice), ``evaluate.py``
(evaluation at the original resolution, counterfactual text), ``predict.py`` (prediction from a
CSV), ``data.py`` (the data module), ``demo.py`` (the ultrasound-like phantom); configs are
``configs/text_seg_*.yaml``.
"""

from __future__ import annotations

from medfuse.families.text_seg.data import TextSegDataModule
from medfuse.families.text_seg.demo import QUICK_OVERRIDES, make_text_seg_demo
from medfuse.families.text_seg.evaluate import TextSegEvaluator
from medfuse.families.text_seg.params import TextSegDataParams, TextSegParams, build_text_seg
from medfuse.families.text_seg.predict import TextSegPredictor
from medfuse.families.text_seg.task import TextSegTask
from medfuse.registry import Family, ModelEntry

FAMILY = Family(
    name="text_seg",
    help="text-guided box-prompted 2D segmentation: text fused into frozen MedSAM embeddings (Talk2MedSAM)",
    models=(
        ModelEntry("text_seg", TextSegParams, build_text_seg, TextSegTask, TextSegEvaluator, TextSegPredictor,
                   help="Talk2MedSAM: text fused into frozen MedSAM embeddings (hierarchical / gated)"),
    ),
    data_params=TextSegDataParams,
    datamodule=TextSegDataModule,
    make_demo=make_text_seg_demo,
    demo_quick=QUICK_OVERRIDES,  # 64 px, batch 4, 6 epochs: the quick budget's 6 steps learned nothing
    # Rows with demo.weights_from are not trained: MedSAM as it is takes the box-only run's image
    # side and decoder without any adapter (with a frozen MedSAM: MedSAM itself, untouched); the
    # wrong-text rows evaluate the hierarchical model's weights with wrong test text.
    demo_ablations=(
        ("hierarchical fusion", ()),
        ("single-level gated fusion", ("model.params.fusion=gated",)),
        ("no text (box only)", ("model.params.fusion=none",)),
        ("MedSAM as it is (box only, no adapter, no training)",
         ("model.params.fusion=bypass", "demo.weights_from=no text (box only)")),
        ("hierarchical, shuffled test text",
         ("data.params.test_counterfactual=text=shuffle", "demo.weights_from=hierarchical fusion")),
        ("hierarchical, size and echogenicity both wrong",
         ("data.params.test_counterfactual=size=wrong,echogenicity=wrong", "demo.weights_from=hierarchical fusion")),
    ),
)
