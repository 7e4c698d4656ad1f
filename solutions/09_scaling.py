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
# # Lab 9: InfoNCE with negatives gathered across processes
#
# Chapter 9 gathered every process's embeddings so that $W$ processes train exactly the single-process
# large-batch model. The library's `mmalign.dist.gathered_info_nce` scores the whole $B \times B$ matrix on
# every process. Large-scale recipes (open_clip's `local_loss`) save that work: each process scores only its
# **own rows** against the **gathered columns**, a $B/W \times B$ matrix. You write that loss here and
# check it on 2 real processes against the single-process loss.
#
# Write your code where it says `YOUR CODE HERE` (and delete the `raise NotImplementedError()`). The
# cells with `assert`s check your work; the grader adds a few hidden checks of the same kind.

# %%
import torch
import torch.nn.functional as F

from mmalign import dist
from mmalign.config import load_config
from mmalign.losses import info_nce
from mmalign.retrieval import similarity

# While grading, the library's own version is taken away: mmalign.dist.gathered_info_nce

cfg = load_config()
torch.set_num_threads(cfg.num_threads or 1)

# %% [markdown]
# ## 1. The local-rows loss with the rank offset
#
# Process $r$ of $W$ holds $n$ image embeddings $a^{(r)}$ and the $n$ embeddings $b^{(r)}$ of their captions
# (same $n$ on every process). `dist.all_gather(x)` returns the $(Wn, D)$ concatenation of every process's
# `x` in rank order, **with gradient** (its backward sums the gathered gradient over processes and hands
# each process its own rows); `dist.rank()` is $r$ and `dist.world_size()` is $W$. In one process they are
# the identity, $0$ and $1$.
#
# With $A = \mathrm{all\_gather}(a^{(r)})$, $B = \mathrm{all\_gather}(b^{(r)})$ and cosine similarities,
# the loss of process $r$ is
#
# $$
# \mathcal{L}_r = \tfrac12\Big(\mathrm{CE}\big(\cos(a^{(r)}, B)/\tau,\ t\big) + \mathrm{CE}\big(\cos(b^{(r)}, A)/\tau,\ t\big)\Big),
# \qquad t_i = r\,n + i,
# $$
#
# where CE is the mean cross-entropy over the $n$ rows (`F.cross_entropy`). The target $t_i$ carries the
# **rank offset**: local row $i$ is row $rn + i$ of the gathered matrices, so its positive is column $rn + i$.
# Use `similarity(x, y)` (cosine, float32 logits) from `mmalign.retrieval`.
#
# Your function is sent to the worker processes as source code: keep it self-contained (it may use
# `torch`, `F`, `dist`, `similarity`, nothing else from this notebook).

# %% nbgrader={"grade": false, "grade_id": "local_loss_impl", "locked": false, "schema_version": 3, "solution": true, "task": false}
def my_gathered_info_nce(a, b, temperature):
    """(n, D) local a and b on this process -> this process's loss L_r (a scalar tensor)."""
    ### BEGIN SOLUTION
    all_a, all_b = dist.all_gather(a), dist.all_gather(b)
    target = dist.rank() * a.shape[0] + torch.arange(a.shape[0], device=a.device)
    return 0.5 * (F.cross_entropy(similarity(a, all_b) / temperature, target)
                  + F.cross_entropy(similarity(b, all_a) / temperature, target))
    ### END SOLUTION


# %% [markdown]
# **In one process** ($W = 1$, $r = 0$) $\mathcal{L}_0$ must be the library's symmetric InfoNCE of the batch.
# Checked in float64, loss and gradients:

# %% nbgrader={"grade": true, "grade_id": "one_process_test", "locked": true, "points": 2, "schema_version": 3, "solution": false, "task": false}
g = torch.Generator().manual_seed(0)
a = torch.randn(8, 5, generator=g, dtype=torch.float64, requires_grad=True)
b = torch.randn(8, 5, generator=g, dtype=torch.float64, requires_grad=True)
mine = my_gathered_info_nce(a, b, 0.1)
ref = info_nce(a, b, temperature=0.1)
assert torch.is_tensor(mine) and mine.dim() == 0, f"expected a scalar tensor, got {mine!r}"
assert torch.allclose(mine, ref, rtol=1e-10, atol=1e-12), f"one process: expected info_nce = {float(ref):.10f}, got {float(mine):.10f}"
grad_mine = torch.autograd.grad(mine, (a, b))
grad_ref = torch.autograd.grad(ref, (a, b))
for name, gm, gr in zip("ab", grad_mine, grad_ref):
    assert torch.allclose(gm, gr, rtol=1e-8, atol=1e-12), f"gradient wrt {name}: expected the info_nce gradient, max |difference| {float((gm - gr).abs().max()):.3g}"
### BEGIN HIDDEN TESTS
a2 = torch.randn(5, 3, generator=g, dtype=torch.float64)
b2 = torch.randn(5, 3, generator=g, dtype=torch.float64)
for tau in (0.05, 1.0):
    assert torch.allclose(my_gathered_info_nce(a2, b2, tau), info_nce(a2, b2, temperature=tau), rtol=1e-10), f"tau={tau}: expected info_nce"
### END HIDDEN TESTS

