"""SigLIP: the sigmoid loss of every (image, caption) pair (Zhai et al., 2023, "Sigmoid Loss for Language
Image Pre-Training")."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..retrieval import _similarity
from ._checks import check_pair, check_temperature, positive_mask

__all__ = ["siglip_loss"]


def _check_bias(bias) -> float:
    """The logit bias b: a finite real number, or a 0-d tensor (a learned bias)."""
    if isinstance(bias, torch.Tensor):
        if bias.numel() != 1:
            raise ValueError(f"bias must be a number, got a tensor of shape {tuple(bias.shape)}")
        if bias.dtype.is_complex or bias.dtype == torch.bool:
            raise ValueError(f"bias must be real, got a tensor of dtype {bias.dtype}")
        value = float(bias.detach())
    elif isinstance(bias, (int, float)) and not isinstance(bias, bool):
        value = float(bias)
    else:
        raise ValueError(f"bias must be a real number or a 0-d tensor (e.g. -10.0), got {type(bias).__name__}")
    if value != value or value in (float("inf"), float("-inf")):
        raise ValueError(f"bias must be finite, got {value}")
    return value


def _siglip_logits_loss(logits: torch.Tensor, pos: torch.Tensor, n_rows: int) -> torch.Tensor:
    """``-sum log sigmoid(z * logits) / n_rows`` with z = +1 on ``pos`` and -1 elsewhere (no checks)."""
    signs = pos.to(logits.dtype) * 2 - 1
    return -F.logsigmoid(signs * logits).sum() / n_rows


def siglip_loss(
    a: torch.Tensor,
    b: torch.Tensor,
    *,
    temperature: float | torch.Tensor = 0.1,
    bias: float | torch.Tensor = -10.0,
    ids=None,
    normalize: bool = True,
) -> torch.Tensor:
    r"""Sigmoid pairwise loss: every (row, column) pair is a binary "matching or not" problem.

    With :math:`s_{ij} = \cos(a_i, b_j)`, :math:`z_{ij} = +1` for a positive pair (equal ids, or the
    diagonal) and :math:`-1` otherwise,

    .. math::
        L = -\frac{1}{N}\sum_{i=1}^{N}\sum_{j=1}^{M}
            \log \sigma\!\big(z_{ij}\,(s_{ij}/\tau + b)\big).

    The paper learns :math:`t = 1/\tau` (as :math:`e^{t'}`, initialised at 10) and the bias :math:`b`
    (initialised at -10, so that the many negatives do not dominate the first steps); pass a
    :class:`mmalign.models.temperature.LearnableTemperature`'s output and an ``nn.Parameter`` to learn
    them. Unlike InfoNCE there is no softmax over the batch: each pair's term needs only its own
    logit, which is what lets the paper compute the loss chunk by chunk across devices
    (:func:`mmalign.dist.gathered_siglip_loss`).

    Args:
        a: (N, D) embeddings of one view (e.g. images).
        b: (M, D) embeddings of the other view (e.g. captions).
        temperature: tau > 0 (a float or a 0-d tensor, e.g. a learned temperature).
        bias: b, a finite float or a 0-d tensor (e.g. an ``nn.Parameter``).
        ids: optional item ids, one (N,) tensor when a and b share them (N == M) or a pair
            ``(ids_a (N,), ids_b (M,))``; pairs with equal ids are positives (several per row allowed).
            Without them, N must equal M and the positives are the diagonal.
        normalize: L2-normalise a and b first (cosine similarity).

    Returns:
        The scalar loss (float32 even when the inputs are half precision), summed over pairs and
        divided by the number of rows N, as in the paper.
    """
    check_pair(a, b, same_length=ids is None)
    check_temperature(temperature)
    _check_bias(bias)
    pos = positive_mask(ids, a.shape[0], b.shape[0], a.device)
    logits = _similarity(a, b, normalize) / temperature + bias
    return _siglip_logits_loss(logits, pos, a.shape[0])
