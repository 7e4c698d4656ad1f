r"""Per-language text encoders trained from scratch: a character tokenizer and a small encoder.

Characters are Unicode code points (after NFC normalisation), so English, Hindi (Devanagari, where
a vowel sign is its own code point) and Japanese (kana and kanji) need no language-specific
tokenizer. As in Crabtree's thesis (one dedicated encoder per language, sec. 3.1), build one
tokenizer and one :class:`TextEncoder` per language.
"""

from __future__ import annotations

import json
import unicodedata
from collections import Counter
from pathlib import Path
from typing import Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import checks
from ..checks import check_int, check_mask, check_probability
from .pooling import AttentionPool, TransformerPool, masked_mean

PAD, UNK, CLS = "<pad>", "<unk>", "<cls>"


class CharTokenizer:
    """Character-level tokenizer: id 0 is padding, then ``<unk>``, optionally ``<cls>``, then the
    corpus characters sorted by code point (deterministic: the same corpus always gives the same ids).

    Args:
        chars: the characters of the vocabulary (specials are added, duplicates removed).
        add_cls: prepend a ``<cls>`` token to every encoded text (for a model that reads position 0;
            :class:`TextEncoder` with ``pooling="mhsa_cls"`` adds its own learned CLS and does not need it).

    Build from text with :meth:`from_corpus`; save/load as JSON with :meth:`save` / :meth:`load`.
    """

    def __init__(self, chars: Iterable[str], add_cls: bool = False):
        chars = sorted({unicodedata.normalize("NFC", c) for c in chars} - {PAD, UNK, CLS})
        if any(len(c) != 1 for c in chars):
            raise ValueError("vocabulary entries must be single characters (code points after NFC)")
        self.add_cls = add_cls
        self.itos = [PAD, UNK] + ([CLS] if add_cls else []) + chars
        self.stoi = {s: i for i, s in enumerate(self.itos)}
        self.pad_id, self.unk_id = 0, 1
        self.cls_id = 2 if add_cls else None

    @classmethod
    def from_corpus(cls, texts: Iterable[str], add_cls: bool = False, min_count: int = 1) -> "CharTokenizer":
        """Vocabulary = the characters seen at least ``min_count`` times in ``texts``."""
        counts = Counter(c for t in texts for c in unicodedata.normalize("NFC", t))
        return cls([c for c, n in counts.items() if n >= min_count], add_cls=add_cls)

    @property
    def vocab_size(self) -> int:
        return len(self.itos)

    def __len__(self) -> int:
        return len(self.itos)

    def __eq__(self, other) -> bool:
        return isinstance(other, CharTokenizer) and self.itos == other.itos and self.add_cls == other.add_cls

    def encode(self, texts: list[str], max_len: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Texts to padded ids.

        Args:
            texts: B strings (a single string is treated as a batch of one).
            max_len: L, truncate longer texts (the CLS token counts); default: the longest text.

        Returns:
            ``ids`` (B, L) LongTensor (0 = padding, 1 = unknown character) and ``mask`` (B, L) bool,
            True for real tokens.
        """
        if isinstance(texts, str):
            texts = [texts]
        texts = list(texts)
        bad = next((t for t in texts if not isinstance(t, str)), None)
        if bad is not None:
            raise TypeError(f"texts must be strings, got a {type(bad).__name__} ({bad!r:.60})")
        if max_len is not None:
            check_int("max_len", max_len)
        if max_len is not None and max_len < 1:
            raise ValueError(f"max_len must be >= 1, got {max_len}")
        prefix = [self.cls_id] if self.add_cls else []
        seqs = [prefix + [self.stoi.get(c, self.unk_id) for c in unicodedata.normalize("NFC", t)] for t in texts]
        L = max_len if max_len is not None else max([len(s) for s in seqs] + [1])
        ids = torch.zeros(len(seqs), L, dtype=torch.long)
        for b, s in enumerate(seqs):  # building the batch from Python lists: one row per text
            s = s[:L]
            ids[b, : len(s)] = torch.tensor(s, dtype=torch.long)
        return ids, ids != self.pad_id

    def decode(self, ids: torch.Tensor) -> list[str]:
        """(B, L) ids back to strings; padding and CLS dropped, unknown characters shown as U+FFFD."""
        out = []
        for row in ids.tolist():
            out.append("".join("\ufffd" if i == self.unk_id else self.itos[i]
                               for i in row if i != self.pad_id and i != self.cls_id))
        return out

    def save(self, path: str | Path) -> None:
        """Write the vocabulary to a UTF-8 JSON file (human-readable, kana and Devanagari unescaped)."""
        specials = 3 if self.add_cls else 2
        data = {"format": "mmalign.CharTokenizer/1", "add_cls": self.add_cls, "chars": self.itos[specials:]}
        Path(path).write_text(json.dumps(data, ensure_ascii=False, indent=1), encoding="utf-8")

    @classmethod
    def load(cls, path: str | Path) -> "CharTokenizer":
        """Read a tokenizer written by :meth:`save`."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no tokenizer file at {path}; write one with CharTokenizer.save(path)")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ValueError(f"{path} is not a CharTokenizer JSON file (not valid JSON: {err}); it is truncated or "
                             "damaged: write it again with CharTokenizer.save(path)") from None
        if not isinstance(data, dict) or data.get("format") != "mmalign.CharTokenizer/1":
            raise ValueError(f"{path} is not a CharTokenizer JSON file (missing format 'mmalign.CharTokenizer/1')")
        if not isinstance(data.get("chars"), list) or not isinstance(data.get("add_cls"), bool):
            raise ValueError(f"{path} is not a CharTokenizer JSON file: it needs a 'chars' list and an 'add_cls' flag")
        return cls(data["chars"], add_cls=data["add_cls"])


