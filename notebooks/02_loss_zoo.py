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

# %%

# %% [markdown]
# # 2. The loss zoo
#
# Chapter 1 trained one dual encoder with two losses. The literature offers many more, and the thesis
# behind seed 000 (Crabtree, *trilingual speech-image alignment*) asked the plain question: **on the same
# data and encoders, which loss aligns best?** Its Table 3.2 (copied into seed 000) put the masked margin
# softmax with a scheduled or adaptive margin on top and InfoNCE close behind. Below them the order depends
# on the columns: in the English-image columns, the ones closest to our setting, the triplet loss scores
# *above* MMS with a fixed margin, and the hypersphere loss is last everywhere.
#
# This chapter reruns that comparison on the course's data with nine losses under **one budget**: the same
# frozen features, the same linear heads, the same optimizer, learning rate, batch size, epochs and batches,
# and the same **tuning budget**: every loss has one knob (its temperature, margin or weight) and gets three
# values of it, chosen on validation. Only the loss changes. Then it asks whether the seed's ordering holds
# here, and why.
#
# 1. the nine losses, their formulas and their knobs;
# 2. the equal tuning budget, and the hypersphere loss, whose knob is hard to tune;
# 3. the results table in the layout of seed 000, untuned (live) and tuned (reference, three seeds);
# 4. the seed's ordering against ours.

# %%
import matplotlib.pyplot as plt
import pandas as pd
import torch
from IPython.display import HTML, display

from mmalign.config import load_config, seed_everything

cfg = load_config()  # MMALIGN_PROFILE=ci (default), full or gpu
seed_everything(cfg.seed)
torch.set_num_threads(cfg.num_threads or torch.get_num_threads())
print(f"profile={cfg.profile}  device={cfg.device}  train/val/test scenes={cfg.n_train}/{cfg.n_val}/{cfg.n_test}")

# %%
from mmalign.data.features import scene_features
from mmalign.experiments import loss_zoo as zoo

train, val, test = (scene_features(split, cfg) for split in ("train", "val", "test"))
epochs = zoo.zoo_epochs(cfg)
total_steps = epochs * zoo.steps_per_epoch(train, cfg)
print(f"budget per loss: {epochs} epochs x {zoo.steps_per_epoch(train, cfg)} steps of batch {cfg.batch_size} "
      f"= {total_steps} steps, Adam lr={cfg.lr}, embedding dim {cfg.embed_dim}")

