# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     notebook_metadata_filter: kernelspec,-jupytext.text_representation.jupytext_version
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
# # 3. Sampling negatives for the triplet loss
#
# A **triplet** is an anchor, its positive and one negative. For an image–caption batch the triplet loss
# ([`triplet_loss`](#mmalign.losses.triplet.triplet_loss); Harwath et al., 2018; the thesis, eqs. 2.5–2.6) asks every anchor to be closer to its positive than to a
# negative by a margin $m$, in both directions: images as anchors against captions, captions as anchors
# against images. With cosine similarities $S_{ij}$ (row $i$ an image, column $j$ a caption, the
# positive of row $i$ is column $i$), $N^I_i$ the negatives chosen for image $i$ and $N^T_i$ those for
# caption $i$:
#
# $$
# \mathcal{L} = \frac{1}{|\mathcal V|}\Big(\sum_i \sum_{j \in N^I_i} \big[m - S_{ii} + S_{ij}\big]_+
#             + \sum_i \sum_{r \in N^T_i} \big[m - S_{ii} + S_{ri}\big]_+\Big),
# $$
#
# where $[x]_+ = \max(0, x)$ and $|\mathcal V|$ counts the triplets. The loss is only as good as the
# negatives: a triplet whose negative is already further than $m$ below the positive has zero loss and
# teaches nothing. This chapter follows problem 1 of seed 002 and compares three ways to choose them,
# **with the same budget** (data, heads, epochs, batch size, learning rate, margin):
#
# 1. **random**: one negative drawn uniformly from the batch (the thesis' eq. 2.6, uniform imposters; the
#    baseline that FaceNet's semi-hard and VSE++'s hardest negatives were designed to beat);
# 2. **top-$k$ hardest**: the $k$ most similar negatives of every anchor, in both directions (Faghri et al.,
#    2018, use $k=1$; the seed tuned $k = 3$ at batch size 12 and found larger $k$ picks triplets with
#    "not enough violation");
# 3. **semi-hard**: negatives that rank below the positive but still inside the margin (Schroff et al.,
#    2015).
#
# We then look at *why* they differ: the fraction of triplets that still violate the margin during
# training, the distribution of the anchor–negative gap, the interplay of batch size and $k$, and how the
# hardest negatives can collapse a model early in training.

# %%
import matplotlib.pyplot as plt
import pandas as pd
import torch
from IPython.display import HTML, display

from mmalign.config import load_config, seed_everything

cfg = load_config()  # MMALIGN_PROFILE=ci (default), full or gpu
seed_everything(cfg.seed)
torch.set_num_threads(cfg.num_threads or 1)  # tiny heads: one thread is as fast and never oversubscribes
print(f"profile={cfg.profile}  device={cfg.device}  train/val/test scenes={cfg.n_train}/{cfg.n_val}/{cfg.n_test}")

# %% [markdown]
# The setup of chapter 0: frozen EfficientNet-Lite0 image features and MiniLM caption features of the scene
# world, cached on disk, and one linear projection head per tower into a shared space. A training batch
# holds one (image, caption) pair per caption; every scene has three captions, so two rows of a batch can
# show the same scene. The miners take the **scene ids** and never offer a caption of the anchor's own
# scene as a negative.

# %%
from mmalign.data.features import scene_features

train, val, test = (scene_features(split, cfg) for split in ("train", "val", "test"))
print(f"{len(train.texts)} training pairs, {len(test.world)} test images, {len(test.texts)} test captions")

