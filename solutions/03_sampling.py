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
# # Lab 3: semi-hard negative mining
#
# Chapter 3 compared random, hardest and semi-hard negatives for the bidirectional triplet loss. Here you
# write the semi-hard miner yourself and check it against a case worked out by hand and against
# `mmalign.miners.semi_hard_negatives`; then you train the chapter's projection heads with it.
#
# Write your code where it says `YOUR CODE HERE` (and delete the `raise NotImplementedError()`). The
# cells with `assert`s check your work; the grader adds a few hidden checks of the same kind.

# %%
import torch

from mmalign.config import load_config, seed_everything

cfg = load_config()
torch.set_num_threads(cfg.num_threads or 1)
seed_everything(0)

# %% [markdown]
# ## 1. The semi-hard miner
#
# `sim` is a $(B, B)$ similarity matrix of a paired batch: rows are images, columns are captions and the
# positive of row $i$ is column $i$. `ids` $(B,)$ holds the scene id of each pair; a pair $(i, j)$ with
# $\mathrm{id}_i = \mathrm{id}_j$ is **never** a negative (it is the positive, or another caption of the
# same scene).
#
# For an image anchor $i$ with $s^+ = S_{ii}$, a caption $j$ is a **semi-hard** negative when
#
# $$
# \mathrm{id}_j \ne \mathrm{id}_i \quad\text{and}\quad s^+ - m < S_{ij} < s^+
# $$
#
# (strict on both sides). Return, for every image anchor, the *most similar* semi-hard negative; when an
# anchor has none, return its hardest valid negative (the most similar caption of another scene); when it
# has no valid negative at all, return $-1$. Do the same for caption anchors, whose candidates are the
# image rows of their column and whose positive is $S_{jj}$. Among equal similarities take the lower
# index (`torch.argmax` does). No Python loop over anchors is needed: mask, then take an `argmax` per row.

