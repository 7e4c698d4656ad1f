"""Chapter 02: the loss zoo. Nine losses, one budget: same frozen features, same linear heads, same
optimizer, batch size and number of epochs, and the same tuning budget (three values of each loss's one
knob, chosen on validation); only ``pair_loss`` changes.

Typical use::

    losses = zoo_losses(cfg, total_steps, settings)  # name -> factory of a fresh (stateful) pair loss
    grid = tune_zoo(train, val, test, cfg, epochs)   # {name: {knob value: Run}}, the equal tuning budget
    table = zoo_table(runs)                          # seed-000 layout: R@1/5/10 both ways + Ep

Each factory returns a new ``pair_loss(z_img, z_txt, scene_ids)``; the triplet and cosine losses
draw their negatives from a seeded generator and the scheduled margin counts its own steps, so a
factory call is a fresh, reproducible run. The full profile repeats the table over three seeds
(:mod:`mmalign.experiments.seeds`).
"""

from __future__ import annotations

from typing import Callable

import torch

from ..config import Config, seed_everything
from ..data.features import FeatureSplit, scene_features
from ..losses import (AdaptiveMargin, ScheduledMargin, contrastive_loss, cosine_embedding_loss,
                      hypersphere_loss, info_nce, make_signed_pairs, mms_loss, triplet_loss)
from ..miners import hardest_negatives, random_negatives
from ..retrieval import similarity
from ..recipes import PairLoss, evaluate, train_dual_encoder
from .dual_encoders import Run
from .seeds import seeds_for, summarize

TEMPERATURE = 0.07  # InfoNCE and the MMS family (CLIP's initial value; seed 002 settled on it too)
MMS_MARGIN = 0.2  # in cosine units (see the chapter: the thesis' M = 1 is in dot-product units)
TRIPLET_MARGIN = 0.2  # cosine units
CONTRASTIVE_MARGIN = 1.0  # Euclidean distance between unit vectors (cos < 0.5 costs nothing)
COSINE_MARGIN = 0.0  # torch.nn.CosineEmbeddingLoss' default, as in seed 001
HYPER_LAMBDA_U = 0.75  # the thesis' tuned uniformity weight (lambda_a = 1)
AMM_ALPHA = 0.5  # Monfort et al. (2021)
ROWS = ("Hyper", "Triplet", "Triplet+hard", "InfoNCE", "MMS", "MMS_Sch.", "MMS_Adp.", "Contrastive", "Cosine")
COLUMNS = ("i2t_R@1", "i2t_R@5", "i2t_R@10", "t2i_R@1", "t2i_R@5", "t2i_R@10", "Ep")
# The equal tuning budget: one knob per loss, three values each: the default (middle) and one step down
# and up (x1/2 and x2 on a log scale; the cosine margin, whose default is 0, in steps of 0.25).
_TAUS = (0.035, TEMPERATURE, 0.14)
KNOBS = {
    "Hyper": ("lambda_u", (0.375, HYPER_LAMBDA_U, 1.5)),
    "Triplet": ("margin", (0.1, TRIPLET_MARGIN, 0.4)),
    "Triplet+hard": ("margin", (0.1, TRIPLET_MARGIN, 0.4)),
    "InfoNCE": ("temperature", _TAUS), "MMS": ("temperature", _TAUS),
    "MMS_Sch.": ("temperature", _TAUS), "MMS_Adp.": ("temperature", _TAUS),
    "Contrastive": ("margin", (0.5, CONTRASTIVE_MARGIN, 2.0)),
    "Cosine": ("margin", (-0.25, COSINE_MARGIN, 0.25)),
}
DEFAULTS = {name: grid[1] for name, (_, grid) in KNOBS.items()}
# Beyond the equal budget: a wider search of the hypersphere's ratio lambda_u / lambda_a (section 2 of
# the chapter); (4, 16) repeats the ratio 4 at a 4x larger scale.
HYPER_WIDE = ((1.0, 4.0), (1.0, 16.0), (1.0, 64.0), (4.0, 16.0))  # (lambda_a, lambda_u)
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