# %% [markdown]
# ## 1. Three miners
#
# For an anchor $a$ with positive similarity $s^+_a$ and candidate negatives $\{s_{an}\}$ (other scenes
# only), the miners of [`mmalign.miners`](#mmalign.miners) return indices:
#
# * **random** ([`random_negatives`](#mmalign.miners.random_negatives)): $n \sim \mathrm{Uniform}\{n : \mathrm{id}_n \ne \mathrm{id}_a\}$;
# * **top-$k$ hardest** ([`hardest_negatives`](#mmalign.miners.hardest_negatives)): the $k$ largest $s_{an}$ (VSE++ with $k=1$), for image anchors along the rows of
#   $S$ and for caption anchors along its columns;
# * **semi-hard** ([`semi_hard_negatives`](#mmalign.miners.semi_hard_negatives)): the most similar $n$ with $s^+_a - m < s_{an} < s^+_a$: ranked correctly, yet inside the
#   margin. When an anchor has no such negative (common at the start, when many negatives beat the
#   positive), it falls back to its hardest one.
#
# The **anchor–negative gap** ([`anchor_negative_gaps`](#mmalign.miners.anchor_negative_gaps)) $g = s^+_a - s_{an}$ tells a triplet's state: $g < m$ means a non-zero
# hinge (a *violating* triplet, it produces a gradient), $g < 0$ means the negative outranks the positive.
# On one batch of eight pairs and the untrained heads, here is what each miner picks for the image anchors:

# %%
from mmalign.experiments.sampling import MARGIN, mine
from mmalign.retrieval import similarity
from mmalign.recipes import make_dual_encoder

seed_everything(cfg.seed)
untrained = make_dual_encoder(train, cfg.embed_dim)
img, txt, ids = train.pairs()
demo = torch.arange(0, 24, 3)  # the first caption of scenes 0..7
with torch.no_grad():
    sim_demo = similarity(*untrained(img[demo], txt[demo]))
rows = {"positive s_ii": sim_demo.diagonal()}
for miner in ("random", "hardest", "semi-hard"):
    neg_i, _ = mine(sim_demo, ids[demo], miner, k=1, generator=torch.Generator().manual_seed(0))
    rows[f"{miner}: caption"] = neg_i[:, 0]
    rows[f"{miner}: gap"] = sim_demo.diagonal() - sim_demo.gather(1, neg_i)[:, 0]
pd.DataFrame({k: v.numpy() for k, v in rows.items()}).round(3).rename_axis("image anchor")

# %%
assert all(bool((rows[f"{miner}: gap"] < MARGIN).all()) for miner in ("random", "hardest", "semi-hard"))
assert bool((rows["hardest: gap"] <= torch.minimum(rows["random: gap"], rows["semi-hard: gap"]) + 1e-6).all())

# %% [markdown]
# Before training the gaps are close to zero or negative: every triplet of this batch violates the margin,
# whatever the miner. The hardest negative always has the smallest gap of the row.
#
# ## 2. Same budget, five samplers
#
# One training step mines on the batch's (detached) similarity matrix, then takes the triplet loss; it also
# logs the fraction of the mined triplets that still violate the margin. [`mmalign.experiments.sampling`](#mmalign.experiments.sampling)
# holds it, so this notebook and the reference results file run the same code:

# %%
import inspect

from mmalign.experiments import sampling

print(inspect.getsource(sampling.triplet_step))

# %% [markdown]
# Every run gets the same initial weights, epochs, batch size and learning rate; [`fit`](#mmalign.train.fit) keeps the weights
# with the best validation rsum. The margin is $m = 0.2$ on cosine similarities, as in VSE++.

# %%
budget = sampling.budgets(cfg)
steps_per_epoch = len(train.texts) // cfg.batch_size
runs, live = {}, {}
for name, (miner, k) in sampling.STRATEGIES.items():
    model, history = sampling.train_triplet(train, val, cfg, miner, k, epochs=budget["epochs"], desc=name)
    runs[name] = (model, history)
    live[name] = sampling.evaluate(model, test)
    live[name]["violating, epoch 1 (%)"] = 100 * sampling.mean_over(history.metrics["violating"], True, steps_per_epoch)
    live[name]["violating, last epoch (%)"] = 100 * sampling.mean_over(history.metrics["violating"], False, steps_per_epoch)
    live[name]["best epoch"] = history.best["epoch"] + 1
