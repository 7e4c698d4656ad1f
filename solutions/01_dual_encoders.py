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
# # Lab 1: the cosine embedding loss and LAMB's trust ratio
#
# Chapter 1 trained a dual encoder the way the WIT caption-matching project did: the cosine embedding
# loss on pairs labelled $+1$ / $-1$, and the LAMB optimizer. Here you write the two pieces yourself and
# check them against the library and against cases worked out by hand:
#
# 1. the **cosine embedding loss** of a batch of signed pairs;
# 2. LAMB's layer-wise **trust ratio**, and one LAMB step built on it;
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
# ## 1. The cosine embedding loss
#
# For $N$ pairs $(a_i, b_i)$ with labels $y_i \in \{+1, -1\}$ and a margin $m \in [-1, 1]$:
#
# $$
# \ell_i = \begin{cases} 1 - \cos(a_i, b_i) & y_i = +1 \\ \max\big(0,\ \cos(a_i, b_i) - m\big) & y_i = -1 \end{cases},
# \qquad L = \frac1N \sum_i \ell_i .
# $$
#
# Compute the cosine of each pair (not the $N \times N$ matrix), choose the branch with `torch.where`,
# and return the mean. Raise a `ValueError` when `target` holds anything but $+1$ and $-1$ (a common
# bug is passing 0/1 labels, which would silently treat every 0 as a negative).

# %% nbgrader={"grade": false, "grade_id": "cosine_impl", "locked": false, "schema_version": 3, "solution": true, "task": false}
def my_cosine_embedding_loss(a: torch.Tensor, b: torch.Tensor, target: torch.Tensor,
                             margin: float = 0.0) -> torch.Tensor:
    """Mean cosine embedding loss of N signed pairs: (N, D), (N, D), (N,) -> scalar."""
    ### BEGIN SOLUTION
    if not bool(((target == 1) | (target == -1)).all()):
        raise ValueError("target must hold only +1 and -1")
    cos = F.cosine_similarity(a, b, dim=-1)
    return torch.where(target == 1, 1 - cos, torch.relu(cos - margin)).mean()
    ### END SOLUTION


# %% [markdown]
# A case by hand: $a_1 = a_2 = a_3 = (1, 0)$ and $b_1 = (1, 0)$, $b_2 = (0, 1)$, $b_3 = (1, 1)$, with
# labels $(+1, -1, -1)$ and $m = 0.5$. Pair 1 is a perfect match: $1 - 1 = 0$. Pair 2 is orthogonal, below
# the margin: $\max(0, 0 - 0.5) = 0$. Pair 3 has cosine $1/\sqrt 2 \approx 0.707$, above the margin:
# $0.707 - 0.5$. The loss is the mean, $(1/\sqrt 2 - 0.5)/3 \approx 0.0690$.

# %% nbgrader={"grade": true, "grade_id": "cosine_test", "locked": true, "points": 3, "schema_version": 3, "solution": false, "task": false}
from mmalign.losses import cosine_embedding_loss

a = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0]], dtype=torch.float64)
b = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]], dtype=torch.float64)
y = torch.tensor([1.0, -1.0, -1.0], dtype=torch.float64)
assert math.isclose(float(my_cosine_embedding_loss(a, b, y, margin=0.5)), (1 / math.sqrt(2) - 0.5) / 3, rel_tol=1e-9), f"expected {(1 / math.sqrt(2) - 0.5) / 3}, got {float(my_cosine_embedding_loss(a, b, y, margin=0.5))}"
x1, x2 = torch.randn(20, 8, dtype=torch.float64), torch.randn(20, 8, dtype=torch.float64)
t = torch.where(torch.rand(20) < 0.5, 1.0, -1.0).double()
for m in (-0.2, 0.0, 0.3):
    assert torch.allclose(my_cosine_embedding_loss(x1, x2, t, m), cosine_embedding_loss(x1, x2, t, margin=m), atol=1e-10), f"expected {cosine_embedding_loss(x1, x2, t, margin=m)}, got {my_cosine_embedding_loss(x1, x2, t, m)}"
### BEGIN HIDDEN TESTS
assert torch.allclose(my_cosine_embedding_loss(x1, x2, t, 0.1),
                      torch.nn.CosineEmbeddingLoss(margin=0.1)(x1, x2, t), atol=1e-10), f"expected {torch.nn.CosineEmbeddingLoss(margin=0.1)(x1, x2, t)}, got {my_cosine_embedding_loss(x1, x2, t, 0.1)}"
try:
    my_cosine_embedding_loss(x1, x2, (t > 0).double(), 0.0)
except ValueError:
    pass
else:
    raise AssertionError("0/1 labels should raise ValueError")
x1.requires_grad_(True)
g_mine, = torch.autograd.grad(my_cosine_embedding_loss(x1, x2, t, 0.2), x1)
g_ref, = torch.autograd.grad(cosine_embedding_loss(x1, x2, t, margin=0.2), x1)
assert torch.allclose(g_mine, g_ref, atol=1e-10), f"expected {g_ref}, got {g_mine}"
### END HIDDEN TESTS

