"""Chapter 03: triplet training with random, top-k hardest and semi-hard negatives (seed 002, problem 1).

Every run trains the same projection heads on the same cached frozen features with the same budget
(epochs, batch size, learning rate, margin); only the miner that picks each anchor's negatives
changes. The notebook calls these functions, so its live tables and ``results/03_sampling.json``
compute the same thing.

Typical use::

    model, history = train_triplet(train, val, cfg, "hardest", k=3)
    history.metrics["violating"]      # per step: fraction of mined triplets inside the margin
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..config import Config, seed_everything
from ..data.features import FeatureSplit, scene_features
from ..losses import triplet_loss
from ..miners import (anchor_negative_gaps, hardest_negatives, margin_violation_fraction, random_negatives,
                      semi_hard_negatives)
from ..recipes import evaluate, make_dual_encoder
from ..retrieval import similarity
from ..train import History, fit

MARGIN = 0.2  # on cosine similarities, as in VSE++ (Faghri et al., 2018)
MINERS = ("random", "hardest", "semi-hard")
# The chapter's main comparison: name -> (miner, k). k = 3 is the seed's choice at batch 12.
STRATEGIES = {"random": ("random", 1), "hardest k=1": ("hardest", 1), "hardest k=3": ("hardest", 3),
              "hardest k=10": ("hardest", 10), "semi-hard": ("semi-hard", 1)}
SWEEP_K = (1, 3, 10)


def mine(sim: torch.Tensor, ids: torch.Tensor, miner: str, k: int = 1, margin: float = MARGIN,
         generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Negatives of a paired (B, B) batch from one of :data:`MINERS`; same-scene pairs are never negatives.

    Returns ``(neg_for_images (B, k), neg_for_texts (B, k))`` as the miners of :mod:`mmalign.miners`.
    """
    sim = sim.detach()
    if miner == "random":
        return random_negatives(sim, ids=ids, k=k, generator=generator)
    if miner == "hardest":
        return hardest_negatives(sim, ids=ids, k=k)
    if miner == "semi-hard":
        return semi_hard_negatives(sim, margin=margin, ids=ids, k=k)
    raise ValueError(f"miner must be one of {MINERS}, got {miner!r}")


@torch.no_grad()
def image_cosine(z_img: torch.Tensor, ids: torch.Tensor) -> float:
    r"""Mean cosine between the embeddings of images of *different* scenes in a batch.

    Near 0 for a healthy space; near 1 when the model collapses (every image maps to one point).
    """
    z = F.normalize(z_img.detach().float(), dim=-1)
    other = ids[:, None] != ids[None, :]
    return float((z @ z.T)[other].mean()) if bool(other.any()) else float("nan")


def triplet_step(miner: str, k: int = 1, margin: float = MARGIN, generator: torch.Generator | None = None):
    """A ``fit`` step: mine on the batch's cosine similarities, then the bidirectional triplet loss.

    Logs ``violating`` (fraction of the mined triplets with a non-zero hinge) and ``image_cosine``.
    """

    def step(model, batch):
        img, txt, ids = batch
        z_img, z_txt = model(img, txt)
        sim = similarity(z_img, z_txt)  # (B, B) cosine, rows images, columns captions
        neg_i, neg_t = mine(sim, ids, miner, k, margin, generator)
        violating = margin_violation_fraction(sim.detach(), neg_i, neg_t, margin=margin)
        loss = triplet_loss(sim, neg_i, neg_t, margin=margin)
        return loss, {"violating": float(violating), "image_cosine": image_cosine(z_img, ids)}

    return step


def train_triplet(train: FeatureSplit, val: FeatureSplit | None, cfg: Config, miner: str, k: int = 1, *,
                  batch_size: int | None = None, epochs: int | None = None, lr: float | None = None,
                  hidden_dim: int | None = None, margin: float = MARGIN, seed: int | None = None,
                  progress: bool = True, desc: str | None = None) -> tuple[torch.nn.Module, History]:
    """Train projection heads with the triplet loss and ``miner``; keep the best validation rsum."""
    seed = cfg.seed if seed is None else seed
    seed_everything(seed)
    model = make_dual_encoder(train, cfg.embed_dim, hidden_dim)
    history = fit(model, triplet_step(miner, k, margin, torch.Generator().manual_seed(seed)), train.pairs(),
                  optimizer=torch.optim.AdamW(model.parameters(), lr=lr or cfg.lr),
                  epochs=epochs or cfg.epochs, batch_size=batch_size or cfg.batch_size, seed=seed,
                  device=cfg.device, eval_fn=(lambda m: evaluate(m, val)) if val is not None else None,
                  keep_best="rsum" if val is not None else None, progress=progress,
                  desc=desc or f"{miner} k={k}")
    return model, history