print(f"{budget['epochs']} epochs of {steps_per_epoch} steps each, batch size {cfg.batch_size}")

# %% [markdown]
# Recall@K on the test split (percent; bold: best per column; for the violation columns the *lowest* is
# bold, but lower is not better there: it means fewer triplets that still teach something).

# %%
from mmalign.plots import results_table_html

lower = {"violating, epoch 1 (%)": False, "violating, last epoch (%)": False, "best epoch": False}
display(HTML(results_table_html(live, higher_is_better=lower)))

# %% [markdown]
# **"Not enough violation", made visible.** The fraction of mined triplets ([`margin_violation_fraction`](#mmalign.miners.margin_violation_fraction)) with a non-zero hinge, over
# training (mean of 10 steps). With random negatives it falls fast: most random negatives are easy, so
# most triplets of a batch give no gradient at all and learning slows down. The hardest negative of an
# anchor keeps violating the margin for most anchors; with larger $k$ the extra negatives are easier and
# the fraction drops, which is the seed's observation.

# %%
fig, ax = plt.subplots(figsize=(7, 3.6))
for i, (name, (_, h)) in enumerate(runs.items()):
    ax.plot(h.step, 100 * pd.Series(h.metrics["violating"]).rolling(10, min_periods=1).mean(), label=name, color=f"C{i}")
ax.set(xlabel="step", ylabel="mined triplets violating the margin (%)", ylim=(0, 102))
ax.legend(frameon=False, fontsize=8)
plt.show()

# %% [markdown]
# ## 3. The anchor–negative gap at the start and at the end
#
# On one fixed batch of training pairs, the gaps $g = s^+ - s^-$ of the triplets each miner picks, with the
# untrained heads (start) and with the trained ones (end). Left of the dashed line ($g < m$) a triplet
# produces a gradient.

# %%
names = ["random", "hardest k=1", "hardest k=10", "semi-hard"]
fig, axes = plt.subplots(1, len(names), figsize=(3.3 * len(names), 3), sharey=True)
gaps = {}
for ax, name in zip(axes, names):
    miner, k = sampling.STRATEGIES[name]
    start = sampling.probe_gaps(untrained, train, miner, k, batch_size=cfg.batch_size, seed=cfg.seed)
    end = sampling.probe_gaps(runs[name][0], train, miner, k, batch_size=cfg.batch_size, seed=cfg.seed)
    gaps[name] = (start, end)
    bins = torch.linspace(-0.6, 1.4, 41).numpy()
    ax.hist(start.numpy(), bins=bins, alpha=0.6, label="start")
    ax.hist(end.numpy(), bins=bins, alpha=0.6, label="end")
    ax.axvline(MARGIN, color="k", ls="--", lw=1)
    ax.set(title=name, xlabel="gap $s^+ - s^-$")
axes[0].set_ylabel("triplets")
axes[0].legend(frameon=False)
fig.tight_layout()
plt.show()
pd.DataFrame({name: {"violating at start (%)": 100 * float((s < MARGIN).float().mean()),
                     "violating at end (%)": 100 * float((e < MARGIN).float().mean())}
              for name, (s, e) in gaps.items()}).T.round(1)

# %% [markdown]
# At the start every miner sees gaps around zero. At the end the random negatives sit far to the right of
# the margin: they are solved and give no gradient. Most of the hardest negatives are still inside it, and
# the semi-hard ones sit, by construction, inside the window $(0, m)$ wherever one exists.
#
# ## 4. Batch size against $k$
#
# "Hardest" is relative to the batch: the $k$ hardest of 32 candidates are easier than the $k$ hardest of
# 512, and $k = 10$ in a batch of 32 is almost a third of it. We train with the hardest miner for every
# batch size $B$ and $k$, for the same number of *epochs* (so a larger batch takes fewer, larger steps) and
# score the test rsum (the sum of the six recalls).

