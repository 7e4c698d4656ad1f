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
# # Lab 5: depth as an augmented view
#
# In chapter 5 one of the three ways to use depth kept the RGB image as the image embedding and added a
# second contrastive term between the image and its depth view. Here you write that loss and train with it.
#
# For a batch of $B$ items with image, caption and depth embeddings $z_I, z_T, z_D \in \mathbb{R}^{B\times D}$,
#
# $$
# L = L_{\text{InfoNCE}}(z_I, z_T) + \lambda\, L_{\text{InfoNCE}}(z_I, z_D),
# $$
#
# where $L_{\text{InfoNCE}}$ is the symmetric InfoNCE of chapter 0 with temperature $\tau$: the first term
# aligns images with captions, the second pulls each image towards its own depth view and away from the
# depth views of the other images. You may use `mmalign.losses.info_nce` for each term (you wrote it
# yourself in lab 0).
#
# Write your code where it says `YOUR CODE HERE` (and delete the `raise NotImplementedError()`).

# %%
import math

import torch

from mmalign.config import load_config, seed_everything
from mmalign.losses import info_nce

cfg = load_config()
seed_everything(0)
torch.set_num_threads(cfg.num_threads or 1)  # small linear heads: one thread is as fast and never fights other processes

# %% [markdown]
# ## 1. The loss
#
# `ids` is optional: when given, a (B,) tensor of scene ids, rows with equal ids are positives of each
# other in **both** terms (a training batch holds one row per caption, so an image and its depth view
# repeat when two captions of one scene land in the same batch). Pass it to `info_nce` as
# `ids=ids`. A negative $\lambda$ makes no sense: raise a `ValueError`.

# %% nbgrader={"grade": false, "grade_id": "aug_view_impl", "locked": false, "schema_version": 3, "solution": true, "task": false}
def my_depth_view_loss(img: torch.Tensor, txt: torch.Tensor, depth: torch.Tensor, temperature: float = 0.07,
                       weight: float = 1.0, ids: torch.Tensor | None = None) -> torch.Tensor:
    """Image-caption InfoNCE plus weight x image-depth InfoNCE: three (B, D) tensors -> scalar."""
    ### BEGIN SOLUTION
    if weight < 0:
        raise ValueError(f"weight must be >= 0, got {weight}")
    pair = info_nce(img, txt, temperature=temperature, ids=ids)
    view = info_nce(img, depth, temperature=temperature, ids=ids)
    return pair + weight * view
    ### END SOLUTION


# %% [markdown]
# A case by hand: $B = 2$, every embedding a unit vector with $z_{I,1} = z_{T,1} = z_{D,1} = e_1$ and
# $z_{I,2} = z_{T,2} = z_{D,2} = e_2$, $\tau = 1$. Each InfoNCE term is $\log(1 + e^{-1}) \approx 0.3133$
# (lab 0), so the loss is $(1 + \lambda) \log(1 + e^{-1})$.

# %% nbgrader={"grade": true, "grade_id": "aug_view_test", "locked": true, "points": 3, "schema_version": 3, "solution": false, "task": false}
from mmalign.models.fusion import depth_augmented_view_loss

eye = torch.eye(2, dtype=torch.float64)
for lam in (0.0, 0.5, 2.0):
    assert math.isclose(float(my_depth_view_loss(eye, eye, eye, 1.0, lam)), (1 + lam) * math.log(1 + math.exp(-1)),
                        rel_tol=1e-9), f"expected {(1 + lam) * math.log(1 + math.exp(-1))}, got {float(my_depth_view_loss(eye, eye, eye, 1.0, lam))}"
a, b, c = (torch.randn(16, 8, dtype=torch.float64) for _ in range(3))
assert torch.allclose(my_depth_view_loss(a, b, c, 0.1, 0.7), depth_augmented_view_loss(a, b, c, temperature=0.1, weight=0.7), atol=1e-10), f"expected {depth_augmented_view_loss(a, b, c, temperature=0.1, weight=0.7)}, got {my_depth_view_loss(a, b, c, 0.1, 0.7)}"
### BEGIN HIDDEN TESTS
try:
    my_depth_view_loss(a, b, c, 0.1, -1.0)
except ValueError:
    pass
else:
    raise AssertionError("a negative weight should raise ValueError")
c.requires_grad_(True)
g, = torch.autograd.grad(my_depth_view_loss(a, b, c, 0.1, 0.0), c, allow_unused=True)
assert g is None or torch.count_nonzero(g) == 0, f"with weight 0 the depth view gets no gradient: expected 0 non-zero entries, got {torch.count_nonzero(g)}"
### END HIDDEN TESTS

