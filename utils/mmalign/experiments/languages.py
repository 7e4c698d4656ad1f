r"""Chapter 06: many languages, one image (course seed 000, Crabtree's trilingual thesis).

Four views of every (scene, caption plan) datapoint: the image (a linear head on frozen
EfficientNet-Lite0 features) and its parallel captions in English, Hindi and Japanese, each read by
its own small character-level :class:`~mmalign.models.text_scratch.TextEncoder` trained from scratch
(one encoder per language, as in the thesis). The views are aligned with
:func:`~mmalign.losses.multiview.multiview_loss` (InfoNCE per view pair) and scored as in the thesis:

* image retrieval ``E&I``, ``H&I``, ``J&I``: Recall@K between the images and the captions of one
  language, the mean of the two directions (image -> caption, caption -> image);
* cross-lingual retrieval ``H&E``, ``J&E``, ``J&H``: Recall@K between the captions of two languages,
  where the positive of a caption is its parallel caption (same scene, same plan), mean of both directions.

The experiment compares output pooling (mean, MHSA, MHSA with CLS, Transformer; thesis table 3.4),
the full graph against the three anchors (thesis ch. 4), encoder width against recall (parameters),
and a frozen multilingual e5 model as a pretrained alternative to per-language encoders.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import Config, seed_everything
from ..data.features import (E5_SCENES, FeatureSplit, cache_e5_features, e5_available, e5_features,  # noqa: F401
                             e5_subset, scene_features)
from ..losses.multiview import multiview_loss, n_loss_terms
from ..models.encoders import encode_cached
from ..models.heads import ProjectionHead
from ..models.text_scratch import CharTokenizer, TextEncoder
from ..retrieval import recall_at_k
from ..train import History, fit
from .seeds import seeds_for, summarize

LANGS = ("en", "hi", "ja")
LETTER = {"en": "E", "hi": "H", "ja": "J", "image": "I"}
IMAGE_PAIRS = (("en", "image"), ("hi", "image"), ("ja", "image"))  # E&I, H&I, J&I
CROSS_PAIRS = (("hi", "en"), ("ja", "en"), ("ja", "hi"))  # H&E, J&E, J&H
KS = (1, 5, 10)
TEMPERATURE = 0.07
POOLING_ROWS = {"mean": "Avg. Pool", "mhsa": "MH: no CLS", "mhsa_cls": "MHSA (CLS)", "transformer": "Transformer"}
ANCHOR_ROWS = {"image_anchor": "Img. Anch.", "mean_anchor": "Avg. All", "others_anchor": "Avg. Oth.", "full": "Full-Graph"}
MAX_LEN = 96  # characters; longer captions are truncated (the longest English ones are about 90)
FULL_EPOCHS = 8  # full profile: the full graph's validation score levels off within it (stored curves)
SHARING_ROWS = {"shared": "Shared", "shared_tag": "Shared + tag"}  # thesis ch. 5: Basic, Seq Tag
HARD_PAIRS = CROSS_PAIRS


def settings(cfg: Config) -> dict:
    """The chapter's sizes for ``cfg``'s profile: encoder width, epochs, the poolings, widths and sharing
    variants trained, the seeds, and the number of scenes encoded with the (slow, CPU) multilingual e5 model.

    Attention pooling costs about five times mean pooling per step on a CPU. The CI profile (one seed, two
    epochs) trains mean and MHSA pooling, widths 16 and 32 and the tagged shared encoder. The full profile
    spends its budget on seeds and epochs instead: three seeds of :data:`FULL_EPOCHS` epochs for the
    average-pooling rows (full graph, the three anchors, the tagged shared encoder); the attention poolings
    and other widths are not re-run there (``pooling_seeds`` would give the seeds that train them).
    """
    e5_train, e5_test = E5_SCENES[cfg.profile]
    if cfg.profile == "ci":
        return {"width": 32, "epochs": 2, "poolings": ("mean", "mhsa"), "widths": (16, 32),
                "sharing": ("shared_tag",), "seeds": 1, "pooling_seeds": 1,
                "e5_train": e5_train, "e5_test": e5_test}
    return {"width": 32, "epochs": FULL_EPOCHS, "poolings": ("mean",), "widths": (32,),
            "sharing": ("shared_tag",), "seeds": 3, "pooling_seeds": 0,
            "e5_train": e5_train, "e5_test": e5_test}


def pair_name(a: str, b: str) -> str:
    return f"{LETTER[a]}&{LETTER[b]}"


def columns(kind: str) -> list[str]:
    """Column names in the thesis's layout: all pairs at R1, then at R5, then at R10."""
    pairs = IMAGE_PAIRS if kind == "image" else CROSS_PAIRS
    return [f"{pair_name(a, b)}.R{k}" for k in KS for a, b in pairs]