# %%
batch_vs_k = {}
for bs in budget["sweep_batch_sizes"]:
    for k in sampling.SWEEP_K:
        model, _ = sampling.train_triplet(train, val, cfg, "hardest", k, batch_size=bs,
                                          epochs=budget["sweep_epochs"], desc=f"B={bs} k={k}")
        batch_vs_k.setdefault(f"B={bs}", {})[f"k={k}"] = sampling.evaluate(model, test)["rsum"]
sweep = pd.DataFrame(batch_vs_k).T
sweep.round(1)

# %%
fig, ax = plt.subplots(figsize=(4.6, 3.2))
im = ax.imshow(sweep.values, cmap="viridis")
ax.set_xticks(range(sweep.shape[1]), sweep.columns)
ax.set_yticks(range(sweep.shape[0]), sweep.index)
for (r, c), v in pd.DataFrame(sweep.values).stack().items():
    ax.text(c, r, f"{v:.0f}", ha="center", va="center", color="w", fontsize=9)
fig.colorbar(im, ax=ax, label="test rsum")
ax.set_title(f"hardest negatives, {budget['sweep_epochs']} epochs")
plt.show()

# %% [markdown]
# Read the table above along a row to see $k$ at a fixed batch size, and down a column for the batch size.
# Two effects mix: a larger batch offers harder negatives, but at a fixed number of epochs it also takes
# fewer optimizer steps. Neighbouring cells differ by a few rsum points, which is within the noise of a run
# this small, so we do not assert an ordering on them. In the full-profile reference table below, $k=1$ and
# $k=3$ are level at the smallest batch, where $k=10$ trails, and $k=10$ is best by far at the largest:
# $k$ should grow with $B$.
#
# ## 5. Why the hardest negatives can collapse early training
#
# Schroff et al. (2015) warn that the hardest negatives "can in practice lead to bad local minima early on
# in training, specifically it can result in a collapsed model". The reason is in the hinge. Early on, the
# hardest negative of most anchors outranks the positive, $s^- > s^+$, so the triplet's loss
# $m + (s^- - s^+)$ is **larger than $m$**. A collapsed model that maps everything to one point has
# $s^- = s^+ = 1$ and loss exactly $m$, which is *lower*: pulling all embeddings together is a descent
# direction. A semi-hard negative has $s^+ - m < s^- < s^+$ and loss $m - (s^+ - s^-) < m$, so for it
# collapsing would *raise* the loss: its gradient pushes away from collapse.
#
# A linear head with our learning rate escapes this trap; a small MLP head (hidden size 512) with a five
# times larger learning rate does not. We train it for two epochs and watch the mean cosine between the
# embeddings of images of *different* scenes: near 0 is healthy, near 1 is collapse.

# %%
collapse_runs, collapse_live = {}, {}
for name in ("random", "hardest k=1", "semi-hard"):
    miner, k = sampling.STRATEGIES[name]
    model, h = sampling.train_triplet(train, val, cfg, miner, k, epochs=budget["collapse_epochs"],
                                      lr=budget["collapse_lr"], hidden_dim=budget["collapse_hidden"],
                                      desc=f"collapse {name}")
    collapse_runs[name] = h
    collapse_live[name] = {"image cosine, last 10 steps": sampling.mean_over(h.metrics["image_cosine"], False, 10),
                           "violating, last 10 steps (%)": 100 * sampling.mean_over(h.metrics["violating"], False, 10),
                           "test rsum": sampling.evaluate(model, test)["rsum"]}

fig, axes = plt.subplots(1, 2, figsize=(11, 3.4))
for i, (name, h) in enumerate(collapse_runs.items()):
    axes[0].plot(h.step, h.metrics["image_cosine"], label=name, color=f"C{i}")
    axes[1].plot(h.step, 100 * pd.Series(h.metrics["violating"]).rolling(5, min_periods=1).mean(), label=name, color=f"C{i}")
