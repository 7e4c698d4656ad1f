"""Chapter 02: the loss zoo. Eight losses, one budget: same frozen features, same linear heads, same
optimizer, batch size and number of epochs; only ``pair_loss`` changes.

    losses = zoo_losses(cfg)                       # name -> factory of a fresh (stateful) pair loss
    runs = train_zoo(train, val, test, cfg, losses)  # name -> Run(history, test report)
    table = zoo_table(runs)                          # seed-000 layout: R@1/5/10 both ways + Ep

Each factory returns a new ``pair_loss(z_img, z_txt, scene_ids)``; the triplet and cosine losses
draw their negatives from a seeded generator and the scheduled margin counts its own steps, so a
factory call is a fresh, reproducible run.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from ..config import Config, seed_everything
from ..data.features import FeatureSplit, scene_features
from ..losses import (AdaptiveMargin, ScheduledMargin, contrastive_loss, cosine_embedding_loss,
                      hypersphere_loss, info_nce, make_signed_pairs, mms_loss, similarity, triplet_loss)
from ..miners import random_negatives
from ..recipes import PairLoss, evaluate, train_dual_encoder
from .dual_encoders import Run

TEMPERATURE = 0.07  # InfoNCE and the MMS family (CLIP's initial value; seed 002 settled on it too)
MMS_MARGIN = 0.2  # in cosine units (see the chapter: the thesis' M = 1 is in dot-product units)
TRIPLET_MARGIN = 0.2  # cosine units
CONTRASTIVE_MARGIN = 1.0  # Euclidean distance between unit vectors (cos < 0.5 costs nothing)
COSINE_MARGIN = 0.0  # torch.nn.CosineEmbeddingLoss' default, as in seed 001
AMM_ALPHA = 0.5  # Monfort et al. (2021)
ROWS = ("Hyper", "Triplet", "InfoNCE", "MMS", "MMS_Sch.", "MMS_Adp.", "Contrastive", "Cosine")
COLUMNS = ("i2t_R@1", "i2t_R@5", "i2t_R@10", "t2i_R@1", "t2i_R@5", "t2i_R@10", "Ep")
TEMPERATURES = (0.02, 0.07, 0.2, 0.5)
HYPER_GRID = ((1.0, 0.25), (1.0, 1.0), (1.0, 4.0), (1.0, 16.0), (1.0, 64.0), (4.0, 16.0))  # (lambda_a, lambda_u)
ZOO_EPOCHS = {"ci": 4, "full": 8, "gpu": 12}  # the budget of every loss, per profile


def zoo_epochs(cfg: Config) -> int:
    """Epochs per loss (the same for all): CI 4, full 8; never more than the profile's epochs."""
    return min(cfg.epochs, ZOO_EPOCHS.get(cfg.profile, 4))


def steps_per_epoch(train: FeatureSplit, cfg: Config) -> int:
    return len(train.texts) // cfg.batch_size


