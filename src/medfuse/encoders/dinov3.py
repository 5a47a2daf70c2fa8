"""DINOv3 ViT slice encoder from a local Hugging Face folder (REFERENCE.md "DINOv3").

The context-fusion design (davidackerman/dinov3_playground) encodes slices with DINOv3 ViT-L/16
and uses the patch tokens as a dense feature map. transformers' ``DINOv3ViTModel`` returns
``1 + R + h * w`` tokens per image (CLS, R register tokens, then the patches in row-major order);
this encoder drops the first ``1 + R`` and folds the patches back into (N, C, H / 16, W / 16).

Weights are gated on the hub, so the user points ``weights`` at a local folder (``config.json``
plus ``model.safetensors``); nothing is downloaded. Normalisation statistics come from the folder's
``preprocessor_config.json`` when it has them, else from ``stats``: ImageNet for the LVD-1689M
checkpoints, ``(0.430, 0.411, 0.296) / (0.213, 0.156, 0.143)`` for the SAT-493M ones.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path

import torch
from einops import rearrange

from medfuse.encoders.base import IMAGENET_MEAN, IMAGENET_STD, SliceEncoder
from medfuse.errors import ConfigError, WeightsError
from medfuse.registry import ENCODERS

__all__ = ["DINOV3_STATS", "DINOv3Encoder"]

log = logging.getLogger(__name__)

DINOV3_STATS: dict[str, tuple[tuple[float, float, float], tuple[float, float, float]]] = {
    "imagenet": (IMAGENET_MEAN, IMAGENET_STD),
    "lvd1689m": (IMAGENET_MEAN, IMAGENET_STD),
    "sat493m": ((0.430, 0.411, 0.296), (0.213, 0.156, 0.143)),
}


def _folder_stats(folder: Path) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
    """(mean, std) from ``preprocessor_config.json``, or ``None`` when the folder has none."""
    cfg_path = folder / "preprocessor_config.json"
    if not cfg_path.is_file():
        return None
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise WeightsError(cfg_path, f"cannot read the preprocessor config ({e})", "fix or remove the file") from None
    mean, std = cfg.get("image_mean"), cfg.get("image_std")
    if mean is None or std is None:
        return None
    if len(mean) != 3 or len(std) != 3:
        raise WeightsError(cfg_path, "image_mean/image_std must have 3 values each", "fix the file")
    return tuple(float(v) for v in mean), tuple(float(v) for v in std)


@ENCODERS.register("dinov3")
class DINOv3Encoder(SliceEncoder):
    """DINOv3 ViT patch features: (N, 3, H, W) -> (N, C, H / p, W / p), p the patch size (16).

    In training mode transformers applies DINOv3's RoPE coordinate augmentation (random rescale,
    per the config's ``pos_embed_*``); a frozen encoder stays in eval mode and is deterministic.
    The masked-image-modelling ``mask_token`` is never used here and is kept frozen.

    Args:
        weights: local folder with a transformers ``DINOv3ViTModel`` (``config.json`` + weights).
        input_size: square size slices are resized to by :meth:`preprocess` (``None`` keeps the
            slice size; the output then has ``H // p`` rows, dropping a remainder).
        stats: normalisation statistics used when the folder has no ``preprocessor_config.json``:
            ``"imagenet"`` / ``"lvd1689m"`` or ``"sat493m"``.
        mean: explicit per-channel mean (overrides the folder and ``stats``).
        std: explicit per-channel std (overrides the folder and ``stats``).
    """

    name = "dinov3"

    def __init__(
        self,
        weights: str | Path | None = None,
        input_size: int | None = None,
        stats: str = "imagenet",
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
    ):
        super().__init__()
        try:
            from transformers import DINOv3ViTModel
        except ImportError:
            import transformers

            raise ConfigError(
                "model.encoder",
                f"encoder 'dinov3' needs transformers >= 4.56 (installed: {transformers.__version__})",
                "pip install -U 'transformers>=4.56'",
            ) from None
        if stats not in DINOV3_STATS:
            raise ConfigError("stats", f"unknown DINOv3 statistics '{stats}'", f"use one of {sorted(DINOV3_STATS)}")
        if weights is None:
            raise ConfigError(
                "model.encoder_weights",
                "encoder 'dinov3' has no built-in weights",
                "set weights to a local DINOv3 folder (config.json + model.safetensors)",
            )
        folder = Path(weights)
        if not (folder / "config.json").is_file():
            raise WeightsError(
                folder,
                "not a transformers model folder (no config.json)",
                "point weights to the local folder holding config.json and model.safetensors",
            )
        try:
            self.model, info = DINOv3ViTModel.from_pretrained(
                folder, local_files_only=True, output_loading_info=True
            )
        except (OSError, ValueError, KeyError, RuntimeError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise WeightsError(folder, f"cannot load a DINOv3ViTModel ({first})", "check the folder's files") from None
        # transformers would silently randomise missing weights: a partial load is an error here.
        bad = sorted(info.get("missing_keys", ())) + [str(k) for k in info.get("mismatched_keys", ())]
        if bad:
            raise WeightsError(
                folder,
                f"weights do not match the config: {len(bad)} missing or mismatched ({', '.join(bad[:3])})",
                "check that config.json and the weights file belong together",
            )
        if info.get("unexpected_keys"):
            log.warning("%s: %d unexpected keys ignored", folder, len(info["unexpected_keys"]))
        cfg = self.model.config
        if getattr(cfg, "model_type", None) != "dinov3_vit":
            raise WeightsError(folder, f"model_type is '{cfg.model_type}', not 'dinov3_vit'", "pass a DINOv3 ViT folder")
        patch = cfg.patch_size if isinstance(cfg.patch_size, int) else cfg.patch_size[0]
        self.stride = int(patch)
        self.out_channels = int(cfg.hidden_size)
        self.num_register_tokens = int(cfg.num_register_tokens)
        self.input_size = input_size
        found = _folder_stats(folder)
        default_mean, default_std = found if found is not None else DINOV3_STATS[stats]
        self.mean = tuple(float(v) for v in (mean if mean is not None else default_mean))
        self.std = tuple(float(v) for v in (std if std is not None else default_std))
        self.model.embeddings.mask_token.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Encode preprocessed slices.

        Args:
            x: (N, 3, H, W).

        Returns:
            (N, C, H // p, W // p): the final-norm patch tokens (CLS and registers dropped).
        """
        h, w = x.shape[-2] // self.stride, x.shape[-1] // self.stride
        tokens = self.model(pixel_values=x).last_hidden_state  # (N, 1 + R + h*w, C)
        patches = tokens[:, 1 + self.num_register_tokens :]  # (N, h*w, C), row-major
        return rearrange(patches, "n (h w) c -> n c h w", h=h, w=w)

    def unfreeze(self) -> DINOv3Encoder:
        """Make the encoder trainable, except the unused ``mask_token``."""
        super().unfreeze()
        self.model.embeddings.mask_token.requires_grad_(False)
        return self
