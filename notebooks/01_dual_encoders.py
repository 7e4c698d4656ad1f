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
# # 1. Dual encoders
#
# A **dual encoder** has two towers that never look at each other's input: an image tower
# $f_\theta$ and a text tower $g_\phi$, each followed by a **projection head** into one shared space
# $\mathbb{R}^d$. Matching an image with a caption is then a single dot product,
#
# $$
# s(\text{image}, \text{caption}) = \cos\big(f_\theta(\text{image}),\, g_\phi(\text{caption})\big),
# $$
#
# so a gallery of a million captions is encoded once and searched with a nearest-neighbour index.
# The Wikipedia caption-matching project of this chapter's source (seed 001) built exactly this for the
# WIT data set: EfficientNet-B0 for images, BERT for text, both projected to 768 dimensions, trained with
# the **cosine embedding loss** on pairs labelled $+1$ (match) and $-1$ (no match) and the **LAMB**
# optimizer; at test time, an image retrieves its nearest caption.
#
# This chapter rebuilds that system on the course's data and compares its choices with the alternatives:
#
# 1. the **WIT record format** (what a line of those 670 MB `json.gz` files holds) and a reader for it;
# 2. the two towers and their projection heads;
# 3. the **cosine embedding loss**: how the $-1$ pairs are formed and what its margin does;
# 4. **InfoNCE** (chapter 0) as the alternative: every other caption of the batch is a negative;
# 5. **LAMB against Adam** at a small and a large batch;
# 6. nearest-neighbour **retrieval of captions for an image**, the seed's task.

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

# %% [markdown]
# ## 1. The WIT record format
#
# WIT (Srinivasan et al., 2021) pairs Wikipedia images with their captions in 108 languages. The
# caption-competition release that seed 001 trained on is split into 400 gzip files of JSON lines, one
# image per line:
#
# * `image_url`, `metadata_url`: where the image and its Commons page live;
# * `wit_features`: a list with one entry per language the image appears in, holding the
#   `caption_reference_description` (the caption), the page URL and title, the MIME type, sizes...;
# * `b64_bytes`: the image file itself, base64-encoded;
# * `embedding`: a precomputed 2048-d ResNet-50 embedding as one comma-separated string.
#
# We cannot download 670 MB here, so we write a tiny file **in the real format** from scene-world images
# with [`mmalign.data.wit.write_wit_records`](#mmalign.data.wit.write_wit_records), add a few broken lines of the kinds a scraped file really
# holds, and read it back with [`read_wit_records`](#mmalign.data.wit.read_wit_records). There is no ResNet-50 in the course's offline
# packages, so the `embedding` field carries the EfficientNet-Lite0 feature (1280-d) zero-padded to
# 2048 values: a stand-in with the right shape.

# %%
import gzip
import json
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from mmalign.data.features import scene_features
from mmalign.data.wit import EMBEDDING_DIM, WitDataset, WitRecord, read_wit_records, write_wit_records

train, val, test = (scene_features(split, cfg) for split in ("train", "val", "test"))

records = []
for i in range(6):
    embedding = np.zeros(EMBEDDING_DIM, np.float32)
    embedding[:train.image.shape[1]] = train.image[i].numpy()
    records.append(WitRecord(image=Image.fromarray(train.world.images[i]), caption=train.world.captions["en"][i][0],
                             language="en", embedding=embedding,
                             image_url=f"https://upload.wikimedia.org/scene_{i:05d}.png"))
folder = Path(tempfile.mkdtemp())
path = folder / "part-00000.json.gz"
write_wit_records(path, records)
with gzip.open(path, "rt") as f:
    lines = f.read().splitlines()
broken = {
    "bad_base64": {**json.loads(lines[0]), "b64_bytes": "not base64 at all!"},
    "missing_field": {k: v for k, v in json.loads(lines[1]).items() if k != "embedding"},
    "no_caption": {**json.loads(lines[2]), "wit_features": [{"language": "hi", "caption_reference_description": "…"}]},
}
write_wit_records(path, records + list(broken.values()))  # dicts are written verbatim
print(f"{path.name}: {path.stat().st_size / 1024:.0f} KiB, {len(records) + len(broken)} lines")

# %% [markdown]
# One line of the file, with the long fields shortened:

