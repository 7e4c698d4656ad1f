"""fit under torch.distributed through DistributedDataParallel, parameters outside the model, evaluation on
rank 0 and IterableDatasets: 2 gloo processes against the 1-process run, and resumes bit for bit.

The references are independent runs: the uninterrupted run (a resume must equal it bit for bit), the
1-process run on the same global batches (2 processes must equal it to float64 rounding), and for DDP's
averaging the 1-process loss that is the mean of each half-batch's own InfoNCE.
"""

import time

import pytest
import torch
from torch.utils.data import IterableDataset

from mmalign import dist
from mmalign.experiments.scaling import local_negatives_loss
from mmalign.losses import info_nce
from mmalign.models.temperature import LearnableTemperature
from mmalign.train import TrainState, epoch_order, fit, load_checkpoint, outside_parameters, save_checkpoint, train_step
from mmalign.train.distributed import check_outside_parameters
from test_dist import BATCH, WORLD, _fit_data, _model, _spawn

STOP = 5  # of 8 steps (2 epochs of 4): stops mid-epoch 2


def _temp_run(max_steps=None, checkpoint=None, init=0.1, model_seed=1, stateful=False):
    """A CLIP-style run whose temperature is trained outside the model (as LearnableTemperature's docstring
    advises); ``init``/``model_seed`` differ in a resumed run so that anything not restored shows."""
    model = _model(model_seed)
    temp = LearnableTemperature(init)
    opt = torch.optim.Adam([*model.parameters(), *temp.parameters()], lr=2e-2)

    def step(m, batch):
        x, y, ids = batch
        return dist.gathered_info_nce(m["i"](x), m["t"](y), temperature=temp(), ids=ids)

    hist = fit(model, step, _fit_data(), optimizer=opt, epochs=2, batch_size=BATCH, seed=4, device="cpu",
               max_steps=max_steps, checkpoint_path=checkpoint, progress=False,
               stateful={"temp": temp} if stateful else None)
    return {"state": {k: v.clone() for k, v in model.state_dict().items()}, "log_scale": temp.log_scale.detach().clone(),
            "loss": hist.loss}


class Stream(IterableDataset):
    """The tensors of _fit_data as a stream, in fit's seeded order of the epoch (set_epoch)."""

    def __init__(self):
        self.data, self.epoch = _fit_data(), 0

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __iter__(self):
        for i in epoch_order(len(self.data[0]), 4, self.epoch).tolist():
            yield tuple(t[i] for t in self.data)


def _plain_run(loss, data=None, **kw):
    model = _model()

    def step(m, batch):
        x, y, ids = batch
        return loss(m["i"](x), m["t"](y), ids)

    hist = fit(model, step, _fit_data() if data is None else data, optimizer=torch.optim.Adam(model.parameters(), 1e-2),
               epochs=2, batch_size=BATCH, seed=4, device="cpu", progress=False, **kw)
    return {k: v.clone() for k, v in model.state_dict().items()}, hist


def _gathered(zi, zt, ids):
    return dist.gathered_info_nce(zi, zt, temperature=0.1, ids=ids)