def zoo_losses(cfg: Config, total_steps: int, temperature: float | None = None,
               hyper_lambdas: tuple[float, float] | None = None, seed: int | None = None,
               settings: dict[str, float] | None = None) -> dict[str, Callable[[], PairLoss]]:
    """Name -> factory of a fresh pair loss ``(z_img, z_txt, scene_ids) -> scalar``, in :data:`ROWS` order.

    ``settings`` maps a loss name to the value of its knob (:data:`KNOBS`: the hypersphere's lambda_u, a
    margin or a temperature); a loss not named takes its default. ``temperature`` (the softmax family) and
    ``hyper_lambdas`` ((lambda_a, lambda_u)) set those knobs for every loss at once, as shorthands.
    """
    seed = cfg.seed if seed is None else seed
    knob = dict(DEFAULTS)
    if temperature is not None:
        knob.update({n: temperature for n, (k, _) in KNOBS.items() if k == "temperature"})
    lambda_a = 1.0
    if hyper_lambdas is not None:
        lambda_a, knob["Hyper"] = hyper_lambdas
    knob.update(settings or {})
    unknown = set(settings or {}) - set(ROWS)
    if unknown:
        raise ValueError(f"settings names unknown losses {sorted(unknown)}; known: {list(ROWS)}")

    def hyper():
        lambda_u = knob["Hyper"]
        return lambda zi, zt, ids: hypersphere_loss(zi, zt, lambda_align=lambda_a, lambda_uniform=lambda_u)

    def triplet(hard: bool):
        def make():
            gen = torch.Generator().manual_seed(seed)
            margin = knob["Triplet+hard" if hard else "Triplet"]

            def loss(zi, zt, ids):
                sim = similarity(zi, zt)
                neg_i, neg_t = random_negatives(sim.detach(), ids=ids, k=1, generator=gen)  # eq. 2.6's imposters
                value = triplet_loss(sim, neg_i, neg_t, margin=margin)
                if hard:  # eq. 2.7: plus the same hinge on the hardest imposter of the batch
                    hard_i, hard_t = hardest_negatives(sim.detach(), ids=ids, k=1)
                    value = value + triplet_loss(sim, hard_i, hard_t, margin=margin)
                return value
            return loss
        return make

    def infonce():
        tau = knob["InfoNCE"]
        return lambda zi, zt, ids: info_nce(zi, zt, temperature=tau, ids=ids)

    def mms():
        tau = knob["MMS"]
        return lambda zi, zt, ids: mms_loss(zi, zt, temperature=tau, margin=MMS_MARGIN, ids=ids)

    def mms_sch():
        sched, tau = scheduled_margin(total_steps), knob["MMS_Sch."]

        def loss(zi, zt, ids):
            value = mms_loss(zi, zt, temperature=tau, margin=sched.value, ids=ids)
            sched.step()  # one loss call per optimizer step
            return value
        loss.schedule = sched
        return loss

    def mms_adp():
        amm, tau = AdaptiveMargin(AMM_ALPHA), knob["MMS_Adp."]
        return lambda zi, zt, ids: mms_loss(zi, zt, temperature=tau, margin=amm(zi, zt, ids=ids), ids=ids)

    def contrastive():
        margin = knob["Contrastive"]
        return lambda zi, zt, ids: contrastive_loss(similarity(zi, zt), margin=margin, ids=ids)

    def cosine():
        gen, margin = torch.Generator().manual_seed(seed), knob["Cosine"]

        def loss(zi, zt, ids):
            ia, ib, target = make_signed_pairs(len(ids), negatives_per_positive=1, generator=gen, ids=ids)
            return cosine_embedding_loss(zi[ia], zt[ib], target, margin=margin)
        return loss

    return dict(zip(ROWS, (hyper, triplet(False), triplet(True), infonce, mms, mms_sch, mms_adp, contrastive,
                           cosine)))


