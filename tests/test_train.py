"""The training loop: learning, seeding, exact resume (dropout, scheduler, stateful objects), keep_best."""

import collections
import copy
import math

import pytest
import torch
from torch import nn
from torch.utils.data import Dataset

from mmalign.losses import ScheduledMargin, info_nce
from mmalign.train import History, epoch_order, fit, to_device


# ---------------------------------------------------------------- fixtures
def regression_data(n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=g)
    w = torch.randn(8, 4, generator=g)
    return x, x @ w + 0.05 * torch.randn(n, 4, generator=g)


class DropoutNet(nn.Module):
    def __init__(self, p=0.3):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Dropout(p), nn.Linear(32, 4))

    def forward(self, x):
        return self.net(x)


def mse_step(model, batch):
    x, y = batch
    return nn.functional.mse_loss(model(x), y)


def params_of(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_bitwise_equal(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


# ---------------------------------------------------------------- learning and seeding
def test_loss_decreases_dual_encoder_info_nce():
    g = torch.Generator().manual_seed(0)
    ids = torch.arange(96)
    latent = torch.randn(96, 6, generator=g)
    img = latent @ torch.randn(6, 20, generator=g) + 0.1 * torch.randn(96, 20, generator=g)
    txt = latent @ torch.randn(6, 12, generator=g) + 0.1 * torch.randn(96, 12, generator=g)
    torch.manual_seed(0)
    model = nn.ModuleDict({"img": nn.Linear(20, 16), "txt": nn.Linear(12, 16)})

    def step(m, batch):
        a, b, i = batch
        return info_nce(m["img"](a), m["txt"](b), temperature=0.1, ids=i)

    hist = fit(model, step, (img, txt, ids), optimizer=torch.optim.Adam(model.parameters(), lr=1e-2),
               epochs=15, batch_size=32, device="cpu", progress=False)
    assert len(hist.loss) == 15 * 3 and hist.step == list(range(1, 46))
    first, last = sum(hist.loss[:3]) / 3, sum(hist.loss[-3:]) / 3
    assert last < 0.5 * first
    with torch.no_grad():  # the trained pair retrieves: most captions are nearest to their own image
        sim = nn.functional.normalize(model["img"](img), dim=1) @ nn.functional.normalize(model["txt"](txt), dim=1).T
    assert (sim.argmax(1) == ids).float().mean() > 0.5


def run_regression(seed, model_seed=0, **kw):
    torch.manual_seed(model_seed)
    model = DropoutNet()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    hist = fit(model, mse_step, regression_data(), optimizer=opt, epochs=3, batch_size=16, seed=seed,
               device="cpu", progress=False, **kw)
    return model, hist


def test_same_seed_is_bitwise_reproducible_and_other_seed_differs():
    m1, h1 = run_regression(seed=5)
    m2, h2 = run_regression(seed=5)
    assert_bitwise_equal(params_of(m1), params_of(m2))
    assert h1.loss == h2.loss and h1.step == h2.step
    m3, h3 = run_regression(seed=6)
    assert h3.loss != h1.loss
    assert not torch.equal(m3.net[0].weight, m1.net[0].weight)


def test_loss_decreases_on_regression():
    x, y = regression_data()
    torch.manual_seed(0)
    model = nn.Linear(8, 4)
    hist = fit(model, mse_step, (x, y), optimizer=torch.optim.Adam(model.parameters(), lr=5e-2), epochs=60,
               batch_size=16, device="cpu", progress=False)
    assert sum(hist.loss[-4:]) < 0.05 * sum(hist.loss[:4])
    w_ls = torch.linalg.lstsq(torch.cat([x, torch.ones(64, 1)], 1), y).solution  # least squares, by hand
    torch.testing.assert_close(model.weight.T.detach(), w_ls[:8], atol=0.05, rtol=0)


# ---------------------------------------------------------------- exact resume
class Counter:
    """A stateful object: counts steps and the sum of batch sizes it saw."""

    def __init__(self):
        self.steps, self.seen = 0, 0

    def state_dict(self):
        return {"steps": self.steps, "seen": self.seen}

    def load_state_dict(self, state):
        self.steps, self.seen = state["steps"], state["seen"]


def build(model_seed):
    torch.manual_seed(model_seed)
    model = DropoutNet()
    opt = torch.optim.Adam(model.parameters(), lr=5e-3)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)
    margin = ScheduledMargin(start=0.1, factor=2.0, every=2, max_margin=None)
    counter = Counter()

    def step(m, batch):  # the margin's state changes the gradients, so a wrong restore shows
        x, y = batch
        return nn.functional.mse_loss(m(x), y) * (1 + margin.value), {"margin": margin.value}

    def after(m, batch, global_step):
        margin.step()
        counter.steps += 1
        counter.seen += len(batch[0])

    return model, opt, sched, margin, counter, step, after


def run_resumable(data, ckpt, model_seed, max_steps=None, **kw):
    model, opt, sched, margin, counter, step, after = build(model_seed)
    hist = fit(model, step, data, optimizer=opt, scheduler=sched, stateful={"margin": margin, "counter": counter},
               after_step=after, epochs=3, batch_size=16, seed=11, device="cpu", progress=False,
               checkpoint_path=ckpt, max_steps=max_steps, **kw)
    return model, opt, sched, margin, counter, hist


@pytest.mark.parametrize("stop_at", [6, 4, 9])
def test_exact_resume_mid_epoch(tmp_path, stop_at):
    data = regression_data()  # 64 samples / 16 = 4 steps per epoch, 12 in all
    full = run_resumable(data, None, model_seed=0)
    ckpt = tmp_path / "run.pt"
    part = run_resumable(data, ckpt, model_seed=0, max_steps=stop_at)
    assert ckpt.exists() and len(part[5].loss) == stop_at
    saved = torch.load(ckpt, weights_only=False)
    assert (saved["epoch"], saved["step_in_epoch"]) == divmod(stop_at, 4)
    resumed = run_resumable(data, ckpt, model_seed=123)  # different init: everything must come from the checkpoint
    assert_bitwise_equal(params_of(full[0]), params_of(resumed[0]))
    assert full[5].loss == resumed[5].loss and full[5].step == resumed[5].step
    assert full[5].metrics == resumed[5].metrics
    assert resumed[2].last_epoch == 12 and resumed[2].get_last_lr() == full[2].get_last_lr()
    assert resumed[3].num_steps == 12 and resumed[4].state_dict() == {"steps": 12, "seen": 12 * 16}


def test_resume_needs_the_rng_restore(tmp_path):
    """Without the RNG state the dropout masks differ: the resume test above can fail."""
    data = regression_data()
    full = run_resumable(data, None, model_seed=0)
    ckpt = tmp_path / "run.pt"
    run_resumable(data, ckpt, model_seed=0, max_steps=6)
    saved = torch.load(ckpt, weights_only=False)
    saved["rng"]["torch"] = torch.Generator().manual_seed(999).get_state()
    torch.save(saved, ckpt)
    resumed = run_resumable(data, ckpt, model_seed=0)
    assert resumed[5].loss[:6] == full[5].loss[:6]
    assert resumed[5].loss[6:] != full[5].loss[6:]


class DictDataset(Dataset):
    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"x": self.x[i], "y": self.y[i]}


