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
# # Lab 0: InfoNCE and Recall@K by hand
#
# In chapter 0 the library did the work. Here you write the two pieces at the heart of it yourself and
# check them against the library and against cases worked out by hand:
#
# 1. the symmetric **InfoNCE** loss for a paired batch (the positive of row $i$ is column $i$);
# 2. **Recall@K** for queries with exactly one positive each;
# 3. then you train the chapter's projection heads with *your* loss and check that retrieval works.
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
# ## 1. InfoNCE
#
# For L2-normalised embeddings $u_i$ (images) and $v_j$ (captions) of a batch of $B$ pairs, let
# $s_{ij} = u_i^\top v_j / \tau$. The symmetric InfoNCE loss is
#
# $$
# \mathcal{L} = \frac{1}{2B}\sum_{i=1}^{B}\Big[\Big(\log\sum_{j} e^{s_{ij}} - s_{ii}\Big)
#               + \Big(\log\sum_{j} e^{s_{ji}} - s_{ii}\Big)\Big].
# $$
#
# Use `torch.logsumexp` (or `F.cross_entropy`): a hand-written `exp(...).sum()` overflows at
# $\tau = 0.01$. Normalise the inputs inside the function.

# %% nbgrader={"grade": false, "grade_id": "info_nce_impl", "locked": false, "schema_version": 3, "solution": true, "task": false}
def my_info_nce(image_emb: torch.Tensor, text_emb: torch.Tensor, temperature: float = 0.07) -> torch.Tensor:
    """Symmetric InfoNCE of a paired batch: (B, D), (B, D) -> scalar."""
    ### BEGIN SOLUTION
    u = F.normalize(image_emb, dim=-1)
    v = F.normalize(text_emb, dim=-1)
    logits = u @ v.T / temperature
    diag = logits.diagonal()
    rows = torch.logsumexp(logits, dim=1) - diag
    cols = torch.logsumexp(logits, dim=0) - diag
    return 0.5 * (rows.mean() + cols.mean())
    ### END SOLUTION


# %% [markdown]
# A case by hand: two images and two captions, all four embeddings unit vectors with $u_1 = v_1 = e_1$ and
# $u_2 = v_2 = e_2$. With $\tau = 1$ every row of $s$ is $(1, 0)$ or $(0, 1)$, so each of the four terms
# is $\log(e^1 + e^0) - 1 = \log(1 + e^{-1}) \approx 0.3133$, and so is the loss.

# %% nbgrader={"grade": true, "grade_id": "info_nce_test", "locked": true, "points": 3, "schema_version": 3, "solution": false, "task": false}
from mmalign.losses import info_nce

eye = torch.eye(2, dtype=torch.float64)
assert math.isclose(float(my_info_nce(eye, eye, temperature=1.0)), math.log(1 + math.exp(-1)), rel_tol=1e-9), f"expected {math.log(1 + math.exp(-1))}, got {float(my_info_nce(eye, eye, temperature=1.0))}"
a, b = torch.randn(16, 8, dtype=torch.float64), torch.randn(16, 8, dtype=torch.float64)
assert torch.allclose(my_info_nce(a, b, 0.1), info_nce(a, b, temperature=0.1), atol=1e-10), f"expected {info_nce(a, b, temperature=0.1)}, got {my_info_nce(a, b, 0.1)}"
### BEGIN HIDDEN TESTS
assert torch.isfinite(my_info_nce(a, b, 0.01)), f"use logsumexp: expected a finite loss at tau = 0.01, got {my_info_nce(a, b, 0.01)}"
assert torch.allclose(my_info_nce(a, b, 0.01), info_nce(a, b, temperature=0.01), atol=1e-8), f"expected {info_nce(a, b, temperature=0.01)}, got {my_info_nce(a, b, 0.01)}"
a.requires_grad_(True)
g_mine, = torch.autograd.grad(my_info_nce(a, b, 0.2), a)
g_ref, = torch.autograd.grad(info_nce(a, b, temperature=0.2), a)
assert torch.allclose(g_mine, g_ref, atol=1e-10), f"expected {g_ref}, got {g_mine}"
### END HIDDEN TESTS

# %% [markdown]
# ## 2. Recall@K with one positive per query
#
# `query` is $(Q, D)$, `gallery` is $(G, D)$ and `positive[q]` is the index of the one gallery item that
# matches query $q$. With cosine similarities, query $q$ scores a hit when **fewer than $K$ other gallery
# items score at least as high as its positive**. Counting ties *against* the query matters: with a
# "strictly higher" count, a collapsed model that gives every item the same score would be perfect.
# Return the fraction of hits (a float in $[0, 1]$). Raise a `ValueError` when $K$ is not in $1..G$.
# No Python loop over queries is needed.

# %% nbgrader={"grade": false, "grade_id": "recall_impl", "locked": false, "schema_version": 3, "solution": true, "task": false}
def my_recall_at_k(query: torch.Tensor, gallery: torch.Tensor, positive: torch.Tensor, k: int) -> float:
    """Fraction of queries whose positive ranks in the top k (ties counted against the query)."""
    ### BEGIN SOLUTION
    if not 1 <= k <= gallery.shape[0]:
        raise ValueError(f"k must be in 1..{gallery.shape[0]}, got {k}")
    sim = F.normalize(query, dim=-1) @ F.normalize(gallery, dim=-1).T
    pos_score = sim.gather(1, positive[:, None])
    others_at_least = (sim >= pos_score).sum(1) - 1  # minus the positive itself
    return float((others_at_least < k).float().mean())
    ### END SOLUTION


