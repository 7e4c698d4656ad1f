"""The classic pairwise contrastive loss (Hadsell, Chopra & LeCun, 2006) over a cosine similarity
matrix, with positives and negatives given by a label mask (item ids)."""

from __future__ import annotations

import torch

from ..checks import check_positive, check_real
from .._deprecation import keyword_settings
from ._checks import check_sim, mined_negative_masks, positive_mask


@keyword_settings(old_order=("item_ids", "margin", "eps", "negatives"), renamed={"item_ids": "ids"})
def contrastive_loss(
    sim: torch.Tensor,
    *,
    margin: float = 1.0,
    ids=None,
    eps: float = 1e-8,
    negatives: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    r"""Contrastive loss: pull positive pairs together, push negative pairs beyond a distance margin.

    The loss works on distances between unit vectors, obtained from the cosine similarity
    :math:`S_{ij}` as :math:`d_{ij} = \lVert \hat a_i - \hat b_j \rVert = \sqrt{2 - 2S_{ij}} \in [0, 2]`.
    With :math:`y_{ij} = 1` when rows i and columns j share an item id (positives) and 0 otherwise,

    .. math::
        L = \frac12 \frac{\sum_{ij} y_{ij}\, d_{ij}^2}{\sum_{ij} y_{ij}}
          + \frac12 \frac{\sum_{ij} (1-y_{ij}) \max(0, m - d_{ij})^2}{\sum_{ij} (1-y_{ij})}.

    Hadsell et al. sum :math:`\tfrac12 y d^2 + \tfrac12 (1-y)\max(0, m-d)^2` over all pairs; here the
    positive and negative terms are averaged separately, so the B positives of a batch are not
    swamped by its B^2 - B negatives. A batch with no negatives contributes 0 for that term.
    The positive term uses :math:`d^2 = 2 - 2S` directly (no square root, smooth gradient).

    Args:
        sim: (B, B) cosine similarities, rows images, columns captions (values in [-1, 1]; values a
            few ulps beyond, as half precision rounds them, count as +-1).
        margin: m in (0, 2]: negatives closer than m (in Euclidean distance between unit vectors)
            are pushed away. Two random directions in high dimension are about sqrt(2) apart.
        ids: optional (B,) item ids (or a pair, row ids and column ids); equal ids are positives.
            Default: the diagonal.
        eps: floor under :math:`d^2` before the square root (keeps the gradient finite at d = 0).
        negatives: optional output of a miner, ``(neg_for_images (B, k), neg_for_texts (B, k'))``
            (-1 = none): the negative term then averages over the mined pairs only (a pair counts
            once when either direction chose it), instead of over every negative pair.

    Returns:
        Scalar loss (float32 for half-precision ``sim``).
    """
    check_sim(sim)
    margin = check_real("margin", margin)
    if not 0 < margin <= 2:
        raise ValueError(f"margin must be in (0, 2] (distances between unit vectors lie in [0, 2]), got {margin}")
    check_positive("eps", eps)
    # A cosine computed in half precision may round above 1 (bf16: 1 + 2^-7); allow a few ulps of the
    # input dtype (d^2 = 2 - 2S is clamped at 0 below, so such values are distance 0).
    tol = max(1e-3, 4 * torch.finfo(sim.dtype).eps)
    sim = sim.to(torch.promote_types(sim.dtype, torch.float32))
    if bool((sim.detach().abs() > 1 + tol).any()):
        raise ValueError(
            "contrastive_loss expects cosine similarities in [-1, 1], got values outside; "
            "L2-normalise the embeddings (or use mmalign.retrieval.similarity) and do not divide by a temperature"
        )
    n = sim.shape[0]
    pos = positive_mask(ids, n, n, sim.device, sides=("rows", "columns"))
    neg = ~pos
    if negatives is not None:
        keep_ab, keep_ba = mined_negative_masks(negatives, n, n, sim.device)
        neg = neg & (keep_ab | keep_ba.T)
    d2 = (2 - 2 * sim).clamp(min=0)
    d = d2.clamp(min=eps).sqrt()
    pull = (d2 * pos).sum() / pos.sum()
    push = (torch.relu(margin - d).pow(2) * neg).sum() / neg.sum().clamp(min=1)
    return 0.5 * (pull + push)
