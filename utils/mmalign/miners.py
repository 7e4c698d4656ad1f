"""Negative miners: pick, for every anchor of a similarity matrix, which negatives a triplet loss uses.

Conventions (CONTRIBUTING.md): ``sim`` is ``(B_img, B_txt)``, rows are images, columns are captions;
``ids`` (one tensor for a square ``sim``, or a pair (row ids, column ids)) say which rows and
columns are the same item, and a pair with equal ids is
never a negative. Every miner works in both directions and returns

* ``neg_for_images`` ``(B_img, k)``: caption column indices, the negatives of each image anchor;
* ``neg_for_texts`` ``(B_txt, k)``: image row indices, the negatives of each caption anchor;

as LongTensors on ``sim``'s device, with ``-1`` where an anchor has fewer than ``k`` negatives.

Ties are broken deterministically: among equal scores the lower index comes first (a stable sort),
so the same matrix always gives the same answer on any device.

The positive of an anchor (needed by :func:`semi_hard_negatives` and the diagnostics) is the *paired*
positive: image ``i``'s positive is caption column ``pos_for_images[i]`` and caption ``j``'s is image
row ``pos_for_texts[j]``; both default to the diagonal (``i -> i``), which needs a square ``sim``.
Other captions of the same item are then neither the positive nor negatives: they are ignored.
"""

from __future__ import annotations

import torch

from ._deprecation import keyword_settings
from .checks import check_finite, check_id_pair, check_real

__all__ = [
    "random_negatives",
    "hardest_negatives",
    "semi_hard_negatives",
    "anchor_negative_gaps",
    "margin_violation_fraction",
]


# --------------------------------------------------------------------------------------------------
# checks and the one primitive every miner uses
# --------------------------------------------------------------------------------------------------
def _check_sim(sim: torch.Tensor) -> None:
    if not isinstance(sim, torch.Tensor) or sim.dim() != 2:
        shape = tuple(sim.shape) if isinstance(sim, torch.Tensor) else type(sim).__name__
        raise ValueError(f"sim must be a 2-d (B_img, B_txt) similarity matrix, got {shape}; compute img @ txt.T first")
    if sim.numel() == 0:
        raise ValueError(f"sim is empty (shape {tuple(sim.shape)}); mine on a non-empty batch")
    if not sim.is_floating_point():
        raise ValueError(f"sim must be a floating-point tensor, got {sim.dtype}; cast it with sim.float()")
    try:
        check_finite("sim", sim)
    except ValueError as err:
        raise ValueError(f"{err}; exclude pairs through item ids instead of masking sim") from None


def _check_k(k: int) -> None:
    if isinstance(k, torch.Tensor) and k.numel() == 1 and not k.is_floating_point():
        k = int(k)
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive integer (negatives per anchor), got {k!r}")


def _negative_mask(sim: torch.Tensor, ids) -> torch.Tensor:
    """(B_img, B_txt) bool mask of valid negatives: pairs whose item ids differ."""
    n_img, n_txt = sim.shape
    if ids is None and n_img != n_txt:
        raise ValueError(f"sim is {n_img}x{n_txt} (not square): pass ids=(row ids, column ids) to say which rows "
                         "and columns match")
    pair = check_id_pair(ids, n_img, n_txt, device=sim.device, sides=("rows", "columns"))
    if pair is None:
        return ~torch.eye(n_img, dtype=torch.bool, device=sim.device)
    return pair[0][:, None] != pair[1][None, :]


def _topk_rows(scores: torch.Tensor, keep: torch.Tensor, k: int) -> torch.Tensor:
    """Column indices of the k largest ``scores`` per row among ``keep``; -1 pads short rows.

    A stable descending sort puts equal scores in index order, which is the tie rule of this module.
    """
    masked = scores.masked_fill(~keep, float("-inf"))
    idx = None
    if k == 1:  # argmax returns the first maximal index: the same tie rule, without a sort
        idx = masked.argmax(1, keepdim=True)
    elif k < masked.shape[1]:
        kth = torch.topk(masked, k, dim=1).values[:, -1:]
        if not bool(((masked >= kth).sum(1) > k).any()):  # no tie across the k-th place: the set is exact
            sel = torch.topk(masked, k, dim=1).indices.sort(1).values  # index order, then a stable sort by score
            idx = sel.gather(1, torch.sort(masked.gather(1, sel), dim=1, descending=True, stable=True).indices)
    if idx is None:  # ties at the boundary (or k >= the number of columns): the full stable sort
        idx = torch.sort(masked, dim=1, descending=True, stable=True).indices[:, :k]
    n_keep = keep.sum(1, keepdim=True)
    slot = torch.arange(idx.shape[1], device=scores.device)
    idx = torch.where(slot[None, :] < n_keep, idx, torch.full_like(idx, -1))
    if idx.shape[1] < k:  # fewer candidates than k in every row
        idx = torch.cat([idx, idx.new_full((idx.shape[0], k - idx.shape[1]), -1)], dim=1)
    return idx


