"""``model.params`` of the staging family (seed 000); ``medfuse models staging`` prints them."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from medfuse.config import Params


class StagingParams(Params):
    """MedSAM2-Mamba T-staging: slice encoder -> MemoryBlock -> BGAMF -> Bi-Mamba -> head."""

    modalities: list[str] | None = Field(None, description="input modalities, T2W first then DWI (default: from the data)")
    num_classes: int = Field(4, description="K stages (4 for T1-T4; 2 for a binary head; from the data when known)")
    encoder: str = Field("tiny", description="registered slice encoder: tiny, medsam2, medsam, dinov3")
    encoder_params: dict[str, Any] | None = Field(None, description="keyword arguments of the encoder (e.g. weights)")
    freeze_encoder: bool = Field(False, description="freeze the encoder (its features are then cached on disk)")
    encoder_preprocess: bool = Field(False, description="the encoder's own preprocessing on raw intensities (MedSAM2 recipe)")
    slice_batch_size: int = Field(8, ge=1, description="slices per encoder call")
    token_pool: int | None = Field(None, description="pool each slice's feature map to N x N tokens")
    dim: int = Field(64, ge=1, description="sequence width C")
    memory_block: bool = Field(True, description="use the MemoryBlock")
    memory_mode: Literal["auto", "full", "factorized"] = Field("auto", description="MemoryBlock attention")
    num_prototypes: int = Field(16, ge=1, description="learnable prototypes of the memory")
    fusion: Literal["bgamf", "concat", "sum", "t2w_only", "dwi_only"] = Field(
        "bgamf", description="modality fusion (sum: the average of the two projected streams, no gate)")
    mamba: Literal["bi", "uni"] = Field("bi", description="Bi-Mamba or one direction")
    align_mode: Literal["auto", "full", "slice"] = Field("auto", description="BGAMF cross-attention scope")
    num_heads: int = Field(4, ge=1, description="attention heads")
    d_state: int = Field(16, ge=1, description="Mamba state size")
    dropout: float = Field(0.1, ge=0, lt=1, description="dropout before the head")
    pool: Literal["avg", "max", "avgmax"] = Field("avg", description="sequence pooling before the head (seed: avg)")
    bgamf_align: bool = Field(True, description="BGAMF's alignment cross-attention (False: component ablation)")
    bgamf_mamba: bool = Field(True, description="BGAMF's per-modality Bi-Mamba (False: component ablation)")
    bgamf_init_scale: float = Field(0.1, description="initial scale of BGAMF's residual branch outputs (near identity)")
    bgamf_gate_temperature: float = Field(1.0, gt=0, description="temperature of BGAMF's gate sigmoid "
                                                                 "(1: the seed's gate; < 1 lets the gate leave 0.5 sooner)")
    feature_cache: str | None = Field(None, description="disk cache of frozen-encoder features (default: <data.cache_dir>/features)")


def build_staging(p: StagingParams):
    """The staging model from validated params."""
    from medfuse.families.staging.model import StagingModel

    return StagingModel(**p.model_dump())
