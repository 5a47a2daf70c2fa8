"""Platform baselines for the segmentation and contrastive tasks (the classification one is in baseline.py)."""

from __future__ import annotations

from torch import nn

from medfuse.registry import MODELS


@MODELS.register("baseline_unet3d", help="MONAI residual UNet (segmentation baseline)")
def baseline_unet3d(in_channels: int, num_classes: int, channels: tuple[int, ...] = (8, 16, 32),
                    strides: tuple[int, ...] = (2, 2), num_res_units: int = 1) -> nn.Module:
    """MONAI ``UNet``: (B, M, D, H, W) -> logits (B, K, D, H, W); D, H, W divisible by prod(strides)."""
    from monai.networks.nets import UNet

    return UNet(spatial_dims=3, in_channels=in_channels, out_channels=num_classes, channels=tuple(channels),
                strides=tuple(strides), num_res_units=num_res_units)


class _HashedBagOfWords(nn.Module):
    """A tiny offline text encoder: lower-cased words hashed into an EmbeddingBag (tests, demos)."""

    def __init__(self, dim: int, buckets: int = 4096):
        super().__init__()
        self.buckets = buckets
        self.bag = nn.EmbeddingBag(buckets, dim, mode="mean")

    def forward(self, texts: list[str]):
        """T strings -> (T, dim)."""
        import zlib

        import torch

        ids, offsets = [], []
        for t in texts:
            offsets.append(len(ids))
            words = t.lower().split() or [""]
            ids.extend(zlib.crc32(w.encode()) % self.buckets for w in words)
        dev = self.bag.weight.device
        return self.bag(torch.tensor(ids, device=dev), torch.tensor(offsets, device=dev))


class _Clip3d(nn.Module):
    def __init__(self, in_channels: int, dim: int, widths: tuple[int, ...]):
        super().__init__()
        from medfuse.models.baseline import baseline_cnn3d

        self.image = baseline_cnn3d(in_channels=in_channels, num_classes=dim, widths=tuple(widths), dropout=0.0)
        self.text = _HashedBagOfWords(dim)

    def forward(self, image, text: list[str]):
        """image (B, M, D, H, W), B strings -> (image_emb (B, E), text_emb (B, E))."""
        return self.image(image), self.text(text)


@MODELS.register("baseline_clip3d", help="3D CNN + hashed bag-of-words text (contrastive baseline)")
def baseline_clip3d(in_channels: int, dim: int = 32, widths: tuple[int, ...] = (8, 16)) -> nn.Module:
    """Contrastive baseline: ``forward(image, text) -> (image_emb, text_emb)``."""
    return _Clip3d(in_channels, dim, widths)