# %% [markdown]
# By hand: a gallery of three unit directions, $e_1$, $e_2$ and $-e_1$, and three queries. Query 0,
# $(1, 0.1)$, is closest to its positive $e_1$ (rank 1). Query 1, $(1, 0.5)$, has positive $e_2$ but is
# closer to $e_1$ (rank 2). Query 2, $(1, 1)$, has positive $e_2$, which ties exactly with $e_1$; the tie
# counts against it (rank 2). So R@1 = 1/3 and R@2 = 1.

# %% nbgrader={"grade": true, "grade_id": "recall_test", "locked": true, "points": 3, "schema_version": 3, "solution": false, "task": false}
from mmalign.retrieval import recall_at_k

gallery = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
query = torch.tensor([[1.0, 0.1], [1.0, 0.5], [1.0, 1.0]])
positive = torch.tensor([0, 1, 1])
assert math.isclose(my_recall_at_k(query, gallery, positive, 1), 1 / 3, abs_tol=1e-6), f"expected {1 / 3}, got {my_recall_at_k(query, gallery, positive, 1)}"
assert my_recall_at_k(query, gallery, positive, 2) == 1.0, f"expected {1.0}, got {my_recall_at_k(query, gallery, positive, 2)}"
q, g = torch.randn(50, 6), torch.randn(40, 6)  # continuous random scores: no ties
pos = torch.randint(0, 40, (50,))
for k in (1, 5, 10):
    assert math.isclose(my_recall_at_k(q, g, pos, k), recall_at_k(q, g, pos, torch.arange(40), (k,))[k], abs_tol=1e-6), f"expected {recall_at_k(q, g, pos, torch.arange(40), (k,))[k]}, got {my_recall_at_k(q, g, pos, k)}"
### BEGIN HIDDEN TESTS
collapsed = torch.ones(5, 3)
assert my_recall_at_k(collapsed, collapsed, torch.arange(5), 4) == 0.0, f"ties must count against the query: expected {0.0}, got {my_recall_at_k(collapsed, collapsed, torch.arange(5), 4)}"
assert my_recall_at_k(collapsed, collapsed, torch.arange(5), 5) == 1.0, f"expected {1.0}, got {my_recall_at_k(collapsed, collapsed, torch.arange(5), 5)}"
for bad_k in (0, 41):
    try:
        my_recall_at_k(q, g, pos, bad_k)
    except ValueError:
        pass
    else:
        raise AssertionError(f"k={bad_k} should raise ValueError")
### END HIDDEN TESTS

# %% [markdown]
# ## 3. Train with your loss
#
# The chapter trained two linear projections on frozen EfficientNet-Lite0 and MiniLM features. Train them
# again, with your `my_info_nce` as the loss, for a few epochs, and score text → image retrieval on the
# validation split with your `my_recall_at_k` (each caption's positive is its scene's image). Chance
# R@10 is 10 / (number of validation images).

# %%
from mmalign.data.features import scene_features
from mmalign.recipes import make_dual_encoder
from mmalign.train import fit

train, val = scene_features("train", cfg), scene_features("val", cfg)


def my_step(model, batch):
    image_features, caption_features, _ = batch
    z_image, z_text = model(image_features, caption_features)
    return my_info_nce(z_image, z_text, temperature=0.07)


seed_everything(0)
model = make_dual_encoder(train, cfg.embed_dim)
history = fit(model, my_step, train.pairs(), optimizer=torch.optim.AdamW(model.parameters(), lr=cfg.lr),
              epochs=4, batch_size=cfg.batch_size, seed=0, device="cpu")
with torch.no_grad():
    val_r10 = my_recall_at_k(model.encode_texts(val.text), model.encode_images(val.image), val.text_ids, 10)
chance_r10 = 10 / len(val.world)
print(f"text -> image R@10 on validation: {100 * val_r10:.1f} %  (chance {100 * chance_r10:.1f} %)")

# %% nbgrader={"grade": true, "grade_id": "training_test", "locked": true, "points": 2, "schema_version": 3, "solution": false, "task": false}
# In your notebook this reads your run above, for feedback. The grader trains again, from a fixed seed,
# with your `my_info_nce`, and reads nothing of your notebook.
from mmalign.data.features import scene_features
from mmalign.labs.testing import grading
from mmalign.recipes import make_dual_encoder
from mmalign.retrieval import recall_at_k
from mmalign.train import fit

if grading():
    test_cfg = load_config()
    test_train, test_val = scene_features("train", test_cfg), scene_features("val", test_cfg)
    seed_everything(0)
    test_model = make_dual_encoder(test_train, test_cfg.embed_dim)
    test_loss = fit(test_model, lambda m, batch: my_info_nce(*m(batch[0], batch[1]), temperature=0.07), test_train.pairs(),
                    optimizer=torch.optim.AdamW(test_model.parameters(), lr=test_cfg.lr), epochs=2,
                    batch_size=test_cfg.batch_size, seed=0, device="cpu").loss
    with torch.no_grad():
        test_r10 = recall_at_k(test_model.encode_texts(test_val.text), test_model.encode_images(test_val.image),
                               test_val.text_ids, torch.arange(len(test_val.image)), (10,))[10]
else:
    test_loss, test_r10, test_val = history.loss, val_r10, val
assert test_loss[-1] < test_loss[0], f"the loss should go down: expected last < first, got first {test_loss[0]:.4f}, last {test_loss[-1]:.4f}"
assert test_r10 > 5 * 10 / len(test_val.world), f"trained retrieval should be far above chance: expected R@10 > {50 / len(test_val.world):.3f}, got {test_r10:.3f}"

# %% [markdown]
# ## Takeaway
#
# InfoNCE is a cross-entropy over a similarity matrix, in both directions; `logsumexp` keeps it stable at
# low temperature. Recall@K is a rank count, and how it treats ties decides whether a broken model can look
# good. With both in hand, a few epochs of training align two frozen encoders.
