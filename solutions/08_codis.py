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
# # Lab 8: optimal transport targets with IPOT
#
# CODIS (Duan et al., 2022) turns the teacher's features of a batch into codebook targets by optimal
# transport, with the IPOT algorithm (Xie et al., 2018; Algorithm 2 of the seed). Here you write IPOT
# yourself, in the log domain, and check it against a case worked out by hand, the marginals and
# `mmalign.ot.ipot`; then you use it as the codebook targets of a batch.
#
# Write your code where it says `YOUR CODE HERE` (and delete the `raise NotImplementedError()`). The
# cells with `assert`s check your work; the grader adds a few hidden checks of the same kind.

# %%
import itertools

import torch

from mmalign.config import load_config, seed_everything
from mmalign.ot import cost_matrix, ipot

cfg = load_config()
torch.set_num_threads(cfg.num_threads or 1)
seed_everything(0)

# %% [markdown]
# ## 1. IPOT in the log domain
#
# Given a cost $D$ $(N, K)$, marginals $a$ $(N,)$ and $b$ $(K,)$ (equal total mass) and a step $\beta > 0$,
# IPOT starts from $T^{(1)} = \mathbf{1}\mathbf{1}^\top$ and $\sigma = \mathbf{1}$ and repeats, for
# $t = 1, \dots, n$:
#
# $$
# Q = e^{-D/\beta} \odot T^{(t)}, \qquad \delta = \frac{a}{Q\sigma}, \qquad \sigma = \frac{b}{Q^\top\delta},
# \qquad T^{(t+1)} = \mathrm{diag}(\delta)\,Q\,\mathrm{diag}(\sigma)
# $$
#
# (one inner scaling per step; $\sigma$ carries over from one step to the next). For a small $\beta$,
# $e^{-D/\beta}$ underflows to zero, so work with logarithms throughout: keep $\log T$, $\log\sigma$,
# $\log\delta$, and replace every matrix-vector product by a `torch.logsumexp`:
#
# $$
# \log\delta_i = \log a_i - \mathrm{LSE}_j\big(\log Q_{ij} + \log\sigma_j\big), \qquad
# \log\sigma_j = \log b_j - \mathrm{LSE}_i\big(\log Q_{ij} + \log\delta_i\big).
# $$
#
# Return the plan $T^{(n+1)}$ (a tensor, not its log). Compute in float64 when the cost is float64.

# %% nbgrader={"grade": false, "grade_id": "ipot_impl", "locked": false, "schema_version": 3, "solution": true, "task": false}
def my_ipot(cost: torch.Tensor, a: torch.Tensor, b: torch.Tensor, beta: float = 0.5, n_iters: int = 50) -> torch.Tensor:
    """(N, K) cost, (N,) a, (K,) b -> (N, K) transport plan after n_iters IPOT steps."""
    ### BEGIN SOLUTION
    log_a, log_b = a.log(), b.log()
    log_g = -cost / beta
    log_t = torch.zeros_like(cost)
    log_sigma = torch.zeros_like(b)
    for _ in range(n_iters):
        log_q = log_g + log_t
        log_delta = log_a - torch.logsumexp(log_q + log_sigma[None, :], dim=1)
        log_sigma = log_b - torch.logsumexp(log_q + log_delta[:, None], dim=0)
        log_t = log_q + log_delta[:, None] + log_sigma[None, :]
    return log_t.exp()
    ### END SOLUTION


# %% [markdown]
# **By hand.** With $D = \begin{pmatrix} 0 & 1 \\ 1 & 0 \end{pmatrix}$, $a = b = (\tfrac12, \tfrac12)$ and
# $\beta = 1$: $Q = e^{-D}$, so $Q\mathbf 1 = (1 + e^{-1}) \mathbf 1$, $\delta = \frac{1}{2(1+e^{-1})}\mathbf 1$,
# then $Q^\top\delta = \tfrac12 \mathbf 1$ and $\sigma = \mathbf 1$. One step gives
#
# $$
# T^{(2)} = \frac{1}{2(1+e^{-1})}\begin{pmatrix} 1 & e^{-1} \\ e^{-1} & 1 \end{pmatrix}
# \approx \begin{pmatrix} 0.366 & 0.134 \\ 0.134 & 0.366 \end{pmatrix}.
# $$
#
# Each further step multiplies the off-diagonal by another $e^{-1}$ before rescaling, so the plan tends to
# the exact one, $\mathrm{diag}(\tfrac12, \tfrac12)$, with transport cost 0.

