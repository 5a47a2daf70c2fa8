"""Report generation for the ct_encoder family (seed 001, multi-task objective 3 "CoT generation").

The common pattern of CT-CHAT, M3D-LaMed and RadFM (REFERENCE "Report generation from 3D CT"):
encoder -> projector -> visual prefix -> causal language model, next-token loss.

* :class:`VisualResampler`: an attentional pooler (CT-CHAT's, with ``gen_queries`` learned queries
  instead of 256) cross-attends to the encoder's patch tokens (optionally with its region tokens),
  then a 2-layer MLP maps to the language model's width: (B, N, C_f) -> (B, Q, W).
* The language model is a Hugging Face causal LM fed ``inputs_embeds`` = [visual prefix, BOS,
  report tokens]. ``gen_decoder: scratch`` builds a small GPT-2 from a config (random init, no
  weights, for CPU demos) with a word-level tokenizer fitted on the training split's reports;
  ``gen_decoder: hf:<folder>`` loads any causal LM and its tokenizer from a local folder
  (``local_files_only``; GPT-2, BioGPT, Llama-family). Decoding is Hugging Face ``generate``:
  greedy (``gen_beams: 1``) or beam search.
* The scratch tokenizer (``tokenizers`` WordLevel over Metaspace + punctuation pieces, so decoding
  restores the text exactly) lives in the checkpoint as a fixed-shape uint8 table ``(V, 48)`` (one
  UTF-8 token per row), because checkpoints hold tensors only.

:func:`target_text` builds the text to generate from a case: ``report`` (findings, then
"Impression: ..."), ``findings``, ``impression`` or ``cot`` (the chain-of-thought steps).
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from medfuse.errors import ConfigError, DataError

SPECIALS = ["[PAD]", "[UNK]", "[BOS]", "[EOS]"]
PAD, UNK, BOS, EOS = range(4)
TOKEN_BYTES = 48
"""Bytes per token in the checkpointed vocabulary table (longer words become [UNK])."""
TARGETS = ("report", "findings", "impression", "cot")

log = logging.getLogger(__name__)


def note_empty_reports(reports: list[str], where: str) -> str | None:
    """Log one line "<where>: N of M generated reports are empty" when any of ``reports`` is blank
    (an undertrained generator writes empty reports, which are otherwise written without a word).

    Returns:
        the note ("N of M generated reports are empty"), or None when none is empty.
    """
    empty = sum(1 for r in reports if not str(r).strip())
    if not empty:
        return None
    note = f"{empty} of {len(reports)} generated reports are empty"
    log.warning("%s: %s (an undertrained generator: train it longer)", where, note)
    return note


def target_text(findings: str, impression: str, steps: list[Any] | None, target: str = "report") -> str:
    """The text the generator learns for one case.

    Args:
        findings: the findings section; impression: the impression (may equal the findings
            when a dataset has none); steps: ``[[step text, region ids], ...]``.
        target: ``report`` | ``findings`` | ``impression`` | ``cot``.
    """
    findings, impression = str(findings or "").strip(), str(impression or "").strip()
    if target == "findings":
        return findings or impression
    if target == "impression":
        return impression or findings
    if target == "cot":
        return " ".join(str(s[0]).strip() for s in steps or [])
    if findings and impression and impression != findings:
        return f"{findings} Impression: {impression}"
    return findings or impression


def fit_word_tokenizer(texts: list[str], vocab_size: int):
    """A ``tokenizers`` WordLevel tokenizer over the words and punctuation of ``texts`` (at most
    ``vocab_size`` entries with the 4 specials; the rest become [UNK]); decoding is lossless."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Metaspace(), pre_tokenizers.Punctuation("isolated")])
    tok.decoder = decoders.Metaspace()
    trainer = trainers.WordLevelTrainer(vocab_size=vocab_size, special_tokens=SPECIALS, min_frequency=1)
    tok.train_from_iterator([str(t) for t in texts], trainer)
    return tok


def _word_tokenizer_from_vocab(vocab: dict[str, int]):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Metaspace(), pre_tokenizers.Punctuation("isolated")])
    tok.decoder = decoders.Metaspace()
    return tok


def _fast(tok):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", bos_token="[BOS]",
                                   eos_token="[EOS]")