axes[0].set(xlabel="step", ylabel="cosine between different images", ylim=(-0.05, 1))
axes[1].set(xlabel="step", ylabel="violating triplets (%)", ylim=(0, 102))
axes[0].legend(frameon=False)
fig.suptitle(f"MLP heads, learning rate {budget['collapse_lr']:g}")
fig.tight_layout()
plt.show()
pd.DataFrame(collapse_live).T.round(2)

# %% [markdown]
# With the hardest negatives the image embeddings fold together within a few dozen steps and nearly every
# triplet keeps violating the margin (all similarities near one another, loss near $m$); with semi-hard
# negatives the same heads and learning rate spread out and learn. (Semi-hard triplets violate the margin
# too, by construction: they are chosen inside it.) VSE++ avoids the trap differently: it
# starts from pretrained features and a moderate learning rate, which is the setting of section 2, and
# FaceNet uses large batches so that semi-hard negatives exist for most anchors.
#
# One caveat about our semi-hard run: `semi_hard_negatives` falls back to the **hardest** negative for an
# anchor that has no negative inside the margin band (documented in `mmalign.miners`), so the run is a
# mixture of semi-hard and hardest triplets, and the argument above covers only its semi-hard part. The
# measured cosine says the mixture still does not collapse here; it does not say the fallback anchors
# are harmless in every setting.

# %%
# The claims of this chapter, checked on every run (CI included).
from mmalign.retrieval import chance_recall

chance_r1 = {"i2t": 100 * chance_recall(len(test.texts), test.world.captions_per_image, 1),
             "t2i": 100 * chance_recall(len(test.world), 1, 1)}
for name, row in live.items():  # every sampler learns, far above chance
    assert row["i2t_R@1"] > 10 * chance_r1["i2t"] and row["t2i_R@1"] > 10 * chance_r1["t2i"], name
# at the same budget, random negatives trail every mined strategy (by more than the few points of noise)
assert live["random"]["rsum"] < min(row["rsum"] for name, row in live.items() if name != "random") - 10
# "not enough violation": random negatives are mostly solved within the first epoch, the hardest keep
# violating for most anchors, and the fraction falls as k grows, towards the random miner's
violating_last = {name: row["violating, last epoch (%)"] for name, row in live.items()}
assert live["random"]["violating, epoch 1 (%)"] < 0.5 * live["hardest k=1"]["violating, epoch 1 (%)"]
assert violating_last["random"] < 25 and violating_last["hardest k=1"] > 50
assert (violating_last["hardest k=1"] > violating_last["hardest k=3"] > violating_last["hardest k=10"]
        > violating_last["random"]), violating_last
# at the start most mined triplets violate the margin, whatever the miner; at the end the random ones do
# not, and most of the hardest ones still do
assert all(float((start < MARGIN).float().mean()) > 0.5 for start, _ in gaps.values())
assert float((gaps["random"][1] < MARGIN).float().mean()) < 0.5
assert float((gaps["hardest k=1"][1] < MARGIN).float().mean()) > 0.5
# the hardest negatives collapse the MLP heads early and keep violating; semi-hard negatives do not collapse and learn
assert collapse_live["hardest k=1"]["image cosine, last 10 steps"] > 0.5
assert collapse_live["hardest k=1"]["violating, last 10 steps (%)"] > 90
assert collapse_live["semi-hard"]["image cosine, last 10 steps"] < 0.3
assert collapse_live["semi-hard"]["test rsum"] > collapse_live["hardest k=1"]["test rsum"] + 50
assert collapse_live["semi-hard"]["violating, last 10 steps (%)"] > 50  # inside the margin by construction

# %% [markdown]
# ### Reference numbers (full profile)
#
# The tables above are this run's (your profile). `make results CHAPTER=03` runs the same experiment in
# the **full** profile and writes `results/03_sampling.json`. Run again on a machine of the same kind it
# gives the same file, number for number: the run is seeded and the frozen features are encoded on a
# fixed number of threads (`MMALIGN_ENCODE_THREADS`). Change that number, or the machine, and the features
# differ in their last bits; that alone moves single rows of this one-seed table by a few rsum points,
# which is why the chapter orders no two rows closer than that.