# %% nbgrader={"grade": true, "grade_id": "ipot_test", "locked": true, "points": 4, "schema_version": 3, "solution": false, "task": false}
D = torch.tensor([[0.0, 1.0], [1.0, 0.0]], dtype=torch.float64)
half = torch.full((2,), 0.5, dtype=torch.float64)
e = torch.exp(torch.tensor(-1.0, dtype=torch.float64))
want = torch.tensor([[1.0, e], [e, 1.0]], dtype=torch.float64) / (2 * (1 + e))
got = my_ipot(D, half, half, beta=1.0, n_iters=1)
assert isinstance(got, torch.Tensor) and got.shape == (2, 2), f"expected a (2, 2) tensor, got {type(got).__name__} {getattr(got, 'shape', '')}"
assert torch.allclose(got, want, atol=1e-12), f"one step by hand: expected {want.tolist()}, got {got.tolist()}"
many = my_ipot(D, half, half, beta=1.0, n_iters=100)
assert torch.allclose(many, torch.eye(2, dtype=torch.float64) / 2, atol=1e-10), f"expected diag(1/2, 1/2) after 100 steps, got {many.tolist()}"

# the marginals on a random problem with non-uniform masses
g = torch.Generator().manual_seed(0)
C = torch.rand(6, 4, generator=g, dtype=torch.float64)
a = torch.rand(6, generator=g, dtype=torch.float64) + 0.1
b = torch.rand(4, generator=g, dtype=torch.float64) + 0.1
a, b = a / a.sum(), b / b.sum()
T = my_ipot(C, a, b, beta=0.2, n_iters=300)
assert torch.allclose(T.sum(0), b, atol=1e-10), f"columns should sum to b = {b.tolist()}, got {T.sum(0).tolist()}"
assert torch.allclose(T.sum(1), a, atol=1e-6), f"rows should sum to a = {a.tolist()}, got {T.sum(1).tolist()}"
assert (T >= 0).all(), f"a plan has no negative entries, got min {float(T.min())}"

# against the library on the same inputs
ref = ipot(C, 0.2, a, b, n_iters=30).plan
mine = my_ipot(C, a, b, beta=0.2, n_iters=30)
assert torch.allclose(mine, ref, atol=1e-10), f"expected mmalign.ot.ipot's plan {ref.tolist()}, got {mine.tolist()}"
### BEGIN HIDDEN TESTS
# small beta: the log domain must not underflow (exp(-D / 0.001) is 0 in float64 for D > 0.75)
C2 = 3 * torch.rand(5, 5, generator=g, dtype=torch.float64)
u5 = torch.full((5,), 0.2, dtype=torch.float64)
small = my_ipot(C2, u5, u5, beta=1e-3, n_iters=20)
assert torch.isfinite(small).all() and abs(float(small.sum()) - 1) < 1e-6, f"expected a finite plan of mass 1, got sum {float(small.sum())}"
assert torch.allclose(small, ipot(C2, 1e-3, u5, u5, n_iters=20).plan, atol=1e-8), "expected the library's plan at beta=1e-3"
# the exact assignment by brute force over permutations
best = min(itertools.permutations(range(5)), key=lambda p: float(C2[range(5), list(p)].sum()))
perm = torch.zeros(5, 5, dtype=torch.float64)
perm[range(5), list(best)] = 0.2
conv = my_ipot(C2, u5, u5, beta=0.05, n_iters=1000)
assert torch.allclose(conv, perm, atol=1e-4), f"expected the optimal permutation {best}, got {conv.argmax(1).tolist()}"
### END HIDDEN TESTS

# %% [markdown]
# ## 2. IPOT against the exact assignment
#
# On a square problem with uniform marginals the exact plan is a permutation (divided by $N$). Find it by
# brute force for $N = 5$ and compare: after enough steps IPOT's plan is that permutation, and its cost
# $\langle T, D \rangle$ equals the best assignment's.

