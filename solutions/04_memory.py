# ---
# jupyter:
#   jupytext:
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Lab 4: the momentum update and the MoCo queue
#
# Chapter 4 drew negatives from a queue of keys made by a momentum encoder. Here you write its two moving
# parts yourself and check them against `mmalign.memory` and against cases worked out by hand:
#
# 1. the **momentum (EMA) update** $\theta_k \leftarrow m\,\theta_k + (1-m)\,\theta_q$;
# 2. the **queue**: enqueue the newest keys at a wrap-around pointer, which drops (overwrites) the oldest;
# 3. then you train the chapter's heads with MoCo using *your* two pieces.
#
# Write your code where it says `YOUR CODE HERE` (and delete the `raise NotImplementedError()`). The
# cells with `assert`s check your work; the grader adds a few hidden checks of the same kind.

# %%
import copy

import torch
from torch import nn

from mmalign.config import load_config, seed_everything

cfg = load_config()
torch.set_num_threads(cfg.num_threads or 1)
seed_everything(0)

# %% [markdown]
# ## 1. The momentum update
#
# `key` is a copy of the `online` module (same architecture). Update every floating-point **parameter** of
# `key` in place,
#
# $$
# \theta_k \leftarrow m\,\theta_k + (1 - m)\,\theta_q ,
# $$
#
# and **copy** every buffer (e.g. BatchNorm running statistics, or the standardisation mean of our heads)
# from `online`. No gradient must be recorded: use `torch.no_grad()` and in-place operations
# (`mul_`, `add_`, `copy_`). Pair parameters by name (`named_parameters()`).

# %% nbgrader={"grade": false, "grade_id": "momentum_impl", "locked": false, "schema_version": 3, "solution": true, "task": false}
def my_momentum_update(key: nn.Module, online: nn.Module, m: float) -> None:
    """In place: key params <- m * key params + (1 - m) * online params; key buffers <- online buffers."""
    ### BEGIN SOLUTION
    with torch.no_grad():
        online_params = dict(online.named_parameters())
        for name, p in key.named_parameters():
            p.mul_(m).add_(online_params[name].detach(), alpha=1.0 - m)
        online_buffers = dict(online.named_buffers())
        for name, b in key.named_buffers():
            b.copy_(online_buffers[name])
    ### END SOLUTION


# %% [markdown]
# By hand: a one-weight "network" with $\theta_k = 1$ and $\theta_q = 3$. With $m = 0.9$ one update gives
# $0.9 \cdot 1 + 0.1 \cdot 3 = 1.2$; a second gives $0.9 \cdot 1.2 + 0.1 \cdot 3 = 1.38$. With $m = 0$ the key
# becomes a copy ($3$), with $m = 1$ it never moves.

# %% nbgrader={"grade": true, "grade_id": "momentum_test", "locked": true, "points": 3, "schema_version": 3, "solution": false, "task": false}
from mmalign.memory import MomentumEncoder

online = nn.Linear(1, 1, bias=False, dtype=torch.float64)
key = copy.deepcopy(online)
with torch.no_grad():
    key.weight.fill_(1.0)
    online.weight.fill_(3.0)
my_momentum_update(key, online, 0.9)
assert abs(key.weight.item() - 1.2) < 1e-12, f"expected 0.9 * 1 + 0.1 * 3 = 1.2, got {key.weight.item()}"
my_momentum_update(key, online, 0.9)
assert abs(key.weight.item() - 1.38) < 1e-12, f"expected 0.9 * 1.2 + 0.1 * 3 = 1.38, got {key.weight.item()}"

# against the library, on a small MLP with a BatchNorm (which has buffers)
net = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2))
reference, mine = MomentumEncoder(net, momentum=0.95), copy.deepcopy(net)
opt = torch.optim.SGD(net.parameters(), lr=0.5)
for _ in range(3):  # move the online network, then update both copies
    opt.zero_grad()
    net(torch.randn(16, 4)).pow(2).sum().backward()
    opt.step()
    reference.update(net)
    my_momentum_update(mine, net, 0.95)