def collate(items):
    return torch.stack([it["x"] for it in items]), torch.stack([it["y"] for it in items])


def test_dataset_path_with_collate_matches_tensor_path():
    x, y = regression_data()
    torch.manual_seed(0)
    m_t = nn.Linear(8, 4)
    h_t = fit(m_t, mse_step, (x, y), optimizer=torch.optim.SGD(m_t.parameters(), lr=0.05), epochs=2,
              batch_size=10, seed=3, device="cpu", progress=False, drop_last=False)
    torch.manual_seed(0)
    m_d = nn.Linear(8, 4)
    h_d = fit(m_d, mse_step, DictDataset(x, y), optimizer=torch.optim.SGD(m_d.parameters(), lr=0.05), epochs=2,
              batch_size=10, seed=3, device="cpu", progress=False, drop_last=False, collate_fn=collate)
    assert len(h_d.loss) == 2 * 7  # 64 samples in batches of 10, last one partial
    assert h_d.loss == h_t.loss
    assert_bitwise_equal(params_of(m_t), params_of(m_d))


def test_dataset_path_exact_resume_with_dropout(tmp_path):
    x, y = regression_data()
    full = run_resumable(DictDataset(x, y), None, model_seed=0, collate_fn=collate)
    ckpt = tmp_path / "ds.pt"
    run_resumable(DictDataset(x, y), ckpt, model_seed=0, max_steps=6, collate_fn=collate)
    resumed = run_resumable(DictDataset(x, y), ckpt, model_seed=7, collate_fn=collate)
    assert full[5].loss == resumed[5].loss
    assert_bitwise_equal(params_of(full[0]), params_of(resumed[0]))


class NoisyDataset(DictDataset):
    """Augments with the global torch RNG (as random crops/noise do): loading a batch draws numbers."""

    def __getitem__(self, i):
        item = super().__getitem__(i)
        return {"x": item["x"] + 0.1 * torch.randn(8), "y": item["y"]}


