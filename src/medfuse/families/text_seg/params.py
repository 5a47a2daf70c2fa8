"""``model.params`` and ``data.params`` of the text_seg family (seed 002); ``medfuse models text_seg``
prints them."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from medfuse.config import Params
from medfuse.errors import ConfigError

COUNTERFACTUAL_MODES = ("shuffle", "wrong")
"""Counterfactual actions besides a literal value: ``shuffle`` (another record's value, which may
equal its own) and ``wrong`` (always a different value: a derangement of the field's values)."""


def parse_counterfactual_spec(spec: str) -> list[tuple[str, str]]:
    """``"FIELD=ACTION[,FIELD=ACTION...]"`` -> ``[(field, action), ...]``.

    ACTION is ``shuffle``, ``wrong`` or a literal value. Several fields change together (the seed's
    "both wrong": ``birads=wrong,margin=wrong``); ``text`` (the whole text) stands alone.

    Raises:
        ValueError: one line saying what is malformed (callers wrap it in their ConfigError).
    """
    pairs: list[tuple[str, str]] = []
    for part in str(spec).split(","):
        field, sep, action = part.partition("=")
        field, action = field.strip(), action.strip()
        if not sep or not field or action == "":
            raise ValueError(f"'{spec}' is not FIELD=shuffle|wrong|VALUE[,FIELD=...] (e.g. margin=shuffle)")
        pairs.append((field, action))
    fields = [f for f, _ in pairs]
    if len(set(fields)) != len(fields):
        raise ValueError(f"'{spec}' names a field twice")
    if "text" in fields and len(fields) > 1:
        raise ValueError(f"'{spec}': 'text' replaces the whole text and cannot be combined with other fields")
    return pairs


class TextSegParams(Params):
    """Talk2MedSAM: frozen MedSAM image side + text fusion adapter + SAM mask decoder."""

    image_encoder: Literal["medsam", "tiny"] = Field(
        "medsam", description="image side: medsam (SAM ViT-B + SAM decoder) or tiny (CPU CNN + small SAM decoder)")
    image_weights: str | None = Field(None, description="local medsam_vit_b.pth for medsam (None: random weights; "
                                                        "train refuses a frozen image side without weights)")
    image_size: int | None = Field(None, description="input side S, equal to data.params.image_size "
                                                     "(default 1024 for medsam, 128 for tiny)")
    freeze_image_side: bool = Field(True, description="keep the image encoder, prompt encoder and mask decoder frozen")
    tiny_dim: int = Field(64, ge=1, description="embedding width C of the tiny pair")
    tiny_hidden: tuple[int, int] = Field((16, 32), description="first two widths of the tiny encoder")
    text_encoder: str = Field("minilm", description="frozen text encoder: minilm or hf:<local folder>")
    fusion: Literal["hierarchical", "gated", "none", "bypass"] = Field(
        "hierarchical", description="text fusion: hierarchical (two levels), gated (single level), "
                                    "none (learned constant instead of text: the box-only control), "
                                    "bypass (no adapter, no text: MedSAM as it is with a box)")
    token_dim: int = Field(96, ge=1, description="width of the hierarchical text tokens (and of the contrastive space)")
    coarse_heads: int = Field(4, ge=1, description="attention heads of level 1 (coarse)")
    fine_heads: int = Field(8, ge=1, description="attention heads of level 2 (fine)")
    coarse_gate: float = Field(0.5, gt=0, lt=1, description="effective gate of level 1 at initialisation")
    fine_gate: float = Field(0.8, gt=0, lt=1, description="effective gate of level 2 at initialisation")
    gated_init: float = Field(0.8, gt=0, lt=1, description="image share of the gated baseline at initialisation")
    dice_weight: float = Field(1.0, description="weight of the Dice loss (a stage's losses.dice overrides)")
    bce_weight: float = Field(1.0, description="weight of the BCE loss (a stage's losses.bce overrides)")
    contrastive_weight: float = Field(2.0, description="weight of the InfoNCE term in training "
                                                       "(a stage's losses.contrastive overrides)")
    init_temperature: float = Field(0.07, gt=0, description="initial contrastive temperature")
    min_temperature: float = Field(0.01, gt=0, description="lower clamp of the learnable temperature")
    max_temperature: float = Field(1.0, gt=0, description="upper clamp of the learnable temperature")
    contrastive_pool: Literal["mask", "global"] = Field(
        "mask", description="image side of InfoNCE: the embedding pooled under the target mask, or its global mean")
    embedding_cache: str | None = Field(None, description="disk cache of frozen image embeddings (None: off)")
    box_margin: float | None = Field(
        0.1, ge=0, description="evaluate and predict: pixels outside the box prompt grown by box_margin x its "
                               "width / height on each side are background, as the box says where the target is "
                               "(0.1: data.params.box_jitter's default); null: the output is not restricted")


class TextSegDataParams(Params):
    """``data.params`` of the text_seg data module (2D images + masks + text + box prompts)."""

    image_size: int = Field(1024, ge=16, description="model input side S (MedSAM: 1024)")
    mask_size: int = Field(256, ge=16, description="training / validation mask side m (MedSAM's low-res logits: 256)")
    intensity: Literal["ct", "mr", "minmax"] = Field(
        "minmax", description="ct (window), mr (0.5-99.5 percentiles of nonzero pixels), minmax (US, X-ray, RGB)")
    window: tuple[float, float] | None = Field(None, description="[level, width] for ct (default 40/400)")
    modality: str | None = Field(None, description="which image_<modality> column (default: the first)")
    text_template: str | None = Field(
        None, description="e.g. '{size} {echogenicity} mass, {margin} margins' (None: the text column)")
    box_source: Literal["mask", "csv"] = Field("mask", description="mask: MedSAM's tight box of the target; "
                                                                   "csv: the box columns")
    box_jitter: float = Field(0.1, ge=0, lt=1, description="training only: each side moves outwards by "
                                                           "U(0, jitter * side)")
    flip: bool = Field(False, description="training only: left-right flips (p = 0.5), never up-down")
    mask_value: int | None = Field(None, description="None: any nonzero label is the target; an int: that label")
    two_and_half_d: bool = Field(False, description="3 consecutive slices as RGB (volumes with a slice column)")
    split_by: Literal["patient", "image"] = Field("patient", description="image is refused when patient ids exist")
    test_counterfactual: str | None = Field(
        None, description="FIELD=shuffle|wrong|VALUE[,FIELD=...] applied to the test split's text only "
                          "(the demo's wrong-text rows)")
    cache_in_memory: bool = Field(True, description="keep preprocessed images and masks in memory after the "
                                                    "first epoch")

    @field_validator("test_counterfactual")
    @classmethod
    def _counterfactual_spec(cls, v: str | None) -> str | None:
        if v is not None:
            parse_counterfactual_spec(v)
        return v


def check_image_side_weights(p: TextSegParams, model_weights: str | None, trained_before: bool) -> None:
    """Refuse training a frozen image side that no weights reach: it would stay random.

    With ``freeze_image_side`` only the adapter trains, so the image encoder, prompt encoder and
    mask decoder keep the weights they were built with. Weights reach them from ``image_weights``
    (MedSAM), from ``model.weights`` (the whole model) or from a checkpoint of this run (``--resume``,
    or a later stage that starts from an earlier one's best). Called when ``train`` starts a run
    (:meth:`~medfuse.families.text_seg.data.TextSegDataModule.setup` for ``fit``, before anything
    is written); ``evaluate``, ``predict`` and ``export`` load trained weights and are not checked.

    Args:
        p: the run's validated ``model.params``.
        model_weights: the config's ``model.weights`` (None: unset).
        trained_before: the run folder already holds checkpoints.

    Raises:
        ConfigError: naming ``model.params.image_weights``.
    """
    if not p.freeze_image_side or p.image_weights or model_weights or trained_before:
        return
    fix = ("set model.params.freeze_image_side=false (the tiny image side has no pretrained weights and trains "
           "with the adapter)" if p.image_encoder == "tiny" else
           "give the local MedSAM weights (model.params.image_weights=/path/medsam_vit_b.pth), or set "
           "model.params.freeze_image_side=false")
    raise ConfigError("model.params.image_weights", f"image_encoder={p.image_encoder} is frozen "
                      "(freeze_image_side=true) but no weights are given: its image encoder and mask decoder would "
                      "stay random while only the adapter trains", fix)


LOSS_WEIGHTS = ("dice_weight", "bce_weight", "contrastive_weight")
"""Params read by the task's loss (:class:`~medfuse.families.text_seg.task.TextSegTask`), not by the model."""


def build_text_seg(p: TextSegParams):
    """The text_seg model from validated params (the loss weights go to the task)."""
    from medfuse.families.text_seg.model import TextSegModel

    return TextSegModel(**p.model_dump(exclude=set(LOSS_WEIGHTS)))
