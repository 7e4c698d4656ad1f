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
# # 8. CODIS: momentum distillation, intra-modal alignment and a codebook with OT targets
#
# Chapter 4 built MoCo's queue of keys from a slowly moving (momentum) encoder. ALBEF (Li et al., 2021,
# *Align before Fuse*) uses that machinery for images and captions and adds two things: **momentum
# distillation** (the teacher's similarity distribution becomes a soft target) and a fusion encoder trained
# with image-text matching (ITM) and masked language modelling (MLM). CODIS (Duan et al., 2022,
# *Multi-modal alignment using representation codebook*; seed 004) adds two more:
#
# 1. **intra-modal** alignment: besides image-to-text (i2t) and text-to-image (t2i), each student feature
#    is contrasted with the teacher features of its *own* modality (i2i, t2t);
# 2. a **codebook** of $K$ learnable prototypes $C$. Optimal transport (OT) assigns the teacher's image and
#    text features of a batch to the codewords; each modality then predicts the *other* modality's
#    assignment:
#
# $$
# \mathcal{L}_{t2p} = H\big(T_{i2p},\ \mathrm{softmax}(Z_t C^\top/\gamma)\big),\qquad
# \mathcal{L}_{i2p} = H\big(T_{t2p},\ \mathrm{softmax}(Z_v C^\top/\gamma)\big),
# $$
# $$
# \mathcal{L}_{code} = \mathcal{L}_{ot}(Z^m_v, C) + \mathcal{L}_{ot}(Z^m_t, C) + \mathcal{L}_{t2p} + \mathcal{L}_{i2p},
# \qquad \mathcal{L}_{final} = \mathcal{L}_{mlm} + \mathcal{L}_{itm} + \mathcal{L}_{ica} + \mathcal{L}_{code}.
# $$
#
# Here $T$ is an OT plan, $\mathcal{L}_{ot} = \langle T, D\rangle$ its transport cost, and $\mathcal{L}_{ica}$
# the queued contrastive loss over i2t, t2i, i2i, t2t. (The seed's $\mathcal{L}_{code}$ line writes
# $\mathcal{L}_{t2p}(Z_t, C, T_{t2p})$; its Eq. 2 pairs the text with the *image's* plan, which is what we
# implement.)
#
# To run on a laptop, the towers are **one small transformer layer** over *frozen* features: the 3 x 3
# patch grid of EfficientNet-Lite0 and the token states of MiniLM (chapter 7 reads the same features).
# Everything lives in the library: [`mmalign.ot`](#mmalign.ot) (Sinkhorn and IPOT), [`mmalign.losses.codis`](#mmalign.losses.codis) (the losses) and
# [`mmalign.models.codis`](#mmalign.models.codis) (towers, teacher, queues, fusion, codebook), with every term switched by a config.

# %%
import time

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch
from IPython.display import HTML, display

from mmalign.config import load_config, seed_everything

cfg = load_config()  # MMALIGN_PROFILE=ci (default), full or gpu
seed_everything(cfg.seed)
torch.set_num_threads(cfg.num_threads or 1)
print(f"profile={cfg.profile}  device={cfg.device}  train/val/test scenes={cfg.n_train}/{cfg.n_val}/{cfg.n_test}")

# %%
from mmalign.experiments import codis as chapter
from mmalign.plots import results_table_html

from mmalign.experiments.seeds import mean_std_frame, no_measured_difference

cols = list(chapter.COLUMNS)


train, val, test, vocab = chapter.load(cfg)
budget = chapter.budgets(cfg)
print(f"patches {tuple(train.patches.shape)}, caption tokens {tuple(train.tokens.shape)}, "
      f"MLM vocabulary {len(vocab)} wordpieces")
budget