# ----------------------------------------------------------------------------- data
@dataclass
class MultilingualSplit:
    """One split: image features (N, 1280), and per language the token ids (N*K, L) and masks of its
    captions in ``caption_table`` order (parallel across languages); ``text_ids`` (N*K,) scene ids."""

    features: FeatureSplit  # English MiniLM features are unused; it carries the world and image features
    tokens: dict  # lang -> (ids (N*K, L) long, mask (N*K, L) bool)
    text_ids: torch.Tensor
    foils: dict | None = None  # lang -> (ids (N, L'), mask): per scene, its first caption with one word swapped

    @property
    def image(self) -> torch.Tensor:
        return self.features.image

    @property
    def world(self):
        return self.features.world

    def training_tensors(self) -> tuple[torch.Tensor, ...]:
        """One row per datapoint (scene, caption plan): image features, then ids and mask per language,
        then the scene id; the tuple ``fit`` batches."""
        out = [self.image[self.text_ids]]
        for lang in LANGS:
            out.extend(self.tokens[lang])
        return (*out, self.text_ids)


def build_tokenizers(world) -> dict[str, CharTokenizer]:
    """One character tokenizer per language, from the training captions of that language."""
    return {lang: CharTokenizer.from_corpus(world.caption_table(lang)[0]) for lang in LANGS}


def multilingual_split(split: str, cfg: Config, tokenizers: dict | None = None,
                       progress: bool = True) -> tuple[MultilingualSplit, dict]:
    """A split with tokenised captions in the three languages (tokenised once, kept in memory).

    ``tokenizers`` default to ones built from this split (pass the training split's for val/test).
    """
    fs = scene_features(split, cfg, progress=progress)
    tokenizers = tokenizers or build_tokenizers(fs.world)
    tokens = {}
    for lang in LANGS:
        texts, _ = fs.world.caption_table(lang)
        longest = max(len(t) for t in texts)
        tokens[lang] = tokenizers[lang].encode(texts, max_len=min(MAX_LEN, longest))
    foils = {}
    for lang in LANGS:
        texts = fs.world.hard_negatives[lang]
        foils[lang] = tokenizers[lang].encode(texts, max_len=min(MAX_LEN, max(len(t) for t in texts)))
    return MultilingualSplit(fs, tokens, fs.text_ids, foils), tokenizers


