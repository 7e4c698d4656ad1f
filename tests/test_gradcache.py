"""grad_cache_loss (Gao et al., 2021) against the full-batch backward: same loss, same gradients of the
encoders and of a temperature used by the loss, dropout replayed, and fit with it equals fit without, on
one process and on 2 gloo processes under DistributedDataParallel (against the 1-process full batch)."""

import pytest
import torch
from torch import nn

from mmalign import dist
from mmalign.losses import info_nce, siglip_loss
from mmalign.models.temperature import LearnableTemperature
from mmalign.train import fit, grad_cache_loss
from test_dist import BATCH as DDP_BATCH, WORLD, _fit_data, _model as _ddp_model, _spawn

B, DIN, D = 14, 6, 4


def data(seed=0):
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(B, DIN, generator=g, dtype=torch.float64), torch.randn(B, DIN, generator=g, dtype=torch.float64)
    return x, y, torch.arange(B) // 2  # two captions per scene, split across chunks


def model(p=0.0, seed=1):
    torch.manual_seed(seed)
    return nn.ModuleDict({"i": nn.Sequential(nn.Linear(DIN, 8), nn.Dropout(p), nn.Linear(8, D)),
                          "t": nn.Linear(DIN, D)}).double()


def grads(m, extra=()):
    return [p.grad.clone() for p in [*m.parameters(), *extra]]


@pytest.mark.parametrize("chunk", [1, 3, 5, 14, 100])
@pytest.mark.parametrize("loss_name", ["info_nce", "siglip"])
def test_equals_the_full_batch_loss_and_gradients(chunk, loss_name):
    x, y, ids = data()
    temp = LearnableTemperature(0.1)
    bias = nn.Parameter(torch.tensor(-2.0, dtype=torch.float64))

    def loss_fn(zi, zt):
        if loss_name == "siglip":
            return siglip_loss(zi, zt, temperature=temp(), bias=bias, ids=ids)
        return info_nce(zi, zt, temperature=temp(), ids=ids)

    full = model()
    ref = loss_fn(full["i"](x), full["t"](y))
    ref.backward()
    cached = model()
    loss = grad_cache_loss(lambda a, b: (cached["i"](a), cached["t"](b)), loss_fn, (x, y), chunk_size=chunk,
                           params=cached.parameters())
    ref_grads = grads(full)
    ref_extra = [temp.log_scale.grad.clone(), bias.grad.clone() if loss_name == "siglip" else None]
    temp.log_scale.grad, bias.grad = None, None
    loss.backward()
    assert float(loss.detach()) == pytest.approx(float(ref.detach()), rel=1e-13)
    for got, want in zip(grads(cached), ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-11, atol=1e-13)
    torch.testing.assert_close(temp.log_scale.grad, ref_extra[0], rtol=1e-6, atol=1e-9)  # a float32 parameter
    if loss_name == "siglip":
        torch.testing.assert_close(bias.grad, ref_extra[1], rtol=1e-11, atol=1e-13)


def _chunked_with_graph(m, x, y, ids, chunk):
    """The reference for dropout: the same chunks, forwarded in the same order with graph, one backward."""
    zi = torch.cat([m["i"](x[s:s + chunk]) for s in range(0, B, chunk)])
    zt = torch.cat([m["t"](y[s:s + chunk]) for s in range(0, B, chunk)])
    loss = info_nce(zi, zt, temperature=0.1, ids=ids)
    loss.backward()
    return loss


def test_dropout_masks_are_replayed_in_the_second_pass():
    x, y, ids = data()
    ref_model = model(p=0.5)
    torch.manual_seed(5)
    ref = _chunked_with_graph(ref_model, x, y, ids, 4)
    m = model(p=0.5)
    torch.manual_seed(5)
    loss = grad_cache_loss(lambda a, b: (m["i"](a), m["t"](b)), lambda zi, zt: info_nce(zi, zt, temperature=0.1, ids=ids),
                           (x, y), chunk_size=4, params=m.parameters())
    loss.backward()
    assert float(loss.detach()) == pytest.approx(float(ref.detach()), rel=1e-13)
    for got, want in zip(grads(m), grads(ref_model)):
        torch.testing.assert_close(got, want, rtol=1e-11, atol=1e-13)
    # a second pass with fresh masks would give other gradients: the replay is what makes them equal
    other = model(p=0.5)
    torch.manual_seed(6)
    _chunked_with_graph(other, x, y, ids, 4)
    assert not torch.allclose(grads(other)[0], grads(m)[0])


