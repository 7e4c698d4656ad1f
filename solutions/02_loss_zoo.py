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
# # Lab 2: masked margin softmax with an adaptive margin
#
# Chapter 2 compared eight losses; the best of the seed's table was the masked margin softmax (MMS) with
# an adaptive margin. Here you write it yourself, in two pieces, and check them against the library and
# against cases worked out by hand:
#
# 1. the **adaptive mean margin** of every anchor, in both directions;
# 2. the symmetric **masked margin softmax** over a similarity matrix;
# 3. then you train the chapter's projection heads with *your* loss.
#
# Write your code where it says `YOUR CODE HERE` (and delete the `raise NotImplementedError()`). The
# cells with `assert`s check your work; the grader adds a few hidden checks of the same kind.

# %%
import math

import torch
import torch.nn.functional as F

from mmalign.config import load_config, seed_everything

cfg = load_config()
seed_everything(0)

# %% [markdown]
# ## 1. The adaptive mean margin
#
# $S$ is the $(B, B)$ cosine similarity matrix of a paired batch (rows images, columns captions, true pairs
# on the diagonal) and `ids` (item ids) says which rows and columns show the same scene. The **negatives** of
# image $i$ are the columns of *other* scenes, $N_i = \{j : \mathrm{id}_j \ne \mathrm{id}_i\}$; those of
# caption $j$ are the rows of other scenes. Monfort et al. (2021) set each anchor's margin to a fraction
# $\alpha$ of how far its positive stands above its average negative:
#
# $$
# M^{I\to T}_i = \alpha\Big(S_{ii} - \frac{1}{|N_i|}\sum_{j \in N_i} S_{ij}\Big), \qquad
# M^{T\to I}_j = \alpha\Big(S_{jj} - \frac{1}{|N^\top_j|}\sum_{i \in N^\top_j} S_{ij}\Big).
# $$
#
# An anchor with no negative at all gets margin 0. The margin is a constant of the loss: compute it
# without gradient (`torch.no_grad()` or `.detach()`). No Python loop over the batch is needed: a boolean
# mask of negatives and sums along rows and columns do it.

# %% nbgrader={"grade": false, "grade_id": "amm_impl", "locked": false, "schema_version": 3, "solution": true, "task": false}
def my_adaptive_margin(sim: torch.Tensor, ids: torch.Tensor, alpha: float = 0.5):
    """(B, B) cosines, (B,) ids -> (m_img (B,), m_txt (B,)): adaptive mean margins, detached."""
    ### BEGIN SOLUTION
    sim = sim.detach()
    neg = ids[:, None] != ids[None, :]
    n_row, n_col = neg.sum(1), neg.sum(0)
    mean_row = (sim * neg).sum(1) / n_row.clamp(min=1)
    mean_col = (sim * neg).sum(0) / n_col.clamp(min=1)
    pos = sim.diagonal()
    m_img = torch.where(n_row > 0, alpha * (pos - mean_row), torch.zeros_like(pos))
    m_txt = torch.where(n_col > 0, alpha * (pos - mean_col), torch.zeros_like(pos))
    return m_img, m_txt
    ### END SOLUTION


# %% [markdown]
# By hand: three pairs, scenes `[0, 0, 1]`, and
#
# $$ S = \begin{pmatrix} 0.9 & 0.5 & 0.1 \\ 0.6 & 0.8 & 0.3 \\ 0.2 & 0.0 & 0.7 \end{pmatrix}. $$
#
# Image 0's only negative is column 2 (column 1 is the same scene), so with $\alpha = 0.5$,
# $M^{I\to T}_0 = 0.5\,(0.9 - 0.1) = 0.4$. Image 2 has negatives in columns 0 and 1:
# $M^{I\to T}_2 = 0.5\,(0.7 - (0.2 + 0.0)/2) = 0.3$. Caption 1's only negative is row 2:
# $M^{T\to I}_1 = 0.5\,(0.8 - 0.0) = 0.4$.

# %% nbgrader={"grade": true, "grade_id": "amm_test", "locked": true, "points": 3, "schema_version": 3, "solution": false, "task": false}
from mmalign.losses import AdaptiveMargin

