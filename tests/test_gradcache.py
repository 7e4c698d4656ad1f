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


def _ddp_run(variant, chunk):
    """fit with a temperature (and for SigLIP a bias) trained outside the model; ``chunk=None``: the plain
    full-batch loss. Returns the weights, the outside parameters and the gradients of the first step."""
    model = _ddp_model()
    temp = LearnableTemperature(0.1)
    bias = nn.Parameter(torch.tensor(-2.0, dtype=torch.float64))
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
            first.update({k: p.grad.clone() for k, p in m.named_parameters()})
            first.update({f"extra{i}": p.grad.clone() for i, p in enumerate(extra)})

    fit(model, step, _fit_data(), optimizer=torch.optim.Adam([*model.parameters(), *extra], lr=1e-2), epochs=2,
        batch_size=DDP_BATCH, seed=4, device="cpu", progress=False, after_step=after_step)
    return {"state": {k: v.clone() for k, v in model.state_dict().items()},
            "extra": [p.detach().clone() for p in extra], "first grads": first}


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
    """The reference is the ordinary full-batch backward in one process (no GradCache, no processes)."""
    ref = _ddp_run(variant, chunk=None)
    for r in range(WORLD):
        got = ddp_runs[r][variant]
        for k, g in ref["first grads"].items():  # the gradient of the first step, averaged by DDP
            tol = dict(rtol=1e-6, atol=1e-8) if k.startswith("extra") and k != "extra1" else dict(rtol=1e-9, atol=1e-11)
            torch.testing.assert_close(got["first grads"][k], g, **tol, msg=f"rank {r}, {k}")
        for k, v in ref["state"].items():  # and every step after it
            torch.testing.assert_close(got["state"][k], v, rtol=1e-6, atol=1e-8, msg=f"rank {r}, {k}")
        for got_p, ref_p in zip(got["extra"], ref["extra"]):
            torch.testing.assert_close(got_p, ref_p, rtol=1e-6, atol=1e-7)
    assert abs(float(ref["extra"][0]) - float(torch.log(torch.tensor(10.0)))) > 1e-3  # the temperature trained