def train_one(pair_loss: PairLoss, train: FeatureSplit, val: FeatureSplit, test: FeatureSplit, cfg: Config,
              epochs: int, progress: bool = True, desc: str = "training") -> Run:
    """Train fresh heads with ``pair_loss`` (Adam, cfg's lr, batch size and seed) and score them on test."""
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


def tune_zoo(train, val, test, cfg: Config, epochs: int, names=ROWS, progress: bool = True) -> dict[str, dict]:
    """The equal tuning budget: ``{name: {value: Run}}``, every loss at the three values of its knob."""
    total = epochs * steps_per_epoch(train, cfg)
    out = {}
    for name in names:
        knob, grid = KNOBS[name]
        out[name] = {v: train_one(zoo_losses(cfg, total, settings={name: v})[name](), train, val, test, cfg,
                                  epochs, progress, desc=f"{name} {knob}={v}") for v in grid}
    return out


def best_setting(runs_by_value: dict) -> float:
    """The knob value with the best validation rsum (ties: the first in grid order)."""
    return max(runs_by_value, key=lambda v: runs_by_value[v].history.best["rsum"])


def grid_table(grid_runs: dict[str, dict]) -> dict[str, dict]:
    """``{name: {"knob", "values", "val_rsum", "test_rsum", "Ep"}}`` of :func:`tune_zoo`'s runs."""
    return {name: {"knob": KNOBS[name][0], "values": list(runs),
                   "val_rsum": [r.history.best["rsum"] for r in runs.values()],
                   "test_rsum": [r.test["rsum"] for r in runs.values()],
                   "Ep": [r.best_epoch for r in runs.values()]}
            for name, runs in grid_runs.items()}


def hyper_grid(train, val, test, cfg: Config, epochs: int, progress: bool = True,
               grid=HYPER_WIDE) -> dict[tuple[float, float], Run]:
    """``{(lambda_a, lambda_u): Run}``: the hypersphere loss over a grid of its two weights."""
    total = epochs * steps_per_epoch(train, cfg)
    return {lams: train_one(zoo_losses(cfg, total, hyper_lambdas=lams)["Hyper"](), train, val, test, cfg, epochs,
                            progress, desc=f"Hyper la={lams[0]} lu={lams[1]}")
            for lams in grid}


def best_hyper(hyper_runs: dict) -> tuple[float, float]:
    """The weights with the best validation rsum (ties: the first in grid order)."""
    return max(hyper_runs, key=lambda lams: hyper_runs[lams].history.best["rsum"])


def hyper_table(hyper_runs: dict) -> dict[str, dict]:
    return {f"la={la}, lu={lu}": {**r.row(), "val_rsum": r.history.best["rsum"]}
            for (la, lu), r in hyper_runs.items()}


def rank_correlation(a: list[float], b: list[float]) -> tuple[float, float]:
    """Spearman's rank correlation of two score lists (no ties assumed) and its exact one-sided p-value:
    the fraction of all orderings of ``b`` whose correlation with ``a`` is at least as large."""
    import itertools

    if len(a) != len(b) or len(a) < 2:
        raise ValueError(f"need two score lists of one length >= 2, got lengths {len(a)} and {len(b)}")

    def ranks(x):
        order = sorted(range(len(x)), key=lambda i: -x[i])
        r = [0] * len(x)
        for pos, i in enumerate(order):
            r[i] = pos + 1
        return r

    n = len(a)
    ra, rb = ranks(a), ranks(b)
    rho = lambda p: 1 - 6 * sum((x - y) ** 2 for x, y in zip(ra, p)) / (n * (n * n - 1))  # noqa: E731
    observed = rho(rb)
    perms = list(itertools.permutations(range(1, n + 1)))
    return observed, sum(rho(p) >= observed - 1e-12 for p in perms) / len(perms)


