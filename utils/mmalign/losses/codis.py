r"""The losses of CODIS (Duan et al., 2022), built on ALBEF (Li et al., 2021) and MoCo (He et al., 2020).

* :func:`distill_contrastive_loss`: one direction of the queued contrastive loss (ITC i2t / t2i, or the
  intra-modal i2i / t2t) with momentum-distillation soft targets of weight alpha;
* :func:`sample_hard_negatives`: ALBEF's ITM negatives, one per anchor, drawn from the softmax of the
  contrastive similarities, never a positive, robust at batch size 1 and 2;
* :func:`codebook_targets`, :func:`prototype_loss`, :func:`ot_cost_loss`: the codebook terms
  :math:`\mathcal{L}_{t2p}, \mathcal{L}_{i2p}, \mathcal{L}_{ot}` of the seed's :math:`\mathcal{L}_{code}`;
* :func:`mlm_distill_loss`: ALBEF's masked language modelling loss with momentum distillation (the
  teacher's MLM distribution as a soft target of weight alpha);
* :func:`alpha_schedule`: ALBEF's ramp of alpha from 0 over the first epoch.

Each is a function of embeddings and a temperature (no hidden state); logits are float32 even under
autocast (float64 stays float64), and reductions go through ``log_softmax`` / ``logsumexp``.
"""

from __future__ import annotations

import numbers

import torch
import torch.nn.functional as F

from .._deprecation import keyword_settings
from .. import checks
from ..checks import (check_all_finite, check_choice, check_embeddings, check_id_pair, check_ids, check_int,
                      check_positive, check_probability, check_same_width, check_tensor)
from ..ot import cost_matrix, ipot, sinkhorn

__all__ = ["distill_contrastive_loss", "sample_hard_negatives", "codebook_targets", "prototype_loss",
           "ot_cost_loss", "mlm_distill_loss", "alpha_schedule"]


def _float(*xs):
    dtype = torch.promote_types(xs[0].dtype, torch.float32)
    return [x.to(dtype) for x in xs]


def _is_scalar(x) -> bool:
    """One id (a Python or numpy integer, a 0-d tensor or array), not a sequence of ids."""
    return isinstance(x, numbers.Integral) or getattr(x, "ndim", None) == 0


def _batch_and_queue_ids(ids, n: int, device) -> tuple:
    """``ids`` of :func:`distill_contrastive_loss` as (batch ids (n,) LongTensor, queue ids or None).

    A 2-sequence is the pair (batch ids, queue ids) only when neither item is a single id: at batch 2,
    ``[np.int64(3), np.int64(5)]`` or ``tuple(torch.tensor([3, 5]))`` are the two batch ids."""
    queue_ids = None
    if isinstance(ids, (tuple, list)) and len(ids) == 2 and not any(_is_scalar(i) for i in ids):
        ids, queue_ids = ids
    if ids is None:
        return torch.arange(n, device=device), queue_ids
    return check_ids("ids", ids, n, device), queue_ids


def _check_generator(generator) -> None:
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}; "
                        "create one with torch.Generator().manual_seed(seed)")


@keyword_settings(old_order=("ids", "queue", "queue_ids", "temperature", "alpha", "q_teacher"),
                  id_pairs={("ids", "queue_ids"): "ids"})