# %% [markdown]
# ## 2. LAMB's trust ratio
#
# LAMB (You et al., 2020) computes Adam's update $u$ for each parameter tensor $w$ (a "layer") and then
# scales it by the trust ratio
#
# $$
# r(w, u) = \min\!\Big(\frac{\lVert w \rVert_2}{\lVert u \rVert_2},\ c\Big),
# \qquad r = 1 \text{ when } \lVert w \rVert = 0 \text{ or } \lVert u \rVert = 0,
# $$
#
# with $\lVert\cdot\rVert_2$ the norm of the whole tensor (all its entries). The step
# $\eta\, r\, u$ then has size $\eta \lVert w \rVert$ (unless clamped). Return a 0-d tensor. Use
# `torch.where` for the special cases rather than Python `if`s on tensor values.

# %% nbgrader={"grade": false, "grade_id": "trust_impl", "locked": false, "schema_version": 3, "solution": true, "task": false}
def my_trust_ratio(weight: torch.Tensor, update: torch.Tensor, clamp: float = 10.0) -> torch.Tensor:
    """LAMB's layer-wise trust ratio min(|w| / |u|, clamp), or 1 if either norm is 0: 0-d tensor."""
    ### BEGIN SOLUTION
    w_norm, u_norm = weight.norm(), update.norm()
    ratio = (w_norm / u_norm).clamp(max=clamp)
    return torch.where((w_norm > 0) & (u_norm > 0), ratio, torch.ones_like(ratio))
    ### END SOLUTION


# %% [markdown]
# By hand: $w = (3, 4)$ has norm 5. For $u = (0.6, 0.8)$ (norm 1), $r = 5$. For $u = (0.006, 0.008)$
# (norm 0.01), $\lVert w\rVert/\lVert u\rVert = 500$, clamped to $c = 10$. A zero weight (a freshly
# zero-initialised bias) gets $r = 1$, i.e. a plain Adam step; so does a zero update.

# %% nbgrader={"grade": true, "grade_id": "trust_test", "locked": true, "points": 3, "schema_version": 3, "solution": false, "task": false}
from mmalign.optim import lamb_trust_ratio

w = torch.tensor([3.0, 4.0])
assert math.isclose(float(my_trust_ratio(w, torch.tensor([0.6, 0.8]))), 5.0, rel_tol=1e-6), f"expected {5.0}, got {float(my_trust_ratio(w, torch.tensor([0.6, 0.8])))}"
assert math.isclose(float(my_trust_ratio(w, torch.tensor([0.006, 0.008]))), 10.0, rel_tol=1e-6), f"expected {10.0}, got {float(my_trust_ratio(w, torch.tensor([0.006, 0.008])))}"
assert float(my_trust_ratio(torch.zeros(2), torch.tensor([0.6, 0.8]))) == 1.0, f"expected {1.0}, got {float(my_trust_ratio(torch.zeros(2), torch.tensor([0.6, 0.8])))}"
assert float(my_trust_ratio(w, torch.zeros(2))) == 1.0, f"expected {1.0}, got {float(my_trust_ratio(w, torch.zeros(2)))}"
for _ in range(5):
    W, U = torch.randn(7, 5), 0.3 * torch.randn(7, 5)
    assert torch.allclose(my_trust_ratio(W, U), lamb_trust_ratio(W, U), rtol=1e-6), f"expected {lamb_trust_ratio(W, U)}, got {my_trust_ratio(W, U)}"
### BEGIN HIDDEN TESTS
assert my_trust_ratio(W, U).dim() == 0, f"return a 0-d tensor: expected {0}, got {my_trust_ratio(W, U).dim()}"
assert math.isclose(float(my_trust_ratio(w, torch.tensor([0.006, 0.008]), clamp=3.0)), 3.0, rel_tol=1e-6), f"expected {3.0}, got {float(my_trust_ratio(w, torch.tensor([0.006, 0.008]), clamp=3.0))}"
assert float(my_trust_ratio(torch.zeros(3, 3), torch.zeros(3, 3))) == 1.0, f"expected {1.0}, got {float(my_trust_ratio(torch.zeros(3, 3), torch.zeros(3, 3)))}"
W64, U64 = torch.randn(4, 6, dtype=torch.float64), torch.randn(4, 6, dtype=torch.float64)
assert torch.allclose(my_trust_ratio(W64, U64, 2.5), lamb_trust_ratio(W64, U64, 2.5), atol=1e-12), f"expected {lamb_trust_ratio(W64, U64, 2.5)}, got {my_trust_ratio(W64, U64, 2.5)}"
### END HIDDEN TESTS

# %% [markdown]
# ### One LAMB step by hand
#
# On the first step, Adam's bias-corrected moments are $\hat m_1 = g$ and $\hat v_1 = g^2$, so the update
# is $u = g / (|g| + \epsilon) + \lambda w$ and LAMB moves $w \leftarrow w - \eta\, r(w, u)\, u$. The cell
# below builds that step with *your* trust ratio and checks it against one step of `mmalign.optim.LAMB`
# on a two-layer toy model (a weight matrix and a bias of very different norms).

