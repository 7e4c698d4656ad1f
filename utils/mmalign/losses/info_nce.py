"""InfoNCE: temperature-scaled cross-entropy over a similarity matrix (van den Oord et al., 2018;
CLIP, Radford et al., 2021), with several positives through a label mask (Khosla et al., 2020)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._checks import check_pair, check_temperature, mined_negative_masks, positive_mask


def info_nce(
    a: torch.Tensor,
    b: torch.Tensor,
    temperature: float = 0.07,
    labels_a: torch.Tensor | None = None,
    labels_b: torch.Tensor | None = None,
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
        labels_a, labels_b: optional (N,) and (M,) item ids; pairs with equal ids are positives.
            Without them, N must equal M and the positives are the diagonal.
        normalize: L2-normalise a and b first (cosine similarity).
        negatives: optional output of a miner (:mod:`mmalign.miners`), ``(neg_for_a (N, k), neg_for_b
            (M, k'))`` with -1 for "none": each row's softmax then runs over its positives and the
            negatives the miner chose for it only (hard-negative InfoNCE), instead of the whole batch.

    Returns:
        The scalar loss (float32 even when the inputs are half precision).
    """
    check_pair(a, b, same_length=labels_a is None and labels_b is None)
    check_temperature(temperature)
    logits = _similarity(a, b, normalize) / temperature
    if negatives is not None:
        pos = positive_mask(labels_a, labels_b, a.shape[0], b.shape[0], a.device)
        keep_ab, keep_ba = mined_negative_masks(negatives, a.shape[0], b.shape[0], a.device)
        logits_ab = logits.masked_fill(~(pos | keep_ab), float("-inf"))
        logits_ba = logits.T.masked_fill(~(pos.T | keep_ba), float("-inf"))
        return 0.5 * (_multi_positive_ce(logits_ab, pos) + _multi_positive_ce(logits_ba, pos.T))
    if labels_a is None and labels_b is None:
        target = torch.arange(a.shape[0], device=a.device)
        return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))
    pos = positive_mask(labels_a, labels_b, a.shape[0], b.shape[0], a.device)
    return 0.5 * (_multi_positive_ce(logits, pos) + _multi_positive_ce(logits.T, pos.T))


def similarity(a: torch.Tensor, b: torch.Tensor, normalize: bool = True) -> torch.Tensor:
    """(N, M) similarity a @ b.T (cosine if ``normalize``), in float32 or wider, autocast off.

    Half-precision inputs are upcast to float32; float64 stays float64 (for gradcheck). Autocast is
    disabled here, so the logits built from this matrix stay float32 inside a fp16/bf16 autocast region.
    Inputs are checked: (N, D) and (M, D) real floating embeddings without NaN/inf.
    """
    check_pair(a, b, same_length=False)
    return _similarity(a, b, normalize)


def _similarity(a: torch.Tensor, b: torch.Tensor, normalize: bool = True) -> torch.Tensor:
    """:func:`similarity` without the input checks (for callers that have checked already)."""
    dtype = torch.promote_types(torch.promote_types(a.dtype, b.dtype), torch.float32)
    with torch.autocast(device_type=a.device.type, enabled=False):
        a, b = a.to(dtype), b.to(dtype)
        if normalize:
            a, b = F.normalize(a, dim=-1), F.normalize(b, dim=-1)
        return a @ b.T


def _multi_positive_ce(logits: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """Mean over rows of -mean_{j in P_i} log softmax(logits_i)_j. (N, M) logits, (N, M) bool mask."""
    n_pos = pos.sum(1)
    if bool((n_pos == 0).any()):
        raise ValueError("every row needs at least one positive: some item id of one side has no match on the other")
    log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)
    return (-log_prob.masked_fill(~pos, 0).sum(1) / n_pos).mean()  # masked_fill: -inf * 0 would be NaN