# %% [markdown]
# ## 1. From MoCo to ALBEF: queues, soft targets and noisy pairs
#
# For an image query $q$ (student) the keys are the teacher's caption features of the batch followed by
# the caption queue, $\kappa$. The hard target puts all mass on the paired caption(s); momentum
# distillation mixes in the teacher's own distribution over the same keys:
#
# $$
# y = (1-\alpha)\,y^{hard} + \alpha\,\mathrm{softmax}(q^m \kappa^\top/\tau), \qquad
# \mathcal{L}_{i2t} = H\big(y, \mathrm{softmax}(q\kappa^\top/\tau)\big).
# $$
#
# Web captions are often wrong; a hard target then pushes the image *away* from a caption that in fact
# describes it. The soft target lets the model agree with the teacher when the teacher finds another key
# just as plausible. A look at the two targets ([`distill_contrastive_loss`](#mmalign.losses.codis.distill_contrastive_loss)) on a tiny batch where caption 1 (of another item, say a
# mismatched pair) describes the image as well as caption 0 does; the soft target penalises a student that
# ranks it high less than the hard one does:

# %%
import torch.nn.functional as F

from mmalign.losses import distill_contrastive_loss

g = torch.Generator().manual_seed(0)
keys = F.normalize(torch.randn(4, 8, generator=g), dim=-1)
keys[1] = F.normalize(keys[0] + 0.05 * torch.randn(8, generator=g), dim=0)  # caption 1 ~ caption 0
teacher_q = keys[0:1] + 0.1 * torch.randn(1, 8, generator=g)
hard = torch.tensor([1.0, 0.0, 0.0, 0.0])
soft = torch.softmax(F.normalize(teacher_q, dim=-1) @ keys.T / 0.07, dim=1)[0]
print("hard target:", hard.numpy().round(2), "\nteacher    :", soft.numpy().round(2),
      "\nalpha = 0.4:", (0.6 * hard + 0.4 * soft).numpy().round(2))
# a student that, like the teacher, ranks caption 1 first: its loss with hard labels vs with distillation
# (key 0 in the batch, keys 1-3 in the queue, all of other items)
student_q = keys[1:2] + 0.02 * torch.randn(1, 8, generator=g)
losses = {a: float(distill_contrastive_loss(student_q, keys[:1], ids=([0], [1, 2, 3]), queue=keys[1:],
                                            temperature=0.07, alpha=a, q_teacher=teacher_q))
          for a in (0.0, 0.4)}
print("loss with alpha=0: {:.3f}, with alpha=0.4: {:.3f}".format(losses[0.0], losses[0.4]))
assert soft[1] > 0.2, f"the teacher should find caption 1 nearly as good as caption 0, gave {soft[1]:.2f}"
assert losses[0.4] < losses[0.0], f"soft targets should penalise this student less, got {losses}"

# %% [markdown]
# Does it help when pairs are noisy? The full profile trains row (a) of the ablation below on training data
# where a fraction of the captions is paired with a *random other* image, once with hard labels
# ($\alpha=0$) and once with distillation, several seeds each (same budget). The committed reference:

# %%
from mmalign.experiments import load_results

reference = load_results("08")
print(f"profile={reference['profile']}  date={reference['date']}  seeds={reference['budget']['seeds']}  "
      f"({reference['seconds']} s)\nmachine: {reference['machine']}")
display(mean_std_frame(reference["noise_table"], reference["noise_std"], cols))

# %%
noise_rows = list(reference["noise_table"])
hard_row, soft_row = noise_rows
gap = reference["noise_table"][soft_row]["rsum"] - reference["noise_table"][hard_row]["rsum"]
spread = max(reference["noise_std"][soft_row]["rsum"], reference["noise_std"][hard_row]["rsum"])
print(f"distillation minus hard labels: {gap:+.1f} rsum (the larger of the two spreads: {spread:.1f})")
noise, noise_sd = reference["noise_table"], reference["noise_std"]
NOISE_VERDICT = ("within the spread" if no_measured_difference(noise[soft_row]["rsum"], noise_sd[soft_row]["rsum"],
                                                               noise[hard_row]["rsum"], noise_sd[hard_row]["rsum"])
                 else "helps" if gap > 0 else "hurts")
print("momentum distillation under noisy pairs:", NOISE_VERDICT)

