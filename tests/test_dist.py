"""mmalign.dist and fit under torch.distributed: 2 CPU processes (gloo) spawned by the tests themselves.

The reference is always the single-process computation on the whole batch, in float64: the gathered
InfoNCE loss and gradients, the weights after a few steps of fit, and a resume across world sizes.
"""

import os

import pytest
import torch
import torch.distributed as td
import torch.multiprocessing as mp
from torch import nn

from mmalign import dist
from mmalign.losses import info_nce
from mmalign.train import fit

WORLD = 2
B, D, DIN = 12, 5, 7


def _spawn(fn, tmp_path, *args):
    """Run ``fn(rank, tmp_path, *args)`` on WORLD gloo processes on a free localhost port."""
    mp.spawn(_entry, args=(fn, dist.free_port(), str(tmp_path), args), nprocs=WORLD, join=True)


def _entry(rank, fn, port, tmp, args):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(WORLD),
                      LOCAL_RANK=str(rank), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    # rendezvous through a file, not the port: a port picked by free_port() can be taken by another test run
    # on the same machine before rank 0 binds it, and then two runs' processes would meet
    td.init_process_group("gloo", init_method=f"file://{tmp}/rendezvous-{port}", rank=rank, world_size=WORLD)
    assert dist.init("gloo")  # already initialised: says so
    try:
        fn(rank, tmp, *args)
    finally:
        dist.cleanup()


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, DIN, generator=g, dtype=torch.float64)
    y = torch.randn(B, DIN, generator=g, dtype=torch.float64)
    ids = torch.tensor([0, 0, 1, 2, 3, 3, 4, 5, 6, 0, 7, 3])  # scene 0 and 3 span both ranks
    return x, y, ids


def _model(seed=1):
    torch.manual_seed(seed)
    return nn.ModuleDict({"i": nn.Linear(DIN, D), "t": nn.Linear(DIN, D)}).double()


# ---- gathered InfoNCE: loss and gradients ---------------------------------------------------------


def _gathered_one(rank, with_ids, detach_others):
    x, y, ids = _batch()
    n = B // WORLD
    sl = slice(rank * n, (rank + 1) * n)
    model = _model()
    zi, zt = model["i"](x[sl]), model["t"](y[sl])
    zi.retain_grad()
    if detach_others:  # the classic bug: other ranks detached, local slice only, no gradient exchange
        parts = [torch.empty_like(zi) for _ in range(WORLD)]
        td.all_gather(parts, zi.detach())
        parts[rank] = zi
        pt = [torch.empty_like(zt) for _ in range(WORLD)]
        td.all_gather(pt, zt.detach())
        pt[rank] = zt
        loss = info_nce(torch.cat(parts), torch.cat(pt), temperature=0.1)
    else:
        loss = dist.gathered_info_nce(zi, zt, temperature=0.1, ids=ids[sl] if with_ids else None)
    loss.backward()
    emb_grad = zi.grad.clone()
    for p in model.parameters():  # average over ranks by hand (what DDP does inside fit)
        td.all_reduce(p.grad)
        p.grad /= WORLD
    return {"loss": loss.detach(), "emb_grad": emb_grad, "grads": {k: p.grad for k, p in model.named_parameters()}}


def _gathered_worker(rank, tmp):
    out = {mode: _gathered_one(rank, *mode) for mode in [(False, False), (True, False), (False, True)]}
    a = torch.randn(3 + rank, 4)  # unequal rows across ranks
    with pytest.raises(ValueError, match="same number of rows on every rank"):
        dist.all_gather(a)
    model = _model()
    with pytest.raises(ValueError, match="divisible by 2"):
        fit(model, _step, _fit_data(), optimizer=torch.optim.SGD(model.parameters(), lr=0.1), epochs=1,
            batch_size=BATCH + 1, device="cpu", progress=False)
    torch.save(out, f"{tmp}/r{rank}.pt")


@pytest.fixture(scope="module")
def gathered(tmp_path_factory):
    """One 2-process run for all the gathered-loss checks (spawning costs seconds)."""
    tmp = tmp_path_factory.mktemp("gathered")
    _spawn(_gathered_worker, tmp)
    return [torch.load(tmp / f"r{r}.pt") for r in range(WORLD)]


def _single(with_ids):
    x, y, ids = _batch()
    model = _model()
    zi, zt = model["i"](x), model["t"](y)
    zi.retain_grad()
    loss = info_nce(zi, zt, temperature=0.1, ids=ids) if with_ids else info_nce(zi, zt, temperature=0.1)
    loss.backward()
    return loss.detach(), zi.grad, {k: p.grad for k, p in model.named_parameters()}


