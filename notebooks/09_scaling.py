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
# # 9. Scaling up: gathered negatives, mixed precision, large galleries
#
# Everything so far trained on one process. This chapter is about what changes when the batch, the model
# or the gallery no longer fits one process comfortably:
#
# 1. **why contrastive learning wants large batches**: InfoNCE is a classification of the positive among
#    the batch's candidates, and the number of candidates is set by the batch; and whether the sigmoid
#    loss of SigLIP, which scores every pair on its own, depends on the batch less;
# 2. **data-parallel training with gathered negatives**: $W$ processes each hold $B/W$ pairs; gathering
#    every process's embeddings gives each one all $B$ candidates again. We launch 2 CPU processes with
#    `torchrun` (gloo backend) from this notebook and check that they train *exactly* what one process
#    trains on the whole batch;
# 3. **what gathering costs**: communication against compute, and the memory of the gathered loss in its
#    global form against the local form of open_clip, measured;
# 4. **mixed precision**: where float16 breaks a contrastive loss (the float32-logits rule);
# 5. **retrieval on large galleries**: scoring in chunks, memory against gallery size;
# 6. **the library against its peers**: the `make bench` table;
# 7. **the `gpu` profile**: what changes on a GPU and how to run every chapter there.
#
# For one positive among $K$ candidates, van den Oord et al. (2018) show that InfoNCE bounds the mutual
# information between the two views: $I(x; y) \ge \log K - \mathcal{L}_{\text{InfoNCE}}$. With $K$ candidates
# the bound cannot exceed $\log K$, which is one reason CLIP (Radford et al., 2021) trains with a batch of
# 32,768 and SimCLR (Chen et al., 2020) with up to 8,192, both gathering embeddings across accelerators.

# %%
import tempfile

import matplotlib.pyplot as plt
import pandas as pd
import torch
from IPython.display import HTML, display

from mmalign.config import load_config, seed_everything

cfg = load_config()  # MMALIGN_PROFILE=ci (default), full or gpu
seed_everything(cfg.seed)
torch.set_num_threads(cfg.num_threads or 1)
print(f"profile={cfg.profile}  device={cfg.device}  train/test scenes={cfg.n_train}/{cfg.n_test}  batch={cfg.batch_size}")

# %% [markdown]
# The data and heads of chapter 2: cached frozen EfficientNet-Lite0 image features and MiniLM caption
# features, one linear projection head per tower, InfoNCE at $\tau = 0.07$ with captions of the same scene
# as extra positives.

# %%
from mmalign.data.features import scene_features
from mmalign.experiments import scaling

train, test = scene_features("train", cfg), scene_features("test", cfg)
budget = scaling.budgets(cfg)
print(f"{len(train.texts)} training pairs; {budget['epochs']} epochs per run; budgets: {budget}")

# %% [markdown]
# ## 1. More candidates per positive
#
# To isolate the number of candidates from everything else, we keep the batch size, the steps, the
# initial weights and the learning rate fixed and only cut each batch of $B$ pairs into equal parts: the
# InfoNCE of each part sees only that part's captions as candidates, and the loss is the mean over parts
# ([`scaling.local_negatives_loss`](#mmalign.experiments.scaling.local_negatives_loss)). With two parts this is precisely what two processes compute when they do
# *not* gather (section 2).

# %%
sweep = scaling.negatives_sweep(train, test, cfg, budget["negatives"], budget["epochs"])
from mmalign.plots import results_table_html

display(HTML(results_table_html(sweep)))

# %%
cands = list(budget["negatives"])
fig, ax = plt.subplots(figsize=(5, 3.2))
ax.plot(cands, [sweep[f"{k} candidates"]["rsum"] for k in cands], "o-")
ax.set(xscale="log", xlabel="candidates per positive (log scale)", ylabel="test rsum",
       title=f"batch {cfg.batch_size}, {budget['epochs']} epochs")
ax.set_xticks(cands, [str(k) for k in cands])
plt.show()

# %% [markdown]
# In this run, few candidates hurt: with 4 candidates the positive is easy to pick and the loss stops
# pushing the embedding apart from the many other scenes it will meet at test time (the assert cell at the
# end checks that 4 candidates trail the whole batch by more than 5 rsum in this run). **This live sweep is
# one run** (the CI profile trains one seed), and the course's rule (paired per-seed differences,
# [`paired_difference`](#mmalign.experiments.seeds.paired_difference)) measures nothing on one seed. The
# reference run trains the sweep on three seeds; its paired verdicts, at the end of the chapter, say which
# steps up in candidates are measured gains and which are not.
#
# ### Softmax or sigmoid, as the batch shrinks and grows
#
# InfoNCE is a softmax over the batch: each positive competes with the $B-1$ other candidates of its row,
# so what one pair contributes depends on the whole row. The sigmoid loss of SigLIP (Zhai et al., 2023)
# instead makes every (image, caption) pair a binary "match or not" problem of its own. With
# $s_{ij} = \cos(a_i, b_j)$, $z_{ij} = +1$ for a positive pair and $-1$ otherwise,
#
# $$\mathcal{L}_{\text{sigmoid}} = -\frac{1}{B}\sum_{i=1}^{B}\sum_{j=1}^{B}
#   \log \sigma\big(z_{ij}\,(s_{ij}/\tau + b)\big),$$
#
# with a learned temperature $\tau$ (the paper learns $t = 1/\tau$, starting at 10) and a learned bias $b$
# (starting at $-10$, so that the many negative pairs do not swamp the first steps). No term needs a sum over
# the row, which is what lets the paper compute the loss block by block across devices
# ([`gathered_siglip_loss`](#mmalign.dist.gathered_siglip_loss)).
#
# **What the paper reports** (Zhai et al., 2023, on billions of web image-text pairs): the sigmoid loss is
# clearly better than the softmax loss at small batch sizes, the gap closes as the batch grows, and past a
# batch of about 32k neither gains much more (they push the batch up to one million).
#
# **Our protocol**: the chapter's heads trained with each loss at a few batch sizes, the same number of
# epochs for every batch (so the same examples seen: a small batch takes more steps), the profile's learning
# rate, the same initial weights and data order for every loss. [`siglip_loss`](#mmalign.losses.siglip.siglip_loss)
# learns $\tau$ and $b$ from the paper's starting values; InfoNCE is run twice, with a learned temperature
# starting at CLIP's 0.07 (the paper's softmax baseline also learns it) and with the chapter's fixed
# $\tau = 0.07$. The learned temperature and bias live outside the model and are trained (and checkpointed)
# by `fit` as parameters of the optimizer ([`loss_variant`](#mmalign.experiments.scaling.loss_variant)).