def _worker(rank, tmp):
    out = {"full": _temp_run()}
    ckpt = f"{tmp}/temp.pt"
    out["stopped"] = _temp_run(max_steps=STOP, checkpoint=ckpt)
    out["resumed"] = _temp_run(checkpoint=ckpt, init=0.5, model_seed=7)  # 2 -> 2
    # each rank its own half-batch InfoNCE, no gathering: only DDP's averaging keeps the ranks together
    out["local"] = _plain_run(lambda zi, zt, ids: info_nce(zi, zt, temperature=0.1, ids=ids))[0]
    calls = []

    def eval_fn(m):
        calls.append(dist.rank())
        return {"rank": float(dist.rank()), "w": float(m["i"].weight.sum())}

    out["evals"] = _plain_run(_gathered, eval_fn=eval_fn)[1].evals
    out["eval calls"] = calls
    out["stream"] = _plain_run(_gathered, data=Stream())[0]
    # a plain tensor outside the model cannot be averaged by DDP: refused, named
    model, extra = _model(), torch.zeros(3, requires_grad=True)
    with pytest.raises(ValueError, match=r"optimizer group 0 parameter 4 \(3,\), a plain tensor outside the model"):
        fit(model, lambda m, b: m["i"](b[0]).sum() + extra.sum(), _fit_data(),
            optimizer=torch.optim.SGD([*model.parameters(), extra], lr=0.1), epochs=1, batch_size=BATCH,
            device="cpu", progress=False)
    # train_step builds the DistributedDataParallel wrapper in a loop of one's own
    model = _model()
    state = TrainState(model, torch.optim.SGD(model.parameters(), lr=0.1))
    train_step(state, lambda m, b: m["i"](b[0]).sum() + m["t"](b[0]).sum(), (torch.randn(4, 7, dtype=torch.float64),))
    out["ddp"] = type(state.ddp).__name__
    # a parameter the loss never uses: trained with find_unused_parameters=True, refused (named) without it
    out["unused"] = _unused_run(find_unused_parameters=True)
    with pytest.raises(ValueError, match=r"find_unused_parameters=False, step 0 gave no gradient to "
                                         r"model\.unused\.weight, model\.unused\.bias .*pass "
                                         r"find_unused_parameters=True to fit"):
        _unused_run(find_unused_parameters=False)
    out["refused"] = True
    torch.save(out, f"{tmp}/r{rank}.pt")


def _unused_run(**kw):
    model = _model()
    model["unused"] = torch.nn.Linear(3, 2).double()  # in the optimizer, never in the loss
    _run_with(model, _gathered, **kw)
    return {k: v.clone() for k, v in model.state_dict().items()}


def _run_with(model, loss, **kw):
    def step(m, batch):
        x, y, ids = batch
        return loss(m["i"](x), m["t"](y), ids)

    return fit(model, step, _fit_data(), optimizer=torch.optim.Adam(model.parameters(), 1e-2), epochs=2,
               batch_size=BATCH, seed=4, device="cpu", progress=False, **kw)


@pytest.fixture(scope="module")
def two(tmp_path_factory):
    """One 2-process run for every check below (spawning costs seconds)."""
    tmp = tmp_path_factory.mktemp("ddp")
    _spawn(_worker, tmp)
    return tmp, [torch.load(tmp / f"r{r}.pt") for r in range(WORLD)]


def _assert_bitwise(a, b):
    assert a["loss"] == b["loss"]
    assert torch.equal(a["log_scale"], b["log_scale"])
    for k, v in a["state"].items():
        assert torch.equal(b["state"][k], v), k


# ---- a parameter outside the model -----------------------------------------------------------------


@pytest.mark.parametrize("stateful", [False, True])
def test_outside_temperature_resumes_bit_identically_in_one_process(tmp_path, stateful):
    full = _temp_run(stateful=stateful)
    assert abs(float(full["log_scale"]) - float(torch.log(torch.tensor(1 / 0.1)))) > 1e-2  # it was trained
    ckpt = tmp_path / "run.pt"
    _temp_run(max_steps=STOP, checkpoint=ckpt, stateful=stateful)
    saved = torch.load(ckpt, weights_only=True)
    assert list(saved["params"]) == ["0.4"]  # optimizer group 0, parameter 4: after the model's 4
    resumed = _temp_run(checkpoint=ckpt, init=0.5, model_seed=7, stateful=stateful)
    _assert_bitwise(full, resumed)


def test_outside_temperature_resumes_bit_identically_on_two_processes(two):
    tmp, runs = two
    for r in range(WORLD):
        _assert_bitwise(runs[r]["full"], runs[r]["resumed"])  # 2 -> 2, bit for bit
        _assert_bitwise(runs[0]["full"], runs[r]["full"])  # every rank holds the same weights and temperature
    one = _temp_run()  # the 1-process run on the same global batches: the temperature's gradient was averaged
    torch.testing.assert_close(runs[0]["full"]["log_scale"], one["log_scale"], rtol=1e-6, atol=1e-7)
    for k, v in one["state"].items():
        torch.testing.assert_close(runs[0]["full"]["state"][k], v, rtol=1e-6, atol=1e-7)
    resumed_in_one = _temp_run(checkpoint=tmp / "temp.pt", init=0.5, model_seed=7)  # 2 -> 1
    torch.testing.assert_close(resumed_in_one["log_scale"], one["log_scale"], rtol=1e-6, atol=1e-7)