for (name, a), b in zip(reference.module.state_dict().items(), mine.state_dict().values()):
    assert torch.allclose(a.float(), b.float(), atol=1e-6), f"{name}: expected {a.float()}, got {b.float()}"
### BEGIN HIDDEN TESTS
assert all(not p.requires_grad or p.grad is None for p in mine.parameters()), f"the key must not get gradients: expected no .grad, got {[p.grad is not None for p in mine.parameters()]}"
for m in (0.0, 1.0):
    k2 = copy.deepcopy(mine)
    before = [p.clone() for p in k2.parameters()]
    my_momentum_update(k2, net, m)
    for p_new, p_old, p_on in zip(k2.parameters(), before, net.parameters()):
        assert torch.allclose(p_new, p_on if m == 0.0 else p_old, atol=1e-7), f"m = {m}: expected {p_on if m == 0.0 else p_old}, got {p_new}"
### END HIDDEN TESTS

# %% [markdown]
# ## 2. The queue
#
# The queue holds `size` keys of dimension `dim` and an item id per key, in fixed tensors (no growing
# `torch.cat`). `ptr` is the next slot to write and `count` the number of filled slots. Enqueueing $n$
# keys writes key $t$ to slot `(ptr + t) % size` (so the oldest entries are the ones overwritten), then
# moves `ptr` on by $n$ (modulo `size`) and raises `count` to at most `size`. A batch larger than the queue
# leaves only its last `size` keys. Store the keys **detached**. `keys` and `ids` return the filled slots
# `0 .. count-1`, in slot order.
#
# By hand, a queue of size 5 and batches of 2 keys with ids (0, 1), (2, 3), (4, 5): after the first two,
# slots hold ids `[0, 1, 2, 3]` and `ptr = 4`; the third writes id 4 to slot 4 and id 5 to slot 0, so the
# ids read `[5, 1, 2, 3, 4]` and `ptr = 1`.

# %% nbgrader={"grade": false, "grade_id": "queue_impl", "locked": false, "schema_version": 3, "solution": true, "task": false}
class MyQueue:
    def __init__(self, size: int, dim: int):
        self._keys = torch.zeros(size, dim)
        self._ids = torch.full((size,), -1, dtype=torch.long)
        self.size, self.ptr, self.count = size, 0, 0

    def enqueue(self, keys: torch.Tensor, ids: torch.Tensor) -> None:
        """Write (n, dim) keys and (n,) ids at the pointer, overwriting the oldest entries."""
        ### BEGIN SOLUTION
        n = keys.shape[0]
        keep = min(n, self.size)
        slots = (self.ptr + n - keep + torch.arange(keep)) % self.size
        self._keys[slots] = keys[n - keep:].detach().float()
        self._ids[slots] = ids[n - keep:].long()
        self.ptr = (self.ptr + n) % self.size
        self.count = min(self.count + n, self.size)
        ### END SOLUTION

    @property
    def keys(self) -> torch.Tensor:
        return self._keys[: self.count]

    @property
    def ids(self) -> torch.Tensor:
        return self._ids[: self.count]


# %% nbgrader={"grade": true, "grade_id": "queue_test", "locked": true, "points": 4, "schema_version": 3, "solution": false, "task": false}
from mmalign.memory import MoCoQueue

q = MyQueue(5, 2)
for step in range(3):
    q.enqueue(torch.full((2, 2), float(step)), torch.tensor([2 * step, 2 * step + 1]))
    if step == 1:
        assert q.ids.tolist() == [0, 1, 2, 3] and q.ptr == 4, f"expected {[0, 1, 2, 3]} and {4}, got {q.ids.tolist()} and {q.ptr}"
