"""Disk cache entries that record what they were computed from, are checked on load, and are
written atomically.

An entry is a torch file holding ``{"meta": {...}, "payload": ...}``. ``meta`` names everything the
payload depends on (model, preprocessing, a hash of the data, shapes, a format version). On load the
stored meta must equal the expected meta; a mismatch, a truncated or unreadable file, or a payload
whose shape disagrees is never returned: :func:`load_entry` says why and returns ``None`` so the
caller recomputes (and overwrites the bad entry).

Writes go to a temporary file in the same folder, then ``os.replace`` renames it over the entry, so
an interrupted run never leaves a half-written entry under the real name. Typical use::

    meta = {"kind": "text-features", "model": "minilm|wordpiece64/mean/l2", "data": fingerprint(texts)}
    feats = load_entry(path, meta)
    if feats is None:
        feats = compute()
        save_entry(path, feats, meta)
"""

from __future__ import annotations

import json
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any, Callable

import torch

CACHE_FORMAT = 2


class CacheWarning(UserWarning):
    """A cache entry was corrupt or computed from other inputs; it is recomputed."""


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp_path)`` then rename the temporary file to ``path`` (atomic on one filesystem)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes the file private; an entry is as readable as any file
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def atomic_write_json(path: str | Path, obj: Any) -> Path:
    """Write ``obj`` as JSON to ``path`` atomically."""
    return atomic_write_text(path, json.dumps(obj, ensure_ascii=False, indent=1))


def save_entry(path: str | Path, payload: Any, meta: dict) -> Path:
    """Save ``payload`` (tensors, lists, dicts of them) with its ``meta`` atomically."""
    meta = dict(meta, cache_format=CACHE_FORMAT)
    return atomic_write(path, lambda tmp: torch.save({"meta": meta, "payload": payload}, tmp))


def load_entry(path: str | Path, meta: dict, check: Callable[[Any], str | None] | None = None) -> Any | None:
    """The payload stored at ``path`` if it exists, is readable and was computed from ``meta``; else None.

    ``check(payload)`` may return a reason to reject the payload (e.g. a wrong number of rows).
    Rejected entries are reported with a :class:`CacheWarning` naming the path and the reason.
    """
    path = Path(path)
    if not path.exists():
        return None
    try:
        entry = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated, not a torch file, unpickling refused: recompute
        return _reject(path, f"unreadable ({type(err).__name__}: {str(err)[:120]})")
    if not isinstance(entry, dict) or set(entry) != {"meta", "payload"}:
        return _reject(path, "not a cache entry of this version of mmalign")
    want = dict(meta, cache_format=CACHE_FORMAT)
    if entry["meta"] != want:
        diff = sorted(k for k in set(want) | set(entry["meta"]) if entry["meta"].get(k) != want.get(k))
        return _reject(path, f"computed from other inputs (differs in {', '.join(diff)})")
    reason = check(entry["payload"]) if check is not None else None
    if reason:
        return _reject(path, reason)
    return entry["payload"]


def _reject(path: Path, reason: str) -> None:
    warnings.warn(f"cache entry {path} is {reason}; recomputing it", CacheWarning, stacklevel=3)
    return None


def rows_check(n: int, width: int | None = None) -> Callable[[Any], str | None]:
    """A ``check`` for :func:`load_entry`: the payload is a finite float tensor with ``n`` rows."""

    def check(payload) -> str | None:
        if not isinstance(payload, torch.Tensor):
            return f"a {type(payload).__name__}, not a tensor"
        if payload.shape[0] != n or (width is not None and payload.shape[-1] != width):
            return f"of shape {tuple(payload.shape)}, expected {n} rows" + (f" of width {width}" if width else "")
        if payload.dtype.is_floating_point and not bool(torch.isfinite(payload).all()):
            return "holding NaN or inf values"
        return None

    return check