def test_without_the_saved_parameter_the_resume_refuses_and_names_it(tmp_path):
    model = _model()
    path = save_checkpoint(tmp_path / "old.pt", TrainState(model, torch.optim.Adam(model.parameters())))
    temp = LearnableTemperature(0.1)
    state = TrainState(_model(), None)
    state.optimizer = torch.optim.Adam([*state.model.parameters(), *temp.parameters()])
    state.stateful = {}
    with pytest.raises(ValueError, match=r"does not hold the optimizer's parameter optimizer group 0 parameter 4 \(\) "
                                         r"\(outside the model, at optimizer position 0\.4\)"):
        load_checkpoint(path, state)
    # through fit, the run's fingerprint already says what differs
    _plain_run(_gathered, max_steps=2, checkpoint_path=tmp_path / "fit.pt")
    with pytest.raises(ValueError, match=r"other settings.*outside the model: None in the checkpoint, "
                                         r"\['0\.4: optimizer group 0 parameter 4 \(\)'\] now"):
        _temp_run(checkpoint=tmp_path / "fit.pt")


def test_outside_parameters_are_named_and_checked_for_their_device():
    model, temp = _model(), LearnableTemperature(0.1)
    opt = torch.optim.Adam([{"params": model.parameters()}, {"params": temp.parameters(), "lr": 0.1}])
    found = outside_parameters(model, opt, {"temp": temp})
    assert [(o.key, o.name) for o in found] == [("1.0", "stateful['temp'].log_scale ()")]
    assert found[0].param is temp.log_scale
    assert outside_parameters(model, torch.optim.Adam(model.parameters())) == []
    on_meta = torch.nn.Parameter(torch.zeros(2, device="meta"))
    opt = torch.optim.SGD([*model.parameters(), on_meta], lr=0.1)
    with pytest.raises(ValueError, match=r"optimizer group 0 parameter 4 \(2,\), which is on meta while the model "
                                         r"trains on cpu; move it there"):
        check_outside_parameters(outside_parameters(model, opt), torch.device("cpu"))
    with pytest.raises(ValueError, match="which is on meta"):
        fit(model, lambda m, b: m["i"](b[0]).sum(), _fit_data(), optimizer=opt, epochs=1, batch_size=BATCH,
            device="cpu", progress=False)


def _best_run(checkpoint=None, max_steps=None, init=0.1, model_seed=1):
    """Evaluations at steps 2, 4, 6, 8 score 1, 3, 2, 0.5: the best is step 4's. Returns the final
    temperature and weights, and the temperature and weights each evaluation saw."""
    model, temp = _model(model_seed), LearnableTemperature(init)
    opt = torch.optim.Adam([*model.parameters(), *temp.parameters()], lr=2e-2)
    steps, seen = [], {}

    def step(m, batch):
        x, y, ids = batch
        return info_nce(m["i"](x), m["t"](y), temperature=temp(), ids=ids)

    def eval_fn(m):
        seen[steps[-1]] = (temp.log_scale.detach().clone(), {k: v.clone() for k, v in m.state_dict().items()})
        return {"score": {2: 1.0, 4: 3.0, 6: 2.0, 8: 0.5}[steps[-1]]}

    hist = fit(model, step, _fit_data(), optimizer=opt, epochs=2, batch_size=BATCH, seed=4, device="cpu",
               eval_fn=eval_fn, eval_every=2, keep_best="score", after_step=lambda m, b, s: steps.append(s),
               checkpoint_path=checkpoint, max_steps=max_steps, progress=False)
    return temp.log_scale.detach().clone(), {k: v.clone() for k, v in model.state_dict().items()}, seen, hist


