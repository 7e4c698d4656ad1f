"""The parts ``fit`` is made of: TrainState, train_step, record_eval, save_checkpoint / load_checkpoint.

Values, not shapes: a step equals the SGD update worked out by hand, a checkpoint restores every field
and the random streams bit for bit, and fit equals the parts composed by hand.
"""

import math
import random
import re

import numpy as np
import pytest
import torch
from torch import nn

from mmalign.train import (History, TrainState, epoch_order, fit, load_checkpoint, record_eval, save_checkpoint,
                           train_step)
from test_train import Counter  # a stateful object (state_dict / load_state_dict) that counts what it saw


def mse(model, batch):
    x, y = batch
    return nn.functional.mse_loss(model(x), y)


def regression(n=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, generator=g)
    return x, x @ torch.randn(3, 2, generator=g) + 0.1 * torch.randn(n, 2, generator=g)


def trained_state(model_seed=0):
    """A state after 3 Adam steps under a scheduler, with a counter, an evaluation and best weights."""
    torch.manual_seed(model_seed)
    model = nn.Sequential(nn.Linear(3, 8), nn.Dropout(0.2), nn.Linear(8, 2))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    state = TrainState(model, opt, torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5),
                       stateful={"counter": Counter()})
    x, y = regression()

    def count(m, batch, step):
        state.stateful["counter"].steps += 1
        state.stateful["counter"].seen += len(batch[0])

    for b in range(3):
        train_step(state, lambda m, batch: (mse(m, batch), {"half": 0.5}), (x[8 * b:8 * b + 8], y[8 * b:8 * b + 8]),
                   after_step=count)
    record_eval(state, lambda m: {"score": 2.0}, keep_best="score")
    return state


def rng_draws():
    return torch.rand(4), np.random.rand(3), random.random()


# ---------------------------------------------------------------- checkpoints
def test_save_then_load_restores_every_field_and_the_random_streams(tmp_path):
    state = trained_state()
    path = tmp_path / "sub" / "run.pt"
    torch.manual_seed(5), np.random.seed(6), random.seed(7)
    assert save_checkpoint(path, state, {"seed": 1}) == path
    expected = rng_draws()  # what the generators give right after the save

    fresh = trained_state(model_seed=123)  # other weights, other Adam moments; and it moves the RNGs on
    fresh.stateful["counter"].load_state_dict({"steps": 0, "seen": 0})
    fresh.history, fresh.epoch, fresh.step_in_epoch, fresh.global_step = History(), 9, 9, 9
    load_checkpoint(path, fresh, {"seed": 1})
    again = rng_draws()
    assert torch.equal(again[0], expected[0]) and np.array_equal(again[1], expected[1]) and again[2] == expected[2]

    for k, v in state.model.state_dict().items():
        assert torch.equal(fresh.model.state_dict()[k], v), k
    saved_opt, loaded_opt = state.optimizer.state_dict(), fresh.optimizer.state_dict()
    assert loaded_opt["param_groups"] == saved_opt["param_groups"] and saved_opt["param_groups"][0]["lr"] == 5e-3
    for i, moments in saved_opt["state"].items():
        for k, v in moments.items():
            assert torch.equal(loaded_opt["state"][i][k], v), (i, k)
    assert fresh.scheduler.state_dict() == state.scheduler.state_dict() and fresh.scheduler.last_epoch == 3
    assert fresh.stateful["counter"].state_dict() == {"steps": 3, "seen": 24}
    assert fresh.history.to_dict() == state.history.to_dict() and fresh.history.metrics == {"half": [0.5] * 3}
    assert (fresh.epoch, fresh.step_in_epoch, fresh.global_step) == (0, 3, 3)
    assert fresh.best_state.keys() == state.best_state.keys()
    assert all(torch.equal(fresh.best_state[k], v) for k, v in state.best_state.items())
    assert sorted(p.name for p in path.parent.iterdir()) == ["run.pt"]  # the atomic write left no temporary file


def test_checkpoint_file_holds_plain_values_under_the_documented_keys(tmp_path):
    path = save_checkpoint(tmp_path / "run.pt", trained_state(), {"seed": 1})
    saved = torch.load(path, weights_only=True)
    assert set(saved) == {"model", "optimizer", "params", "scheduler", "scaler", "stateful", "history", "best_state",
                          "best_params", "epoch", "step_in_epoch", "global_step", "rng", "config"}
    assert saved["params"] == {} and saved["best_params"] is None  # every parameter updated is in the model
    assert saved["config"] == {"seed": 1} and saved["stateful"] == {"counter": {"steps": 3, "seen": 24}}
    assert (saved["epoch"], saved["step_in_epoch"], saved["global_step"]) == (0, 3, 3)
    assert saved["history"]["evals"] == [{"step": 3, "epoch": 0, "score": 2.0}]


