"""Ring buffers, the momentum encoder and the MoCo loss: references, hand-worked cases, exact resume."""

import io
import math
from collections import deque

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mmalign.losses.moco import moco_loss
from mmalign.memory import HardNegativeMemory, MoCoQueue, MomentumEncoder


# ---------------------------------------------------------------- ring buffer
class ListRing:
    """Reference: slots filled one item at a time at a wrap-around pointer."""

    def __init__(self, size):
        self.slots, self.ptr = [None] * size, 0

    def write(self, items):
        for it in items:
            self.slots[self.ptr] = it
            self.ptr = (self.ptr + 1) % len(self.slots)


@pytest.mark.parametrize("cls", [HardNegativeMemory, MoCoQueue])
def test_ring_buffer_matches_list_reference(cls):
    size, dim = 7, 3
    buf, ref, fifo = cls(size, dim), ListRing(size), deque(maxlen=size)
    next_id = 0
    for n in [3, 0, 5, 2, 11, 1, 6, 7, 4]:  # wraps, an empty write, batches larger than the buffer
        ids = torch.arange(next_id, next_id + n)
        feats = ids[:, None].double() * torch.tensor([1.0, -1.0, 0.5], dtype=torch.float64)  # row = f(id)
        next_id += n
        (buf.write if cls is HardNegativeMemory else buf.enqueue)(feats, ids)
        ref.write(ids.tolist())
        fifo.extend(ids.tolist())
        got_f, got_i = buf.read() if cls is HardNegativeMemory else (buf.keys, buf.ids)
        want = [s for s in ref.slots if s is not None]
        assert got_i.tolist() == want  # slot order, like the reference
        assert sorted(got_i.tolist()) == sorted(fifo)  # = the last `size` items written
        assert torch.equal(got_f, (got_i[:, None].double() * torch.tensor([1.0, -1.0, 0.5])).float())
        assert buf.ptr == ref.ptr and len(buf) == len(want)
        assert got_f.dtype == torch.float32


def test_batch_larger_than_memory_keeps_the_last_rows():
    mem = HardNegativeMemory(4, 1)
    mem.write(torch.zeros(1, 1), torch.tensor([99]))
    mem.write(torch.arange(10.0)[:, None], torch.arange(10))  # ptr 1 -> 11 % 4 = 3
    feats, ids = mem.read()
    assert sorted(ids.tolist()) == [6, 7, 8, 9] and mem.ptr == 3 and len(mem) == 4
    assert ids.tolist() == [7, 8, 9, 6]  # item t went to slot (1 + t) % 4
    assert torch.equal(feats[:, 0], ids.float())


def test_write_detaches_and_casts():
    mem = HardNegativeMemory(3, 2, dtype=torch.float64)
    x = torch.randn(2, 2, requires_grad=True)
    mem.write(x * 2, torch.tensor([0, 1]))
    f, _ = mem.read()
    assert not f.requires_grad and f.dtype == torch.float64 and f.shape == (2, 2)


def test_select_violators_matches_loop():
    g = torch.Generator().manual_seed(0)
    for trial in range(20):
        n = 8
        sim = torch.randint(-4, 5, (n, n), generator=g).double() / 8
        ids = torch.randint(0, 5, (n,), generator=g)
        ids = torch.where(torch.rand(n, generator=g) < 0.5, ids, torch.arange(10, 10 + n))
        margin, k = 0.25, 1 + trial % 3
        got = HardNegativeMemory.select_violators(sim, k=k, margin=margin, ids=ids)
        S = sim.tolist()
        worst = {}
        for j in range(n):  # each caption anchor nominates its k most similar violating images
            viol = [i for i in range(n) if ids[i] != ids[j] and S[i][j] > S[j][j] - margin]
            viol.sort(key=lambda i: (-S[i][j], i))
            for i in viol[:k]:
                worst[i] = max(worst.get(i, -math.inf), S[i][j] - S[j][j])
        want = sorted(worst, key=lambda i: (worst[i], i))
        assert got.tolist() == want


