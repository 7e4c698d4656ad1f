r"""Multi-view contrastive losses: which pairs of views to contrast when there are more than two.

Given V views of the same B items (an image and captions in several languages, or image, depth and
text), a pairwise loss :math:`L_{sym}` (InfoNCE by default) can be applied to different sets of view
pairs. Tian et al. (2020, "Contrastive Multiview Coding", CMC) define the *full graph* (every pair)
and the *core view* / anchor (every view against one view). Crabtree's thesis (trilingual
image-speech alignment, ch. 2.3 and ch. 4) compares four choices, all implemented here:

=================  ==========================================================  ===============
mode               terms (view 0 is the image by convention)                   number of terms
=================  ==========================================================  ===============
``full``           :math:`L(V_i, V_j)` for every pair :math:`i < j`            V(V-1)/2
``image_anchor``   :math:`L(V_0, V_v)` for :math:`v = 1..V-1`                  V-1
``mean_anchor``    :math:`L(\bar V, V_v)`, :math:`\bar V = \frac1V\sum_u V_u`   V
``others_anchor``  :math:`L(\bar V_{-v}, V_v)`, mean of the other views          V
=================  ==========================================================  ===============

The thesis (sec. 2.3) averages the terms: :math:`L_{graph} = \frac{1}{|pairs|}\sum_{j<t} L_{sym}(V_j,V_t)`
and :math:`L_{anchor}(i) = \frac{1}{K-1}\sum_{t\ne i} L_{sym}(V_i,V_t)` (its full-graph formula is
printed with :math:`t \ge j` and :math:`K(K+1)/2`; we read it as distinct pairs, since a view is never
contrasted with itself). ``reduction="sum"`` gives CMC's unnormalised sum instead.
In the thesis the average-all anchor failed to learn (every view sits on both sides of its own
term) and the average-others anchor kept cross-lingual retrieval close to the full graph at linear cost.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from .._deprecation import keyword_settings
from ..checks import check_int, check_tensor
from ._checks import check_all_finite
from .info_nce import info_nce

MODES = ("full", "image_anchor", "mean_anchor", "others_anchor")


def n_loss_terms(V: int, mode: str = "full") -> int:
    """Closed-form number of pairwise terms: V(V-1)/2 (full), V-1 (image anchor), V (mean anchors)."""
    _check_mode(mode)
    V = check_int("V", V)
    if V < 2:
        raise ValueError(f"a multi-view loss needs at least 2 views, got V={V}")
    return {"full": V * (V - 1) // 2, "image_anchor": V - 1, "mean_anchor": V, "others_anchor": V}[mode]


def term_keys(V: int, mode: str = "full") -> list[tuple]:
    """The terms of ``mode`` in the order they are summed, as the keys ``weights`` uses.

    ``full``: ``(i, j)`` with i < j; ``image_anchor``: ``(0, v)``; ``mean_anchor``: ``("mean", v)``;
    ``others_anchor``: ``("others", v)``; ``v`` is the index of the view contrasted with the anchor.
    """
    n_loss_terms(V, mode)  # validates V and mode
    if mode == "full":
        return [(i, j) for i in range(V) for j in range(i + 1, V)]
    if mode == "image_anchor":
        return [(0, v) for v in range(1, V)]
    return [("mean" if mode == "mean_anchor" else "others", v) for v in range(V)]


@keyword_settings(old_order=("mode", "pair_loss", "weights", "reduction", "detach_anchor"))
def multiview_loss(
    views: Sequence[torch.Tensor],
    *,
    mode: str = "full",
    pair_loss: Callable[..., torch.Tensor] = info_nce,
    weights: dict | torch.Tensor | Sequence[float] | None = None,
    reduction: str = "mean",
    detach_anchor: bool = False,
    **pair_kwargs,
) -> tuple[torch.Tensor, int]:
    r"""Contrast V views with a pairwise loss over the pairs that ``mode`` selects.

    .. math::
        L = \frac{1}{T}\sum_{k=1}^{T} w_k\, L_{pair}(A_k, V_{v_k})

    where term k contrasts an anchor :math:`A_k` (a view :math:`V_i`, the mean of all views, or the
    mean of the views other than :math:`v_k`) with view :math:`V_{v_k}`; T is :func:`n_loss_terms`
    (the :math:`1/T` is dropped with ``reduction="sum"``). Means are taken over the embeddings as
    given; L2-normalise the views first if you want a centroid on the sphere.

    Args:
        views: V >= 2 tensors of shape (B, D); row i of every view is the same item; view 0 is the image.
        mode: ``"full"``, ``"image_anchor"``, ``"mean_anchor"`` or ``"others_anchor"`` (module table).
        pair_loss: ``pair_loss(a, b, **pair_kwargs) -> scalar``; symmetric InfoNCE by default.
        weights: per-term weights :math:`w_k` (default 1): a dict keyed as in :func:`term_keys`
            (missing keys weigh 1; ``(j, i)`` is accepted for ``(i, j)`` in ``full`` mode), or a
            (T,) tensor/sequence in :func:`term_keys` order (a tensor may require grad).
        reduction: ``"mean"`` (thesis, default) or ``"sum"`` (CMC).
        detach_anchor: stop gradients through the mean anchors (an option the thesis did not try).
        **pair_kwargs: passed to ``pair_loss`` (e.g. ``temperature=0.05``).

    Returns:
        ``(loss, n_terms)``: the scalar loss and T.

    References: Tian, Krishnan & Isola, "Contrastive Multiview Coding", ECCV 2020; Crabtree, master's
    thesis (UT Austin), ch. 4 "Loss Complexity".
    """
    if not isinstance(views, (list, tuple)) or len(views) < 2:
        raise ValueError("views must be a list of at least 2 (B, D) tensors, view 0 being the image")
    for i, v in enumerate(views):
        if not isinstance(v, torch.Tensor):
            raise TypeError(f"views[{i}] must be a (B, D) torch.Tensor, got {type(v).__name__}")
    if not callable(pair_loss):
        raise TypeError(f"pair_loss must be callable (a, b, **kwargs) -> scalar, got {type(pair_loss).__name__}")
    shapes = {tuple(v.shape) for v in views}
    if len(shapes) != 1 or views[0].dim() != 2:
        raise ValueError(f"every view must be (B, D) with the same B and D, got shapes {[tuple(v.shape) for v in views]}")
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    for i, v in enumerate(views):
        check_tensor(f"views[{i}]", v, ndim=2, finite=False)
    check_all_finite(*((f"views[{i}]", v) for i, v in enumerate(views)))
    V = len(views)
    keys = term_keys(V, mode)
    w = _weights(weights, keys, views[0].device)

    stacked = torch.stack(list(views))  # (V, B, D)
    total = stacked.sum(0)
    terms = []
    for i, v in keys:
        if mode in ("full", "image_anchor"):
            anchor = views[i]
        else:
            anchor = total / V if mode == "mean_anchor" else (total - stacked[v]) / (V - 1)
            anchor = anchor.detach() if detach_anchor else anchor
        terms.append(pair_loss(anchor, views[v], **pair_kwargs))
    terms = torch.stack(terms)
    loss = (terms * w.to(terms.dtype)).sum()
    return (loss / len(keys) if reduction == "mean" else loss), len(keys)


def _check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"unknown multi-view mode {mode!r}; choose one of {MODES}")


def _weights(weights, keys: list[tuple], device) -> torch.Tensor:
    """(T,) float32 weights in ``keys`` order from None, a dict or a tensor/sequence."""
    if weights is None:
        return torch.ones(len(keys), device=device)
    if isinstance(weights, dict):
        index = {k: n for n, k in enumerate(keys)}
        out = [1.0] * len(keys)
        for k, val in weights.items():
            k = tuple(k)
            if k not in index and k[::-1] in index and all(isinstance(x, int) for x in k):
                k = k[::-1]
            if k not in index:
                raise ValueError(f"weight key {k} is not a term of this mode; valid keys: {keys}")
            out[index[k]] = val
        for k, val in zip(keys, out):
            if not isinstance(val, torch.Tensor) and (isinstance(val, bool) or not isinstance(val, (int, float))
                                                      or val != val or abs(val) == float("inf")):
                raise ValueError(f"weight of term {k} must be a finite number, got {val!r}")
        return torch.stack([torch.as_tensor(x, dtype=torch.float32, device=device) for x in out])
    if isinstance(weights, torch.Tensor) and (weights.is_complex() or not weights.dtype.is_floating_point
                                              and weights.dtype == torch.bool):
        raise ValueError(f"weights must be real numbers, got a {weights.dtype} tensor")
    w = weights if isinstance(weights, torch.Tensor) else torch.as_tensor(weights, dtype=torch.float32, device=device)
    if w.shape != (len(keys),):
        raise ValueError(
            f"weights must have one entry per term, shape ({len(keys)},) in term_keys order {keys}; got {tuple(w.shape)}"
        )
    check_all_finite(("weights", w.float()))
    return w.to(device)