def run_tuned(train, val, test, cfg: Config, epochs: int, tuned: dict[str, float],
              progress: bool = True) -> dict[str, Run]:
    """Every loss at its ``tuned`` knob on ``cfg``'s seed."""
    total = epochs * steps_per_epoch(train, cfg)
    return {name: train_one(zoo_losses(cfg, total, settings={name: tuned[name]})[name](), train, val, test, cfg,
                            epochs, progress, desc=f"{name} tuned, seed {cfg.seed}")
            for name in ROWS}


def run(cfg: Config, progress: bool = True) -> dict:
    """The chapter's reference experiment.

    On the first seed every loss gets the equal tuning budget (:data:`KNOBS`, chosen on validation) and the
    hypersphere also the wider grid :data:`HYPER_WIDE`; the other seeds of :func:`seeds_for` train each loss
    at its tuned setting (and the hypersphere at the wide grid's best). ``table`` is the tuned table's mean
    over seeds (``std``, ``per_seed`` beside it); ``untuned`` is the first seed's table at the defaults.
    """
    seed_everything(cfg.seed)
    train, val, test = (scene_features(s, cfg, progress=progress) for s in ("train", "val", "test"))
    epochs = zoo_epochs(cfg)
    total = epochs * steps_per_epoch(train, cfg)
    seeds = seeds_for(cfg)

    first = cfg.replace(seed=seeds[0])
    grid_runs = tune_zoo(train, val, test, first, epochs, progress=progress)
    tuned = {name: best_setting(runs) for name, runs in grid_runs.items()}
    wide_runs = hyper_grid(train, val, test, first, epochs, progress)
    best_lam = best_hyper(wide_runs)

    untuned, tuned_tables, wide_rows = {}, {}, {}
    untuned[seeds[0]] = zoo_table({n: grid_runs[n][DEFAULTS[n]] for n in ROWS})
    tuned_runs = {n: grid_runs[n][tuned[n]] for n in ROWS}
    tuned_tables[seeds[0]] = zoo_table(tuned_runs)
    wide_rows[seeds[0]] = zoo_table({"Hyper (wide grid)": wide_runs[best_lam]})
    for seed in seeds[1:]:
        cfg_s = cfg.replace(seed=seed)
        tuned_tables[seed] = zoo_table(run_tuned(train, val, test, cfg_s, epochs, tuned, progress))
        hyper = zoo_losses(cfg_s, total, hyper_lambdas=best_lam)["Hyper"]()
        wide_rows[seed] = zoo_table({"Hyper (wide grid)": train_one(hyper, train, val, test, cfg_s, epochs, progress,
                                                                    desc="Hyper wide best")})

    return {
        **summarize(tuned_tables),
        "untuned": summarize(untuned),
        "tuned_settings": tuned, "default_settings": DEFAULTS,
        "knobs": {name: {"knob": k, "grid": list(g)} for name, (k, g) in KNOBS.items()},
        "grids": grid_table(grid_runs),
        "hypersphere_grid": hyper_table(wide_runs),
        "hyper_lambdas": list(best_lam),
        "hyper_wide": summarize(wide_rows),
        "curves": {name: dict(zip(("step", "rsum"), r.history.eval_series("rsum"))) for name, r in tuned_runs.items()},
        "settings": {"epochs": epochs, "batch_size": cfg.batch_size, "lr": cfg.lr, "embed_dim": cfg.embed_dim,
                     "temperature": TEMPERATURE, "mms_margin": MMS_MARGIN, "triplet_margin": TRIPLET_MARGIN,
                     "contrastive_margin": CONTRASTIVE_MARGIN, "cosine_margin": COSINE_MARGIN,
                     "hyper_lambda_u": HYPER_LAMBDA_U, "amm_alpha": AMM_ALPHA, "total_steps": total},
        "sizes": {"train": len(train.world), "val": len(val.world), "test": len(test.world),
                  "captions_per_image": test.world.captions_per_image},
    }