# %% [markdown]
# ## 2. On 2 processes
#
# `scaling.check_on_processes` writes your function to a file, launches `torchrun --nproc_per_node=2` (gloo,
# CPU) and runs it on each process's half of a fixed float64 batch of 16 pairs. Averaging the processes'
# losses (what averaging gradients optimises) must give the single-process InfoNCE of all 16 pairs, and the
# gradient with respect to every row must match too. A missing rank offset, or a gather without gradient,
# fails here even though it passed in one process.

# %%
from mmalign.experiments import scaling

two = scaling.check_on_processes(my_gathered_info_nce)
single = scaling.reference_check()
print(f"2 processes: {two['loss']:.10f}   1 process: {single['loss']:.10f}")

# %% nbgrader={"grade": true, "grade_id": "two_process_test", "locked": true, "points": 4, "schema_version": 3, "solution": false, "task": false}
# In your notebook this reads your 2-process run above. The grader starts 2 processes of your notebook itself,
# sends each its half of the batch and compares what your function returns there (loss and gradient) with
# the single-process InfoNCE, computed in the grader.
from mmalign.experiments import scaling
from mmalign.labs.testing import grading, on_processes


def two_process_values(loss_fn, a, b, temperature):
    """Mean of the 2 processes' losses and its gradient wrt every row, from what loss_fn returns on each."""
    n = a.shape[0] // 2
    halves = [(a[r * n:(r + 1) * n].clone().requires_grad_(), b[r * n:(r + 1) * n].clone().requires_grad_(), temperature)
              for r in range(2)]
    out = on_processes(loss_fn, halves)
    assert all(torch.is_tensor(v) and v.dim() == 0 for v, _ in out), f"expected a scalar tensor on each process, got {[v for v, _ in out]!r}"
    grads = [torch.cat([g[i] if g[i] is not None else torch.zeros_like(h[i]) for (_, g), h in zip(out, halves)]) / 2
             for i in range(2)]
    return {"loss": sum(float(v) for v, _ in out) / 2, "grad_a": grads[0], "grad_b": grads[1]}


def one_process_values(a, b, temperature):
    a, b = a.clone().requires_grad_(), b.clone().requires_grad_()
    loss = info_nce(a, b, temperature=temperature)
    grad_a, grad_b = torch.autograd.grad(loss, (a, b))
    return {"loss": float(loss.detach()), "grad_a": grad_a, "grad_b": grad_b}


if grading():
    test_g = torch.Generator().manual_seed(0)
    test_a, test_b = (torch.randn(16, 6, generator=test_g, dtype=torch.float64) for _ in range(2))
    test_two, test_single = two_process_values(my_gathered_info_nce, test_a, test_b, 0.1), one_process_values(test_a, test_b, 0.1)
else:
    test_two, test_single = two, single
assert abs(test_two["loss"] - test_single["loss"]) < 1e-10, f"2 processes: expected the single-process loss {test_single['loss']:.10f}, got {test_two['loss']:.10f}"
diff_a = float((test_two["grad_a"] - test_single["grad_a"]).abs().max())
assert diff_a < 1e-10, f"gradient wrt the image rows: expected the single-process gradient, max |difference| {diff_a:.3g}"
### BEGIN HIDDEN TESTS
diff_b = float((test_two["grad_b"] - test_single["grad_b"]).abs().max())
assert diff_b < 1e-10, f"gradient wrt the caption rows: expected the single-process gradient, max |difference| {diff_b:.3g}"
if grading():  # another batch and temperature, the same way
    hidden_g = torch.Generator().manual_seed(7)
    hidden_a, hidden_b = (torch.randn(12, 4, generator=hidden_g, dtype=torch.float64) for _ in range(2))
    hidden_two, hidden_single = two_process_values(my_gathered_info_nce, hidden_a, hidden_b, 0.05), one_process_values(hidden_a, hidden_b, 0.05)
    assert abs(hidden_two["loss"] - hidden_single["loss"]) < 1e-10, f"another batch on 2 processes: expected the single-process loss {hidden_single['loss']:.10f}, got {hidden_two['loss']:.10f}"
    for key in ("grad_a", "grad_b"):
        hidden_diff = float((hidden_two[key] - hidden_single[key]).abs().max())
        assert hidden_diff < 1e-10, f"another batch on 2 processes: expected the single-process {key}, max |difference| {hidden_diff:.3g}"
### END HIDDEN TESTS

# %% [markdown]
# ## 3. Your turn to explain
#
# In two or three sentences: if `all_gather` returned the other processes' rows *without* gradient (a
# plain `torch.distributed.all_gather`), the loss value on 2 processes would still be right. What would be
# wrong with the gradient, and why?

# %% [markdown] nbgrader={"grade": true, "grade_id": "detach_answer", "locked": false, "points": 2, "schema_version": 3, "solution": true, "task": false}
# Process $r$'s embeddings also appear as *columns* (candidates) in the other processes' losses
# $\mathcal{L}_{r'}$. Without gradient through the gather, those terms never reach process $r$, so its
# gradient misses every $\partial\mathcal{L}_{r'}/\partial a^{(r)}$ with $r' \ne r$: the candidates' side of
# the gradient is lost and the model trains on a different (wrong) gradient than the single-process loss.
# The differentiable gather sums those contributions back to the process that owns the rows.

# %% [markdown]
# ## Takeaway
#
# Gathering makes the candidates global; the rank offset puts each local row's positive in the right
# column; a gradient-carrying gather sends every process the gradient of its rows as candidates in the
# other processes' losses. With the three, the local-rows loss is the single-process loss at a fraction of
# the compute per process.