# %%
with gzip.open(path, "rt") as f:
    first = json.loads(f.readline())
first["b64_bytes"] = first["b64_bytes"][:40] + "…"
first["embedding"] = first["embedding"][:60] + "…"
print(json.dumps(first, indent=1))

# %% [markdown]
# `read_wit_records` decodes every line into a [`WitRecord`](#mmalign.data.wit.WitRecord) (PIL image, caption, embedding) and **counts**
# what it skips instead of crashing on the first bad line: corrupt records (bad JSON, a missing field,
# undecodable base64 or image bytes, a malformed embedding, a cut gzip stream) and records with no
# caption in the requested language (a filter, not an error). `on_error="raise"` stops at the first
# corrupt line instead, naming the file, the line and the reason.

# %%
wit_records, stats = read_wit_records(path, language="en")
print(f"lines {stats.lines}, kept {stats.kept}, corrupt {stats.corrupt}, skipped by reason: {dict(stats.skipped)}")
dataset = WitDataset(path)
image, caption, index = dataset[0]
print(f"WitDataset: {len(dataset)} items; item 0 = ({type(image).__name__} {image.size}, {caption!r}, {index}); "
      f"embeddings {tuple(dataset.embeddings.shape)}")
fig, axes = plt.subplots(1, 4, figsize=(10, 2.8))
for ax, r in zip(axes, wit_records):
    ax.imshow(r.image)
    ax.set_title(r.caption[:34] + ("…" if len(r.caption) > 34 else ""), fontsize=7)
    ax.axis("off")
plt.show()

# %%
assert stats.kept == len(records) and stats.lines == len(records) + len(broken)
assert dict(stats.skipped) == {reason: 1 for reason in broken}
assert np.array_equal(np.asarray(wit_records[0].image), train.world.images[0]), "PNG round trip is lossless"

# %% [markdown]
# ## 2. Two towers and their projection heads
#
# Seed 001 fine-tuned both towers end to end on a V100. On two CPU cores we keep the towers **frozen**
# (EfficientNet-Lite0 for images, MiniLM for captions, features cached by chapter 0) and train only the
# projection heads ([`make_dual_encoder`](#mmalign.recipes.make_dual_encoder)): one linear map per tower, after standardising its input features,
#
# $$
# z^I = W_I\,\frac{x^I - \mu_I}{\sigma_I} + b_I \in \mathbb{R}^{d}, \qquad
# z^T = W_T\,\frac{x^T - \mu_T}{\sigma_T} + b_T \in \mathbb{R}^{d}.
# $$
#
# The heads are all the dual encoder learns here, so every difference in this chapter comes from the
# loss or the optimizer that trains them.

# %%
from mmalign.recipes import evaluate, make_dual_encoder

model = make_dual_encoder(train, cfg.embed_dim)
for name, head in [("image", model.image_head), ("text", model.text_head)]:
    n_params = sum(p.numel() for p in head.parameters())
    print(f"{name:5s} head: {head.in_dim} -> {head.out_dim}, {n_params:,} trainable parameters")

# %% [markdown]
# ## 3. The cosine embedding loss on $+1/-1$ pairs
#
# The loss of seed 001 (PyTorch's `CosineEmbeddingLoss`; ours is [`cosine_embedding_loss`](#mmalign.losses.cosine_embedding.cosine_embedding_loss)) looks at one pair $(a_i, b_i)$ at a time with a
# label $y_i \in \{+1, -1\}$:
#
# $$
# \ell_i = \begin{cases} 1 - \cos(a_i, b_i) & y_i = +1 \quad\text{(pull a matching pair together)}\\
#                        \max\big(0,\ \cos(a_i, b_i) - m\big) & y_i = -1 \quad\text{(push a wrong pair below } m\text{)}
#          \end{cases}
# $$
#
# **Where do the $-1$ pairs come from?** A batch of (image, caption) pairs only holds positives. The
# negatives are made from it: image $i$ with the caption of another pair $j$ of the batch. Two captions
# of the same scene can land in one batch, so the draw must skip columns with the same scene id, or it
# would label a true pair $-1$. [`make_signed_pairs`](#mmalign.losses.cosine_embedding.make_signed_pairs) does this: all $B$ diagonal pairs as $+1$, then $k$
# random other-scene columns per row as $-1$. A toy batch of six pairs from four scenes, $k = 2$:

