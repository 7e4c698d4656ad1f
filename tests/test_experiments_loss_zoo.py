"""The loss zoo's helpers: the rescaled margin schedule and the loss factories, against direct computations."""

import math

import pytest
import torch
import torch.nn.functional as F

from mmalign.config import load_config
from mmalign.experiments import loss_zoo as zoo
from mmalign.losses import hypersphere_loss, info_nce, mms_loss


def test_scheduled_margin_grows_geometrically_to_the_target():
    total, target, start = 200, 0.2, 0.001
    sched = zoo.scheduled_margin(total, target=target, start=start, n_increases=20)
    values = []
    for _ in range(total):
        values.append(sched.value)
        sched.step()
    every = total // 20
    factor = (target / start) ** (1 / 20)
    expected = [min(target, start * factor ** (t // every)) for t in range(total)]
    assert values == pytest.approx(expected, rel=1e-12)
    assert values[0] == pytest.approx(start)
    assert values[-1] == pytest.approx(start * factor ** 19)  # the 20th increase lands at step `total`
    assert sched.value == pytest.approx(target)
    assert all(b >= a for a, b in zip(values, values[1:]))


def test_scheduled_margin_short_run():
    sched = zoo.scheduled_margin(5, target=0.3, n_increases=20)  # fewer steps than increases: one per step
    assert sched.every == 1
    for _ in range(100):
        sched.step()
    assert sched.value == pytest.approx(0.3)


def _batch(n=12, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    zi, zt = torch.randn(n, d, generator=g, dtype=torch.float64), torch.randn(n, d, generator=g, dtype=torch.float64)
    ids = torch.tensor([0, 0, 1, 2, 3, 3, 4, 5, 6, 7, 8, 9])[:n]
    return zi, zt, ids


def test_factories_match_the_library_losses():
    cfg = load_config("ci")
    zi, zt, ids = _batch()
    losses = {name: make() for name, make in zoo.zoo_losses(cfg, 100, hyper_lambdas=(2.0, 3.0)).items()}
    assert list(losses) == list(zoo.ROWS)
    assert torch.allclose(losses["InfoNCE"](zi, zt, ids), info_nce(zi, zt, temperature=zoo.TEMPERATURE, ids=ids))
    assert torch.allclose(losses["MMS"](zi, zt, ids), mms_loss(zi, zt, temperature=zoo.TEMPERATURE, margin=zoo.MMS_MARGIN, ids=ids))
    assert torch.allclose(losses["Hyper"](zi, zt, ids),
                          2.0 * hypersphere_loss(zi, zt, lambda_uniform=0.0) + 3.0 * hypersphere_loss(zi, zt, lambda_align=0.0))
    for name, loss in losses.items():
        value = loss(zi, zt, ids)
        assert value.dim() == 0 and torch.isfinite(value), name


def test_scheduled_mms_steps_once_per_call():
    cfg = load_config("ci")
    zi, zt, ids = _batch()
    loss = zoo.zoo_losses(cfg, 40)["MMS_Sch."]()
    for t in range(7):
        margin = loss.schedule.value
        assert torch.allclose(loss(zi, zt, ids), mms_loss(zi, zt, temperature=zoo.TEMPERATURE, margin=margin, ids=ids))
        assert loss.schedule.num_steps == t + 1


def test_triplet_factory_is_reproducible_and_hinges_on_a_different_scene():
    cfg = load_config("ci")
    zi, zt, ids = _batch()
    a = zoo.zoo_losses(cfg, 10)["Triplet"]()
    b = zoo.zoo_losses(cfg, 10)["Triplet"]()
    assert [float(a(zi, zt, ids)) for _ in range(3)] == [float(b(zi, zt, ids)) for _ in range(3)]
    # Identical embeddings for every item: every hinge is exactly the margin.
    same = torch.ones(12, 4, dtype=torch.float64)
    assert math.isclose(float(a(same, same, ids)), zoo.TRIPLET_MARGIN, rel_tol=1e-12)


def test_cosine_factory_perfect_alignment_costs_only_the_negatives():
    cfg = load_config("ci")
    z = F.one_hot(torch.arange(12), 12).double()  # orthonormal: positives cos 1, negatives cos 0
    _, _, ids = _batch()
    assert float(zoo.zoo_losses(cfg, 10)["Cosine"]()(z, z, ids)) == pytest.approx(0.0, abs=1e-12)


def test_zoo_epochs_and_best_hyper():
    assert zoo.zoo_epochs(load_config("ci")) == 4
    assert zoo.zoo_epochs(load_config("full")) == 8

    class _H:
        def __init__(self, rsum):
            self.best = {"rsum": rsum, "epoch": 0}

    runs = {(1.0, 1.0): zoo.Run(None, _H(3.0), {}), (1.0, 4.0): zoo.Run(None, _H(5.0), {}), (4.0, 16.0): zoo.Run(None, _H(5.0), {})}
    assert zoo.best_hyper(runs) == (1.0, 4.0)  # ties: the first in grid order


def _hinge_loop(zi, zt, neg_i, neg_t, margin):
    """Triplet hinge in both directions, by hand: mean over all (anchor, negative) terms."""
    s = F.normalize(zi, dim=-1) @ F.normalize(zt, dim=-1).T
    terms = [max(0.0, margin - float(s[i, i]) + float(s[i, j])) for i in range(len(s)) for j in neg_i[i].tolist()]
    terms += [max(0.0, margin - float(s[i, i]) + float(s[r, i])) for i in range(len(s)) for r in neg_t[i].tolist()]
    return sum(terms) / len(terms)


def test_triplet_eq_2_7_adds_the_hardest_imposter_hinge():
    from mmalign.miners import random_negatives

    cfg = load_config("ci")
    zi, zt, ids = _batch()
    loss = zoo.zoo_losses(cfg, 10, settings={"Triplet+hard": 0.3})["Triplet+hard"]()
    got = float(loss(zi, zt, ids))
    # the uniform imposters come from the factory's generator (seed cfg.seed); the hardest ones by a loop
    s = F.normalize(zi, dim=-1) @ F.normalize(zt, dim=-1).T
    neg_i, neg_t = random_negatives(s, ids=ids, k=1, generator=torch.Generator().manual_seed(cfg.seed))
    valid = ids[:, None] != ids[None, :]
    hard_i = torch.tensor([[max((j for j in range(12) if valid[i, j]), key=lambda j: float(s[i, j]))] for i in range(12)])
    hard_t = torch.tensor([[max((r for r in range(12) if valid[r, i]), key=lambda r: float(s[r, i]))] for i in range(12)])
    expected = _hinge_loop(zi, zt, neg_i, neg_t, 0.3) + _hinge_loop(zi, zt, hard_i, hard_t, 0.3)
    assert got == pytest.approx(expected, rel=1e-9)
    same = torch.ones(12, 4, dtype=torch.float64)  # every hinge is the margin, in both terms
    assert float(zoo.zoo_losses(cfg, 10)["Triplet+hard"]()(same, same, ids)) == pytest.approx(2 * zoo.TRIPLET_MARGIN)


def test_settings_set_each_loss_knob_and_unknown_names_fail():
    cfg = load_config("ci")
    zi, zt, ids = _batch()
    got = zoo.zoo_losses(cfg, 10, settings={"InfoNCE": 0.2, "MMS": 0.5})
    assert torch.allclose(got["InfoNCE"]()(zi, zt, ids), info_nce(zi, zt, temperature=0.2, ids=ids))
    assert torch.allclose(got["MMS"]()(zi, zt, ids), mms_loss(zi, zt, temperature=0.5, margin=zoo.MMS_MARGIN, ids=ids))
    assert torch.allclose(got["MMS_Adp."]()(zi, zt, ids), zoo.zoo_losses(cfg, 10)["MMS_Adp."]()(zi, zt, ids))
    hyper = zoo.zoo_losses(cfg, 10, settings={"Hyper": 5.0})["Hyper"]()(zi, zt, ids)
    assert torch.allclose(hyper, hypersphere_loss(zi, zt, lambda_uniform=0.0) + 5.0 * hypersphere_loss(zi, zt, lambda_align=0.0))
    with pytest.raises(ValueError, match="unknown losses"):
        zoo.zoo_losses(cfg, 10, settings={"Triplett": 0.1})


def test_every_loss_has_a_grid_of_three_with_the_default_in_the_middle():
    assert set(zoo.KNOBS) == set(zoo.ROWS)
    for name, (knob, grid) in zoo.KNOBS.items():
        assert len(grid) == 3 and grid[1] == zoo.DEFAULTS[name] and list(grid) == sorted(grid), name
    assert zoo.DEFAULTS["InfoNCE"] == zoo.TEMPERATURE and zoo.DEFAULTS["Hyper"] == zoo.HYPER_LAMBDA_U


def test_best_setting_ties_go_to_the_first():
    class _H:
        def __init__(self, rsum):
            self.best = {"rsum": rsum, "epoch": 0}

    runs = {0.1: zoo.Run(None, _H(2.0), {}), 0.2: zoo.Run(None, _H(7.0), {}), 0.4: zoo.Run(None, _H(7.0), {})}
    assert zoo.best_setting(runs) == 0.2


def test_rank_correlation_hand_cases():
    rho, p = zoo.rank_correlation([4, 3, 2, 1], [40, 30, 20, 10])
    assert rho == pytest.approx(1.0) and p == pytest.approx(1 / 24)
    rho, p = zoo.rank_correlation([4, 3, 2, 1], [10, 20, 30, 40])
    assert rho == pytest.approx(-1.0) and p == pytest.approx(1.0)
    # one adjacent swap: sum d^2 = 2, rho = 1 - 6*2/(4*15) = 0.8; as good or better: identity + 3 swaps
    rho, p = zoo.rank_correlation([4, 3, 2, 1], [4, 2, 3, 1])
    assert rho == pytest.approx(0.8) and p == pytest.approx(4 / 24)
    with pytest.raises(ValueError, match="same length|one length"):
        zoo.rank_correlation([1, 2], [1, 2, 3])