def test_load_with_other_settings_names_what_differs(tmp_path):
    path = save_checkpoint(tmp_path / "run.pt", trained_state(), {"seed": 1, "batch_size": 8})
    with pytest.raises(ValueError, match=r"other settings.*seed: 1 in the checkpoint, 2 now"):
        load_checkpoint(path, trained_state(), {"seed": 2, "batch_size": 8})
    state = trained_state(model_seed=4)
    load_checkpoint(path, state, None)  # no fingerprint: no check
    assert state.global_step == 3


def test_truncated_checkpoint_raises_the_clear_error(tmp_path):
    path = save_checkpoint(tmp_path / "run.pt", trained_state())
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ValueError, match=rf"checkpoint {re.escape(str(path))} cannot be read .*truncated "
                                         r".*delete it to start over"):
        load_checkpoint(path, trained_state())


def test_checkpoint_with_other_stateful_objects_says_which(tmp_path):
    path = save_checkpoint(tmp_path / "run.pt", trained_state())
    state = trained_state()
    state.stateful = {"queue": Counter()}
    with pytest.raises(ValueError, match=r"holds stateful objects \['counter'\] but this run has \['queue'\] "
                                         r"\(missing from the checkpoint: \['queue'\]\) \(not in this run: \['counter'\]\)"):
        load_checkpoint(path, state)


# ---------------------------------------------------------------- one training step
def linear_sgd_state(lr=0.1, scheduler=False):
    model = nn.Linear(3, 1).double()
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[0.5, -1.0, 2.0]], dtype=torch.float64))
        model.bias.fill_(0.25)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5) if scheduler else None
    return TrainState(model, opt, sched)


X = [[1.0, 2.0, 0.0], [0.0, -1.0, 1.0], [2.0, 0.5, -1.0], [-1.0, 0.0, 3.0]]
Y = [1.0, 0.0, -2.0, 4.0]


def hand_gradient():
    """Loss and gradient of mean((w.x + b - y)^2) over the 4 rows, with Python floats."""
    w, b = [0.5, -1.0, 2.0], 0.25
    r = [sum(wi * xi for wi, xi in zip(w, x)) + b - y for x, y in zip(X, Y)]
    loss = sum(ri * ri for ri in r) / 4
    gw = [sum(2 * ri * x[j] for ri, x in zip(r, X)) / 4 for j in range(3)]
    gb = sum(2 * ri for ri in r) / 4
    return loss, gw, gb, w, b


def test_train_step_equals_a_hand_computed_sgd_step_and_logs_it():
    state = linear_sgd_state(lr=0.1, scheduler=True)
    seen = []
    batch = (torch.tensor(X, dtype=torch.float64), torch.tensor(Y, dtype=torch.float64)[:, None])
    logged = train_step(state, lambda m, b: (mse(m, b), {"rows": float(len(b[0]))}), batch,
                        after_step=lambda m, b, step: seen.append((step, b[0].shape[0])))
    loss, gw, gb, w, b = hand_gradient()
    torch.testing.assert_close(state.model.weight.detach()[0],
                               torch.tensor([wi - 0.1 * g for wi, g in zip(w, gw)], dtype=torch.float64),
                               rtol=0, atol=1e-14)
    assert state.model.bias.item() == pytest.approx(b - 0.1 * gb, abs=1e-14)
    assert logged == pytest.approx(loss, abs=1e-12)
    assert state.history.step == [1] and state.history.loss == [logged] and state.history.metrics == {"rows": [4.0]}
    assert (state.global_step, state.step_in_epoch) == (1, 1) and seen == [(1, 4)]
    assert state.optimizer.param_groups[0]["lr"] == pytest.approx(0.05)  # the scheduler stepped after the update


