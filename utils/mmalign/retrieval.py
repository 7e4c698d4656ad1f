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

from .checks import check_all_finite, check_embeddings, check_ids, check_int, disabled


def _check_embeddings(q: torch.Tensor, g: torch.Tensor, names: tuple[str, str] = ("query", "gallery")) -> None:
    """Structure (2-d, real floating, same width, non-empty) and one fused NaN/inf scan of both."""
    for name, t in zip(names, (q, g)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} embeddings must be a torch.Tensor, got {type(t).__name__}")
    if q.dim() != 2 or g.dim() != 2:
        raise ValueError(f"embeddings must be 2-d (n, dim); got {names[0]} {tuple(q.shape)} and {names[1]} {tuple(g.shape)}")
    if q.shape[1] != g.shape[1]:
        raise ValueError(f"{names[0]} dim {q.shape[1]} != {names[1]} dim {g.shape[1]}: project both into the same space")
    if q.shape[0] == 0 or g.shape[0] == 0:
        raise ValueError(f"empty {names[0]} or {names[1]} ({q.shape[0]} rows in {names[0]}, {g.shape[0]} in {names[1]})")
    if q.device != g.device:
        raise ValueError(f"{names[0]} is on {q.device} but {names[1]} on {g.device}; move both to one device")
    for name, t in zip(names, (q, g)):
        check_embeddings(name, t, finite=False)
    check_all_finite((names[0], q), (names[1], g))


def similarity(a: torch.Tensor, b: torch.Tensor, normalize: bool = True) -> torch.Tensor:
    """(N, M) similarity ``a @ b.T`` (cosine if ``normalize``), in float32 or wider, autocast off.

    The one similarity of the library: the losses, the miners' callers and retrieval all use it.
    Half-precision inputs are upcast to float32; float64 stays float64 (for gradcheck). Autocast is
    disabled here, so logits built from this matrix stay float32 inside a fp16/bf16 autocast region.

    Args:
        a: (N, D) embeddings; b: (M, D) embeddings, real floating, without NaN/inf (checked).
        normalize: L2-normalise the rows of a and b first (cosine similarity).

    Returns:
        (N, M) similarities.
    """
    _check_embeddings(a, b, ("a", "b"))
    return _similarity(a, b, normalize)


def _similarity(a: torch.Tensor, b: torch.Tensor, normalize: bool = True) -> torch.Tensor:
    """:func:`similarity` without the input checks (for callers that have checked already)."""
    dtype = torch.promote_types(torch.promote_types(a.dtype, b.dtype), torch.float32)
    with torch.autocast(device_type=a.device.type, enabled=False):
        a, b = a.to(dtype), b.to(dtype)
        if normalize:
            a, b = torch.nn.functional.normalize(a, dim=-1), torch.nn.functional.normalize(b, dim=-1)
        return a @ b.T


def _check_ids(emb: torch.Tensor, ids, what: str) -> torch.Tensor:
    ids = torch.as_tensor(ids, device=emb.device)
    if ids.dim() != 1 or ids.shape[0] != emb.shape[0]:
        raise ValueError(f"{what} ids must be 1-d with one id per row: {tuple(ids.shape)} ids for {emb.shape[0]} rows")
    return check_ids(f"{what}_ids", ids, emb.shape[0])