# %%
# the sentences below, checked on the committed numbers
per_seed = {n: [r["rsum"] for r in runs] for n, runs in reference["noise_runs"].items()}
print("rsum per seed:", per_seed)
assert gap > 0 and NOISE_VERDICT == "within the spread", (gap, spread)
assert min(per_seed[soft_row]) < max(per_seed[hard_row]), "some seed of alpha=0 beats some seed of alpha>0"

# %% [markdown]
# **What we find.** With 30 % of the training captions paired with a wrong image, every run loses most of
# its recall (compare row (a) of the ablation below), and the runs scatter widely from seed to seed.
# Distillation's mean rsum is higher than that of hard labels, but by less than the seeds' spread, and some
# seed with hard labels beats some seed with distillation: **on this budget we cannot confirm that momentum
# distillation helps with noisy pairs.** It is plausible that it needs what we do not give it here: a
# teacher that has trained for many epochs (ours sees one) and far more data than the batch it labels, as in
# ALBEF.

# %% [markdown]
# ## 2. Optimal transport for assignments: Sinkhorn and IPOT
#
# Assigning a batch of $N$ features to $K$ codewords with the cost $D_{ij} = 1 - \cos(z_i, c_j)$ and *uniform*
# marginals (every codeword gets $N/K$ of the batch, so none collapses; SwAV, Caron et al., 2020) is an
# OT problem, $\min_{T\in\Pi(\mu,\nu)} \langle T, D\rangle$.
#
# * **Sinkhorn** (Cuturi, 2013; [`sinkhorn`](#mmalign.ot.sinkhorn)) solves the *entropic* problem $\langle T, D\rangle - \epsilon H(T)$ by
#   alternately rescaling the rows and columns of $e^{-D/\epsilon}$; its plan is blurred by $\epsilon$.
# * **IPOT** (Xie et al., 2018; the seed's Algorithm 2; [`ipot`](#mmalign.ot.ipot)) repeats one Sinkhorn scaling on
#   $e^{-D/\beta}\odot T^{(t)}$, using the previous plan as a proximal anchor; it converges to the *exact* plan.
#
# Both are written in the log domain (`mmalign.ot`): $e^{-D/\epsilon}$ underflows to 0 for small $\epsilon$,
# and a plan of zeros divides by zero. A toy problem: 12 points around 4 prototypes.

# %%
from mmalign.ot import ipot, sinkhorn

cost = chapter.toy_problem()
toy = chapter.toy_ot(cost, epsilon=0.05)
fig, axes = plt.subplots(1, 3, figsize=(12, 3.4))
for ax, name in zip(axes[:2], ("sinkhorn", "ipot")):
    ax.imshow(toy["plans"][name].numpy() * len(cost), cmap="viridis", vmin=0, vmax=1, aspect="auto")
    ax.set_title(f"{name} plan x N ({toy['seconds'][name] * 1000:.1f} ms for 200 iterations)")
    ax.set_xlabel("prototype"), ax.set_ylabel("point")
for name, style in (("sinkhorn", "-o"), ("ipot", "-s")):
    c = toy["curves"][name]
    axes[2].loglog([r["iters"] for r in c], [max(r["marginal_error"], 1e-16) for r in c], style, label=name)
axes[2].set_xlabel("iterations"), axes[2].set_ylabel("marginal error |T1-a|+|T'1-b|"), axes[2].legend()
plt.tight_layout()
plt.show()
exact = ipot(cost, 0.05, n_iters=2000)
print(f"transport cost: sinkhorn {toy['curves']['sinkhorn'][-1]['cost']:.4f}, "
      f"ipot {toy['curves']['ipot'][-1]['cost']:.4f}, ipot 2000 iterations {float(exact.cost):.4f}")