S = torch.tensor([[0.9, 0.5, 0.1], [0.6, 0.8, 0.3], [0.2, 0.0, 0.7]], dtype=torch.float64)
ids3 = torch.tensor([0, 0, 1])
m_img, m_txt = my_adaptive_margin(S, ids3, alpha=0.5)
assert torch.allclose(m_img, torch.tensor([0.4, 0.5 * (0.8 - 0.3), 0.3], dtype=torch.float64)), f"expected {torch.tensor([0.4, 0.5 * (0.8 - 0.3), 0.3], dtype=torch.float64)}, got {m_img}"
assert torch.allclose(m_txt, torch.tensor([0.5 * (0.9 - 0.2), 0.4, 0.5 * (0.7 - (0.1 + 0.3) / 2)], dtype=torch.float64)), f"expected {torch.tensor([0.5 * (0.9 - 0.2), 0.4, 0.5 * (0.7 - (0.1 + 0.3) / 2)], dtype=torch.float64)}, got {m_txt}"
a, b = torch.randn(12, 6, dtype=torch.float64), torch.randn(12, 6, dtype=torch.float64)
ids = torch.tensor([0, 1, 1, 2, 3, 3, 3, 4, 5, 6, 7, 8])
sim = F.normalize(a, dim=-1) @ F.normalize(b, dim=-1).T
for mine, ref in zip(my_adaptive_margin(sim, ids, 0.5), AdaptiveMargin(0.5)(a, b, ids=ids)):
    assert torch.allclose(mine, ref, atol=1e-12), f"expected {ref}, got {mine}"
### BEGIN HIDDEN TESTS
for mine, ref in zip(my_adaptive_margin(sim, ids, 1.3), AdaptiveMargin(1.3)(a, b, ids=ids)):
    assert torch.allclose(mine, ref, atol=1e-12), f"expected {ref}, got {mine}"
same = torch.zeros(4, dtype=torch.long)
for m in my_adaptive_margin(torch.rand(4, 4, dtype=torch.float64), same, 0.5):
    assert torch.equal(m, torch.zeros(4, dtype=torch.float64)), f"an anchor with no negative gets margin 0: expected {torch.zeros(4, dtype=torch.float64)}, got {m}"
sim_g = sim.clone().requires_grad_(True)
assert not any(m.requires_grad for m in my_adaptive_margin(sim_g, ids, 0.5)), f"the margin must be detached: expected requires_grad False, got {[m.requires_grad for m in my_adaptive_margin(sim_g, ids, 0.5)]}"
### END HIDDEN TESTS

# %% [markdown]
# ## 2. Masked margin softmax
#
# With a temperature $\tau$ and the set $Z_i = \{k \ne i : \mathrm{id}_k = \mathrm{id}_i\}$ of columns that
# show the same scene as row $i$ (neither positive nor negative: **masked**), the MMS of the image → caption
# direction subtracts the margin from the positive logit only (thesis eq. 2.8, with cosines over $\tau$):
#
# $$
# \mathrm{MMS}(S, M) = -\frac1B \sum_i \log
#    \frac{e^{(S_{ii} - M_i)/\tau}}{e^{(S_{ii} - M_i)/\tau} + \sum_{k \ne i,\ k \notin Z_i} e^{S_{ik}/\tau}} .
# $$
#
# The caption → image direction is the same on $S^\top$ with the caption margins. Return the **average**
# of the two directions, $\tfrac12\big(\mathrm{MMS}(S, M^{I\to T}) + \mathrm{MMS}(S^\top, M^{T\to I})\big)$
# (the thesis sums them, eq. 2.9; averaging makes $M = 0$ without masked pairs exactly InfoNCE). Hint:
# build the logits, subtract $M_i/\tau$ on the diagonal, set masked entries to $-\infty$, and use
# `F.cross_entropy` with targets `arange(B)`, which is a stable log-softmax.

