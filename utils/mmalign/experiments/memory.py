"""Chapter 04: negatives beyond the batch: a memory of hard negatives and the MoCo queue.

Every run trains the same projection heads on the same cached frozen features, with a *small* batch
and the same budget (epochs, learning rate, temperature); only where the negatives come from changes:

* ``in-batch``: symmetric InfoNCE over the batch (chapter 0), the baseline;
* ``memory``: InfoNCE whose caption anchors also score against the images of a
  :class:`~mmalign.memory.HardNegativeMemory` that keeps the worst margin violators of past batches
  (seed 002, problem 3). It stores the *frozen input features* and re-projects them at every read, so
  its negatives are never stale (affordable here because the backbones are frozen);
* ``moco``: ALBEF's two queues (Li et al., 2021) of keys from a momentum copy of the heads
  (:class:`~mmalign.memory.MomentumEncoder`, He et al., 2020): image queries score against text keys,
  text queries against image keys, each as :func:`~mmalign.losses.moco_loss` with the batch's keys and
  the queued keys as negatives. Keys are stored as they were computed: they go stale as the encoder moves.

The notebook calls these functions, so its live tables and ``results/04_memory.json`` compute the same
thing.
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from ..config import Config, seed_everything
from ..data.features import FeatureSplit, scene_features
from ..losses import info_nce, moco_loss
from ..memory import HardNegativeMemory, MoCoQueue, MomentumEncoder
from ..recipes import evaluate, make_dual_encoder
from ..retrieval import similarity
from ..train import History, fit
from .seeds import seeds_for, summarize

TEMPERATURE = 0.07
MARGIN = 0.2  # what counts as a violator when the memory picks what to store


def info_nce_with_memory(z_img: torch.Tensor, z_txt: torch.Tensor, ids: torch.Tensor, mem_img: torch.Tensor,
                         mem_ids: torch.Tensor, temperature: float = TEMPERATURE) -> torch.Tensor:
    r"""Symmetric InfoNCE where caption anchors also score against extra image negatives.

    .. math::
        \ell^{T\to I}_j = -\frac{1}{|P_j|}\sum_{p\in P_j}\log\frac{e^{s_{jp}}}
            {\sum_{i \in \text{batch}} e^{s_{ji}} + \sum_{r \in \text{memory},\ \mathrm{id}_r \ne \mathrm{id}_j} e^{s_{jr}}}

    with :math:`s = \cos/\tau` and :math:`P_j` the batch images of caption j's scene; the image-to-text
    direction is the in-batch InfoNCE. Memory entries of the anchor's own scene are left out.

    Shapes: z_img, z_txt (B, D); ids (B,); mem_img (M, D) (M may be 0); mem_ids (M,). Returns a scalar.
    """
    logits = similarity(z_img, z_txt) / temperature  # (B_img, B_txt)
    pos = ids[:, None] == ids[None, :]
    log_prob_i2t = logits - torch.logsumexp(logits, dim=1, keepdim=True)
    i2t = -(log_prob_i2t.where(pos, torch.zeros_like(logits)).sum(1) / pos.sum(1)).mean()
    t2i_logits = logits.T
    if mem_img.shape[0]:
        mem_logits = (similarity(z_txt, mem_img) / temperature).masked_fill(ids[:, None] == mem_ids[None, :],
                                                                            float("-inf"))
        t2i_logits = torch.cat([t2i_logits, mem_logits], dim=1)
    lse = torch.logsumexp(t2i_logits, dim=1, keepdim=True)
    log_prob_t2i = logits.T - lse  # the positives are batch images only
    t2i = -(log_prob_t2i.where(pos.T, torch.zeros_like(logits)).sum(1) / pos.T.sum(1)).mean()
    return 0.5 * (i2t + t2i)


class HardNegativeBank:
    """The memory of chapter 4: after each step, store the frozen image features of the batch's worst
    margin violators (for caption anchors); read them back, re-projected, as extra negatives."""

    def __init__(self, size: int, dim: int, k: int = 1, margin: float = MARGIN):
        self.memory = HardNegativeMemory(size, dim)
        self.k, self.margin = k, margin
        self._last = None

    def step_fn(self, temperature: float = TEMPERATURE):
        def step(model, batch):
            img, txt, ids = batch
            z_img, z_txt = model(img, txt)
            mem_feats, mem_ids = self.memory.read()
            mem_z = model.encode_images(mem_feats.to(img.device)) if len(mem_ids) else z_img[:0]
            loss = info_nce_with_memory(z_img, z_txt, ids, mem_z, mem_ids.to(img.device), temperature)
            self._last = similarity(z_img, z_txt).detach()
            return loss, {"negatives": float(len(ids) - 1 + len(mem_ids))}

        return step

    def after_step(self, model, batch, step):
        img, _, ids = batch
        rows = HardNegativeMemory.select_violators(self._last, k=self.k, margin=self.margin, ids=ids)
        self.memory.write(img[rows], ids[rows])

    def extra_bytes(self) -> int:
        return self.memory.size * (self.memory.dim * 4 + 8)


class MoCoState:
    """ALBEF-style momentum contrast for two towers: a momentum copy of the heads and one queue per modality.

    ``shadow=True`` also queues the input features next to the keys (same pointer), only to measure how
    stale the queued keys are (:meth:`key_consistency`); training never reads them.
    """

    def __init__(self, model, queue_size: int, momentum: float, dim: int, shadow: bool = False):
        self.key_encoder = MomentumEncoder(model, momentum)
        self.queue_img, self.queue_txt = MoCoQueue(queue_size, dim), MoCoQueue(queue_size, dim)
        self.shadow = MoCoQueue(queue_size, model.text_head.in_dim) if shadow else None
        self.consistency: list[tuple[int, float]] = []
        self._keys = None

    def stateful(self) -> dict:
        d = {"key_encoder": self.key_encoder, "queue_img": self.queue_img, "queue_txt": self.queue_txt}
        if self.shadow is not None:
            d["shadow"] = self.shadow
        return d

    def step_fn(self, temperature: float = TEMPERATURE):
        def step(model, batch):
            img, txt, ids = batch
            q_img, q_txt = model(img, txt)
            k_img, k_txt = self.key_encoder(img, txt)  # no gradient
            neg_txt = torch.cat([k_txt, self.queue_txt.keys.to(img.device)])
            neg_img = torch.cat([k_img, self.queue_img.keys.to(img.device)])
            neg_txt_ids = torch.cat([ids, self.queue_txt.ids.to(ids.device)])
            neg_img_ids = torch.cat([ids, self.queue_img.ids.to(ids.device)])
            # the batch's own keys sit among the negatives; equal ids mask the positive and same-scene copies
            loss = 0.5 * (moco_loss(q_img, k_txt, neg_txt, temperature=temperature, ids=(ids, neg_txt_ids))
                          + moco_loss(q_txt, k_img, neg_img, temperature=temperature, ids=(ids, neg_img_ids)))
            self._keys = (k_img, k_txt)
            return loss, {"negatives": float(neg_txt.shape[0] - 1)}

        return step

    def after_step(self, model, batch, step):
        img, txt, ids = batch
        self.key_encoder.update(model)  # theta_k <- m theta_k + (1 - m) theta_q
        k_img, k_txt = self._keys  # computed before the update, as in MoCo's pseudo-code
        self.queue_img.enqueue(k_img, ids)
        self.queue_txt.enqueue(k_txt, ids)
        if self.shadow is not None:
            self.shadow.enqueue(txt, ids)
            if step % 10 == 0:
                self.consistency.append((step, self.key_consistency()))

    @torch.no_grad()
    def key_consistency(self) -> float:
        """Mean cosine between each queued text key and what the current key encoder makes of its input
        (1 = the queue is as fresh as if it were re-encoded now)."""
        fresh = self.key_encoder.module.text_head(self.shadow.keys)
        return float(F.cosine_similarity(self.queue_txt.keys, fresh, dim=-1).mean())

    def extra_bytes(self) -> int:
        params = sum(p.numel() * p.element_size() for p in self.key_encoder.parameters())
        queues = 2 * self.queue_img.size * (self.queue_img.dim * 4 + 8)
        return params + queues


def train_negatives(train: FeatureSplit, val: FeatureSplit | None, cfg: Config, method: str = "in-batch", *,
                    batch_size: int, epochs: int, queue_size: int = 1024, momentum: float = 0.99,
                    memory_size: int = 256, hidden_dim: int | None = None, lr: float | None = None,
                    evals_per_epoch: int = 2, shadow: bool = False, seed: int | None = None,
                    progress: bool = True, desc: str | None = None):
    """Train the heads with negatives from ``method`` (``in-batch``, ``memory`` or ``moco``).

    Returns ``(model, history, info)`` where ``info`` holds the extra memory in bytes, the seconds per
    training step and, for MoCo with ``shadow``, the key-consistency curve.
    """
    seed = cfg.seed if seed is None else seed
    seed_everything(seed)
    model = make_dual_encoder(train, cfg.embed_dim, hidden_dim)
    state, stateful, after = None, None, None
    if method == "in-batch":
        def step(m, batch):
            img, txt, ids = batch
            zi, zt = m(img, txt)
            return info_nce(zi, zt, temperature=TEMPERATURE, ids=ids)
    elif method == "memory":
        state = HardNegativeBank(memory_size, train.image.shape[1])
        step, after, stateful = state.step_fn(), state.after_step, {"memory": state.memory}
    elif method == "moco":
        state = MoCoState(model, queue_size, momentum, cfg.embed_dim, shadow=shadow)
        step, after, stateful = state.step_fn(), state.after_step, state.stateful()
    else:
        raise ValueError(f"method must be 'in-batch', 'memory' or 'moco', got {method!r}")
    steps_per_epoch = len(train.texts) // batch_size
    eval_time = [0.0]

    def eval_fn(m):
        t = time.perf_counter()
        out = evaluate(m, val)
        eval_time[0] += time.perf_counter() - t
        return out

    history = fit(model, step, train.pairs(), optimizer=torch.optim.AdamW(model.parameters(), lr=lr or cfg.lr),
                  epochs=epochs, batch_size=batch_size, seed=seed, device=cfg.device,
                  eval_fn=eval_fn if val is not None else None,
                  eval_every=max(1, steps_per_epoch // evals_per_epoch), keep_best="rsum" if val is not None else None,
                  stateful=stateful, after_step=after, progress=progress, desc=desc or method)
    info = {"extra MiB": (state.extra_bytes() if state is not None else 0) / 2**20,
            "ms / step": 1000 * (history.seconds - eval_time[0]) / max(1, len(history.step)),
            "consistency": getattr(state, "consistency", None)}
    return model, history, info


def budgets(cfg: Config) -> dict:
    """The chapter's budgets, derived from the profile so that the full profile scales up.

    Small batches (where negatives beyond the batch matter) and MLP heads (hidden 512: a head that moves
    fast makes stale keys, and so the momentum, matter more than a linear one).
    """
    b = cfg.batch_size // 4
    epochs = 1 if cfg.profile == "ci" else max(2, cfg.epochs // 16)  # full: 2 epochs (one left it undertrained)
    return {"batch_size": b, "epochs": epochs, "lr": 3 * cfg.lr, "hidden_dim": 512,
            "queue_sizes": (4 * b, 16 * b, 64 * b), "momentum": 0.99, "momenta": (0.0, 0.9, 0.99, 0.999),
            "memory_size": 4 * b, "evals_per_epoch": 4}


def methods(cfg: Config) -> dict:
    """name -> keyword arguments of :func:`train_negatives`, the rows of the chapter's table.

    The queue sizes are swept at momentum 0.99, the momentum at the largest queue (where the oldest
    keys are oldest)."""
    b = budgets(cfg)
    rows = {f"in-batch (B={b['batch_size']})": {"method": "in-batch"},
            f"in-batch (B={4 * b['batch_size']})": {"method": "in-batch", "batch_size": 4 * b["batch_size"]},
            f"memory (M={b['memory_size']})": {"method": "memory", "memory_size": b["memory_size"]}}
    for k in b["queue_sizes"]:
        rows[f"MoCo K={k}, m={b['momentum']}"] = {"method": "moco", "queue_size": k, "momentum": b["momentum"]}
    for m in b["momenta"]:
        if m != b["momentum"]:
            rows[f"MoCo K={b['queue_sizes'][-1]}, m={m}"] = {"method": "moco", "queue_size": b["queue_sizes"][-1],
                                                           "momentum": m}
    return rows


def run_table(train, val, test, cfg: Config, progress: bool = True, seed: int | None = None):
    """Train every row of :func:`methods` with the same budget; returns (table, histories, infos)."""
    b = budgets(cfg)
    table, histories, infos = {}, {}, {}
    for name, kw in methods(cfg).items():
        kw = {"batch_size": b["batch_size"], "epochs": b["epochs"], "lr": b["lr"], "hidden_dim": b["hidden_dim"],
              "evals_per_epoch": b["evals_per_epoch"], "shadow": kw["method"] == "moco", **kw}
        model, h, info = train_negatives(train, val, cfg, progress=progress, desc=name, seed=seed, **kw)
        row = evaluate(model, test)
        row["negatives / anchor"] = max(h.metrics["negatives"]) if "negatives" in h.metrics else float(kw["batch_size"] - 1)
        row["extra MiB"] = info["extra MiB"]
        row["ms / step"] = info["ms / step"]
        if info["consistency"]:
            row["key consistency"] = sum(v for _, v in info["consistency"]) / len(info["consistency"])
        table[name], histories[name], infos[name] = row, h, info
    return table, histories, infos


def run(cfg: Config, progress: bool = True) -> dict:
    """The reference table, once per seed of :func:`~mmalign.experiments.seeds.seeds_for` (CI: one seed,
    full: three): ``table`` holds the mean over seeds, ``std`` the spread, ``per_seed`` every seed's table;
    the curves are the first seed's."""
    torch.set_num_threads(1)  # tiny heads: one thread is as fast and never oversubscribes the cores
    seed_everything(cfg.seed)
    train, val, test = (scene_features(s, cfg, progress=progress) for s in ("train", "val", "test"))
    per_seed, curves = {}, None
    for seed in seeds_for(cfg):
        table, histories, infos = run_table(train, val, test, cfg, progress, seed=seed)
        per_seed[seed] = table
        if curves is None:
            curves = histories, infos
    histories, infos = curves
    b = budgets(cfg)
    return {**summarize(per_seed),
            "val_rsum_curves": {name: h.eval_series("rsum") for name, h in histories.items()},
            "consistency_curves": {name: i["consistency"] for name, i in infos.items() if i["consistency"]},
            "budgets": {k: list(v) if isinstance(v, tuple) else v for k, v in b.items()},
            "temperature": TEMPERATURE,
            "sizes": {"train": len(train.world), "val": len(val.world), "test": len(test.world),
                      "captions_per_image": test.world.captions_per_image}}
