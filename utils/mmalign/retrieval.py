"""Cross-modal retrieval: similarity, Recall@K in both directions with several positives, precision@k.

Protocol (as in image-caption retrieval on COCO/Flickr): every query has one or more positives in the
gallery, given by equal item ids (an image and its 5 captions share an id). Recall@K is the fraction of
queries with at least one positive among the top K gallery items.

Ties: a hand-rolled "count the items scoring strictly higher" rank gives a collapsed model (all scores
equal) a perfect score. Here tied items are ordered at random and we return the *expected* recall
under that random order, computed exactly:

.. math::
    P(\\text{hit@}K) = 1 - \\binom{t}{m} \\Big/ \\binom{t+p}{m}, \\qquad m = K - g,

where g is the number of negatives scoring above the best positive, t the negatives tied with it and
p the positives tied with it (the first m tied items are all negatives with that probability). A
collapsed model therefore scores chance level, never 100%.

Everything is chunked over queries, so a 100k x 100k gallery needs memory for ``chunk x gallery``
scores only.
"""

from __future__ import annotations

from typing import Iterable

import torch

from .losses.info_nce import similarity as _similarity


def _check_embeddings(q: torch.Tensor, g: torch.Tensor) -> None:
    if q.dim() != 2 or g.dim() != 2:
        raise ValueError(f"embeddings must be 2-d (n, dim); got query {tuple(q.shape)} and gallery {tuple(g.shape)}")
    if q.shape[1] != g.shape[1]:
        raise ValueError(f"query dim {q.shape[1]} != gallery dim {g.shape[1]}: project both into the same space")
    if q.shape[0] == 0 or g.shape[0] == 0:
        raise ValueError(f"empty query set or gallery ({q.shape[0]} queries, {g.shape[0]} gallery items)")


def similarity(a: torch.Tensor, b: torch.Tensor, normalize: bool = True) -> torch.Tensor:
    """Cosine (or dot-product if ``normalize=False``) similarity with input checks: (N, D), (M, D) -> (N, M)."""
    _check_embeddings(a, b)
    return _similarity(a, b, normalize)


def _check_ids(emb: torch.Tensor, ids, what: str) -> torch.Tensor:
    ids = torch.as_tensor(ids, device=emb.device)
    if ids.dim() != 1 or ids.shape[0] != emb.shape[0]:
        raise ValueError(f"{what} ids must be 1-d with one id per row: {tuple(ids.shape)} ids for {emb.shape[0]} rows")
    return ids