# %%
from mmalign.losses import cosine_embedding_loss, make_signed_pairs

toy_ids = torch.tensor([0, 0, 1, 2, 2, 3])  # scene of each (image, caption) pair in the batch
ia, ib, target = make_signed_pairs(6, negatives_per_positive=2, generator=torch.Generator().manual_seed(0),
                                   ids=toy_ids)
pairs = pd.DataFrame({"image row": ia, "caption column": ib, "label": target.long(),
                      "scenes": [f"{int(toy_ids[i])} vs {int(toy_ids[j])}" for i, j in zip(ia, ib)]})
pairs.T

# %%
assert bool((toy_ids[ia] == toy_ids[ib])[target == 1].all()) and bool((toy_ids[ia] != toy_ids[ib])[target == -1].all())

# %% [markdown]
# **What the margin does.** A $-1$ pair costs nothing once its cosine is below $m$. With $m = 0$ every
# wrong pair is pushed to orthogonal or beyond; with $m > 0$ wrong pairs that are already "dissimilar
# enough" drop out of the loss, and the gradient goes to the pairs that still matter. The number $k$ of
# negatives per positive sets the balance between the pull of the $B$ positive terms and the push of the
# $kB$ negative terms, all averaged together. We train four heads on a small grid of $m$ and $k$, with
# Adam, the same epochs and the same batches:

# %%
from mmalign.experiments import dual_encoders as chapter

cos_runs = chapter.cosine_grid(train, val, test, cfg)
pd.DataFrame({f"m={m}, k={k}": r.row() for (m, k), r in cos_runs.items()}).T.round(1)

# %% [markdown]
# Where do true and wrong pairs end up? Below, the cosine of every true (image, caption) pair of the test
# split and of every wrong one, for each run:

# %%
fig, axes = plt.subplots(1, len(cos_runs), figsize=(3.2 * len(cos_runs), 2.8), sharey=True)
for ax, ((m, k), r) in zip(axes, cos_runs.items()):
    pos, neg = chapter.pair_cosines(r.model, test)
    ax.hist(neg.numpy(), bins=60, range=(-1, 1), density=True, alpha=0.6, label="wrong pairs")
    ax.hist(pos.numpy(), bins=60, range=(-1, 1), density=True, alpha=0.6, label="true pairs")
    ax.axvline(m, color="k", ls=":", lw=1)
    ax.set(title=f"m={m}, k={k}", xlabel="cosine")
axes[0].legend(frameon=False, fontsize=8)
fig.tight_layout()
plt.show()
cos_stats = pd.DataFrame(chapter.cosine_stats(cos_runs, test)).T
cos_stats.round(2)

# %% [markdown]
# Read the histograms with the formula in mind. With one negative per positive the push is weak: the
# wrong-pair cosines spread widely and a tenth of them stay well above the margin (`negative_q90` about 0.5
# here and in the reference run), whatever $m$. With eight, they gather near the margin (dotted line), where they stop
# costing anything. With **many negatives and $m = 0$**, the push term outweighs the pull:
# the cheapest way to make $kB$ cosines non-positive is to spread *everything* out, true pairs included,
# and the true-pair cosines are dragged down towards zero (see `positive_mean` in the table). A positive margin
# switches most negative terms off and restores the balance. So the margin and $k$ are one knob, not two:
# at one negative per positive the margin moves rsum by a few points, at eight by more than 40. They
# must be tuned together, a first hint of why chapter 2 finds hinge-style pair losses fiddly.

# %%
from mmalign.retrieval import chance_recall

k_captions = test.world.captions_per_image
chance_rsum = 100 * sum(chance_recall(len(test.texts), k_captions, k) + chance_recall(len(test.world), 1, k)
                        for k in (1, 5, 10))