def _chunks(n_queries: int, n_gallery: int, chunk_size: int | None):
    if chunk_size is not None:
        check_int("chunk_size", chunk_size, minimum=1)
    size = chunk_size or max(1, (1 << 24) // max(n_gallery, 1))
    for start in range(0, n_queries, size):
        yield slice(start, min(start + size, n_queries))


def _positive_lists(q_ids: torch.Tensor, g_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(Q, P) gallery indices of each query's positives (equal ids), padded, and a (Q, P) validity mask;
    P is the largest number of positives of a query. Raises for a query without a positive."""
    g_sorted, perm = torch.sort(g_ids, stable=True)
    start = torch.searchsorted(g_sorted, q_ids, right=False)
    count = torch.searchsorted(g_sorted, q_ids, right=True) - start
    if bool((count == 0).any()):
        missing = int((count == 0).nonzero()[0, 0])
        raise ValueError(f"query {missing} (id {int(q_ids[missing])}) has no positive in the gallery")
    slot = torch.arange(int(count.max()), device=q_ids.device)
    valid = slot[None, :] < count[:, None]
    index = perm[(start[:, None] + slot[None, :]).clamp(max=len(g_ids) - 1)]
    return index, valid


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
    if isinstance(ks, (int, torch.Tensor)) and not isinstance(ks, bool):
        ks = [ks] if isinstance(ks, int) else ks.tolist()
    ks = sorted(set(check_int("every K in ks", k) for k in ks))
    if chunk_size is not None:
        check_int("chunk_size", chunk_size, minimum=1)
    if not ks or ks[0] < 1 or ks[-1] > gallery.shape[0]:
        raise ValueError(f"every K must satisfy 1 <= K <= gallery size ({gallery.shape[0]}); got {ks}")
    k_tensor = torch.tensor(ks, dtype=torch.float64, device=query.device)
    hits = torch.zeros(len(ks), dtype=torch.float64, device=query.device)
    # Checked once above; normalised once here (not per chunk): the same values, row by row.
    dtype = torch.promote_types(torch.promote_types(query.dtype, gallery.dtype), torch.float32)
    query, gallery = query.to(dtype), gallery.to(dtype)
    if normalize:
        query, gallery = torch.nn.functional.normalize(query, dim=-1), torch.nn.functional.normalize(gallery, dim=-1)
    pos_index, pos_valid = _positive_lists(q_ids, g_ids)
    for rows in _chunks(query.shape[0], gallery.shape[0], chunk_size):
        with disabled():  # the finiteness scan ran once above; do not rescan the gallery per chunk
            scores = similarity(query[rows], gallery, False)
        # The best positive from each query's list of positives (no (chunk, G) mask): every gallery item
        # scoring above it is a negative, and the tied ones are all ties minus the tied positives.
        pos_scores = scores.gather(1, pos_index[rows]).masked_fill(~pos_valid[rows], float("-inf"))
        best = pos_scores.amax(1, keepdim=True)
        tied_pos = ((pos_scores == best) & pos_valid[rows]).sum(1).double()
        # Only ranks up to max(ks) matter: count within the top max(ks) scores (a top-k, not a pass over
        # the gallery), and recount exactly the rare rows whose ties may run past it.
        top = torch.topk(scores, ks[-1], dim=1).values
        above, tied = (top > best).sum(1), (top == best).sum(1)
        unsure = ((above + tied) >= ks[-1]) & (tied > 0)
        if bool(unsure.any()):
            r = unsure.nonzero().flatten()
            above[r], tied[r] = (scores[r] > best[r]).sum(1), (scores[r] == best[r]).sum(1)
        above, tied_neg = above.double(), tied.double() - tied_pos
        del scores, top  # free this chunk's scores before the next chunk's are computed (peak: one chunk)
        # Without a negative tied with the best positive, a hit is certain or impossible: above < K. Only
        # the (rare) rows with such ties need the hypergeometric chance, computed on those rows alone.
        p_hit = (above[:, None] < k_tensor[None, :]).double()
        r = (tied_neg > 0).nonzero().flatten()
        if len(r):
            m = (k_tensor[None, :] - above[r, None])  # tied slots left inside the top K
            t, p = tied_neg[r, None], tied_pos[r, None]
            m_safe = m.clamp(0, None).minimum(t)
            p_miss = torch.exp(_log_comb(t, m_safe) - _log_comb(t + p, m_safe))
            p_hit[r] = torch.where(m <= 0, torch.zeros_like(m), torch.where(m > t, torch.ones_like(m), 1 - p_miss))
        hits += p_hit.sum(0)
    return {k: float(h) / query.shape[0] for k, h in zip(ks, hits)}


def retrieval_report(image_emb: torch.Tensor, text_emb: torch.Tensor, image_ids, text_ids,
                     ks: Iterable[int] = (1, 5, 10), chunk_size: int | None = None) -> dict[str, float]:
    """Recall@K in both directions as fractions in [0, 1], like :func:`recall_at_k`: keys ``i2t_R@1``, ...,
    ``t2i_R@10`` and ``rsum``, their sum (0..2 len(ks)).

    i2t: each image queries the captions (a hit if any of its captions is in the top K).
    t2i: each caption queries the images. Papers print these as percentages (rsum out of 600 for
    K = 1, 5, 10): :func:`as_percentages` converts a report for a table.
    """
    i2t = recall_at_k(image_emb, text_emb, image_ids, text_ids, ks, chunk_size)
    t2i = recall_at_k(text_emb, image_emb, text_ids, image_ids, ks, chunk_size)
    report = {f"i2t_R@{k}": v for k, v in i2t.items()}
    report.update({f"t2i_R@{k}": v for k, v in t2i.items()})
    report["rsum"] = sum(report.values())
    return report


def as_percentages(report: dict[str, float]) -> dict[str, float]:
    """A :func:`retrieval_report` in percent, as tables and papers print it: every ``R@K`` times 100 and
    ``rsum`` the sum of those (out of 600 for K = 1, 5, 10)."""
    if not isinstance(report, dict) or "rsum" not in report:
        raise ValueError("as_percentages takes the dict that retrieval_report returns (keys i2t_R@K, t2i_R@K, rsum)")
    out = {key: 100 * v for key, v in report.items() if key != "rsum"}
    if any(not 0 <= v <= 100 for v in out.values()):
        raise ValueError("as_percentages expects fractions in [0, 1] (a retrieval_report); this report is in "
                         "percent already")
    out["rsum"] = sum(out.values())
    return out


def chance_recall(n_gallery: int, n_positives: int, k: int) -> float:
    """Recall@K of a random ranking: 1 - C(G - P, K) / C(G, K), for P positives among G items."""
    n_gallery, n_positives, k = (check_int(name, v) for name, v in
                                 (("n_gallery", n_gallery), ("n_positives", n_positives), ("k", k)))
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
    k = check_int("k", k)
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
    max_k = check_int("max_k", max_k)
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