# %%
from mmalign.experiments import load_results

reference = load_results("03")
print(f"profile={reference['profile']}  date={reference['date']}  seed={reference['seed']}  "
      f"sizes={reference['sizes']}\nmachine: {reference['machine']}  ({reference['seconds']} s)  "
      f"budgets: {reference['budgets']}")
display(HTML(results_table_html(reference["table"], higher_is_better=lower)))

# %%
pd.DataFrame(reference["batch_vs_k"]).T.round(1)

# %%
pd.DataFrame(reference["collapse"]).T.round(2)

# %%
# The chapter's claims, checked on the reference run too.
ref, ref_sweep, ref_collapse = reference["table"], reference["batch_vs_k"], reference["collapse"]
assert ref["random"]["rsum"] < min(row["rsum"] for name, row in ref.items() if name != "random") - 10
ref_violating = {name: row["violating, last epoch (%)"] for name, row in ref.items()}
assert ref["random"]["violating, epoch 1 (%)"] < 0.5 * ref["hardest k=1"]["violating, epoch 1 (%)"]
assert ref_violating["random"] < 25 and ref_violating["hardest k=1"] > 50
assert (ref_violating["hardest k=1"] > ref_violating["hardest k=3"] > ref_violating["hardest k=10"]
        > ref_violating["random"]), ref_violating
# batch size against k: k=1 and k=3 level at the smallest batch, k=10 trailing; k=10 best by far at the largest
ref_batch_sizes = reference["budgets"]["sweep_batch_sizes"]
smallest, largest = f"B={min(ref_batch_sizes)}", f"B={max(ref_batch_sizes)}"
assert abs(ref_sweep[smallest]["k=1"] - ref_sweep[smallest]["k=3"]) < 5
assert ref_sweep[smallest]["k=10"] < min(ref_sweep[smallest]["k=1"], ref_sweep[smallest]["k=3"]) - 5
assert ref_sweep[largest]["k=10"] > max(ref_sweep[largest]["k=1"], ref_sweep[largest]["k=3"]) + 10
# collapse of the MLP heads with the hardest negatives, not with semi-hard ones
assert ref_collapse["hardest k=1"]["image cosine, last 10 steps"] > 0.5
assert ref_collapse["semi-hard"]["image cosine, last 10 steps"] < 0.3
assert ref_collapse["semi-hard"]["test rsum"] > ref_collapse["hardest k=1"]["test rsum"] + 50

# %% [markdown]
# ## Takeaways
#
# * The triplet loss learns only from triplets that violate the margin. Random negatives are solved
#   quickly, after which most of a batch gives no gradient ("not enough violation"); this is why, at the
#   same budget, random sampling trails the mined negatives in the tables above.
# * Top-$k$ hardest negatives keep the loss busy; as $k$ grows, the extra negatives are easier and the
#   violating fraction falls towards the random miner's. What counts as hard depends on the batch size:
#   $k$ should be read relative to $B$.
# * The hardest negatives can make collapse a descent direction early in training (their loss exceeds the
#   margin, a collapsed model's equals it). Semi-hard negatives, below the positive but inside the margin,
#   push away from collapse.
# * The next chapter looks beyond the batch: a memory of hard negatives and the MoCo queue.
#
# **References.** Schroff, Kalenichenko & Philbin (2015), *FaceNet: a unified embedding for face
# recognition and clustering* (triplets, semi-hard mining). Faghri, Fleet, Kiros & Fidler (2018), *VSE++:
# improving visual-semantic embeddings with hard negatives*. Harwath et al. (2018), *Jointly discovering
# visual objects and spoken words from raw sensory input* (bidirectional triplet loss, thesis eqs.
# 2.5–2.7). Hermans, Beyer & Leibe (2017), *In defense of the triplet loss for person re-identification*
# (batch-hard mining). Wu, Manmatha, Smola & Krähenbühl (2017), *Sampling matters in deep embedding
# learning*.