rsum = {key: r.test["rsum"] for key, r in cos_runs.items()}
print(f"chance rsum on this test split: {chance_rsum:.1f}")
# With 8 negatives per positive, margin 0 makes the true pairs collapse; margin 0.3 does not.
assert cos_stats.loc["m=0.0, 8 neg.", "positive_mean"] < cos_stats.loc["m=0.3, 8 neg.", "positive_mean"] - 0.2
assert rsum[(0.3, 8)] > rsum[(0.0, 8)] + 40
# With one negative the margin moves rsum by a few points only.
assert abs(rsum[(0.3, 1)] - rsum[(0.0, 1)]) < 10
# One negative: a tenth of the wrong pairs stay well above either margin; eight: they gather near the margin.
for m in (0.0, 0.3):
    q90_one = cos_stats.loc[f"m={m}, 1 neg.", "negative_q90"]
    q90_eight = cos_stats.loc[f"m={m}, 8 neg.", "negative_q90"]
    assert 0.4 < q90_one < 0.6 and q90_eight < q90_one - 0.1 and abs(q90_eight - m) < 0.15, (m, q90_one, q90_eight)
# Every run retrieves far above chance.
assert min(rsum.values()) > 10 * chance_rsum

# %% [markdown]
# ## 4. InfoNCE: every other caption is a negative
#
# The cosine embedding loss judges pairs one at a time, against a fixed threshold. InfoNCE (chapter 0)
# judges a pair **relative to the rest of the batch**: with $s_{ij} = \cos(z^I_i, z^T_j)/\tau$,
#
# $$
# \mathcal{L} = \frac{1}{2B}\sum_{i}\Big[-\log\frac{e^{s_{ii}}}{\sum_{j} e^{s_{ij}}}
#               -\log\frac{e^{s_{ii}}}{\sum_{j} e^{s_{ji}}}\Big],
# $$
#
# so all $B-1$ other captions are negatives, weighted by the softmax: a wrong caption that scores close to
# the right one gets most of the gradient, one that is already far away gets almost none. That is a
# margin that adapts itself, with no $m$ and no $k$ to tune (only $\tau$; chapter 2 sweeps it). Retrieval
# is a ranking task, and InfoNCE is a ranking loss, while the cosine loss is a classification of pairs.
#
# The InfoNCE run below is the first of the optimizer comparison (Adam at the profile's batch size), so
# we train all four optimizer settings now and compare InfoNCE with the cosine loss first.

# %%
opt_runs = chapter.optimizer_runs(train, val, test, cfg)
adam_small = next(iter(opt_runs))
compare = {f"Cosine, m={m}, k={k}": r.row() for (m, k), r in cos_runs.items()}
compare[f"InfoNCE ({adam_small})"] = opt_runs[adam_small].row()
pd.DataFrame(compare).T.round(1)

# %%
info_nce_rsum = opt_runs[adam_small].test["rsum"]
# InfoNCE beats the cosine loss at seed 001's setting (m = 0, one negative per positive) ...
assert info_nce_rsum > rsum[(0.0, 1)] + 10
# ... and comes within a few points of (or beats) the best cell of the cosine grid, with nothing to tune.
assert info_nce_rsum > max(rsum.values()) - 8

# %% [markdown]
# ## 5. LAMB against Adam, small and large batches
#
# Seed 001 trained with **LAMB** (You et al., 2020; [`mmalign.optim.LAMB`](#mmalign.optim.LAMB)), built for very large batches. Adam's step is the
# same size for every coordinate, whatever the size of the weights it changes; LAMB rescales each
# layer's Adam update $u$ (moments, bias correction, decoupled weight decay $\lambda w$) by a
# layer-wise **trust ratio** ([`lamb_trust_ratio`](#mmalign.optim.lamb_trust_ratio)):
#
# $$
# u_t = \frac{\hat m_t}{\sqrt{\hat v_t} + \epsilon} + \lambda w, \qquad
# w \leftarrow w - \eta\, r(w, u_t)\, u_t, \qquad
# r(w, u) = \min\!\Big(\frac{\lVert w \rVert}{\lVert u \rVert},\ c\Big)
# $$
#
# ($r = 1$ when either norm is 0; the WIT project used $c = 10$). The step of every layer is then
# $\eta \lVert w \rVert$ in size: $\eta$ is a *relative* change per layer, which is why LAMB's learning
# rates are not Adam's. A hand-worked case: $w = (3, 4)$ has norm 5; an update $u = (0.6, 0.8)$ has norm
# 1, so $r = 5$ and the step is $\eta \cdot (3, 4)$. An update 100 times *smaller*, $u / 100$, would get
# $r = 500$: the clamp caps it at $c = 10$, so a layer whose Adam update has nearly vanished is not blown
# up to a full-size step.