def test_memory_state_dict_round_trip_and_errors():
    mem = HardNegativeMemory(5, 2)
    mem.write(torch.randn(7, 2), torch.arange(7))
    state = mem.state_dict()
    buf = io.BytesIO()
    torch.save(state, buf)
    mem.write(torch.randn(2, 2), torch.arange(2))  # state is a copy: later writes don't change it
    fresh = HardNegativeMemory(5, 2)
    fresh.load_state_dict(torch.load(io.BytesIO(buf.getvalue())))
    assert torch.equal(fresh.read()[0], state["features"]) and fresh.ptr == 2 and len(fresh) == 5
    with pytest.raises(ValueError, match="same size and dim"):
        HardNegativeMemory(4, 2).load_state_dict(state)
    with pytest.raises(ValueError, match="missing"):
        fresh.load_state_dict({"features": state["features"]})


def test_ring_buffer_bad_inputs():
    with pytest.raises(ValueError, match="size must be a positive integer"):
        HardNegativeMemory(0, 4)
    with pytest.raises(ValueError, match="size must be a positive integer"):
        MoCoQueue(-3, 4)
    with pytest.raises(ValueError, match="dim must be a positive integer"):
        MoCoQueue(8, 0)
    q = MoCoQueue(8, 4)
    with pytest.raises(ValueError, match=r"expected \(n, 4\) features"):
        q.enqueue(torch.randn(2, 3), torch.arange(2))
    with pytest.raises(ValueError, match=r"expected \(n, 4\) features"):
        q.enqueue(torch.randn(4), torch.arange(1))
    with pytest.raises(ValueError, match="one item id per row"):
        q.enqueue(torch.randn(2, 4), torch.arange(3))
    with pytest.raises(ValueError, match="k must be a positive integer"):
        HardNegativeMemory.select_violators(torch.rand(3, 3), k=0)
    with pytest.raises(ValueError, match="pos_for_cols"):
        HardNegativeMemory.select_violators(torch.rand(3, 4), ids=(torch.arange(3), torch.arange(4)))


# ---------------------------------------------------------------- momentum encoder
def test_momentum_update_matches_formula():
    torch.manual_seed(0)
    online = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2)).double()
    key = MomentumEncoder(online, momentum=0.9)
    assert all(not p.requires_grad for p in key.parameters())
    assert key.module[0].weight is not online[0].weight
    with torch.no_grad():  # move the online encoder, as an optimiser step would
        online[0].weight.add_(torch.randn(2, 3, dtype=torch.float64))
        online[0].bias.add_(1.0)
    online.train()(torch.randn(5, 3, dtype=torch.float64))  # changes the BatchNorm running stats
    w_k, b_k = key.module[0].weight.clone(), key.module[0].bias.clone()
    w_q, b_q = online[0].weight.clone(), online[0].bias.clone()
    key.update(online)
    m = 0.9
    for r in range(2):
        for c in range(3):
            assert key.module[0].weight[r, c].item() == pytest.approx(m * w_k[r, c].item() + (1 - m) * w_q[r, c].item(), abs=1e-15)
        assert key.module[0].bias[r].item() == pytest.approx(m * b_k[r].item() + (1 - m) * b_q[r].item(), abs=1e-15)
    assert torch.equal(key.module[1].running_mean, online[1].running_mean)  # buffers copied
    assert key.module[1].num_batches_tracked == online[1].num_batches_tracked
    assert torch.equal(online[0].weight, w_q)  # the online encoder is untouched
    out = key(torch.randn(4, 3, dtype=torch.float64))
    assert out.grad_fn is None and not out.requires_grad


def test_momentum_extremes_and_errors():
    online = nn.Linear(2, 2)
    frozen, copier = MomentumEncoder(online, 1.0), MomentumEncoder(online, 0.0)
    w0 = online.weight.detach().clone()
    with torch.no_grad():
        online.weight.mul_(3.0)
    frozen.update(online)
    copier.update(online)
    assert torch.equal(frozen.module.weight, w0) and torch.equal(copier.module.weight, online.weight)
    with pytest.raises(ValueError, match=r"momentum must be in \[0, 1\]"):
        MomentumEncoder(online, 1.5)
    with pytest.raises(ValueError, match="same encoder"):
        frozen.update(nn.Linear(2, 3))
    with pytest.raises(ValueError, match="torch.nn.Module"):
        MomentumEncoder(lambda x: x)


