"""``model.params`` and ``data.params`` of the ct_encoder family (seed 001); ``medfuse models ct_encoder``
prints them."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from medfuse.config import Params

LEVELS = ("global", "region", "step", "seg", "gen", "anchor")
"""The loss terms: volume <-> impression, region <-> sentences, step <-> CoT steps, auxiliary region seg,
report generation (next-token loss), CoT-anchored attention (a step's patch attention inside its region)."""


class CTEncoderParams(Params):
    """3D CT ViT with slice-aware + region-aware attention, aligned to reports at three levels."""

    in_channels: int = Field(1, description="CT channels; must be 1 (default: from the data)")
    num_regions: int = Field(20, ge=1, description="R regions of the mask (values 1..R; 0 = no region)")
    preset: Literal["tiny", "small", "base"] = Field(
        "tiny", description="encoder size: tiny 64/3/4 (CPU), small 384/6/6, base 768/12/12 (the seed's)")
    dim: int | None = Field(None, ge=1, description="transformer width (overrides the preset's)")
    depth: int | None = Field(None, ge=1, description="transformer blocks (overrides the preset's)")
    num_heads: int | None = Field(None, ge=1, description="attention heads (overrides the preset's)")
    patch_size: tuple[int, int, int] = Field((4, 16, 16), description="(D, H, W) voxels per patch")
    img_size: tuple[int, int, int] = Field(
        (64, 512, 512), description="(D, H, W) the learned positions are laid out for (interpolated otherwise)")
    pos_embed: Literal["learned", "sincos"] = Field("learned", description="3D position embedding")
    slice_bias: bool = Field(True, description="learnable slice-distance bias in the self-attention")
    region_attention: bool = Field(True, description="region-aware cross-attention in every block (false: region-blind)")
    weighting: Literal["log", "multiply", "none"] = Field(
        "log", description="how a patch's region overlap weights its region attention (multiply: the seed's)")
    attn_impl: Literal["auto", "flex", "fold", "chunked", "naive"] = Field(
        "auto", description="slice-attention implementation (auto picks per device)")
    fpn_levels: int = Field(3, ge=1, description="blocks tapped for the feature pyramid (1, 1/2, 1/4 ... of the grid)")
    fpn_dim: int | None = Field(None, ge=1, description="feature pyramid width C_f (default: dim)")
    mask_hidden: int = Field(32, ge=1, description="channels of the anatomical mask CNN")
    mask_sub: tuple[int, int, int] = Field((1, 4, 4), description="cells per patch (D, H, W) of the mask CNN")
    drop: float = Field(0.0, ge=0, lt=1, description="dropout in the attention projections and the FFN")
    grad_checkpoint: bool = Field(False, description="recompute blocks in the backward pass (saves memory)")
    embed_dim: int = Field(256, ge=1, description="width E of the shared image-text space")
    text_encoder: str = Field("minilm", description="registered text encoder: minilm (offline) or hf:<local folder>")
    text_pool: Literal["mean", "cls"] = Field("mean", description="text pooling: masked mean or the CLS token")
    text_trainable: bool = Field(False, description="fine-tune the text encoder (then nothing is cached)")
    text_max_length: int = Field(128, ge=1, description="tokens per text")
    init_temp: float = Field(0.07, gt=0, description="initial temperature of every level (clamped to [0.01, 1])")
    loss_weights: dict[str, float] | None = Field(
        None, description="weights of global, region, step, seg, gen, anchor (default 1, 1, 1, 0, 1, 0; gen counts "
                          "only with a gen_decoder); a stage's losses override them")
    aux_seg: bool = Field(False, description="auxiliary region segmentation head on the patch features")
    gen_decoder: str = Field(
        "none", description="report generator: none, scratch (small GPT-2 + word tokenizer, CPU) or hf:<local folder>")
    gen_target: Literal["report", "findings", "impression", "cot"] = Field(
        "report", description="what the generator writes: findings + impression, one of them, or the CoT steps")
    gen_inputs: Literal["patch", "patch+region"] = Field(
        "patch", description="visual tokens of the generator: the encoder's patch tokens (+ its region tokens)")
    gen_detach: bool = Field(
        False, description="stop the generation loss at the encoder (a second stage on a frozen encoder, trained "
                           "alongside; gradient norms are then clipped per part)")
    gen_queries: int = Field(16, ge=1, description="visual prefix tokens (learned queries of the attentional pooler)")
    gen_width: int = Field(128, ge=8, description="scratch decoder width")
    gen_depth: int = Field(2, ge=1, description="scratch decoder blocks")
    gen_heads: int = Field(4, ge=1, description="scratch decoder heads (and the pooler's)")
    gen_dropout: float = Field(0.1, ge=0, lt=1, description="scratch decoder dropout")
    gen_vocab_size: int = Field(1024, ge=8, description="scratch word vocabulary rows (fitted on the training reports)")
    gen_max_length: int = Field(160, ge=4, description="tokens per generated text (targets are cut there)")
    gen_beams: int = Field(1, ge=1, description="decoding in evaluate/predict: 1 greedy, >1 beam search")
    gen_lr: float | None = Field(None, gt=0, description="the generator's learning rate (default: train.lr; same schedule)")
    gen_lm_trainable: bool = Field(True, description="fine-tune the language model (false: train only the pooler)")
    retrieval_ks: tuple[int, ...] = Field(
        (1, 5, 10, 50, 100), description="Recall@k cut-offs of evaluate (those above the split size are left out)")

    @field_validator("loss_weights")
    @classmethod
    def _known_losses(cls, v: dict[str, float] | None) -> dict[str, float] | None:
        unknown = sorted(set(v or {}) - set(LEVELS))
        if unknown:
            raise ValueError(f"unknown loss '{unknown[0]}', use some of: {', '.join(LEVELS)}")
        return v

    @field_validator("gen_decoder")
    @classmethod
    def _known_decoder(cls, v: str) -> str:
        if v not in ("none", "scratch") and not (v.startswith("hf:") and len(v) > 3):
            raise ValueError(f"unknown decoder '{v}', use none, scratch or hf:<local folder>")
        return v


class CTEncoderDataParams(Params):
    """The CT-RATE-style folder (or OmniAbnorm-CT records): file names relative to ``data.root``, region
    names, HU conversion."""

    source: Literal["ctrate", "omniabnorm"] = Field(
        "ctrate", description="ctrate: volumes + reports CSV + region masks; omniabnorm: OmniAbnorm-CT records (a "
                              "centre slice and its context slices as a thin slab, finding k's mask = region k)")
    records: str | None = Field(None, description="omniabnorm: the records JSON (None: the JSON of records in the root)")
    max_findings: int = Field(8, ge=1, description="omniabnorm: finding groups per sample kept as regions 1..R "
                              "(= model.params.num_regions)")

    reports: str = Field("reports.csv", description="reports CSV (VolumeName, Findings_EN, Impressions_EN)")
    masks: str = Field("masks", description="folder of region-ID masks, one per volume of the same name")
    regions: str | None = Field("regions.json", description="JSON with region_names and region_groups")
    metadata: str | None = Field("metadata.csv", description="CSV with RescaleSlope/RescaleIntercept per volume")
    labels: str | None = Field("labels.csv", description="CSV with one 0/1 column per abnormality (zero-shot AUROC)")
    cot: str | list[str] | None = Field(
        "cot.json", description="chain-of-thought records: the seed's JSON, or CT-RATE-style thinking JSON lines "
                                "(one name or a list, e.g. [vqa.jsonl, report.jsonl]; merged per volume)")
    region_names: dict[int, str] | list[str] | None = Field(
        None, description="region id -> name (or names in id order); default: from the regions JSON")
    region_groups: dict[str, list[int]] | None = Field(
        None, description="group name -> region ids (e.g. right lung -> its lobes); default: from the regions JSON")
    hu: Literal["none", "metadata", "fixed"] = Field(
        "none", description="HU conversion, applied once: none (files in HU, CT-RATE v2), metadata (CSV), fixed")
    hu_slope: float = Field(1.0, description="slope of hu: fixed")
    hu_intercept: float = Field(0.0, description="intercept of hu: fixed")
    hu_check: bool = Field(
        True, description="refuse a CT whose air (1st percentile, fill left out) contradicts hu: above -524 under "
                          "none (stored values, v1), below -1624 after conversion (rescaled twice); false only for "
                          "data without air (e.g. cropped to the body)")
    reconstructions: Literal["first", "all"] = Field(
        "first", description="keep the first reconstruction per CT-RATE scan, or all")
    lesions: str | None = Field(
        "lesions", description="folder of lesion masks (one per volume; CoT steps name their lesion label with "
                               "'lesion'), for localization IoU")
    labeler: str = Field(
        "keyword", description="findings labeler of clinical efficacy: keyword (built-in rules), keyword:<rules JSON> "
                               "or <module>:<function> (texts, names) -> (N, K) 0/1")


def build_ct_encoder(p: CTEncoderParams):
    """The ct_encoder model from validated params (the loss weights are the task's)."""
    from medfuse.families.ct_encoder.model import CTEncoderModel

    return CTEncoderModel(**p.model_dump(exclude={"loss_weights", "retrieval_ks", "gen_target", "gen_inputs",
                                                 "gen_detach", "gen_beams", "gen_lr"}))