def _paired_positive(s: torch.Tensor, valid, pos, name: str) -> torch.Tensor:
    """s_pos (B,) of the anchors on the rows of ``s`` (B, M): ``s[a, pos[a]]``, pos defaulting to the
    diagonal. ``valid`` (optional, (B, M) negative mask) checks that no positive is a negative."""
    n, m = s.shape
    if pos is None:
        if n != m:
            raise ValueError(
                f"sim is not square, so there is no diagonal to take the positives from: "
                f"pass {name} with the index of each anchor's paired positive"
            )
        pos = torch.arange(n, device=s.device)
    pos = torch.as_tensor(pos, device=s.device)
    if pos.shape != (n,) or pos.dtype == torch.bool or pos.is_floating_point():
        raise ValueError(f"{name} must be {n} integer indices, one per anchor, got {pos.dtype} {tuple(pos.shape)}")
    if int(pos.min()) < 0 or int(pos.max()) >= m:
        raise ValueError(
            f"{name} must index the other side (0..{m - 1}), got values in [{int(pos.min())}, {int(pos.max())}]"
        )
    rows = torch.arange(n, device=s.device)
    if valid is not None and bool(valid[rows, pos].any()):
        raise ValueError(f"{name} points at an item with a different id; make it point at each anchor's paired item")
    return s[rows, pos]


