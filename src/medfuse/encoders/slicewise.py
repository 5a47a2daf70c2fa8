"""Volume -> slice batches -> 2D encoder features, with a disk cache (DESIGN "encoders/slicewise.py").

Every family that reads a 3D volume through a 2D foundation encoder (MedSAM2, SAM ViT-B, DINOv3,
or the tiny CPU encoder) goes through :class:`SlicewiseExtractor`:

1. preprocess the D slices of one modality with the encoder's own recipe (per volume when the
   encoder has ``preprocess_volume``, e.g. MedSAM2's volume-wide MR percentiles; else per slice);
2. run the encoder on chunks of ``slice_batch_size`` slices, which bounds peak memory;
3. with a trainable encoder, recompute each chunk's activations in the backward pass (gradient
   checkpointing) so training memory is about that of one chunk.

A frozen encoder gives the same features every epoch, so :meth:`SlicewiseExtractor.extract_cached`
stores them on disk (safetensors, written atomically) under a sha256 key of the input, the encoder's
weights and the preprocessing settings; later epochs never run the encoder. Each entry has one
writer across processes (:func:`medfuse.fileio.claim`): DDP ranks and loader workers that need
the same case wait for it rather than encode it again.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from einops import rearrange
from torch import nn
from torch.utils.checkpoint import checkpoint

from medfuse.encoders.base import SliceEncoder
from medfuse.encoders.weights import save_safetensors
from medfuse.errors import ConfigError
from medfuse.fileio import claim

__all__ = ["SlicewiseExtractor", "tensor_sha256"]

log = logging.getLogger(__name__)

CACHE_FORMAT = "medfuse-slicewise-v1"
CONTENT_KEYS = ("file_hash", "content_hash")


def tensor_sha256(t: torch.Tensor) -> str:
    """sha256 of a tensor's dtype, shape and bytes (hex)."""
    t = t.detach().to("cpu").contiguous()
    h = hashlib.sha256(f"{t.dtype}|{tuple(t.shape)}|".encode())
    h.update(t.reshape(-1).view(torch.uint8).numpy().data)
    return h.hexdigest()


