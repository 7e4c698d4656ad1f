r"""Chapter 05: depth as a third view (course seed 002, problem 4).

Five image towers trained with the same budget (InfoNCE, same epochs, batch, learning rate) on the
same frozen features, and scored by Recall@K on the test split:

* ``rgb``: the baseline, a linear projection of the EfficientNet-Lite0 features of the RGB image;
* ``depth``: the same on the depth map alone (colour-mapped, then EfficientNet-Lite0);
* ``average``: :class:`~mmalign.models.fusion.AverageFusion`, the mean of the two projections;
* ``concat``: :class:`~mmalign.models.fusion.ConcatFusion`, the two features fused *before* one
  projection (the feature-level form of early fusion);
* ``augmented``: RGB alone at test time; during training depth is an augmented view of the image,
  with an extra image-depth InfoNCE term (:func:`~mmalign.models.fusion.depth_augmented_view_loss`).

The depth map is read by the same frozen ImageNet network as the image, through a colour map
(:func:`~mmalign.models.depth.colorize_depth`), so every variant sees features of the same kind and
only the way they are combined changes. An image-level 4-channel CNN
(:class:`~mmalign.models.fusion.EarlyFusionEncoder`) would have to be trained from scratch and is
not comparable at this budget.

Where depth helps is measured by splitting the test captions by what they talk about (their caption
plan: one object, a list, a left/right relation or a front/behind relation) and by a relation-swap
test: does the image score its relation caption above the same caption with the relation inverted?
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn

from ..config import Config, seed_everything
from ..data import captions as cap
from ..data.features import FeatureSplit, depth_features, depth_images, scene_features  # noqa: F401 (re-exported)
from ..data.scenes import SceneWorld
from ..losses import info_nce
from ..models.encoders import encode_cached
from ..models.fusion import AverageFusion, ConcatFusion, depth_augmented_view_loss
from ..models.heads import DualEncoder, ProjectionHead
from ..recipes import evaluate
from ..retrieval import chance_recall, recall_at_k, similarity
from ..train import History, fit

VARIANTS = ("rgb", "depth", "average", "concat", "augmented")
LABELS = {"rgb": "RGB only (baseline)", "depth": "depth only", "average": "average RGB + depth",
          "concat": "fuse before projection", "augmented": "depth as augmented view"}
RGB_DIM = 1280  # EfficientNet-Lite0 features
TEMPERATURE = 0.07


def epochs_for(cfg: Config) -> int:
    """The chapter's training budget, the same for every variant: a third of the profile's epochs
    (linear heads on frozen features reach their best validation rsum within a few epochs)."""
    return max(5, cfg.epochs // 3)


def rgbd_features(split: str, cfg: Config, progress: bool = True) -> FeatureSplit:
    """A scene-world split whose ``image`` features are ``[rgb; depth]`` (N, 2560); captions as usual."""
    fs = scene_features(split, cfg, progress=progress)
    fs.image = torch.cat([fs.image, depth_features(fs.world, progress)], dim=1)
    return fs


class RGBDHead(nn.Module):
    r"""Image tower of one variant on concatenated ``[rgb; depth]`` features (B, 2 * 1280) -> (B, D).

    Both halves are standardised with training-set statistics, then combined as the variant says:
    ``rgb`` / ``augmented``: :math:`W_r \tilde f_{rgb}`; ``depth``: :math:`W_d \tilde f_{d}`;
    ``average``: :class:`AverageFusion`; ``concat``: :class:`ConcatFusion`.
    ``encode_depth`` gives the depth view :math:`W_d \tilde f_d` used by the augmented-view loss.
    """

    def __init__(self, train_features: torch.Tensor, out_dim: int, variant: str, rgb_dim: int = RGB_DIM):
        super().__init__()
        if variant not in VARIANTS:
            raise ValueError(f"unknown variant {variant!r}; choose one of {VARIANTS}")
        if train_features.dim() != 2 or train_features.shape[1] <= rgb_dim:
            raise ValueError(f"expected (N, {rgb_dim} + depth_dim) features, got {tuple(train_features.shape)}")
        self.variant, self.rgb_dim = variant, rgb_dim
        depth_dim = train_features.shape[1] - rgb_dim
        self.standardise = ProjectionHead(train_features.shape[1], 1)  # only its mean/std buffers are used
        self.standardise.fit_standardizer(train_features)
        if variant == "average":
            self.fusion = AverageFusion(rgb_dim, depth_dim, out_dim)
        elif variant == "concat":
            self.fusion = ConcatFusion(rgb_dim, depth_dim, out_dim)
        else:
            self.proj_rgb = nn.Linear(rgb_dim, out_dim) if variant in ("rgb", "augmented") else None
            self.proj_depth = nn.Linear(depth_dim, out_dim) if variant in ("depth", "augmented") else None

    def _split(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = (x - self.standardise.mean) / self.standardise.std
        return x[:, :self.rgb_dim], x[:, self.rgb_dim:]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rgb, depth = self._split(x)
        if self.variant in ("average", "concat"):
            return self.fusion(rgb, depth)
        return self.proj_depth(depth) if self.variant == "depth" else self.proj_rgb(rgb)

    def encode_depth(self, x: torch.Tensor) -> torch.Tensor:
        if self.variant != "augmented":
            raise ValueError("encode_depth is the depth view of the 'augmented' variant only")
        return self.proj_depth(self._split(x)[1])


def make_model(train: FeatureSplit, variant: str, embed_dim: int) -> DualEncoder:
    """The dual encoder of one variant: :class:`RGBDHead` for images, a linear head for captions."""
    return DualEncoder(RGBDHead(train.image, embed_dim, variant), ProjectionHead.from_features(train.text, embed_dim))


def labelled_info_nce(ids: torch.Tensor):
    """``(a, b, temperature) -> InfoNCE`` where rows with equal scene ids are positives (a batch repeats an
    image once per caption)."""
    return lambda a, b, temperature=TEMPERATURE: info_nce(a, b, temperature=temperature, ids=ids)


def train_variant(variant: str, train: FeatureSplit, val: FeatureSplit | None, cfg: Config, weight: float = 1.0,
                  loss_fn=None, epochs: int | None = None, progress: bool = True) -> tuple[DualEncoder, History]:
    """Train one variant with InfoNCE (plus ``weight`` x the image-depth term for ``augmented``).

    ``loss_fn(z_img, z_txt, z_depth, ids)`` replaces the augmented-view loss (the lab passes its own).
    """
    seed_everything(cfg.seed)
    model = make_model(train, variant, cfg.embed_dim)

    def step(m, batch):
        x, t, ids = batch
        zi, zt = m(x, t)
        if variant != "augmented":
            return info_nce(zi, zt, temperature=TEMPERATURE, ids=ids)
        zd = m.image_head.encode_depth(x)
        if loss_fn is not None:
            return loss_fn(zi, zt, zd, ids)
        return depth_augmented_view_loss(zi, zt, zd, temperature=TEMPERATURE, weight=weight,
                                         pair_loss=labelled_info_nce(ids))

    history = fit(model, step, train.pairs(), optimizer=torch.optim.AdamW(model.parameters(), lr=cfg.lr),
                  epochs=epochs or epochs_for(cfg), batch_size=cfg.batch_size, seed=cfg.seed, device=cfg.device,
                  amp=cfg.amp, eval_fn=(lambda m: evaluate(m, val)) if val is not None else None,
                  keep_best="rsum" if val is not None else None, progress=progress, desc=LABELS[variant])
    return model.cpu(), history


def caption_group(plan: dict) -> str:
    """What a caption talks about: ``one object``, ``three objects (list)``, ``left / right`` or
    ``in front / behind``."""
    if plan["kind"] == "single":
        return "one object"
    if plan["kind"] == "list":
        return "three objects (list)"
    return "in front / behind" if plan["relation"] in ("in front of", "behind") else "left / right"


def caption_groups(world: SceneWorld) -> np.ndarray:
    """The group of every caption of ``world`` in ``caption_table`` order: (N*K,) strings."""
    return np.array([caption_group(p) for plans in world.plans for p in plans])


@torch.no_grad()
def recall_by_group(model: DualEncoder, split: FeatureSplit, ks=(1, 5)) -> dict[str, dict[str, float]]:
    """Text -> image Recall@K (percent) of the captions of each group, against all images of the split."""
    model.eval()
    zi, zt = model.encode_images(split.image), model.encode_texts(split.text)
    groups = caption_groups(split.world)
    out = {}
    for g in sorted(set(groups)):
        rows = torch.as_tensor(np.flatnonzero(groups == g))
        rec = recall_at_k(zt[rows], zi, split.text_ids[rows], split.image_ids, ks)
        out[g] = {f"t2i_R@{k}": 100 * v for k, v in rec.items()} | {"captions": len(rows)}
    return out


def relation_swaps(world: SceneWorld) -> tuple[list[str], list[str], np.ndarray, np.ndarray]:
    """Every relation caption of ``world`` and the same caption with its relation inverted.

    Returns (true captions, swapped captions, scene ids, groups) for the relation captions only.
    """
    true, swapped, ids, groups = [], [], [], []
    for i, (plans, graph) in enumerate(zip(world.plans, world.graphs)):
        for j, plan in enumerate(plans):
            if plan["kind"] != "relation":
                continue
            inverse = dict(plan, relation=cap.INVERSE[plan["relation"]])
            true.append(world.captions["en"][i][j])
            swapped.append(cap.realise(inverse, graph, "en"))
            ids.append(i)
            groups.append(caption_group(plan))
    return true, swapped, np.array(ids), np.array(groups)


@torch.no_grad()
def relation_swap_accuracy(model: DualEncoder, split: FeatureSplit, progress: bool = False) -> dict[str, float]:
    """Percent of relation captions whose image scores them above their relation-swapped twin, per group
    (chance 50 %; a tie counts one half)."""
    model.eval()
    true, swapped, ids, groups = relation_swaps(split.world)
    zi = model.encode_images(split.image[torch.as_tensor(ids)])
    s_true = similarity(zi, model.encode_texts(encode_cached("minilm", true, progress=progress))).diagonal()
    s_swap = similarity(zi, model.encode_texts(encode_cached("minilm", swapped, progress=progress))).diagonal()
    win = (s_true > s_swap).double() + 0.5 * (s_true == s_swap).double()
    return {g: 100 * float(win[torch.as_tensor(groups == g)].mean()) for g in sorted(set(groups))}


def chance_table(split: FeatureSplit) -> dict[str, float]:
    k = split.world.captions_per_image
    chance = {f"i2t_R@{r}": 100 * chance_recall(len(split.texts), k, r) for r in (1, 5, 10)}
    chance.update({f"t2i_R@{r}": 100 * chance_recall(len(split.world), 1, r) for r in (1, 5, 10)})
    chance["rsum"] = sum(chance.values())
    return chance


def run(cfg: Config, progress: bool = True) -> dict:
    seed_everything(cfg.seed)
    train, val, test = (rgbd_features(s, cfg, progress) for s in ("train", "val", "test"))
    table, groups, swaps, best_epoch = {"chance": chance_table(test)}, {}, {}, {}
    for variant in VARIANTS:
        model, history = train_variant(variant, train, val, cfg, progress=progress)
        table[LABELS[variant]] = evaluate(model, test)
        groups[LABELS[variant]] = {g: r["t2i_R@1"] for g, r in recall_by_group(model, test).items()}
        swaps[LABELS[variant]] = relation_swap_accuracy(model, test, progress)
        best_epoch[LABELS[variant]] = history.best["epoch"] + 1
    counts = {g: int(n) for g, n in zip(*np.unique(caption_groups(test.world), return_counts=True))}
    return {
        "table": table,
        "t2i_R@1_by_caption_group": groups,
        "relation_swap_accuracy": swaps,
        "best_epoch": best_epoch,
        "epochs": epochs_for(cfg),
        "test_captions_per_group": counts,
        "sizes": {"train": len(train.world), "val": len(val.world), "test": len(test.world),
                  "captions_per_image": test.world.captions_per_image},
    }
