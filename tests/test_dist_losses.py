"""Losses across 2 gloo processes against the single-process loss of the whole batch in float64: SigLIP's
distributed form, InfoNCE's local form (each rank its rows), mined negatives on the gathered batch, and the
all_gather check of shapes and dtypes."""

import pytest
import torch
import torch.distributed as td

from mmalign import dist
from mmalign.losses import info_nce, siglip_loss
from mmalign.miners import hardest_negatives
from mmalign.retrieval import similarity
from test_dist import B, WORLD, _batch, _model, _spawn

N = B // WORLD


def _learnables():
    return (torch.tensor(0.2, dtype=torch.float64, requires_grad=True),
            torch.tensor(-3.0, dtype=torch.float64, requires_grad=True))


def _run(loss_fn, rank=None):
    """Loss, embedding gradient and parameter gradients (averaged over ranks, as DDP does) of one loss."""
    x, y, ids = _batch()
    sl = slice(rank * N, (rank + 1) * N) if rank is not None else slice(None)
    model = _model()
    tau, bias = _learnables()
    zi, zt = model["i"](x[sl]), model["t"](y[sl])
    zi.retain_grad()
    loss = loss_fn(zi, zt, ids[sl], tau, bias)
    loss.backward()
    grads = {k: p.grad.clone() for k, p in model.named_parameters()}
    grads["tau"], grads["bias"] = tau.grad.clone() if tau.grad is not None else None, bias.grad.clone() if bias.grad is not None else None
    if rank is not None:
        for g in grads.values():
            if g is not None:
                td.all_reduce(g)
                g /= WORLD
    mean = dist.all_reduce_mean(loss.detach()) if rank is not None else loss.detach()
    return {"loss": loss.detach(), "mean": mean, "emb_grad": zi.grad.clone(), "grads": grads}


def _mined(zi, zt, ids):
    """Hardest negatives (k=2) mined on the whole (gathered) batch; the same indices on every rank."""
    ga, gb = dist.all_gather(zi.detach()), dist.all_gather(zt.detach())
    return hardest_negatives(similarity(ga, gb), ids=dist.all_gather_ids(ids), k=2)


CASES = {
    "siglip": (lambda zi, zt, i, t, b: dist.gathered_siglip_loss(zi, zt, temperature=t, bias=b, ids=i),
               lambda zi, zt, i, t, b: siglip_loss(zi, zt, temperature=t, bias=b, ids=i)),
    "siglip diagonal": (lambda zi, zt, i, t, b: dist.gathered_siglip_loss(zi, zt, temperature=t, bias=b),
                        lambda zi, zt, i, t, b: siglip_loss(zi, zt, temperature=t, bias=b)),
    "local": (lambda zi, zt, i, t, b: dist.gathered_info_nce(zi, zt, temperature=t, ids=i, local_loss=True),
              lambda zi, zt, i, t, b: info_nce(zi, zt, temperature=t, ids=i)),
    "local diagonal": (lambda zi, zt, i, t, b: dist.gathered_info_nce(zi, zt, temperature=t, local_loss=True),
                       lambda zi, zt, i, t, b: info_nce(zi, zt, temperature=t)),
    "global mined": (lambda zi, zt, i, t, b: dist.gathered_info_nce(zi, zt, temperature=t, ids=i,
                                                                    negatives=_mined(zi, zt, i)),
                     lambda zi, zt, i, t, b: info_nce(zi, zt, temperature=t, ids=i, negatives=_mined(zi, zt, i))),
    "local mined": (lambda zi, zt, i, t, b: dist.gathered_info_nce(zi, zt, temperature=t, ids=i, local_loss=True,
                                                                   negatives=_mined(zi, zt, i)),
                    lambda zi, zt, i, t, b: info_nce(zi, zt, temperature=t, ids=i, negatives=_mined(zi, zt, i))),
}


def _worker(rank, tmp):
    out = {name: _run(dist_fn, rank) for name, (dist_fn, _) in CASES.items()}
    errors = {}
    for name, x in (("width", torch.randn(3, 4 + rank)), ("dtype", torch.randn(3, 4, dtype=[torch.float32, torch.float64][rank])),
                    ("rows", torch.randn(3 + rank, 4))):
        try:
            dist.all_gather(x)
        except ValueError as err:
            errors[name] = str(err)
    out["errors"] = errors
    torch.save(out, f"{tmp}/r{rank}.pt")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dist_losses")
    _spawn(_worker, tmp)
    return [torch.load(tmp / f"r{r}.pt") for r in range(WORLD)]