# ---------------------------------------------------------------- MoCo loss
def ref_moco(q, k, queue, t, q_ids=None, queue_ids=None):
    """Explicit loops in float64 with math.exp/log."""
    def unit(v):
        n = math.sqrt(sum(x * x for x in v))
        return [x / n for x in v]

    total = 0.0
    for n, (qn, kn) in enumerate(zip(q, k)):
        qn, kn = unit(qn), unit(kn)
        pos = sum(a * b for a, b in zip(qn, kn)) / t
        negs = [sum(a * b for a, b in zip(qn, unit(kj))) / t for j, kj in enumerate(queue)
                if q_ids is None or queue_ids[j] != q_ids[n]]
        total += -(pos - math.log(math.exp(pos) + sum(math.exp(x) for x in negs)))
    return total / len(q)


def test_moco_loss_hand_case():
    q = [[1.0, 0.0], [0.0, 2.0]]
    k = [[0.6, 0.8], [0.8, 0.6]]
    queue = [[2.0, 0.0], [0.0, 1.0], [-1.0, 0.0]]  # not unit: normalised inside
    t = 0.5
    # query 0: l_pos = 0.6, l_neg = (1, 0, -1) -> -log(e^1.2 / (e^1.2 + e^2 + e^0 + e^-2))
    e = math.exp
    row0 = -math.log(e(1.2) / (e(1.2) + e(2.0) + e(0.0) + e(-2.0)))
    row1 = -math.log(e(1.2) / (e(1.2) + e(0.0) + e(2.0) + e(0.0)))
    loss = moco_loss(torch.tensor(q), torch.tensor(k), torch.tensor(queue), temperature=t)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx((row0 + row1) / 2, rel=1e-6)
    assert loss.item() == pytest.approx(ref_moco(q, k, queue, t), rel=1e-6)


def test_moco_loss_masks_copies_of_the_positive():
    q = [[1.0, 0.0], [0.0, 2.0]]
    k = [[0.6, 0.8], [0.8, 0.6]]
    queue = [[2.0, 0.0], [0.0, 1.0], [-1.0, 0.0]]
    q_ids, queue_ids = [0, 1], [0, 5, 1]  # query 0 skips queue[0], query 1 skips queue[2]
    e = math.exp
    row0 = -math.log(e(1.2) / (e(1.2) + e(0.0) + e(-2.0)))
    row1 = -math.log(e(1.2) / (e(1.2) + e(0.0) + e(2.0)))
    loss = moco_loss(torch.tensor(q), torch.tensor(k), torch.tensor(queue), temperature=0.5, ids=(torch.tensor(q_ids), torch.tensor(queue_ids)))
    assert loss.item() == pytest.approx((row0 + row1) / 2, rel=1e-6)
    unmasked = moco_loss(torch.tensor(q), torch.tensor(k), torch.tensor(queue), temperature=0.5)
    assert unmasked.item() > loss.item()
    # every queue entry a copy of the positive, or an empty queue: only the positive is left, loss 0
    all_same = moco_loss(torch.tensor(q), torch.tensor(k), torch.tensor(queue), temperature=0.5, ids=(torch.tensor([3, 3]), torch.tensor([3, 3, 3])))
    assert all_same.item() == 0.0
    assert moco_loss(torch.tensor(q), torch.tensor(k), torch.zeros(0, 2)).item() == 0.0