def distill_contrastive_loss(q: torch.Tensor, k_batch: torch.Tensor, *, ids=None, queue: torch.Tensor | None = None,
                             temperature: float = 0.07, alpha: float = 0.0,
                             q_teacher: torch.Tensor | None = None) -> torch.Tensor:
    r"""Queued contrastive loss with momentum-distillation soft targets (ALBEF, Eq. 2 and Sec. 3.3).

    The keys are the momentum (teacher) features of the batch followed by the queue,
    :math:`\kappa = [k_1..k_B, \kappa_1..\kappa_M]`; query n's distribution over them is
    :math:`p_n = \mathrm{softmax}(q_n \kappa^\top / \tau)` and its target mixes the hard labels with
    the teacher's own distribution:

    .. math::
        y_n = (1-\alpha)\, y^{\mathrm{hard}}_n + \alpha\, \mathrm{softmax}(q^{m}_n \kappa^\top / \tau), \qquad
        \mathcal{L} = -\frac{1}{B}\sum_n \sum_j y_{nj} \log p_{nj},

    where :math:`y^{\mathrm{hard}}_n` is uniform over the batch keys with the query's id (its own pair
    and other pairs of the same item). Queue entries with the query's id are left out of both
    distributions (a queue that holds a copy of the positive must not use it as a negative). With
    q = image and keys = text this is ALBEF's i2t term; with keys of the query's own modality it is
    CODIS's intra-modal i2i / t2t term. Keys and teacher queries are detached.

    Args:
        q: (B, D) student features (normalised here). k_batch: (B, D) teacher features of the batch's
            pairs in the other (or the same) modality.
        ids: (B,) item ids of the batch (a tensor, list or numpy array), or with a queue the pair
            ``(batch ids (B,), queue ids (M,))``; None (default), or None as the batch side of the pair,
            means the diagonal pairs (every query its own item).
        queue: (M, D) queued teacher features (M may be 0), e.g. ``MoCoQueue.keys``.
        temperature: tau > 0. alpha: weight of the soft targets in [0, 1] (0 = hard labels).
        q_teacher: (B, D) teacher features of the queries (one row per query); needed when alpha > 0.

    Returns:
        The scalar loss.
    """
    check_embeddings("q", q, finite=False)
    check_embeddings("k_batch", k_batch, q.shape[1], finite=False)
    if k_batch.shape[0] != q.shape[0]:
        raise ValueError(f"k_batch must have one key per query ({q.shape[0]}), got {k_batch.shape[0]}")
    ids, queue_ids = _batch_and_queue_ids(ids, q.shape[0], q.device)
    check_positive("temperature", temperature)
    check_probability("alpha", alpha)
    if alpha > 0 and q_teacher is None:
        raise ValueError("alpha > 0 needs q_teacher, the momentum features of the queries")
    if q_teacher is not None:
        check_embeddings("q_teacher", q_teacher, q.shape[1], finite=False)
        if q_teacher.shape[0] != q.shape[0]:
            raise ValueError(f"q_teacher must have one row per query ({q.shape[0]}), got {q_teacher.shape[0]} "
                             f"(shape {tuple(q_teacher.shape)}); pass the teacher's features of the same batch")
    if queue is None:
        queue, queue_ids = q.new_zeros(0, q.shape[1]), ids[:0]
    else:
        check_tensor("queue", queue, ndim=2, nonempty=False, finite=False)
        check_same_width("q", q, "queue", queue)
        if queue_ids is None and queue.shape[0] == 0:
            queue_ids = ids[:0]
        if queue_ids is None:
            raise ValueError("with a queue, pass ids=(batch ids, queue ids) so that copies of a positive in the "
                             "queue are not used as negatives")
        queue_ids = check_ids("ids[1] (queue ids)", queue_ids, queue.shape[0], q.device)
    check_all_finite(("q", q), ("k_batch", k_batch), ("queue", queue), ("q_teacher", q_teacher if alpha > 0 else None))
    with torch.autocast(device_type=q.device.type, enabled=False):
        q, k_batch, queue = _float(q, k_batch.detach(), queue.detach().to(q.device))
        keys = F.normalize(torch.cat([k_batch, queue]), dim=-1)
        valid = torch.cat([torch.ones(len(ids), len(ids), dtype=torch.bool, device=q.device),
                           queue_ids[None, :] != ids[:, None]], dim=1)
        hard = torch.cat([(ids[:, None] == ids[None, :]).to(q.dtype), q.new_zeros(len(ids), len(queue_ids))], 1)
        hard = hard / hard.sum(1, keepdim=True)
        logits = (F.normalize(q, dim=-1) @ keys.T / temperature).masked_fill(~valid, float("-inf"))
        log_p = torch.log_softmax(logits, dim=1).masked_fill(~valid, 0.0)
        target = hard
        if alpha > 0:
            qt = F.normalize(q_teacher.detach().to(q), dim=-1)
            soft = torch.softmax((qt @ keys.T / temperature).masked_fill(~valid, float("-inf")), dim=1)
            target = (1 - alpha) * hard + alpha * soft
        return -(target * log_p).sum(1).mean()