def _chunks(n_queries: int, n_gallery: int, chunk_size: int | None):
    size = chunk_size or max(1, (1 << 24) // max(n_gallery, 1))
    for start in range(0, n_queries, size):
        yield slice(start, min(start + size, n_queries))


def _log_comb(n: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    return torch.lgamma(n + 1) - torch.lgamma(k + 1) - torch.lgamma(n - k + 1)


def recall_at_k(query: torch.Tensor, gallery: torch.Tensor, query_ids, gallery_ids,
                ks: Iterable[int] = (1, 5, 10), chunk_size: int | None = None,
                normalize: bool = True) -> dict[int, float]:
    """Recall@K of ``query`` against ``gallery`` (expected value under random tie-breaking).

    Args:
        query: (Q, D) embeddings; gallery: (G, D) embeddings (cosine similarity if ``normalize``).
        query_ids: (Q,) item ids; gallery_ids: (G,) item ids; equal ids are positives. Every query
            needs at least one positive in the gallery.
        ks: the cut-offs, each 1 <= K <= G.
        chunk_size: queries scored at once (default: about 16M scores per chunk).

    Returns:
        ``{K: recall in [0, 1]}``.
    """
    _check_embeddings(query, gallery)
    q_ids, g_ids = _check_ids(query, query_ids, "query"), _check_ids(gallery, gallery_ids, "gallery")
    ks = sorted(set(int(k) for k in ks))
    if not ks or ks[0] < 1 or ks[-1] > gallery.shape[0]:
        raise ValueError(f"every K must satisfy 1 <= K <= gallery size ({gallery.shape[0]}); got {ks}")
    if not (torch.isfinite(query).all() and torch.isfinite(gallery).all()):
        raise ValueError("embeddings contain NaN or inf; check the model (a diverged loss?) before scoring")
    k_tensor = torch.tensor(ks, dtype=torch.float64, device=query.device)
    hits = torch.zeros(len(ks), dtype=torch.float64, device=query.device)
    for rows in _chunks(query.shape[0], gallery.shape[0], chunk_size):
        scores = similarity(query[rows], gallery, normalize)
        pos = q_ids[rows, None] == g_ids[None, :]
        if not bool(pos.any(1).all()):
            missing = int((~pos.any(1)).nonzero()[0, 0]) + rows.start
            raise ValueError(f"query {missing} (id {int(q_ids[missing])}) has no positive in the gallery")
        best = scores.masked_fill(~pos, float("-inf")).amax(1, keepdim=True)
        above = ((scores > best) & ~pos).sum(1).double()
        tied_neg = ((scores == best) & ~pos).sum(1).double()
        tied_pos = ((scores == best) & pos).sum(1).double()
        m = (k_tensor[None, :] - above[:, None])  # tied slots left inside the top K
        t, p = tied_neg[:, None], tied_pos[:, None]
        m_safe = m.clamp(0, None).minimum(t)
        p_miss = torch.exp(_log_comb(t, m_safe) - _log_comb(t + p, m_safe))
        p_hit = torch.where(m <= 0, torch.zeros_like(m), torch.where(m > t, torch.ones_like(m), 1 - p_miss))
        hits += p_hit.sum(0)
    return {k: float(h) / query.shape[0] for k, h in zip(ks, hits)}


def retrieval_report(image_emb: torch.Tensor, text_emb: torch.Tensor, image_ids, text_ids,
                     ks: Iterable[int] = (1, 5, 10), chunk_size: int | None = None) -> dict[str, float]:
    """Recall@K in both directions, as percentages: keys ``i2t_R@1``, ..., ``t2i_R@10``, ``rsum``.

    i2t: each image queries the captions (a hit if any of its captions is in the top K).
    t2i: each caption queries the images.
    """
    i2t = recall_at_k(image_emb, text_emb, image_ids, text_ids, ks, chunk_size)
    t2i = recall_at_k(text_emb, image_emb, text_ids, image_ids, ks, chunk_size)
    report = {f"i2t_R@{k}": 100 * v for k, v in i2t.items()}
    report.update({f"t2i_R@{k}": 100 * v for k, v in t2i.items()})
    report["rsum"] = sum(report.values())
    return report


def chance_recall(n_gallery: int, n_positives: int, k: int) -> float:
    """Recall@K of a random ranking: 1 - C(G - P, K) / C(G, K), for P positives among G items."""
    if not (1 <= n_positives <= n_gallery and 1 <= k <= n_gallery):
        raise ValueError(f"need 1 <= positives <= gallery and 1 <= k <= gallery, got "
                         f"gallery={n_gallery}, positives={n_positives}, k={k}")
    n, p = torch.tensor(float(n_gallery), dtype=torch.float64), float(n_positives)
    kk = torch.tensor(float(k), dtype=torch.float64)
    if k > n_gallery - n_positives:
        return 1.0
    return float(-torch.expm1(_log_comb(n - p, kk) - _log_comb(n, kk)))


def top_k(query: torch.Tensor, gallery: torch.Tensor, k: int, chunk_size: int | None = None,
          normalize: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """The k most similar gallery items per query: (scores (Q, k), indices (Q, k))."""
    _check_embeddings(query, gallery)
    if not 1 <= k <= gallery.shape[0]:
        raise ValueError(f"k must be in 1..{gallery.shape[0]} (the gallery size), got {k}")
    out = [similarity(query[rows], gallery, normalize).topk(k, dim=1)
           for rows in _chunks(query.shape[0], gallery.shape[0], chunk_size)]
    return torch.cat([o.values for o in out]), torch.cat([o.indices for o in out])


def precision_at_k(query: torch.Tensor, gallery: torch.Tensor, query_ids, gallery_ids,
                   max_k: int = 10, chunk_size: int | None = None, normalize: bool = True) -> torch.Tensor:
    """Mean precision@k for k = 1..max_k, shape (max_k,). Ties are ordered negatives first
    (pessimistic), so equal scores never inflate precision."""
    _check_embeddings(query, gallery)
    q_ids, g_ids = _check_ids(query, query_ids, "query"), _check_ids(gallery, gallery_ids, "gallery")
    if not 1 <= max_k <= gallery.shape[0]:
        raise ValueError(f"max_k must be in 1..{gallery.shape[0]} (the gallery size), got {max_k}")
    total = torch.zeros(max_k, dtype=torch.float64, device=query.device)
    for rows in _chunks(query.shape[0], gallery.shape[0], chunk_size):
        scores = similarity(query[rows], gallery, normalize)
        pos = (q_ids[rows, None] == g_ids[None, :])
        order = torch.argsort(pos.to(torch.int8), dim=1, stable=True)  # negatives first among equals
        ranked = torch.argsort(scores.gather(1, order), dim=1, descending=True, stable=True)
        top = pos.gather(1, order.gather(1, ranked[:, :max_k])).double()
        total += (top.cumsum(1) / torch.arange(1, max_k + 1, device=query.device)).sum(0)
    return (total / query.shape[0]).float()
