r"""Downstream evaluation of an embedding space: sentence pairs, zero-shot classification, linear
probe, fine-tuning and a retrieval curve (the four tasks of course seed 003, LightCRL).

Typical use::

    scores = pair_scores(za, zb)                                   # cosine of each pair
    t = choose_threshold(val_scores, val_labels)                   # decided on the validation split
    row = pair_classification(test_scores >= t, test_labels)       # the seed's QQP / MRPC table layout
    rho = spearman(test_scores, test_grades)                       # STS-B style
    acc = zero_shot_accuracy(image_emb, class_emb, labels)         # top-1..5 from prompt embeddings
    curve = train_classifier(model, train, test, epochs=20)        # linear probe / fine-tuning curves
    hits = retrieval_curve(img, txt, image_ids, text_ids, log_ks(900)) # the seed's Flickr8k curve
"""

from __future__ import annotations

import math
from typing import Callable, Iterable, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .checks import check_embeddings, check_ids, check_int, check_positive, check_same_width, check_tensor
from .retrieval import recall_at_k
from .train import fit

CLASS_NAMES = ("dissimilarity", "similarity")  # label 0, label 1: the seed's two tables


# ----------------------------------------------------------------------------- sentence pairs
def pair_scores(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    r"""Cosine similarity of each pair: :math:`s_i = \cos(a_i, b_i)`. (N, D), (N, D) -> (N,) float32 or wider."""
    check_embeddings("a", a)
    check_embeddings("b", b)
    check_same_width("a", a, "b", b)
    if a.shape[0] != b.shape[0]:
        raise ValueError(f"a and b must hold the same number of pairs, got {a.shape[0]} and {b.shape[0]}")
    dtype = torch.promote_types(torch.promote_types(a.dtype, b.dtype), torch.float32)
    return F.cosine_similarity(a.to(dtype), b.to(dtype), dim=-1)


def _labels(name: str, labels, n: int) -> torch.Tensor:
    t = check_ids(name, labels, n)
    if bool(((t != 0) & (t != 1)).any()):
        raise ValueError(f"{name} must be 0/1 labels (1 = similar), got values {sorted(set(t.tolist()))}")
    return t


def choose_threshold(scores, labels) -> float:
    """The decision threshold that maximises accuracy of ``score >= t -> similar`` on a (validation) split.

    Candidates are the midpoints between consecutive distinct scores and one value below / above all
    of them; among equally accurate thresholds the smallest is returned.
    """
    if labels is None:
        raise ValueError("labels is None: this split has no labels (GLUE's test.tsv files have none); choose the "
                         "threshold on a labelled split, e.g. the dev split's scores and labels")
    scores = torch.as_tensor(scores)
    if scores.numel() == 0:
        raise ValueError("cannot choose a threshold on an empty split: pass the validation pairs' scores and labels")
    check_tensor("scores", scores, ndim=1)
    labels = _labels("labels", labels, scores.shape[0])
    s = scores.double()
    distinct = torch.unique(s)  # sorted
    cands = torch.cat([distinct[:1] - 1, (distinct[1:] + distinct[:-1]) / 2, distinct[-1:] + 1])
    pred = s[None, :] >= cands[:, None]  # (C, N)
    acc = (pred == labels.bool()[None, :]).double().mean(1)
    return float(cands[int(torch.argmax(acc))])


def pair_classification(predicted, labels) -> dict[str, dict[str, float]]:
    """Accuracy and per-class precision, recall, F1 (percent) in the seed's table layout.

    Returns ``{"dissimilarity": {"accuracy", "precision", "recall", "F1"}, "similarity": {...}}``
    (class 0 and class 1; accuracy is the same in both, as in the seed). A class never predicted has
    precision 0 (as scikit-learn's ``zero_division=0``). ``predicted`` holds decisions (bool or 0/1), not
    scores: floating values other than 0 and 1 raise instead of being truncated.
    """
    if labels is None:
        raise ValueError("labels is None: this split has no labels (GLUE's test.tsv files have none); score the "
                         "predictions on a labelled split")
    labels = _labels("labels", labels, len(torch.as_tensor(labels)))
    predicted = torch.as_tensor(predicted)
    if (predicted.dtype.is_floating_point or predicted.dtype.is_complex) and not bool(
            ((predicted == 0) | (predicted == 1)).all()):
        bad = predicted[(predicted != 0) & (predicted != 1)].flatten()[:3].tolist()
        raise ValueError(f"predicted must hold decisions (bool or 0/1), got {predicted.dtype} values such as {bad}: "
                         "these look like scores; threshold them first, e.g. scores >= choose_threshold(val_scores, "
                         "val_labels)")
    pred = _labels("predicted", predicted.long(), labels.shape[0])
    if labels.numel() == 0:
        raise ValueError("no pairs to score")
    acc = 100 * float((pred == labels).double().mean())
    out = {}
    for cls, name in enumerate(CLASS_NAMES):
        tp = float(((pred == cls) & (labels == cls)).sum())
        n_pred, n_true = float((pred == cls).sum()), float((labels == cls).sum())
        p = tp / n_pred if n_pred else 0.0
        r = tp / n_true if n_true else 0.0
        f1 = 2 * p * r / (p + r) if p + r else 0.0
        out[name] = {"accuracy": acc, "precision": 100 * p, "recall": 100 * r, "F1": 100 * f1}
    return out


def _ranks(x: torch.Tensor) -> torch.Tensor:
    """Ranks 1..N with ties given their average rank."""
    order = torch.argsort(x, stable=True)
    sorted_x = x[order]
    ranks = torch.empty_like(x, dtype=torch.float64)
    ranks[order] = torch.arange(1, len(x) + 1, dtype=torch.float64, device=x.device)
    _, inverse, counts = torch.unique_consecutive(sorted_x, return_inverse=True, return_counts=True)
    ends = torch.cumsum(counts, 0).double()
    avg = ends - (counts.double() - 1) / 2  # mean of the ranks a group of ties occupies
    ranks[order] = avg[inverse]
    return ranks


def spearman(x, y) -> float:
    r"""Spearman's rank correlation :math:`\rho`: Pearson correlation of the ranks (ties: average ranks).

    Every value must be finite (a NaN has no rank: it raises, always, since the check costs nothing
    beside the sort)."""
    x, y = torch.as_tensor(x).double().flatten(), torch.as_tensor(y).double().flatten()
    if x.shape != y.shape or x.numel() < 2:
        raise ValueError(f"x and y need the same length >= 2, got {x.numel()} and {y.numel()}")
    for name, v in (("x", x), ("y", y)):
        if not bool(torch.isfinite(v).all()):
            raise ValueError(f"{name} holds NaN or inf values ({int(torch.isnan(v).sum())} NaN, "
                             f"{int(torch.isinf(v).sum())} inf, of {v.numel()}); spearman needs a finite value for "
                             "every pair: find where they come from, or drop those pairs from both x and y")
    rx, ry = _ranks(x), _ranks(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    denom = torch.sqrt((rx * rx).sum() * (ry * ry).sum())
    if float(denom) == 0:
        raise ValueError("spearman is undefined when one of the inputs is constant")
    return float((rx * ry).sum() / denom)


def roc_auc(scores, labels) -> float:
    """Area under the ROC curve of scores for binary labels (1 = positive): the probability that a random
    positive pair scores above a random negative one, ties counting one half (threshold-free).

    (N,) scores, (N,) 0/1 labels with both classes present -> a fraction in [0, 1].
    """
    scores = torch.as_tensor(scores, dtype=torch.float64).flatten()
    labels = _labels("labels", labels, scores.shape[0])
    if not bool(torch.isfinite(scores).all()):
        raise ValueError("roc_auc: scores hold NaN or inf; score every pair with a finite number")
    n_pos, n_neg = int((labels == 1).sum()), int((labels == 0).sum())
    if n_pos == 0 or n_neg == 0:
        raise ValueError(f"roc_auc needs both classes, got {n_pos} positive and {n_neg} negative pairs")
    ranks = _ranks(scores)  # average ranks (1-based) of tied scores: the Mann-Whitney U statistic
    u = float(ranks[labels == 1].sum()) - n_pos * (n_pos + 1) / 2
    return u / (n_pos * n_neg)


def pair_benchmark(val_scores, val_labels, test_scores, test_labels, test_grades=None, *,
                   threshold: float | None = None) -> dict:
    """The seed's two tables on test pairs (+ ROC-AUC, + Spearman with grades).

    The decision threshold is chosen on validation (``threshold=None``, our protocol) or fixed
    (``threshold=0.9``: the seed's protocol, no validation). Returns ``{"threshold", "dissimilarity": {...},
    "similarity": {...}, "roc_auc" (percent), "spearman" (percent, if grades)}``.
    """
    t = choose_threshold(val_scores, val_labels) if threshold is None else float(threshold)
    if not math.isfinite(t):
        raise ValueError(f"threshold must be a finite number, got {threshold!r}")
    out = {"threshold": t, **pair_classification(torch.as_tensor(test_scores) >= t, test_labels),
           "roc_auc": 100 * roc_auc(test_scores, test_labels)}
    if test_grades is not None:
        out["spearman"] = 100 * spearman(test_scores, test_grades)
    return out


# ----------------------------------------------------------------------------- classification
def topk_accuracy(logits: torch.Tensor, labels, ks: Iterable[int] = (1, 2, 3, 4, 5)) -> dict[int, float]:
    """Percent of rows whose label is among the k highest logits, for each k. (N, C), (N,) -> {k: %}."""
    check_tensor("logits", logits, ndim=2)
    labels = check_ids("labels", labels, logits.shape[0], logits.device)
    ks = [check_int("k", k, minimum=1, maximum=logits.shape[1]) for k in ks]
    if bool(((labels < 0) | (labels >= logits.shape[1])).any()):
        raise ValueError(f"labels must be class indices in 0..{logits.shape[1] - 1}")
    # rank of the true class; ties count against it (a constant model is never right by accident)
    true = logits.gather(1, labels[:, None])
    rank = (logits >= true).sum(1)
    return {k: 100 * float((rank <= k).double().mean()) for k in ks}


def prompt_embeddings(encode_texts: Callable[[list], torch.Tensor], class_names: Sequence[str],
                      templates: Sequence[str]) -> torch.Tensor:
    """One embedding per class: the mean of its L2-normalised prompt embeddings, normalised (CLIP's
    prompt ensembling, Radford et al., 2021). ``templates`` hold ``{}`` for the class name.

    ``encode_texts(list of str) -> (n, D)``. Returns (C, D).
    """
    for name, v in (("class_names", class_names), ("templates", templates)):
        if isinstance(v, str):
            raise TypeError(f"{name} must be a sequence of strings, got one string {v!r}; pass [{v!r}]")
    if not class_names or not templates:
        raise ValueError("pass at least one class name and one template")
    for t in templates:
        if "{}" not in t:
            raise ValueError(f"template {t!r} has no '{{}}' where the class name goes")
    prompts = [t.format(c) for c in class_names for t in templates]
    out = encode_texts(prompts)
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"encode_texts must return a torch.Tensor (one row per prompt), got {type(out).__name__}")
    if out.dim() != 2 or out.shape[0] != len(prompts):
        raise ValueError(f"encode_texts returned shape {tuple(out.shape)} for {len(prompts)} prompts ({len(class_names)} "
                         f"classes x {len(templates)} templates); it must return one row per prompt, ({len(prompts)}, D)")
    check_tensor("encode_texts(prompts)", out, ndim=2)
    z = F.normalize(out.float(), dim=-1).view(len(class_names), len(templates), -1)
    return F.normalize(z.mean(1), dim=-1)


def zero_shot_accuracy(image_emb: torch.Tensor, class_emb: torch.Tensor, labels,
                       ks: Iterable[int] = (1, 2, 3, 4, 5)) -> dict[int, float]:
    """Top-k accuracy (percent) of classifying each image by its most similar class embedding (cosine)."""
    check_embeddings("image_emb", image_emb)
    check_embeddings("class_emb", class_emb)
    check_same_width("image_emb", image_emb, "class_emb", class_emb)
    logits = F.normalize(image_emb.float(), dim=-1) @ F.normalize(class_emb.float(), dim=-1).T
    return topk_accuracy(logits, labels, ks)


class LinearClassifier(nn.Module):
    """Standardise (statistics of the training features, fixed), then one linear layer: (B, D) -> (B, C)."""

    def __init__(self, train_features: torch.Tensor, n_classes: int):
        super().__init__()
        check_embeddings("train_features", train_features)
        self.register_buffer("mean", train_features.float().mean(0))
        std = train_features.float().std(0)
        self.register_buffer("std", torch.where(std > 1e-6, std, torch.ones_like(std)))
        self.linear = nn.Linear(train_features.shape[1], check_int("n_classes", n_classes, minimum=2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear((x - self.mean) / self.std)


@torch.no_grad()
def _accuracy(model: nn.Module, inputs: tuple, labels: torch.Tensor, batch_size: int = 1024) -> float:
    model.eval()
    correct = 0
    for start in range(0, labels.shape[0], batch_size):
        logits = model(*(x[start:start + batch_size] for x in inputs))
        correct += int((logits.argmax(1) == labels[start:start + batch_size]).sum())
    return 100 * correct / labels.shape[0]


def train_classifier(model: nn.Module, train: tuple, test: tuple, *, epochs: int, lr: float = 1e-3,
                     batch_size: int = 128, weight_decay: float = 0.0, params=None, seed: int = 0,
                     device="cpu", progress: bool = True, desc: str = "classifier") -> dict[int, float]:
    """Train ``model(*inputs) -> logits`` with cross-entropy and return test accuracy (percent) after each epoch.

    ``train`` and ``test`` are tuples ``(*inputs, labels)``. A **linear probe** passes a
    :class:`LinearClassifier` on frozen embeddings; **fine-tuning** passes an encoder followed by a
    classifier and trains both (``params`` restricts what trains; default: every parameter).
    Returns ``{epoch (1-based): accuracy}``.
    """
    epochs = check_int("epochs", epochs, minimum=1)
    check_positive("lr", lr)
    for name, split in (("train", train), ("test", test)):
        if not isinstance(split, (tuple, list)) or len(split) < 2:
            raise TypeError(f"{name} must be a tuple (*inputs, labels) with at least one input, got "
                            f"{type(split).__name__}{f' of {len(split)}' if isinstance(split, (tuple, list)) else ''}")
        *inputs, labels = split
        if not isinstance(labels, torch.Tensor):
            raise TypeError(f"{name} labels (the last item of {name}) must be a torch.Tensor, got {type(labels).__name__}")
        if labels.numel() == 0:
            raise ValueError(f"the {name} split is empty (no labels): pass at least one example")
        for i, x in enumerate(inputs):
            if not isinstance(x, torch.Tensor) or x.dim() == 0 or x.shape[0] != labels.shape[0]:
                got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
                raise ValueError(f"{name} input {i} must hold one row per label ({labels.shape[0]}), got {got}")
        check_ids(f"{name} labels", labels, labels.shape[0])
        if int(labels.min()) < 0:
            raise ValueError(f"{name} labels must be class indices >= 0, got {int(labels.min())} (-1 often marks an "
                             "unlabelled example: drop those rows before training)")
    *train_x, train_y = train
    *test_x, test_y = test
    n_classes = int(max(int(train_y.max()), int(test_y.max())) + 1)
    params = list(params) if params is not None else [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)

    def step(m, batch):
        *x, y = batch
        logits = m(*x)
        if logits.shape[1] < n_classes:
            raise ValueError(f"the model gives {logits.shape[1]} logits but labels go up to {n_classes - 1}")
        return F.cross_entropy(logits.float(), y)

    history = fit(model, step, (*train_x, train_y.long()), optimizer=opt, epochs=epochs,
                  batch_size=min(batch_size, train_y.shape[0]), seed=seed, device=device, amp=False,
                  eval_fn=lambda m: {"accuracy": _accuracy(m, tuple(test_x), test_y.long())},
                  progress=progress, desc=desc)
    return {e["epoch"] + 1: e["accuracy"] for e in history.evals}


# ----------------------------------------------------------------------------- retrieval curve
def log_ks(n: int, num: int = 12) -> list[int]:
    """About ``num`` integers from 1 to ``n``, evenly spaced on a log scale (distinct, sorted)."""
    n, num = check_int("n", n, minimum=1), check_int("num", num, minimum=1)
    return sorted(set(int(round(v)) for v in np.geomspace(1, n, num)))


def retrieval_curve(query: torch.Tensor, gallery: torch.Tensor, query_ids, gallery_ids,
                    ks: Sequence[int]) -> dict[int, float]:
    """The seed's retrieval curve: the percent of queries with a true match within the top k, for each k.

    The seed calls it a *precision* curve; what it measures ("a retrieval is deemed correct if the true
    caption is included within the top-k results") is what this library calls recall@k
    (:func:`mmalign.retrieval.recall_at_k`, ties broken at random in expectation).
    """
    return {k: 100 * v for k, v in recall_at_k(query, gallery, query_ids, gallery_ids, ks).items()}