@pytest.mark.parametrize("with_ids", [False, True])
def test_gathered_info_nce_equals_single_process_loss_and_gradients(gathered, with_ids):
    loss, emb_grad, grads = _single(with_ids)
    n = B // WORLD
    for r in range(WORLD):
        out = gathered[r][(with_ids, False)]
        torch.testing.assert_close(out["loss"], loss, rtol=1e-12, atol=1e-12)
        # the backward sums over ranks: the local embedding gradient is W x dL/dz, and the
        # parameter gradients averaged over ranks are exactly the single-process ones
        torch.testing.assert_close(out["emb_grad"], WORLD * emb_grad[r * n:(r + 1) * n], rtol=1e-10, atol=1e-12)
        for k, g in grads.items():
            torch.testing.assert_close(out["grads"][k], g, rtol=1e-10, atol=1e-12)


def test_same_scene_on_another_rank_is_a_positive_not_a_negative(gathered):
    # scene 0 (rows 0, 1 on rank 0 and row 9 on rank 1) must be one positive set: the loss with ids
    # differs from the diagonal-only loss, and equals the single-process loss with ids (test above)
    with_ids = gathered[0][(True, False)]["loss"]
    diag, _, _ = _single(False)
    assert abs(float(with_ids) - float(diag)) > 1e-3, (float(with_ids), float(diag))


def test_detaching_other_ranks_gives_gradients_world_size_times_too_small(gathered):
    loss, _, grads = _single(False)
    out = gathered[0][(False, True)]
    torch.testing.assert_close(out["loss"], loss, rtol=1e-12, atol=1e-12)  # same value ...
    for k, g in grads.items():  # ... but the averaged gradient is 1/W of the true one
        torch.testing.assert_close(out["grads"][k] * WORLD, g, rtol=1e-10, atol=1e-12)


def test_unequal_rows_and_indivisible_batch_raise_clear_errors_on_every_rank(gathered):
    assert len(gathered) == WORLD  # both workers got past their pytest.raises checks


# ---- one process: identity, and bad input ----------------------------------------------------------


def test_single_process_is_the_identity_and_equals_info_nce():
    assert not dist.is_distributed() and dist.rank() == 0 and dist.world_size() == 1 and dist.is_main()
    x, y, ids = _batch()
    assert dist.all_gather(x) is x
    torch.testing.assert_close(dist.gathered_info_nce(x, y, temperature=0.1, ids=ids), info_nce(x, y, temperature=0.1, ids=ids))
    torch.testing.assert_close(dist.gathered_info_nce(x, y, temperature=0.1), info_nce(x, y, temperature=0.1))
    assert dist.rank_offset_labels(4).tolist() == [0, 1, 2, 3]
    assert float(dist.all_reduce_mean(2.5)) == 2.5


def test_bad_input():
    x, y, ids = _batch()
    with pytest.raises(ValueError, match="temperature"):
        dist.gathered_info_nce(x, y, temperature=0.0)
    with pytest.raises(ValueError, match=r"ids=\(ids of a, ids of b\) needs both sides"):
        dist.gathered_info_nce(x, y, temperature=0.1, ids=(None, ids))
    with pytest.raises(ValueError, match="same number of rows"):
        dist.gathered_info_nce(x, y[:5], temperature=0.1)
    with pytest.raises(ValueError, match="n_local"):
        dist.rank_offset_labels(0)
    with pytest.raises(TypeError, match="torch.Tensor"):
        dist.all_gather([1, 2])
    with pytest.raises(ValueError, match="backend"):
        os.environ["WORLD_SIZE"] = "1"
        try:
            dist.init("mpi")
        finally:
            del os.environ["WORLD_SIZE"]
    assert dist.init() is False  # no torchrun environment: nothing to initialise


# ---- fit under 2 processes -------------------------------------------------------------------------

N_FIT, BATCH, STEPS = 48, 12, 6


def _fit_data():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(N_FIT, DIN, generator=g, dtype=torch.float64)
    y = x @ torch.randn(DIN, DIN, generator=g, dtype=torch.float64) + 0.1 * torch.randn(N_FIT, DIN, generator=g,
                                                                                          dtype=torch.float64)
    ids = torch.arange(N_FIT) // 2  # two captions per scene, often on different ranks
    return x, y, ids