assert q.ids.tolist() == [5, 1, 2, 3, 4] and q.ptr == 1 and q.count == 5, f"expected {[5, 1, 2, 3, 4]} and {1} and {5}, got {q.ids.tolist()} and {q.ptr} and {q.count}"
assert q.keys[:, 0].tolist() == [2.0, 0.0, 1.0, 1.0, 2.0], f"expected {[2.0, 0.0, 1.0, 1.0, 2.0]}, got {q.keys[:, 0].tolist()}"

# against the library: uneven batches, wrapping, a batch larger than the queue
mine, ref = MyQueue(7, 3), MoCoQueue(7, 3)
next_id = 0
for n in [3, 5, 2, 11, 1, 6]:
    keys = torch.randn(n, 3, requires_grad=True)
    ids = torch.arange(next_id, next_id + n)
    next_id += n
    mine.enqueue(keys, ids)
    ref.enqueue(keys, ids)
    assert torch.equal(mine.ids, ref.ids) and torch.equal(mine.keys, ref.keys) and mine.ptr == ref.ptr, f"after enqueuing {n} keys: expected {ref.ids} and {ref.keys} and {ref.ptr}, got {mine.ids} and {mine.keys} and {mine.ptr}"
### BEGIN HIDDEN TESTS
assert not mine.keys.requires_grad, f"store detached keys: expected requires_grad False, got {mine.keys.requires_grad}"
big = MyQueue(4, 1)
big.enqueue(torch.zeros(1, 1), torch.tensor([99]))
big.enqueue(torch.arange(10.0)[:, None], torch.arange(10))
assert big.ids.tolist() == [7, 8, 9, 6] and big.ptr == 3 and big.count == 4, f"expected {[7, 8, 9, 6]} and {3} and {4}, got {big.ids.tolist()} and {big.ptr} and {big.count}"
empty = MyQueue(3, 2)
empty.enqueue(torch.zeros(0, 2), torch.zeros(0, dtype=torch.long))
assert empty.count == 0 and empty.ptr == 0 and empty.keys.shape == (0, 2), f"expected {0} and {0} and {(0, 2)}, got {empty.count} and {empty.ptr} and {empty.keys.shape}"
### END HIDDEN TESTS

# %% [markdown]
# ## 3. MoCo with your pieces
#
# One step, as in the chapter (ALBEF's two queues): online image and text embeddings are the queries, the
# momentum copy of the heads makes the keys, and each direction is `moco_loss` with the batch's keys and
# the queued keys as negatives (equal scene ids are masked, so the positive and its scene's other captions
# are never negatives). After the optimizer step: your momentum update, then enqueue the keys.

# %%
from mmalign.data.features import scene_features
from mmalign.losses import moco_loss
from mmalign.recipes import evaluate, make_dual_encoder
from mmalign.retrieval import chance_recall
from mmalign.train import fit

train, val = scene_features("train", cfg), scene_features("val", cfg)
seed_everything(0)
model = make_dual_encoder(train, cfg.embed_dim)
key_model = copy.deepcopy(model).requires_grad_(False)
queue_img, queue_txt = MyQueue(512, cfg.embed_dim), MyQueue(512, cfg.embed_dim)
stash = {}


def moco_step(model, batch):
    img, txt, ids = batch
    q_img, q_txt = model(img, txt)
    with torch.no_grad():
        k_img, k_txt = key_model(img, txt)
    stash["keys"] = (k_img, k_txt, ids)
    loss_i2t = moco_loss(q_img, k_txt, torch.cat([k_txt, queue_txt.keys]), temperature=0.07,
                         ids=(ids, torch.cat([ids, queue_txt.ids])))
    loss_t2i = moco_loss(q_txt, k_img, torch.cat([k_img, queue_img.keys]), temperature=0.07,
                         ids=(ids, torch.cat([ids, queue_img.ids])))
    return 0.5 * (loss_i2t + loss_t2i)


def after_step(model, batch, step):
    my_momentum_update(key_model, model, 0.99)
    k_img, k_txt, ids = stash["keys"]
    queue_img.enqueue(k_img, ids)
    queue_txt.enqueue(k_txt, ids)


