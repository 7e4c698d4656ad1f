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
# # Lab 6: the average-of-others anchor
#
# Chapter 6 aligned four views (image, English, Hindi, Japanese) with a multi-view loss. The full graph
# contrasts every pair of views: $V(V-1)/2$ terms. The thesis's **average-of-others anchor** needs only $V$:
# each view $V_v$ is contrasted with the mean of the *other* views,
#
# $$
# \bar V_{-v} = \frac{1}{V-1} \sum_{u \ne v} V_u, \qquad
# L_{others} = \frac{1}{V} \sum_{v=1}^{V} L_{sym}(\bar V_{-v}, V_v),
# $$
#
# where $L_{sym}$ is the symmetric InfoNCE loss (`mmalign.losses.info_nce`) and the means are taken over the
# embeddings as given (row by row: row $i$ of every view is the same datapoint). You write it, check it, and
# train the chapter's encoders with it.
#
# Write your code where it says `YOUR CODE HERE` (and delete the `raise NotImplementedError()`).

# %%
import math

import torch

from mmalign.config import load_config, seed_everything
from mmalign.losses import info_nce
from mmalign.losses.multiview import multiview_loss

cfg = load_config()
seed_everything(0)
torch.set_num_threads(cfg.num_threads or 1)

# %% [markdown]
# ## 1. The loss
#
# `views` is a list of $V \ge 2$ tensors of shape $(B, D)$. `ids`, when given, is a $(B,)$ tensor of scene
# ids: pass it to every InfoNCE term as `ids=ids` (captions of one scene are positives of
# each other). Raise a `ValueError` when there are fewer than two views. No Python loop over the batch is
# needed; a loop over the $V$ views is fine.