def _step(model, batch):
    x, y, ids = batch
    return dist.gathered_info_nce(model["i"](x), model["t"](y), temperature=0.1, ids=ids), {"n": float(len(x))}


def _fit(max_steps=None, checkpoint=None, epochs=2):
    model = _model()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    hist = fit(model, _step, _fit_data(), optimizer=opt, epochs=epochs, batch_size=BATCH, seed=4,
               device="cpu", max_steps=max_steps, checkpoint_path=checkpoint, progress=False)
    return model, hist


def _fit_worker(rank, tmp, max_steps, checkpoint):
    model, hist = _fit(max_steps, checkpoint)
    torch.save({"state": model.state_dict(), "loss": hist.loss, "n": hist.metrics["n"]}, f"{tmp}/r{rank}.pt")


def test_two_process_fit_matches_one_process_with_the_same_global_batch(tmp_path):
    _spawn(_fit_worker, tmp_path, None, None)
    ref, ref_hist = _fit()
    assert len(ref_hist.loss) == 2 * N_FIT // BATCH
    for r in range(WORLD):
        out = torch.load(tmp_path / f"r{r}.pt")
        for k, v in ref.state_dict().items():
            torch.testing.assert_close(out["state"][k], v, rtol=1e-9, atol=1e-11)
        # logged loss: the global loss (same on every rank), metrics averaged over ranks (local size B/W)
        torch.testing.assert_close(torch.tensor(out["loss"]), torch.tensor(ref_hist.loss), rtol=1e-9, atol=1e-11)
        assert out["n"] == [BATCH / WORLD] * len(ref_hist.loss)


def test_resume_a_two_process_checkpoint_in_one_process(tmp_path):
    ckpt = tmp_path / "ckpt.pt"
    _spawn(_fit_worker, tmp_path, STEPS - 1, str(ckpt))  # stops mid-epoch 2 (4 steps an epoch)
    assert ckpt.exists() and torch.load(ckpt, weights_only=False)["global_step"] == STEPS - 1
    resumed, hist = _fit(checkpoint=ckpt)
    ref, ref_hist = _fit()
    assert len(hist.loss) == len(ref_hist.loss)
    for k, v in ref.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[k], v, rtol=1e-9, atol=1e-11)


# ---- mixed precision --------------------------------------------------------------------------------


def test_fit_amp_names_and_bad_amp():
    x, y, ids = _fit_data()
    model = _model().float()
    data = (x.float(), y.float(), ids)
    hist = fit(model, _step, data, optimizer=torch.optim.Adam(model.parameters(), 1e-2), epochs=1,
               batch_size=BATCH, device="cpu", amp="bf16", progress=False)
    assert all(torch.isfinite(torch.tensor(hist.loss)))
    with pytest.raises(ValueError, match="amp must be"):
        fit(model, _step, data, optimizer=torch.optim.Adam(model.parameters()), epochs=1, batch_size=BATCH,
            device="cpu", amp="fp8", progress=False)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("amp", ["fp16", "bf16"])
def test_fit_amp_on_cuda_keeps_logits_float32_and_learns(amp):
    x, y, ids = _fit_data()
    model = _model().float()
    data = (x.float(), y.float(), ids)
    seen = []

    def step(m, batch):
        a, b, i = batch
        za, zb = m["i"](a), m["t"](b)
        seen.append((za.dtype, info_nce(za, zb, temperature=0.1, ids=i).dtype))
        return info_nce(za, zb, temperature=0.1, ids=i)

    hist = fit(model, step, data, optimizer=torch.optim.Adam(model.parameters(), 1e-2), epochs=5,
               batch_size=BATCH, device="cuda", amp=amp, progress=False)
    half = torch.float16 if amp == "fp16" else torch.bfloat16
    assert seen[0] == (half, torch.float32), seen[0]
    assert hist.loss[-1] < hist.loss[0], (hist.loss[0], hist.loss[-1])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_all_gather_on_cuda_single_process_is_identity():
    x = torch.randn(4, 3, device="cuda", requires_grad=True)
    loss = dist.gathered_info_nce(x, x.detach() + 0.1, temperature=0.1)
    loss.backward()
    assert x.grad.device.type == "cuda" and loss.dtype == torch.float32


# ---- chapter 9 helpers (mmalign.experiments.scaling) -----------------------------------------------


