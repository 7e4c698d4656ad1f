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
# Chapter 7's Deep Fusion Encoder (DFE) reads every modality with the same shared weights; a learned
# **context vector** per modality (and a projection head per encoder) tells it which one it is reading. In
# DFE-6 the context vector is the **query** of a scaled dot-product attention over the modality's tokens
# (Vaswani et al., 2017), and the attended vector is added to every token, as in LightCRL's code. Here you
# write that fusion yourself, with a padding mask, check it against a case worked out by hand and against
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
# Inputs: projected tokens $x \in \mathbb{R}^{B \times L \times d}$, a mask $M \in \{0, 1\}^{B \times L}$
# (True for real tokens, False at padding; every row has at least one real token), the context vector
# $c \in \mathbb{R}^d$ and three linear maps `q_proj`, `k_proj`, `v_proj` ($\mathbb{R}^d \to \mathbb{R}^d$,
# e.g. `nn.Linear` layers: call them). Compute
#
# $$
# q = W_q c,\qquad e_{bl} = \frac{q^\top (W_k x_{bl})}{\sqrt d},\qquad
# a_{b} = \mathrm{softmax}\big(e_{b}\ \text{over the real tokens of } b\big),\qquad
# h_{bl} = x_{bl} + \sum_k a_{bk}\, W_v x_{bk},
# $$
#
# and return the fused sequence $h$ $(B, L, d)$ and the weights $a$ $(B, L)$, with $a_{bl} = 0$ exactly at
# padding. No Python loop over the batch: set the scores of padded tokens to $-\infty$ before a
# `torch.softmax` (never a hand-written exp/sum).