# %%
from mmalign.optim import lamb_trust_ratio

w = torch.tensor([3.0, 4.0])
r_u = float(lamb_trust_ratio(w, torch.tensor([0.6, 0.8])))
r_small = float(lamb_trust_ratio(w, torch.tensor([0.006, 0.008])))
r_zero = float(lamb_trust_ratio(torch.zeros(2), torch.tensor([0.6, 0.8])))
print("r(w, u)        =", r_u)
print("r(w, u / 100)  =", r_small, "(500 before the clamp at c = 10)")
print("r(0, u)        =", r_zero, "(zero weights: plain Adam)")
assert abs(r_u - 5) < 1e-6 and abs(r_small - 10) < 1e-6 and r_zero == 1, (r_u, r_small, r_zero)
for name, p in model.named_parameters():
    print(f"{name:20s} shape {str(tuple(p.shape)):12s} |w| = {p.norm():.2f}")
norms = {name: float(p.norm()) for name, p in model.named_parameters()}
assert min(v for n, v in norms.items() if n.endswith("weight")) > 10 * max(
    v for n, v in norms.items() if n.endswith("bias"))

# %% [markdown]
# The weight matrices and the biases of the heads differ more than tenfold in norm (printed above), so
# LAMB moves them at very different absolute speeds. The experiment: InfoNCE with each optimizer at the profile's
# batch size $B$ and at $8B$, **the same number of epochs** (so the large batch takes 8 times fewer
# steps), learning rates scaled by $\sqrt 8$ at the large batch for both optimizers (the square-root rule
# You et al. use for LAMB). The curves show validation rsum (the sum of the six recalls) after each epoch:

# %%
fig, ax = plt.subplots(figsize=(6.5, 3.6))
for i, (name, r) in enumerate(opt_runs.items()):
    epochs = [e["epoch"] + 1 for e in r.history.evals]
    ax.plot(epochs, [e["rsum"] for e in r.history.evals], marker="o", ms=3, color=f"C{i // 2}",
            ls="-" if "LAMB" in name else "--", label=name)
ax.set(xlabel="epoch", ylabel="validation rsum", title="InfoNCE: Adam (dashed) vs LAMB (solid)")
ax.legend(frameon=False, fontsize=8)
plt.show()
pd.DataFrame({name: r.row() for name, r in opt_runs.items()}).T.round(1)

# %% [markdown]
# What to look for: at the large batch, each run has 8 times fewer steps. Does the $\sqrt 8$ larger
# learning rate make up for them with Adam? Does LAMB's layer-wise step keep the large batch closer to the
# small-batch result? Compare this table with the full-profile one at the end of the chapter before
# drawing a conclusion: there, with more data, the four settings end within ten rsum points of each
# other, far closer than the losses of section 3, and LAMB's one clear effect is speed at the large
# batch (the reference curves: it reaches its plateau in a few epochs, Adam at the last one). With two
# small linear heads there is little for a layer-wise rate to fix. LAMB's
# real use is deep networks trained on thousands of examples per batch (BERT in 76 minutes), where no
# single learning rate suits every layer. We do not assert an ordering between the optimizers here; the
# reference table below (full profile) shows whether it holds on more data.

# %%
for name, r in opt_runs.items():
    assert r.test["rsum"] > 10 * chance_rsum, f"{name} should retrieve far above chance"
    assert r.history.loss[-1] < r.history.loss[0], f"{name}: the loss should go down"

# %% [markdown]
# ## 6. Nearest-neighbour retrieval: captions for an image
#
# The seed's task: given an image, return the caption closest to it in the shared space. We take the best
# model of the chapter by validation rsum, encode every test caption once, and look up ([`top_k`](#mmalign.retrieval.top_k)) the five nearest
# captions of a few test images (✓ marks a caption of that image). Then the other direction, a caption's
# five nearest images, as a grid (green frame: the right image).

# %%
from mmalign.plots import image_to_text_html, text_to_image_grid
from mmalign.retrieval import top_k

