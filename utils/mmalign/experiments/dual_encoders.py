"""Chapter 01: a dual encoder trained with the cosine embedding loss on +1/-1 pairs, then with InfoNCE;
LAMB against Adam at a small and a large batch size.

Typical use::

    loss = cosine_pair_loss(margin=0.3, negatives_per_positive=8)   # seed 001's loss, pairs from the batch
    runs = cosine_grid(train, val, test, cfg)                       # (margin, k) -> Run
    runs = optimizer_runs(train, val, test, cfg)                    # "Adam, B=128" ... -> Run

The notebook and ``python -m mmalign.experiments 01`` call the same functions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..config import Config, seed_everything
from ..data.features import FeatureSplit, scene_features
from ..losses import cosine_embedding_loss, make_signed_pairs
from ..models.heads import DualEncoder
from ..recipes import PairLoss, evaluate, info_nce_pair_loss, train_dual_encoder
from ..train import History

COSINE_GRID = ((0.0, 1), (0.3, 1), (0.0, 8), (0.3, 8))  # (margin, negatives per positive)
CHAPTER_EPOCHS = {"ci": 5, "full": 8, "gpu": 12}  # the budget of every run, per profile
LARGE_BATCH_FACTOR = 8  # the large batch is 8x the profile's batch size
LAMB_LR = 0.02  # LAMB's lr is a relative step per layer (||dw|| / ||w||), not Adam's per-coordinate step
COLUMNS = ("i2t_R@1", "i2t_R@5", "i2t_R@10", "t2i_R@1", "t2i_R@5", "t2i_R@10", "rsum")


def chapter_epochs(cfg: Config) -> int:
    """Epochs of every run of the chapter (CI 5, full 8); never more than the profile's epochs."""
    return min(cfg.epochs, CHAPTER_EPOCHS.get(cfg.profile, 5))


