"""Bidirectional triplet (hinge) loss over a paired similarity matrix with mined negatives
(Harwath et al., 2018; thesis eqs. 2.5-2.7). The negatives come from a miner (random, hardest,
semi-hard...), so the same loss serves every sampling strategy."""

from __future__ import annotations

import torch

from .._deprecation import keyword_settings
from .. import checks
from ..checks import check_real
from ._checks import check_pair, check_sim
from ..retrieval import _similarity as similarity


@keyword_settings(old_order=("margin", "reduction"))
def triplet_loss(
    sim: torch.Tensor,
    neg_for_images: torch.Tensor,
    neg_for_texts: torch.Tensor,
    *,
    margin: float = 0.2,
    reduction: str = "mean",
) -> torch.Tensor:
    r"""Triplet loss in both directions: images as anchors and captions as anchors (thesis eq. 2.6).

    With :math:`S` the (B, B) similarity matrix (positive of row i is column i),
    :math:`N^I_i` the caption columns given as negatives of image i and :math:`N^T_i` the image
    rows given as negatives of caption i,

    .. math::
        L = \frac{1}{|\mathcal V|}\Big(\sum_i\sum_{j\in N^I_i} \max(0, M - S_{ii} + S_{ij})
            + \sum_i\sum_{r\in N^T_i} \max(0, M - S_{ii} + S_{ri})\Big),

    where :math:`|\mathcal V|` counts the valid (not ``-1``) negatives of both directions.
    With one uniformly drawn negative per anchor this is eq. 2.6; adding hardest negatives from a
    second miner and summing the two losses gives eq. 2.7.

    Args:
        sim: (B, B) similarity matrix, rows images, columns captions (e.g. cosine similarities).
        neg_for_images: (B, k) LongTensor of caption column indices per image; ``-1`` = ignore.
            A (B,) tensor is read as k = 1.
        neg_for_texts: (B, k') LongTensor of image row indices per caption; ``-1`` = ignore.
        margin: M >= 0, in the units of ``sim`` (the thesis uses 1 with dot products).
        reduction: ``"mean"`` over valid terms (0 when there are none) or ``"sum"``.

    Returns:
        Scalar loss, in float32 for half-precision ``sim``.
    """
    n = _check_square(sim)
    margin = check_real("margin", margin)
    if margin < 0:
        raise ValueError(f"margin must be >= 0, got {margin}")
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    sim = sim.to(torch.promote_types(sim.dtype, torch.float32))
    neg_i = _check_negatives(neg_for_images, n, "neg_for_images", sim.device)
    neg_t = _check_negatives(neg_for_texts, n, "neg_for_texts", sim.device)
    pos = sim.diagonal()[:, None]  # (B, 1)
    valid_i, valid_t = neg_i >= 0, neg_t >= 0
    s_neg_i = sim.gather(1, neg_i.clamp(min=0))  # S[i, neg_i[i, j]]
    s_neg_t = sim.gather(0, neg_t.clamp(min=0).T).T  # S[neg_t[i, j], i]; gathering along dim 0 keeps the
    # backward's scatter contiguous (sim.T.gather costs a transposed copy of the (B, B) gradient)
    hinge_i = torch.relu(margin - pos + s_neg_i) * valid_i
    hinge_t = torch.relu(margin - pos + s_neg_t) * valid_t
    total = hinge_i.sum() + hinge_t.sum()
    if reduction == "sum":
        return total
    return total / (valid_i.sum() + valid_t.sum()).clamp(min=1)


@keyword_settings(old_order=("margin", "reduction"))
def triplet_loss_embeddings(
    img: torch.Tensor,
    txt: torch.Tensor,
    neg_for_images: torch.Tensor,
    neg_for_texts: torch.Tensor,
    *,
    margin: float = 0.2,
    reduction: str = "mean",
) -> torch.Tensor:
    """:func:`triplet_loss` on the cosine similarities of (B, D) image and (B, D) caption embeddings."""
    if isinstance(img, torch.Tensor) and isinstance(txt, torch.Tensor) and (img.shape != txt.shape or img.dim() != 2):
        raise ValueError(
            f"expected paired (B, D) embeddings of the same shape, got {tuple(img.shape)} and {tuple(txt.shape)}"
        )
    check_pair(img, txt, names=("img", "txt"))
    return triplet_loss(similarity(img, txt), neg_for_images, neg_for_texts, margin=margin, reduction=reduction)


def _check_square(sim: torch.Tensor) -> int:
    return check_sim(sim)


def _check_negatives(neg: torch.Tensor, n: int, name: str, device) -> torch.Tensor:
    """Validate miner output: (n, k) integer indices in [-1, n), never the anchor's own positive."""
    neg = torch.as_tensor(neg, device=device)
    if neg.is_complex():
        raise ValueError(f"{name} must hold integer indices (a LongTensor), got dtype {neg.dtype}")
    if neg.dim() == 1:
        neg = neg[:, None]
    if neg.dtype.is_floating_point or neg.dtype == torch.bool:
        raise ValueError(f"{name} must hold integer indices (a LongTensor), got dtype {neg.dtype}")
    if neg.dim() != 2 or neg.shape[0] != n:
        raise ValueError(f"{name} must have shape ({n}, k), one row per anchor, got {tuple(neg.shape)}")
    # value scans (one fused pass; off under checks.disabled(), like the finiteness scans)
    if checks.enabled() and neg.numel():
        own = neg == torch.arange(n, device=neg.device)[:, None]
        if bool(((neg < -1) | (neg >= n) | own).any()):
            out_of_range = (neg < -1) | (neg >= n)
            if bool(out_of_range.any()):
                bad = neg[out_of_range][0].item()
                raise ValueError(f"{name} holds index {bad}, out of range: use 0..{n - 1}, or -1 for 'no negative'")
            raise ValueError(f"{name} lists an anchor's own positive (index i in row i) as a negative; check the miner")
    return neg.long()