def test_keep_best_restores_the_outside_parameter_it_had_at_the_best_evaluation(tmp_path):
    log_scale, state, seen, hist = _best_run()
    assert hist.best["step"] == 4 and sorted(seen) == [2, 4, 6, 8]
    assert torch.equal(log_scale, seen[4][0])  # the temperature of step 4, not of step 8
    assert not torch.equal(seen[4][0], seen[8][0])  # (it kept training after step 4)
    assert all(torch.equal(state[k], v) for k, v in seen[4][1].items())
    # the best values survive a checkpoint: stopped at step 5 (after the best), resumed from other values
    _best_run(checkpoint=tmp_path / "best.pt", max_steps=5)
    saved = torch.load(tmp_path / "best.pt", weights_only=True)
    assert torch.equal(saved["best_params"]["0.4"], seen[4][0])
    resumed_log_scale, resumed_state, _, _ = _best_run(checkpoint=tmp_path / "best.pt", init=0.5, model_seed=7)
    assert torch.equal(resumed_log_scale, seen[4][0])
    assert all(torch.equal(resumed_state[k], v) for k, v in seen[4][1].items())


def test_find_unused_parameters_must_be_a_bool():
    with pytest.raises(ValueError, match="find_unused_parameters must be True or False, got 'yes'"):
        _run_with(_model(), _gathered, find_unused_parameters="yes")


# ---- DistributedDataParallel ---------------------------------------------------------------------


def test_fit_and_train_step_run_the_loss_through_ddp(two):
    _, runs = two
    assert [r["ddp"] for r in runs] == ["DistributedDataParallel"] * WORLD


def test_ddp_averages_the_gradients_of_local_losses(two):
    """Each rank's own half-batch InfoNCE, averaged by DDP, trains the 1-process model whose loss is the mean
    of the two halves' InfoNCE (the gradient of a mean is the mean of the gradients)."""
    _, runs = two
    ref, _ = _plain_run(local_negatives_loss(WORLD, temperature=0.1))
    gathered_ref, _ = _plain_run(_gathered)
    for r in range(WORLD):
        for k, v in ref.items():
            torch.testing.assert_close(runs[r]["local"][k], v, rtol=1e-9, atol=1e-11)
    assert not torch.allclose(ref["i.weight"], gathered_ref["i.weight"])  # local negatives train another model


def test_an_unused_parameter_trains_with_find_unused_parameters_and_is_named_without(two):
    """With find_unused_parameters=True the 2-process run equals the 1-process run, the unused layer keeps
    its initial weights (no gradient, as in one process); without it every rank raised, naming the layer
    (checked in the worker)."""
    _, runs = two
    init = _model()
    init["unused"] = torch.nn.Linear(3, 2).double()
    one = _unused_run()
    for r in range(WORLD):
        assert runs[r]["refused"]
        for k, v in one.items():
            torch.testing.assert_close(runs[r]["unused"][k], v, rtol=1e-9, atol=1e-11)
        assert torch.equal(runs[r]["unused"]["unused.weight"], init["unused"].weight.detach())
    assert not torch.equal(one["i.weight"], init["i"].weight.detach())  # the used layers trained


def test_evaluation_runs_on_rank_zero_and_every_rank_records_it(two):
    _, runs = two
    assert runs[0]["eval calls"] == [0, 0] and runs[1]["eval calls"] == []
    assert runs[0]["evals"] == runs[1]["evals"] and [e["rank"] for e in runs[1]["evals"]] == [0.0, 0.0]


# ---- IterableDataset -------------------------------------------------------------------------------


def test_iterable_dataset_equals_the_tensor_path_on_one_and_two_processes(two):
    _, runs = two
    tensors, hist = _plain_run(_gathered)
    stream, stream_hist = _plain_run(_gathered, data=Stream())
    assert stream_hist.loss == hist.loss
    for k, v in tensors.items():
        assert torch.equal(stream[k], v), k
        torch.testing.assert_close(runs[1]["stream"][k], v, rtol=1e-9, atol=1e-11)