def cosine_pair_loss(margin: float = 0.0, negatives_per_positive: int = 1, seed: int = 0) -> PairLoss:
    """``(z_img, z_txt, scene_ids) -> loss``: seed 001's cosine embedding loss on pairs drawn from the batch.

    Every (image i, caption i) of the batch is a +1 pair; for each i, ``negatives_per_positive``
    captions of *other* scenes in the batch are drawn as -1 pairs (:func:`~mmalign.losses.make_signed_pairs`)
    with a generator seeded once, so a run is reproducible.
    """
    gen = torch.Generator().manual_seed(seed)

    def loss(zi: torch.Tensor, zt: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        ia, ib, target = make_signed_pairs(len(ids), negatives_per_positive=negatives_per_positive, generator=gen, ids=ids)
        return cosine_embedding_loss(zi[ia], zt[ib], target, margin=margin)
    return loss


@dataclass
class Run:
    """A trained dual encoder, its history and its test-set retrieval report."""

    model: DualEncoder
    history: History
    test: dict

    @property
    def best_epoch(self) -> int:
        return self.history.best["epoch"] + 1

    def row(self) -> dict:
        return {**{k: self.test[k] for k in COLUMNS}, "Ep": self.best_epoch}


def train_run(train: FeatureSplit, val: FeatureSplit, test: FeatureSplit, cfg: Config,
              pair_loss: PairLoss | None = None, progress: bool = True, **kwargs) -> Run:
    """Seeded fresh heads trained with ``train_dual_encoder`` (kwargs: optimizer, lr, batch_size, ...)."""
    seed_everything(cfg.seed)
    kwargs.setdefault("epochs", chapter_epochs(cfg))
    model, history = train_dual_encoder(train, val, cfg, pair_loss, progress=progress, **kwargs)
    return Run(model, history, evaluate(model, test))


def cosine_grid(train, val, test, cfg: Config, grid=COSINE_GRID, progress: bool = True) -> dict:
    """``{(margin, k): Run}`` for the cosine embedding loss over a small grid."""
    return {(m, k): train_run(train, val, test, cfg, cosine_pair_loss(m, k, cfg.seed), progress,
                              desc=f"cosine m={m} k={k}")
            for m, k in grid}


def optimizer_settings(cfg: Config) -> dict[str, dict]:
    """Adam and LAMB at the profile's batch size and at 8x it, learning rates scaled by sqrt(8).

    The square-root rule is You et al.'s (2020) for LAMB; we apply it to both optimizers so that the
    only difference between the pairs is the optimizer.
    """
    small, large = cfg.batch_size, cfg.batch_size * LARGE_BATCH_FACTOR
    scale = math.sqrt(LARGE_BATCH_FACTOR)
    return {
        f"Adam, B={small}": dict(optimizer="adam", batch_size=small, lr=cfg.lr),
        f"LAMB, B={small}": dict(optimizer="lamb", batch_size=small, lr=LAMB_LR),
        f"Adam, B={large}": dict(optimizer="adam", batch_size=large, lr=cfg.lr * scale),
        f"LAMB, B={large}": dict(optimizer="lamb", batch_size=large, lr=LAMB_LR * scale),
    }


def optimizer_runs(train, val, test, cfg: Config, progress: bool = True) -> dict[str, Run]:
    """InfoNCE with Adam and LAMB at a small and a large batch: ``{name: Run}`` (same epochs for all)."""
    return {name: train_run(train, val, test, cfg, info_nce_pair_loss(), progress, desc=name, **setting)
            for name, setting in optimizer_settings(cfg).items()}


@torch.no_grad()
def pair_cosines(model: DualEncoder, split: FeatureSplit) -> tuple[torch.Tensor, torch.Tensor]:
    """Cosines of all true (image, caption) pairs and of all wrong ones on a split: two 1-d tensors."""
    model.eval()
    zi = F.normalize(model.encode_images(split.image), dim=-1)
    zt = F.normalize(model.encode_texts(split.text), dim=-1)
    sim = zi @ zt.T
    pos = split.image_ids[:, None] == split.text_ids[None, :]
    return sim[pos], sim[~pos]


def chapter_table(cos_runs: dict, opt_runs: dict) -> dict[str, dict]:
    """The chapter's table: one row per run (test Recall@K in percent, rsum, 1-based best epoch "Ep")."""
    table = {f"Cosine, m={m}, {k} neg.": r.row() for (m, k), r in cos_runs.items()}
    table.update({f"InfoNCE, {name}": r.row() for name, r in opt_runs.items()})
    return table


def cosine_stats(cos_runs: dict, split: FeatureSplit) -> dict[str, dict]:
    """Mean cosine of true pairs, mean and 90th percentile of wrong pairs, per cosine-loss run."""
    stats = {}
    for (m, k), r in cos_runs.items():
        pos, neg = pair_cosines(r.model, split)
        stats[f"m={m}, {k} neg."] = {"positive_mean": float(pos.mean()), "negative_mean": float(neg.mean()),
                                     "negative_q90": float(neg.quantile(0.9))}
    return stats


def run(cfg: Config, progress: bool = True) -> dict:
    """The chapter's reference experiment: the cosine-loss grid and the optimizer comparison."""
    seed_everything(cfg.seed)
    train, val, test = (scene_features(s, cfg, progress=progress) for s in ("train", "val", "test"))
    cos_runs = cosine_grid(train, val, test, cfg, progress=progress)
    opt_runs = optimizer_runs(train, val, test, cfg, progress=progress)
    return {
        "table": chapter_table(cos_runs, opt_runs),
        "curves": {name: {"epoch": [e["epoch"] + 1 for e in r.history.evals],
                          "rsum": [e["rsum"] for e in r.history.evals]} for name, r in opt_runs.items()},
        "cosines": cosine_stats(cos_runs, test),
        "settings": {"epochs": chapter_epochs(cfg), "lamb_lr": LAMB_LR, "adam_lr": cfg.lr,
                     "large_batch_factor": LARGE_BATCH_FACTOR, "temperature": 0.07},
        "sizes": {"train": len(train.world), "val": len(val.world), "test": len(test.world),
                  "captions_per_image": test.world.captions_per_image},
    }