@pytest.mark.parametrize("name", list(CASES))
def test_two_processes_equal_the_single_process_loss_and_gradients(runs, name):
    ref = _run(CASES[name][1])
    for r in range(WORLD):
        out = runs[r][name]
        # the mean over ranks is the global loss (the global form returns it on every rank)
        torch.testing.assert_close(out["mean"], ref["loss"], rtol=1e-12, atol=1e-12)
        # every rank's embedding gradient is W x dL/dz of its rows (the all-gather's backward sums over ranks)
        torch.testing.assert_close(out["emb_grad"], WORLD * ref["emb_grad"][r * N:(r + 1) * N], rtol=1e-10, atol=1e-12)
        for k, g in ref["grads"].items():  # averaged over ranks: the single-process gradients, temperature and bias too
            if g is None:
                assert out["grads"][k] is None, k
            else:
                torch.testing.assert_close(out["grads"][k], g, rtol=1e-10, atol=1e-12, msg=f"{name} {k}")


def test_local_forms_return_each_rank_its_part(runs):
    """Not the global loss on every rank: each rank's value is W x its part (they differ, their mean is global)."""
    for name in ("siglip", "local", "local mined"):
        assert abs(float(runs[0][name]["loss"]) - float(runs[1][name]["loss"])) > 1e-6, name
    assert float(runs[0]["global mined"]["loss"]) == float(runs[1]["global mined"]["loss"])


def test_mined_negatives_change_the_loss(runs):
    assert abs(float(runs[0]["global mined"]["mean"]) - float(runs[0]["local"]["mean"])) > 1e-3


def test_all_gather_names_the_shapes_and_dtypes_of_every_rank(runs):
    for r in range(WORLD):
        errors = runs[r]["errors"]
        assert errors["width"] == ("all_gather needs the same shape and dtype on every rank, got rank 0: (3, 4) float32, "
                                   "rank 1: (3, 5) float32; every process must build its tensor the same way (same "
                                   "model widths, same dtype, same autocast setting)")
        assert "rank 0: (3, 4) float32, rank 1: (3, 4) float64" in errors["dtype"]
        assert errors["rows"].startswith("all_gather needs the same number of rows on every rank, got [3, 4] per rank")


def test_one_process_forms_are_the_plain_losses():
    x, y, ids = _batch()
    tau, bias = _learnables()
    torch.testing.assert_close(dist.gathered_siglip_loss(x, y, temperature=tau, bias=bias, ids=ids),
                               siglip_loss(x, y, temperature=tau, bias=bias, ids=ids))
    torch.testing.assert_close(dist.gathered_info_nce(x, y, temperature=0.1, ids=ids, local_loss=True),
                               info_nce(x, y, temperature=0.1, ids=ids))
    with pytest.raises(ValueError, match="local_loss must be True or False"):
        dist.gathered_info_nce(x, y, local_loss="yes")
    with pytest.raises(ValueError, match="bias must be finite"):
        dist.gathered_siglip_loss(x, y, bias=float("inf"))
    with pytest.raises(ValueError, match="temperature must be > 0"):
        dist.gathered_siglip_loss(x, y, temperature=-1.0)


def test_mined_negative_masks_of_some_rows_are_those_rows_of_the_whole_masks():
    """What local_loss=True builds on one rank: the rows of its anchors only, never the gathered (B, B) masks."""
    from mmalign.losses._checks import mined_negative_masks

    g = torch.Generator().manual_seed(0)
    neg_a = torch.randint(-1, 9, (12, 3), generator=g)  # 12 row anchors over 9 columns, -1 = none
    neg_b = torch.randint(-1, 12, (9, 2), generator=g)
    full_ab, full_ba = mined_negative_masks((neg_a, neg_b), 12, 9, "cpu")
    part_ab, part_ba = mined_negative_masks((neg_a, neg_b), 12, 9, "cpu", rows=(slice(4, 8), slice(3, 6)))
    assert part_ab.shape == (4, 9) and part_ba.shape == (3, 12)
    assert torch.equal(part_ab, full_ab[4:8]) and torch.equal(part_ba, full_ba[3:6])
    for i in range(4):  # and against the indices themselves
        assert set(torch.nonzero(part_ab[i]).flatten().tolist()) == {j for j in neg_a[4 + i].tolist() if j >= 0}
    with pytest.raises(ValueError, match=r"negatives\[0\] \(for rows\) must be \(12, k\)"):  # the whole is checked
        mined_negative_masks((neg_a[:5], neg_b), 12, 9, "cpu", rows=(slice(0, 4), slice(0, 3)))