class SlicewiseExtractor(nn.Module):
    """Encode each slice of a volume with a :class:`~medfuse.encoders.base.SliceEncoder`.

    The input channels of a volume are ONE modality: a multi-modal case is encoded by calling the
    extractor once per modality (the caller loops modalities, each with its own ``modality`` /
    ``window``). With ``preprocess=True`` that channel is raw intensities (C_in = 1); with
    ``preprocess=False`` the volume already holds encoder-ready slices (C_in = 3, already resized
    and normalised). No gradient flows back into the raw volume through preprocessing.

    Args:
        encoder: the slice encoder (a registered submodule: its parameters are the extractor's).
        slice_batch_size: slices per encoder call; bounds the peak memory of one call.
        checkpointing: ``"auto"`` recomputes each chunk in backward when grad is enabled and the
            encoder has trainable parameters; ``True`` also when only the input needs grad; ``False``
            never.
        cache_dir: folder of the feature cache used by :meth:`extract_cached` (``None``: no cache).
        modality: default modality name for preprocessing (``"mr"`` or ``"ct"``).
        window: default ``(level, width)`` intensity window.
        preprocess: whether inputs are raw intensities (``True``) or encoder-ready slices.
        cache_dtype: dtype the cache stores (e.g. ``torch.float16`` halves its size); features are
            returned as float32 either way, identical on a hit and on the miss that wrote them.
    """

    def __init__(
        self,
        encoder: SliceEncoder,
        slice_batch_size: int = 8,
        checkpointing: bool | str = "auto",
        cache_dir: str | Path | None = None,
        modality: str = "mr",
        window: tuple[float, float] | None = None,
        preprocess: bool = True,
        cache_dtype: torch.dtype | None = None,
    ):
        super().__init__()
        if int(slice_batch_size) < 1:
            raise ConfigError("slice_batch_size", f"must be >= 1, got {slice_batch_size}", "use e.g. 8")
        if checkpointing not in ("auto", True, False):
            raise ConfigError("checkpointing", f"must be 'auto', true or false, got {checkpointing!r}", "fix it")
        self.encoder = encoder
        self.slice_batch_size = int(slice_batch_size)
        self.checkpointing = checkpointing
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self.modality = modality
        self.window = tuple(float(v) for v in window) if window is not None else None
        self.preprocess = bool(preprocess)
        self.cache_dtype = cache_dtype
        self.stats = {"hits": 0, "misses": 0}
        self._wid_memo: tuple[tuple, str] | None = None

    # ------------------------------------------------------------------ encoding
    def _device(self, fallback: torch.device) -> torch.device:
        for t in self.encoder.parameters():
            return t.device
        for t in self.encoder.buffers():
            return t.device
        return fallback

    def _use_checkpointing(self, x: torch.Tensor) -> bool:
        if self.checkpointing is False or not torch.is_grad_enabled():
            return False
        trainable = any(p.requires_grad for p in self.encoder.parameters())
        return trainable or (self.checkpointing is True and x.requires_grad)

    def encode_slices(self, slices: torch.Tensor) -> torch.Tensor:
        """Run the encoder over preprocessed slices in chunks of ``slice_batch_size``.

        Args:
            slices: (N, 3, H, W) encoder-ready slices.

        Returns:
            (N, C, h, w).
        """
        slices = slices.to(self._device(slices.device))
        ckpt = self._use_checkpointing(slices)
        outs = []
        for chunk in slices.split(self.slice_batch_size):
            if ckpt:
                outs.append(checkpoint(self.encoder, chunk, use_reentrant=False))
            else:
                outs.append(self.encoder(chunk))
        return torch.cat(outs)

    def prepare(
        self, case: torch.Tensor, modality: str | None = None, window: tuple[float, float] | None = None
    ) -> torch.Tensor:
        """Preprocess the slices of one case and one modality.

        Args:
            case: (C_in, D, H, W): C_in = 1 raw intensities (``preprocess=True``) or C_in = 3
                encoder-ready slices (``preprocess=False``).
            modality: overrides the extractor's modality.
            window: overrides the extractor's window.

        Returns:
            (D, 3, S, S) encoder input.
        """
        if case.ndim != 4:
            raise ValueError(f"expected one case of shape (C_in, D, H, W), got {tuple(case.shape)}")
        if not self.preprocess:
            if case.shape[0] != 3:
                raise ValueError(f"preprocess=False expects 3 encoder-ready channels, got {case.shape[0]}")
            return case.transpose(0, 1)  # (D, 3, H, W)
        if case.shape[0] != 1:
            raise ValueError(
                f"expected one modality (C_in = 1), got {case.shape[0]} channels: "
                "call the extractor once per modality"
            )
        modality = modality or self.modality
        window = window if window is not None else self.window
        vol = case[0].to(self._device(case.device))  # (D, H, W); resizing runs on the encoder's device
        by_volume = getattr(self.encoder, "preprocess_volume", None)
        if by_volume is not None:
            return by_volume(vol, modality=modality, window=window)
        return self.encoder.preprocess(vol, modality=modality, window=window)

    def forward(
        self,
        volume: torch.Tensor,
        modality: str | None = None,
        window: tuple[float, float] | None = None,
        cache_keys: Sequence[Mapping[str, Any]] | None = None,
    ) -> torch.Tensor:
        """Encode every slice of a batch of single-modality volumes.

        Args:
            volume: (B, C_in, D, H, W), one modality (see the class docstring for C_in).
            modality: overrides the extractor's modality.
            window: overrides the extractor's window.
            cache_keys: B dicts of key parts; when given, each case goes through
                :meth:`extract_cached` (needs ``cache_dir`` and a frozen encoder).

        Returns:
            (B, D, C, h, w) slice features.
        """
        if volume.ndim != 5:
            raise ValueError(f"expected a batch of shape (B, C_in, D, H, W), got {tuple(volume.shape)}")
        b = volume.shape[0]
        if cache_keys is not None:
            if len(cache_keys) != b:
                raise ValueError(f"got {len(cache_keys)} cache keys for a batch of {b}")
            return torch.stack(
                [self.extract_cached(volume[i], cache_keys[i], modality, window) for i in range(b)]
            )
        slices = torch.cat([self.prepare(volume[i], modality, window) for i in range(b)])  # (B*D, 3, S, S)
        feats = self.encode_slices(slices)  # (B*D, C, h, w)
        return rearrange(feats, "(b d) c h w -> b d c h w", b=b)

    # ------------------------------------------------------------------ cache
    def _weights_id(self) -> str:
        """``encoder.weights_id()``, recomputed only when a weight tensor changed or moved."""
        tensors = self.encoder.state_dict().values()
        # Detached state-dict views share their parameter's version counter, which every in-place
        # update (optimizer step, load_state_dict) bumps; .to() swaps storage (new data_ptr).
        stamp = tuple((t.data_ptr(), t._version) for t in tensors)
        if self._wid_memo is None or self._wid_memo[0] != stamp:
            self._wid_memo = (stamp, self.encoder.weights_id())
        return self._wid_memo[1]

    def cache_key(
        self,
        case: torch.Tensor,
        key_parts: Mapping[str, Any] | None = None,
        modality: str | None = None,
        window: tuple[float, float] | None = None,
    ) -> tuple[str, dict[str, Any]]:
        """The cache key of one case: sha256 of its content, the encoder and the preprocessing.

        Args:
            case: (C_in, D, H, W).
            key_parts: extra parts of the key (e.g. ``case_id``, a transform description). When it
                holds ``file_hash`` or ``content_hash``, that string stands for the content instead
                of hashing the tensor; only pass one when the tensor is a deterministic function of
                the file and of the other key parts (no random augmentation).
            modality: overrides the extractor's modality.
            window: overrides the extractor's window.

        Returns:
            ``(hex key, the parts it hashes)``.
        """
        parts = {str(k): v for k, v in (key_parts or {}).items()}
        content = next((str(parts[k]) for k in CONTENT_KEYS if k in parts), None)
        window = window if window is not None else self.window
        enc = self.encoder
        desc = {
            "format": CACHE_FORMAT,
            "content": content if content is not None else tensor_sha256(case),
            "shape": list(case.shape),
            "encoder": enc.name,
            "encoder_class": type(enc).__name__,
            "weights_id": self._weights_id(),
            "modality": (modality or self.modality).lower(),
            "window": list(window) if window is not None else None,
            "input_size": enc.input_size,
            "mean": list(enc.mean),
            "std": list(enc.std),
            "preprocess": self.preprocess,
            "per_volume": hasattr(enc, "preprocess_volume"),
            "cache_dtype": str(self.cache_dtype) if self.cache_dtype is not None else None,
            "key_parts": parts,
        }
        blob = json.dumps(desc, sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest(), desc

    def extract_cached(
        self,
        case: torch.Tensor,
        key_parts: Mapping[str, Any] | None = None,
        modality: str | None = None,
        window: tuple[float, float] | None = None,
    ) -> torch.Tensor:
        """Features of one case from the disk cache, computing and storing them on a miss.

        Args:
            case: (C_in, D, H, W), one modality (C_in = 1 raw, or 3 with ``preprocess=False``).
            key_parts: extra key parts, see :meth:`cache_key`.
            modality: overrides the extractor's modality.
            window: overrides the extractor's window.

        Returns:
            (D, C, h, w) float32 on the encoder's device.

        Raises:
            ConfigError: no ``cache_dir``, or the encoder is trainable (its features change as it
                trains, so caching them would silently return stale ones).
        """
        if self.cache_dir is None:
            raise ConfigError("cache_dir", "the feature cache needs a folder", "set cache_dir")
        if any(p.requires_grad for p in self.encoder.parameters()):
            raise ConfigError(
                "cache_dir",
                f"cannot cache features of a trainable encoder ('{self.encoder.name}')",
                "freeze the encoder (encoder.freeze()) or disable the feature cache",
            )
        key, desc = self.cache_key(case, key_parts, modality, window)
        path = self.cache_dir / key[:2] / f"{key}.safetensors"
        device = self._device(case.device)
        feats = self._load(path, device)
        if feats is not None:
            return feats
        # One writer per entry (fileio.claim): another DDP rank or loader worker that needs the
        # same case meanwhile waits for the file instead of running the encoder again.
        with claim(path) as mine:
            if mine:
                return self._compute_and_store(case, path, desc, device, modality, window)
        feats = self._load(path, device)
        if feats is not None:
            return feats
        return self._compute_and_store(case, path, desc, device, modality, window)  # its writer failed

    def _load(self, path: Path, device: torch.device) -> torch.Tensor | None:
        """The cached (D, C, h, w) features as float32 on ``device``, or None (absent or damaged)."""
        if not path.is_file():
            return None
        try:
            from safetensors.torch import load_file

            feats = load_file(str(path))["features"]
        except Exception as e:  # a damaged entry is recomputed, not fatal
            log.warning("feature cache entry %s unreadable (%s); recomputing it", path, e)
            return None
        self.stats["hits"] += 1
        return feats.to(device=device, dtype=torch.float32)

    def _compute_and_store(self, case: torch.Tensor, path: Path, desc: dict[str, Any], device: torch.device,
                           modality: str | None, window: tuple[float, float] | None) -> torch.Tensor:
        self.stats["misses"] += 1
        with torch.no_grad():
            feats = self.encode_slices(self.prepare(case, modality, window))  # (D, C, h, w)
        if self.cache_dtype is not None:
            feats = feats.to(self.cache_dtype)
        save_safetensors({"features": feats}, path, metadata={"key": json.dumps(desc, default=str)})  # atomic
        return feats.to(device=device, dtype=torch.float32)