# %% nbgrader={"grade": false, "grade_id": "mms_impl", "locked": false, "schema_version": 3, "solution": true, "task": false}
def my_mms(sim: torch.Tensor, margins, temperature: float, ids: torch.Tensor) -> torch.Tensor:
    """Symmetric masked margin softmax: (B, B) cosines, (m_img, m_txt) two (B,) margins -> scalar."""
    ### BEGIN SOLUTION
    m_img, m_txt = margins
    n = sim.shape[0]
    eye = torch.eye(n, dtype=torch.bool, device=sim.device)
    masked = (ids[:, None] == ids[None, :]) & ~eye
    target = torch.arange(n, device=sim.device)
    logits_it = ((sim - torch.diag(m_img)) / temperature).masked_fill(masked, float("-inf"))
    logits_ti = ((sim.T - torch.diag(m_txt)) / temperature).masked_fill(masked.T, float("-inf"))
    return 0.5 * (F.cross_entropy(logits_it, target) + F.cross_entropy(logits_ti, target))
    ### END SOLUTION


# %% [markdown]
# By hand: $S = I_2$ (two pairs, two scenes), $\tau = 1$, margins 0.5 everywhere. Each row gives
# $-\log\frac{e^{0.5}}{e^{0.5} + e^{0}} = \log(1 + e^{-0.5}) \approx 0.4741$, in both directions, and so
# does the loss. With three pairs, scenes `[0, 0, 1]` and $S = I_3$, the masked column drops out of rows 0
# and 1, which keep one negative (cosine 0) and give the same $\log(1 + e^{-0.5})$; row 2 has two negatives
# and gives $\log(1 + 2e^{-0.5})$. By symmetry the columns give the same, so the loss is
# $\big(2\log(1 + e^{-0.5}) + \log(1 + 2e^{-0.5})\big)/3$. Without the mask, rows 0 and 1 would also
# count two negatives.

# %% nbgrader={"grade": true, "grade_id": "mms_test", "locked": true, "points": 3, "schema_version": 3, "solution": false, "task": false}
from mmalign.losses import info_nce, mms_loss

half = torch.full((2,), 0.5, dtype=torch.float64)
expected = math.log(1 + math.exp(-0.5))
assert math.isclose(float(my_mms(torch.eye(2, dtype=torch.float64), (half, half), 1.0, torch.arange(2))), expected, rel_tol=1e-9), f"expected {expected}, got {float(my_mms(torch.eye(2, dtype=torch.float64), (half, half), 1.0, torch.arange(2)))}"
half3 = torch.full((3,), 0.5, dtype=torch.float64)
expected3 = (2 * math.log(1 + math.exp(-0.5)) + math.log(1 + 2 * math.exp(-0.5))) / 3
assert math.isclose(float(my_mms(torch.eye(3, dtype=torch.float64), (half3, half3), 1.0, ids3)), expected3, rel_tol=1e-9), f"expected {expected3}, got {float(my_mms(torch.eye(3, dtype=torch.float64), (half3, half3), 1.0, ids3))}"
margins = AdaptiveMargin(0.5)(a, b, ids=ids)
assert torch.allclose(my_mms(sim, margins, 0.07, ids), mms_loss(a, b, temperature=0.07, margin=margins, ids=ids), atol=1e-10), f"expected {mms_loss(a, b, temperature=0.07, margin=margins, ids=ids)}, got {my_mms(sim, margins, 0.07, ids)}"
zero = torch.zeros(12, dtype=torch.float64)
assert torch.allclose(my_mms(sim, (zero, zero), 0.1, torch.arange(12)), info_nce(a, b, temperature=0.1), atol=1e-10), f"expected {info_nce(a, b, temperature=0.1)}, got {my_mms(sim, (zero, zero), 0.1, torch.arange(12))}"
### BEGIN HIDDEN TESTS
assert torch.isfinite(my_mms(sim, margins, 0.01, ids)), f"use a stable log-softmax: expected a finite loss at tau = 0.01, got {my_mms(sim, margins, 0.01, ids)}"
assert torch.allclose(my_mms(sim, margins, 0.01, ids), mms_loss(a, b, temperature=0.01, margin=margins, ids=ids), atol=1e-8), f"expected {mms_loss(a, b, temperature=0.01, margin=margins, ids=ids)}, got {my_mms(sim, margins, 0.01, ids)}"
a_g = a.clone().requires_grad_(True)
sim_g = F.normalize(a_g, dim=-1) @ F.normalize(b, dim=-1).T
g_mine, = torch.autograd.grad(my_mms(sim_g, margins, 0.2, ids), a_g)
g_ref, = torch.autograd.grad(mms_loss(a_g, b, temperature=0.2, margin=margins, ids=ids), a_g)
assert torch.allclose(g_mine, g_ref, atol=1e-10), f"expected {g_ref}, got {g_mine}"
m_ab, m_ba = torch.rand(12, dtype=torch.float64), torch.rand(12, dtype=torch.float64)
assert torch.allclose(my_mms(sim, (m_ab, m_ba), 0.3, ids), mms_loss(a, b, temperature=0.3, margin=(m_ab, m_ba), ids=ids), atol=1e-10), f"expected {mms_loss(a, b, temperature=0.3, margin=(m_ab, m_ba), ids=ids)}, got {my_mms(sim, (m_ab, m_ba), 0.3, ids)}"
### END HIDDEN TESTS