# %%
losses = scaling.softmax_vs_sigmoid(train, test, cfg, budget["loss_batches"], budget["epochs"])
pd.DataFrame(losses).T[["i2t_R@1", "t2i_R@1", "rsum", "τ after training", "b after training"]].round(
    {"i2t_R@1": 1, "t2i_R@1": 1, "rsum": 1, "τ after training": 3, "b after training": 2})

# %%
def by_batch(rows, name, key="rsum"):
    """{batch size: value} of one loss's rows."""
    return {int(r.rsplit(" ", 1)[1]): v[key] for r, v in rows.items() if r.startswith(name + ", batch ")}


fig, ax = plt.subplots(figsize=(5.5, 3.3))
for name in scaling.LOSS_VARIANTS:
    curve = by_batch(losses, name)
    ax.plot(list(curve), list(curve.values()), "o-", label=name)
ax.set(xscale="log", xlabel="batch size (log scale)", ylabel="test rsum", title=f"{budget['epochs']} epochs at every batch size")
ax.set_xticks(list(budget["loss_batches"]), [str(b) for b in budget["loss_batches"]])
ax.legend(frameon=False, fontsize=8)
plt.show()

# %% [markdown]
# This live table is **one run** per loss and batch size, so it measures no difference between the losses;
# read it for the shape of the curves. The three-seed reference run at the end of the chapter compares
# the losses seed by seed at every batch size and says whether our data agrees with the paper.
#
# ## 2. Gathering negatives across processes
#
# With $W$ processes, process $r$ computes the embeddings $a^{(r)}, b^{(r)}$ of its $n = B/W$ pairs. An
# **all-gather** concatenates every process's embeddings in rank order, so each process holds the full
# $B \times D$ matrices $A, B$ and can compute the single-process loss ([`gathered_info_nce`](#mmalign.dist.gathered_info_nce)). Two details make it exact:
#
# * **the gradient crosses processes.** A plain `all_gather` is not differentiable: the other processes'
#   rows are constants. [`mmalign.dist.all_gather`](#mmalign.dist.all_gather) is an autograd function whose backward *sums* the gradient
#   of the gathered matrix over processes and returns each process its own rows. Every process computes the
#   same global loss $L$, so process $r$ receives $W\,\partial L/\partial a^{(r)}$, and averaging parameter
#   gradients over the $W$ processes (what DDP and [`mmalign.train.fit`](#mmalign.train.fit) do) gives exactly $\partial L/\partial\theta$.
#   Detaching the other rows instead gives $\frac1W\,\partial L/\partial\theta$, a silent bug that
#   `tests/test_dist.py` checks for.
# * **labels carry the rank offset.** Row $i$ of process $r$ is row $rn + i$ of the gathered matrix; its
#   positive is column $rn + i$, not $i$. With scene ids the ids are gathered too ([`all_gather_ids`](#mmalign.dist.all_gather_ids)), so a caption of the same
#   scene held by another process is a positive, never a negative.

# %%
import inspect

from mmalign import dist

print(inspect.getsource(dist.gathered_info_nce))

# %% [markdown]
# [`mmalign.experiments.scaling_worker`](#mmalign.experiments.scaling_worker) is a small script that every process runs: it trains the chapter-2 heads through the
# course's one training loop, `mmalign.train.fit`, which under `torchrun` gives each process its part of every
# seeded global batch, averages gradients through PyTorch's `DistributedDataParallel` during the backward
# pass, reports losses averaged over processes and lets rank 0 alone evaluate and write checkpoints. It trains twice with the same global batch: **local** negatives (each
# process's InfoNCE sees its $B/2$ pairs) and **gathered** negatives. We launch it on 2 CPU processes:

# %%
workdir = tempfile.TemporaryDirectory()
demo = scaling.launch_demo(cfg, workdir.name, budget["epochs"], budget["demo_batch"], budget["timing_sizes"])
print(demo["command"])
print(f"world size {demo['world_size']}, backend {demo['backend']}, global batch {demo['batch_size']}")

# %% [markdown]
# Now one process trains the same two things: the whole batch (what gathering should equal) and the batch
# cut into 2 parts (what local negatives should equal), and we compare the weights.

# %%
twins = scaling.one_process_twins(train, test, cfg, workdir.name, budget["epochs"], budget["demo_batch"])
rows = {}
for name in ("local", "gathered"):
    rows[f"2 processes, {name}"] = demo["runs"][name]["test"]
    rows[f"1 process, {'batch in 2 parts' if name == 'local' else 'whole batch'}"] = twins[name]["test"]
display(HTML(results_table_html(rows)))
pd.DataFrame({name: {"max |weight difference|": t["max |weight difference|"], "max |weight|": t["max |weight|"]}
              for name, t in twins.items()}).T

# %% [markdown]
# The 2-process runs end with the weights of their 1-process twins up to float32 rounding (the gradients are
# summed in another order), and so with the same recalls. Gathering is therefore not an approximation:
# it *is* the large-batch loss, spread over processes. Without it, 2 processes train the "2 parts" model,
# which has half the candidates per positive.
#
# ## 3. What gathering costs
#
# Each step of gathered training adds collectives to the compute: the all-gather of the embeddings (and,
# in the backward, an all-reduce of the gathered gradient), and the all-reduce of the parameter gradients
# that any data-parallel training needs. The demo timed each part for a few local batch sizes (median of
# 10 repeats, milliseconds, rank 0):