class VisualResampler(nn.Module):
    """Attentional pooler + 2-layer MLP (CT-CHAT style): (B, N, C) visual tokens -> (B, Q, W) prefix.

    The tokens are first standardised per channel across the batch (BatchNorm over all tokens of all
    volumes; running statistics in evaluation). Volumes share most of their content, as the
    contrastive heads' BatchNorm already shows: on the demo's encoder features, a generator fed the
    raw tokens wrote the same report for every test volume after 300 steps (CE-F1 0.08), and with
    standardised tokens it wrote 31 different ones (CE-F1 0.59; the nearest-neighbour copy: 0.48).

    Args:
        in_dim: C, width of the visual tokens.
        width: W, the language model's embedding width.
        queries: Q learned queries.
        heads: attention heads (must divide ``width``).
    """

    def __init__(self, in_dim: int, width: int, queries: int = 16, heads: int = 4):
        super().__init__()
        self.standardize = nn.BatchNorm1d(in_dim)
        self.norm = nn.LayerNorm(in_dim)
        self.queries = nn.Parameter(torch.randn(queries, width) * 0.02)
        self.attn = nn.MultiheadAttention(width, heads, kdim=in_dim, vdim=in_dim, batch_first=True)
        self.mlp = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, width), nn.GELU(), nn.Linear(width, width))

    def forward(self, tokens: torch.Tensor, key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """tokens (B, N, C), key_padding_mask (B, N) True = ignore -> (B, Q, W)."""
        kv = self.norm(self.standardize(tokens.reshape(-1, tokens.shape[-1])).reshape(tokens.shape))
        q = self.queries.unsqueeze(0).expand(tokens.shape[0], -1, -1)
        x, _ = self.attn(q, kv, kv, key_padding_mask=key_padding_mask, need_weights=False)
        return x + self.mlp(x)


class ReportGenerator(nn.Module):
    """Visual prefix + causal LM; :meth:`loss` (teacher forcing) and :meth:`generate` (greedy/beam).

    Args:
        in_dim: width C_f of the encoder's visual tokens.
        decoder: ``scratch`` (a small GPT-2 from a config) or ``hf:<folder>`` (a local causal LM).
        queries: Q visual prefix tokens.
        width, depth, heads, dropout: the scratch GPT-2's size (``hf:`` reads its own).
        vocab_size: rows of the scratch word vocabulary (specials included).
        max_length: tokens per target text (longer ones are cut; generation stops there too).
        lm_trainable: fine-tune the language model (False: only the resampler learns).
    """

    def __init__(self, in_dim: int, decoder: str = "scratch", queries: int = 16, width: int = 128, depth: int = 2,
                 heads: int = 4, dropout: float = 0.1, vocab_size: int = 1024, max_length: int = 160,
                 lm_trainable: bool = True):
        super().__init__()
        self.spec, self.max_length = decoder, max_length
        if decoder == "scratch":
            from transformers import GPT2Config, GPT2LMHeadModel

            if width % heads:
                raise ConfigError("model.params.gen_heads", f"{heads} heads do not divide gen_width {width}",
                                  "pick gen_heads that divides gen_width")
            cfg = GPT2Config(vocab_size=vocab_size, n_positions=queries + max_length + 2, n_embd=width, n_layer=depth,
                             n_head=heads, resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout,
                             bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD)
            self.lm = GPT2LMHeadModel(cfg)
            self.register_buffer("vocab_table", torch.zeros(vocab_size, TOKEN_BYTES, dtype=torch.uint8))
            self._hf_tokenizer = None
        elif decoder.startswith("hf:"):
            self.lm, self._hf_tokenizer = _load_hf_lm(decoder[3:])
            self.vocab_table = None
        else:
            raise ConfigError("model.params.gen_decoder", f"unknown decoder '{decoder}'",
                              "use none, scratch or hf:<local folder with a causal LM>")
        if not lm_trainable:
            self.lm.requires_grad_(False)
        lm_width = self.lm.get_input_embeddings().embedding_dim
        self.resampler = VisualResampler(in_dim, lm_width, queries, heads if lm_width % heads == 0 else 1)
        self._tok = None

    # --- tokenizer ----------------------------------------------------------------------------
    @property
    def fitted(self) -> bool:
        """Whether the tokenizer is known (hf: always; scratch: after :meth:`fit_tokenizer` or a checkpoint)."""
        return self.vocab_table is None or bool(self.vocab_table[:, 0].any())

    def fit_tokenizer(self, texts: list[str]) -> None:
        """Fit the scratch word tokenizer on the training texts and store it in ``vocab_table``."""
        if self.vocab_table is None:
            return
        if not texts:
            raise DataError("train split", "has no report text to fit the report tokenizer on",
                            "give the training cases findings or impressions")
        vocab = fit_word_tokenizer(texts, self.vocab_table.shape[0]).get_vocab()
        table = torch.zeros_like(self.vocab_table)
        for token, i in vocab.items():
            raw = token.encode("utf-8")
            if len(raw) <= TOKEN_BYTES and i < table.shape[0]:
                table[i, : len(raw)] = torch.tensor(list(raw), dtype=torch.uint8)
        self.vocab_table.copy_(table)
        self._tok = None

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._tok = None  # the vocabulary may have changed

    @property
    def tokenizer(self):
        """A transformers fast tokenizer (pad, bos, eos set)."""
        if self._hf_tokenizer is not None:
            return self._hf_tokenizer
        if self._tok is None:
            if not self.fitted:
                raise DataError("report generator", "has no tokenizer yet (neither trained nor loaded)",
                                "train the model (the tokenizer is fitted on the training reports) or load its checkpoint")
            table = self.vocab_table.cpu().numpy()
            vocab = {}
            for i, row in enumerate(table):
                raw = bytes(row[row > 0].tolist())
                if raw:
                    vocab.setdefault(raw.decode("utf-8"), i)
            self._tok = _fast(_word_tokenizer_from_vocab(vocab))
        return self._tok

    # --- training -----------------------------------------------------------------------------
    def prefix(self, tokens: torch.Tensor, key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Visual prefix (B, Q, W) from visual tokens (B, N, C_f)."""
        return self.resampler(tokens, key_padding_mask)

    def _bos(self) -> int:
        tok = self.tokenizer
        return tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id

    def _encode_targets(self, texts: list[str], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, T) ids = [BOS, text, EOS] (cut to max_length + 2) and (B, T) attention mask."""
        tok = self.tokenizer
        ids = tok([str(t) for t in texts], add_special_tokens=False)["input_ids"]
        eos = tok.eos_token_id
        pad = tok.pad_token_id if tok.pad_token_id is not None else eos
        seqs = [[self._bos(), *x[: self.max_length], eos] for x in ids]
        t = max(len(s) for s in seqs)
        out = torch.full((len(seqs), t), pad, dtype=torch.long)
        att = torch.zeros(len(seqs), t, dtype=torch.long)
        for i, s in enumerate(seqs):
            out[i, : len(s)] = torch.tensor(s)
            att[i, : len(s)] = 1
        return out.to(device), att.to(device)

    def loss(self, tokens: torch.Tensor, texts: list[str], key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Next-token cross-entropy of ``texts`` given visual tokens (B, N, C_f); mean over text tokens."""
        pre = self.prefix(tokens, key_padding_mask)  # (B, Q, W)
        ids, att = self._encode_targets(texts, pre.device)  # (B, T)
        emb = self.lm.get_input_embeddings()(ids).to(pre.dtype)
        b, q = pre.shape[:2]
        inputs = torch.cat([pre, emb], dim=1)  # (B, Q + T, W)
        mask = torch.cat([att.new_ones(b, q), att], dim=1)
        labels = torch.cat([ids.new_full((b, q), -100), ids.masked_fill(att == 0, -100)], dim=1)
        labels[:, q] = -100  # BOS is given, not predicted
        logits = self.lm(inputs_embeds=inputs, attention_mask=mask).logits  # (B, Q + T, V)
        return nn.functional.cross_entropy(logits[:, :-1].float().flatten(0, 1), labels[:, 1:].flatten(),
                                           ignore_index=-100)

    # --- decoding -----------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, tokens: torch.Tensor, num_beams: int = 1, max_new_tokens: int | None = None,
                 key_padding_mask: torch.Tensor | None = None) -> list[str]:
        """Greedy (``num_beams`` 1) or beam-search reports from visual tokens (B, N, C_f)."""
        tok = self.tokenizer
        pre = self.prefix(tokens, key_padding_mask)
        bos = self.lm.get_input_embeddings()(torch.full((pre.shape[0], 1), self._bos(), device=pre.device))
        inputs = torch.cat([pre, bos.to(pre.dtype)], dim=1)
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        out = self.lm.generate(inputs_embeds=inputs, attention_mask=torch.ones(inputs.shape[:2], dtype=torch.long,
                                                                                 device=pre.device),
                               max_new_tokens=max_new_tokens or self.max_length + 1, num_beams=num_beams,
                               do_sample=False, eos_token_id=tok.eos_token_id, pad_token_id=pad,
                               bos_token_id=self._bos(), early_stopping=num_beams > 1 or None)
        return [t.strip() for t in tok.batch_decode(out, skip_special_tokens=True)]


def _load_hf_lm(folder: str):
    from pathlib import Path

    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(folder)
    if not path.is_dir():
        raise ConfigError("model.params.gen_decoder", f"folder '{folder}' not found",
                          "point hf:<folder> at a local causal LM saved with save_pretrained (no downloads)")
    try:
        lm = AutoModelForCausalLM.from_pretrained(str(path), local_files_only=True)
        tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError) as e:
        raise ConfigError("model.params.gen_decoder", f"cannot load a causal LM from '{folder}' ({str(e)[:120]})",
                          "save the model and its tokenizer there with save_pretrained") from e
    if tok.eos_token_id is None:
        raise ConfigError("model.params.gen_decoder", f"the tokenizer in '{folder}' has no EOS token",
                          "save a tokenizer with an eos_token")
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return lm.train(), tok  # from_pretrained returns eval mode; training toggles modes from here