# --------------------------------------------------------------------------------------------------
# miners
# --------------------------------------------------------------------------------------------------
@keyword_settings(old_order=("img_ids", "txt_ids", "k", "generator"), id_pairs={("img_ids", "txt_ids"): "ids"})
def random_negatives(
    sim: torch.Tensor,
    *,
    ids=None,
    k: int = 1,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""k negatives per anchor drawn uniformly, without replacement, among the valid negatives.

    Each valid pair gets an independent score :math:`u_{ij} \sim U(0, 1)` and every anchor keeps the
    k largest, which is a uniform draw of a k-subset (the values of ``sim`` are not used, only its
    shape and device). This is the baseline sampler of the triplet loss (Schroff et al., 2015).

    Args:
        sim: (B_img, B_txt) similarity matrix.
        ids: optional item ids, one (B,) tensor for a square ``sim`` or a pair ``(row ids (B_img,), column ids
            (B_txt,))``; equal ids are never negatives. Default: the diagonal pairs.
        k: negatives per anchor (>= 1); anchors with fewer valid negatives are padded with -1.
        generator: a ``torch.Generator`` for reproducible draws (on any device; the draw is moved
            to ``sim``'s device). The same generator state always gives the same negatives.

    Returns:
        ``(neg_for_images (B_img, k), neg_for_texts (B_txt, k))`` LongTensors, -1 = none.
    """
    _check_sim(sim)
    _check_k(k)
    valid = _negative_mask(sim, ids)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    gen_device = generator.device if generator is not None else sim.device
    u = torch.rand(sim.shape, generator=generator, device=gen_device).to(sim.device)
    return _topk_rows(u, valid, k), _topk_rows(u.T, valid.T, k)


@keyword_settings(old_order=("img_ids", "txt_ids", "k"), id_pairs={("img_ids", "txt_ids"): "ids"})
def hardest_negatives(
    sim: torch.Tensor,
    *,
    ids=None,
    k: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""The k most similar valid negatives of every anchor, in both directions (VSE++ style).

    .. math::
        \mathrm{neg}(i) = \operatorname{top-}k_{\,j:\ \mathrm{id}_j \ne \mathrm{id}_i}\ s_{ij}

    for image rows, and the same over rows of :math:`s^\top` for caption anchors, ordered from the
    hardest; equal similarities are taken in index order. Faghri et al. (2018) use k = 1; the course
    homework uses k = 3 at batch 12.

    Args:
        sim: (B_img, B_txt) similarity matrix.
        ids: optional item ids, one (B,) tensor for a square ``sim`` or a pair ``(row ids (B_img,), column ids
            (B_txt,))``; equal ids are never negatives. Default: the diagonal pairs.
        k: negatives per anchor (>= 1); -1 where fewer than k valid negatives exist.

    Returns:
        ``(neg_for_images (B_img, k), neg_for_texts (B_txt, k))`` LongTensors, hardest first.
    """
    _check_sim(sim)
    _check_k(k)
    valid = _negative_mask(sim, ids)
    return _topk_rows(sim, valid, k), _topk_rows(sim.T, valid.T, k)


@keyword_settings(old_order=("img_ids", "txt_ids", "margin", "k", "fallback", "pos_for_images", "pos_for_texts"),
                  id_pairs={("img_ids", "txt_ids"): "ids"})
def semi_hard_negatives(
    sim: torch.Tensor,
    *,
    margin: float = 0.2,
    ids=None,
    k: int | None = 1,
    fallback: str = "hardest",
    pos_for_images: torch.Tensor | None = None,
    pos_for_texts: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Semi-hard negatives: less similar than the positive, but within the margin of it.

    For an anchor with positive similarity :math:`s_{\mathrm{pos}}`, a valid negative :math:`j`
    (different item id) is semi-hard when

    .. math::
        s_{\mathrm{pos}} - m < s_j < s_{\mathrm{pos}}

    (strict on both sides): it is ranked correctly yet still violates the margin, so the triplet
    loss is positive but not dominated by outliers (Schroff et al., 2015, FaceNet, Sec. 3.2, written
    with similarities instead of distances). Among them the k most similar are returned, hardest
    first, ties in index order.

    :math:`s_{\mathrm{pos}}` is the *paired* positive: for image i it is ``sim[i, pos_for_images[i]]``,
    for caption j it is ``sim[pos_for_texts[j], j]``; both default to the diagonal. Other captions
    of the same item are not used as positives and are never negatives.

    Args:
        sim: (B_img, B_txt) similarity matrix.
        ids: optional item ids, one (B,) tensor for a square ``sim`` or a pair ``(row ids (B_img,), column ids
            (B_txt,))``; equal ids are never negatives. Default: the diagonal pairs.
        margin: m > 0, the width of the window below the positive.
        k: negatives per anchor (>= 1); -1 pads anchors with fewer semi-hard negatives. ``None``: every
            semi-hard negative (all semi-hard triplets, as PML's ``TripletMarginMiner(type_of_triplets=
            "semihard")`` mines them) as a table with one column per candidate: entry j is j where
            candidate j is a semi-hard negative of the anchor, -1 elsewhere (one pass, no sort or
            compaction; every loss reads -1 as "none" wherever it sits).
        fallback: ``"hardest"``: an anchor with *no* semi-hard negative gets its k hardest
            negatives instead (as :func:`hardest_negatives`; its single hardest when ``k=None``);
            ``"none"``: it gets a row of -1.
        pos_for_images: optional (B_img,) caption index of each image's positive.
        pos_for_texts: optional (B_txt,) image index of each caption's positive.

    Returns:
        ``(neg_for_images (B_img, k), neg_for_texts (B_txt, k))`` LongTensors, -1 = none; with
        ``k=None``, (B_img, B_txt) and (B_txt, B_img).
    """
    _check_sim(sim)
    if k is not None:
        _check_k(k)
    margin = check_real("margin", margin)
    if not margin > 0:
        raise ValueError(f"margin must be > 0 for semi-hard mining (window (s_pos - margin, s_pos)), got {margin}")
    if fallback not in ("hardest", "none"):
        raise ValueError(f"fallback must be 'hardest' or 'none', got {fallback!r}")
    valid = _negative_mask(sim, ids)
    s_pos_img = _paired_positive(sim, valid, pos_for_images, "pos_for_images")
    s_pos_txt = _paired_positive(sim.T, valid.T, pos_for_texts, "pos_for_texts")
    out = []
    for s, v, s_pos in ((sim, valid, s_pos_img), (sim.T, valid.T, s_pos_txt)):
        window = v & (s < s_pos[:, None]) & (s > s_pos[:, None] - margin)
        if k is None:
            if fallback == "hardest":  # an anchor without any: its hardest negative, if it has one
                hardest = _topk_rows(s, v, 1)
                none = ~window.any(1, keepdim=True) & (hardest >= 0)
                window = window | (none & (torch.arange(s.shape[1], device=s.device) == hardest))
            columns = torch.arange(s.shape[1], device=s.device).expand_as(window)
            out.append(torch.where(window, columns, -1))
            continue
        neg = _topk_rows(s, window, k)
        if fallback == "hardest":
            neg = torch.where(neg[:, :1] == -1, _topk_rows(s, v, k), neg)
        out.append(neg)
    return out[0], out[1]


# --------------------------------------------------------------------------------------------------
# diagnostics for the chapter's plots
# --------------------------------------------------------------------------------------------------
def _check_neg(name: str, neg: torch.Tensor, n_anchor: int, n_other: int) -> None:
    if not isinstance(neg, torch.Tensor) or neg.dim() != 2 or neg.shape[0] != n_anchor:
        shape = tuple(neg.shape) if isinstance(neg, torch.Tensor) else type(neg).__name__
        raise ValueError(f"{name} must be ({n_anchor}, k) as returned by a miner, got {shape}")
    if neg.is_floating_point() or neg.dtype == torch.bool:
        raise ValueError(f"{name} must hold integer indices, got {neg.dtype}")
    if neg.numel() and (int(neg.min()) < -1 or int(neg.max()) >= n_other):
        raise ValueError(
            f"{name} holds indices outside -1..{n_other - 1}; did you swap neg_for_images and neg_for_texts?"
        )


@keyword_settings(old_order=("pos_for_images", "pos_for_texts"))
def anchor_negative_gaps(
    sim: torch.Tensor,
    neg_for_images: torch.Tensor,
    neg_for_texts: torch.Tensor,
    *,
    pos_for_images: torch.Tensor | None = None,
    pos_for_texts: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""The gap :math:`s_{\mathrm{pos}} - s_{\mathrm{neg}}` of every mined triplet, per direction.

    A triplet violates margin m when its gap is below m (its hinge loss
    :math:`\max(0, m - s_{\mathrm{pos}} + s_{\mathrm{neg}})` is positive); a histogram of the gaps
    shows how hard the mined negatives are. Positives as in :func:`semi_hard_negatives` (paired,
    diagonal by default).

    Args:
        sim: (B_img, B_txt) similarity matrix.
        neg_for_images: (B_img, k) caption indices from a miner, -1 ignored.
        neg_for_texts: (B_txt, k') image indices from a miner, -1 ignored.
        pos_for_images, pos_for_texts: optional positive indices, default the diagonal.

    Returns:
        ``(gaps_for_images, gaps_for_texts)``: 1-d tensors with one gap per valid triplet, in
        anchor-major order (anchor 0's negatives first).
    """
    _check_sim(sim)
    n_img, n_txt = sim.shape
    _check_neg("neg_for_images", neg_for_images, n_img, n_txt)
    _check_neg("neg_for_texts", neg_for_texts, n_txt, n_img)
    s_pos_img = _paired_positive(sim, None, pos_for_images, "pos_for_images")
    s_pos_txt = _paired_positive(sim.T, None, pos_for_texts, "pos_for_texts")
    out = []
    for s, neg, s_pos in ((sim, neg_for_images, s_pos_img), (sim.T, neg_for_texts, s_pos_txt)):
        neg = neg.to(sim.device)
        s_neg = s.gather(1, neg.clamp(min=0))
        out.append((s_pos[:, None] - s_neg)[neg >= 0])
    return out[0], out[1]


@keyword_settings(old_order=("margin", "pos_for_images", "pos_for_texts"))
def margin_violation_fraction(
    sim: torch.Tensor,
    neg_for_images: torch.Tensor,
    neg_for_texts: torch.Tensor,
    *,
    margin: float,
    pos_for_images: torch.Tensor | None = None,
    pos_for_texts: torch.Tensor | None = None,
) -> torch.Tensor:
    r"""Fraction of mined triplets (both directions together) that still violate the margin.

    .. math::
        \frac{\#\{(a, n) : s_{\mathrm{pos}}(a) - s_{an} < m\}}{\#\{(a, n)\}}

    over every anchor a and each of its mined negatives n (-1 entries ignored), i.e. the fraction of
    triplets with a non-zero hinge loss. Gaps from :func:`anchor_negative_gaps`.

    Returns:
        A 0-d float tensor in [0, 1]; NaN when there is no triplet at all.
    """
    margin = check_real("margin", margin)
    g_img, g_txt = anchor_negative_gaps(sim, neg_for_images, neg_for_texts, pos_for_images=pos_for_images,
                                        pos_for_texts=pos_for_texts)
    gaps = torch.cat([g_img, g_txt]).float()
    return (gaps < margin).float().mean() if gaps.numel() else gaps.new_tensor(float("nan"))