# %%
timing = pd.DataFrame(demo["timing_ms"]).T.rename_axis("local batch n")
from mmalign.recipes import make_dual_encoder

n_params = sum(p.numel() for p in make_dual_encoder(train, cfg.embed_dim).parameters())
print(f"embedding width D = {cfg.embed_dim}; the heads have {n_params:,} parameters (the gradient all-reduce moves that many floats)")
display(timing.round(2))
ax = timing.plot.bar(figsize=(6.5, 3.2), logy=True, rot=0)
ax.set(ylabel="ms (log scale)", title="one step, 2 CPU processes over gloo")
plt.show()

# %% [markdown]
# The embeddings are small ($n \times D$ floats per process) and so are the heads' gradients (the count is
# printed above the table), so on one machine the collectives are latency-bound: compare their columns with
# the compute column as $n$ grows. The gathered loss also does more compute: each
# process scores a $B \times B$ matrix instead of $B/W \times B/W$. On GPUs NCCL moves the same tensors over
# NVLink or InfiniBand; large-scale recipes (open_clip's `local_loss`) score only the local rows against
# the gathered columns, $B/W \times B$, which `gathered_info_nce(local_loss=True)` (and our lab) implements.
#
# ### Memory: the global loss against the local loss
#
# In the global form every process builds the same gathered logits, $B \times B$ numbers (the caption-to-image
# direction is its transpose, a view), and computes the whole loss: $4B^2$ bytes a process in float32, whatever
# $W$. In the **local** form, process $r$ scores only its own $n = B/W$ rows of each view against the $B$
# gathered columns of the other, $2nB = 2B^2/W$ numbers, with the positives of its rows at columns
# $rn + i$. This is what open_clip does: in `src/open_clip/loss.py`, `ClipLoss(local_loss=True)` computes
# `logits_per_image = logit_scale * image_features @ all_text_features.T` and
# `logits_per_text = logit_scale * text_features @ all_image_features.T` (each $n \times B$) with the labels
# `arange(n) + n * rank`, and averages the cross-entropy over its $n$ rows; with `gather_with_grad=True` the
# gathered features carry the gradient back to the processes they came from. Each process's loss is then
# $W$ times its share of the global loss, so the mean over processes is the global loss and the gradients
# that DDP averages are the global form's. [`gathered_info_nce`](#mmalign.dist.gathered_info_nce) with
# `local_loss=True` computes the same (and builds the positive and mined-negative masks for its rows only).
#
# The count says the logits shrink by $2/W$: nothing at $W = 2$, half at $W = 4$. At CLIP's batch of 32,768
# on 8 processes:

# %%
from mmalign.experiments.scaling_worker import logits_bytes

print(f"B = 32,768 on 8 processes, float32 logits per process: global {logits_bytes(32768, 8, False) / 1e9:.1f} GB, "
      f"local {logits_bytes(32768, 8, True) / 1e9:.1f} GB")

# %% [markdown]
# The logits are not the whole peak: the log-softmax of each direction, the masks of the positives and the
# gradients of the backward pass come on top. So we measure: [`local_loss_memory`](#mmalign.experiments.scaling.local_loss_memory)
# launches $W$ gloo processes under `torchrun`; each runs one forward and backward pass of both forms on random
# embeddings (width $D$ = the profile's) and records its peak memory held by tensors (the torch profiler's
# allocation timeline, as in section 5), the logits' bytes counted as above, and the largest difference
# between the two forms' gradients. The columns are the largest value over the processes. (Each launch
# starts $W + 1$ Python processes, seconds each: the CI profile measures 4 processes, the reference run at
# the end 2 and 4.)

# %%
memory = {w: scaling.local_loss_memory(budget["memory_batches"], w, budget["memory_dim"]) for w in budget["memory_worlds"]}
mem = pd.concat({f"W = {w}": pd.DataFrame(m["sizes"]).T for w, m in memory.items()}).rename_axis(["processes", "global batch B"])
mem["local / global peak"] = mem["local: peak MB"] / mem["global: peak MB"]
display(mem.drop(columns=["max |gradient|"]).style.format("{:.3g}"))

# %%
fig, axes = plt.subplots(1, len(memory), figsize=(4.5 * len(memory), 3.2), sharey=True, squeeze=False)
for ax, (w, m) in zip(axes[0], memory.items()):
    by_b = pd.DataFrame(m["sizes"]).T
    by_b.index = by_b.index.astype(int)
    for col, style in (("global: peak MB", "o-"), ("local: peak MB", "s-"), ("global: logits MB", "o:"),
                       ("local: logits MB", "s:")):
        ax.plot(by_b.index, by_b[col], style, label=col)
    ax.set(xscale="log", yscale="log", xlabel="global batch B", title=f"{w} processes, D = {budget['memory_dim']}")
axes[0, 0].set_ylabel("MB per process")
axes[0, 0].legend(frameon=False, fontsize=7)
plt.show()

# %% [markdown]
# Both forms give the same gradients: the largest difference is at float32 rounding (the column
# "max |gradient difference|", against gradients of the size of "max |gradient|" in `memory`). At the largest
# batch, on 4 processes, the local form's peak is under half of the global form's. In the reference run (at
# the end) it is below the global form's on 2 processes already, although there their logits are the same
# size (the global form also holds the log-softmax of both directions of a $B \times B$ matrix), and the
# saving grows with $W$: the global peak is the same on 2 and on 4 processes (within 10 %), the local one is
# lower on 4 than on 2.