def test_moco_loss_random_against_loop_grad_and_precision():
    g = torch.Generator().manual_seed(0)
    q, k, queue = torch.randn(5, 4, generator=g), torch.randn(5, 4, generator=g), torch.randn(9, 4, generator=g)
    q_ids, queue_ids = torch.randint(0, 4, (5,), generator=g), torch.randint(0, 4, (9,), generator=g)
    want = ref_moco(q.tolist(), k.tolist(), queue.tolist(), 0.1, q_ids.tolist(), queue_ids.tolist())
    assert moco_loss(q, k, queue, temperature=0.1, ids=(q_ids, queue_ids)).item() == pytest.approx(want, rel=1e-5)
    # gradients: only into q; gradcheck in float64
    qd, kd = q.double().requires_grad_(), k.double().requires_grad_()
    moco_loss(qd, kd, queue.double(), temperature=0.1, ids=(q_ids, queue_ids)).backward()
    assert kd.grad is None and torch.isfinite(qd.grad).all()
    assert torch.autograd.gradcheck(lambda x: moco_loss(x, k.double(), queue.double(), temperature=0.1, ids=(q_ids, queue_ids)),
                                     (q.double().requires_grad_(),))
    # extreme temperature stays finite; half-precision inputs give a float32 loss
    assert torch.isfinite(moco_loss(q, k, queue, temperature=1e-3))
    half = moco_loss(q.half(), k.half(), queue.half(), temperature=0.1, ids=(q_ids, queue_ids))
    assert half.dtype == torch.float32 and half.item() == pytest.approx(want, rel=1e-2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto = moco_loss(q, k, queue, temperature=0.1, ids=(q_ids, queue_ids))
    assert auto.dtype == torch.float32 and auto.item() == pytest.approx(want, rel=1e-5)


def test_moco_loss_bad_inputs():
    q, k = torch.randn(3, 4), torch.randn(3, 4)
    with pytest.raises(ValueError, match="2-d"):
        moco_loss(q[0], k, torch.randn(5, 4))
    with pytest.raises(ValueError, match="same shape"):
        moco_loss(q, k[:2], torch.randn(5, 4))
    with pytest.raises(ValueError, match="build the queue with dim=4"):
        moco_loss(q, k, torch.randn(5, 3))
    with pytest.raises(ValueError, match="temperature must be > 0"):
        moco_loss(q, k, torch.randn(5, 4), temperature=0)
    with pytest.raises(ValueError, match="ids must be a pair"):
        moco_loss(q, k, torch.randn(5, 4), ids=(torch.arange(3), None))
    with pytest.raises(ValueError, match="one id per row"):
        moco_loss(q, k, torch.randn(5, 4), ids=(torch.arange(3), torch.arange(4)))


# ---------------------------------------------------------------- exact resume of a MoCo run
def make_run(seed):
    torch.manual_seed(seed)
    enc = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 4))
    opt = torch.optim.SGD(enc.parameters(), lr=0.1, momentum=0.9)
    return enc, opt, MomentumEncoder(enc, momentum=0.9), MoCoQueue(10, 4), HardNegativeMemory(6, 4)


def train_step(run, step):
    enc, opt, key, queue, mem = run
    g = torch.Generator().manual_seed(1000 + step)
    n = 3 if step % 3 == 2 else 4  # short batches too; 10 is no multiple of the batch: wrap-around
    x = torch.randn(n, 6, generator=g)
    ids = torch.randint(0, 5, (n,), generator=g)
    x_q, x_k = x + 0.1 * torch.randn(n, 6, generator=g), x + 0.1 * torch.randn(n, 6, generator=g)
    q, k = enc(x_q), key(x_k)
    neg, neg_ids = torch.cat([queue.keys, mem.read()[0]]), torch.cat([queue.ids, mem.read()[1]])
    loss = moco_loss(q, k, neg, temperature=0.2, ids=(ids, neg_ids))
    opt.zero_grad()
    loss.backward()
    opt.step()
    key.update(enc)
    queue.enqueue(F.normalize(k, dim=1), ids)
    sim = F.normalize(q.detach(), dim=1) @ F.normalize(k, dim=1).T
    rows = HardNegativeMemory.select_violators(sim, k=1, margin=0.5, ids=ids)
    mem.write(F.normalize(q.detach()[rows], dim=1), ids[rows])
    return loss.item()