# %% [markdown]
# ## 1. Nine losses on one similarity matrix
#
# A batch holds $B$ (image, caption) pairs; $z^I_i$, $z^T_j$ are their embeddings and
# $S_{ij} = \cos(z^I_i, z^T_j)$ the similarity matrix, true pairs on the diagonal. Every loss below is
# symmetric: it treats images as anchors and captions as anchors.
#
# **Triplet, uniform imposters** (thesis eq. 2.6; Harwath et al., 2018). One *imposter* per anchor, drawn
# uniformly from the batch ([`mmalign.miners.random_negatives`](#mmalign.miners.random_negatives): a caption $c_i$ for image $i$, an image $r_i$
# for caption $i$), and a hinge with margin $M$:
#
# $$ T_i(c, r) = \max\big(0, M - S_{ii} + S_{i, c_i}\big) + \max\big(0, M - S_{ii} + S_{r_i, i}\big). $$
#
# **Triplet, uniform plus hardest imposters** (thesis eq. 2.7, the form of its Table 3.2; Harwath et al.,
# 2018): the same hinge once more with the *most similar* wrong caption $\tilde c_i$ and image $\tilde r_i$ of
# the batch ([`mmalign.miners.hardest_negatives`](#mmalign.miners.hardest_negatives)), $\ell_i = T_i(c, r) + T_i(\tilde c, \tilde r)$. We call it
# `Triplet+hard`; the hardest imposter keeps the hinge active after the random ones are easy.
#
# **InfoNCE** (van den Oord et al., 2018; thesis eq. 2.9 with $M = 0$): a softmax over the whole batch at
# temperature $\tau$, with captions of the same scene as extra positives (label mask, Khosla et al., 2020).
#
# **Masked margin softmax**, MMS (Ilharco et al., 2019; thesis eqs. 2.8-2.9). InfoNCE with a margin
# subtracted from the positive only, and a mask $Z_i$ of columns that are neither positive nor negative:
#
# $$ \mathrm{MMS}(X, Y) = -\frac1B\sum_i \log\frac{e^{(S_{ii} - M)/\tau}}{e^{(S_{ii} - M)/\tau}
#    + \sum_{k \ne i,\, k \notin Z_i} e^{S_{ik}/\tau}}, \qquad L = \tfrac12\big(\mathrm{MMS}(X, Y) + \mathrm{MMS}(Y, X)\big). $$
#
# The thesis sums the two directions; [`mmalign.losses.mms_loss`](#mmalign.losses.mms.mms_loss) averages them, so that $M = 0$ is
# exactly InfoNCE. The margin comes in three flavours: **constant** (MMS), **scheduled** (MMS_Sch.,
# growing during training as in Ilharco et al.) and **adaptive** (MMS_Adp., the Adaptive Mean Margin of
# Monfort et al., 2021: $M_i = \alpha\,(S_{ii} - \operatorname{mean}_{k \in N_i} S_{ik})$, a fraction of
# how far the positive already stands above the anchor's average negative).
#
# **Hypersphere** (thesis eq. 2.10, after Wang & Isola, 2020): no negatives as such, but two terms on the
# unit sphere, alignment of true pairs and uniformity,
#
# $$ L = \lambda_a \frac1B\sum_i \lVert z^I_i - z^T_i\rVert^{\alpha}
#      + \lambda_u \frac{1}{B(B+1)/2}\sum_{i}\sum_{j \ge i} e^{-t\lVert z^I_i - z^T_j\rVert^2}. $$
#
# This is the thesis' form, and it differs from Wang & Isola's in two ways. Their uniformity is the
# **log** of the mean Gaussian potential, $\log \frac{1}{|P|}\sum_{(i,j) \in P} e^{-t\lVert z_i - z_j\rVert^2}$, whose
# gradient does not fade as the points spread out; and it runs over pairs **within one view**
# ($i < j$ among the images, and among the captions), while eq. 2.10 takes cross-view pairs $j \ge i$, which
# include the true pairs $j = i$: uniformity then pushes the very pairs apart that alignment pulls
# together. ([`hypersphere_loss(..., log_uniformity=True)`](#mmalign.losses.hypersphere.hypersphere_loss) takes the log; we run the thesis' form.)
#
# **Contrastive** (Hadsell, Chopra & LeCun, 2006; seed 002, problem 2): with $y_{ij} = 1$ when image $i$ and
# caption $j$ show the same scene, and the distance between unit vectors $d_{ij} = \lVert \hat z^I_i - \hat z^T_j
# \rVert = \sqrt{2 - 2S_{ij}}$, positives are pulled together and negatives pushed beyond a margin $m$:
#
# $$ L = \frac12\,\frac{\sum_{ij} y_{ij}\, d_{ij}^2}{\sum_{ij} y_{ij}}
#      + \frac12\,\frac{\sum_{ij} (1 - y_{ij}) \max(0, m - d_{ij})^2}{\sum_{ij} (1 - y_{ij})}. $$
#
# (Hadsell et al. sum over pairs; [`contrastive_loss`](#mmalign.losses.contrastive.contrastive_loss) averages the positive and negative terms separately,
# so the $B$ positives are not swamped by the $B^2 - B$ negatives.)
#
# **Cosine** (seed 001, chapter 1): $1 - S_{ii}$ for the $+1$ pairs, $\max(0, S_{ij} - m)$ for one random
# $-1$ pair per positive.
#
# [`zoo.zoo_losses`](#mmalign.experiments.loss_zoo.zoo_losses) builds all nine as functions `(z_img, z_txt, scene_ids) -> loss` with their default
# knobs; on a random batch every one is a finite scalar with a gradient:

# %%
factories = zoo.zoo_losses(cfg, total_steps)
z_img = torch.randn(cfg.batch_size, cfg.embed_dim, requires_grad=True)
z_txt = torch.randn(cfg.batch_size, cfg.embed_dim)
ids = train.text_ids[:cfg.batch_size]
values = {}
for name, make in factories.items():
    loss = make()(z_img, z_txt, ids)
    grad, = torch.autograd.grad(loss, z_img)
    values[name] = {"loss on a random batch": float(loss.detach()), "gradient norm": float(grad.norm()),
                    "knob": zoo.KNOBS[name][0], "default": zoo.DEFAULTS[name], "grid": zoo.KNOBS[name][1]}
display(pd.DataFrame(values).T)
pd.Series({"MMS margin (MMS, end of the MMS_Sch. schedule)": zoo.MMS_MARGIN, "AMM alpha": zoo.AMM_ALPHA,
           "hypersphere lambda_a, t, alpha": (1.0, 2, 2)}, name="fixed setting").to_frame()

# %% [markdown]
# **The mask $Z$.** In the thesis every batch item is a different image, so $Z$ is always empty. Here a scene
# has several captions, and two of them can land in one batch: they are then *neither* positives nor
# negatives of each other's image (MMS masks them out, InfoNCE counts them as positives, the miners never
# pick them as imposters). How many such pairs does a shuffled batch hold?

# %%
from mmalign.train import epoch_order

