"""The incomplete_seg network (seed 003, "Understanding UniMRSeg"): a 3D UNet + ASPP that takes a
modality presence mask.

Network. A 3D UNet whose encoder levels are conv blocks (the first at full resolution, each next one
downsampling by 2) plus a 3D ASPP bottleneck (dilations 1/6/12/18 + image pooling) as the last
level; :meth:`IncompleteSegNet.encode` exposes every level's features. Missing modalities are
zero-filled (``fill="zero"``, UniMRSeg) or replaced by a learned per-modality value
(``fill="learned"``, in the spirit of M3AE's learned fill). Outputs are nested sigmoid regions
(``output="regions"``: region r's probability is the product of the sigmoids of regions 1..r, so
WT >= TC >= ET always holds; the peer's independent sigmoids can put ET outside TC) or a softmax
over the ``R + 1`` canonical labels (``output="labels"``). Stage 3's reverse attention adapters
wrap every level when :meth:`IncompleteSegNet.set_stage_kind` turns them on.

The three training stages, their losses and the validation criterion live in ``task.py``; the
evaluation over all ``2^M - 1`` modality combinations in ``evaluate.py``.

Shapes: B batch, M modalities, R regions, C channels, ``*S`` = (D, H, W).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from medfuse.errors import ConfigError
from medfuse.families.incomplete_seg.data import modality_combinations
from medfuse.layers.aspp import ASPP
from medfuse.layers.conv import ConvNormAct, DownBlock, UpBlock, conv_layer
from medfuse.layers.reverse_attention import ReverseAttentionAdapter


class IncompleteSegNet(nn.Module):
    """UniMRSeg's 3D UNet + ASPP with modality presence and stage-3 adapters.

    Args:
        modalities: modality names in channel order (auto from the data).
        in_channels: M (auto).
        num_classes: canonical labels R + 1 (auto from the data module; R regions).
        output: ``regions`` (nested sigmoids) or ``labels`` (softmax).
        widths: channels of the conv levels (peer: 64, 128, 256, 512).
        aspp_dilations: ASPP dilations (peer: 1, 6, 12, 18).
        norm: norm of every block (``instance``, ``batch``, ``group``).
        fill: ``zero`` or ``learned`` for missing modalities.
        adapters: build the stage-3 reverse attention adapters (used in an ``adapt`` stage and after).
        adapter_scale: initial layer scale of the adapters (None: the peer's gamma = 1).
        channels_last: keep 3D convolutions in ``channels_last_3d`` memory format (about 25 %
            faster on CPU; also what cuDNN prefers under mixed precision).
    """

    def __init__(self, modalities: list[str] | None = None, in_channels: int = 4, num_classes: int = 4,
                 output: str = "regions", widths: tuple[int, ...] = (64, 128, 256, 512),
                 aspp_dilations: tuple[int, ...] = (1, 6, 12, 18), norm: str = "instance", fill: str = "zero",
                 adapters: bool = True, adapter_scale: float | None = 0.1, channels_last: bool = True):
        super().__init__()
        if output not in ("regions", "labels"):
            raise ConfigError("model.params.output", f"unknown output '{output}'", "use regions or labels")
        if fill not in ("zero", "learned"):
            raise ConfigError("model.params.fill", f"unknown fill '{fill}'", "use zero or learned")
        if num_classes < 2:
            raise ConfigError("data.num_classes", f"need at least one region (num_classes >= 2), got {num_classes}",
                              "check data.params.regions")
        widths = tuple(int(w) for w in widths)
        if len(widths) < 2:
            raise ConfigError("model.params.widths", "need at least two levels", "e.g. widths=[16, 32, 64, 128]")
        m = in_channels
        self.modalities = list(modalities or [f"m{i}" for i in range(m)])
        if len(self.modalities) != m:
            raise ConfigError("data.modalities", f"{len(self.modalities)} names for {m} channels", "fix the list")
        self.m, self.num_regions, self.output, self.fill = m, num_classes - 1, output, fill
        self.channels_last = channels_last
        self.size_divisor = 2 ** (len(widths) - 1)  # one 2x downsampling per level after the first
        common = dict(spatial_dims=3, norm=norm)
        levels: list[nn.Module] = [nn.Sequential(ConvNormAct(m, widths[0], **common),
                                                 ConvNormAct(widths[0], widths[0], **common))]
        levels += [DownBlock(widths[i - 1], widths[i], **common) for i in range(1, len(widths))]
        levels.append(ASPP(widths[-1], widths[-1], aspp_dilations, **common))
        self.encoder = nn.ModuleList(levels)
        self.level_channels = [*widths, widths[-1]]
        self.adapters: nn.ModuleList | None = None
        if adapters:
            prev = [m, *widths[:-1], widths[-1]]
            strides = [1] + [2] * (len(widths) - 1) + [1]
            self.adapters = nn.ModuleList(
                ReverseAttentionAdapter(c, p, s, layer_scale=adapter_scale, **common)
                for c, p, s in zip(self.level_channels, prev, strides, strict=True))
        # decoder: from the ASPP output up through the skips of levels len(widths)-2 .. 0
        self.decoder = nn.ModuleList(UpBlock(widths[i + 1], widths[i], widths[i], **common)
                                     for i in reversed(range(len(widths) - 1)))
        conv = conv_layer(3)
        self.seg_head = conv(widths[0], self.num_regions if output == "regions" else num_classes, 1)
        self.recon_head = conv(widths[0], m, 1)
        self.fill_value = nn.Parameter(torch.zeros(m)) if fill == "learned" else None
        # Stage 3's round-robin position over the incomplete combinations (checkpointed, so a
        # resumed run continues the same schedule).
        self.register_buffer("combo_step", torch.zeros((), dtype=torch.long))
        self.use_adapters = False
        self.encoder_frozen = False
        if channels_last:
            self.to(memory_format=torch.channels_last_3d)

    # ------------------------------------------------------------------------------ network
    def fill_missing(self, image: torch.Tensor, present: torch.Tensor | None) -> torch.Tensor:
        """(B, M, *S) input with absent channels zero-filled or set to the learned fill value."""
        if present is None:
            return image
        p = present.to(image.dtype).view(*present.shape, 1, 1, 1)  # (B, M, 1, 1, 1)
        x = image * p
        if self.fill_value is not None:
            x = x + (1 - p) * self.fill_value.view(1, -1, 1, 1, 1)
        return x

    def encode(self, image: torch.Tensor, present: torch.Tensor | None = None) -> list[torch.Tensor]:
        """Per-level encoder features.

        Args:
            image: (B, M, D, H, W).
            present: (B, M) modality presence (None: all present).

        Returns:
            ``len(widths) + 1`` maps (B, C_l, *S_l): the conv levels (full resolution, then /2
            each) and the ASPP output (same grid as the deepest conv level); adapted when the
            adapters are active.
        """
        h = self.fill_missing(image, present)
        if self.channels_last:
            h = h.contiguous(memory_format=torch.channels_last_3d)
        feats = []
        for i, block in enumerate(self.encoder):
            fc = block(h)
            if self.use_adapters and self.adapters is not None:
                fc = self.adapters[i](fc, h)
            feats.append(fc)
            h = fc
        return feats

    def decode(self, feats: list[torch.Tensor]) -> torch.Tensor:
        """Level features -> full-resolution decoder features (B, widths[0], *S)."""
        x = feats[-1]
        skips = feats[: len(self.decoder)]
        for up, skip in zip(self.decoder, reversed(skips), strict=True):
            x = up(x, skip)
        return x

    def region_probs(self, logits: torch.Tensor) -> torch.Tensor:
        """Head logits -> nested region probabilities (B, R, *S), outer (e.g. WT) to inner (ET)."""
        if self.output == "regions":
            return torch.cumsum(F.logsigmoid(logits.float()), dim=1).exp()
        p = logits.float().softmax(1)  # (B, R+1, *S)
        return p.flip(1).cumsum(1).flip(1)[:, 1:]  # q_r = sum_{k >= r} p_k

    def label_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """Head logits -> canonical label log-probabilities (B, R+1, *S) (argmax/softmax ready)."""
        if self.output == "labels":
            return logits
        return self.labels_from_regions(self.region_probs(logits))

    @staticmethod
    def labels_from_regions(q: torch.Tensor) -> torch.Tensor:
        """Nested region probabilities (B, R, *S) -> canonical label log-probabilities (B, R+1, *S)."""
        ones = torch.ones_like(q[:, :1])
        q_ext = torch.cat([ones, q, torch.zeros_like(ones)], dim=1)  # (B, R+2, *S)
        p = (q_ext[:, :-1] - q_ext[:, 1:]).clamp_min(1e-8)  # P(label = k) = q_k - q_{k+1}
        return p.log()

    def seg_logits(self, image: torch.Tensor, present: torch.Tensor | None = None
                   ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(B, M, *S) -> (head logits (B, R or R+1, *S), level features)."""
        feats = self.encode(image, present)
        return self.seg_head(self.decode(feats)), feats

    def forward(self, image: torch.Tensor, present: torch.Tensor | None = None) -> torch.Tensor:
        """image (B, M, D, H, W), present (B, M) or None (all) -> label log-probs (B, R+1, D, H, W)."""
        return self.label_logits(self.seg_logits(image, present)[0])

    def predict_regions(self, image: torch.Tensor, present: torch.Tensor | None = None,
                        roi_size: tuple[int, int, int] | None = None, overlap: float = 0.25,
                        sw_batch_size: int = 4, mode: str = "gaussian") -> torch.Tensor:
        """Region probabilities (B, R, *S), by MONAI sliding-window inference when ``roi_size`` is set.

        The presence mask rides along as M constant input channels, so windows of different cases
        in one sliding-window batch each keep their own modality subset.
        """
        b = image.shape[0]
        present = torch.ones(b, self.m, device=image.device) if present is None else present.to(image.device)
        if roi_size is None:
            return self.region_probs(self.seg_logits(image, present)[0])
        from monai.inferers import sliding_window_inference

        flags = present.to(image.dtype).view(b, self.m, 1, 1, 1).expand_as(image)
        x = torch.cat([image, flags], dim=1)  # (B, 2M, *S)

        def predictor(win: torch.Tensor) -> torch.Tensor:
            pres = win[:, self.m:].amax(dim=(2, 3, 4))  # padding is 0; every window holds real voxels
            return self.region_probs(self.seg_logits(win[:, : self.m], pres)[0])

        return sliding_window_inference(x, tuple(roi_size), sw_batch_size, predictor, overlap=overlap,
                                        mode=mode)

    def reconstruct(self, image: torch.Tensor, present: torch.Tensor | None = None) -> torch.Tensor:
        """Stage 1's reconstruction head: (B, M, *S) masked input -> every modality (B, M, *S) in [0, 1]."""
        return torch.sigmoid(self.recon_head(self.decode(self.encode(image, present))))

    # ------------------------------------------------------------------------------ stages
    def set_stage_kind(self, kind: str) -> None:
        """Network side of a training stage: an ``adapt`` stage turns the adapters on and freezes the
        encoder (and the learned fill); any other stage runs without the adapters."""
        if kind == "adapt":
            if self.adapters is None:
                raise ConfigError("model.params.adapters", "an adapt stage (consistency/feature losses) needs "
                                  "the adapters", "set model.params.adapters=true")
            self.use_adapters = True
            self.encoder_frozen = True
            self.encoder.requires_grad_(False)
            if self.fill_value is not None:
                self.fill_value.requires_grad_(False)
        else:
            self.use_adapters = False

    def train(self, mode: bool = True):
        super().train(mode)
        if mode and self.encoder_frozen:
            self.encoder.eval()  # frozen means frozen: no batch-norm statistics updates either
        return self

    def adapt_combos(self, per_step: int | None) -> list[tuple[int, ...]]:
        """Stage 3's incomplete combinations for this step: ``(s * k + j) mod (2^M - 2)``, ``j < k``.

        ``k = per_step`` (None: all of them). In training mode the step counter advances.
        """
        combos = modality_combinations(self.m)[:-1]
        n = len(combos)
        k = n if not per_step else min(int(per_step), n)
        start = int(self.combo_step) * k
        if self.training:
            self.combo_step += 1
        return [combos[(start + j) % n] for j in range(k)]