all_runs = {**{f"Cosine, m={m}, k={k}": r for (m, k), r in cos_runs.items()}, **opt_runs}
best_name = max(all_runs, key=lambda name: all_runs[name].history.best["rsum"])
best = all_runs[best_name].model.eval()
print(f"best on validation: {best_name}")
with torch.no_grad():
    z_img, z_txt = best.encode_images(test.image), best.encode_texts(test.text)
queries = torch.tensor([0, 1, 2, 3])
scores, top_captions = top_k(z_img[queries], z_txt, 5)
display(HTML(image_to_text_html(test.world.images[queries.numpy()], test.texts, top_captions,
                                test.text_ids[top_captions] == test.image_ids[queries][:, None], scores)))

# %%
caption_queries = torch.tensor([0, 10, 20, 30])
_, top_images = top_k(z_txt[caption_queries], z_img, 5)
text_to_image_grid([test.texts[int(q)] for q in caption_queries], test.world.images, top_images,
                   test.image_ids[top_images] == test.text_ids[caption_queries][:, None])
plt.show()

# %% [markdown]
# The wrong neighbours are instructive: they usually share most of the query's content and differ in one
# detail, a colour, a size, a relation or a count: the details a frozen sentence encoder compresses most.
# A check over all test captions: how many of the objects a caption names (colour and shape) are missing
# from its wrong top-1 image, against a random wrong image.

# %%
_, top1 = top_k(z_txt, z_img, 1)
top1 = top1[:, 0]
wrong = (top1 != test.text_ids).nonzero()[:, 0]
random_wrong = (test.text_ids[wrong] + torch.randint(1, len(test.world), (len(wrong),),
                                                    generator=torch.Generator().manual_seed(0))) % len(test.world)


def objects_missing(caption, image):
    """How many of the objects a caption names (colour, shape) are not in the image."""
    scene, graphs = int(test.text_ids[caption]), test.world.graphs
    plan = test.world.plans[scene][caption % k_captions]
    present = {(o["color"], o["shape"]) for o in graphs[int(image)]["objects"]}
    return sum((graphs[scene]["objects"][j]["color"], graphs[scene]["objects"][j]["shape"]) not in present
               for j in plan["objects"])


at_most_one = {name: 100 * sum(objects_missing(int(q), int(img)) <= 1 for q, img in zip(wrong, images)) / len(wrong)
               for name, images in [("wrong top-1 image", top1[wrong]), ("random wrong image", random_wrong)]}
print(f"{len(wrong)} captions with a wrong top-1 image; the image lacks at most one named object (%):",
      {name: round(v, 1) for name, v in at_most_one.items()})
assert at_most_one["wrong top-1 image"] > 60
assert at_most_one["wrong top-1 image"] > at_most_one["random wrong image"] + 20

# %% [markdown]
# ### Live table and reference numbers (full profile)
#
# All runs of this chapter, on the test split of your profile (best per column in bold; for "Ep", the
# epoch of the best validation rsum, the earliest is bold):

# %%
from mmalign.plots import results_table_html

live = chapter.chapter_table(cos_runs, opt_runs)
display(HTML(results_table_html(live, columns=list(chapter.COLUMNS) + ["Ep"], higher_is_better={"Ep": False})))

# %% [markdown]
# `make results CHAPTER=01` runs the same functions in the **full** profile (more scenes, more epochs)
# and writes `results/01_dual_encoders.json`, which records where and when it ran:

# %%
from mmalign.experiments import load_results

reference = load_results("01")
print(f"profile={reference['profile']}  date={reference['date']}  seed={reference['seed']}  "
      f"sizes={reference['sizes']}\nmachine: {reference['machine']}  ({reference['seconds']} s)  "
      f"epochs per run: {reference['settings']['epochs']}")
display(HTML(results_table_html(reference["table"], columns=list(chapter.COLUMNS) + ["Ep"],
                                 higher_is_better={"Ep": False})))