# %%
def check_memory_claims(memory: dict, top_b: str) -> None:
    """The claims above, on the runs of ``memory`` ({processes: local_loss_memory output}) at batch ``top_b``."""
    at = {int(w): m["sizes"][top_b] for w, m in memory.items()}
    for w, row in at.items():
        assert row["max |gradient difference|"] <= 1e-5 * row["max |gradient|"], (w, row)  # the same gradients
        assert row["local: peak MB"] < row["global: peak MB"], (w, row)
    if 4 in at:
        assert at[4]["local: peak MB"] < 0.5 * at[4]["global: peak MB"], at[4]
    if 2 in at:
        assert at[2]["local: logits MB"] == at[2]["global: logits MB"], at[2]
    if 2 in at and 4 in at:
        assert abs(at[4]["global: peak MB"] - at[2]["global: peak MB"]) < 0.1 * at[2]["global: peak MB"], at
        assert at[4]["local: peak MB"] < at[2]["local: peak MB"], at


check_memory_claims(memory, str(max(budget["memory_batches"])))

# %% [markdown]
# When even the local logits, or the activations of the encoders, do not fit, [`grad_cache_loss`](#mmalign.train.grad_cache_loss)
# (Gao et al., 2021) trains the large batch in chunks: it embeds the batch chunk by chunk without a graph,
# computes the loss and its gradient with respect to the embeddings on the whole batch, then runs each chunk
# again and back-propagates its slice of that gradient. The result is the full-batch gradient, on one
# process and under `torchrun` with a gathered loss (tests/test_gradcache.py checks both against the
# full batch on one process).
#
# What it saves is the encoders' activations: only one chunk's graph exists at a time, while the loss still
# sees all $B$ embeddings. We measure one step of two small towers (a 2,048-wide hidden layer each, so that
# activations, not weights, dominate) on a batch of 2,048 pairs, as one full batch and with GradCache in
# chunks of 1,024 and 256: the peak memory held by tensors (the torch profiler, as above) and the largest
# difference from the full batch's gradients; and, for comparison, the loss alone on 2,048 fixed embeddings.

# %%
from mmalign.losses import info_nce
from mmalign.train import grad_cache_loss


def two_towers(seed: int = 0) -> torch.nn.ModuleDict:
    torch.manual_seed(seed)
    return torch.nn.ModuleDict({m: torch.nn.Sequential(torch.nn.Linear(384, 2048), torch.nn.GELU(), torch.nn.Linear(2048, 128))
                                for m in ("image", "text")})


gen = torch.Generator().manual_seed(0)
x_img, x_txt = torch.randn(2048, 384, generator=gen), torch.randn(2048, 384, generator=gen)


def gradcache_step(chunk: int | None) -> dict:
    """Peak memory of one step (None: the plain full batch) and the gradients it leaves."""
    model = two_towers()

    def step():
        if chunk is None:
            loss = info_nce(model["image"](x_img), model["text"](x_txt), temperature=0.07)
        else:
            loss = grad_cache_loss(lambda a, b: (model["image"](a), model["text"](b)),
                                   lambda zi, zt: info_nce(zi, zt, temperature=0.07), (x_img, x_txt),
                                   chunk_size=chunk, params=model.parameters())
        loss.backward()

    peak = scaling.peak_memory_bytes(step) / 2**20
    return {"peak MB": peak, "grads": [p.grad.clone() for p in model.parameters()]}


def loss_alone() -> dict:
    """Peak memory of the loss on the whole batch's embeddings alone (fixed random embeddings, no encoders)."""
    zi, zt = torch.randn(2048, 128, generator=gen), torch.randn(2048, 128, generator=gen)

    def step():
        info_nce(zi.requires_grad_(), zt.requires_grad_(), temperature=0.07).backward()

    return {"peak MB": scaling.peak_memory_bytes(step) / 2**20}


cache_runs = {"full batch": gradcache_step(None), "GradCache, chunks of 1024": gradcache_step(1024),
              "GradCache, chunks of 256": gradcache_step(256)}
loss_peak = loss_alone()["peak MB"]
full_grads = cache_runs["full batch"]["grads"]
cache_table = pd.DataFrame({name: {"peak MB": r["peak MB"],
                                   "max |grad - full batch grad|": max(float((g - f).abs().max()) for g, f in zip(r["grads"], full_grads))}
                            for name, r in cache_runs.items()}).T
cache_table.loc["the loss alone, whole batch (no encoders)"] = [loss_peak, float("nan")]
cache_table.style.format({"peak MB": "{:.0f}", "max |grad - full batch grad|": "{:.1e}"})

# %% [markdown]
# The gradients are the full batch's up to float32 rounding, and GradCache's peak is under half of the full
# batch's. It sits just above the peak of the loss alone on the whole batch's embeddings (last row): the
# chunks' encoder passes now hold less than the loss does, so smaller chunks (256 against 1,024) save nothing
# more here. What is left is the loss's own $B \times B$ logits and their gradients, which no chunking of the
# encoders removes; across processes, the local loss above shrinks them. The price is time: every chunk runs
# its encoders twice.

# %%
largest = max(float(g.abs().max()) for g in full_grads)
cached = cache_table.loc[["GradCache, chunks of 1024", "GradCache, chunks of 256"]]
assert (cached["max |grad - full batch grad|"] <= 1e-5 * largest).all(), cache_table
assert (cached["peak MB"] < 0.5 * cache_table.loc["full batch", "peak MB"]).all(), cache_table
assert ((cached["peak MB"] >= loss_peak) & (cached["peak MB"] <= 1.15 * loss_peak)).all(), cache_table
assert abs(cached["peak MB"].iloc[1] - cached["peak MB"].iloc[0]) < 0.05 * cached["peak MB"].iloc[0], cache_table

