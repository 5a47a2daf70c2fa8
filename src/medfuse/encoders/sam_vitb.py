"""MedSAM / SAM ViT-B image encoder (REFERENCE.md "MedSAM (bowang-lab/MedSAM) and SAM ViT-B").

The image encoder of SAM ViT-B (and MedSAM, its medical fine-tune) through timm's
``samvit_base_patch16``: (N, 3, 1024, 1024) -> (N, 256, 64, 64), the "image embeddings" that SAM's
prompt encoder and mask decoder consume. ``medsam_vit_b.pth`` is a plain SAM state dict
(``image_encoder.*``, ``prompt_encoder.*``, ``mask_decoder.*``); the image-encoder keys are mapped
with timm's own SAM filter (``mlp.lin1/2 -> mlp.fc1/2``) and loaded strictly, and the prompt
encoder / mask decoder keys are ignored and counted in the load report.

Preprocessing is MedSAM's: clip (CT window, default 40/400; MR 0.5-99.5 percentiles of the nonzero
voxels), min-max to uint8, bicubic resize to 1024, then min-max *per image* to [0, 1] with no
mean/std normalisation.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from medfuse.encoders.base import SliceEncoder
from medfuse.encoders.medsam2 import (
    EncoderLoadReport,
    intensity_to_uint8,
    load_encoder_checkpoint,
    resize_uint8,
)
from medfuse.registry import ENCODERS

__all__ = ["MedSAMEncoder"]

SAM_PREFIX = "image_encoder."


def _rename_sam_key(key: str) -> str | None:
    """SAM/MedSAM checkpoint key -> :class:`MedSAMEncoder` key (``None``: not the image encoder)."""
    if key.startswith(SAM_PREFIX):
        from timm.models.vision_transformer_sam import checkpoint_filter_fn

        # timm's SAM -> VisionTransformerSAM mapping (strips the prefix, mlp.lin -> mlp.fc).
        (new,) = checkpoint_filter_fn({key: None}, None)
        return "vit." + new
    if key.startswith("vit."):  # our own state dict
        return key
    return None


@ENCODERS.register("medsam")
class MedSAMEncoder(SliceEncoder):
    """SAM ViT-B image encoder (MedSAM weights): (N, 3, S, S) -> (N, 256, S/16, S/16).

    Args:
        weights: local ``medsam_vit_b.pth`` / ``sam_vit_b_01ec64.pth`` (or this encoder's own state
            dict), or ``None`` for random initialisation.
        input_size: native input size S. SAM's relative position tables of the global-attention
            blocks depend on it, so a 1024 checkpoint only loads at 1024.
        strict: fail when an image-encoder key is missing, unexpected or mismatched.
        **timm_kwargs: extra ``samvit_base_patch16`` arguments (e.g. ``depth=2`` for tests).
    """

    name = "medsam"
    out_channels = 256
    stride = 16
    mean = (0.0, 0.0, 0.0)  # MedSAM feeds [0, 1] images straight into the encoder
    std = (1.0, 1.0, 1.0)

    def __init__(
        self,
        weights: str | Path | None = None,
        input_size: int = 1024,
        strict: bool = True,
        **timm_kwargs: Any,
    ):
        super().__init__()
        import timm

        self.input_size = int(input_size)
        self.vit = timm.create_model(
            "samvit_base_patch16", pretrained=False, num_classes=0, img_size=self.input_size, **timm_kwargs
        )
        self.load_report: EncoderLoadReport | None = None
        if weights is not None:
            self.load_checkpoint(weights, strict=strict)

    def load_checkpoint(self, path: str | Path, strict: bool = True) -> EncoderLoadReport:
        """Load a SAM/MedSAM checkpoint's image encoder from a local file.

        Args:
            path: the checkpoint (plain state dict, or wrapped under ``"model"``/``"state_dict"``).
            strict: fail when an image-encoder key is missing, unexpected or mismatched.

        Returns:
            The load report (prompt encoder / mask decoder keys are listed in ``ignored``).
        """
        self.load_report = load_encoder_checkpoint(
            self, path, _rename_sam_key, strict=strict, expected=f"{SAM_PREFIX}*"
        )
        return self.load_report

    def sam_state_dict(self) -> dict[str, torch.Tensor]:
        """This encoder's weights in SAM's checkpoint layout (``image_encoder.*``)."""
        return {
            SAM_PREFIX + k[len("vit.") :].replace("mlp.fc", "mlp.lin"): v for k, v in self.state_dict().items()
        }

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Encode preprocessed slices.

        Args:
            x: (N, 3, H, W), normally S x S.

        Returns:
            (N, 256, H / 16, W / 16): SAM's image embeddings.
        """
        return self.vit.forward_features(x)

    @staticmethod
    def _to_input(u: torch.Tensor, size: int) -> torch.Tensor:
        v = resize_uint8(u, size)  # (N, 1, S, S) grey levels
        lo = v.amin(dim=(1, 2, 3), keepdim=True)
        hi = v.amax(dim=(1, 2, 3), keepdim=True)
        v = (v - lo) / (hi - lo).clamp(min=1e-8)  # per image to [0, 1], as MedSAM does
        return v.expand(-1, 3, -1, -1).contiguous()  # (N, 3, S, S)

    @torch.no_grad()
    def preprocess_volume(
        self, volume: torch.Tensor, modality: str = "mr", window: tuple[float, float] | None = None
    ) -> torch.Tensor:
        """MedSAM preprocessing of one volume (clip statistics over the whole volume).

        Args:
            volume: (D, H, W) raw intensities of one modality.
            modality: ``"mr"`` or ``"ct"``.
            window: ``(level, width)``; CT defaults to (40, 400).

        Returns:
            (D, 3, S, S) float32 in [0, 1].
        """
        return self._to_input(intensity_to_uint8(volume, modality, window, per_volume=True), self.input_size)

    @torch.no_grad()
    def preprocess(
        self, slices: torch.Tensor, modality: str = "mr", window: tuple[float, float] | None = None
    ) -> torch.Tensor:
        """MedSAM preprocessing with per-slice clip statistics (see :meth:`preprocess_volume`).

        Args:
            slices: (N, H, W) raw intensities.
            modality: ``"mr"`` or ``"ct"``.
            window: ``(level, width)``; CT defaults to (40, 400).

        Returns:
            (N, 3, S, S) float32 in [0, 1].
        """
        return self._to_input(intensity_to_uint8(slices, modality, window, per_volume=False), self.input_size)

