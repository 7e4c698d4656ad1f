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
    assert torch.allclose(losses["InfoNCE"](zi, zt, ids), info_nce(zi, zt, zoo.TEMPERATURE, ids, ids))
    assert torch.allclose(losses["MMS"](zi, zt, ids), mms_loss(zi, zt, zoo.MMS_MARGIN, zoo.TEMPERATURE, ids))
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
        assert torch.allclose(loss(zi, zt, ids), mms_loss(zi, zt, margin, zoo.TEMPERATURE, ids))
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
