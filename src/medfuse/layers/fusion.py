"""Fusion blocks shared by the families.

* :class:`GatedFusion` and :class:`BGAMF`: seed 000, "Innovative Multi-Modal Fusion (BGAMF)":
  cross-attention alignment in both directions, a Bi-Mamba per modality, and a per-position,
  per-channel gate ``f = g * h_t2w + (1 - g) * h_dwi`` with ``g = sigmoid(Linear([h_t2w; h_dwi]))``.
* :class:`ContextAttentionFusion`: seed 004, context-gated skips ``raw + raw * att(context)``.
* :class:`TextCrossAttentionLevel`, :class:`HierarchicalTextFusion` and the single-level
  :class:`GatedTextFusion` baseline: seed 002 (Talk2MedSAM), text -> image fusion before the mask
  decoder, gates with exact effective initial values (0.5 coarse, 0.8 fine).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from einops import rearrange
from torch import nn

from medfuse.layers.attention import CrossAttention


class GatedFusion(nn.Module):
    """``f = g * a + (1 - g) * b`` with ``g = sigmoid(Linear([a; b]))`` per position and channel.

    Args:
        dim: channels C of both inputs.
    """

    def __init__(self, dim: int):
        super().__init__()
        self.gate = nn.Linear(2 * dim, dim)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """a, b: (B, L, C) -> (fused (B, L, C), gate (B, L, C) in (0, 1))."""
        g = torch.sigmoid(self.gate(torch.cat([a, b], dim=-1)))
        return g * a + (1 - g) * b, g


class AlignCrossAttention(nn.Module):
    """Pre-norm residual cross-attention of ``x`` to ``context`` (BGAMF step 1).

    ``mode="full"`` attends over all L context tokens; ``mode="slice"`` restricts each token to
    the context tokens of its own slice (the modalities share one grid), which keeps the cost
    linear in the number of slices; ``auto`` picks ``slice`` above ``full_max_tokens``.
    """

    def __init__(self, dim: int, num_heads: int = 4, mode: str = "auto", full_max_tokens: int = 4096):
        super().__init__()
        if mode not in ("auto", "full", "slice"):
            raise ValueError(f"mode must be auto|full|slice, got {mode!r}")
        self.mode, self.full_max_tokens = mode, full_max_tokens
        self.norm_q = nn.LayerNorm(dim)
        self.norm_kv = nn.LayerNorm(dim)
        self.attn = CrossAttention(dim, num_heads=num_heads)

    def forward(self, x: torch.Tensor, context: torch.Tensor, grid: Sequence[int]) -> torch.Tensor:
        """x, context: (B, L, C), L = D*h*w slice-major -> (B, L, C)."""
        d, h, w = grid
        mode = self.mode
        if mode == "auto":
            mode = "full" if x.shape[1] <= self.full_max_tokens else "slice"
        q, kv = self.norm_q(x), self.norm_kv(context)
        if mode == "full":
            return x + self.attn(q, kv)
        q = rearrange(q, "b (d n) c -> (b d) n c", d=d)  # (B*D, h*w, C)
        kv = rearrange(kv, "b (d n) c -> (b d) n c", d=d)
        out = rearrange(self.attn(q, kv), "(b d) n c -> b (d n) c", d=d)
        return x + out


class BGAMF(nn.Module):
    """Bidirectional Gated & Alignment-aware Mamba Fusion of two token sequences.

    Args:
        dim: channels C.
        num_heads: heads of the alignment cross-attention.
        bidirectional: Bi-Mamba (True) or a forward-only Mamba (the ``mamba: uni`` ablation).
        align_mode: ``auto`` | ``full`` | ``slice`` (see :class:`AlignCrossAttention`).
        d_state: Mamba state size.
        align: use the alignment cross-attention (False: the component ablation).
        branch_mamba: use the per-modality Bi-Mamba (False: the component ablation).
        init_scale: factor on the initial output projections of the alignment and Mamba branches.
    """

    def __init__(self, dim: int, num_heads: int = 4, bidirectional: bool = True, align_mode: str = "auto",
                 d_state: int = 16, align: bool = True, branch_mamba: bool = True, init_scale: float = 0.1):
        super().__init__()
        from medfuse.ssm import BiMamba

        self.align_a = AlignCrossAttention(dim, num_heads, align_mode) if align else None
        self.align_b = AlignCrossAttention(dim, num_heads, align_mode) if align else None
        self.norm_a, self.norm_b = (nn.LayerNorm(dim), nn.LayerNorm(dim)) if branch_mamba else (None, None)
        self.mamba_a = BiMamba(dim, d_state=d_state, bidirectional=bidirectional) if branch_mamba else None
        self.mamba_b = BiMamba(dim, d_state=d_state, bidirectional=bidirectional) if branch_mamba else None
        self.fuse = GatedFusion(dim)
        # Near-identity start of the residual branches (alignment, per-modality Mamba): at init the
        # block is close to the gated blend of its inputs, which trains like concatenation, and the
        # branches grow from there. At full scale, the untrained cross-attention adds a near-uniform
        # average of the other modality to every token, which buried the local DWI cue in the demo.
        with torch.no_grad():
            outs = [m.attn.proj for m in (self.align_a, self.align_b) if m is not None]
            outs += [m.out_proj for m in (self.mamba_a, self.mamba_b) if m is not None]
            for lin in outs:
                lin.weight.mul_(init_scale)
                if lin.bias is not None:
                    lin.bias.mul_(init_scale)

    def forward(self, a: torch.Tensor, b: torch.Tensor, grid: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """a (T2W), b (DWI): (B, L, C) -> (fused (B, L, C), gate (B, L, C); gate 1 = trust ``a``)."""
        if self.align_a is not None:
            a, b = self.align_a(a, b, grid), self.align_b(b, a, grid)  # T2W queries DWI and vice versa
        if self.mamba_a is not None:
            a = a + self.mamba_a(self.norm_a(a))
            b = b + self.mamba_b(self.norm_b(b))
        return self.fuse(a, b)


class ContextAttentionFusion(nn.Module):
    """Context gates raw features at a skip (seed 004): ``fused = raw + raw * att``.

    ``att = sigmoid(conv1x1(C -> C/r) -> norm -> ReLU -> conv1x1(C/r -> C))(context)``. The raw
    and context streams stay separate tensors up to here; the context only rescales raw channels,
    so the output keeps C channels (no concatenation, no doubled width downstream).

    Args:
        channels: C of both raw and context features.
        reduction: bottleneck ratio r (seed: 4).
        spatial_dims: 2 or 3.
        norm: ``"instance"``, ``"batch"`` or ``"group"``.
    """

    def __init__(self, channels: int, reduction: int = 4, spatial_dims: int = 3, norm: str = "instance"):
        super().__init__()
        conv = nn.Conv3d if spatial_dims == 3 else nn.Conv2d
        hidden = max(1, channels // reduction)
        if norm == "batch":
            nrm: nn.Module = (nn.BatchNorm3d if spatial_dims == 3 else nn.BatchNorm2d)(hidden)
        elif norm == "group":
            nrm = nn.GroupNorm(min(8, hidden), hidden)
        else:
            nrm = (nn.InstanceNorm3d if spatial_dims == 3 else nn.InstanceNorm2d)(hidden, affine=True)
        self.att = nn.Sequential(conv(channels, hidden, 1), nrm, nn.ReLU(inplace=True), conv(hidden, channels, 1))

    def attention(self, context: torch.Tensor) -> torch.Tensor:
        """context (B, C, *S) -> att (B, C, *S) in (0, 1)."""
        return torch.sigmoid(self.att(context))

    def forward(self, raw: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """raw, context: (B, C, D, H, W) (or (B, C, H, W)) on one grid -> fused (B, C, D, H, W)."""
        if raw.shape != context.shape:
            raise ValueError(f"raw {tuple(raw.shape)} and context {tuple(context.shape)} must share a grid")
        return raw + raw * self.attention(context)


# ----------------------------------------------------------------------------------------------
# Text -> image fusion (seed 002, Talk2MedSAM "Hierarchical Fusion Block")


def gate_logit(value: float) -> float:
    """The logit whose sigmoid is ``value``: a gate initialised with it starts at exactly ``value``."""
    import math

    if not 0.0 < value < 1.0:
        raise ValueError(f"a gate must start strictly between 0 and 1, got {value}")
    return math.log(value / (1.0 - value))


class TextCrossAttentionLevel(nn.Module):
    """One level of text fusion: text -> K tokens, image tokens cross-attend to them, gated residual.

    ``x_out = x + g * CrossAttn(q = LN(x) + pos, kv = [text tokens; null])`` with the effective
    gate ``g = sigmoid(gate_logit)`` in (0, 1), one scalar per level, initialised so that ``g``
    starts at exactly ``init_gate`` (the peer stored 0.5 / 0.8 as the *logit*, so its effective
    gates started at 0.62 / 0.69). ``g`` scales how much of the text message is added to the
    (frozen) image embedding; it never scales the image itself.

    A learned null key/value is appended to the text tokens. Without it, a single text token gets
    softmax weight 1 at every pixel and the level degenerates into a text-dependent bias that is
    the same everywhere (the peer's level 1); with it, each pixel decides how much text to take.

    The output projection starts small (std ``init_scale``), so at initialisation the level is
    almost the identity and the frozen mask decoder sees almost its own embedding, while every
    parameter still receives a gradient.

    Args:
        dim: image token width C.
        text_dim: pooled text width Ct (``encoder.dim``).
        num_tokens: K text tokens made from the pooled text (seed: 1 coarse, 2 fine).
        num_heads: attention heads (seed: 4 coarse, 8 fine).
        token_dim: width of each text token (keys/values are projected from it).
        init_gate: effective gate at initialisation, in (0, 1).
        init_scale: std of the output projection's initial weights.
    """

    def __init__(self, dim: int, text_dim: int, num_tokens: int = 1, num_heads: int = 4, token_dim: int = 96,
                 init_gate: float = 0.5, init_scale: float = 1e-3):
        super().__init__()
        self.num_tokens, self.token_dim = num_tokens, token_dim
        self.to_tokens = nn.Linear(text_dim, num_tokens * token_dim)
        self.null = nn.Parameter(torch.zeros(1, 1, token_dim))
        self.norm = nn.LayerNorm(dim)
        self.attn = CrossAttention(dim, num_heads=num_heads, kv_dim=token_dim)
        nn.init.normal_(self.attn.proj.weight, std=init_scale)
        nn.init.zeros_(self.attn.proj.bias)
        self.gate_logit = nn.Parameter(torch.tensor(gate_logit(init_gate)))
        self.last_attention: torch.Tensor | None = None

    @property
    def gate(self) -> torch.Tensor:
        """The effective gate g in (0, 1) (a 0-d tensor)."""
        return torch.sigmoid(self.gate_logit)

    def tokens(self, text: torch.Tensor) -> torch.Tensor:
        """text (B, Ct) -> (B, K, token_dim)."""
        return rearrange(self.to_tokens(text), "b (k d) -> b k d", k=self.num_tokens)

    def forward(self, x: torch.Tensor, text: torch.Tensor, pos: torch.Tensor | None = None) -> torch.Tensor:
        """Fuse text into image tokens.

        Args:
            x: image tokens (B, L, C).
            text: pooled text (B, Ct).
            pos: position embedding of the image tokens, (B|1, L, C), added to the queries only.

        Returns:
            (B, L, C).
        """
        kv = torch.cat([self.tokens(text), self.null.expand(x.shape[0], -1, -1)], dim=1)  # (B, K+1, d)
        q = self.norm(x)
        if pos is not None:
            q = q + pos
        return x + self.gate * self.attn(q, kv)


class HierarchicalTextFusion(nn.Module):
    """Talk2MedSAM's hierarchical fusion: a coarse level then a fine level, applied in sequence.

    Level 1 (coarse, global diagnosis): 1 text token, ``coarse_heads`` heads, gate 0.5.
    Level 2 (fine, local morphology): 2 text tokens, ``fine_heads`` heads, gate 0.8.
    See :class:`TextCrossAttentionLevel` for the gate semantics. With ``text_mode="null"`` the text
    is replaced by a learned constant vector: the same network and parameter count, but blind to
    the text (the "no text" ablation).

    Args:
        dim: image token width C (256 for MedSAM).
        text_dim: pooled text width Ct.
        token_dim: width of every text token.
        coarse_tokens, coarse_heads, coarse_gate: level 1.
        fine_tokens, fine_heads, fine_gate: level 2.
        text_mode: ``"text"`` or ``"null"``.
    """

    def __init__(self, dim: int, text_dim: int, token_dim: int = 96, coarse_tokens: int = 1, coarse_heads: int = 4,
                 coarse_gate: float = 0.5, fine_tokens: int = 2, fine_heads: int = 8, fine_gate: float = 0.8,
                 text_mode: str = "text"):
        super().__init__()
        if text_mode not in ("text", "null"):
            raise ValueError(f"text_mode must be 'text' or 'null', got {text_mode!r}")
        self.text_mode = text_mode
        self.text_norm = nn.LayerNorm(text_dim)
        # random, not zero: a constant vector would be zero after the LayerNorm and the token
        # projections would never see an input
        self.null_text = nn.Parameter(torch.randn(text_dim)) if text_mode == "null" else None
        self.levels = nn.ModuleList([
            TextCrossAttentionLevel(dim, text_dim, coarse_tokens, coarse_heads, token_dim, coarse_gate),
            TextCrossAttentionLevel(dim, text_dim, fine_tokens, fine_heads, token_dim, fine_gate),
        ])
        self.embed_dim = token_dim

    @property
    def gates(self) -> list[float]:
        """Effective gates of the levels (coarse, fine)."""
        return [float(level.gate.detach()) for level in self.levels]

    def text_embedding(self, text: torch.Tensor) -> torch.Tensor:
        """text (B, Ct) -> the coarse text token (B, token_dim), the text side of the contrastive loss."""
        return self.levels[0].tokens(self.text_norm(text))[:, 0]

    def forward(self, x: torch.Tensor, text: torch.Tensor, pos: torch.Tensor | None = None) -> torch.Tensor:
        """x: image tokens (B, L, C); text: pooled (B, Ct); pos: (B|1, L, C) or None -> (B, L, C)."""
        if self.null_text is not None:
            text = self.null_text.expand(x.shape[0], -1)
        t = self.text_norm(text)
        for level in self.levels:
            x = level(x, t, pos)
        return x


class GatedTextFusion(nn.Module):
    """Single-level gated fusion baseline: ``f = g * x + (1 - g) * t`` per position and channel.

    ``t`` is the pooled text projected to C and broadcast over the image tokens, and
    ``g = sigmoid(Linear([x; t]))`` is :class:`GatedFusion`'s gate (1 = keep the image). Its weight
    starts at zero and its bias at ``gate_logit(init_gate)``, so every gate starts at exactly
    ``init_gate``.

    Args:
        dim: image token width C.
        text_dim: pooled text width Ct.
        init_gate: the image's share at initialisation, in (0, 1).
    """

    def __init__(self, dim: int, text_dim: int, init_gate: float = 0.8):
        super().__init__()
        self.text_norm = nn.LayerNorm(text_dim)
        self.to_token = nn.Linear(text_dim, dim)
        self.fuse = GatedFusion(dim)
        nn.init.zeros_(self.fuse.gate.weight)
        nn.init.constant_(self.fuse.gate.bias, gate_logit(init_gate))
        self.embed_dim = dim
        self.last_gate: torch.Tensor | None = None

    def text_embedding(self, text: torch.Tensor) -> torch.Tensor:
        """text (B, Ct) -> (B, C), the text side of the contrastive loss."""
        return self.to_token(self.text_norm(text))

    def forward(self, x: torch.Tensor, text: torch.Tensor, pos: torch.Tensor | None = None) -> torch.Tensor:
        """x: image tokens (B, L, C); text: pooled (B, Ct); pos is ignored -> (B, L, C)."""
        t = self.text_embedding(text)[:, None].expand_as(x)  # (B, L, C)
        fused, g = self.fuse(x, t)
        self.last_gate = g.detach()
        return fused