@keyword_settings(old_order=("row_ids", "col_ids", "temperature", "generator"), id_pairs={("row_ids", "col_ids"): "ids"})
def sample_hard_negatives(sim: torch.Tensor, *, ids=None, temperature: float = 1.0,
                          generator: torch.Generator | None = None) -> torch.Tensor:
    r"""One negative column per row, drawn with probability :math:`\propto e^{s_{ij}/T}` among the columns
    of a different item (ALBEF's ITM hard negatives, sampled from the contrastive similarities).

    ALBEF samples with ``torch.multinomial`` over ``softmax(sim)`` after zeroing the positive, which fails
    when a row has no valid column (batch size 1, or a batch of two captions of the same image); here
    such rows get ``-1`` ("no negative") and the loss skips them. The positive (equal ids) is never drawn.

    Args:
        sim: (B_rows, B_cols) similarities (detached inside).
        ids: item ids, one (B,) tensor for a square ``sim`` or a pair ``(row ids (B_rows,), column ids
            (B_cols,))``; default: the diagonal pairs.
        temperature: T > 0 of the sampling softmax (small: almost the hardest negative).
        generator: a torch.Generator for reproducible draws.

    Returns:
        (B_rows,) LongTensor of column indices, -1 where a row has no valid negative.
    """
    check_tensor("sim", sim, ndim=2)
    check_positive("temperature", temperature)
    _check_generator(generator)
    n_rows, n_cols = sim.shape
    if ids is None:
        if n_rows != n_cols:
            raise ValueError(f"sim is {n_rows} x {n_cols}: pass ids=(row ids, column ids) when it is not square")
        ids = torch.arange(n_rows, device=sim.device)
    row_ids, col_ids = check_id_pair(ids, n_rows, n_cols, device=sim.device, sides=("rows", "columns"))
    with torch.no_grad(), torch.autocast(device_type=sim.device.type, enabled=False):
        valid = row_ids[:, None] != col_ids[None, :]
        has = valid.any(1)
        logits = (sim.detach().float() / temperature).masked_fill(~valid, float("-inf"))
        logits[~has] = 0.0  # any row works for multinomial; the result is replaced by -1
        probs = torch.softmax(logits, dim=1)
        gen_device = generator.device if generator is not None else sim.device
        draw = torch.multinomial(probs.to(gen_device), 1, generator=generator).squeeze(1).to(sim.device)
        return torch.where(has, draw, torch.full_like(draw, -1))


@keyword_settings(old_order=("solver", "epsilon", "n_iters", "metric"))
def codebook_targets(features: torch.Tensor, prototypes: torch.Tensor, *, solver: str = "ipot",
                     epsilon: float = 0.1, n_iters: int = 20, metric: str = "cosine") -> torch.Tensor:
    r"""Codeword assignments of a batch by optimal transport: the rows of :math:`N\,T` with
    :math:`T = \arg\min_{T\in\Pi(\frac1N\mathbf 1, \frac1K\mathbf 1)} \langle T, D\rangle`,
    :math:`D_{ij} = d(z_i, c_j)` (CODIS Sec. 3.2; SwAV's equipartition, Caron et al., 2020).

    Uniform marginals spread the batch over all K codewords, so no codeword collapses. The result is
    computed without gradients (a target): rows are distributions over codewords (renormalised to sum
    to 1, since a few iterations satisfy the column marginal exactly and the row marginal only roughly).

    Args:
        features: (N, D) features (the teacher's in CODIS). prototypes: (K, D) codewords.
        solver: ``ipot`` (Algorithm 2 of the seed) or ``sinkhorn``; epsilon: its beta / epsilon.
        n_iters: iterations; metric: the cost, see :func:`mmalign.ot.cost_matrix`.

    Returns:
        (N, K) targets, detached, in float32 (float64 for float64 input).
    """
    check_embeddings("features", features)
    check_embeddings("prototypes", prototypes)
    if features.shape[1] != prototypes.shape[1]:
        raise ValueError(
            f"prototypes have width {prototypes.shape[1]} but features have width {features.shape[1]}; "
            f"create the codebook with dim={features.shape[1]} (the projection's output size)"
        )
    check_choice("solver", solver, ("ipot", "sinkhorn"))
    check_positive("epsilon", epsilon)
    check_int("n_iters", n_iters, minimum=1)
    check_choice("metric", metric, ("cosine", "sqeuclidean"))
    with torch.no_grad():
        cost = cost_matrix(features.detach(), prototypes.detach(), metric)
        fn = ipot if solver == "ipot" else sinkhorn
        plan = fn(cost, epsilon, n_iters=n_iters).plan
        # after a few iterations the columns hold exactly but the rows only approximately: renormalise each
        # row into a distribution over codewords (SwAV does the same with its Sinkhorn codes)
        return plan / plan.sum(1, keepdim=True).clamp_min(torch.finfo(plan.dtype).tiny)