# %%
C5 = torch.rand(5, 5, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
u = torch.full((5,), 0.2, dtype=torch.float64)
perm = min(itertools.permutations(range(5)), key=lambda p: float(C5[range(5), list(p)].sum()))
plan = my_ipot(C5, u, u, beta=0.05, n_iters=500)
print("best permutation:", perm, " IPOT's argmax per row:", plan.argmax(1).tolist())
print(f"best cost {float(C5[range(5), list(perm)].sum()) / 5:.5f}, IPOT's cost {float((plan * C5).sum()):.5f}")

# %% nbgrader={"grade": true, "grade_id": "assignment_test", "locked": true, "points": 2, "schema_version": 3, "solution": false, "task": false}
# computed here with your `my_ipot` (nothing above is read)
test_cost = torch.rand(5, 5, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
test_u = torch.full((5,), 0.2, dtype=torch.float64)
test_perm = min(itertools.permutations(range(5)), key=lambda p: float(test_cost[range(5), list(p)].sum()))
test_plan = my_ipot(test_cost, test_u, test_u, beta=0.05, n_iters=500)
assert test_plan.argmax(1).tolist() == list(test_perm), f"expected the rows to pick {list(test_perm)}, got {test_plan.argmax(1).tolist()}"
best_cost = float(test_cost[range(5), list(test_perm)].sum()) / 5
assert abs(float((test_plan * test_cost).sum()) - best_cost) < 1e-6, f"expected cost {best_cost:.6f}, got {float((test_plan * test_cost).sum()):.6f}"

# %% [markdown]
# ## 3. Codebook targets for a batch
#
# In CODIS the rows are a batch of teacher features $Z^m$ $(N, d)$ and the columns the codewords $C$
# $(K, d)$, with $D_{ij} = 1 - \cos(z_i, c_j)$ and uniform marginals: each codeword receives $N/K$ of the
# batch. Build the targets $N\,T$ (each row a distribution over codewords) with your IPOT for a random
# batch, and check that every codeword is used about equally, even though the features are drawn around
# only two of the codewords. (Without the column marginal, a plain softmax would put every feature on
# those two.)

# %% nbgrader={"grade": false, "grade_id": "targets_impl", "locked": false, "schema_version": 3, "solution": true, "task": false}
gen = torch.Generator().manual_seed(2)
codewords = torch.randn(4, 8, generator=gen, dtype=torch.float64)
features = codewords[torch.randint(0, 2, (32,), generator=gen)] + 0.3 * torch.randn(32, 8, generator=gen, dtype=torch.float64)


def my_codebook_targets(features: torch.Tensor, codewords: torch.Tensor, beta: float = 0.1, n_iters: int = 50) -> torch.Tensor:
    """(N, d) features, (K, d) codewords -> (N, K) targets N * T, with T the IPOT plan of the cosine cost."""
    ### BEGIN SOLUTION
    n, k = features.shape[0], codewords.shape[0]
    cost = cost_matrix(features, codewords, "cosine")
    a = torch.full((n,), 1.0 / n, dtype=cost.dtype)
    b = torch.full((k,), 1.0 / k, dtype=cost.dtype)
    return n * my_ipot(cost, a, b, beta, n_iters)
    ### END SOLUTION


targets = my_codebook_targets(features, codewords)
print("mass per codeword:", targets.sum(0).numpy().round(2))
softmax_mass = torch.softmax(-cost_matrix(features, codewords) / 0.1, dim=1).sum(0)
print("a plain softmax would give:", softmax_mass.numpy().round(2))

# %% nbgrader={"grade": true, "grade_id": "targets_test", "locked": true, "points": 2, "schema_version": 3, "solution": false, "task": false}
# computed here with your `my_codebook_targets`, on the same features and codewords as above
test_gen = torch.Generator().manual_seed(2)
test_codewords = torch.randn(4, 8, generator=test_gen, dtype=torch.float64)
test_features = test_codewords[torch.randint(0, 2, (32,), generator=test_gen)] + 0.3 * torch.randn(32, 8, generator=test_gen, dtype=torch.float64)
test_targets = my_codebook_targets(test_features, test_codewords)
test_softmax_mass = torch.softmax(-cost_matrix(test_features, test_codewords) / 0.1, dim=1).sum(0)
assert isinstance(test_targets, torch.Tensor) and test_targets.shape == (32, 4), f"expected (32, 4) targets, got {tuple(getattr(test_targets, 'shape', ()))}"
assert torch.allclose(test_targets.sum(0), torch.full((4,), 8.0, dtype=torch.float64), atol=1e-6), f"expected 8 per codeword, got {test_targets.sum(0).tolist()}"
assert torch.allclose(test_targets.sum(1), torch.ones(32, dtype=torch.float64), atol=1e-2), f"expected rows summing to 1, got {test_targets.sum(1)[:4].tolist()}..."
assert test_softmax_mass.max() > 12, f"the softmax should crowd onto few codewords, got masses {test_softmax_mass.tolist()}"
### BEGIN HIDDEN TESTS
from mmalign.losses import codebook_targets

lib = codebook_targets(test_features, test_codewords, solver="ipot", epsilon=0.1, n_iters=50)
mine = test_targets / test_targets.sum(1, keepdim=True)
assert torch.allclose(mine, lib, atol=1e-8), "expected the library's (row-normalised) codebook targets"
### END HIDDEN TESTS

# %% [markdown]
# **Question.** CODIS computes the codebook plan from the *teacher's* features rather than the student's.
# Give the argument for that choice, then say what chapter 8's ablation (teacher vs student plans, compared
# seed by seed with the course's paired rule) shows about it at our scale. Two or three sentences.

# %% [markdown] nbgrader={"grade": true, "grade_id": "teacher_answer", "locked": false, "points": 2, "schema_version": 3, "solution": true, "task": false}
# ### BEGIN SOLUTION
# The argument: targets should not move with every gradient step of the network trained to predict them; a
# student that sets its own targets can chase them (and collapse), while the slowly moving momentum teacher
# gives assignments that are stable across steps, as MoCo's keys are. At our scale the ablation does not
# support it: compared seed by seed, plans from the student's features beat plans from the teacher's on all
# three seeds (a measured difference, reversed from the seed's claim); in a one-epoch run the teacher lags
# the student, so its targets are staler rather than steadier. The argument may still hold for long runs.
# ### END SOLUTION