batch_ids = train.text_ids[epoch_order(len(train.texts), cfg.seed, 0)[:cfg.batch_size]]
same = (batch_ids[:, None] == batch_ids[None, :]).sum() - cfg.batch_size
print(f"first batch: {int(same)} off-diagonal same-scene pairs out of {cfg.batch_size * (cfg.batch_size - 1)}")

# %% [markdown]
# **The scheduled margin.** Ilharco et al. start at $M_0 = 0.001$ and multiply by $1.002$ every 1000 steps,
# a schedule for runs of ~100k steps ([`ScheduledMargin`](#mmalign.losses.mms.ScheduledMargin)'s defaults). Over this chapter's budget it would
# not move at all. We keep its shape (step-wise exponential growth) and rescale it to our run: 20 equal
# increases from $M_0$ to the constant MMS margin, reached at the last step ([`zoo.scheduled_margin`](#mmalign.experiments.loss_zoo.scheduled_margin)):

# %%
from mmalign.losses import ScheduledMargin

fig, ax = plt.subplots(figsize=(6, 3))
for label, sched in [("Ilharco et al. defaults", ScheduledMargin()), ("rescaled to this run", zoo.scheduled_margin(total_steps))]:
    values_t = []
    for _ in range(total_steps):
        values_t.append(sched.value)
        sched.step()
    ax.plot(values_t, label=label)
ax.axhline(zoo.MMS_MARGIN, color="k", ls=":", lw=1, label="constant MMS margin")
ax.set(xlabel="training step", ylabel="margin M (cosine units)", yscale="log")
ax.legend(frameon=False, fontsize=8)
plt.show()

# %% [markdown]
# A note on units: the thesis scores pairs with dot products and uses $M = 1$ for MMS. Our margins are in
# *cosine* units and are divided by $\tau$ with the similarities, so $M$ shifts the positive logit by
# $M/\tau$; a cosine margin of $M = 1$ would ask every true pair to beat every wrong one by half the
# cosine range.
#
# ## 2. One tuning budget for every loss
#
# A loss that was tuned and a loss that was not are not compared on equal terms. So every loss gets the
# same small budget for its one knob (`zoo.KNOBS`): **three values**, its default and one step down and
# up (half and double; the cosine margin, whose default is 0, in steps of 0.25), the best chosen by
# validation rsum. The knob is the temperature for the softmax family (InfoNCE and the three MMS losses;
# their margin stays at its default, and since it is divided by $\tau$ its effect changes with $\tau$), the
# margin for the hinge and distance losses, and $\lambda_u$ (with $\lambda_a = 1$) for the hypersphere loss,
# starting from the thesis' tuned 0.75.
#
# The CI profile trains every loss at its default (the **untuned** table below) and, to show what a grid
# does, InfoNCE's three temperatures; the full profile (reference, at the end) runs the whole grid for
# all nine losses and reports the untuned and the tuned table side by side.

# %%
runs = zoo.train_zoo(train, val, test, cfg, factories, epochs)
table = zoo.zoo_table(runs)
temp_runs = {tau: runs["InfoNCE"] if tau == zoo.TEMPERATURE else
             zoo.train_one(zoo.zoo_losses(cfg, total_steps, settings={"InfoNCE": tau})["InfoNCE"](), train, val, test,
                           cfg, epochs, desc=f"InfoNCE tau={tau}")
             for tau in zoo.KNOBS["InfoNCE"][1]}
sweep = pd.DataFrame({f"tau={tau}": r.row() | {"val rsum": r.history.best["rsum"]} for tau, r in temp_runs.items()}).T
display(sweep.round(1))
print(f"chosen on validation: tau = {zoo.best_setting(temp_runs)}")

# %% [markdown]
# A small $\tau$ makes the softmax peaky: the loss concentrates on the hardest negatives of the batch (and on
# label noise). A large $\tau$ spreads the gradient over all negatives and weakens the push once the
# positive is ahead. CLIP learns $\tau$ (initialised at 0.07); seed 002 tuned it by hand and kept 0.07.
#
# ### The hypersphere loss is hard to tune
#
# The thesis tuned only $\lambda_u$: start at 1, decrease by 0.25 while validation recall improves
# ($\lambda_a = 1$, $t = 2$, $\alpha = 2$), and kept $\lambda_u = 0.75$. Its Table 3.1 shows how touchy that
# is: next to the chosen value, the other settings scored near chance. Our equal budget starts from that
# value too. What lies *outside* that budget? A wider grid, which no other loss gets (so its best row is
# shown apart, never in the comparison): $\lambda_u \in \{4, 16, 64\}$, and $(\lambda_a, \lambda_u) = (4, 16)$
# to test the scale.

# %%
hyper_runs = {(1.0, zoo.HYPER_LAMBDA_U): runs["Hyper"]} | zoo.hyper_grid(train, val, test, cfg, epochs)
hyper = pd.DataFrame(zoo.hyper_table(hyper_runs)).T
hyper.insert(0, "lambda_u / lambda_a", [lu / la for la, lu in hyper_runs])
hyper.round(1)