def test_local_negatives_loss_is_the_mean_of_per_part_info_nce():
    from mmalign.experiments.scaling import local_negatives_loss

    x, y, ids = _batch()
    parts = [info_nce(x[i:i + 3], y[i:i + 3], temperature=0.07, ids=ids[i:i + 3]) for i in range(0, B, 3)]
    torch.testing.assert_close(local_negatives_loss(4)(x, y, ids), sum(parts) / 4, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(local_negatives_loss(1)(x, y, ids), info_nce(x, y, temperature=0.07, ids=ids))
    with pytest.raises(ValueError, match="equal parts"):
        local_negatives_loss(5)(x, y, ids)
    with pytest.raises(ValueError, match="n_chunks"):
        local_negatives_loss(0)


def test_hand_softmax_overflows_in_float16_and_info_nce_does_not():
    from mmalign.experiments.scaling import hand_softmax_loss, overflow_table

    logits = torch.tensor([[12.0, 1.0], [0.5, 12.0]])
    assert torch.isnan(hand_softmax_loss(logits.half()))  # exp(12) > 65504: inf / inf
    expected = float(torch.nn.functional.cross_entropy(logits.double(), torch.arange(2)))
    assert abs(float(hand_softmax_loss(logits.double())) - expected) < 1e-12
    table = overflow_table()
    row = table["info_nce on float16 inputs, tau=0.01"]
    assert row["loss dtype"] == "torch.float32" and row["|log-softmax - float64|"] < 1e-3


def test_peak_memory_sees_a_known_allocation():
    from mmalign.experiments.scaling import peak_memory_bytes

    def alloc():
        x = torch.ones(1024, 1024)  # 4 MiB
        return float(x.sum())

    assert peak_memory_bytes(alloc) >= 4 * 2**20


# ---- fast paths that `make bench` measures keep their results identical ------------------------------


def _topk_by_full_sort(scores, keep, k):
    order = torch.sort(scores.masked_fill(~keep, float("-inf")), dim=1, descending=True, stable=True).indices
    idx = order[:, :k]
    n_keep = keep.sum(1, keepdim=True)
    idx = torch.where(torch.arange(idx.shape[1])[None, :] < n_keep, idx, torch.full_like(idx, -1))
    if idx.shape[1] < k:
        idx = torch.cat([idx, idx.new_full((idx.shape[0], k - idx.shape[1]), -1)], dim=1)
    return idx


@pytest.mark.parametrize("k", [1, 2, 3, 7, 12])
def test_miner_top_k_equals_the_full_stable_sort_with_ties(k):
    from mmalign.miners import _topk_rows

    g = torch.Generator().manual_seed(k)
    for _ in range(20):
        scores = torch.randint(0, 4, (9, 10), generator=g).float() / 4  # many ties
        keep = torch.rand(9, 10, generator=g) > 0.3
        keep[0] = False  # a row without candidates
        assert torch.equal(_topk_rows(scores, keep, k), _topk_by_full_sort(scores, keep, k))
        scores = torch.randn(9, 10, generator=g)  # no ties
        assert torch.equal(_topk_rows(scores, keep, k), _topk_by_full_sort(scores, keep, k))


def _recall_by_full_masks(query, gallery, q_ids, g_ids, ks):
    """The earlier recall_at_k loop: (Q, G) masks, every count over the whole gallery."""
    from mmalign.retrieval import _log_comb

    scores = torch.nn.functional.normalize(query, dim=1) @ torch.nn.functional.normalize(gallery, dim=1).T
    pos = q_ids[:, None] == g_ids[None, :]
    best = scores.masked_fill(~pos, float("-inf")).amax(1, keepdim=True)
    above = ((scores > best) & ~pos).sum(1).double()
    tied_neg = ((scores == best) & ~pos).sum(1).double()
    tied_pos = ((scores == best) & pos).sum(1).double()
    m = torch.tensor(ks, dtype=torch.float64)[None, :] - above[:, None]
    t, p = tied_neg[:, None], tied_pos[:, None]
    m_safe = m.clamp(0, None).minimum(t)
    p_miss = torch.exp(_log_comb(t, m_safe) - _log_comb(t + p, m_safe))
    p_hit = torch.where(m <= 0, torch.zeros_like(m), torch.where(m > t, torch.ones_like(m), 1 - p_miss))
    return {k: float(h) / len(query) for k, h in zip(ks, p_hit.sum(0))}


@pytest.mark.parametrize("levels", [2, 5, 1000])  # few distinct scores = many ties; 1000 = almost none
def test_recall_top_k_path_equals_the_full_mask_computation(levels):
    from mmalign.retrieval import recall_at_k

    g = torch.Generator().manual_seed(levels)
    gallery = torch.randint(0, levels, (60, 3), generator=g).double() + 1
    query = torch.randint(0, levels, (25, 3), generator=g).double() + 1
    g_ids = torch.randint(0, 25, (60,), generator=g)
    g_ids[:25] = torch.arange(25)  # every query has a positive; some have several
    q_ids = torch.arange(25)
    for ks in [(1, 5, 10), (1,), (3, 60)]:
        for chunk in (None, 7):
            got = recall_at_k(query, gallery, q_ids, g_ids, ks, chunk_size=chunk)
            want = _recall_by_full_masks(query, gallery, q_ids, g_ids, ks)
            assert got == pytest.approx(want, abs=1e-12), (ks, chunk, got, want)


@pytest.mark.parametrize("bias_correction", [True, False])
def test_lamb_in_place_step_is_bit_identical_to_the_written_out_formula(bias_correction):
    from mmalign.optim import LAMB, lamb_trust_ratio

    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(7, 5))
    ref = p.detach().clone()
    opt = LAMB([p], lr=1e-2, weight_decay=0.05, bias_correction=bias_correction)
    m, v = torch.zeros_like(ref), torch.zeros_like(ref)
    b1, b2 = 0.9, 0.999
    for t in range(1, 5):
        grad = torch.randn(7, 5)
        p.grad = grad.clone()
        opt.step()
        m = m.mul(b1).add(grad, alpha=1 - b1)
        v = v.mul(b2).addcmul(grad, grad, value=1 - b2)
        m_hat, v_hat = (m / (1 - b1**t), v / (1 - b2**t)) if bias_correction else (m, v)
        update = m_hat / (v_hat.sqrt() + 1e-6) + 0.05 * ref
        ref = ref - 1e-2 * lamb_trust_ratio(ref, update) * update
        assert torch.equal(p.detach(), ref), f"step {t}: max |diff| {float((p.detach() - ref).abs().max())}"