# %% nbgrader={"grade": false, "grade_id": "semi_hard_impl", "locked": false, "schema_version": 3, "solution": true, "task": false}
def my_semi_hard(sim: torch.Tensor, ids: torch.Tensor, margin: float = 0.2) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, B) sim, (B,) ids -> (neg_for_images (B,), neg_for_texts (B,)) LongTensors, -1 = none."""
    ### BEGIN SOLUTION
    valid = ids[:, None] != ids[None, :]
    out = []
    for s, v in ((sim, valid), (sim.T, valid.T)):
        pos = s.diagonal()[:, None]
        window = v & (s < pos) & (s > pos - margin)
        semi = s.masked_fill(~window, float("-inf")).argmax(1)
        hardest = s.masked_fill(~v, float("-inf")).argmax(1)
        neg = torch.where(window.any(1), semi, hardest)
        out.append(torch.where(v.any(1), neg, torch.full_like(neg, -1)))
    return out[0], out[1]
    ### END SOLUTION


# %% [markdown]
# **By hand**, with $m = 0.2$ and three different scenes:
#
# $$
# S = \begin{pmatrix} 0.9 & 0.8 & 0.3 \\ 0.3 & 0.6 & 0.7 \\ 0.1 & 0.25 & 0.4 \end{pmatrix}.
# $$
#
# *Image anchors (rows).* Row 0: $s^+ = 0.9$, window $(0.7, 0.9)$ holds column 1 (0.8). Row 1: $s^+ = 0.6$,
# window $(0.4, 0.6)$ is empty (0.7 beats the positive, 0.3 is too easy), so the hardest, column 2. Row 2:
# window $(0.2, 0.4)$ holds column 1 (0.25). *Caption anchors (columns).* Column 0: window $(0.7, 0.9)$ is
# empty, the hardest is row 1 (0.3). Column 1: window $(0.4, 0.6)$ is empty, the hardest is row 0 (0.8).
# Column 2: window $(0.2, 0.4)$ holds row 0 (0.3). So `neg_for_images = [1, 2, 1]` and
# `neg_for_texts = [1, 0, 0]`.

# %% nbgrader={"grade": true, "grade_id": "semi_hard_test", "locked": true, "points": 4, "schema_version": 3, "solution": false, "task": false}
from mmalign.miners import semi_hard_negatives

S = torch.tensor([[0.9, 0.8, 0.3], [0.3, 0.6, 0.7], [0.1, 0.25, 0.4]])
neg_i, neg_t = my_semi_hard(S, torch.arange(3), margin=0.2)
assert neg_i.tolist() == [1, 2, 1], f"expected {[1, 2, 1]}, got {neg_i.tolist()}"
assert neg_t.tolist() == [1, 0, 0], f"expected {[1, 0, 0]}, got {neg_t.tolist()}"

gen = torch.Generator().manual_seed(0)
for trial in range(5):  # random batches where some pairs share a scene
    sim = torch.rand(16, 16, generator=gen) * 2 - 1
    ids = torch.randint(0, 10, (16,), generator=gen)
    ref_i, ref_t = semi_hard_negatives(sim, margin=0.3, ids=ids, k=1)
    mine_i, mine_t = my_semi_hard(sim, ids, margin=0.3)
    assert torch.equal(mine_i, ref_i[:, 0]) and torch.equal(mine_t, ref_t[:, 0]), f"trial {trial}: expected {ref_i[:, 0]} and {ref_t[:, 0]}, got {mine_i} and {mine_t}"
### BEGIN HIDDEN TESTS
# strict window: a negative exactly at s_pos or exactly at s_pos - m is not semi-hard
edge = torch.tensor([[0.5, 0.5, 0.25], [0.0, 0.5, 0.0], [0.0, 0.0, 0.5]], dtype=torch.float64)
e_i, _ = my_semi_hard(edge, torch.arange(3), margin=0.25)
r_i, _ = semi_hard_negatives(edge, margin=0.25, ids=torch.arange(3))
assert e_i.tolist() == r_i[:, 0].tolist() == [1, 0, 0], f"expected {[1, 0, 0]}, got {e_i.tolist()}"
# no valid negative at all: -1
same = torch.zeros(4, dtype=torch.long)
a, b = my_semi_hard(torch.rand(4, 4), same)
assert a.tolist() == [-1] * 4 and b.tolist() == [-1] * 4, f"expected {[-1] * 4} and {[-1] * 4}, got {a.tolist()} and {b.tolist()}"
# many random cases, several margins
for trial in range(20):
    sim = torch.randn(24, 24, generator=gen, dtype=torch.float64)
    ids = torch.randint(0, 12, (24,), generator=gen)
    for m in (0.05, 0.5, 2.0):
        ref_i, ref_t = semi_hard_negatives(sim, margin=m, ids=ids, k=1)
        mine_i, mine_t = my_semi_hard(sim, ids, margin=m)
        assert torch.equal(mine_i, ref_i[:, 0]) and torch.equal(mine_t, ref_t[:, 0]), f"expected {ref_i[:, 0]} and {ref_t[:, 0]}, got {mine_i} and {mine_t}"
### END HIDDEN TESTS

# %% [markdown]
# ## 2. Train with your miner
#
# One training step embeds the batch, computes the cosine similarity matrix, mines with *your* function on
# the detached matrix and takes the library's bidirectional triplet loss
# $\frac{1}{2B}\sum_i \big([m - S_{ii} + S_{i,n_i}]_+ + [m - S_{ii} + S_{n'_i,i}]_+\big)$.
# Three epochs on the chapter's features are enough to be far above chance.

# %%
from mmalign.data.features import scene_features
from mmalign.losses import triplet_loss
from mmalign.retrieval import similarity
from mmalign.recipes import evaluate, make_dual_encoder
from mmalign.retrieval import chance_recall
from mmalign.train import fit

train, val = scene_features("train", cfg), scene_features("val", cfg)


def semi_hard_step(model, batch):
    image_features, caption_features, scene_ids = batch
    z_image, z_text = model(image_features, caption_features)
    sim = similarity(z_image, z_text)
    neg_i, neg_t = my_semi_hard(sim.detach(), scene_ids, margin=0.2)
    return triplet_loss(sim, neg_i[:, None], neg_t[:, None], margin=0.2)


seed_everything(0)
model = make_dual_encoder(train, cfg.embed_dim)
history = fit(model, semi_hard_step, train.pairs(), optimizer=torch.optim.AdamW(model.parameters(), lr=cfg.lr),
              epochs=3, batch_size=cfg.batch_size, seed=0, device="cpu")
report = evaluate(model, val)
chance_t2i_r10 = 100 * chance_recall(len(val.world), 1, 10)
print(f"validation: text -> image R@10 {report['t2i_R@10']:.1f} %  (chance {chance_t2i_r10:.1f} %), "
      f"rsum {report['rsum']:.1f}")

# %% nbgrader={"grade": true, "grade_id": "training_test", "locked": true, "points": 2, "schema_version": 3, "solution": false, "task": false}
# In your notebook this reads your run above, for feedback. The grader trains again, from a fixed seed,
# with your `my_semi_hard`, and reads nothing of your notebook.
from mmalign.data.features import scene_features
from mmalign.labs.testing import grading
from mmalign.losses import triplet_loss
from mmalign.recipes import evaluate, make_dual_encoder
from mmalign.retrieval import chance_recall, similarity
from mmalign.train import fit

if grading():
    test_cfg = load_config()
    test_train, test_val = scene_features("train", test_cfg), scene_features("val", test_cfg)

    def test_step(model, batch):
        image_features, caption_features, scene_ids = batch
        z_image, z_text = model(image_features, caption_features)
        sim = similarity(z_image, z_text)
        neg_i, neg_t = my_semi_hard(sim.detach(), scene_ids, margin=0.2)
        return triplet_loss(sim, neg_i[:, None], neg_t[:, None], margin=0.2)

    seed_everything(0)
    test_model = make_dual_encoder(test_train, test_cfg.embed_dim)
    test_history = fit(test_model, test_step, test_train.pairs(), optimizer=torch.optim.AdamW(test_model.parameters(), lr=test_cfg.lr),
                       epochs=3, batch_size=test_cfg.batch_size, seed=0, device="cpu")
    test_report = evaluate(test_model, test_val)
    test_chance = 100 * chance_recall(len(test_val.world), 1, 10)
else:
    test_history, test_report, test_chance = history, report, chance_t2i_r10
assert test_history.loss[-1] < test_history.loss[0], f"the loss should go down: expected last < first, got first {test_history.loss[0]:.4f}, last {test_history.loss[-1]:.4f}"
assert test_report["t2i_R@10"] > 5 * test_chance, f'trained retrieval should be far above chance: expected t2i R@10 > {5 * test_chance:.1f}, got {test_report["t2i_R@10"]:.1f}'

# %% [markdown]
# ## 3. Your turn to explain
#
# In two or three sentences: why can the *hardest* negative make a collapsed model (every embedding equal)
# look attractive to gradient descent early in training, and why does a semi-hard negative not? (Hint:
# compare the triplet's loss before and after collapse.)

# %% [markdown] nbgrader={"grade": true, "grade_id": "collapse_answer", "locked": false, "points": 2, "schema_version": 3, "solution": true, "task": false}
# Early on the hardest negative usually outranks the positive, $s^- > s^+$, so its loss
# $m + s^- - s^+$ is larger than $m$; a collapsed model has $s^- = s^+$ and loss exactly $m$, which is
# lower, so moving all embeddings together decreases the loss. A semi-hard negative has
# $s^+ - m < s^- < s^+$ and loss below $m$: collapse would raise it, so its gradient does not point there.

# %% [markdown]
# ## Takeaway
#
# A miner is a masked `argmax` (or top-$k$) per row of the similarity matrix, in both directions, with
# same-scene pairs masked out. The semi-hard window keeps the negatives informative (inside the margin)
# without letting outliers that beat the positive dominate the early gradient.
