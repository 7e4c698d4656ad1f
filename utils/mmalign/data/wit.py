"""Loader for the WIT (Wikipedia-based Image Text) caption-competition files: gzip JSON lines with
base64 image bytes and a precomputed ResNet embedding (Srinivasan et al., 2021).

Each line of a ``*.json.gz`` file is one JSON record::

    {"image_url": "...", "metadata_url": "...",
     "wit_features": [{"language": "en", "caption_reference_description": "...", "page_url": "...",
                       "page_title": "...", "mime_type": "image/jpeg", ...}, ...],
     "b64_bytes": "<base64 of the image file>",
     "embedding": "0.12,0.0,...,0.7"}          # 2048 comma-separated floats

Files are at https://analytics.wikimedia.org/published/datasets/one-off/caption_competition/training/joined/
(about 670 MB each); use ``limit=`` to read the first records only.
"""

from __future__ import annotations

import base64
import binascii
import collections
import gzip
import io
import json
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..checks import check_int

from .._optional import missing_extra

try:
    from PIL import Image
except ModuleNotFoundError as e:
    raise missing_extra(e, "data", "mmalign.data.wit") from e

EMBEDDING_DIM = 2048
FILTER_REASONS = ("no_caption",)  # records filtered out, never an error


@dataclass
class WitRecord:
    """One image with its caption in the chosen language."""

    image: Image.Image
    caption: str
    language: str
    embedding: np.ndarray  # (2048,) float32
    image_url: str


@dataclass
class WitStats:
    """Counters of one read: lines seen, records kept, and skipped records by reason.

    Reasons: ``bad_json``, ``missing_field``, ``bad_base64``, ``bad_image``, ``bad_embedding``,
    ``truncated_gzip`` (corrupt; raise with ``on_error="raise"``) and ``no_caption`` (no caption in
    the requested language: a filter, never an error).
    """

    lines: int = 0
    kept: int = 0
    skipped: collections.Counter = field(default_factory=collections.Counter)

    @property
    def corrupt(self) -> int:
        return sum(c for r, c in self.skipped.items() if r not in FILTER_REASONS)


class _BadRecord(ValueError):
    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason


def read_wit_records(
    path: str | Path,
    language: str | None = "en",
    on_error: str = "skip",
    limit: int | None = None,
    embedding_dim: int = EMBEDDING_DIM,
) -> tuple[list[WitRecord], WitStats]:
    """Read a WIT ``json.gz`` file into records, skipping (and counting) or raising on corrupt ones.

    Args:
        path: the ``.json.gz`` file.
        language: keep the caption (``caption_reference_description``) of this language; ``None``
            takes the first feature that has a caption. Records without one are counted as ``no_caption``.
        on_error: ``"skip"`` counts corrupt records in the stats; ``"raise"`` raises a ValueError
            naming the file, the line number and the reason.
        limit: stop after this many kept records.
        embedding_dim: expected length of ``embedding``.

    Returns:
        ``(records, stats)``.
    """
    path = Path(path)
    if on_error not in ("skip", "raise"):
        raise ValueError(f"on_error must be 'skip' or 'raise', got {on_error!r}")
    if limit is not None:
        check_int("limit", limit, minimum=1)
    check_int("embedding_dim", embedding_dim, minimum=1)
    if language is not None and not isinstance(language, str):
        raise TypeError(f"language must be a language code such as 'en' (or None for any), got {language!r}")
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: download a WIT file (e.g. part-00000.json.gz) from "
            "https://analytics.wikimedia.org/published/datasets/one-off/caption_competition/training/joined/ "
            "or build a small one with mmalign.data.wit.write_wit_records"
        )
    records, stats = [], WitStats()
    lineno = 0
    try:
        with gzip.open(path, "rt", encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if limit is not None and len(records) >= limit:
                    break
                if not line.strip():
                    continue
                stats.lines += 1
                try:
                    record = _parse_line(line, language, embedding_dim)
                except _BadRecord as e:
                    if on_error == "raise" and e.reason not in FILTER_REASONS:
                        raise ValueError(f"{path}, line {lineno}: {e.reason}: {e}") from None
                    stats.skipped[e.reason] += 1
                    continue
                records.append(record)
    except (EOFError, zlib.error, gzip.BadGzipFile) as e:
        if on_error == "raise":
            raise ValueError(
                f"{path}, after line {lineno}: truncated_gzip: the gzip stream is cut or damaged ({e}); "
                "download the file again"
            ) from None
        stats.skipped["truncated_gzip"] += 1
    stats.kept = len(records)
    return records, stats


def _parse_line(line: str, language: str | None, embedding_dim: int) -> WitRecord:
    try:
        raw = json.loads(line)
    except json.JSONDecodeError as e:
        raise _BadRecord("bad_json", f"not valid JSON ({e.msg})") from None
    if not isinstance(raw, dict):
        raise _BadRecord("bad_json", "a line must hold one JSON object")
    missing = [k for k in ("image_url", "wit_features", "b64_bytes", "embedding") if raw.get(k) is None]
    if missing or not isinstance(raw["wit_features"], list):
        raise _BadRecord("missing_field", f"missing or malformed field(s): {missing or ['wit_features']}")
    feature = next(
        (
            w for w in raw["wit_features"]
            if isinstance(w, dict) and (language is None or w.get("language") == language)
            and w.get("caption_reference_description")
        ),
        None,
    )
    if feature is None:
        raise _BadRecord("no_caption", f"no caption_reference_description in language {language!r}")
    try:
        data = base64.b64decode(raw["b64_bytes"], validate=True)
    except (binascii.Error, ValueError, TypeError) as e:
        raise _BadRecord("bad_base64", f"b64_bytes is not valid base64 ({e})") from None
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
        image = image.convert("RGB")
    except Exception as e:  # PIL raises many types (UnidentifiedImageError, OSError, SyntaxError...)
        raise _BadRecord("bad_image", f"image bytes cannot be decoded ({type(e).__name__}: {e})") from None
    emb = raw["embedding"]
    try:
        values = emb.split(",") if isinstance(emb, str) else emb
        embedding = np.asarray(values, dtype=np.float32)
    except (ValueError, TypeError) as e:
        raise _BadRecord("bad_embedding", f"embedding is not a list of numbers ({e})") from None
    if embedding.shape != (embedding_dim,) or not np.isfinite(embedding).all():
        raise _BadRecord(
            "bad_embedding", f"embedding must be {embedding_dim} finite floats, got shape {embedding.shape}"
        )
    return WitRecord(image, feature["caption_reference_description"], feature.get("language", ""),
                     embedding, raw["image_url"])


def write_wit_records(path: str | Path, records) -> None:
    """Write records as a WIT ``json.gz`` file in the real format (for fixtures and small demos).

    Args:
        path: output ``.json.gz``.
        records: iterable of :class:`WitRecord` (image stored as PNG) or of dicts, written verbatim
            (to build corrupt fixtures).
    """
    with gzip.open(path, "wt", encoding="utf-8") as f:
        for r in records:
            if isinstance(r, WitRecord):
                buf = io.BytesIO()
                r.image.save(buf, format="PNG")
                r = {
                    "image_url": r.image_url,
                    "metadata_url": r.image_url.replace("upload.wikimedia.org", "commons.wikimedia.org"),
                    "wit_features": [{
                        "language": r.language,
                        "caption_reference_description": r.caption,
                        "image_url": r.image_url,
                        "mime_type": "image/png",
                        "original_height": r.image.height,
                        "original_width": r.image.width,
                    }],
                    "b64_bytes": base64.b64encode(buf.getvalue()).decode("ascii"),
                    "embedding": ",".join(f"{v:.6g}" for v in np.asarray(r.embedding, dtype=np.float32)),
                }
            f.write(json.dumps(r) + "\n")


class WitDataset(torch.utils.data.Dataset):
    """WIT image-caption pairs: item i is ``(image, caption, i)``; image is a PIL image or ``transform(image)``.

    Args:
        source: a ``json.gz`` path (read with :func:`read_wit_records`) or a list of WitRecord.
        transform: optional callable applied to the PIL image (e.g. torchvision transforms).
        language, on_error, limit: passed to :func:`read_wit_records`.

    Attributes: ``records``, ``stats`` (None for a list source), ``embeddings`` (N, 2048) float32
    tensor of the precomputed ResNet features.
    """

    def __init__(self, source, transform=None, language: str | None = "en", on_error: str = "skip",
                 limit: int | None = None):
        if isinstance(source, (str, Path)):
            self.records, self.stats = read_wit_records(source, language, on_error, limit)
        else:
            self.records, self.stats = list(source), None
            bad = [i for i, r in enumerate(self.records) if not isinstance(r, WitRecord)]
            if bad:
                raise TypeError(f"source must be a json.gz path or a list of WitRecord; item {bad[0]} is a "
                                f"{type(self.records[bad[0]]).__name__}")
        if transform is not None and not callable(transform):
            raise TypeError(f"transform must be callable, got {type(transform).__name__}")
        self.transform = transform

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int):
        r = self.records[i]
        image = r.image if self.transform is None else self.transform(r.image)
        return image, r.caption, i

    @property
    def embeddings(self) -> torch.Tensor:
        return torch.from_numpy(np.stack([r.embedding for r in self.records])) if self.records else torch.zeros(0, EMBEDDING_DIM)