history = fit(model, moco_step, train.pairs(), optimizer=torch.optim.AdamW(model.parameters(), lr=cfg.lr),
              epochs=1, batch_size=32, seed=0, device="cpu", after_step=after_step)
report = evaluate(model, val)
chance_t2i_r10 = 100 * chance_recall(len(val.world), 1, 10)
print(f"queue filled: {queue_txt.count} keys; validation text -> image R@10 {report['t2i_R@10']:.1f} % "
      f"(chance {chance_t2i_r10:.1f} %)")

# %% nbgrader={"grade": true, "grade_id": "moco_training_test", "locked": true, "points": 2, "schema_version": 3, "solution": false, "task": false}
# In your notebook this reads your run above, for feedback. The grader trains again, from a fixed seed,
# with your `MyQueue` and `my_momentum_update`, and reads nothing of your notebook.
from mmalign.data.features import scene_features
from mmalign.labs.testing import grading
from mmalign.losses import moco_loss
from mmalign.recipes import evaluate, make_dual_encoder
from mmalign.retrieval import chance_recall
from mmalign.train import fit

if grading():
    test_cfg = load_config()
    test_train, test_val = scene_features("train", test_cfg), scene_features("val", test_cfg)
    seed_everything(0)
    test_model = make_dual_encoder(test_train, test_cfg.embed_dim)
    test_key = copy.deepcopy(test_model).requires_grad_(False)
    test_queues = MyQueue(512, test_cfg.embed_dim), MyQueue(512, test_cfg.embed_dim)
    test_stash = {}

    def test_step(model, batch):
        img, txt, ids = batch
        q_img, q_txt = model(img, txt)
        with torch.no_grad():
            k_img, k_txt = test_key(img, txt)
        test_stash["keys"] = (k_img, k_txt, ids)
        queue_img, queue_txt = test_queues
        loss_i2t = moco_loss(q_img, k_txt, torch.cat([k_txt, queue_txt.keys]), temperature=0.07,
                             ids=(ids, torch.cat([ids, queue_txt.ids])))
        loss_t2i = moco_loss(q_txt, k_img, torch.cat([k_img, queue_img.keys]), temperature=0.07,
                             ids=(ids, torch.cat([ids, queue_img.ids])))
        return 0.5 * (loss_i2t + loss_t2i)

    def test_after_step(model, batch, step):
        my_momentum_update(test_key, model, 0.99)
        k_img, k_txt, ids = test_stash["keys"]
        test_queues[0].enqueue(k_img, ids)
        test_queues[1].enqueue(k_txt, ids)

    test_history = fit(test_model, test_step, test_train.pairs(), optimizer=torch.optim.AdamW(test_model.parameters(), lr=test_cfg.lr),
                       epochs=1, batch_size=32, seed=0, device="cpu", after_step=test_after_step)
    test_report = evaluate(test_model, test_val)
    test_chance = 100 * chance_recall(len(test_val.world), 1, 10)
else:
    test_queues, test_history, test_report, test_chance = (queue_img, queue_txt), history, report, chance_t2i_r10
assert test_queues[1].count == 512, f"the queue should be full after an epoch: expected {512}, got {test_queues[1].count}"
assert sum(test_history.loss[-10:]) < sum(test_history.loss[:10]), f"the loss should go down: expected the last 10 steps below the first 10, got {sum(test_history.loss[:10]):.3f} then {sum(test_history.loss[-10:]):.3f}"
assert test_report["t2i_R@10"] > 5 * test_chance, f'trained retrieval should be far above chance: expected t2i R@10 > {5 * test_chance:.1f}, got {test_report["t2i_R@10"]:.1f}'

# %% [markdown]
# ## Takeaway
#
# The momentum encoder is three lines of in-place arithmetic and the queue a ring buffer with a pointer;
# together they give every query thousands of negatives from past batches at the cost of one extra forward
# pass per step, while keeping those negatives from going stale as fast as the online encoder moves.