def _check_rows_sum_to_one(targets: torch.Tensor) -> None:
    """Non-negative rows that sum to 1; one host sync when they do, none under ``checks.disabled()``."""
    if not checks.enabled():
        return
    t = targets.detach()
    sums = t.sum(1, dtype=torch.float32) if t.dtype in (torch.float16, torch.bfloat16) else t.sum(1)
    tol = 1e-2 if t.dtype in (torch.float16, torch.bfloat16) else 1e-3
    if bool((t.amin() >= 0) & ((sums - 1).abs() <= tol).all()):
        return
    if bool(t.amin() < 0):
        raise ValueError(f"targets has negative entries (smallest {float(t.amin()):.3g}); each row must be a "
                         "distribution over the codewords")
    n = t.shape[0]
    bad = int(((sums - 1).abs() > tol).nonzero()[0])
    hint = ("pass each row as a distribution over the codewords, e.g. targets / targets.sum(1, keepdim=True)")
    if n > 1 and bool(((sums * n - 1).abs() <= tol).all()):
        hint = (f"the rows sum to 1/N = 1/{n}: this is a transport plan (what ot_cost_loss takes); pass "
                f"codebook_targets(...) itself, or plan * {n}")
    raise ValueError(f"targets rows must sum to 1, but row {bad} sums to {float(sums[bad]):.6g}; {hint}")


@keyword_settings(old_order=("gamma",))
def prototype_loss(features: torch.Tensor, prototypes: torch.Tensor, targets: torch.Tensor, *,
                   gamma: float = 0.1) -> torch.Tensor:
    r"""Cross-entropy between OT targets and the predicted codeword distribution (CODIS Eq. 2):

    .. math::
        P = \mathrm{softmax}(\hat Z \hat C^\top / \gamma), \qquad
        \mathcal{L} = H(T, P) = -\frac1N \sum_i \sum_j T_{ij} \log P_{ij},

    with L2-normalised rows :math:`\hat Z, \hat C`. ``L_t2p`` passes text features with the targets of
    the paired images, ``L_i2p`` image features with the targets of the captions. Gradients reach the
    features and the prototypes, never the targets (detached).

    Shapes: features (N, D), prototypes (K, D), targets (N, K): non-negative, each row a distribution over
    the codewords summing to 1 (within 1e-3, 1e-2 for half precision), as :func:`codebook_targets` gives.
    The transport plan itself (rows summing to 1/N, what :func:`ot_cost_loss` takes) is refused: it would
    make the loss N times smaller. Returns a scalar.
    """
    check_embeddings("features", features)
    check_embeddings("prototypes", prototypes)
    if features.shape[1] != prototypes.shape[1]:
        raise ValueError(f"prototypes have width {prototypes.shape[1]} but features have width {features.shape[1]}")
    check_tensor("targets", targets, ndim=2)
    if targets.shape != (features.shape[0], prototypes.shape[0]):
        raise ValueError(f"targets must be (N, K) = {(features.shape[0], prototypes.shape[0])}, got {tuple(targets.shape)}")
    check_positive("gamma", gamma)
    _check_rows_sum_to_one(targets)
    with torch.autocast(device_type=features.device.type, enabled=False):
        z, c, t = _float(features, prototypes.to(features.device), targets.detach().to(features.device))
        logits = F.normalize(z, dim=-1) @ F.normalize(c, dim=-1).T / gamma
        return -(t * torch.log_softmax(logits, dim=1)).sum(1).mean()


@keyword_settings(old_order=("metric",))
def ot_cost_loss(features: torch.Tensor, prototypes: torch.Tensor, plan: torch.Tensor, *,
                 metric: str = "cosine") -> torch.Tensor:
    r"""The transport cost :math:`\mathcal{L}_{ot} = \langle T, D(Z, C)\rangle` for a fixed plan T (detached):
    at the optimal plan this is the OT distance, and its gradient (envelope theorem) pulls each codeword
    towards the features transported to it. Pass the plan :math:`T` itself (non-negative, rows sum to
    1/N, total mass 1 within 1e-3), e.g. ``codebook_targets(...) / N``; the targets themselves (rows
    summing to 1) are refused, they would make the loss N times larger. Shapes: features (N, D),
    prototypes (K, D), plan (N, K); a scalar.
    """
    check_tensor("plan", plan, ndim=2)
    cost = cost_matrix(features, prototypes, metric)
    if plan.shape != cost.shape:
        raise ValueError(f"plan must be (N, K) = {tuple(cost.shape)}, got {tuple(plan.shape)}")
    p = plan.detach()
    mass = p.sum(dtype=torch.float32) if p.dtype in (torch.float16, torch.bfloat16) else p.sum()
    tol = 1e-2 if p.dtype in (torch.float16, torch.bfloat16) else 1e-3
    if checks.enabled() and not bool((p.amin() >= 0) & ((mass - 1).abs() <= tol)):
        if bool(p.amin() < 0):
            raise ValueError(f"plan has negative entries (smallest {float(p.amin()):.3g}); a transport plan is non-negative")
        n = p.shape[0]
        hint = (f"; the rows sum to 1: these are codebook targets, pass them divided by N ({n})"
                if n > 1 and abs(float(mass) - n) <= tol * n else "; normalise it, e.g. plan / plan.sum()")
        raise ValueError(f"plan must be a transport plan of total mass 1 (rows summing to 1/N), got total mass "
                         f"{float(mass):.6g}{hint}")
    return (plan.detach().to(cost) * cost).sum()


