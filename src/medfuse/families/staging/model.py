"""Family ``staging``: rectal cancer T-staging from paired T2W + DWI MRI (seed 000).

Pipeline (seed sections in brackets):

1. A 2D slice encoder (MedSAM2 in the paper, ``tiny`` for CPU demos) runs slice by slice in
   chunks of ``slice_batch_size`` [Base Feature Extraction, Slice Batching].
2. Each modality's (B, D, C, h, w) features become a (B, L = D*h*w, C) slice-major sequence with
   a 3D (z, y, x) sin-cos position [From Image to Sequence]; ``token_pool`` shrinks h, w first.
3. A :class:`~medfuse.layers.memory.MemoryBlock` per modality [Spatiotemporal Context Enhancement].
4. :class:`~medfuse.families.staging.bgamf.BGAMF`: alignment cross-attention both ways, a Bi-Mamba per
   modality, gated fusion [BGAMF].
5. A post-fusion Bi-Mamba, global average pooling and a linear head [Classification Prediction].

Ablations are config switches: ``fusion: bgamf | concat | sum | t2w_only | dwi_only``,
``memory_block: true | false``, ``mamba: bi | uni``, ``bgamf_align``, ``bgamf_mamba`` (``false`` for both:
the gate alone), ``bgamf_gate_temperature``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from medfuse.errors import ConfigError
from medfuse.families.staging.bgamf import BGAMF
from medfuse.layers.memory import MemoryBlock
from medfuse.layers.pos_embed import PosEmbed3d

FUSIONS = ("bgamf", "concat", "sum", "t2w_only", "dwi_only")
POOLS = ("avg", "max", "avgmax")


class StagingModel(nn.Module):
    """MedSAM2-Mamba staging model.

    Args:
        modalities: input modality names; the first is T2W, the second DWI.
        num_classes: K stages (4 for T1-T4; 2 for a binary head).
        encoder: registered slice encoder (``tiny``, ``medsam2``, ``medsam``, ``dinov3``).
        encoder_params: keyword arguments of the encoder factory (e.g. ``weights``).
        freeze_encoder: freeze the encoder (then its features may be cached on disk).
        encoder_preprocess: the encoder's own preprocessing on raw intensities (MedSAM2 recipe);
            False when the data transforms already normalised intensities to [0, 1].
        slice_batch_size: slices per encoder call.
        token_pool: pool each slice's feature map to ``token_pool`` x ``token_pool`` tokens.
        dim: sequence width.
        memory_block: use the MemoryBlock.
        memory_mode: MemoryBlock attention ``auto`` | ``full`` | ``factorized``.
        num_prototypes: K learnable prototypes of the memory.
        fusion: one of ``bgamf``, ``concat``, ``sum``, ``t2w_only``, ``dwi_only``. ``sum`` is the
            average of the two projected streams: BGAMF's blend with the gate fixed at 0.5 and
            no alignment or per-modality Mamba.
        mamba: ``bi`` or ``uni``.
        align_mode: BGAMF cross-attention ``auto`` | ``full`` | ``slice``.
        num_heads: attention heads.
        d_state: Mamba state size.
        dropout: dropout before the head.
        pool: sequence pooling before the head: ``avg`` (the seed's GAP), ``max``, or ``avgmax``
            (both, concatenated). A small tumour covers few tokens and its evidence is diluted by
            an average over all L; ``avgmax`` keeps it (the demo's setting).
        bgamf_align: BGAMF's alignment cross-attention on (False: component ablation).
        bgamf_mamba: BGAMF's per-modality Bi-Mamba on (False: component ablation).
        bgamf_init_scale: initial scale of the outputs of BGAMF's alignment and per-modality Mamba
            branches (near-identity start).
        bgamf_gate_temperature: temperature of BGAMF's gate sigmoid (1: the seed's gate).
        feature_cache: folder of the disk feature cache, used when the encoder is frozen: epochs
            after the first read each case's slice features instead of running the encoder (the
            engine fills it with ``<data.cache_dir>/features``). Ignored for a trainable encoder.
    """

    def __init__(self, modalities: list[str] | None = None, num_classes: int = 4, encoder: str = "tiny",
                 encoder_params: dict[str, Any] | None = None, freeze_encoder: bool = False,
                 encoder_preprocess: bool = False, slice_batch_size: int = 8, token_pool: int | None = None,
                 dim: int = 64, memory_block: bool = True, memory_mode: str = "auto", num_prototypes: int = 16,
                 fusion: str = "bgamf", mamba: str = "bi", align_mode: str = "auto", num_heads: int = 4,
                 d_state: int = 16, dropout: float = 0.1, pool: str = "avg",
                 bgamf_align: bool = True, bgamf_mamba: bool = True, bgamf_init_scale: float = 0.1,
                 bgamf_gate_temperature: float = 1.0, feature_cache: str | None = None):
        super().__init__()
        from medfuse.encoders.base import build_encoder
        from medfuse.encoders.slicewise import SlicewiseExtractor
        from medfuse.ssm import BiMamba

        if fusion not in FUSIONS:
            raise ConfigError("model.params.fusion", f"unknown fusion '{fusion}'", f"use one of: {', '.join(FUSIONS)}")
        if pool not in POOLS:
            raise ConfigError("model.params.pool", f"unknown pool '{pool}'", f"use one of: {', '.join(POOLS)}")
        self.pool = pool
        if mamba not in ("bi", "uni"):
            raise ConfigError("model.params.mamba", f"unknown mamba '{mamba}'", "use bi or uni")
        self.modalities = list(modalities or ["t2w", "dwi"])
        if len(self.modalities) != 2:
            raise ConfigError("data.modalities", f"staging needs exactly 2 modalities (T2W, DWI), got {self.modalities}",
                              "set data.modalities=[t2w, dwi]; use model.params.fusion=t2w_only for one")
        self.fusion, self.token_pool = fusion, token_pool
        enc = build_encoder(encoder, **(encoder_params or {}))
        if freeze_encoder:
            enc.freeze()
        cache = feature_cache if freeze_encoder else None
        self.extractor = SlicewiseExtractor(enc, slice_batch_size=slice_batch_size, preprocess=encoder_preprocess,
                                            cache_dir=cache, cache_dtype=torch.float16)
        self.encoder_preprocess = encoder_preprocess
        # One encoder serves both modalities, but each gets its own projection: the gated blend
        # g * h_t2w + (1 - g) * h_dwi must not mix two streams that share one feature space (a bright
        # DWI spot would read like a bright T2W spot).
        branches = {"t2w_only": [0], "dwi_only": [1]}.get(fusion, [0, 1])
        self.proj = nn.ModuleDict({str(m): nn.Linear(enc.out_channels, dim) for m in branches})
        self.pos = PosEmbed3d(dim, kind="sincos")
        self.modality_embed = nn.Parameter(torch.zeros(2, dim))
        self.branches = branches
        self.memory = nn.ModuleList(
            [MemoryBlock(dim, num_heads=num_heads, num_prototypes=num_prototypes, mode=memory_mode)
             if memory_block else nn.Identity() for _ in branches])
        bidirectional = mamba == "bi"
        if fusion == "bgamf":
            self.bgamf = BGAMF(dim, num_heads=num_heads, bidirectional=bidirectional, align_mode=align_mode,
                               d_state=d_state, align=bgamf_align, branch_mamba=bgamf_mamba,
                               init_scale=bgamf_init_scale, gate_temperature=bgamf_gate_temperature)
        elif fusion == "concat":
            self.concat = nn.Linear(2 * dim, dim)
        self.post_norm = nn.LayerNorm(dim)
        self.post = BiMamba(dim, d_state=d_state, bidirectional=bidirectional)
        feat = 2 * dim if pool == "avgmax" else dim
        self.head_norm = nn.LayerNorm(feat)
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(feat, num_classes))

    # ------------------------------------------------------------------------------------------
    def tokens(self, volume: torch.Tensor, branch: int) -> tuple[torch.Tensor, tuple[int, int, int]]:
        """One modality (B, 1, D, H, W) -> tokens (B, L, C) with L = D*h*w (slice-major), and (D, h, w)."""
        keys = [{}] * volume.shape[0] if self.extractor.cache_dir is not None else None  # keyed by content
        if self.encoder_preprocess:
            feats = self.extractor(volume, cache_keys=keys)  # (B, D, C_enc, h, w)
        else:
            enc = self.extractor.encoder
            mean = torch.tensor(enc.mean, device=volume.device).view(1, 3, 1, 1, 1)
            std = torch.tensor(enc.std, device=volume.device).view(1, 3, 1, 1, 1)
            x = (volume.expand(-1, 3, -1, -1, -1) - mean) / std  # (B, 3, D, H, W), encoder-ready
            feats = self.extractor(x, cache_keys=keys)
        b, d = feats.shape[:2]
        if self.token_pool:
            feats = F.adaptive_avg_pool2d(rearrange(feats, "b d c h w -> (b d) c h w"), self.token_pool)
            feats = rearrange(feats, "(b d) c h w -> b d c h w", b=b)
        h, w = feats.shape[-2:]
        x = rearrange(feats, "b d c h w -> b (d h w) c")  # (B, L, C_enc), slice-major
        x = self.proj[str(branch)](x)
        x = self.pos(x, (d, h, w)) + self.modality_embed[branch]
        return x, (d, h, w)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """image: (B, 2, D, H, W) with channels (T2W, DWI) -> logits (B, K)."""
        return self.forward_intermediates(image)[0]

    def forward_intermediates(self, image: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """One forward pass that also returns what evaluation shows.

        Args:
            image: (B, 2, D, H, W) with channels (T2W, DWI).

        Returns:
            logits (B, K) and intermediates, present only with ``fusion: bgamf``: ``gate``
            (B, D, h, w), BGAMF's gate averaged over channels (1 = trusted T2W, 0 = DWI), and
            ``gate_channel_sd`` (B, D, h, w), its standard deviation over the C channels (a gate
            that is 0.5 on average may still route channel by channel).
        """
        seqs, grid = [], None
        for i, m in enumerate(self.branches):
            x, grid = self.tokens(image[:, m: m + 1], m)
            x = self.memory[i](x, grid) if isinstance(self.memory[i], MemoryBlock) else x
            seqs.append(x)
        inter: dict[str, torch.Tensor] = {}
        if self.fusion == "bgamf":
            f, gate = self.bgamf(seqs[0], seqs[1], grid)  # gate (B, L, C)
            d, h, w = grid
            g = gate.detach()
            inter["gate"] = rearrange(g.mean(-1), "b (d h w) -> b d h w", d=d, h=h, w=w)
            inter["gate_channel_sd"] = rearrange(g.std(-1, correction=0), "b (d h w) -> b d h w", d=d, h=h, w=w)
        elif self.fusion == "concat":
            f = self.concat(torch.cat(seqs, dim=-1))
        elif self.fusion == "sum":
            f = 0.5 * (seqs[0] + seqs[1])  # the gated blend with g = 0.5 everywhere
        else:
            f = seqs[0]
        f = f + self.post(self.post_norm(f))  # (B, L, C)
        if self.pool == "avg":
            g = f.mean(dim=1)  # (B, C)
        elif self.pool == "max":
            g = f.amax(dim=1)
        else:
            g = torch.cat([f.mean(dim=1), f.amax(dim=1)], dim=-1)  # (B, 2C)
        return self.head(self.head_norm(g)), inter  # (B, K)