def test_dataset_with_random_augmentation_exact_resume(tmp_path):
    x, y = regression_data()
    full = run_resumable(NoisyDataset(x, y), None, model_seed=0, collate_fn=collate)
    ckpt = tmp_path / "aug.pt"
    run_resumable(NoisyDataset(x, y), ckpt, model_seed=0, max_steps=7, collate_fn=collate)
    resumed = run_resumable(NoisyDataset(x, y), ckpt, model_seed=7, collate_fn=collate)
    assert full[5].loss == resumed[5].loss
    assert_bitwise_equal(params_of(full[0]), params_of(resumed[0]))


# ---------------------------------------------------------------- evaluation and keep_best
def test_keep_best_restores_best_weights_and_records_epoch():
    snapshots, values = [], iter([1.0, 5.0, 3.0])  # peaks at the 2nd evaluation (epoch index 1)

    def eval_fn(m):
        snapshots.append(params_of(m))
        assert not m.training
        return {"score": next(values), "other": -1.0}

    model, hist = run_regression(seed=0, eval_fn=eval_fn, keep_best="score")
    assert [e["step"] for e in hist.evals] == [4, 8, 12] and [e["epoch"] for e in hist.evals] == [0, 1, 2]
    assert hist.best == {"step": 8, "epoch": 1, "score": 5.0, "other": -1.0}
    assert_bitwise_equal(params_of(model), snapshots[1])
    assert not torch.equal(snapshots[1]["net.0.weight"], snapshots[2]["net.0.weight"])
    assert hist.eval_series("score") == ([4, 8, 12], [1.0, 5.0, 3.0])
    assert model.training  # eval mode is switched back


def test_without_keep_best_the_last_weights_stay():
    snapshots = []
    model, hist = run_regression(seed=0, eval_fn=lambda m: snapshots.append(params_of(m)) or {"s": len(snapshots)})
    assert hist.best is None
    assert_bitwise_equal(params_of(model), snapshots[-1])


def test_eval_every_steps():
    model, hist = run_regression(seed=0, eval_fn=lambda m: {"s": 0.0}, eval_every=5)
    assert [e["step"] for e in hist.evals] == [5, 10]
    assert [e["epoch"] for e in hist.evals] == [1, 2]  # step 5 is in epoch 1, step 10 in epoch 2


def test_keep_best_unknown_key():
    with pytest.raises(ValueError, match=r"keep_best='rsum' is not among the eval metrics \['score'\]"):
        run_regression(seed=0, eval_fn=lambda m: {"score": 1.0}, keep_best="rsum")


# ---------------------------------------------------------------- bad input
def test_bad_input():
    x, y = regression_data(n=20)
    model = nn.Linear(8, 4)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    kw = dict(optimizer=opt, epochs=1, device="cpu", progress=False)
    with pytest.raises(ValueError, match="batch_size 32 is larger than the data \\(20 samples\\) with drop_last=True"):
        fit(model, mse_step, (x, y), batch_size=32, **kw)
    with pytest.raises(ValueError, match=r"same first dimension, got \[20, 19\]"):
        fit(model, mse_step, (x, y[:19]), batch_size=4, **kw)
    with pytest.raises(ValueError, match="must be positive"):
        fit(model, mse_step, (x, y), batch_size=0, **kw)
    with pytest.raises(ValueError, match="must be positive"):
        fit(model, mse_step, (x, y), batch_size=4, **{**kw, "epochs": 0})
    # drop_last=False accepts one partial batch
    hist = fit(model, mse_step, (x, y), batch_size=32, drop_last=False, **kw)
    assert len(hist.loss) == 1


def test_nan_loss_raises_with_help():
    x, y = regression_data(n=32)
    model = nn.Linear(8, 4)
    calls = []

    def step(m, batch):
        calls.append(1)
        loss = mse_step(m, batch)
        return loss * float("nan") if len(calls) == 3 else loss

    with pytest.raises(FloatingPointError, match="loss is nan at step 2: lower the learning rate"):
        fit(model, step, (x, y), optimizer=torch.optim.SGD(model.parameters(), lr=0.1), epochs=2, batch_size=8,
            device="cpu", progress=False)


# ---------------------------------------------------------------- helpers
def test_epoch_order_is_a_pure_function():
    before = torch.get_rng_state()
    a = epoch_order(50, seed=3, epoch=2)
    torch.manual_seed(1234)
    b = epoch_order(50, seed=3, epoch=2)
    assert torch.equal(a, b)
    assert torch.equal(torch.sort(a).values, torch.arange(50))
    assert not torch.equal(a, epoch_order(50, seed=3, epoch=3))
    assert not torch.equal(a, epoch_order(50, seed=4, epoch=2))
    torch.set_rng_state(before)
    epoch_order(50, 0, 0)
    assert torch.equal(torch.get_rng_state(), before)  # draws from its own generator only


