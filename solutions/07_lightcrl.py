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
# # Lab 7: scaled dot-product fusion with a context vector
#
# Chapter 7's Deep Fusion Encoder (DFE) reads every modality with the same weights; a learned **context
# vector** per modality tells it which one it is reading. In DFE-6 the context vector is the **query** of a
# scaled dot-product attention over the modality's tokens (Vaswani et al., 2017). Here you write that fusion
# yourself, with a padding mask, check it against a case worked out by hand and against
# `mmalign.models.lightcrl.DeepFusionEncoder`, then train a DFE that uses your function.
#
# Write your code where it says `YOUR CODE HERE` (and delete the `raise NotImplementedError()`). The cells
# with `assert`s check your work; the grader adds a few hidden checks of the same kind.

# %%
import math

import torch

from mmalign.config import load_config, seed_everything

cfg = load_config()
torch.set_num_threads(cfg.num_threads or 1)
seed_everything(0)

# %% [markdown]
# ## 1. The fusion
#
# Inputs: tokens $H \in \mathbb{R}^{B \times L \times d}$ (already standardised and adapted), a mask
# $M \in \{0, 1\}^{B \times L}$ (True for real tokens, False at padding; every row has at least one real
# token), the context vector $c \in \mathbb{R}^d$ and three $d \times d$ matrices $W_q, W_k, W_v$ stored as
# `nn.Linear` weights (so $W x$ is `x @ W.T`). Compute
#
# $$
# q = W_q c,\qquad e_{bl} = \frac{q^\top W_k H_{bl}}{\sqrt d},\qquad
# a_{b} = \mathrm{softmax}\big(e_{b}\ \text{over the real tokens of } b\big),\qquad
# u_b = \sum_l a_{bl}\, W_v H_{bl},
# $$
#
# and return $u$ $(B, d)$ and $a$ $(B, L)$, with $a_{bl} = 0$ exactly at padding. No Python loop over the
# batch: set the scores of padded tokens to $-\infty$ before a `torch.softmax` (never a hand-written
# exp/sum).