# %%
# the checks behind the text: at 200 iterations IPOT holds the marginals and has the exact cost; Sinkhorn at
# the same (small) epsilon does not hold its marginals yet
sk, ip = toy["curves"]["sinkhorn"][-1], toy["curves"]["ipot"][-1]
print(f"after {sk['iters']} iterations: marginal error sinkhorn {sk['marginal_error']:.1e}, ipot {ip['marginal_error']:.1e}")
assert ip["marginal_error"] < 1e-9 and abs(ip["cost"] - float(exact.cost)) < 1e-9
assert sk["marginal_error"] > 1e-3
# as epsilon shrinks, Sinkhorn's plan approaches the exact one
gaps = [float((sinkhorn(cost, e, n_iters=3000).plan - exact.plan).abs().sum()) for e in (0.5, 0.1, 0.02)]
print("L1 distance of Sinkhorn's plan to the exact plan at epsilon 0.5, 0.1, 0.02:", np.round(gaps, 3))
assert gaps[0] > gaps[1] > gaps[2]

# %% [markdown]
# On this toy, with $\epsilon = \beta = 0.05$ (small next to the costs), IPOT meets the marginals to machine
# precision within 200 iterations while Sinkhorn does not yet (the cell above): Sinkhorn's convergence slows
# as $\epsilon$ shrinks, while IPOT's proximal steps keep each subproblem well conditioned and still end at the
# exact plan. A larger $\epsilon$ makes Sinkhorn fast, at the price of the blur. For codebook targets CODIS
# uses IPOT with a few iterations; the library defaults to 20 ([`codebook_targets`](#mmalign.losses.codis.codebook_targets)), and renormalises the rows. Speed at scale: `benchmarks/bench_sinkhorn.py` runs our log-domain
# Sinkhorn against POT's `ot.sinkhorn(method="sinkhorn_log")` at $N=4096$, $K=1024$, 50 iterations on the
# same inputs and checks the plans are equal:

# %%
import json

from mmalign.config import results_dir

bench_path = results_dir() / "bench_sinkhorn.json"
if bench_path.exists():
    bench = json.loads(bench_path.read_text())
    print(f"ours {bench['ours_s']:.2f} s, POT (torch backend) {bench['pot_torch_s']:.2f} s, "
          f"POT (numpy) {bench['pot_numpy_s']:.2f} s; ratio POT/ours: {bench['ratio_pot_torch_over_ours']:.2f} "
          f"(torch), {bench['ratio_pot_numpy_over_ours']:.1f} (numpy); plans equal: {bench['plans_equal']}")
    assert bench["plans_equal"]
else:
    print("run `python benchmarks/bench_sinkhorn.py` (needs `pip install POT`) to measure it here")

# %% [markdown]
# ## 3. The ablation of the seed
#
# Same towers, data, batch, epochs and learning rate for every row; only the switches of [`CodisConfig`](#mmalign.models.codis.CodisConfig)
# change. Live, in this profile, we train two rows: (a) ITC cross-modal only (+ MLM + ITM), and
# (b) + codebook with teacher features, the full CODIS.

# %%
rows = chapter.ablation_rows(budget)
live_rows = {name: rows[name] for name in ("a: MLM+ITM+ITC (cross)", "b + codebook (teacher feature)")}
start = time.perf_counter()
models, live = {}, {}
for name, switches in live_rows.items():
    mc = chapter.model_config(train, budget, **switches)
    models[name], history = chapter.train_codis(train, mc, epochs=budget["epochs"], batch_size=budget["batch_size"],
                                                lr=budget["lr"], seed=cfg.seed, device=cfg.device, desc=name)
    live[name] = chapter.evaluate(models[name], test)
print(f"{time.perf_counter() - start:.0f} s for {len(live)} runs")
display(HTML(results_table_html(live, columns=cols)))

# %%
from mmalign.retrieval import chance_recall

chance_r1 = {"i2t": 100 * chance_recall(len(test.text_ids), 3, 1), "t2i": 100 * chance_recall(test.n_images, 1, 1)}
for name, row in live.items():
    assert row["i2t_R@1"] > 10 * chance_r1["i2t"] and row["t2i_R@1"] > 10 * chance_r1["t2i"], (name, row)
a_live, full_live = live["a: MLM+ITM+ITC (cross)"], live["b + codebook (teacher feature)"]
print(f"full CODIS minus (a): {full_live['rsum'] - a_live['rsum']:+.1f} rsum")
assert full_live["rsum"] > a_live["rsum"], "full CODIS should beat the cross-only row"