def test_train_step_clips_the_gradient_to_the_norm():
    state = linear_sgd_state(lr=0.1)
    batch = (torch.tensor(X, dtype=torch.float64), torch.tensor(Y, dtype=torch.float64)[:, None])
    train_step(state, mse, batch, grad_clip=0.5)
    _, gw, gb, w, b = hand_gradient()
    norm = math.sqrt(sum(g * g for g in gw) + gb * gb)
    assert norm > 0.5  # so the clip acts
    scale = 0.5 / (norm + 1e-6)  # clip_grad_norm_'s coefficient
    torch.testing.assert_close(state.model.weight.detach()[0],
                               torch.tensor([wi - 0.1 * scale * g for wi, g in zip(w, gw)], dtype=torch.float64),
                               rtol=0, atol=1e-14)
    assert state.model.bias.item() == pytest.approx(b - 0.1 * scale * gb, abs=1e-14)


def test_train_step_with_a_nan_loss_raises_and_changes_nothing():
    state = linear_sgd_state()
    before = {k: v.clone() for k, v in state.model.state_dict().items()}
    batch = (torch.tensor(X, dtype=torch.float64), torch.tensor(Y, dtype=torch.float64)[:, None])
    with pytest.raises(FloatingPointError, match=r"loss is nan at step 0: lower the learning rate"):
        train_step(state, lambda m, b: mse(m, b) * float("nan"), batch)
    assert all(torch.equal(state.model.state_dict()[k], v) for k, v in before.items())
    assert state.global_step == 0 and state.history.loss == []


# ---------------------------------------------------------------- evaluation records
def test_record_eval_logs_the_metrics_and_keeps_the_strictly_best_weights():
    state = linear_sgd_state()
    state.model.train()
    modes, values = [], iter([1.0, 5.0, 3.0, 5.0])

    def eval_fn(m):
        modes.append((m.training, torch.is_grad_enabled()))
        return {"score": next(values), "count": torch.tensor(7)}

    for k in range(4):
        with torch.no_grad():
            state.model.weight.fill_(float(k))
        state.global_step, state.epoch = 10 * (k + 1), k
        entry = record_eval(state, eval_fn, keep_best="score")
        assert entry == {"step": 10 * (k + 1), "epoch": k, "score": [1.0, 5.0, 3.0, 5.0][k], "count": 7.0}
        assert type(entry["count"]) is float
    assert modes == [(False, False)] * 4 and state.model.training  # eval mode, no grad; train mode restored
    assert state.history.best == {"step": 20, "epoch": 1, "score": 5.0, "count": 7.0}  # the tie at k=3 does not win
    assert torch.equal(state.best_state["weight"], torch.ones(1, 3, dtype=torch.float64))
    assert state.history.eval_series("score") == ([10, 20, 30, 40], [1.0, 5.0, 3.0, 5.0])
    with pytest.raises(ValueError, match=r"keep_best='rsum' is not among the eval metrics \['count', 'score'\]"):
        record_eval(state, eval_fn=lambda m: {"score": 1.0, "count": 2.0}, keep_best="rsum")


def test_fit_is_the_parts_composed():
    """A hand loop of train_step and record_eval over the seeded epoch orders gives fit's run bit for bit."""
    x, y = regression(n=40)

    def build():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(3, 8), nn.Dropout(0.3), nn.Linear(8, 2))
        return model, torch.optim.Adam(model.parameters(), lr=1e-2)

    def eval_fn(m):
        return {"w": m[0].weight.sum(), "fit": -mse(m, (x, y))}

    model, opt = build()
    hist = fit(model, mse, (x, y), optimizer=opt, epochs=2, batch_size=16, seed=3, device="cpu", progress=False,
               eval_fn=eval_fn)

    hand, hand_opt = build()
    state = TrainState(hand, hand_opt)
    torch.manual_seed(3)  # fit seeds the global generators (dropout) with its seed
    hand.train()
    for epoch in range(2):
        order = epoch_order(40, 3, epoch)
        for b in range(40 // 16):  # drop_last: 2 batches of 16
            idx = order[16 * b:16 * b + 16]
            train_step(state, mse, (x[idx], y[idx]), device="cpu")
        record_eval(state, eval_fn)
        state.epoch, state.step_in_epoch = epoch + 1, 0
    assert hist.loss == state.history.loss and hist.step == [1, 2, 3, 4]
    assert hist.evals == state.history.evals and [(e["step"], e["epoch"]) for e in hist.evals] == [(2, 0), (4, 1)]
    assert hist.evals[-1]["w"] == float(model[0].weight.detach().sum()) and hist.evals[-1]["fit"] < 0
    for k, v in model.state_dict().items():
        assert torch.equal(hand.state_dict()[k], v), k