# %% nbgrader={"grade": false, "grade_id": "dot_fusion_impl", "locked": false, "schema_version": 3, "solution": true, "task": false}
def my_dot_fusion(h: torch.Tensor, mask: torch.Tensor, c: torch.Tensor, w_q: torch.Tensor, w_k: torch.Tensor,
                  w_v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, L, d) tokens, (B, L) bool mask, (d,) context, three (d, d) weights -> (u (B, d), weights (B, L))."""
    ### BEGIN SOLUTION
    q = c @ w_q.T
    scores = (h @ w_k.T) @ q / math.sqrt(h.shape[-1])
    a = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1)
    u = torch.einsum("bl,bld->bd", a, h @ w_v.T)
    return u, a
    ### END SOLUTION


# %% [markdown]
# **By hand**, with $d = 2$, $W_q = W_k = W_v = I$, $c = (\sqrt 2 \ln 2,\ 0)$ and one item of three tokens
# $H = \big((1, 0), (0, 1), (5, 5)\big)$ whose last token is padding: the scores of the two real tokens are
# $q^\top H_l / \sqrt 2 = \ln 2$ and $0$, so $a = (\tfrac{2}{3}, \tfrac{1}{3}, 0)$ and
# $u = \tfrac23 (1, 0) + \tfrac13 (0, 1) = (\tfrac23, \tfrac13)$. The padded token, however large, gets
# weight 0.

# %% nbgrader={"grade": true, "grade_id": "dot_fusion_test", "locked": true, "points": 4, "schema_version": 3, "solution": false, "task": false}
from mmalign.models.lightcrl import DeepFusionEncoder

eye = torch.eye(2, dtype=torch.float64)
h = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [5.0, 5.0]]], dtype=torch.float64)
m = torch.tensor([[True, True, False]])
c = torch.tensor([math.sqrt(2) * math.log(2), 0.0], dtype=torch.float64)
u, a = my_dot_fusion(h, m, c, eye, eye, eye)
expected_a = torch.tensor([[2 / 3, 1 / 3, 0.0]], dtype=torch.float64)
expected_u = torch.tensor([[2 / 3, 1 / 3]], dtype=torch.float64)
assert torch.allclose(a, expected_a), f"expected weights {expected_a.tolist()}, got {a.tolist()}"
assert torch.allclose(u, expected_u), f"expected u {expected_u.tolist()}, got {u.tolist()}"

# against the library: its DFE-6 on random tokens with padding
dfe = DeepFusionEncoder({"text": 8}, "dot", out_dim=4, seed=0).double()
gen = torch.Generator().manual_seed(0)
x = torch.randn(5, 7, 8, generator=gen, dtype=torch.float64)
mask = torch.arange(7)[None, :] < torch.tensor([7, 3, 1, 5, 6])[:, None]
with torch.no_grad():
    ref_u, ref_a = dfe.fuse(x, "text", mask)
    tokens, _ = dfe.tokens(x, "text", mask)
    mine_u, mine_a = my_dot_fusion(tokens, mask, dfe.context["text"], dfe.w_q.weight, dfe.w_k.weight, dfe.w_v.weight)
assert torch.allclose(mine_a, ref_a), f"expected weights {ref_a[1].tolist()} (row 1), got {mine_a[1].tolist()}"
assert torch.allclose(mine_u, ref_u), f"expected u {ref_u[0].tolist()} (row 0), got {mine_u[0].tolist()}"
### BEGIN HIDDEN TESTS
# weights sum to one, padding gets exactly zero, whatever the padded values
huge = tokens.clone()
huge[~mask] = 1e4
u2, a2 = my_dot_fusion(huge, mask, dfe.context["text"].detach(), dfe.w_q.weight.detach(), dfe.w_k.weight.detach(),
                       dfe.w_v.weight.detach())
assert torch.allclose(a2.sum(1), torch.ones(5, dtype=torch.float64)), f"expected weights summing to 1, got {a2.sum(1).tolist()}"
assert bool((a2[~mask] == 0).all()), f"expected zero weight at padding, got {a2[~mask].tolist()}"
assert torch.allclose(u2, ref_u), f"expected padded values to change nothing, got u {u2[1].tolist()} vs {ref_u[1].tolist()}"
# a single real token takes all the weight; float32 in, float32 out
u3, a3 = my_dot_fusion(torch.randn(2, 4, 3), torch.tensor([[True, False, False, False], [True] * 4]), torch.randn(3),
                       torch.randn(3, 3), torch.randn(3, 3), torch.randn(3, 3))
assert a3.dtype == torch.float32 and u3.shape == (2, 3), f"expected float32 (2, 3), got {a3.dtype} {tuple(u3.shape)}"
assert a3[0].tolist() == [1.0, 0.0, 0.0, 0.0], f"expected [1, 0, 0, 0], got {a3[0].tolist()}"
# large scores do not overflow
u4, a4 = my_dot_fusion(1e3 * torch.randn(3, 5, 4, dtype=torch.float64), torch.ones(3, 5, dtype=torch.bool),
                       torch.randn(4, dtype=torch.float64), eye.new_ones(4, 4), torch.eye(4, dtype=torch.float64),
                       torch.eye(4, dtype=torch.float64))
assert torch.isfinite(u4).all() and torch.isfinite(a4).all(), "expected finite outputs for large scores, got NaN/inf"
### END HIDDEN TESTS

# %% [markdown]
# ## 2. A DFE with your fusion
#
# Subclass the library's DFE so that its `fuse` calls your function, then align images (EfficientNet-Lite0
# patches) and captions (MiniLM token states) with it, exactly as the chapter does. Two epochs are enough to
# be far above chance.

# %%
from mmalign.experiments.lightcrl import evaluate_image_text, image_text_split, make_image_text_dfe, train_image_text_dfe
from mmalign.retrieval import chance_recall


class MyDotDFE(DeepFusionEncoder):
    def fuse(self, x, modality, mask=None):
        h, mask = self.tokens(x, modality, mask)
        return my_dot_fusion(h, mask, self.context[modality], self.w_q.weight, self.w_k.weight, self.w_v.weight)


train, val = image_text_split("train", cfg), image_text_split("val", cfg)
seed_everything(0)
mine = make_image_text_dfe("dot", cfg, train)
mine.__class__ = MyDotDFE  # same weights and statistics, your fusion
mine, history = train_image_text_dfe("dot", train, val, cfg, epochs=2, dfe=mine)
report = evaluate_image_text(mine, val)
chance = 100 * chance_recall(len(val.patches), 1, 1)
print(f"validation: text -> image R@1 {report['t2i_R@1']:.1f} % (chance {chance:.1f} %), rsum {report['rsum']:.1f}")

# %% nbgrader={"grade": true, "grade_id": "training_test", "locked": true, "points": 2, "schema_version": 3, "solution": false, "task": false}
assert history.loss[-1] < history.loss[0], f"the loss should go down: expected last < first, got {history.loss[0]:.3f} -> {history.loss[-1]:.3f}"
assert report["t2i_R@1"] > 10 * chance, f"expected text -> image R@1 above {10 * chance:.1f} %, got {report['t2i_R@1']:.1f} %"

# %% [markdown]
# ## 3. Your turn to explain
#
# In two or three sentences: with the same input width for two modalities (no adapter), why is DFE-1
# (addition, $u = \bar h + c_m$) the same as giving the MLP's first layer a different bias per modality? What
# does this say about how much DFE-1 can adapt to each modality, compared with DFE-6?

# %% [markdown] nbgrader={"grade": true, "grade_id": "context_answer", "locked": false, "points": 2, "schema_version": 3, "solution": true, "task": false}
# The first layer computes $W(\bar h + c_m) + b = W\bar h + (W c_m + b)$: the context only shifts the bias, by
# $W c_m$, one fixed vector per modality. So DFE-1 can translate each modality's (pooled) features before the
# shared nonlinearity but cannot weigh tokens differently or rotate the space per modality. In DFE-6 the
# context is a query that decides which tokens (or patches) of each input count, a change that depends on the
# content of the input.

# %% [markdown]
# ## Takeaway
#
# Scaled dot-product fusion is a masked softmax over $q^\top k / \sqrt d$ with the context vector as the only
# query; padding must be masked before the softmax, not after. Everything else in the DFE is shared between
# the modalities.