# %% [markdown]
# The reference table (full profile, mean ± spread over seeds; the spread is the standard deviation):

# %%
display(mean_std_frame(reference["table"], reference["table_std"], cols))
ref, sd = reference["table"], reference["table_std"]


def differs(x: str, y: str) -> float:
    """rsum of x minus rsum of y, in units of the larger of the two spreads (|value| > 1: beyond the spread)."""
    return (ref[x]["rsum"] - ref[y]["rsum"]) / max(sd[x]["rsum"], sd[y]["rsum"], 1e-9)


def verdict(x: str, y: str) -> str:
    if no_measured_difference(ref[x]["rsum"], sd[x]["rsum"], ref[y]["rsum"], sd[y]["rsum"]):
        return "within the spread"
    return "holds" if ref[x]["rsum"] > ref[y]["rsum"] else "reversed"


names = list(ref)
A, B, A_CODE, B_STUDENT, B_TEACHER, HALF, DOUBLE = names
pairs = {
    "(b) intra + cross beats (a) cross only": (B, A),
    "(a) + codebook (teacher) beats (a)": (A_CODE, A),
    "(b) + codebook (teacher) beats (b)": (B_TEACHER, B),
    "(b) + codebook (teacher) beats (b) + codebook (student)": (B_TEACHER, B_STUDENT),
    "0.5x codewords below the default": (B_TEACHER, HALF),
    "2x codewords below the default": (B_TEACHER, DOUBLE),
}
claims = {c: differs(x, y) for c, (x, y) in pairs.items()}
verdicts = {c: verdict(x, y) for c, (x, y) in pairs.items()}
pd.DataFrame({"gap / spread": claims, "here": verdicts})

# %% [markdown]
# **Which of the seed's claims hold here.** The table above is the honest answer, computed from the
# committed numbers: a claim *holds* when the gap in rsum is larger than the larger of the two rows' spreads
# (the course's one rule, `experiments.seeds.no_measured_difference`), is *reversed* when it is as large the
# other way, and is *within the spread* otherwise. The cell below pins the verdicts the text relies on.

# %%
expected = {"(b) intra + cross beats (a) cross only": "within the spread",
            "(a) + codebook (teacher) beats (a)": "within the spread",
            "(b) + codebook (teacher) beats (b)": "holds",
            "(b) + codebook (teacher) beats (b) + codebook (student)": "within the spread",
            "0.5x codewords below the default": "holds",
            "2x codewords below the default": "reversed"}
assert verdicts == expected, verdicts
spread_a = max(sd[A]["rsum"], sd[A_CODE]["rsum"])
spread_b = max(sd[n]["rsum"] for n in (B, B_STUDENT, B_TEACHER, HALF, DOUBLE))
print(f"largest spread of the cross-only rows {spread_a:.1f}, of the intra + cross rows {spread_b:.1f} (rsum)")
assert spread_a > 1.5 * spread_b
assert ref[B]["rsum"] > ref[A]["rsum"]
runs = {n: [r["rsum"] for r in reference["runs"][n]] for n in ref}
assert max(runs[A]) > max(runs[B]), "one seed of (a) scores above every seed of (b)"
assert ref[DOUBLE]["rsum"] == max(r["rsum"] for r in ref.values())

# %% [markdown]
# In the seed's words and on our numbers:
#
# * **Intra + cross vs cross only** (b vs a): the mean rsum of (b) is higher, but within the spread: one seed
#   of (a) scores above every seed of (b). What intra-modal alignment does clearly here is make training
#   *stable*: the rows with i2i/t2t vary far less from seed to seed than the cross-only rows (the cell above).
#   The seed's claim of a significant gain is not confirmed at our scale.
# * **Codebook with teacher features on top of (b)** holds: beyond the spread.
# * **Teacher vs student features for the plans**: within the spread here; the seed reports a small gain
#   for the teacher, which we cannot resolve.
# * **Codebook on top of (a)**: within the spread (the seed reports a gain).
# * **Codebook size**: half the codewords is worse than the default, as in the seed; but *twice* the codewords
#   is better, and the best row of the table, where the seed finds the default best. Scenes of up to three
#   objects, each with a colour, a shape, a size and a place, combine into many more concepts than 64.
#
# All with one epoch, one-layer towers of width 64, frozen features and 5,000 training scenes: the seed's
# effects of about one R@1 point on COCO are at or below what three seeds resolve here.