# %% [markdown]
# ## 4. Mixed precision and the float32-logits rule
#
# Autocast runs matrix products in float16 or bfloat16. float16 has 10 mantissa bits and a largest value
# of 65,504, so $e^{s}$ overflows to `inf` once $s > \ln 65504 \approx 11.09$. A contrastive logit is a cosine
# divided by the temperature: at $\tau = 0.07$ a cosine of 0.8 already gives 11.4, at $\tau = 0.01$ it gives 80.
# A hand-written softmax $e^{s_{ii}} / \sum_j e^{s_{ij}}$ then computes $\infty / \infty$ = NaN. bfloat16 has
# float32's range (no overflow below 88.7) but only 7 mantissa bits, so its logits are coarse.
#
# The course's rule: **logits in float32, and log-softmax (logsumexp), never a hand-written exp/sum.**
# [`mmalign.retrieval.similarity`](#mmalign.retrieval.similarity) turns autocast off and upcasts, so every loss built on it gets float32 logits
# even inside an autocast region. The table: one batch of 64 aligned pairs (positive cosine about 0.6),
# the logits kept in each dtype, and the error of the log-softmax loss against float64 (for [`info_nce`](#mmalign.losses.info_nce.info_nce), the
# symmetric loss against its own float64 value).

# %%
overflow = pd.DataFrame(scaling.overflow_table()).T
overflow

# %% [markdown]
# The hand-written softmax is NaN with float16 logits at both temperatures (the largest logit is above 11.09
# even at $\tau = 0.07$), and with bfloat16 logits the log-softmax is further from float64 than with float16.
# `info_nce` on float16 *inputs* is finite, float32, and close to float64: the inputs may be half precision,
# the logits may not.
#
# Speed: the same 30 steps of the chapter-2 heads through `fit`, without autocast and with bfloat16 autocast
# (`fit(..., amp="bf16")`; on CUDA `amp="fp16"` adds a GradScaler, which multiplies the loss before backward
# so that small float16 gradients do not flush to zero, and unscales before the optimizer step).

# %%
amp = pd.DataFrame(scaling.amp_speed(train, cfg, budget["amp_steps"])).T
amp

# %% [markdown]
# Whether autocast is faster depends on the hardware: CPUs without bfloat16 matrix instructions convert
# back and forth and may well be slower, and these heads are tiny. Read this machine's answer in the table;
# on a GPU the `gpu` profile turns autocast on by default (float16 with a GradScaler).
#
# ## 5. Retrieval on large galleries
#
# Recall@K needs every query's rank among the whole gallery. Scoring all $Q$ queries at once needs a $Q \times G$
# float32 matrix; `mmalign.retrieval` scores chunks of queries (and frees each chunk's scores before the
# next), so the memory is $\text{chunk} \times G$ and the result is identical. Peak memory held by tensors (measured with the torch
# profiler on CPU, `torch.cuda.max_memory_allocated` on a GPU), for random queries and galleries (sizes in
# the plot's title):

# %%
gallery = pd.DataFrame(scaling.gallery_memory(budget["gallery_sizes"], budget["gallery_queries"],
                                              budget["gallery_dim"], budget["chunk"])).T
gallery.index = gallery.index.astype(int)
display(gallery.round(2))
fig, ax = plt.subplots(figsize=(5.5, 3.3))
for col in gallery.columns:
    if col.endswith("peak MB") or col.startswith("score matrix"):
        ax.plot(gallery.index, gallery[col], "o-", label=col)
ax.set(xlabel="gallery size G", ylabel="MB", title=f"{budget['gallery_queries']} queries, D = {budget['gallery_dim']}")
ax.legend(frameon=False, fontsize=8)
plt.show()

# %% [markdown]
# Both grow linearly with the gallery, but the chunked one with a slope set by the chunk, not by the number
# of queries. For the scale of the benchmark (20,000 images against 100,000 captions) the arithmetic of the
# last column:

# %%
print(f"score matrix of 20,000 x 100,000 in float32: {20_000 * 100_000 * 4 / 2**30:.1f} GiB at once, "
      f"{budget['chunk'] * 100_000 * 4 / 2**20:.0f} MiB per chunk of {budget['chunk']} queries")

# %% [markdown]
# Past a few million items one stops scoring exhaustively and uses an approximate index (e.g. FAISS,
# Johnson et al., 2019).
#
# ## 6. Against the libraries a researcher would pick instead
#
# `make bench` (`benchmarks/bench.py`, with the optional `bench` extra installed) runs mmalign side by side
# with pytorch-metric-learning, faiss, torch-optimizer and POT on the same inputs, checks that the results
# are equal before timing, and writes the medians to `results/bench.json`. Each contender runs in a fresh
# process of its own: faiss ships its own OpenMP runtime, and beside torch in one process it slowed torch's
# small operations up to 80 times on this machine. `peer/ours` above 1 means ours is faster; `ours/floor`
# compares with the least plain-torch work that computes the same thing. The committed file, as it was
# measured (a row that missed a target says which and by how much):

# %%
import json

from mmalign.config import results_dir

bench_path = results_dir() / "bench.json"
if bench_path.exists():
    bench = json.loads(bench_path.read_text())
    flat = {}
    for section, runs in bench["results"].items():
        for size, r in runs.items():
            if isinstance(r, dict) and "ours_s" in r:
                flat[f"{section}, {size}"] = {
                    "ours (ms)": 1000 * r["ours_s"],
                    **{k: v for k, v in r.items() if "/" in k and isinstance(v, float)},
                    "targets met": r["targets met"], "missed": r.get("missed", "")}
    print(f"{bench['date']}, {bench['machine']}, median of {bench['repeats']}; targets: {bench['targets']}")
    display(pd.DataFrame(flat).T.round(2))
else:
    print("results/bench.json is missing: run `make bench`")

# %% [markdown]
# Three rows miss a target, and the file says why. **Recall against faiss**: faiss's exact search is a BLAS
# matrix product plus a heap per block of queries, ours the same product in torch plus a top-k, and torch's
# similarity matrices alone, with no ranking at all, take longer on the large gallery than faiss's whole
# search: the difference is the matrix product (faiss-cpu's OpenBLAS against torch's MKL on this CPU), not
# the ranking. **LAMB against torch-optimizer**: torch-optimizer fuses "multiply and add" into one rounding
# (an FMA), ours keeps the two operations so that its update is the written-out formula bit for bit.
# **All semi-hard triplets against the floor**: ours is faster than PML, but on random embeddings nearly every
# negative is semi-hard, so the miner's index table is as large as the masked matrix the floor sums.