# %%
fig, ax = plt.subplots(figsize=(5.5, 3.2))
grid_1d = {lu: r for (la, lu), r in hyper_runs.items() if la == 1.0}
ax.plot(list(grid_1d), [r.history.best["rsum"] for r in grid_1d.values()], marker="o", label=r"$\lambda_a = 1$")
for (la, lu), r in hyper_runs.items():
    if la != 1.0:
        ax.scatter([lu / la], [r.history.best["rsum"]], marker="x", s=60, color="C3",
                   label=rf"$\lambda_a = {la:g}, \lambda_u = {lu:g}$ (plotted at the ratio)")
ax.axvspan(min(zoo.KNOBS["Hyper"][1]), max(zoo.KNOBS["Hyper"][1]), color="0.9", label="the equal budget's range")
ax.set(xscale="log", xlabel=r"$\lambda_u / \lambda_a$", ylabel="best validation rsum", title="hypersphere loss")
ax.legend(frameon=False, fontsize=8)
plt.show()

# %% [markdown]
# Two things to read off the grid:
#
# * **Only the ratio $\lambda_u / \lambda_a$ matters** (with Adam). Multiplying the whole loss by a constant
#   multiplies every gradient by it, and Adam divides the gradient by its own running scale, so the steps
#   are the same up to $\epsilon$: the run with both weights 4 times larger lands on the run with the same
#   ratio (the cross in the plot). A "grid over two weights" is a search over one number.
# * **Where the good ratio is depends on the setup.** The thesis' search started at 1 and went *down*; here
#   the best ratio lies far *above* 1, outside the equal budget's range. A search started from the thesis'
#   value with steps of 0.25 would take many runs to get there. This is a fact about the loss (its good
#   setting is far from where one would start) *and* a reason why the equal-budget table ranks it low.

# %%
rs = {key: r.history.best["rsum"] for key, r in hyper_runs.items()}
best_lams = zoo.best_hyper(hyper_runs)
print(f"best of the wide grid: lambda_a={best_lams[0]}, lambda_u={best_lams[1]}")
# The same ratio gives the same run (Adam is invariant to the scale of the loss, up to epsilon).
assert abs(rs[(4.0, 16.0)] - rs[(1.0, 4.0)]) < 2.0
# The thesis' value is clearly worse than the best ratio of the wide grid.
assert rs[(1.0, zoo.HYPER_LAMBDA_U)] < rs[best_lams] - 20
# ... and that best ratio lies outside the equal budget's range.
assert best_lams[1] / best_lams[0] > max(zoo.KNOBS["Hyper"][1])

# %% [markdown]
# ## 3. The zoo under one budget
#
# The table has the layout of seed 000: Recall@1/5/10 in both directions on the test split (image → caption,
# caption → image; the thesis averages the two directions, we show both), and **Ep**, the epoch of the best
# validation rsum, whose weights are the ones tested. Best value per column in bold (for Ep, the earliest).
# Live, every loss at its **default** knob:

# %%
from mmalign.plots import plot_runs, results_table_html

display(HTML(results_table_html(table, columns=zoo.COLUMNS, higher_is_better={"Ep": False})))

# %% [markdown]
# Validation rsum after every epoch, all losses on one figure:

# %%
ax = plot_runs({name: r.history for name, r in runs.items()}, key="rsum", ylabel="validation rsum")
ax.set_title(f"the loss zoo, {epochs} epochs each, default knobs")
ax.figure.set_size_inches(7, 4)
plt.show()

# %%
from mmalign.retrieval import chance_recall

k_captions = test.world.captions_per_image
chance_rsum = 100 * sum(chance_recall(len(test.texts), k_captions, k) + chance_recall(len(test.world), 1, k)
                        for k in (1, 5, 10))
rsum = {name: r.test["rsum"] for name, r in runs.items()}
print(f"chance rsum {chance_rsum:.1f}")
for name in zoo.ROWS:
    assert rsum[name] > 10 * chance_rsum, f"{name} should retrieve far above chance"
assert all(r.test["rsum"] > 10 * chance_rsum for r in temp_runs.values())

# %% [markdown]
# ### Reference numbers (full profile, three seeds)
#
# `make results CHAPTER=02` runs the same functions in the **full** profile (more scenes, a longer budget),
# with the whole equal grid for all nine losses on the first seed (which gives the untuned table, every loss
# at its default), then every loss at its tuned knob on two more seeds. It writes `results/02_loss_zoo.json`, which records where and when it ran.
# Each cell is the **mean ± standard deviation over the three seeds** (the seed sets the initial heads, the
# batch order and the imposters; the features are fixed). The standard deviation is also how far a re-run
# with a new seed may move a number. Every run is seeded and the features are encoded on a fixed number of
# threads, so a re-run of the same seeds on the same kind of machine should give the same file apart from its
# date and timings (checked for chapter 4's file, which came out bit-identical).