# %% [markdown]
# ## 3. Train with your loss
#
# Put the two pieces together as a pair loss: cosine similarities of the batch's embeddings, adaptive
# margins from them ($\alpha = 0.5$, no gradient), MMS at $\tau = 0.07$ with the batch's scene ids as the
# mask. Train the chapter's projection heads for a few epochs and score them on the validation split.
# Chance rsum (the sum of the six recalls) is printed for comparison.

# %%
from mmalign.data.features import scene_features
from mmalign.retrieval import similarity
from mmalign.recipes import evaluate, train_dual_encoder
from mmalign.retrieval import chance_recall

train, val = scene_features("train", cfg), scene_features("val", cfg)


def my_pair_loss(z_image, z_text, scene_ids):
    sim = similarity(z_image, z_text)
    return my_mms(sim, my_adaptive_margin(sim, scene_ids, 0.5), 0.07, scene_ids)


model, history = train_dual_encoder(train, None, cfg, my_pair_loss, epochs=3, seed=0)
report = evaluate(model, val)
k = val.world.captions_per_image
chance_rsum = 100 * sum(chance_recall(len(val.texts), k, r) + chance_recall(len(val.world), 1, r) for r in (1, 5, 10))
print(f"validation rsum {report['rsum']:.1f}  (chance {chance_rsum:.1f});  t2i R@10 {report['t2i_R@10']:.1f} %")

# %% nbgrader={"grade": true, "grade_id": "training_test", "locked": true, "points": 2, "schema_version": 3, "solution": false, "task": false}
# In your notebook this reads your run above, for feedback. The grader trains again, from a fixed seed,
# with your two functions, and reads nothing of your notebook.
from mmalign.data.features import scene_features
from mmalign.labs.testing import grading
from mmalign.recipes import evaluate, train_dual_encoder
from mmalign.retrieval import chance_recall, similarity

if grading():
    test_cfg = load_config()
    test_train, test_val = scene_features("train", test_cfg), scene_features("val", test_cfg)

    def test_pair_loss(z_image, z_text, scene_ids):
        sim = similarity(z_image, z_text)
        return my_mms(sim, my_adaptive_margin(sim, scene_ids, 0.5), 0.07, scene_ids)

    test_model, test_history = train_dual_encoder(test_train, None, test_cfg, test_pair_loss, epochs=3, seed=0)
    test_report = evaluate(test_model, test_val)
    test_k = test_val.world.captions_per_image
    test_chance = 100 * sum(chance_recall(len(test_val.texts), test_k, r) + chance_recall(len(test_val.world), 1, r) for r in (1, 5, 10))
else:
    test_history, test_report, test_chance = history, report, chance_rsum
assert test_history.loss[-1] < test_history.loss[0], f"the loss should go down: expected last < first, got first {test_history.loss[0]:.4f}, last {test_history.loss[-1]:.4f}"
assert test_report["rsum"] > 10 * test_chance, f'trained retrieval should be far above chance: expected rsum > {10 * test_chance:.1f}, got {test_report["rsum"]:.1f}'

# %% [markdown]
# ## Takeaway
#
# MMS is InfoNCE with two changes: a margin taken off the positive logit, which keeps a positive that is
# already ahead under pressure, and a mask for same-item pairs, which are neither positives nor negatives.
# The adaptive margin sets the pressure per anchor from the batch itself (a fraction of the gap between
# its positive and its average negative), so there is no schedule to fit to the length of the run.
