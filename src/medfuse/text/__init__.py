"""Text encoders (offline MiniLM default, transformers models from local folders)."""

from medfuse.text.registry import HFTextEncoder, TextOutput, build_text_encoder

__all__ = ["HFTextEncoder", "TextOutput", "build_text_encoder"]