# %%
from mmalign.experiments import load_results
from mmalign.experiments.seeds import mean_std_frame

reference = load_results("02")
ref_cols = list(zoo.COLUMNS[:-1]) + ["rsum", "Ep"]
print(f"profile={reference['profile']}  date={reference['date']}  seeds={reference['seeds']}  "
      f"sizes={reference['sizes']}\nmachine: {reference['machine']}  ({reference['seconds']} s)  "
      f"budget: {reference['settings']['epochs']} epochs per loss")
display(HTML("<b>Untuned: every loss at its default knob (first seed)</b>"))
display(mean_std_frame(reference["untuned"]["table"], None, ref_cols))
display(HTML("<b>Tuned: every loss at the best of its three knob values (validation, first seed)</b>"))
tuned_frame = mean_std_frame(reference["table"], reference["std"], ref_cols)
tuned_frame.insert(0, "knob", [f"{reference['knobs'][n]['knob']}={reference['tuned_settings'][n]}" for n in tuned_frame.index])
display(tuned_frame)
display(HTML("<b>Outside the equal budget: the hypersphere loss at the best ratio of the wide grid</b>"))
display(mean_std_frame(reference["hyper_wide"]["table"], reference["hyper_wide"]["std"], ref_cols))

# %%
fig, axes = plt.subplots(1, 2, figsize=(12, 3.8))
for i, (name, curve) in enumerate(reference["curves"].items()):
    axes[0].plot(curve["step"], curve["rsum"], marker="o", ms=3, label=name, color=f"C{i}")
axes[0].set(xlabel="step", ylabel="validation rsum", title="full profile, first seed: every loss, tuned")
axes[0].legend(frameon=False, fontsize=7)
for i, (name, g) in enumerate(reference["grids"].items()):
    axes[1].plot([-1, 0, 1], g["val_rsum"], marker="o", color=f"C{i}", label=f"{name} ({g['knob']})")
axes[1].set(xticks=[-1, 0, 1], xticklabels=["step down", "default", "step up"], ylabel="best validation rsum",
            title="full profile: the equal grid of every loss")
axes[1].legend(frameon=False, fontsize=7)
fig.tight_layout()
plt.show()

# %% [markdown]
# The verdicts below follow the course's one evidence rule ([`paired_difference`](#mmalign.experiments.seeds.paired_difference)):
# two losses trained on the same seeds (same initial heads, batch order and imposters) are compared by their
# per-seed differences in rsum; a difference is *measured* when every seed has the same sign and the mean
# difference exceeds twice its standard error. One seed (the untuned table) never measures a difference.

# %%
from mmalign.experiments.seeds import paired_difference, per_seed_values

ref, ref_std = reference["table"], reference["std"]
unt = reference["untuned"]["table"]
mean, spread = {n: ref[n]["rsum"] for n in ref}, {n: ref_std[n]["rsum"] for n in ref}
per_seed = {n: per_seed_values(reference, n, "rsum") for n in ref}
per_seed["Hyper (wide grid)"] = per_seed_values(reference["hyper_wide"], "Hyper (wide grid)", "rsum")
family = ["InfoNCE", "MMS", "MMS_Sch.", "MMS_Adp."]
pairs = [("MMS_Adp.", "MMS"), ("MMS_Sch.", "InfoNCE"), ("MMS_Adp.", "InfoNCE"), ("MMS", "InfoNCE")]
pairs += [(n, "Triplet+hard") for n in family] + [("Triplet+hard", "Triplet"), ("Triplet", "Contrastive"),
                                                   ("Contrastive", "Cosine"), ("Cosine", "Hyper"),
                                                   ("Hyper (wide grid)", "Triplet+hard"), ("InfoNCE", "Hyper (wide grid)")]
verdicts = {(a, b): paired_difference(per_seed[a], per_seed[b]) for a, b in pairs}
untuned_first = max(unt, key=lambda n: unt[n]["rsum"])
verdicts[(f"{untuned_first} (untuned)", "MMS_Adp. (untuned)")] = paired_difference(
    [unt[untuned_first]["rsum"]], [unt["MMS_Adp."]["rsum"]])
pd.DataFrame({f"{a} vs {b}": {"mean difference": d.mean, "sd": d.std, "se": d.se, "seeds higher": f"{d.higher}/{d.n}",
                              "verdict": d.verdict} for (a, b), d in verdicts.items()}).T.round(1)