# %% nbgrader={"grade": false, "grade_id": "others_anchor_impl", "locked": false, "schema_version": 3, "solution": true, "task": false}
def my_others_anchor_loss(views: list[torch.Tensor], temperature: float = 0.07,
                          ids: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over views v of InfoNCE(mean of the other views, view v): V tensors (B, D) -> scalar."""
    ### BEGIN SOLUTION
    if len(views) < 2:
        raise ValueError(f"the average-of-others anchor needs at least 2 views, got {len(views)}")
    stacked = torch.stack(list(views))  # (V, B, D)
    total = stacked.sum(0)
    V = len(views)
    terms = [info_nce((total - stacked[v]) / (V - 1), stacked[v], temperature=temperature, ids=ids)
             for v in range(V)]
    return torch.stack(terms).mean()
    ### END SOLUTION


# %% [markdown]
# Cases by hand. With $V = 2$ views the "others" of view 1 is view 2 and vice versa, so both terms are
# $L_{sym}(V_1, V_2)$ and the loss equals the plain two-view InfoNCE; with $V_1 = V_2 = I_2$ and $\tau = 1$
# that is $\log(1 + e^{-1})$ (lab 0). With three views where $V_3 = V_1$, the anchor of view 2 is
# $\tfrac12(V_1 + V_3) = V_1$: the second term is $L_{sym}(V_1, V_2)$.

# %% nbgrader={"grade": true, "grade_id": "others_anchor_test", "locked": true, "points": 3, "schema_version": 3, "solution": false, "task": false}
eye = torch.eye(2, dtype=torch.float64)
assert math.isclose(float(my_others_anchor_loss([eye, eye], 1.0)), math.log(1 + math.exp(-1)), rel_tol=1e-9), f"expected {math.log(1 + math.exp(-1))}, got {float(my_others_anchor_loss([eye, eye], 1.0))}"
a, b = torch.randn(8, 5, dtype=torch.float64), torch.randn(8, 5, dtype=torch.float64)
assert torch.allclose(my_others_anchor_loss([a, b], 0.1), info_nce(a, b, temperature=0.1), atol=1e-10), f"expected {info_nce(a, b, temperature=0.1)}, got {my_others_anchor_loss([a, b], 0.1)}"
views = [torch.randn(16, 8, dtype=torch.float64) for _ in range(4)]
reference, n_terms = multiview_loss(views, mode="others_anchor", temperature=0.1)
assert n_terms == 4, f"expected {4}, got {n_terms}"
assert torch.allclose(my_others_anchor_loss(views, 0.1), reference, atol=1e-10), f"expected {reference}, got {my_others_anchor_loss(views, 0.1)}"
### BEGIN HIDDEN TESTS
c = torch.randn(8, 5, dtype=torch.float64)
expected = (info_nce((b + a) / 2, c, temperature=0.2) + info_nce((a + c) / 2, b, temperature=0.2)
            + info_nce((b + c) / 2, a, temperature=0.2)) / 3
assert torch.allclose(my_others_anchor_loss([c, b, a], 0.2), expected, atol=1e-10), f"expected {expected}, got {my_others_anchor_loss([c, b, a], 0.2)}"
try:
    my_others_anchor_loss([a], 0.1)
except ValueError:
    pass
else:
    raise AssertionError("one view should raise ValueError")
views[0].requires_grad_(True)
g_mine, = torch.autograd.grad(my_others_anchor_loss(views, 0.1), views[0])
g_ref, = torch.autograd.grad(multiview_loss(views, mode="others_anchor", temperature=0.1)[0], views[0])
assert torch.allclose(g_mine, g_ref, atol=1e-10), f"expected {g_ref}, got {g_mine}"
### END HIDDEN TESTS

# %% [markdown]
# With scene ids (rows 0 and 1 are two captions of the same scene), your loss must match the library's
# `multiview_loss` given the same ids.

# %% nbgrader={"grade": true, "grade_id": "others_anchor_ids_test", "locked": true, "points": 2, "schema_version": 3, "solution": false, "task": false}
ids = torch.tensor([0, 0, 1, 2, 3, 3, 4, 5])
views = [torch.randn(8, 6, dtype=torch.float64) for _ in range(3)]
reference, _ = multiview_loss(views, mode="others_anchor", temperature=0.2, ids=ids)
assert torch.allclose(my_others_anchor_loss(views, 0.2, ids), reference, atol=1e-10), f"expected {reference}, got {my_others_anchor_loss(views, 0.2, ids)}"
### BEGIN HIDDEN TESTS
assert not torch.allclose(my_others_anchor_loss(views, 0.2), reference), f"the ids must change the loss here: expected without ids != {reference}, got {my_others_anchor_loss(views, 0.2)}"
### END HIDDEN TESTS

# %% [markdown]
# ## 2. Train with your loss
#
# `train_multilingual` (from the chapter) takes a `loss_fn(views, ids)`. Train the four towers (image head,
# three character encoders with average pooling) with your anchor loss for two epochs, and score image and
# cross-lingual retrieval on the validation split.

# %%
from mmalign.experiments.languages import (chance_tables, evaluate_multilingual, multilingual_split, summary,
                                           train_multilingual)

train, tokenizers = multilingual_split("train", cfg)
val, _ = multilingual_split("val", cfg, tokenizers)
model, history = train_multilingual(train, None, tokenizers, cfg, epochs=2, desc="average-of-others",
                                    loss_fn=lambda views, ids: my_others_anchor_loss(views, 0.07, ids))
result, chance = summary(evaluate_multilingual(model, val)), summary(chance_tables(val))
print({k: round(v, 1) for k, v in result.items()}, "chance:", {k: round(v, 2) for k, v in chance.items()})

# %% nbgrader={"grade": true, "grade_id": "training_test", "locked": true, "points": 2, "schema_version": 3, "solution": false, "task": false}
# In your notebook this reads your run above, for feedback. The grader trains again, from a fixed seed,
# with your `my_others_anchor_loss`, and reads nothing of your notebook.
from mmalign.experiments.languages import chance_tables, evaluate_multilingual, multilingual_split, summary, train_multilingual
from mmalign.labs.testing import grading

if grading():
    test_cfg = load_config()
    test_train, test_tokenizers = multilingual_split("train", test_cfg)
    test_val, _ = multilingual_split("val", test_cfg, test_tokenizers)
    test_model, test_history = train_multilingual(test_train, None, test_tokenizers, test_cfg, epochs=2, desc="average-of-others",
                                                  loss_fn=lambda views, ids: my_others_anchor_loss(views, 0.07, ids))
    test_result, test_chance = summary(evaluate_multilingual(test_model, test_val)), summary(chance_tables(test_val))
else:
    test_history, test_result, test_chance = history, result, chance
assert test_history.loss[-1] < test_history.loss[0], f"the loss should go down: expected last < first, got first {test_history.loss[0]:.4f}, last {test_history.loss[-1]:.4f}"
assert test_result["image R (mean)"] > 5 * test_chance["image R (mean)"], f'expected image R (mean) > {5 * test_chance["image R (mean)"]:.1f}, got {test_result["image R (mean)"]:.1f}'
assert test_result["cross-lingual R (mean)"] > 5 * test_chance["cross-lingual R (mean)"], f'expected cross-lingual R (mean) > {5 * test_chance["cross-lingual R (mean)"]:.1f}, got {test_result["cross-lingual R (mean)"]:.1f}'

# %% [markdown]
# ## Takeaway
#
# The average-of-others anchor contrasts each view with the centroid of the others: $V$ terms instead of
# $V(V-1)/2$, and, unlike the average-of-all anchor, no view is ever on both sides of its own term.
