"""MoCo's contrastive loss: one positive key against a queue of negative keys (He et al., 2020),
the per-direction form of ALBEF's queued image-text contrastive loss (Li et al., 2021)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .._deprecation import keyword_settings
from ..checks import check_id_pair, check_tensor
from ._checks import check_all_finite, check_temperature


@keyword_settings(old_order=("temperature", "q_ids", "queue_ids"), id_pairs={("q_ids", "queue_ids"): "ids"})
def moco_loss(
    q: torch.Tensor,
    k_pos: torch.Tensor,
    queue_keys: torch.Tensor,
    *,
    temperature: float = 0.07,
    ids: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    r"""InfoNCE of each query against its own key (class 0) and the queued keys (He et al., 2020, Eq. 1).

    With unit vectors :math:`q_n, k_n, \kappa_j` and :math:`M` the queue entries that are copies of
    :math:`q_n`'s item (equal ids), which are left out:

    .. math::
        \ell_n = -\log\frac{e^{q_n\cdot k_n/\tau}}
            {e^{q_n\cdot k_n/\tau} + \sum_{j\notin M} e^{q_n\cdot \kappa_j/\tau}},
        \qquad L = \frac{1}{N}\sum_n \ell_n .

    The logits ``[q.k_pos, q.queue] / T`` are built in float32 (float64 inputs stay float64), also
    under autocast, and reduced with ``F.cross_entropy`` (target 0); masked entries are set to
    -inf. Keys are constants: ``k_pos`` and ``queue_keys`` are detached, as in MoCo where they come
    from the momentum encoder. For ALBEF's image-text loss call it twice, with image queries against
    the text queue and text queries against the image queue, and average.

    Args:
        q: (N, D) queries (gradients flow into them); L2-normalised here.
        k_pos: (N, D) positive key of each query; L2-normalised here.
        queue_keys: (K, D) negative keys, K >= 0 (e.g. ``MoCoQueue.keys``); L2-normalised here.
        temperature: tau > 0 (0.07 in MoCo).
        ids: optional pair ``(ids of q (N,), ids of the queue (K,))`` of item ids (e.g.
            ``(batch_ids, queue.ids)``); a queue key whose id equals the query's id is not a negative.

    Returns:
        The scalar loss (float32, or float64 for float64 inputs).
    """
    for name, t in (("q", q), ("k_pos", k_pos), ("queue_keys", queue_keys)):
        if not isinstance(t, torch.Tensor) or t.dim() != 2:
            shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{name} must be a 2-d (batch, dim) tensor, got {shape}")
        check_tensor(name, t, ndim=2, finite=False, nonempty=False)
    if q.shape != k_pos.shape:
        raise ValueError(
            f"q and k_pos must have the same shape (one positive key per query), "
            f"got {tuple(q.shape)} and {tuple(k_pos.shape)}"
        )
    if q.shape[0] == 0:
        raise ValueError("empty batch of queries")
    if queue_keys.shape[1] != q.shape[1]:
        raise ValueError(
            f"queue keys have dim {queue_keys.shape[1]} but queries have dim {q.shape[1]}; "
            f"build the queue with dim={q.shape[1]}"
        )
    check_temperature(temperature)
    if ids is not None and (not isinstance(ids, (tuple, list)) or len(ids) != 2 or ids[0] is None or ids[1] is None):
        raise ValueError("ids must be a pair (ids of q (N,), ids of the queue (K,)), e.g. ids=(batch_ids, queue.ids), "
                         "to mask copies of the positive; or None")
    check_all_finite(("q", q), ("k_pos", k_pos), ("queue_keys", queue_keys))

    dtype = torch.promote_types(q.dtype, torch.float32)
    with torch.autocast(device_type=q.device.type, enabled=False):
        q = F.normalize(q.to(dtype), dim=-1)
        k_pos = F.normalize(k_pos.detach().to(q.device, dtype), dim=-1)
        queue_keys = F.normalize(queue_keys.detach().to(q.device, dtype), dim=-1)
        l_pos = (q * k_pos).sum(dim=1, keepdim=True)  # (N, 1)
        l_neg = q @ queue_keys.T  # (N, K)
        logits = torch.cat([l_pos, l_neg], dim=1) / temperature
        if ids is not None:  # mask after dividing: -inf / tau would give a learned tau a NaN gradient
            q_ids, queue_ids = check_id_pair(ids, q.shape[0], queue_keys.shape[0], device=q.device,
                                             sides=("q", "the queue"))
            same = torch.cat([torch.zeros_like(q_ids[:, None], dtype=torch.bool), q_ids[:, None] == queue_ids[None, :]], 1)
            logits = logits.masked_fill(same, float("-inf"))
        target = torch.zeros(q.shape[0], dtype=torch.long, device=q.device)
        return F.cross_entropy(logits, target)