def test_fit_with_grad_cache_trains_the_full_batch_model():
    x, y, ids = data()

    def run(chunk):
        m = model()

        def step(mm, batch):
            a, b, i = batch
            loss_fn = lambda zi, zt: info_nce(zi, zt, temperature=0.1, ids=i)  # noqa: E731
            if chunk is None:
                return loss_fn(mm["i"](a), mm["t"](b))
            return grad_cache_loss(lambda u, v: (mm["i"](u), mm["t"](v)), loss_fn, (a, b), chunk_size=chunk,
                                   params=mm.parameters())

        hist = fit(m, step, (x, y, ids), optimizer=torch.optim.Adam(m.parameters(), lr=1e-2), epochs=3, batch_size=B,
                   device="cpu", progress=False)
        return m, hist

    full, full_hist = run(None)
    cached, cached_hist = run(3)
    assert cached_hist.loss == pytest.approx(full_hist.loss, rel=1e-12)
    for k, v in full.state_dict().items():
        torch.testing.assert_close(cached.state_dict()[k], v, rtol=1e-10, atol=1e-12)


def test_bad_input():
    x, y, ids = data()
    m = model()
    embed = lambda a, b: (m["i"](a), m["t"](b))  # noqa: E731
    loss_fn = lambda zi, zt: info_nce(zi, zt, temperature=0.1)  # noqa: E731
    with pytest.raises(ValueError, match="chunk_size"):
        grad_cache_loss(embed, loss_fn, (x, y), chunk_size=0, params=m.parameters())
    with pytest.raises(ValueError, match="same, non-zero first dimension"):
        grad_cache_loss(embed, loss_fn, (x, y[:5]), chunk_size=2, params=m.parameters())
    with pytest.raises(ValueError, match="params holds no tensor that requires grad"):
        grad_cache_loss(embed, loss_fn, (x, y), chunk_size=2, params=[])
    with pytest.raises(ValueError, match="loss_fn must return a scalar"):
        grad_cache_loss(embed, lambda zi, zt: zi, (x, y), chunk_size=2, params=m.parameters())
    with pytest.raises(TypeError, match="embed_fn must return a tensor"):
        grad_cache_loss(lambda a, b: "z", loss_fn, (x, y), chunk_size=2, params=m.parameters())


# ---- under DistributedDataParallel: 2 gloo processes = 1 process on the whole batch ------------------

DDP_VARIANTS = ("gathered", "local_loss", "siglip")


def _ddp_run(variant, chunk, device="cpu"):
    """fit with a temperature (and for SigLIP a bias) trained outside the model; ``chunk=None``: the plain
    full-batch loss. Returns the weights, the outside parameters and the gradients of the first step (on
    the CPU)."""
    model = _ddp_model().to(device)
    temp = LearnableTemperature(0.1).to(device)
    bias = nn.Parameter(torch.tensor(-2.0, dtype=torch.float64, device=device))
    extra = [*temp.parameters(), *([bias] if variant == "siglip" else [])]
    first = {}

    def loss_fn(zi, zt, ids):
        if variant == "siglip":
            return dist.gathered_siglip_loss(zi, zt, temperature=temp(), bias=bias, ids=ids)
        return dist.gathered_info_nce(zi, zt, temperature=temp(), ids=ids, local_loss=variant == "local_loss")

    def step(m, batch):
        x, y, ids = batch
        if chunk is None:
            return loss_fn(m["i"](x), m["t"](y), ids)
        return grad_cache_loss(lambda u, v: (m["i"](u), m["t"](v)), lambda zi, zt: loss_fn(zi, zt, ids), (x, y),
                               chunk_size=chunk, params=m.parameters())

    def after_step(m, batch, global_step):
        if global_step == 1:  # the optimizer has stepped; the gradients it used are still there
            first.update({k: p.grad.cpu().clone() for k, p in m.named_parameters()})
            first.update({f"extra{i}": p.grad.cpu().clone() for i, p in enumerate(extra)})

    fit(model, step, _fit_data(), optimizer=torch.optim.Adam([*model.parameters(), *extra], lr=1e-2), epochs=2,
        batch_size=DDP_BATCH, seed=4, device=device, amp=False, progress=False, after_step=after_step)
    return {"state": {k: v.cpu().clone() for k, v in model.state_dict().items()},
            "extra": [p.detach().cpu().clone() for p in extra], "first grads": first}


