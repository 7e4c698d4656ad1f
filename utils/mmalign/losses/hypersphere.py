"""Hypersphere loss: alignment + uniformity of unit-norm embeddings (Wang & Isola, 2020), in the
cross-view form of the thesis (eq. 2.10)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .._deprecation import keyword_settings
from ..checks import check_real
from ._checks import check_pair


@keyword_settings(old_order=("alpha", "t", "lambda_align", "lambda_uniform", "log_uniformity"))
def hypersphere_loss(
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    alpha: float = 2,
    t: float = 2,
    lambda_align: float = 1,
    lambda_uniform: float = 1,
    log_uniformity: bool = False,
) -> torch.Tensor:
    r"""Alignment of paired embeddings plus uniformity across pairs, on the unit hypersphere.

    With :math:`x_i, y_i` L2-normalised (done here),

    .. math::
        \mathcal L_{align} = \frac1B \sum_i \lVert x_i - y_i \rVert_2^{\alpha}, \qquad
        \mathcal L_{unif} = \frac{1}{B(B+1)/2} \sum_{i=1}^{B} \sum_{j \ge i} e^{-t \lVert x_i - y_j \rVert_2^2},

    .. math::
        L = \lambda_a \mathcal L_{align} + \lambda_u \mathcal L_{unif}   \qquad \text{(thesis eq. 2.10)}.

    The thesis writes the uniformity without a log and over cross-view pairs j >= i (so the B
    positive pairs j = i are included); that is the default. ``log_uniformity=True`` takes the log
    of the same mean (via log-sum-exp), the form of Wang & Isola, whose gradient does not vanish
    when the embeddings are already spread out. Note that Wang & Isola compute uniformity within
    one view (pairs i < j of x, and of y) rather than across views; we keep the thesis' pairing.

    Args:
        x, y: (B, D) paired embeddings of two views.
        alpha: exponent of the alignment distance (Wang & Isola use 2).
        t: uniformity temperature t > 0 (Wang & Isola use 2).
        lambda_align, lambda_uniform: weights of the two terms.
        log_uniformity: use :math:`\log \mathcal L_{unif}` (Wang & Isola) instead of :math:`\mathcal L_{unif}`.

    Returns:
        Scalar loss (float32 for half-precision inputs).
    """
    check_pair(x, y, names=("x", "y"))
    alpha, t = check_real("alpha", alpha), check_real("t", t)
    lambda_align, lambda_uniform = check_real("lambda_align", lambda_align), check_real("lambda_uniform", lambda_uniform)
    if alpha <= 0 or t <= 0:
        raise ValueError(f"alpha and t must be > 0, got alpha={alpha}, t={t}")
    dtype = torch.promote_types(x.dtype, torch.float32)
    x, y = F.normalize(x.to(dtype), dim=-1), F.normalize(y.to(dtype), dim=-1)
    n = x.shape[0]
    # ||x - y||^alpha = (||x - y||^2)^(alpha/2); at distance 0 (identical pairs) the value and the
    # gradient are 0: the where() keeps pow's infinite derivative (alpha < 1) and norm's 0/0 out of the graph.
    d2 = (x - y).pow(2).sum(dim=1)
    nonzero = d2 > 0
    align = torch.where(nonzero, torch.where(nonzero, d2, 1.0).pow(alpha / 2), 0.0).mean()
    sq_dist = (2 - 2 * x @ y.T).clamp(min=0)  # ||x_i - y_j||^2 for unit vectors
    upper = torch.ones(n, n, dtype=torch.bool, device=x.device).triu()  # j >= i
    exponents = -t * sq_dist[upper]  # B(B+1)/2 terms
    if log_uniformity:
        uniform = torch.logsumexp(exponents, dim=0) - math.log(exponents.numel())
    else:
        uniform = exponents.exp().mean()
    return lambda_align * align + lambda_uniform * uniform
