"""InfoNCE: temperature-scaled cross-entropy over a similarity matrix (van den Oord et al., 2018;
CLIP, Radford et al., 2021), with several positives through a label mask (Khosla et al., 2020)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .._deprecation import keyword_settings, warn_deprecated
from ..retrieval import _similarity, similarity as _checked_similarity
from ._checks import check_pair, check_temperature, mined_negative_masks, positive_mask


@keyword_settings(old_order=("temperature", "labels_a", "labels_b", "normalize", "negatives"),
                  id_pairs={("labels_a", "labels_b"): "ids"})
def info_nce(
    a: torch.Tensor,
    b: torch.Tensor,
    *,
    temperature: float = 0.07,
    ids=None,
    normalize: bool = True,
    negatives: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    r"""Symmetric InfoNCE between two batches of embeddings.

    With :math:`s_{ij} = \cos(a_i, b_j) / \tau` and :math:`P_i` the positives of row i,

    .. math::
        \ell_{a\to b} = \frac{1}{N}\sum_i -\frac{1}{|P_i|}\sum_{j\in P_i}
            \log\frac{e^{s_{ij}}}{\sum_k e^{s_{ik}}},
        \qquad L = \tfrac12(\ell_{a\to b} + \ell_{b\to a}).

    Args:
        a: (N, D) embeddings of one view (e.g. images).
        b: (M, D) embeddings of the other view (e.g. captions).
        temperature: tau > 0; stable down to 0.01 and below (log-sum-exp, float32 logits).
        ids: optional item ids, one (N,) tensor when a and b share them (N == M) or a pair
            ``(ids_a (N,), ids_b (M,))``; pairs with equal ids are positives. Without them, N must equal M
            and the positives are the diagonal.
        normalize: L2-normalise a and b first (cosine similarity).
        negatives: optional output of a miner (:mod:`mmalign.miners`), ``(neg_for_a (N, k), neg_for_b
            (M, k'))`` with -1 for "none": each row's softmax then runs over its positives and the
            negatives the miner chose for it only (hard-negative InfoNCE), instead of the whole batch.

    Returns:
        The scalar loss (float32 even when the inputs are half precision).
    """
    check_pair(a, b, same_length=ids is None)
    check_temperature(temperature)
    logits = _similarity(a, b, normalize) / temperature
    if negatives is not None:
        pos = positive_mask(ids, a.shape[0], b.shape[0], a.device)
        keep_ab, keep_ba = mined_negative_masks(negatives, a.shape[0], b.shape[0], a.device)
        logits_ab = logits.masked_fill(~(pos | keep_ab), float("-inf"))
        logits_ba = logits.T.masked_fill(~(pos.T | keep_ba), float("-inf"))
        return 0.5 * (_multi_positive_ce(logits_ab, pos) + _multi_positive_ce(logits_ba, pos.T))
    if ids is None:
        target = torch.arange(a.shape[0], device=a.device)
        return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))
    pos = positive_mask(ids, a.shape[0], b.shape[0], a.device)
    return 0.5 * (_multi_positive_ce(logits, pos) + _multi_positive_ce(logits.T, pos.T))


def _multi_positive_ce(logits: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """Mean over rows of -mean_{j in P_i} log softmax(logits_i)_j. (N, M) logits, (N, M) bool mask."""
    n_pos = pos.sum(1)
    if bool((n_pos == 0).any()):
        raise ValueError("every row needs at least one positive: some item id of one side has no match on the other")
    log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)
    return (-log_prob.masked_fill(~pos, 0).sum(1) / n_pos).mean()  # masked_fill: -inf * 0 would be NaN


def __getattr__(name: str):
    if name == "similarity":  # 0.1 had a second copy here
        warn_deprecated("mmalign.losses.info_nce.similarity is deprecated; use mmalign.retrieval.similarity", 2)
        return _checked_similarity
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