# %% nbgrader={"grade": true, "grade_id": "lamb_step_test", "locked": true, "points": 2, "schema_version": 3, "solution": false, "task": false}
from mmalign.optim import LAMB

torch.manual_seed(0)
layer = torch.nn.Linear(6, 3)
with torch.no_grad():
    layer.bias.mul_(0.01)
before = {name: p.detach().clone() for name, p in layer.named_parameters()}
layer(torch.randn(16, 6)).pow(2).mean().backward()
grads = {name: p.grad.detach().clone() for name, p in layer.named_parameters()}
lr, wd, eps = 0.05, 0.01, 1e-6
LAMB(layer.parameters(), lr=lr, weight_decay=wd, eps=eps).step()
for name, p in layer.named_parameters():
    w, g = before[name], grads[name]
    u = g / (g.abs() + eps) + wd * w
    expected = w - lr * my_trust_ratio(w, u) * u
    assert torch.allclose(p.detach(), expected, atol=1e-6), f"{name}: LAMB's step gave {p.detach()}, yours gives {expected}"
### BEGIN HIDDEN TESTS
ratios = {name: float(my_trust_ratio(before[name], grads[name] / (grads[name].abs() + eps) + wd * before[name]))
          for name in before}
assert ratios["bias"] < ratios["weight"], f'the small-norm bias should get the smaller trust ratio: expected bias < weight, got {ratios}'
### END HIDDEN TESTS

# %% [markdown]
# ## 3. Train with your loss
#
# Train the chapter's projection heads with your cosine embedding loss: every (image, caption) pair of the
# batch is a $+1$ pair, and `make_signed_pairs` draws 8 captions of *other* scenes per image as $-1$ pairs.
# The margin 0.3 is the setting the chapter found to work with 8 negatives. Then score text → image
# Recall@10 on the validation split; chance is 10 / (number of validation images).

# %%
from mmalign.data.features import scene_features
from mmalign.losses import make_signed_pairs
from mmalign.recipes import evaluate
from mmalign.recipes import train_dual_encoder

train, val = scene_features("train", cfg), scene_features("val", cfg)
generator = torch.Generator().manual_seed(0)


def my_pair_loss(z_image, z_text, scene_ids):
    ia, ib, target = make_signed_pairs(len(scene_ids), negatives_per_positive=8, generator=generator, ids=scene_ids)
    return my_cosine_embedding_loss(z_image[ia], z_text[ib], target, margin=0.3)


model, history = train_dual_encoder(train, None, cfg, my_pair_loss, epochs=3, seed=0)
report = evaluate(model, val)
chance_r10 = 100 * 10 / len(val.world)
print(f"text -> image R@10 on validation: {report['t2i_R@10']:.1f} %  (chance {chance_r10:.1f} %)")

# %% nbgrader={"grade": true, "grade_id": "training_test", "locked": true, "points": 2, "schema_version": 3, "solution": false, "task": false}
# In your notebook this reads your run above, for feedback. The grader trains again, from a fixed seed,
# with your `my_cosine_embedding_loss`, and reads nothing of your notebook.
from mmalign.data.features import scene_features
from mmalign.labs.testing import grading
from mmalign.losses import make_signed_pairs
from mmalign.recipes import evaluate, train_dual_encoder

if grading():
    test_cfg = load_config()
    test_train, test_val = scene_features("train", test_cfg), scene_features("val", test_cfg)
    test_generator = torch.Generator().manual_seed(0)

    def test_pair_loss(z_image, z_text, scene_ids):
        ia, ib, target = make_signed_pairs(len(scene_ids), negatives_per_positive=8, generator=test_generator, ids=scene_ids)
        return my_cosine_embedding_loss(z_image[ia], z_text[ib], target, margin=0.3)

    test_model, test_history = train_dual_encoder(test_train, None, test_cfg, test_pair_loss, epochs=3, seed=0)
    test_report, test_chance = evaluate(test_model, test_val), 100 * 10 / len(test_val.world)
else:
    test_history, test_report, test_chance = history, report, chance_r10
assert test_history.loss[-1] < test_history.loss[0], f"the loss should go down: expected last < first, got first {test_history.loss[0]:.4f}, last {test_history.loss[-1]:.4f}"
assert test_report["t2i_R@10"] > 5 * test_chance, f'trained retrieval should be far above chance: expected t2i R@10 > {5 * test_chance:.1f}, got {test_report["t2i_R@10"]:.1f}'

# %% [markdown]
# ## Takeaway
#
# The cosine embedding loss is a per-pair rule: pull $+1$ pairs to cosine 1, push $-1$ pairs below the
# margin. The batch supplies its $-1$ pairs, and only pairs of different scenes may be used. LAMB is Adam
# with one extra number per layer, $\lVert w\rVert / \lVert u\rVert$, which makes every layer's step a
# fixed fraction of its own size: small-norm tensors such as biases move slowly, large ones fast.