# %%
# The sentences of this section and the next, checked on the committed numbers.
v = {k: d.verdict for k, d in verdicts.items()}
assert len(reference["seeds"]) >= 3
# Untuned (every loss at its default, the first seed only): the eq. 2.7 triplet ranks first, ahead of the
# softmax losses by about a point: one seed, so no measured difference.
assert untuned_first == "Triplet+hard" and unt["Triplet+hard"]["rsum"] > max(unt[n]["rsum"] for n in family)
assert unt["Triplet+hard"]["rsum"] - max(unt[n]["rsum"] for n in family) < 2
assert v[("Triplet+hard (untuned)", "MMS_Adp. (untuned)")] == "no measured difference"
# Tuned: the softmax family leads, within 3 rsum points of each other ...
assert sorted(mean, key=mean.get, reverse=True)[:4] == sorted(family, key=mean.get, reverse=True)
assert max(mean[n] for n in family) - min(mean[n] for n in family) < 3
# ... inside it: adaptive vs constant margin, scheduled margin vs InfoNCE: no measured difference;
for pair in (("MMS_Adp.", "MMS"), ("MMS_Sch.", "InfoNCE")):
    assert v[pair] == "no measured difference", (pair, verdicts[pair].describe())
# the adaptive and constant margins above InfoNCE on every seed (measured), by under 3 points
for a in ("MMS_Adp.", "MMS"):
    assert v[(a, "InfoNCE")] == "higher" and verdicts[(a, "InfoNCE")].mean < 3, verdicts[(a, "InfoNCE")].describe()
# The eq. 2.7 triplet below every softmax loss (measured); eq. 2.6 far below eq. 2.7.
for n in family:
    assert v[(n, "Triplet+hard")] == "higher", (n, verdicts[(n, "Triplet+hard")].describe())
assert v[("Triplet+hard", "Triplet")] == "higher" and verdicts[("Triplet+hard", "Triplet")].mean > 20
# Then the contrastive, cosine and hypersphere losses, in that order, each gap measured.
for pair in (("Triplet", "Contrastive"), ("Contrastive", "Cosine"), ("Cosine", "Hyper")):
    assert v[pair] == "higher", (pair, verdicts[pair].describe())
# Tuning (first seed): the contrastive loss gained most, the softmax losses about 8, eq. 2.7 and cosine ~nothing.
first = reference["per_seed"][str(reference["seeds"][0])]
gain = {n: first[n]["rsum"] - unt[n]["rsum"] for n in ref}
assert gain["Contrastive"] > 50 and max(gain, key=gain.get) == "Contrastive"
assert all(5 < gain[n] < 10 for n in family)
assert abs(gain["Triplet+hard"]) < 1 and gain["Cosine"] == 0
assert gain["Hyper"] > 10 and gain["Triplet"] > 10
# The softmax losses' tuned temperature is the top of the grid (0.14): their lead is a lead at the edge of
# the grid, after tuning; the triplets, the contrastive and the hypersphere loss are also tuned to an edge.
at_edge = [n for n in ref if reference["tuned_settings"][n] in (reference["knobs"][n]["grid"][0], reference["knobs"][n]["grid"][-1])]
assert set(family) <= set(at_edge) and {"Triplet", "Triplet+hard", "Contrastive", "Hyper"} <= set(at_edge)
assert all(reference["tuned_settings"][n] == reference["knobs"][n]["grid"][-1] for n in family)
# The hypersphere loss at the wide grid's best ratio: above the eq. 2.7 triplet (measured); InfoNCE's mean is
# higher, but not on every seed: no measured difference.
assert v[("Hyper (wide grid)", "Triplet+hard")] == "higher"
assert v[("InfoNCE", "Hyper (wide grid)")] == "no measured difference" and verdicts[("InfoNCE", "Hyper (wide grid)")].mean > 0
# The contrastive loss peaks at the last epoch on every seed: the budget, not the loss, stops it.
assert all(reference["per_seed"][sd]["Contrastive"]["Ep"] == reference["settings"]["epochs"] for sd in reference["per_seed"])
assert max(spread.values()) < 5