# ----------------------------------------------------------------------------- model
class MultilingualAligner(nn.Module):
    """An image head and from-scratch text encoders, all into one D-dim space.

    ``sharing="none"`` (the thesis' baseline): one text tower per language, :class:`TextEncoder` (width W,
    the chosen pooling) then a linear map W -> D. ``"shared"`` (thesis ch. 5, "Basic"): ONE tower reads
    all three languages; its character table is the three vocabularies side by side (the scripts share no
    character). ``"shared_tag"`` (thesis ch. 5, "Seq Tag", after Johnson et al., 2017): the same, with a
    learned language token prepended to every caption.
    Shapes: ``encode_image((B, 1280)) -> (B, D)``; ``encode_text(lang, ids (B, L), mask) -> (B, D)``.
    """

    SHARING = ("none", "shared", "shared_tag")

    def __init__(self, train_image: torch.Tensor, tokenizers: dict, embed_dim: int, width: int = 64,
                 pooling: str = "mean", heads: int = 4, sharing: str = "none"):
        super().__init__()
        if sharing not in self.SHARING:
            raise ValueError(f"sharing must be one of {self.SHARING}, got {sharing!r}")
        self.sharing = sharing
        self.image_head = ProjectionHead.from_features(train_image, embed_dim)
        if sharing == "none":
            self.text = nn.ModuleDict({
                lang: nn.Sequential(TextEncoder(len(tokenizers[lang]), width, pooling=pooling, layers=1, heads=heads,
                                                max_len=MAX_LEN), nn.Linear(width, embed_dim))
                for lang in LANGS})
            return
        sizes = [len(tokenizers[lang]) for lang in LANGS]
        self.offsets = dict(zip(LANGS, (sum(sizes[:i]) for i in range(len(LANGS)))))  # lang's id 0 stays padding
        self.tags = {lang: sum(sizes) + i for i, lang in enumerate(LANGS)}
        vocab = sum(sizes) + (len(LANGS) if sharing == "shared_tag" else 0)
        self.text = nn.ModuleDict({"shared": nn.Sequential(
            TextEncoder(vocab, width, pooling=pooling, layers=1, heads=heads, max_len=MAX_LEN + 1),
            nn.Linear(width, embed_dim))})

    def encode_image(self, x: torch.Tensor) -> torch.Tensor:
        return self.image_head(x)

    def encode_text(self, lang: str, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if self.sharing == "none":
            enc, proj = self.text[lang]
            return proj(enc(ids, mask))
        enc, proj = self.text["shared"]
        ids = torch.where(mask, ids + self.offsets[lang], torch.zeros_like(ids))
        if self.sharing == "shared_tag":
            ids = torch.cat([torch.full_like(ids[:, :1], self.tags[lang]), ids], dim=1)
            mask = torch.cat([torch.ones_like(mask[:, :1]), mask], dim=1)
        return proj(enc(ids, mask))

    def forward(self, image, *tokens) -> list[torch.Tensor]:
        """``forward(image, en_ids, en_mask, hi_ids, hi_mask, ja_ids, ja_mask)`` -> the four views."""
        views = [self.encode_image(image)]
        for n, lang in enumerate(LANGS):
            views.append(self.encode_text(lang, tokens[2 * n], tokens[2 * n + 1]))
        return views

    def n_parameters(self) -> dict[str, int]:
        """Trainable parameters: the image head and the text tower(s)."""
        count = lambda m: sum(p.numel() for p in m.parameters() if p.requires_grad)  # noqa: E731
        return {"image head": count(self.image_head), "text towers": count(self.text)}


# ----------------------------------------------------------------------------- training and scoring
def train_multilingual(train: MultilingualSplit, val: MultilingualSplit | None, tokenizers: dict, cfg: Config,
                       mode: str = "full", pooling: str = "mean", width: int | None = None,
                       epochs: int | None = None, loss_fn=None, progress: bool = True,
                       desc: str | None = None, sharing: str = "none") -> tuple[MultilingualAligner, History]:
    """Train the four towers with ``multiview_loss(mode)`` (InfoNCE, scene ids as positives).

    ``loss_fn(views, ids) -> loss`` replaces the multi-view loss (the lab passes its own anchor loss).
    Keeps the weights with the best validation score (mean image + cross-lingual R@1/5/10). ``sharing``:
    one encoder per language (``"none"``) or one shared encoder (see :class:`MultilingualAligner`).
    """
    s = settings(cfg)
    seed_everything(cfg.seed)
    model = MultilingualAligner(train.image, tokenizers, cfg.embed_dim, width or s["width"], pooling,
                                sharing=sharing)

    def step(m, batch):
        *inputs, ids = batch
        views = m(*inputs)
        if loss_fn is not None:
            return loss_fn(views, ids)
        loss, _ = multiview_loss(views, mode=mode, temperature=TEMPERATURE, ids=ids)
        return loss

    eval_fn = (lambda m: {"score": score(evaluate_multilingual(m, val))}) if val is not None else None
    history = fit(model, step, train.training_tensors(), optimizer=torch.optim.AdamW(model.parameters(), lr=cfg.lr),
                  epochs=epochs or s["epochs"], batch_size=cfg.batch_size, seed=cfg.seed, device=cfg.device,
                  amp=cfg.amp, eval_fn=eval_fn, keep_best="score" if val is not None else None, progress=progress,
                  desc=desc or f"{mode}/{pooling}")
    return model.cpu(), history


def pair_recall(a: torch.Tensor, b: torch.Tensor, a_ids, b_ids, ks=KS) -> dict[int, float]:
    """Recall@K (percent, for the chapter's tables) between two sets of embeddings, mean of a -> b and b -> a."""
    ab = recall_at_k(a, b, a_ids, b_ids, ks)
    ba = recall_at_k(b, a, b_ids, a_ids, ks)
    return {k: 50 * (ab[k] + ba[k]) for k in ks}


@torch.no_grad()
def embed_split(model: MultilingualAligner, split: MultilingualSplit) -> dict[str, torch.Tensor]:
    model.eval()
    out = {"image": model.encode_image(split.image)}
    for lang in LANGS:
        out[lang] = model.encode_text(lang, *split.tokens[lang])
    return out


def retrieval_tables(emb: dict[str, torch.Tensor], text_ids: torch.Tensor) -> dict[str, float]:
    """The thesis's two tables in one dict: image retrieval (E&I, H&I, J&I) and cross-lingual retrieval
    (H&E, J&E, J&H) at R1/R5/R10, each the mean of both directions, in percent.

    ``emb`` maps ``"image"`` (N, D) and each language (N*K, D) to embeddings; ``text_ids`` (N*K,) scene ids.
    Cross-lingual positives are parallel captions (same row)."""
    image_ids = torch.arange(emb["image"].shape[0])
    rows = torch.arange(len(text_ids))
    out = {}
    for a, b in IMAGE_PAIRS:
        for k, v in pair_recall(emb[a], emb["image"], text_ids, image_ids).items():
            out[f"{pair_name(a, b)}.R{k}"] = v
    for a, b in CROSS_PAIRS:
        for k, v in pair_recall(emb[a], emb[b], rows, rows).items():
            out[f"{pair_name(a, b)}.R{k}"] = v
    return {c: out[c] for c in columns("image") + columns("cross")}


def evaluate_multilingual(model: MultilingualAligner, split: MultilingualSplit) -> dict[str, float]:
    return retrieval_tables(embed_split(model, split), split.text_ids)


def first_captions(text_ids: torch.Tensor) -> torch.Tensor:
    """(N,) row of each scene's first caption (the plan its foil was made from) in ``text_ids`` order."""
    rows = torch.arange(len(text_ids))
    new = torch.ones(len(text_ids), dtype=torch.bool)
    new[1:] = text_ids[1:] != text_ids[:-1]
    return rows[new]


def foil_tables(emb: dict[str, torch.Tensor], foils: dict[str, torch.Tensor], text_ids: torch.Tensor) -> dict:
    r"""The harder cross-lingual test: translations against one-word foils.

    For every scene, its first caption in language a is the query; in language b the gallery holds all
    captions of the split plus every scene's *foil*: the same caption plan with one colour, shape, size
    or the relation swapped (``SceneWorld.hard_negatives``), a sentence one word away from the true
    translation. Per pair (mean of both directions, percent):

    * ``{pair}.foil2AFC``: how often the true translation scores above its own foil (chance 50%);
    * ``{pair}.foilR1``: Recall@1 of the translation in the gallery with the foils added.

    ``emb``: language -> (N*K, D) caption embeddings; ``foils``: language -> (N, D) foil embeddings.
    """
    first = first_captions(text_ids)
    n_rows = len(text_ids)
    gallery_ids = torch.cat([torch.arange(n_rows), n_rows + torch.arange(len(first))])  # foils: never positive
    out = {}
    for a, b in HARD_PAIRS:
        afc, r1 = [], []
        for q_lang, g_lang in ((a, b), (b, a)):
            q = F.normalize(emb[q_lang][first], dim=-1)
            true = F.normalize(emb[g_lang][first], dim=-1)
            foil = F.normalize(foils[g_lang], dim=-1)
            afc.append(100 * float(((q * true).sum(-1) > (q * foil).sum(-1)).double().mean()))
            gallery = torch.cat([emb[g_lang], foils[g_lang]])
            r1.append(100 * recall_at_k(q, gallery, first, gallery_ids, (1,))[1])
        out[f"{pair_name(a, b)}.foil2AFC"] = sum(afc) / 2
        out[f"{pair_name(a, b)}.foilR1"] = sum(r1) / 2
    return out


@torch.no_grad()
def evaluate_foils(model: MultilingualAligner, split: MultilingualSplit) -> dict[str, float]:
    """:func:`foil_tables` of a trained model on a split (its ``foils`` tokens)."""
    model.eval()
    emb = {lang: model.encode_text(lang, *split.tokens[lang]) for lang in LANGS}
    foils = {lang: model.encode_text(lang, *split.foils[lang]) for lang in LANGS}
    return foil_tables(emb, foils, split.text_ids)


def score(table: dict[str, float]) -> float:
    """One number to select checkpoints and draw plots: the mean of all image and cross-lingual recalls."""
    return float(np.mean([table[c] for c in columns("image") + columns("cross")]))


def summary(table: dict[str, float]) -> dict[str, float]:
    """Mean image-retrieval and mean cross-lingual recall (over pairs and K), and, where ``table`` holds
    the foil test (:func:`foil_tables`), its mean 2AFC accuracy and Recall@1 over the three pairs."""
    out = {"image R (mean)": float(np.mean([table[c] for c in columns("image")])),
           "cross-lingual R (mean)": float(np.mean([table[c] for c in columns("cross")]))}
    if all(f"{pair_name(a, b)}.foil{m}" in table for a, b in HARD_PAIRS for m in ("2AFC", "R1")):
        out["foil 2AFC (mean)"] = float(np.mean([table[f"{pair_name(a, b)}.foil2AFC"] for a, b in HARD_PAIRS]))
        out["foil R@1 (mean)"] = float(np.mean([table[f"{pair_name(a, b)}.foilR1"] for a, b in HARD_PAIRS]))
    return out


def chance_tables(split: MultilingualSplit) -> dict[str, float]:
    """Chance level of every column: random rankings (one image per caption, K captions per image;
    one parallel caption per caption)."""
    from ..retrieval import chance_recall

    n, m = len(split.image), len(split.text_ids)
    k_cap = m // n
    out = {}
    for k in KS:
        img = 50 * (chance_recall(n, 1, k) + chance_recall(m, k_cap, k))
        cross = 100 * chance_recall(m, 1, k)
        out.update({f"{pair_name(a, b)}.R{k}": img for a, b in IMAGE_PAIRS})
        out.update({f"{pair_name(a, b)}.R{k}": cross for a, b in CROSS_PAIRS})
    return {c: out[c] for c in columns("image") + columns("cross")}


# ----------------------------------------------------------------------------- frozen multilingual e5
def run_e5(train: MultilingualSplit, test: MultilingualSplit, cfg: Config, progress: bool = True) -> dict:
    """Frozen e5 as a pretrained alternative: zero-shot cross-lingual retrieval of parallel captions, and
    image retrieval after training an image head and ONE shared text head on English pairs only.

    Uses the first caption of a subset of scenes (e5 on a CPU encodes a few dozen captions a second);
    the heads train for a fixed 30 epochs (no validation subset, to encode fewer captions).
    Returns ``{"table": thesis-layout dict on the test subset, "seconds": encoding + training time}``.
    """
    s = settings(cfg)
    start = time.perf_counter()
    tr_texts, tr_ids = e5_subset(train.world, s["e5_train"])
    te_texts, te_ids = e5_subset(test.world, s["e5_test"])
    tr_en = e5_features(tr_texts["en"], progress)
    te = {lang: e5_features(te_texts[lang], progress) for lang in LANGS}
    encode_seconds = time.perf_counter() - start

    from ..recipes import make_dual_encoder, train_dual_encoder
    seed_everything(cfg.seed)
    tr_split = FeatureSplit(train.world, train.image[tr_ids], tr_en, tr_texts["en"], tr_ids, tr_ids)
    model, _ = train_dual_encoder(tr_split, None, cfg, model=make_dual_encoder(tr_split, cfg.embed_dim),
                                  epochs=30, batch_size=64, progress=progress, desc="e5: linear heads")
    with torch.no_grad():
        model.eval()
        emb = {"image": model.encode_images(test.image[te_ids])}
        emb.update({lang: model.encode_texts(te[lang]) for lang in LANGS})
    table = retrieval_tables(emb, te_ids)
    # Zero-shot cross-lingual: the raw e5 space, no training at all.
    rows = torch.arange(len(te_ids))
    raw = {}
    for a, b in CROSS_PAIRS:
        for k, v in pair_recall(te[a], te[b], rows, rows).items():
            raw[f"{pair_name(a, b)}.R{k}"] = v
    return {"table": table, "zero_shot_cross": {c: raw[c] for c in columns("cross")},
            "n_train": len(tr_ids), "n_test": len(te_ids), "encode_seconds": encode_seconds,
            "seconds": time.perf_counter() - start}


# ----------------------------------------------------------------------------- the reference experiment
def experiment_rows(cfg: Config, attention: bool = True) -> dict[str, dict]:
    """name -> keyword arguments of :func:`train_multilingual`: the rows one seed trains (the full graph
    with average pooling once; it is also the "Full-Graph" and the default-width row). ``attention=False``
    leaves out the attention poolings (the full profile trains them on its first seed only)."""
    s = settings(cfg)
    rows = {"Avg. Pool": {"mode": "full", "pooling": "mean"}}
    if attention:
        rows.update({POOLING_ROWS[p]: {"mode": "full", "pooling": p} for p in s["poolings"] if p != "mean"})
    rows.update({ANCHOR_ROWS[m]: {"mode": m, "pooling": "mean"} for m in ("image_anchor", "mean_anchor", "others_anchor")})
    rows.update({f"width {w}": {"mode": "full", "pooling": "mean", "width": w} for w in s["widths"] if w != s["width"]})
    rows.update({SHARING_ROWS[k]: {"mode": "full", "pooling": "mean", "sharing": k} for k in s["sharing"]})
    return rows


def train_rows(train, val, test, tokenizers, cfg: Config, rows: dict, progress: bool = True) -> dict[str, dict]:
    """Train every row on ``cfg``'s seed: ``{name: {"recall": thesis columns + foil test, "text params",
    "best epoch", "seconds"}}``, with the aliases "Full-Graph" and "width W" of the average-pooling row."""
    s = settings(cfg)
    out = {}
    for name, kw in rows.items():
        model, history = train_multilingual(train, val, tokenizers, cfg, progress=progress, desc=name, **kw)
        out[name] = {"recall": evaluate_multilingual(model, test) | evaluate_foils(model, test),
                     "text params": model.n_parameters()["text towers"],
                     "best epoch": history.best["epoch"] + 1, "seconds": round(history.seconds, 1),
                     "val curve": [float(v) for v in history.eval_series("score")[1]]}
    out["Full-Graph"] = out[f"width {s['width']}"] = out["Avg. Pool"]
    return out


def summary_row(result: dict) -> dict:
    return summary(result["recall"]) | {"text params": result["text params"], "best epoch": result["best epoch"]}


def run(cfg: Config, progress: bool = True) -> dict:
    """The reference experiment: every row of :func:`experiment_rows` on each seed (CI one, full three;
    the attention poolings on the first ``pooling_seeds`` only), the foil test, and e5.

    ``table`` holds per row the mean over seeds of its summary (``std`` and ``per_seed`` beside it; rows
    trained on one seed are listed in ``single_seed_rows`` and have no ``std``); ``pooling``, ``anchors``,
    ``widths`` and ``sharing`` hold the mean thesis-layout columns, ``columns_std`` their spread.
    """
    s = settings(cfg)
    seed_everything(cfg.seed)
    train, tok = multilingual_split("train", cfg, progress=progress)
    val, _ = multilingual_split("val", cfg, tok, progress=progress)
    test, _ = multilingual_split("test", cfg, tok, progress=progress)

    seeds = seeds_for(cfg, s["seeds"])
    per_seed = {}
    for i, seed in enumerate(seeds):
        cfg_s = cfg.replace(seed=seed)
        per_seed[seed] = train_rows(train, val, test, tok, cfg_s,
                                    experiment_rows(cfg_s, attention=i < s["pooling_seeds"]), progress)
    first = per_seed[seeds[0]]
    common = [n for n in first if all(n in per_seed[sd] for sd in seeds)]
    single = [n for n in first if n not in common]
    table = summarize({sd: {n: summary_row(per_seed[sd][n]) for n in common} for sd in seeds})
    cols = summarize({sd: {n: per_seed[sd][n]["recall"] for n in common} for sd in seeds})
    recall = {**cols["table"], **{n: first[n]["recall"] for n in single}}

    pooling_names = [POOLING_ROWS[p] for p in s["poolings"]]
    anchor_names = [ANCHOR_ROWS[m] for m in ("image_anchor", "mean_anchor", "others_anchor")] + ["Full-Graph"]
    width_names = [f"width {w}" for w in s["widths"]]
    sharing_names = ["Avg. Pool"] + [SHARING_ROWS[k] for k in s["sharing"]]
    out = {
        "seeds": seeds, "single_seed_rows": single,
        "table": {**table["table"], **{n: summary_row(first[n]) for n in single}},
        "std": table["std"], "per_seed": table["per_seed"],
        "pooling": {n: recall[n] for n in pooling_names},
        "anchors": {n: recall[n] for n in anchor_names},
        "widths": {n: recall[n] for n in width_names},
        "sharing": {n: recall[n] for n in sharing_names},
        "columns_std": cols["std"],
        "n_terms": {"Img. Anch.": n_loss_terms(4, "image_anchor"), "Avg. All": n_loss_terms(4, "mean_anchor"),
                    "Avg. Oth.": n_loss_terms(4, "others_anchor"), "Full-Graph": n_loss_terms(4, "full")},
        "text_parameters": {n: r["text params"] for n, r in first.items()},
        "best_epoch": {n: [per_seed[sd][n]["best epoch"] for sd in seeds if n in per_seed[sd]] for n in first},
        "val_curves": {n: [per_seed[sd][n]["val curve"] for sd in seeds if n in per_seed[sd]] for n in first},
        "train_seconds": {n: r["seconds"] for n, r in first.items()},
        "chance": chance_tables(test) | {f"{pair_name(a, b)}.foil2AFC": 50.0 for a, b in HARD_PAIRS},
        "settings": {k: list(v) if isinstance(v, tuple) else v for k, v in s.items()},
        "sizes": {"train": len(train.image), "val": len(val.image), "test": len(test.image),
                  "captions_per_image": test.world.captions_per_image},
    }
    if e5_available():
        out["e5"] = run_e5(train, test, cfg, progress)
    return out