# %%
# The chapter's comparisons, checked on the reference run too.
ref_rsum = {name: row["rsum"] for name, row in reference["table"].items()}
ref_cos = reference["cosines"]
ref_cosine_rsum = {name: v for name, v in ref_rsum.items() if name.startswith("Cosine")}
ref_opt_rsum = {name: v for name, v in ref_rsum.items() if name.startswith("InfoNCE")}
assert ref_rsum["Cosine, m=0.3, 8 neg."] > ref_rsum["Cosine, m=0.0, 8 neg."] + 40
assert abs(ref_rsum["Cosine, m=0.3, 1 neg."] - ref_rsum["Cosine, m=0.0, 1 neg."]) < 10
assert ref_cos["m=0.0, 8 neg."]["positive_mean"] < ref_cos["m=0.3, 8 neg."]["positive_mean"] - 0.2
for m in (0.0, 0.3):
    q90_one, q90_eight = ref_cos[f"m={m}, 1 neg."]["negative_q90"], ref_cos[f"m={m}, 8 neg."]["negative_q90"]
    assert 0.4 < q90_one < 0.6 and q90_eight < q90_one - 0.1 and abs(q90_eight - m) < 0.15, (m, q90_one, q90_eight)
# InfoNCE: far above the seed's setting, level with the best cosine cell
ref_info_nce = ref_rsum[min((n for n in ref_opt_rsum if "Adam" in n), key=lambda n: int(n.split("B=")[1]))]
assert ref_info_nce > ref_rsum["Cosine, m=0.0, 1 neg."] + 10 and ref_info_nce > max(ref_cosine_rsum.values()) - 8
# the four optimizer settings end within ten rsum points, far closer than the cosine grid
opt_spread = max(ref_opt_rsum.values()) - min(ref_opt_rsum.values())
cosine_spread = max(ref_cosine_rsum.values()) - min(ref_cosine_rsum.values())
assert opt_spread < 10 and opt_spread < cosine_spread / 4, (opt_spread, cosine_spread)

# %%
fig, ax = plt.subplots(figsize=(6.5, 3.6))
for i, (name, curve) in enumerate(reference["curves"].items()):
    ax.plot(curve["epoch"], curve["rsum"], marker="o", ms=3, color=f"C{i // 2}",
            ls="-" if "LAMB" in name else "--", label=name)
ax.set(xlabel="epoch", ylabel="validation rsum", title="full profile: Adam (dashed) vs LAMB (solid)")
ax.legend(frameon=False, fontsize=8)
plt.show()
# At the large batch LAMB reaches its plateau within a few epochs; Adam is still climbing at the last one.
large_b = max(int(name.split("B=")[1]) for name in reference["curves"])
adam_large, lamb_large = (reference["curves"][f"{opt}, B={large_b}"]["rsum"] for opt in ("Adam", "LAMB"))
assert lamb_large[1] > adam_large[1] + 20, (lamb_large[1], adam_large[1])  # after two epochs
assert lamb_large[3] > max(lamb_large) - 10 and adam_large[3] < max(adam_large) - 20  # after four
assert max(adam_large) == adam_large[-1]  # Adam's best is its last epoch

# %% [markdown]
# ## Takeaways
#
# * A dual encoder scores an (image, caption) pair with one dot product in a shared space, so a gallery
#   is encoded once and searched by nearest neighbours: the seed's "retrieve the caption of an image".
# * The cosine embedding loss needs negatives made from the batch (other scenes only) and a margin; the
#   margin and the number of negatives per positive interact, and a bad pair of them collapses the
#   true-pair similarities.
# * InfoNCE uses every other caption of the batch, weighted by how confusable it is, and needs no
#   margin: it matches or beats the tuned cosine loss here (tables above).
# * LAMB rescales each layer's Adam step by $\lVert w\rVert/\lVert u\rVert$; it is a tool for large
#   batches and deep networks. With two linear heads the four settings end close together and in no
#   consistent order; at the large batch LAMB gets there in fewer epochs (reference curves).
# * WIT files are JSON lines with base64 images; a reader must count and skip bad records, not crash.
#
# **References.** Srinivasan et al. (2021), *WIT: Wikipedia-based image text dataset for multimodal
# multilingual machine learning*. You et al. (2020), *Large batch optimization for deep learning:
# training BERT in 76 minutes* (LAMB). Tan & Le (2019), *EfficientNet*. Devlin et al. (2019), *BERT*.
# Hadsell, Chopra & LeCun (2006), *Dimensionality reduction by learning an invariant mapping* (pairwise
# losses with a margin). van den Oord et al. (2018), *CPC* (InfoNCE). Radford et al. (2021), *CLIP*.
# Jain et al. (2021), *MURAL* (dual encoders for multilingual image-text retrieval).