# %% [markdown]
# ## 4. What the codewords mean
#
# Each caption token and each image patch, passed through its tower and the projection head, lands
# somewhere in the shared space; the nearest codeword is the one it *picks*. For the live CODIS model: for a
# few codewords, the wordpieces that pick it most consistently (share of that word's occurrences in the
# test captions), and test-image patches that pick it.

# %%
model = models["b + codebook (teacher feature)"]
view = chapter.codeword_words(model, test, top=4)
used = sorted(view["words"], key=lambda c: -sum(n for _, _, n in view["words"][c]))[:8]
pd.DataFrame({f"codeword {c}": [f"{w} ({share:.0%}, n={n})" for w, share, n in view["words"][c]] +
              [""] * (4 - len(view["words"][c])) for c in used}).T

# %%
world = chapter.sequence_features("test", cfg, progress=False).world
shown = [c for c in used if c in view["patches"]][:4]
fig, axes = plt.subplots(len(shown), 6, figsize=(9, 1.6 * len(shown)), squeeze=False)
for r, c in enumerate(shown):
    for j, (img, p) in enumerate(view["patches"][c][:6]):
        im = world.images[img]
        h, w = im.shape[0] // 3, im.shape[1] // 3
        i0, j0 = divmod(p, 3)
        ax = axes[r, j]
        ax.imshow(im)
        ax.add_patch(plt.Rectangle((j0 * w, i0 * h), w, h, fill=False, edgecolor="red", lw=2))
        ax.set_xticks([]), ax.set_yticks([])
    axes[r, 0].set_ylabel(f"code {c}", rotation=0, labelpad=28)
    for j in range(len(view["patches"][c][:6]), 6):
        axes[r, j].axis("off")
plt.suptitle("test patches (red) that pick each codeword")
plt.tight_layout()
plt.show()

# %%
n_used_words = len(view["words"])
n_used_patches = len(view["patches"])
print(f"codewords picked by some caption token: {n_used_words}, by some image patch: {n_used_patches}, "
      f"of {model.cfg.n_codewords}")
assert n_used_words >= 2 and n_used_patches >= 2, "the codebook collapsed to one codeword"

# %% [markdown]
# Read the table as the seed reads its Grad-CAM figure: a codeword that collects one colour or one shape word
# across captions has become a concept shared by the two modalities. The seed's figure shows hand-picked
# words; this table shows whatever the most used codewords collect, including function words ("a", "of"):
# the frozen token states already mix each word with its neighbours, and a tiny tower trained for one epoch
# separates concepts only partly. Try it with the full profile's model, or more epochs.

# %% [markdown]
# ## Takeaways
#
# * ALBEF/CODIS keep MoCo's queues and momentum teacher and reuse the teacher for **soft targets**; with one
#   epoch and a young teacher, we could not show that they help against noisy pairs (section 1).
# * **Optimal transport** turns "assign the batch to codewords, evenly" into a plan: Sinkhorn (blurred by
#   $\epsilon$, fast) or IPOT (exact, more iterations), both in the log domain to survive small $\epsilon$.
# * In the seed's ablation on the scene world, the **codebook with teacher targets** on top of intra + cross
#   alignment is a gain beyond the spread, more codewords help, and **intra-modal alignment** makes training
#   far more stable across seeds; the other claims are within the spread of three seeds.
# * The lab: write IPOT yourself and check it against `mmalign.ot`, a hand-worked case and the marginals.
#
# References: He et al., 2020 (MoCo); Li et al., 2021 (ALBEF); Duan et al., 2022 (CODIS); Cuturi, 2013
# (Sinkhorn distances); Xie et al., 2018 (IPOT); Caron et al., 2020 (SwAV).