def test_checkpoint_resume_is_exact():
    straight = make_run(0)
    losses = [train_step(straight, s) for s in range(8)]

    first = make_run(0)
    resumed = [train_step(first, s) for s in range(4)]
    buf = io.BytesIO()
    torch.save({name: obj.state_dict() for name, obj in zip(["enc", "opt", "key", "queue", "mem"], first)}, buf)
    del first

    second = make_run(123)  # different init: everything must come from the checkpoint
    ckpt = torch.load(io.BytesIO(buf.getvalue()))
    for name, obj in zip(["enc", "opt", "key", "queue", "mem"], second):
        obj.load_state_dict(ckpt[name])
    resumed += [train_step(second, s) for s in range(4, 8)]

    assert resumed == losses
    for a, b in zip(straight[0].state_dict().values(), second[0].state_dict().values()):
        assert torch.equal(a, b)
    for a, b in zip(straight[2].state_dict().values(), second[2].state_dict().values()):
        assert torch.equal(a, b)
    assert torch.equal(straight[3].keys, second[3].keys) and torch.equal(straight[3].ids, second[3].ids)
    assert torch.equal(straight[4].read()[0], second[4].read()[0])
    assert len(straight[3]) == 10 and len(straight[4]) > 0  # the queue wrapped, the memory was used


# ---------------------------------------------------------------- device
def test_to_device_moves_buffers():
    q = MoCoQueue(4, 2, device="cpu").to("cpu")
    assert q.keys.device.type == "cpu" and q.device.type == "cpu"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_cuda():
    q = MoCoQueue(5, 3, device="cuda")
    q.enqueue(torch.randn(7, 3), torch.arange(7))  # CPU input lands on the queue's device
    assert q.keys.is_cuda and q.ids.is_cuda and len(q) == 5
    mem = HardNegativeMemory(4, 3).to("cuda")
    mem.write(torch.randn(2, 3, device="cuda"), torch.arange(2, device="cuda"))
    assert mem.read()[0].is_cuda
    qq, kk = torch.randn(2, 3, device="cuda"), torch.randn(2, 3, device="cuda")
    loss = moco_loss(qq, kk, q.keys, temperature=0.1, ids=(torch.arange(2, device="cuda"), q.ids))
    cpu = moco_loss(qq.cpu(), kk.cpu(), q.keys.cpu(), temperature=0.1, ids=(torch.arange(2), q.ids.cpu()))
    assert loss.is_cuda and loss.item() == pytest.approx(cpu.item(), rel=1e-5)
    key = MomentumEncoder(nn.Linear(3, 3)).cuda()
    online = nn.Linear(3, 3).cuda()
    key.update(online)
    sim = torch.rand(6, 6, device="cuda")
    assert HardNegativeMemory.select_violators(sim, k=2).is_cuda


def test_moco_loss_with_a_learned_temperature_and_masked_queue_entries_has_finite_gradients():
    """A queue entry of the query's own item is masked to -inf; dividing the masked logits by a learned
    temperature gave its gradient 0 * inf = NaN. The loss and every gradient must match a loop."""
    import math

    from mmalign.losses import moco_loss

    g = torch.Generator().manual_seed(0)
    q = torch.randn(4, 3, generator=g, dtype=torch.float64, requires_grad=True)
    k = torch.randn(4, 3, generator=g, dtype=torch.float64)
    queue = torch.randn(5, 3, generator=g, dtype=torch.float64)
    q_ids, queue_ids = torch.tensor([0, 1, 2, 3]), torch.tensor([0, 9, 2, 2, 7])
    log_t = torch.tensor(math.log(0.1), dtype=torch.float64, requires_grad=True)
    loss = moco_loss(q, k, queue, temperature=log_t.exp(), ids=(q_ids, queue_ids))
    loss.backward()
    assert torch.isfinite(log_t.grad) and torch.isfinite(q.grad).all()
    qn, kn, un = (torch.nn.functional.normalize(x.detach(), dim=1) for x in (q, k, queue))
    t = 0.1
    expected = 0.0
    for i in range(4):
        logits = [float(qn[i] @ kn[i]) / t] + [float(qn[i] @ un[j]) / t for j in range(5) if queue_ids[j] != q_ids[i]]
        top = max(logits)
        expected += (top + math.log(sum(math.exp(x - top) for x in logits)) - logits[0]) / 4
    assert float(loss) == pytest.approx(expected, rel=1e-12)
    # the temperature's gradient against central differences of the same loss
    f = lambda lt: float(moco_loss(q.detach(), k, queue, temperature=math.exp(lt), ids=(q_ids, queue_ids)))  # noqa: E731
    h = 1e-6
    assert float(log_t.grad) == pytest.approx((f(math.log(0.1) + h) - f(math.log(0.1) - h)) / (2 * h), rel=1e-5)