# %% [markdown]
# **What the reference table says** (tuned, mean ± standard deviation over three seeds; every sentence is
# checked in the cell above with the paired rule).
#
# * **Untuned, the triplet loss with hardest imposters comes first.** With every loss at its default knob
#   (the first seed only), the eq. 2.7 triplet ranks first, about a point above the best softmax loss: one
#   seed, so no measured difference, but no sign either that the softmax losses lead at their defaults.
# * **Tuned, the softmax family leads**: InfoNCE and the three MMS variants lie within 3 rsum points of each
#   other. Inside it, the adaptive and the constant margin show no measured difference, nor do the scheduled
#   margin and InfoNCE; the adaptive and constant margins stand above InfoNCE on every seed (measured), by
#   under 3 points. **This lead exists only after tuning**, and all four softmax losses are tuned to the
#   *top* of their temperature grid (τ = 0.14): a wider grid could move them further, and the triplet, which
#   is also tuned to an edge (margin 0.4), could move too.
# * **The triplet loss with uniform plus hardest imposters** (eq. 2.7) comes next after tuning, below every
#   softmax loss on every seed. With uniform imposters only (eq. 2.6) it falls more than 20 points lower: one
#   random imposter is soon easy and its hinge zero, while the hardest imposter keeps the hinge active.
# * Then the **contrastive**, **cosine** and **hypersphere** losses, in that order (each gap measured).
# * **Tuning mattered unequally.** On the first seed the equal grid raised the contrastive loss the most,
#   by more than 50 rsum (margin 1 → 2: every negative pair is pushed, not only the close ones), the
#   softmax losses by 5 to 10 (τ 0.07 → 0.14), the hypersphere loss and the eq. 2.6 triplet by more than
#   10, and left the eq. 2.7 triplet and the cosine loss where they were. For the four softmax losses, both
#   triplets, the contrastive and the hypersphere loss the best value lies at the **edge** of the grid, so a
#   wider grid might move them further: three values each is a small, equal budget, not a full search, and
#   the tuned ordering is an ordering *at this grid*. Read the untuned table beside the tuned one.
# * **Outside the equal budget**, the hypersphere loss at the best ratio of the wide grid rises from last
#   to above the eq. 2.7 triplet (measured) and level with InfoNCE (InfoNCE's mean is higher, but not on
#   every seed: no measured difference).
# * **Ep.** The contrastive loss peaks at the last epoch on every seed, and the MMS losses on some seeds:
#   the 8-epoch budget, not the loss, stops them, and the ordering is the ordering at this budget.
#
# ## 4. Does the seed's ordering hold here?
#
# Seed 000's image-retrieval table, the English-image columns (the closest to our setting: one language,
# images and text), next to our reference test recalls (tuned, mean of three seeds) averaged over the two
# directions as the thesis does. The thesis' triplet row is eq. 2.7, so `Triplet+hard` stands for it here.

# %%
SEED_000_EN_IMAGE = {  # thesis Table 3.2 / seed 000, E&I columns: R@1, R@5, R@10 (percent) and Ep
    "Hyper": (8.30, 25.20, 36.95, 16), "Triplet+hard": (16.40, 39.20, 51.55, 36), "InfoNCE": (18.05, 41.55, 54.55, 26),
    "MMS": (12.65, 36.65, 50.30, 19), "MMS_Sch.": (18.85, 42.15, 54.90, 24), "MMS_Adp.": (16.90, 45.25, 57.50, 29),
}
rows = {}
for name, (r1, r5, r10, ep) in SEED_000_EN_IMAGE.items():
    ours = ref[name]
    rows[name] = {"seed R@1": r1, "seed R@5": r5, "seed R@10": r10, "seed mean": (r1 + r5 + r10) / 3,
                  "ours R@1": (ours["i2t_R@1"] + ours["t2i_R@1"]) / 2, "ours R@5": (ours["i2t_R@5"] + ours["t2i_R@5"]) / 2,
                  "ours R@10": (ours["i2t_R@10"] + ours["t2i_R@10"]) / 2, "ours mean": ours["rsum"] / 6,
                  "ours spread (std of mean)": ref_std[name]["rsum"] / 6}
compare = pd.DataFrame(rows).T
compare["seed rank"] = compare["seed mean"].rank(ascending=False).astype(int)
compare["our rank"] = compare["ours mean"].rank(ascending=False).astype(int)
display(compare.round(1))

rho, p_value = zoo.rank_correlation(list(compare["seed mean"]), list(compare["ours mean"]))
print(f"Spearman's rank correlation between the two orderings: {rho:.2f}; "
      f"{100 * p_value:.0f}% of all 720 orderings of six losses agree with the seed's at least as well")

# The sentences below, checked on the seed's numbers and on ours.
seed_rows = pd.DataFrame(SEED_000_EN_IMAGE, index=["R@1", "R@5", "R@10", "Ep"]).T
assert (seed_rows.loc["MMS", ["R@1", "R@5", "R@10"]] < seed_rows.loc["Triplet+hard", ["R@1", "R@5", "R@10"]]).all()
assert compare["seed mean"].idxmin() == "Hyper" and compare["ours mean"].idxmin() == "Hyper"
for n in ("InfoNCE", "MMS_Sch.", "MMS_Adp."):  # both: the triplet loss below these three
    assert compare.loc[n, "seed mean"] > compare.loc["Triplet+hard", "seed mean"]
    assert compare.loc[n, "ours mean"] > compare.loc["Triplet+hard", "ours mean"]
assert compare["seed mean"].idxmax() == "MMS_Adp." and compare["ours mean"].idxmax() == "MMS_Adp."
assert v[("MMS", "Triplet+hard")] == "higher"  # ours: constant-margin MMS above the eq. 2.7 triplet, measured
assert 0 < rho < 0.8 and 0.05 < p_value < 0.15