def mlm_distill_loss(logits: torch.Tensor, labels: torch.Tensor, *, alpha: float = 0.0,
                     teacher_logits: torch.Tensor | None = None) -> torch.Tensor:
    r"""Masked language modelling with momentum distillation (ALBEF, Sec. 3.3 and its ``BertForMaskedLM``):

    .. math::
        \mathcal{L}_{mlm} = (1-\alpha)\, H\big(y, p\big) + \alpha\, H\big(\mathrm{softmax}(s^m), p\big),
        \qquad p = \mathrm{softmax}(s),

    averaged over the predicted positions (label >= 0), where :math:`s` are the student's logits,
    :math:`s^m` the momentum teacher's at the same positions and :math:`y` the one-hot word. At
    :math:`\alpha = 0` this is the plain cross-entropy with the hard labels.

    Args:
        logits: (N, V) student logits of N positions. labels: (N,) word indices, negative (e.g. -100)
            where a position is not predicted.
        alpha: weight of the teacher's soft targets in [0, 1].
        teacher_logits: (N, V) the teacher's logits (detached inside); needed when alpha > 0.

    Returns:
        The scalar loss (0 with a graph when no position is predicted).
    """
    check_tensor("logits", logits, ndim=2, finite=False)
    check_tensor("labels", labels, ndim=1, floating=False, finite=False)
    if labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise ValueError(f"labels must hold integer word indices (-100 where not predicted), got {labels.dtype}")
    if labels.shape[0] != logits.shape[0]:
        raise ValueError(f"labels must have one entry per row of logits ({logits.shape[0]}), got {labels.shape[0]}")
    check_probability("alpha", alpha)
    if alpha > 0:
        if teacher_logits is None:
            raise ValueError("alpha > 0 needs teacher_logits, the momentum model's MLM logits at the same positions")
        check_tensor("teacher_logits", teacher_logits, ndim=2, finite=False)
        if teacher_logits.shape != logits.shape:
            raise ValueError(f"teacher_logits must have the shape of logits {tuple(logits.shape)}, got "
                             f"{tuple(teacher_logits.shape)}")
    keep = labels >= 0
    if checks.enabled() and bool((labels[keep] >= logits.shape[1]).any()):
        raise ValueError(f"labels go up to {int(labels.max())} but logits have {logits.shape[1]} classes")
    check_all_finite(("logits", logits), ("teacher_logits", teacher_logits if alpha > 0 else None))
    if not bool(keep.any()):
        return logits.sum() * 0.0
    with torch.autocast(device_type=logits.device.type, enabled=False):
        (s,) = _float(logits[keep])
        log_p = torch.log_softmax(s, dim=1)
        loss = F.nll_loss(log_p, labels[keep].long())
        if alpha > 0:
            soft = torch.softmax(teacher_logits[keep].detach().to(s), dim=1)
            loss = (1 - alpha) * loss + alpha * -(soft * log_p).sum(1).mean()
        return loss


def alpha_schedule(step: int, *, alpha: float, ramp_steps: int = 0) -> float:
    r"""ALBEF's distillation weight at optimisation step ``step`` (0-based):
    :math:`\alpha \min(1, \mathrm{step}/\mathrm{ramp\_steps})`, so that the nearly random teacher of
    the first steps teaches nothing; ALBEF sets ``ramp_steps`` to the steps of one epoch
    (``alpha * min(1, i / len(data_loader))`` in epoch 0). ``ramp_steps = 0``: alpha from step 0.
    """
    check_int("step", step, minimum=0)
    check_probability("alpha", alpha)
    check_int("ramp_steps", ramp_steps, minimum=0)
    if ramp_steps == 0:
        return float(alpha)
    return float(alpha) * min(1.0, step / ramp_steps)