# %% [markdown]
# With scene ids: a batch where rows 0 and 1 are two captions of the same scene (so the image and depth
# rows repeat). Your loss must treat the repeated rows as positives, exactly as the library does.
# (A curiosity worth checking for yourself: when the repeated rows are *exact* copies, InfoNCE with and
# without the mask gives the same value, because the two copies split the positives between them. The
# mask starts to matter as soon as the copies differ, e.g. under augmentation or dropout.)

# %% nbgrader={"grade": true, "grade_id": "aug_view_ids_test", "locked": true, "points": 2, "schema_version": 3, "solution": false, "task": false}
from mmalign.experiments.depth import labelled_info_nce

ids = torch.tensor([0, 0, 1, 2, 3, 3])
img = torch.randn(4, 8, dtype=torch.float64)[ids]
dep = torch.randn(4, 8, dtype=torch.float64)[ids]
txt = torch.randn(6, 8, dtype=torch.float64)
ref = depth_augmented_view_loss(img, txt, dep, temperature=0.2, weight=1.5, pair_loss=labelled_info_nce(ids))
assert torch.allclose(my_depth_view_loss(img, txt, dep, 0.2, 1.5, ids), ref, atol=1e-10), f"expected {ref}, got {my_depth_view_loss(img, txt, dep, 0.2, 1.5, ids)}"
### BEGIN HIDDEN TESTS
txt.requires_grad_(True)
g_mine, = torch.autograd.grad(my_depth_view_loss(img, txt, dep, 0.2, 1.5, ids), txt)
g_ref, = torch.autograd.grad(depth_augmented_view_loss(img, txt, dep, temperature=0.2, weight=1.5,
                                                      pair_loss=labelled_info_nce(ids)), txt)
assert torch.allclose(g_mine, g_ref, atol=1e-10), f"expected {g_ref}, got {g_mine}"
### END HIDDEN TESTS

# %% [markdown]
# ## 2. Train with your loss
#
# The chapter's `train_variant("augmented", ...)` takes a `loss_fn(z_img, z_txt, z_depth, ids)`. Train the
# augmented-view model with yours for a few epochs and score it on the validation split. Then check the
# point of this variant: at test time the image embedding does not read depth at all.

# %%
from mmalign.experiments.depth import chance_table, rgbd_features, train_variant
from mmalign.recipes import evaluate

train, val = rgbd_features("train", cfg), rgbd_features("val", cfg)
model, history = train_variant("augmented", train, val, cfg, epochs=4,
                               loss_fn=lambda zi, zt, zd, ids: my_depth_view_loss(zi, zt, zd, 0.07, 1.0, ids))
report, chance = evaluate(model, val), chance_table(val)
print(f"validation rsum {report['rsum']:.1f} (chance {chance['rsum']:.1f}); t2i R@1 {report['t2i_R@1']:.1f} %")

# %% nbgrader={"grade": true, "grade_id": "training_test", "locked": true, "points": 2, "schema_version": 3, "solution": false, "task": false}
# In your notebook this reads your run above, for feedback. The grader trains again, from a fixed seed,
# with your `my_depth_view_loss`, and reads nothing of your notebook.
from mmalign.experiments.depth import chance_table, rgbd_features, train_variant
from mmalign.labs.testing import grading
from mmalign.recipes import evaluate

if grading():
    test_cfg = load_config()
    test_train, test_val = rgbd_features("train", test_cfg), rgbd_features("val", test_cfg)
    test_model, test_history = train_variant("augmented", test_train, test_val, test_cfg, epochs=4,
                                             loss_fn=lambda zi, zt, zd, ids: my_depth_view_loss(zi, zt, zd, 0.07, 1.0, ids))
    test_report, test_chance = evaluate(test_model, test_val), chance_table(test_val)
else:
    test_model, test_val, test_history, test_report, test_chance = model, val, history, report, chance
assert test_history.loss[-1] < test_history.loss[0], f"the loss should go down: expected last < first, got first {test_history.loss[0]:.4f}, last {test_history.loss[-1]:.4f}"
assert test_report["t2i_R@1"] > 10 * test_chance["t2i_R@1"], f'trained retrieval should be far above chance: expected t2i R@1 > {10 * test_chance["t2i_R@1"]:.1f}, got {test_report["t2i_R@1"]:.1f}'
test_blind = test_val.image.clone()
test_blind[:, 1280:] = 0  # remove the depth features
with torch.no_grad():
    assert torch.equal(test_model.encode_images(test_val.image), test_model.encode_images(test_blind)), f"the image encoder must ignore the depth features: expected identical outputs, got a difference of up to {(test_model.encode_images(test_val.image) - test_model.encode_images(test_blind)).abs().max():.3g}"

# %% [markdown]
# ## Takeaway
#
# Depth as an augmented view is one extra InfoNCE term: the image is contrasted with its own depth view
# as well as with its captions. Depth shapes the image embedding during training only, so the trained
# model needs no depth sensor.