def test_iterable_dataset_resumes_exactly(tmp_path):
    full, hist = _plain_run(_gathered, data=Stream())
    ckpt = tmp_path / "stream.pt"
    _plain_run(_gathered, data=Stream(), max_steps=STOP, checkpoint_path=ckpt)
    resumed, resumed_hist = _plain_run(_gathered, data=Stream(), checkpoint_path=ckpt)
    assert resumed_hist.loss == hist.loss
    for k, v in full.items():
        assert torch.equal(resumed[k], v), k


def test_iterable_dataset_refuses_workers():
    with pytest.raises(ValueError, match=r"IterableDataset is read in the training process \(num_workers=0\), got "
                                         r"num_workers=2"):
        _plain_run(_gathered, data=Stream(), num_workers=2)
    with pytest.raises(TypeError, match="map-style torch Dataset .* or a torch IterableDataset, got int"):
        _plain_run(_gathered, data=3)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_outside_temperature_on_cuda_resumes_bit_identically(tmp_path):
    def run(checkpoint=None, max_steps=None, init=0.1, seed=1):
        model, temp = _model(seed).float().cuda(), LearnableTemperature(init).cuda()
        opt = torch.optim.Adam([*model.parameters(), *temp.parameters()], lr=2e-2)
        x, y, ids = _fit_data()

        def step(m, batch):
            a, b, i = batch
            return info_nce(m["i"](a), m["t"](b), temperature=temp(), ids=i)

        fit(model, step, (x.float(), y.float(), ids), optimizer=opt, epochs=2, batch_size=BATCH, seed=4,
            device="cuda", amp=False, max_steps=max_steps, checkpoint_path=checkpoint, progress=False)
        return temp.log_scale.detach().cpu(), {k: v.cpu() for k, v in model.state_dict().items()}

    full = run()
    run(checkpoint=tmp_path / "c.pt", max_steps=STOP)
    resumed = run(checkpoint=tmp_path / "c.pt", init=0.5, seed=7)
    assert torch.equal(full[0], resumed[0])
    assert all(torch.equal(full[1][k], resumed[1][k]) for k in full[1])
    cpu_temp = LearnableTemperature(0.1)  # left on the CPU while the model trains on CUDA: refused, named
    model = _model().float()
    with pytest.raises(ValueError, match=r"optimizer group 0 parameter 4 \(\), which is on cpu while the model trains"):
        fit(model, lambda m, b: m["i"](b[0]).sum(), tuple(t.float() if t.is_floating_point() else t for t in _fit_data()),
            optimizer=torch.optim.SGD([*model.parameters(), *cpu_temp.parameters()], lr=0.1), epochs=1,
            batch_size=BATCH, device="cuda", progress=False)


class _SlowToSave:
    """A stateful object whose state_dict takes a while on rank 0: rank 0 writes the checkpoint late."""

    def state_dict(self):
        if dist.rank() == 0:
            time.sleep(0.5)
        return {}

    def load_state_dict(self, state):
        pass


def _checkpoint_race_worker(rank, tmp):
    ckpt = f"{tmp}/race.pt"
    model = _model()
    fit(model, lambda m, b: m["i"](b[0]).sum() + m["t"](b[1]).sum(), _fit_data(),
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1), epochs=1, batch_size=BATCH, seed=4, device="cpu",
        progress=False, checkpoint_path=ckpt, stateful={"slow": _SlowToSave()})
    # the moment fit returns, on every rank, the checkpoint of the finished run is on disk (a run that
    # starts now resumes from it, on every rank alike)
    saved = torch.load(ckpt, weights_only=False)
    torch.save({"exists": True, "epoch": saved["epoch"], "step": saved["global_step"]}, f"{tmp}/race{rank}.pt")


def test_no_rank_leaves_fit_before_the_checkpoint_is_written(tmp_path):
    """Rank 0 writes the checkpoint; every rank waits for it at each save (without that, a resume that
    started right after fit read an older checkpoint on one rank, and the ranks' collectives went apart)."""
    _spawn(_checkpoint_race_worker, tmp_path)
    seen = [torch.load(tmp_path / f"race{r}.pt") for r in range(WORLD)]
    assert seen[0] == seen[1] == {"exists": True, "epoch": 1, "step": seen[0]["step"]} and seen[0]["step"] > 0, seen
