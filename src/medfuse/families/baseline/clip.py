"""The contrastive platform baseline: a 3D CNN image side and a hashed bag-of-words text side."""

from __future__ import annotations

from torch import nn

from medfuse.families.baseline.model import BaselineCNN


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


class Clip3d(nn.Module):
    """3D CNN image embedding + hashed bag-of-words text embedding (contrastive baseline)."""

    def __init__(self, in_channels: int, dim: int, widths: tuple[int, ...]):
        super().__init__()
        self.image = BaselineCNN(in_channels, dim, tuple(widths), dropout=0.0)
        self.text = _HashedBagOfWords(dim)

    def forward(self, image, text: list[str]):
        """image (B, M, D, H, W), B strings -> (image_emb (B, E), text_emb (B, E))."""
        return self.image(image), self.text(text)