@pytest.mark.parametrize("bias_correction", [True, False])
def test_lamb_scratch_buffers_shared_by_parameters_of_several_shapes_and_dtypes(bias_correction):
    """The scratch buffers are views of one buffer per (device, dtype), reused by every parameter and step:
    each parameter still gets exactly the step it gets alone, and a larger parameter grows the buffer."""
    from mmalign.optim import LAMB

    def params():
        torch.manual_seed(1)
        return [torch.nn.Parameter(torch.randn(3, 4)), torch.nn.Parameter(torch.randn(6, 5, dtype=torch.float64)),
                torch.nn.Parameter(torch.randn(9, 7)), torch.nn.Parameter(torch.randn(2))]

    together, alone = params(), params()
    opt = LAMB(together, lr=1e-2, weight_decay=0.05, bias_correction=bias_correction)
    opts = [LAMB([q], lr=1e-2, weight_decay=0.05, bias_correction=bias_correction) for q in alone]
    g = torch.Generator().manual_seed(2)
    for _ in range(3):
        for a, b in zip(together, alone):
            a.grad = torch.randn(a.shape, generator=g, dtype=a.dtype)
            b.grad = a.grad.clone()
        opt.step()
        for o in opts:
            o.step()
        for a, b in zip(together, alone):
            assert torch.equal(a.detach(), b.detach())
    sizes = {key[1]: buf.shape for key, buf in opt._scratch.items()}
    assert sizes == {torch.float32: (2, 63), torch.float64: (2, 30)}  # the largest of each dtype
    assert "_scratch" not in str(opt.state_dict())  # never saved


def test_queue_slice_writes_equal_the_modulo_index_writes():
    from mmalign.memory import MoCoQueue

    g = torch.Generator().manual_seed(0)
    size, dim = 10, 3
    q = MoCoQueue(size, dim)
    feats, ids, ptr = torch.zeros(size, dim), torch.full((size,), -1), 0
    for n in (3, 4, 6, 10, 13, 1, 9, 25, 2):
        x, i = torch.randn(n, dim, generator=g), torch.randint(0, 100, (n,), generator=g)
        q.enqueue(x, i)
        keep = min(n, size)
        slots = (ptr + n - keep + torch.arange(keep)) % size
        feats[slots], ids[slots] = x[n - keep:], i[n - keep:]
        ptr = (ptr + n) % size
        assert torch.equal(q._feats, feats) and torch.equal(q._ids, ids) and q.ptr == ptr, n