# %%
if bench_path.exists():
    recall = bench["results"]["recall"]["20000 images x 100000 captions"]
    print(f"large gallery: torch's matrices alone {recall['gemm_s']:.1f} s, faiss's whole search {recall['faiss_s']:.1f} s, "
          f"ours {recall['ours_s']:.1f} s, the plain torch floor {recall['floor_s']:.1f} s")
    missed = {section for section, runs in bench["results"].items()
              if any(isinstance(r, dict) and r.get("targets met") is False for r in runs.values())}
    assert missed == {"recall", "lamb", "triplet_semihard"}, missed  # the three rows named above
    assert recall["gemm_s"] > recall["faiss_s"] and recall["ours/floor"] < 1.1, recall
    assert all(r["pml/ours"] > 1 for r in bench["results"]["triplet_semihard"].values())
    print("why:", {section: next(r["why"] for r in runs.values() if "why" in r)
                   for section, runs in bench["results"].items() if any(isinstance(r, dict) and "why" in r for r in runs.values())})

# %% [markdown]
# ## 7. The `gpu` profile
#
# `MMALIGN_PROFILE=gpu` is the third profile: larger data, batch and embedding, CUDA, autocast on. Nothing
# else changes: every chapter reads the profile once, `fit` moves batches to the device, the losses keep
# float32 logits, retrieval follows its inputs' device. The sizes:

# %%
from mmalign.config import _PROFILE_SIZES

pd.DataFrame({name: sizes for name, sizes in _PROFILE_SIZES.items()}).T[
    ["n_train", "n_val", "n_test", "batch_size", "epochs", "embed_dim"]]

# %% [markdown]
# On a GPU machine:
#
# ```bash
# MMALIGN_PROFILE=gpu make data                  # render the larger world and cache its features
# MMALIGN_PROFILE=gpu make book                  # run every chapter on the GPU
# MMALIGN_PROFILE=gpu python -m mmalign.experiments 02   # one chapter's reference table
# torchrun --nproc_per_node=8 -m mmalign.experiments.scaling_worker --out runs/   # 8 GPUs: NCCL, one GPU per process
# ```
#
# [`mmalign.dist.init()`](#mmalign.dist.init) picks NCCL when CUDA is present and gloo otherwise, and gives each process the GPU
# `LOCAL_RANK`. `MMALIGN_DEVICE=cpu` forces the CPU on a GPU machine. A GPU-less machine asking for the `gpu`
# profile gets an error that says so, rather than a silent CPU run.

# %%
# The claims of this chapter, checked on every run (CI included).
from mmalign.retrieval import chance_recall

chance = 100 * chance_recall(len(test.texts), test.world.captions_per_image, 1)
for name, row in {**sweep, **losses, **rows}.items():  # every run learns, far above chance
    assert row["i2t_R@1"] > 10 * chance, (name, row["i2t_R@1"], chance)
# few candidates per positive trail the whole batch
assert sweep["4 candidates"]["rsum"] < sweep[f"{cfg.batch_size} candidates"]["rsum"] - 5, sweep
# 2 processes with gathered negatives = 1 process on the whole batch; without gathering = the batch in 2 parts
for name, t in twins.items():
    assert t["max |weight difference|"] < 1e-4 * max(1.0, t["max |weight|"]), (name, t)
    assert abs(t["test"]["rsum"] - demo["runs"][name]["test"]["rsum"]) < 1.0, (name, t["test"], demo["runs"][name])
# the 2-part run is the sweep's B/2-candidates run (same computation, same seed)
assert abs(twins["local"]["test"]["rsum"] - sweep[f"{cfg.batch_size // 2} candidates"]["rsum"]) < 1.0
# float16: the hand-written softmax overflows at both temperatures; float32 log-softmax and info_nce do not
for tau in (0.07, 0.01):
    assert overflow.loc[f"float16 logits, tau={tau}", "max logit"] > 11.09
    assert pd.isna(overflow.loc[f"float16 logits, tau={tau}", "hand-written softmax"])
    assert overflow.loc[f"float32 logits, tau={tau}", "|log-softmax - float64|"] < 1e-5
    info = overflow.loc[f"info_nce on float16 inputs, tau={tau}"]
    assert info["loss dtype"] == "torch.float32" and info["|log-softmax - float64|"] < 1e-3
    assert (overflow.loc[f"bfloat16 logits, tau={tau}", "|log-softmax - float64|"]
            > overflow.loc[f"float16 logits, tau={tau}", "|log-softmax - float64|"])
assert overflow.loc["float16 logits, tau=0.01", "max logit"] > 50
assert amp["all losses finite"].all() and amp["loss is float32"].all()
# chunked retrieval: less memory than scoring at once, and at once needs at least the score matrix
largest = gallery.iloc[-1]
assert largest[f"chunks of {budget['chunk']}: peak MB"] < largest["all at once: peak MB"] / 2, largest
assert largest["all at once: peak MB"] >= largest["score matrix MB (float32)"], largest

# %% [markdown]
# ### Reference numbers (full profile)
#
# `make results CHAPTER=09` runs the same experiment in the **full** profile and writes
# `results/09_scaling.json`. The candidates sweep and the softmax-vs-sigmoid runs are trained on three seeds
# (the same seeds for every row: a seed fixes the initial weights and the data order); the 2-process demo, the
# memory, the timings and the gallery run once. Test recalls, mean ± standard deviation over the seeds:

# %%
from mmalign.experiments import load_results
from mmalign.experiments.seeds import mean_std_frame, paired_difference, per_seed_values

