"""Text -> image fusion (seed 002, Talk2MedSAM "Hierarchical Fusion Block").

:class:`TextCrossAttentionLevel`, :class:`HierarchicalTextFusion` and the single-level
:class:`GatedTextFusion` baseline fuse text into the image embedding before the mask decoder; gates
start at exact effective values (0.5 coarse, 0.8 fine). :class:`BypassFusion` is no adapter at all
(MedSAM as it is).

All fusions share one interface (:data:`TextFusion`): ``forward(x, text, pos) -> fused``,
``forward_intermediates(x, text, pos) -> (fused, intermediates)``, ``text_embedding(text)`` and
``embed_dim``. Nothing is kept on the modules between calls: what evaluation shows (the gated
baseline's per-pixel gate) is returned by ``forward_intermediates``.
"""

from __future__ import annotations

import torch
from einops import rearrange
from torch import nn

from medfuse.layers.attention import CrossAttention
from medfuse.layers.fusion import GatedFusion


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

    def forward_intermediates(self, x: torch.Tensor, text: torch.Tensor,
                              pos: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """:meth:`forward` and no intermediates (the level gates are parameters: :attr:`gates`)."""
        return self(x, text, pos), {}


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

    def text_embedding(self, text: torch.Tensor) -> torch.Tensor:
        """text (B, Ct) -> (B, C), the text side of the contrastive loss."""
        return self.to_token(self.text_norm(text))

    def forward(self, x: torch.Tensor, text: torch.Tensor, pos: torch.Tensor | None = None) -> torch.Tensor:
        """x: image tokens (B, L, C); text: pooled (B, Ct); pos is ignored -> (B, L, C)."""
        return self.forward_intermediates(x, text, pos)[0]

    def forward_intermediates(self, x: torch.Tensor, text: torch.Tensor,
                              pos: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Fused tokens (B, L, C) and ``gate`` (B, L, C), the image's share per position and channel
        (detached)."""
        t = self.text_embedding(text)[:, None].expand_as(x)  # (B, L, C)
        fused, g = self.fuse(x, t)
        return fused, {"gate": g.detach()}


class BypassFusion(nn.Module):
    """No adapter: the image tokens reach the mask decoder unchanged and the text is ignored.

    With a frozen MedSAM this is MedSAM as it is, prompted by the box alone (the seed's baseline).
    It has no parameters; :meth:`text_embedding` is zero, so the InfoNCE term is a constant.

    Args:
        embed_dim: width of the (zero) text embedding, that of the contrastive space.
    """

    def __init__(self, embed_dim: int):
        super().__init__()
        self.embed_dim = embed_dim

    def text_embedding(self, text: torch.Tensor) -> torch.Tensor:
        """text (B, Ct) -> zeros (B, embed_dim)."""
        return text.new_zeros(text.shape[0], self.embed_dim)

    def forward(self, x: torch.Tensor, text: torch.Tensor, pos: torch.Tensor | None = None) -> torch.Tensor:
        """x: image tokens (B, L, C) -> the same tokens (B, L, C)."""
        return x

    def forward_intermediates(self, x: torch.Tensor, text: torch.Tensor,
                              pos: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The image tokens unchanged and no intermediates."""
        return x, {}


TextFusion = HierarchicalTextFusion | GatedTextFusion | BypassFusion
"""The text fusions a text_seg model may hold (``model.fusion``)."""