@torch.no_grad()
def probe_gaps(model: torch.nn.Module, split: FeatureSplit, miner: str, k: int = 1, margin: float = MARGIN,
               batch_size: int = 128, seed: int = 0) -> torch.Tensor:
    r"""Gaps :math:`s_{pos} - s_{neg}` of the triplets ``miner`` picks on one fixed batch of ``split``.

    Both directions together, as a 1-d CPU tensor; a gap below ``margin`` is a violating triplet.
    """
    model.eval()
    device = next(model.parameters()).device
    img, txt, ids = split.pairs()
    idx = torch.randperm(len(ids), generator=torch.Generator().manual_seed(seed))[:batch_size]
    z_img, z_txt = model(img[idx].to(device), txt[idx].to(device))
    sim = similarity(z_img, z_txt)
    ids = ids[idx].to(device)
    neg_i, neg_t = mine(sim, ids, miner, k, margin, torch.Generator().manual_seed(seed))
    g_img, g_txt = anchor_negative_gaps(sim, neg_i, neg_t)
    return torch.cat([g_img, g_txt]).cpu()


def budgets(cfg: Config) -> dict:
    """The chapter's budgets, derived from the profile so that the full profile scales up."""
    return {
        "epochs": max(4, cfg.epochs // 3),  # main comparison
        "sweep_epochs": max(2, cfg.epochs // 8),  # batch size x k
        "sweep_batch_sizes": (cfg.batch_size // 4, cfg.batch_size, cfg.batch_size * 4),
        "collapse_epochs": 2, "collapse_lr": 5 * cfg.lr, "collapse_hidden": 512,
    }


def mean_over(values: list, first: bool, steps: int) -> float:
    """Mean of the first (or last) ``steps`` values of a per-step log."""
    part = values[:steps] if first else values[-steps:]
    return float(sum(part) / len(part))


def run(cfg: Config, progress: bool = True) -> dict:
    torch.set_num_threads(1)  # tiny heads: one thread is as fast and never oversubscribes the cores
    seed_everything(cfg.seed)
    train, val, test = (scene_features(s, cfg, progress=progress) for s in ("train", "val", "test"))
    b = budgets(cfg)
    steps_per_epoch = len(train.texts) // cfg.batch_size
    table, curves = {}, {}
    for name, (miner, k) in STRATEGIES.items():
        model, h = train_triplet(train, val, cfg, miner, k, epochs=b["epochs"], progress=progress, desc=name)
        row = evaluate(model, test)
        row["violating, epoch 1 (%)"] = 100 * mean_over(h.metrics["violating"], True, steps_per_epoch)
        row["violating, last epoch (%)"] = 100 * mean_over(h.metrics["violating"], False, steps_per_epoch)
        row["best epoch"] = h.best["epoch"] + 1
        table[name] = row
        curves[name] = h.metrics["violating"][:: max(1, steps_per_epoch // 4)]
    batch_vs_k = {}
    for bs in b["sweep_batch_sizes"]:
        batch_vs_k[f"B={bs}"] = {}
        for k in SWEEP_K:
            model, _ = train_triplet(train, val, cfg, "hardest", k, batch_size=bs, epochs=b["sweep_epochs"],
                                     progress=progress, desc=f"B={bs} k={k}")
            batch_vs_k[f"B={bs}"][f"k={k}"] = evaluate(model, test)["rsum"]
    collapse = {}
    for name in ("random", "hardest k=1", "semi-hard"):
        miner, k = STRATEGIES[name]
        model, h = train_triplet(train, val, cfg, miner, k, epochs=b["collapse_epochs"], lr=b["collapse_lr"],
                                 hidden_dim=b["collapse_hidden"], progress=progress, desc=f"collapse {name}")
        collapse[name] = {"image cosine, last 10 steps": mean_over(h.metrics["image_cosine"], False, 10),
                          "test rsum": evaluate(model, test)["rsum"]}
    return {"table": table, "batch_vs_k": batch_vs_k, "collapse": collapse, "violating_curves": curves,
            "budgets": {k: list(v) if isinstance(v, tuple) else v for k, v in b.items()}, "margin": MARGIN,
            "sizes": {"train": len(train.world), "val": len(val.world), "test": len(test.world),
                      "captions_per_image": test.world.captions_per_image, "batch_size": cfg.batch_size}}