reference = load_results("09")
print(f"profile={reference['profile']}  date={reference['date']}  seeds={reference['seeds']}  "
      f"sizes={reference['sizes']}\nmachine: {reference['machine']}  ({reference['seconds']} s)")
mean_std_frame(reference["table"], reference["std"], columns=["i2t_R@1", "t2i_R@1", "rsum"])

# %% [markdown]
# Every verdict below follows the course's one evidence rule ([`paired_difference`](#mmalign.experiments.seeds.paired_difference)):
# a comparison "a vs b" is the per-seed difference of test rsum $d_s = a_s - b_s$; it is **measured** ("higher"
# or "lower") only when every seed's difference has the same sign and the mean difference is more than twice
# its standard error, otherwise "no measured difference". The tables print the paired numbers behind each
# verdict.

# %%
def paired(a: str, b: str, key: str = "rsum"):
    return paired_difference(per_seed_values(reference, a, key), per_seed_values(reference, b, key))


def verdict_table(comparisons: dict) -> pd.DataFrame:
    return pd.DataFrame({c: {"mean a - b": round(d.mean, 2), "sd": round(d.std, 2), "se": round(d.se, 2), "seeds a > b": d.higher,
                             "seeds a < b": d.lower, "verdict": d.verdict} for c, d in comparisons.items()}).T


ref_cands = list(reference["budgets"]["negatives"])
cand_row = {k: f"{k} candidates (1 process)" for k in ref_cands}
steps_up = {f"{b} vs {a} candidates": paired(cand_row[b], cand_row[a]) for a, b in zip(ref_cands, ref_cands[1:])}
steps_up[f"{ref_cands[-1]} vs {ref_cands[0]} candidates"] = paired(cand_row[ref_cands[-1]], cand_row[ref_cands[0]])
verdict_table(steps_up)

# %% [markdown]
# **The candidates sweep, by the paired rule.** Every step up in candidates is a measured gain in the reference
# run: from 4 to 16, from 16 to half the batch and from half the batch to the whole batch, each on all three
# seeds and by more than twice its standard error (the table gives the numbers). The last step, doubling the
# candidates from $B/2$ to $B$, gains the least of the three, but it is a measured gain, not run-to-run
# noise. It is also what gathering buys over two processes that do not gather: their 2-part run is the
# $B/2$-candidates row (section 2).

# %%
assert all(d.verdict == "higher" and d.higher == d.n == 3 for d in steps_up.values()), steps_up
last_step = steps_up[f"{ref_cands[-1]} vs {ref_cands[-2]} candidates"]
assert all(last_step.mean < steps_up[f"{b} vs {a} candidates"].mean for a, b in zip(ref_cands[:-2], ref_cands[1:-1]))

# %% [markdown]
# **Softmax against sigmoid, three seeds.** Mean test rsum at each batch size (the error bars are the standard
# deviation over seeds), and the paired verdicts at each batch size:

# %%
ref_batches = list(reference["budgets"]["loss_batches"])
fig, ax = plt.subplots(figsize=(5.5, 3.3))
for name in scaling.LOSS_VARIANTS:
    mean, spread = by_batch(reference["table"], name), by_batch(reference["std"], name)
    ax.errorbar(list(mean), list(mean.values()), yerr=list(spread.values()), fmt="o-", capsize=3, label=name)
ax.set(xscale="log", xlabel="batch size (log scale)", ylabel="test rsum",
       title=f"full profile, {reference['budgets']['epochs']} epochs, {len(reference['seeds'])} seeds")
ax.set_xticks(ref_batches, [str(b) for b in ref_batches])
ax.legend(frameon=False, fontsize=8)
plt.show()

sig, soft, fixed = scaling.SIGMOID_LEARNED, scaling.SOFTMAX_LEARNED, scaling.SOFTMAX_FIXED
loss_verdicts = {}
for bs in ref_batches:
    loss_verdicts[f"SigLIP vs InfoNCE learned τ, batch {bs}"] = paired(f"{sig}, batch {bs}", f"{soft}, batch {bs}")
    loss_verdicts[f"SigLIP vs InfoNCE τ = 0.07, batch {bs}"] = paired(f"{sig}, batch {bs}", f"{fixed}, batch {bs}")
    loss_verdicts[f"InfoNCE learned τ vs τ = 0.07, batch {bs}"] = paired(f"{soft}, batch {bs}", f"{fixed}, batch {bs}")
verdict_table(loss_verdicts)

# %% [markdown]
# **What our data says.** Against InfoNCE with a learned temperature, the paper's softmax baseline, SigLIP is
# higher on every seed at batches 16, 64 and 256 (by 10 to 14 rsum) and no difference is measured at 1,024:
# the shape the paper reports, sigmoid ahead at small batches and the two together at large ones. The
# chapter's InfoNCE with its fixed $\tau = 0.07$ tells a different story: against it SigLIP is measured higher
# only at batch 64, by under 5 rsum, and no difference is measured at 16, 256 or 1,024. What separates the two
# InfoNCE rows is the learned temperature: at 16, 64 and 256 it ends below 0.07 and its runs are lower than the
# fixed-$\tau$ runs on every seed; at 1,024 it ends closest to 0.07 and no difference is measured. SigLIP's
# bias hardly moves from its starting $-10$ (it ends within 1 of it at every batch size).
#
# So our data agrees with the paper where the paper's comparison is made (both losses learn their
# temperature), and mostly disagrees once the softmax temperature is tuned. Why, in the four places a result
# can come from:
#
# * **protocol**: the same epochs at every batch size, so the batch of 1,024 takes about 1/64 of the steps of
#   the batch of 16, and a learned temperature moves less in fewer steps: part of "the gap closes at large
#   batches" is here "the temperature had less time to drift". The paper trains on billions of examples, at
#   batches of thousands up to a million (its saturation around 32k lies far beyond anything we can run), and
#   compares each batch size after the same number of examples seen;
# * **models**: two linear heads on frozen features, not image and text encoders trained from scratch;
# * **data**: 15,000 synthetic captions of 5,000 scenes with three captions each (several positives per row),
#   not web image-text pairs with one positive per row;
# * **method**: on our data the learned temperature drops below the tuned value and hurts InfoNCE at small and
#   medium batches; the sigmoid loss, with the same kind of learned temperature plus a bias, does not suffer
#   from it. Whether sigmoid is better "at small batches" then depends on whether the softmax temperature is
#   learned (yes, here) or tuned (a measured difference only at batch 64, here).