# %% nbgrader={"grade": false, "grade_id": "dot_fusion_impl", "locked": false, "schema_version": 3, "solution": true, "task": false}
def my_dot_fusion(x: torch.Tensor, mask: torch.Tensor, c: torch.Tensor, q_proj, k_proj,
                  v_proj) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, L, d) tokens, (B, L) bool mask, (d,) context, three maps d -> d -> (h (B, L, d), weights (B, L))."""
    ### BEGIN SOLUTION
    q = q_proj(c)
    scores = k_proj(x) @ q / math.sqrt(x.shape[-1])
    a = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1)
    u = torch.einsum("bl,bld->bd", a, v_proj(x))
    return x + u.unsqueeze(1), a
    ### END SOLUTION


# %% [markdown]
# **By hand**, with $d = 2$, $W_q = W_k = W_v = I$ (`torch.nn.Identity()`), $c = (\sqrt 2 \ln 2,\ 0)$ and one
# item of three tokens $x = \big((1, 0), (0, 1), (5, 5)\big)$ whose last token is padding: the scores of the
# two real tokens are $q^\top x_l / \sqrt 2 = \ln 2$ and $0$, so $a = (\tfrac{2}{3}, \tfrac{1}{3}, 0)$, the
# attended vector is $u = \tfrac23 (1, 0) + \tfrac13 (0, 1) = (\tfrac23, \tfrac13)$, and every token gets it
# added: $h = \big((\tfrac53, \tfrac13), (\tfrac23, \tfrac43), (\tfrac{17}3, \tfrac{16}3)\big)$. The padded
# token, however large, gets weight 0 (it still receives $u$: the DFE ignores it later, in its Transformer
# layer and its mean).

# %% nbgrader={"grade": true, "grade_id": "dot_fusion_test", "locked": true, "points": 4, "schema_version": 3, "solution": false, "task": false}
from mmalign.models.lightcrl import DeepFusionEncoder

same = torch.nn.Identity()
x = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [5.0, 5.0]]], dtype=torch.float64)
m = torch.tensor([[True, True, False]])
c = torch.tensor([math.sqrt(2) * math.log(2), 0.0], dtype=torch.float64)
h, a = my_dot_fusion(x, m, c, same, same, same)
expected_a = torch.tensor([[2 / 3, 1 / 3, 0.0]], dtype=torch.float64)
expected_h = x + torch.tensor([2 / 3, 1 / 3], dtype=torch.float64)
assert torch.allclose(a, expected_a), f"expected weights {expected_a.tolist()}, got {a.tolist()}"
assert torch.allclose(h, expected_h), f"expected h {expected_h.tolist()}, got {h.tolist()}"

# against the library: its DFE-6 on random tokens with padding
dfe = DeepFusionEncoder({"text": 8}, "dot", width=8, heads=2, ff_dim=16, seed=0).double().eval()
gen = torch.Generator().manual_seed(0)
raw = torch.randn(5, 7, 8, generator=gen, dtype=torch.float64)
mask = torch.arange(7)[None, :] < torch.tensor([7, 3, 1, 5, 6])[:, None]
with torch.no_grad():
    tokens, _ = dfe.tokens(raw, "text", mask)
    context = dfe.context_vector("text")
    ref_h, ref_a = dfe.fuse(tokens, mask, context)
    mine_h, mine_a = my_dot_fusion(tokens, mask, context, dfe.w_q, dfe.w_k, dfe.w_v)
assert torch.allclose(mine_a, ref_a), f"expected weights {ref_a[1].tolist()} (row 1), got {mine_a[1].tolist()}"
assert torch.allclose(mine_h, ref_h), f"expected h {ref_h[0, 0].tolist()} (row 0, token 0), got {mine_h[0, 0].tolist()}"
### BEGIN HIDDEN TESTS
# weights sum to one, padding gets exactly zero, whatever the padded values
huge = tokens.clone()
huge[~mask] = 1e4
with torch.no_grad():
    h2, a2 = my_dot_fusion(huge, mask, context, dfe.w_q, dfe.w_k, dfe.w_v)
assert torch.allclose(a2.sum(1), torch.ones(5, dtype=torch.float64)), f"expected weights summing to 1, got {a2.sum(1).tolist()}"
assert bool((a2[~mask] == 0).all()), f"expected zero weight at padding, got {a2[~mask].tolist()}"
assert torch.allclose(h2[mask], ref_h[mask]), "expected padded values to change no real token's fused value"
# a single real token takes all the weight; float32 in, float32 out
lin = [torch.nn.Linear(3, 3) for _ in range(3)]
h3, a3 = my_dot_fusion(torch.randn(2, 4, 3), torch.tensor([[True, False, False, False], [True] * 4]), torch.randn(3), *lin)
assert a3.dtype == torch.float32 and h3.shape == (2, 4, 3), f"expected float32 (2, 4, 3), got {a3.dtype} {tuple(h3.shape)}"
assert a3[0].tolist() == [1.0, 0.0, 0.0, 0.0], f"expected [1, 0, 0, 0], got {a3[0].tolist()}"
# large scores do not overflow
big = 1e3 * torch.randn(3, 5, 4, dtype=torch.float64)
h4, a4 = my_dot_fusion(big, torch.ones(3, 5, dtype=torch.bool), torch.randn(4, dtype=torch.float64), same, same, same)
assert torch.isfinite(h4).all() and torch.isfinite(a4).all(), "expected finite outputs for large scores, got NaN/inf"
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
    def fuse(self, x, mask, c):
        return my_dot_fusion(x, mask, c, self.w_q, self.w_k, self.w_v)


train, val = image_text_split("train", cfg), image_text_split("val", cfg)
seed_everything(0)
mine = make_image_text_dfe("dot", cfg)
mine.__class__ = MyDotDFE  # the same weights, your fusion
mine, history = train_image_text_dfe("dot", train, val, cfg, epochs=2, dfe=mine)
report = evaluate_image_text(mine, val)
chance = 100 * chance_recall(len(val.patches), 1, 1)
print(f"validation: text -> image R@1 {report['t2i_R@1']:.1f} % (chance {chance:.1f} %), rsum {report['rsum']:.1f}")

# %% nbgrader={"grade": true, "grade_id": "training_test", "locked": true, "points": 2, "schema_version": 3, "solution": false, "task": false}
# In your notebook this reads your run above, for feedback. The grader trains again, from a fixed seed,
# with your `my_dot_fusion`, and reads nothing of your notebook.
from mmalign.experiments.lightcrl import evaluate_image_text, image_text_split, make_image_text_dfe, train_image_text_dfe
from mmalign.labs.testing import grading
from mmalign.models.lightcrl import DeepFusionEncoder
from mmalign.retrieval import chance_recall


class TestDotDFE(DeepFusionEncoder):
    def fuse(self, x, mask, c):
        return my_dot_fusion(x, mask, c, self.w_q, self.w_k, self.w_v)


if grading():
    test_cfg = load_config()
    test_train, test_val = image_text_split("train", test_cfg), image_text_split("val", test_cfg)
    seed_everything(0)
    test_dfe = make_image_text_dfe("dot", test_cfg)
    test_dfe.__class__ = TestDotDFE
    test_dfe, test_history = train_image_text_dfe("dot", test_train, test_val, test_cfg, epochs=2, dfe=test_dfe, progress=False)
    test_report = evaluate_image_text(test_dfe, test_val)
    test_chance = 100 * chance_recall(len(test_val.patches), 1, 1)
else:
    test_history, test_report, test_chance = history, report, chance
assert test_history.loss[-1] < test_history.loss[0], f"the loss should go down: expected last < first, got {test_history.loss[0]:.3f} -> {test_history.loss[-1]:.3f}"
assert test_report["t2i_R@1"] > 10 * test_chance, f"expected text -> image R@1 above {10 * test_chance:.1f} %, got {test_report['t2i_R@1']:.1f} %"

# %% [markdown]
# ## 3. Your turn to explain
#
# In DFE-1 (addition) the same context vector $c_m$ is added to **every** token of modality $m$, before the
# LayerNorm and the shared Transformer layer; each modality also has its own projection head. In two or
# three sentences: what can a vector added to every token change about how the shared layer reads a
# modality, and what can it not change that a per-modality projection head can? How would you measure
# which of the two tells the modalities apart in a trained DFE (chapter 7, section 6, does one such test)?

# %% [markdown] nbgrader={"grade": true, "grade_id": "context_answer", "locked": false, "points": 2, "schema_version": 3, "solution": true, "task": false}
# Adding $c_m$ shifts every token of the modality by the same vector: after the LayerNorm the shared layer
# sees all of that modality's tokens moved in one direction, so its attention and feed-forward layers can
# treat the modality differently (like a per-modality bias), but the shift is the same whatever the token
# says and cannot reweight, rotate or mix the features of a single token. A projection head is a full
# learned map per modality and can. To see which one does the work, read a modality with the other
# modality's context (the heads unchanged) and measure retrieval: if it barely drops, the heads carry the
# difference; if it collapses, the context does.

# %% [markdown]
# ## Takeaway
#
# Scaled dot-product fusion is a masked softmax over $q^\top k / \sqrt d$ with the context vector as the only
# query, and its output is added to every token; padding must be masked before the softmax, not after.
# Everything after the heads and the contexts is shared between the modalities.