# %% [markdown]
# * **Where the orderings agree.** Both put the adaptive MMS first (here by its mean only: against the
#   constant margin there is no measured difference) and the hypersphere loss (at its equal budget) last, and both put the triplet loss below InfoNCE and the scheduled and adaptive margins.
# * **Where they disagree.** MMS with a *constant* margin: in the seed's English-image columns it scores
#   below the triplet loss (eq. 2.7) at R@1, R@5 and R@10; here it scores above it on every seed (measured),
#   and level with the adaptive margin. Our table does not reproduce the seed's ranking of the constant margin.
# * **The rank correlation.** Spearman's $\rho$ over the six losses both tables share is printed above. With
#   six items it is a weak instrument: the exact count over all 720 orderings shows that roughly one random
#   ordering in ten agrees with the seed's at least as well, so $\rho$ says "the coarse structure agrees",
#   not "the ranking replicates". Most of what moves the rank correlation is the order *inside* the softmax
#   family, whose gaps here are a few points, some measured and some not.
# * **MMS variants versus InfoNCE: a near tie, as in the seed**, where the thesis calls InfoNCE
#   "comparable" and uses it afterwards. MMS at $M = 0$ differs from InfoNCE only in how it treats other
#   captions of the same scene (masked rather than positive), and a small cosine margin shifts the positive
#   logit by little compared with the spread of the logits.
# * **Hyper last: holds at an equal budget, not after a wide search.** The thesis' hypersphere row is its
#   tuned $\lambda_u = 0.75$; our equal grid around that value ranks it last too, but the wide grid (section
#   2) finds a ratio that puts it near the softmax family. The seed's ranking of the hypersphere loss says as
#   much about where its tuning started as about the loss.
# * **Ep.** The thesis trained 75 epochs of 99k pairs; our budget is 8 epochs of 15k captions, so several
#   losses peak at the last epoch (section 3).
#
# Beyond the losses, the setups differ: speech versus text, CNNs trained from scratch versus frozen
# pretrained towers with linear heads, 99k versus 5k training images, three languages versus one, and the
# thesis' one run per loss versus our three seeds. Orderings of losses are conditional on all of that; the
# robust lesson is the mechanism (how many negatives a loss sees and how it weighs them), not the ranking.
#
# **How far a re-run may move.** A re-run of `make results CHAPTER=02` with the same seeds on the same kind
# of machine should give the same numbers (features are encoded on a fixed number of threads, every run is
# seeded; chapter 4's file was checked bit-identical); with other seeds, expect each rsum to move by about
# its standard deviation above (1 to 4 points).
# The CI-profile tables of this notebook are smaller and one seed: their gaps of a few points are noise.

# %% [markdown]
# ## Takeaways
#
# * Compare losses under one budget **and one tuning budget**, and change only the loss. Then the differences
#   mean something, and they are mostly about **negatives**: how many a loss sees per anchor, which ones,
#   and how it weighs them.
# * Softmax losses over the whole batch (InfoNCE, MMS) lead here; the triplet loss needs its hardest
#   imposter (eq. 2.7) to come close, and with uniform imposters only (eq. 2.6) it is far behind.
# * Margins on top of InfoNCE (constant, scheduled, adaptive) change little at this scale (under 3 rsum
#   points after tuning the temperature); a schedule must be rescaled to the run's length, or it does nothing.
# * Tuning can reorder a table: the contrastive loss gains more than 50 rsum from one step of its margin,
#   and the hypersphere loss's good ratio $\lambda_u/\lambda_a$ lies far outside where the thesis started
#   (Adam ignores the loss scale, so only the ratio matters). Report the untuned and the tuned rows, with the
#   same grid for every loss.
# * Several seeds, and the course's rule: compare two variants seed by seed (paired differences); a gap whose
#   sign changes between seeds, or that is within twice its standard error, is "no measured difference", not
#   an ordering.
#
# **References.** Crabtree (2022), master's thesis on trilingual speech-image alignment (seed 000;
# eqs. 2.6-2.10, Tables 3.1-3.2). Harwath et al. (2018), *Jointly discovering visual objects and spoken
# words from raw sensory input*. Ilharco, Zhang & Baldridge (2019), *Large-scale representation learning
# from visually grounded untranscribed speech* (MMS, scheduled margin). Monfort et al. (2021), *Spoken
# Moments* (adaptive mean margin). Wang & Isola (2020), *Understanding contrastive representation learning
# through alignment and uniformity on the hypersphere*. van den Oord et al. (2018), *CPC*. Khosla et al.
# (2020), *Supervised contrastive learning*. Hadsell, Chopra & LeCun (2006), *Dimensionality reduction by
# learning an invariant mapping*. Radford et al. (2021), *CLIP*. Faghri et al. (2018), *VSE++* (hardest
# negatives).