class TextEncoder(nn.Module):
    r"""Small text encoder from scratch: embeddings + positions, a local mixer, output pooling.

    .. math::
        E = \mathrm{Emb}(ids) + P,\qquad H = \mathrm{mixer}(E),\qquad z = \mathrm{pool}(H, mask)

    The mixer is ``layers`` residual 1-d convolution blocks (:math:`h \leftarrow h +
    \mathrm{GELU}(\mathrm{Conv1d}(\mathrm{LN}(h)))`, padded positions zeroed before every conv so
    padding never reaches a real token). ``pooling`` is one of the thesis's strategies (sec. 2.4.3):

    * ``"mean"``: masked average pooling;
    * ``"mhsa"``: multi-head self-attention, then masked mean; ``"mhsa_cls"``: MHSA with a learned CLS
      token, its output is the embedding;
    * ``"transformer"``: ``layers`` Transformer encoder blocks, then masked mean (Vaswani et al., 2017).

    Args:
        vocab_size: tokenizer size (``len(tokenizer)``); id 0 must be padding.
        dim: D, the token and output size.
        pooling: see above; layers: conv blocks (and Transformer blocks for ``"transformer"``);
        heads: attention heads; max_len: longest sequence (learned positions); kernel_size: conv width.

    Shapes: ``forward(ids (B, L) long, mask (B, L) bool or None) -> (B, D)``; appending padding to a
    batch does not change the output.
    """

    POOLINGS = ("mean", "mhsa", "mhsa_cls", "transformer")

    def __init__(self, vocab_size: int, dim: int, pooling: str = "mean", layers: int = 1, heads: int = 4,
                 max_len: int = 128, kernel_size: int = 3, dropout: float = 0.0):
        super().__init__()
        if pooling not in self.POOLINGS:
            raise ValueError(f"unknown pooling {pooling!r}; choose one of {self.POOLINGS}")
        check_int("vocab_size", vocab_size, minimum=2), check_int("dim", dim, minimum=1)
        check_int("layers", layers, minimum=1), check_int("heads", heads, minimum=1)
        check_int("max_len", max_len, minimum=1), check_int("kernel_size", kernel_size, minimum=1)
        check_probability("dropout", dropout, open_high=True)
        if kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd to keep the sequence length, got {kernel_size}")
        self.embed = nn.Embedding(vocab_size, dim, padding_idx=0)
        self.pos = nn.Parameter(torch.randn(max_len, dim) * 0.02)
        self.norms = nn.ModuleList(nn.LayerNorm(dim) for _ in range(layers))
        self.convs = nn.ModuleList(nn.Conv1d(dim, dim, kernel_size, padding=kernel_size // 2) for _ in range(layers))
        self.drop = nn.Dropout(dropout)
        self.pooling = pooling
        if pooling in ("mhsa", "mhsa_cls"):
            self.pool = AttentionPool(dim, heads, use_cls=pooling == "mhsa_cls", dropout=dropout)
        elif pooling == "transformer":
            self.pool = TransformerPool(dim, heads, layers=layers, dropout=dropout)
        else:
            self.pool = None

    def forward(self, ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        if not isinstance(ids, torch.Tensor):
            raise TypeError(f"ids must be a (B, L) LongTensor from the tokenizer, got {type(ids).__name__}")
        if ids.dim() != 2:
            raise ValueError(f"expected (B, L) token ids, got shape {tuple(ids.shape)}")
        if ids.dtype.is_floating_point or ids.is_complex() or ids.dtype == torch.bool:
            raise ValueError(f"ids must be integer token ids (a LongTensor), got {ids.dtype}")
        B, L = ids.shape
        if checks.enabled() and ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.embed.num_embeddings):
            raise ValueError(f"token ids must be in 0..{self.embed.num_embeddings - 1} (vocab_size), got values in "
                             f"[{int(ids.min())}, {int(ids.max())}]; encode with the tokenizer this model was built for")
        if L > self.pos.shape[0]:
            raise ValueError(f"sequence length {L} > max_len={self.pos.shape[0]}; encode with max_len or build "
                             f"TextEncoder(max_len={L})")
        mask = ids != 0 if mask is None else check_mask("mask", mask, (B, L), device=ids.device)
        keep = mask.unsqueeze(-1)
        h = self.drop(self.embed(ids) + self.pos[:L])
        for norm, conv in zip(self.norms, self.convs):
            x = norm(h).mul(keep).transpose(1, 2)  # zeroed padding: the conv never sees it
            h = h + F.gelu(conv(x).transpose(1, 2))
        return masked_mean(h, mask) if self.pool is None else self.pool(h, mask)