Pair = collections.namedtuple("Pair", "image text")


def test_to_device_nested():
    batch = {"a": torch.ones(2), "b": [torch.zeros(3), (torch.ones(1), "label", 7)],
             "c": Pair(torch.ones(2), torch.zeros(2)), "d": None}
    moved = to_device(batch, torch.device("meta"))
    assert moved["a"].device.type == "meta" and moved["a"].shape == (2,)
    assert isinstance(moved["b"], list) and isinstance(moved["b"][1], tuple)
    assert moved["b"][0].device.type == "meta" and moved["b"][1][0].device.type == "meta"
    assert moved["b"][1][1:] == ("label", 7) and moved["d"] is None
    assert isinstance(moved["c"], Pair) and moved["c"].text.device.type == "meta"
    assert batch["a"].device.type == "cpu"  # the input is not modified


# ---------------------------------------------------------------- mixed precision
def test_amp_on_cpu_bfloat16():
    x, y = regression_data()
    torch.manual_seed(0)
    model = DropoutNet(p=0.0)
    dtypes = []

    def step(m, batch):
        out = m(batch[0])
        dtypes.append(out.dtype)
        return nn.functional.mse_loss(out.float(), batch[1])

    hist = fit(model, step, (x, y), optimizer=torch.optim.Adam(model.parameters(), lr=1e-2), epochs=3,
               batch_size=16, device="cpu", amp=True, progress=False)
    assert set(dtypes) == {torch.bfloat16}  # autocast was on
    assert all(math.isfinite(v) for v in hist.loss)
    assert model.net[0].weight.dtype == torch.float32
    assert sum(hist.loss[-4:]) < sum(hist.loss[:4])


def test_history_to_dict_roundtrip():
    _, hist = run_regression(seed=0, eval_fn=lambda m: {"s": 1.0})
    again = History(**copy.deepcopy(hist.to_dict()))
    assert again.loss == hist.loss and again.evals == hist.evals and again.seconds == hist.seconds


# ---------------------------------------------------------------- resume only what was asked for
def fit_again(data, ckpt, lr_factor=1.0, **overrides):
    """The resumable run of the tests above, built afresh, with some settings changed."""
    model, opt, sched, margin, counter, step, after = build(0)
    for group in opt.param_groups:
        group["lr"] *= lr_factor
    kw = dict(epochs=3, batch_size=16, seed=11) | overrides
    return fit(model, step, data, optimizer=opt, scheduler=sched, stateful={"margin": margin, "counter": counter},
               after_step=after, device="cpu", progress=False, checkpoint_path=ckpt, **kw)


@pytest.mark.parametrize("change,match", [
    (dict(lr_factor=0.01), r"group 0 lr: 0\.005 in the checkpoint, 5e-05 now"),
    (dict(seed=7), r"seed: 11 in the checkpoint, 7 now"),
    (dict(batch_size=8), r"batch_size: 16 in the checkpoint, 8 now"),
    (dict(grad_clip=1.0), r"grad_clip: None in the checkpoint, 1\.0 now"),
])
def test_resume_with_other_settings_raises_and_says_what_differs(tmp_path, change, match):
    data = regression_data()
    ckpt = tmp_path / "run.pt"
    run_resumable(data, ckpt, model_seed=0, max_steps=6)
    with pytest.raises(ValueError, match="other settings.*" + match):
        fit_again(data, ckpt, **change)


def test_training_longer_is_not_another_setting(tmp_path):
    data = regression_data()
    ckpt = tmp_path / "run.pt"
    run_resumable(data, ckpt, model_seed=0, max_steps=6)
    assert len(fit_again(data, ckpt, epochs=4).loss) == 16  # more epochs resume: 6 done + 10 more


def test_checkpoints_load_with_weights_only_and_refuse_pickled_objects(tmp_path):
    data = regression_data()
    ckpt = tmp_path / "run.pt"
    run_resumable(data, ckpt, model_seed=0, max_steps=4)
    saved = torch.load(ckpt, weights_only=True)  # tensors and plain values only
    assert saved["config"]["seed"] == 11 and saved["config"]["optimizer"] == "Adam"
    saved["history"]["extra"] = DictDataset(torch.zeros(1), torch.zeros(1))  # an arbitrary Python object
    torch.save(saved, ckpt)
    with pytest.raises(ValueError, match="does not unpickle them"):
        run_resumable(data, ckpt, model_seed=0)