def scheduled_margin(total_steps: int, target: float = MMS_MARGIN, start: float = 0.001,
                     n_increases: int = 20) -> ScheduledMargin:
    r"""Ilharco et al.'s step-wise exponential schedule, rescaled to this run's length.

    Their defaults (start 0.001, times 1.002 every 1000 steps) are meant for ~100k-step runs: over
    a few hundred steps the margin would not move. Here the margin grows from ``start`` by a constant
    factor ``n_increases`` times, evenly spaced, reaching ``target`` (the constant MMS margin) at
    the last step: :math:`f = (M_{target}/M_0)^{1/n}`, :math:`T = \lfloor \text{steps}/n \rfloor`.
    """
    every = max(1, total_steps // n_increases)
    factor = (target / start) ** (1 / n_increases)
    return ScheduledMargin(start=start, factor=factor, every=every, max_margin=target)


def zoo_losses(cfg: Config, total_steps: int, temperature: float = TEMPERATURE,
               hyper_lambdas: tuple[float, float] = (1.0, 0.75), seed: int | None = None) -> dict[str, Callable[[], PairLoss]]:
    """Name -> factory of a fresh pair loss ``(z_img, z_txt, scene_ids) -> scalar``, in seed 000's order."""
    seed = cfg.seed if seed is None else seed

    def hyper():
        lambda_a, lambda_u = hyper_lambdas
        return lambda zi, zt, ids: hypersphere_loss(zi, zt, lambda_align=lambda_a, lambda_uniform=lambda_u)

    def triplet():
        gen = torch.Generator().manual_seed(seed)

        def loss(zi, zt, ids):
            sim = similarity(zi, zt)
            neg_i, neg_t = random_negatives(sim.detach(), ids, ids, k=1, generator=gen)  # eq. 2.6's imposters
            return triplet_loss(sim, neg_i, neg_t, margin=TRIPLET_MARGIN)
        return loss

    def infonce():
        return lambda zi, zt, ids: info_nce(zi, zt, temperature, labels_a=ids, labels_b=ids)

    def mms():
        return lambda zi, zt, ids: mms_loss(zi, zt, MMS_MARGIN, temperature, item_ids=ids)

    def mms_sch():
        sched = scheduled_margin(total_steps)

        def loss(zi, zt, ids):
            value = mms_loss(zi, zt, sched.value, temperature, item_ids=ids)
            sched.step()  # one loss call per optimizer step
            return value
        loss.schedule = sched
        return loss

    def mms_adp():
        amm = AdaptiveMargin(AMM_ALPHA)
        return lambda zi, zt, ids: mms_loss(zi, zt, amm(zi, zt, ids), temperature, item_ids=ids)

    def contrastive():
        return lambda zi, zt, ids: contrastive_loss(similarity(zi, zt), ids, margin=CONTRASTIVE_MARGIN)

    def cosine():
        gen = torch.Generator().manual_seed(seed)

        def loss(zi, zt, ids):
            ia, ib, target = make_signed_pairs(len(ids), 1, generator=gen, item_ids=ids)
            return cosine_embedding_loss(zi[ia], zt[ib], target, margin=COSINE_MARGIN)
        return loss

    return dict(zip(ROWS, (hyper, triplet, infonce, mms, mms_sch, mms_adp, contrastive, cosine)))


def train_one(pair_loss: PairLoss, train: FeatureSplit, val: FeatureSplit, test: FeatureSplit, cfg: Config,
              epochs: int, progress: bool = True, desc: str = "training") -> Run:
    """Train fresh heads with ``pair_loss`` (Adam, cfg's lr and batch size, seeded) and score them on test."""
    seed_everything(cfg.seed)
    model, history = train_dual_encoder(train, val, cfg, pair_loss, epochs=epochs, progress=progress, desc=desc)
    return Run(model, history, evaluate(model, test))


def train_zoo(train: FeatureSplit, val: FeatureSplit, test: FeatureSplit, cfg: Config,
              factories: dict[str, Callable[[], PairLoss]], epochs: int, progress: bool = True) -> dict[str, Run]:
    """Train every loss of ``factories`` under the same budget."""
    return {name: train_one(make(), train, val, test, cfg, epochs, progress, desc=name)
            for name, make in factories.items()}


def zoo_table(runs: dict[str, Run]) -> dict[str, dict]:
    """``{loss: {i2t_R@1, ..., t2i_R@10, rsum, Ep}}`` in percent (Ep: 1-based best validation epoch)."""
    return {name: run.row() for name, run in runs.items()}


def hyper_grid(train, val, test, cfg: Config, epochs: int, progress: bool = True,
               grid=HYPER_GRID) -> dict[tuple[float, float], Run]:
    """``{(lambda_a, lambda_u): Run}``: the hypersphere loss over a small grid of its two weights."""
    total = epochs * steps_per_epoch(train, cfg)
    return {lams: train_one(zoo_losses(cfg, total, hyper_lambdas=lams)["Hyper"](), train, val, test, cfg, epochs,
                            progress, desc=f"Hyper la={lams[0]} lu={lams[1]}")
            for lams in grid}


def best_hyper(hyper_runs: dict) -> tuple[float, float]:
    """The weights with the best validation rsum (ties: the first in grid order)."""
    return max(hyper_runs, key=lambda lams: hyper_runs[lams].history.best["rsum"])


def hyper_table(hyper_runs: dict) -> dict[str, dict]:
    return {f"la={la}, lu={lu}": {**r.row(), "val_rsum": r.history.best["rsum"]} for (la, lu), r in hyper_runs.items()}


def temperature_sweep(train, val, test, cfg: Config, epochs: int, done: Run | None = None,
                      progress: bool = True, temperatures=TEMPERATURES) -> dict[float, Run]:
    """``{tau: Run}`` for InfoNCE; ``done`` is an existing run at :data:`TEMPERATURE`, reused."""
    total = epochs * steps_per_epoch(train, cfg)
    out = {}
    for tau in temperatures:
        if done is not None and math.isclose(tau, TEMPERATURE):
            out[tau] = done
            continue
        make = zoo_losses(cfg, total, temperature=tau)["InfoNCE"]
        out[tau] = train_one(make(), train, val, test, cfg, epochs, progress, desc=f"InfoNCE tau={tau}")
    return out


def run(cfg: Config, progress: bool = True) -> dict:
    """The chapter's reference experiment: the zoo table, the temperature sweep and the hypersphere grid."""
    seed_everything(cfg.seed)
    train, val, test = (scene_features(s, cfg, progress=progress) for s in ("train", "val", "test"))
    epochs = zoo_epochs(cfg)
    total = epochs * steps_per_epoch(train, cfg)

    # Hypersphere: tune its weights on validation first (thesis section 3.2.1), use the best in the table.
    hyper_runs = hyper_grid(train, val, test, cfg, epochs, progress)
    best_lam = best_hyper(hyper_runs)

    factories = zoo_losses(cfg, total, hyper_lambdas=best_lam)
    runs = {"Hyper": hyper_runs[best_lam]}
    runs.update(train_zoo(train, val, test, cfg, {k: v for k, v in factories.items() if k != "Hyper"}, epochs, progress))
    runs = {name: runs[name] for name in ROWS}

    temp_runs = temperature_sweep(train, val, test, cfg, epochs, runs["InfoNCE"], progress)

    return {
        "table": zoo_table(runs),
        "temperature_sweep": {f"tau={tau}": r.row() for tau, r in temp_runs.items()},
        "hypersphere_grid": hyper_table(hyper_runs),
        "hyper_lambdas": list(best_lam),
        "curves": {name: dict(zip(("step", "rsum"), r.history.eval_series("rsum"))) for name, r in runs.items()},
        "settings": {"epochs": epochs, "batch_size": cfg.batch_size, "lr": cfg.lr, "embed_dim": cfg.embed_dim,
                     "temperature": TEMPERATURE, "mms_margin": MMS_MARGIN, "triplet_margin": TRIPLET_MARGIN,
                     "contrastive_margin": CONTRASTIVE_MARGIN, "cosine_margin": COSINE_MARGIN,
                     "amm_alpha": AMM_ALPHA, "total_steps": total},
        "sizes": {"train": len(train.world), "val": len(val.world), "test": len(test.world),
                  "captions_per_image": test.world.captions_per_image},
    }