def _ddp_worker(rank, tmp):
    # each rank holds 6 rows of every global batch of 12: chunks of 4 rows leave a shorter last chunk of 2
    torch.save({v: _ddp_run(v, chunk=4) for v in DDP_VARIANTS}, f"{tmp}/r{rank}.pt")


@pytest.fixture(scope="module")
def ddp_runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gradcache_ddp")
    _spawn(_ddp_worker, tmp)
    return [torch.load(tmp / f"r{r}.pt") for r in range(WORLD)]


@pytest.mark.parametrize("variant", DDP_VARIANTS)
def test_grad_cache_on_two_processes_equals_the_full_batch_on_one(ddp_runs, variant):
    """The reference is the ordinary full-batch backward in one process (no GradCache, no processes): the
    gradients of the first step (averaged by DDP), the weights after every step, the outside parameters."""
    _compare_to_one_process(ddp_runs, variant)
    ref = _ddp_run(variant, chunk=None)
    for run in ddp_runs:
        for got_p, ref_p in zip(run[variant]["extra"], ref["extra"]):
            torch.testing.assert_close(got_p, ref_p, rtol=1e-6, atol=1e-7)
    assert abs(float(ref["extra"][0]) - float(torch.log(torch.tensor(10.0)))) > 1e-3  # the temperature trained


def _compare_to_one_process(runs, variant, rtol=1e-9, atol=1e-11):
    ref = _ddp_run(variant, chunk=None)
    for r, run in enumerate(runs):
        got = run[variant]
        for k, g in ref["first grads"].items():
            tol = dict(rtol=1e-6, atol=1e-8) if k == "extra0" else dict(rtol=rtol, atol=atol)  # extra0: float32
            torch.testing.assert_close(got["first grads"][k], g, **tol, msg=f"rank {r}, {k}")
        for k, v in ref["state"].items():
            torch.testing.assert_close(got["state"][k], v, rtol=1e-6, atol=1e-8, msg=f"rank {r}, {k}")


def _nccl_worker(rank, tmp):
    import os

    import torch.distributed as td

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank))
    torch.cuda.set_device(rank)
    td.init_process_group("nccl", init_method=f"file://{tmp}/rendezvous", rank=rank, world_size=WORLD)
    try:
        torch.save({v: _ddp_run(v, chunk=4, device=f"cuda:{rank}") for v in DDP_VARIANTS}, f"{tmp}/r{rank}.pt")
    finally:
        td.destroy_process_group()


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="NCCL needs 2 CUDA GPUs (one per process)")
def test_grad_cache_under_nccl_on_two_gpus_equals_the_full_batch_on_one_cpu_process(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_nccl_worker, args=(str(tmp_path),), nprocs=WORLD, join=True)
    runs = [torch.load(tmp_path / f"r{r}.pt") for r in range(WORLD)]
    for variant in DDP_VARIANTS:
        _compare_to_one_process(runs, variant, rtol=1e-7, atol=1e-9)  # float64 on the GPUs: other summation order


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_grad_cache_on_cuda_replays_dropout_and_keeps_float32_logits_under_autocast():
    x, y, ids = (t.cuda() for t in data())
    x, y = x.float(), y.float()
    ref_model, m = model(p=0.5).float().cuda(), model(p=0.5).float().cuda()
    torch.manual_seed(5)
    zi = torch.cat([ref_model["i"](x[s:s + 4]) for s in range(0, B, 4)])
    zt = torch.cat([ref_model["t"](y[s:s + 4]) for s in range(0, B, 4)])
    ref = info_nce(zi, zt, temperature=0.1, ids=ids)
    ref.backward()
    torch.manual_seed(5)
    loss = grad_cache_loss(lambda a, b: (m["i"](a), m["t"](b)), lambda u, v: info_nce(u, v, temperature=0.1, ids=ids),
                           (x, y), chunk_size=4, params=m.parameters())
    loss.backward()
    assert float(loss) == pytest.approx(float(ref), rel=1e-5)
    for got, want in zip(grads(m), grads(ref_model)):  # CUDA dropout masks replayed in the second pass
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    m.zero_grad()
    with torch.autocast("cuda", dtype=torch.float16):
        loss = grad_cache_loss(lambda a, b: (m["i"](a), m["t"](b)),
                               lambda u, v: info_nce(u, v, temperature=0.1, ids=ids), (x, y), chunk_size=4,
                               params=m.parameters())
    loss.backward()
    assert loss.dtype == torch.float32 and all(torch.isfinite(p.grad).all() for p in m.parameters())