# %%
v = {c: d.verdict for c, d in loss_verdicts.items()}
small = [b for b in ref_batches if b < max(ref_batches)]
for bs in small:
    assert v[f"SigLIP vs InfoNCE learned τ, batch {bs}"] == "higher"
    assert 10 <= loss_verdicts[f"SigLIP vs InfoNCE learned τ, batch {bs}"].mean <= 14
    assert v[f"InfoNCE learned τ vs τ = 0.07, batch {bs}"] == "lower"
    assert reference["table"][f"{soft}, batch {bs}"]["τ after training"] < scaling.TEMPERATURE
top = max(ref_batches)
assert v[f"SigLIP vs InfoNCE learned τ, batch {top}"] == "no measured difference"
assert v[f"InfoNCE learned τ vs τ = 0.07, batch {top}"] == "no measured difference"
assert [b for b in ref_batches if v[f"SigLIP vs InfoNCE τ = 0.07, batch {b}"] != "no measured difference"] == [64]
assert v["SigLIP vs InfoNCE τ = 0.07, batch 64"] == "higher" and loss_verdicts["SigLIP vs InfoNCE τ = 0.07, batch 64"].mean < 5
taus = by_batch(reference["table"], soft, "τ after training")
assert max(taus, key=taus.get) == top  # the learned temperature ends closest to 0.07 at the largest batch
assert all(abs(b + 10) < 1 for b in by_batch(reference["table"], sig, "b after training").values())
# the protocol and data facts of the list below
n_pairs = reference["sizes"]["n_train"] * test.world.captions_per_image
steps = {b: reference["budgets"]["epochs"] * (n_pairs // b) for b in ref_batches}
assert (reference["sizes"]["n_train"], n_pairs) == (5000, 15_000) and 60 < steps[16] / steps[1024] < 70, steps

# %% [markdown]
# The 2-process demo of the reference run (one seed), and the memory of the two gathered forms at the full
# profile's batch sizes:

# %%
display(HTML(results_table_html({f"2 processes, {k} negatives": v["test"] for k, v in reference["demo"]["runs"].items()})))
ref_mem = pd.concat({f"W = {w}": pd.DataFrame(m["sizes"]).T for w, m in reference["memory"].items()})
ref_mem["local / global peak"] = ref_mem["local: peak MB"] / ref_mem["global: peak MB"]
display(ref_mem.drop(columns=["max |gradient|"]).style.format("{:.3g}"))

# %%
# the memory claims of section 3, on 2 and 4 processes, at the reference run's largest batch
assert sorted(reference["memory"]) == ["2", "4"]
check_memory_claims(reference["memory"], str(max(reference["budgets"]["memory_batches"])))

# %%
pd.DataFrame(reference["demo"]["timing_ms"]).T.round(2).rename_axis("local batch n")

# %%
pd.DataFrame(reference["gallery"]).T.round(1)

# %% [markdown]
# ## Takeaways
#
# * InfoNCE classifies the positive among the batch's candidates. In the reference run (three seeds, paired)
#   every step up from 4 candidates to the whole batch is a measured gain at the same budget, the last one
#   (half the batch to the whole batch) the smallest.
# * The sigmoid loss (SigLIP) beats InfoNCE with a learned temperature at small and medium batches and ties it
#   at the largest, as the paper reports; against InfoNCE with a tuned fixed temperature it is measured ahead
#   at one batch size only. On our data the learned softmax temperature, not the batch, makes most of the gap.
# * Data parallelism splits the batch, and with it the candidates, unless the embeddings are gathered. A
#   differentiable all-gather (backward: sum over processes) plus rank-offset labels (or gathered item ids)
#   makes $W$ processes train exactly the single-process large-batch model, as the weight comparison shows.
# * The local form of the gathered loss (open_clip's `local_loss`) gives the same gradients with $2B^2/W$
#   logits a process instead of $B^2$: measured, its peak memory is below the global form's on 2 processes and
#   under half of it on 4.
# * Keep logits in float32 and use log-softmax: float16 overflows $e^{s}$ above $s \approx 11$, which a
#   contrastive temperature reaches easily; bfloat16 does not overflow but rounds the logits coarsely.
# * Score large galleries in chunks of queries: the result is the same and the memory follows the chunk.
#
# **References.** van den Oord, Li & Vinyals (2018), *Representation learning with contrastive predictive
# coding* (InfoNCE and its bound). Chen, Kornblith, Norouzi & Hinton (2020), *A simple framework for
# contrastive learning of visual representations* (SimCLR; large batches, gathered negatives). Radford et al.
# (2021), *Learning transferable visual models from natural language supervision* (CLIP). Zhai, Mustafa,
# Kolesnikov & Beyer (2023), *Sigmoid loss for language image pre-training* (SigLIP). Gao, Zhang, Han & Callan
# (2021), *Scaling deep contrastive learning batch size under memory limited setup* (GradCache). Ilharco et al.
# (2021), *OpenCLIP* (software, github.com/mlfoundations/open_clip; `ClipLoss` in `src/open_clip/loss.py`). Micikevicius et
# al. (2018), *Mixed precision training* (loss scaling). Goyal et al. (2017), *Accurate, large minibatch SGD:
# training ImageNet in 1 hour* (data parallelism). Johnson, Douze & Jégou (2019), *Billion-scale similarity
# search with GPUs* (FAISS). Li et al. (2020), *PyTorch Distributed: experiences on accelerating data
# parallel training* (DDP).
