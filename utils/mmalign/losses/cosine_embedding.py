"""Cosine embedding loss on signed pairs (as ``torch.nn.CosineEmbeddingLoss``), the loss of the WIT
dual encoder (EfficientNet-B0 + BERT, trained with LAMB), and a sampler of +1/-1 pairs from a batch."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .._deprecation import keyword_settings
from ..checks import check_int, check_real
from ._checks import check_pair


@keyword_settings(old_order=("margin",))
def cosine_embedding_loss(a: torch.Tensor, b: torch.Tensor, target: torch.Tensor, *, margin: float = 0.0) -> torch.Tensor:
    r"""Mean cosine embedding loss over N signed pairs (same as ``torch.nn.CosineEmbeddingLoss``).

    .. math::
        \ell_i = \begin{cases} 1 - \cos(a_i, b_i) & y_i = +1 \\
                               \max(0, \cos(a_i, b_i) - m) & y_i = -1 \end{cases},
        \qquad L = \frac1N \sum_i \ell_i .

    Args:
        a, b: (N, D) embeddings; pair i is (a_i, b_i).
        target: (N,) of +1 (matching pair) or -1 (non-matching pair).
        margin: m in [-1, 1]; negatives with cosine below m cost nothing (0 to 0.5 is typical).

    Returns:
        Scalar loss (float32 for half-precision inputs).
    """
    check_pair(a, b)
    target = torch.as_tensor(target, device=a.device)
    if target.is_complex():
        raise ValueError(f"target must hold +1 and -1, got a {target.dtype} tensor")
    if target.shape != (a.shape[0],):
        raise ValueError(f"target must have shape ({a.shape[0]},), one +1/-1 per pair, got {tuple(target.shape)}")
    if not bool(((target == 1) | (target == -1)).all()):
        raise ValueError("target must hold only +1 (matching pair) and -1 (non-matching pair); 0/1 labels: use 2*y-1")
    margin = check_real("margin", margin)
    if not -1 <= margin <= 1:
        raise ValueError(f"margin must be in [-1, 1] (it is compared with a cosine), got {margin}")
    dtype = torch.promote_types(a.dtype, torch.float32)
    cos = F.cosine_similarity(a.to(dtype), b.to(dtype), dim=-1)
    return torch.where(target == 1, 1 - cos, torch.relu(cos - margin)).mean()


@keyword_settings(old_order=("negatives_per_positive", "generator", "item_ids"), renamed={"item_ids": "ids"})
def make_signed_pairs(
    n: int,
    *,
    negatives_per_positive: int = 1,
    generator: torch.Generator | None = None,
    ids: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Index pairs and +1/-1 targets from a paired batch of n (image i, caption i) pairs.

    Every diagonal pair (i, i) is a +1 pair; for each i, ``negatives_per_positive`` distinct columns j
    whose item id differs from i's are drawn uniformly as -1 pairs (fewer if fewer exist). Use as
    ``cosine_embedding_loss(img[ia], txt[ib], target)``.

    Args:
        n: batch size.
        negatives_per_positive: k >= 0 negatives drawn per positive.
        generator: torch.Generator for reproducible draws; its device is the output device
            (else ids' device, else CPU).
        ids: optional (n,) item ids; a negative never shares the anchor's id. Default: all distinct.

    Returns:
        ``(ia, ib, target)``: three (P,) tensors, ia/ib LongTensor row/column indices, target in {+1, -1}
        (float); the n positives come first, then the negatives ordered by anchor.
    """
    n = check_int("n", n)
    negatives_per_positive = check_int("negatives_per_positive", negatives_per_positive)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    if n <= 0 or negatives_per_positive < 0:
        raise ValueError(f"need n > 0 and negatives_per_positive >= 0, got n={n}, {negatives_per_positive}")
    if generator is not None:
        device = generator.device
    else:
        device = ids.device if isinstance(ids, torch.Tensor) else torch.device("cpu")
    ids = torch.arange(n, device=device) if ids is None else torch.as_tensor(ids).to(device)
    if ids.shape != (n,):
        raise ValueError(f"ids must have shape ({n},), got {tuple(ids.shape)}")
    allowed = ids[:, None] != ids[None, :]  # (n, n): j may be a negative of i
    k = min(negatives_per_positive, n)
    # Random scores, -1 where not allowed: the top k of each row are k distinct uniform draws.
    scores = torch.rand(n, n, generator=generator, device=device).masked_fill(~allowed, -1.0)
    top, cols = scores.topk(k, dim=1)
    keep = top >= 0
    rows = torch.arange(n, device=device)[:, None].expand(n, k)
    ia = torch.cat([torch.arange(n, device=device), rows[keep]])
    ib = torch.cat([torch.arange(n, device=device), cols[keep]])
    target = torch.cat([torch.ones(n, device=device), -torch.ones(int(keep.sum()), device=device)])
    return ia, ib, target
