r"""Entropic optimal transport between a batch of features and a set of prototypes.

Given a cost matrix :math:`D \in \mathbb{R}^{N \times K}` (e.g. :math:`d(z_i, c_j) = 1 - \cos(z_i, c_j)`)
and marginals :math:`\mu \in \Delta_N, \nu \in \Delta_K`, optimal transport looks for the plan

.. math::
    T^\star = \arg\min_{T \in \Pi(\mu, \nu)} \langle T, D \rangle, \qquad
    \Pi(\mu, \nu) = \{T \ge 0 : T\mathbf{1} = \mu,\ T^\top \mathbf{1} = \nu\}.

Two solvers, both written in the log domain so that a small epsilon never underflows to an all-zero
plan or NaN:

* :func:`sinkhorn`: the entropy-regularised problem :math:`\min \langle T, D\rangle - \epsilon H(T)`,
  solved by alternating row and column scalings (Cuturi, 2013) of :math:`e^{-D/\epsilon}`. Its plan is
  blurred by epsilon and tends to the exact one as epsilon shrinks.
* :func:`ipot`: the inexact proximal point method (Xie et al., 2018, IPOT; Algorithm 2 of CODIS, Duan
  et al., 2022): each outer step solves a Sinkhorn problem on :math:`e^{-D/\beta} \odot T^{(t)}`, with
  the previous plan as a proximal anchor. It converges to the *exact* (unregularised) plan for any
  beta, which is what CODIS uses as the codebook targets.

Both are batched (``cost`` may be ``(..., N, K)``), follow the device of their inputs, compute in float32
at least (float64 stays float64), also under autocast, and stop after a fixed number of iterations or
when the row marginal is within ``tol``. :func:`cost_matrix` builds the cost between features and
prototypes.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from .checks import check_all_finite, check_choice, check_int, check_positive, check_same_width, check_tensor

__all__ = ["OTResult", "sinkhorn", "ipot", "cost_matrix", "marginal_error", "uniform", "entropy"]


class OTResult(NamedTuple):
    """What a solver returns.

    * ``plan``: (..., N, K) transport plan T (rows sum to mu, columns to nu).
    * ``cost``: (...) transport cost <T, D>.
    * ``n_iters``: iterations run (outer iterations for IPOT).
    * ``error``: max over the batch of the L1 error of the row marginal, ``|T 1 - mu|_1`` (the column
      marginal is exact after each iteration).
    """

    plan: torch.Tensor
    cost: torch.Tensor
    n_iters: int
    error: float


def uniform(n: int, like: torch.Tensor) -> torch.Tensor:
    """The uniform distribution on n points, (n,), on ``like``'s device and dtype."""
    n = check_int("n", n, minimum=1)
    if not isinstance(like, torch.Tensor):
        raise TypeError(f"like must be a torch.Tensor (its device and dtype are used), got {type(like).__name__}")
    return torch.full((n,), 1.0 / n, device=like.device, dtype=like.dtype)


def _index(flat: int, shape: tuple) -> tuple:
    """The batch index (a tuple) of element ``flat`` of a batch of ``shape``."""
    out = []
    for size in reversed(shape):
        out.append(flat % size)
        flat //= size
    return tuple(reversed(out))


def _check_marginal(name: str, m, size: int, batch: tuple, what: str, like: torch.Tensor) -> torch.Tensor:
    """A marginal ``m``: a real float tensor, finite, non-negative, of shape (size,) or a batch (..., size)
    that broadcasts to ``batch``; returned expanded to (*batch, size) on ``like``'s device and dtype."""
    check_tensor(name, m, ndim=None, finite=False, nonempty=False)
    if m.dim() == 0 or m.shape[-1] != size:
        got = "a 0-d tensor" if m.dim() == 0 else f"{m.shape[-1]} entries (shape {tuple(m.shape)})"
        raise ValueError(f"{name} has {got} but the {what} has {size} {'rows' if name == 'a' else 'columns'}; "
                         f"pass one mass per {'row' if name == 'a' else 'column'}, shape ({size},)")
    lead = tuple(m.shape[:-1])
    if len(lead) > len(batch) or any(s not in (1, t) for s, t in zip(reversed(lead), reversed(batch))):
        raise ValueError(
            f"{name} has batch shape {lead} but the {what} has batch shape {tuple(batch)}; pass one marginal "
            f"({size},) for every batch element, or one per element, shape {(*batch, size)}")
    check_all_finite((name, m))
    if bool((m < 0).any()):
        raise ValueError(f"{name} has negative masses (smallest {float(m.min()):.3g}); marginals must be non-negative")
    return m.to(like.device, like.dtype).expand(*batch, size)


def _marginals(cost: torch.Tensor, a, b, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    n, k = cost.shape[-2:]
    batch = tuple(cost.shape[:-2])
    like = cost if cost.dtype == dtype else cost.new_empty(0, dtype=dtype)
    out = [uniform(size, like).expand(*batch, size) if m is None else _check_marginal(name, m, size, batch, "cost", like)
           for name, m, size in (("a", a, n), ("b", b, k))]
    sa, sb = out[0].sum(-1), out[1].sum(-1)
    close = torch.isclose(sa, sb, rtol=1e-4, atol=1e-6)
    if not bool(close.all()):
        bad = int((~close).flatten().nonzero()[0])
        where = f" at batch element {_index(bad, batch)}" if batch else ""
        raise ValueError(
            f"the marginals have different total mass{where} (a sums to {float(sa.flatten()[bad]):.6g}, b to "
            f"{float(sb.flatten()[bad]):.6g}); normalise both, e.g. a / a.sum(-1, keepdim=True) and "
            "b / b.sum(-1, keepdim=True)"
        )
    if bool((sa <= 0).any()):
        bad = int((sa <= 0).flatten().nonzero()[0])
        where = f" at batch element {_index(bad, batch)}" if batch else ""
        raise ValueError(f"the marginals have zero total mass{where}; give them positive entries")
    return out[0], out[1]


def _check_common(cost, reg_name, reg, n_iters, tol):
    check_tensor("cost", cost, ndim=None, nonempty=False)
    if cost.dim() < 2:
        raise ValueError(f"cost must be (..., N, K), got shape {tuple(cost.shape)}")
    if cost.numel() == 0:
        raise ValueError(f"cost is empty (shape {tuple(cost.shape)}): it needs at least one row and one column")
    check_positive(reg_name, reg)
    check_int("n_iters", n_iters, minimum=1)
    if tol is not None:
        check_positive("tol", tol)


def _log(m: torch.Tensor) -> torch.Tensor:
    # log of a marginal; zero mass -> -inf, which the logsumexp updates handle
    return torch.log(m)


def marginal_error(plan: torch.Tensor, a: torch.Tensor | None = None, b: torch.Tensor | None = None) -> torch.Tensor:
    r"""L1 error of both marginals, :math:`\|T\mathbf 1 - a\|_1 + \|T^\top \mathbf 1 - b\|_1`, per batch element.

    Args:
        plan: (..., N, K) transport plan (finite, real floating).
        a, b: (N,) / (K,) marginals, or one per batch element (..., N) / (..., K); uniform by default.
            They are checked like a solver's (one mass per row / column, finite, non-negative); their
            total masses may differ (the error then says so).

    Returns:
        (...) the error of each batch element, in the plan's dtype.
    """
    check_tensor("plan", plan, ndim=None, nonempty=False)
    if plan.dim() < 2 or plan.numel() == 0:
        raise ValueError(f"plan must be a non-empty (..., N, K) transport plan, got shape {tuple(plan.shape)}")
    n, k = plan.shape[-2:]
    batch = tuple(plan.shape[:-2])
    a = uniform(n, plan) if a is None else _check_marginal("a", a, n, batch, "plan", plan)
    b = uniform(k, plan) if b is None else _check_marginal("b", b, k, batch, "plan", plan)
    return (plan.sum(-1) - a).abs().sum(-1) + (plan.sum(-2) - b).abs().sum(-1)


def _result(log_plan, cost, n, err) -> OTResult:
    plan = log_plan.exp()
    return OTResult(plan, (plan * cost).sum((-2, -1)), n, err)


def _lse_into(buf: torch.Tensor, base: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """``logsumexp(base + shift[..., None, :], -1)`` computed in the preallocated ``buf`` (same shape as
    ``base``): max-shifted like ``torch.logsumexp`` (stable at any scale), but without allocating two
    (N, K) temporaries per call, which makes Sinkhorn about twice as fast on a CPU. No autograd."""
    torch.add(base, shift.unsqueeze(-2), out=buf)
    m = buf.amax(-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))  # an all -inf row (zero mass) stays -inf
    buf.sub_(m).exp_()
    return buf.sum(-1).log_().add_(m.squeeze(-1))


def _scaling_loop(log_k, log_a, log_b, log_v, n_iters, tol, check_every):
    """Sinkhorn scalings in the log domain on the kernel log_k (..., N, K); returns (log_u, log_v, n, err)."""
    err = float("nan")
    fast = not (torch.is_grad_enabled() and log_k.requires_grad)
    if fast:  # row updates reduce log_k's rows, column updates the rows of a contiguous transposed copy
        log_k_t = log_k.transpose(-1, -2).contiguous()
        buf, buf_t = torch.empty_like(log_k), torch.empty_like(log_k_t)
    for it in range(1, n_iters + 1):
        if fast:
            log_u = log_a - _lse_into(buf, log_k, log_v)
            log_v = log_b - _lse_into(buf_t, log_k_t, log_u)
        else:
            log_u = log_a - torch.logsumexp(log_k + log_v.unsqueeze(-2), dim=-1)
            log_v = log_b - torch.logsumexp(log_k + log_u.unsqueeze(-1), dim=-2)
        if tol is not None and (it % check_every == 0 or it == n_iters):
            row = torch.logsumexp(log_k + log_u.unsqueeze(-1) + log_v.unsqueeze(-2), dim=-1).exp()
            err = float((row.detach() - log_a.exp()).abs().sum(-1).max())
            if err <= tol:
                return log_u, log_v, it, err
    return log_u, log_v, n_iters, err


def sinkhorn(cost: torch.Tensor, epsilon: float = 0.05, a: torch.Tensor | None = None,
             b: torch.Tensor | None = None, n_iters: int = 100, tol: float | None = None,
             check_every: int = 1) -> OTResult:
    r"""Entropic OT by Sinkhorn's scalings in the log domain (Cuturi, 2013).

    .. math::
        T = \arg\min_{T\in\Pi(a,b)} \langle T, D\rangle - \epsilon H(T), \qquad
        T_{ij} = \exp\big(f_i + g_j - D_{ij}/\epsilon\big),

    with the (scaled) potentials updated as
    :math:`f = \log a - \mathrm{LSE}_j(g_j - D_{ij}/\epsilon)`,
    :math:`g = \log b - \mathrm{LSE}_i(f_i - D_{ij}/\epsilon)`. After each iteration the columns sum to
    ``b`` exactly; the rows converge to ``a``.

    Args:
        cost: (..., N, K) cost matrix D (any leading batch dimensions).
        epsilon: entropic regularisation (> 0), in the units of the cost; small = close to exact OT.
        a, b: (N,) / (K,) (or batched) marginals with equal total mass; uniform by default.
        n_iters: the maximum number of iterations (>= 1).
        tol: stop once the L1 error of the row marginal is <= tol (checked every ``check_every``
            iterations; each check reads the plan, which costs about one iteration).
        check_every: how often tol is checked.

    Returns:
        :class:`OTResult` (plan (..., N, K), cost <T, D> (...), n_iters, error), in float32 (float64
        for float64 input), on ``cost``'s device. Detach the plan to use it as a target.
    """
    _check_common(cost, "epsilon", epsilon, n_iters, tol)
    check_int("check_every", check_every, minimum=1)
    dtype = torch.promote_types(cost.dtype, torch.float32)
    with torch.autocast(device_type=cost.device.type, enabled=False):
        cost = cost.to(dtype)
        a, b = _marginals(cost, a, b, dtype)
        log_a, log_b = _log(a), _log(b)
        log_k = -cost / epsilon
        log_v = torch.zeros_like(log_b)
        log_u, log_v, n, err = _scaling_loop(log_k, log_a, log_b, log_v, n_iters, tol, check_every)
        log_plan = log_k + log_u.unsqueeze(-1) + log_v.unsqueeze(-2)
        if tol is None:
            err = float((log_plan.detach().exp().sum(-1) - a).abs().sum(-1).max())
        return _result(log_plan, cost, n, err)


def ipot(cost: torch.Tensor, beta: float = 0.5, a: torch.Tensor | None = None, b: torch.Tensor | None = None,
         n_iters: int = 50, inner_iters: int = 1, tol: float | None = None) -> OTResult:
    r"""Exact OT by the inexact proximal point method (IPOT; Xie et al., 2018; CODIS Algorithm 2).

    Each outer step t solves the proximal problem
    :math:`T^{(t+1)} = \arg\min_{T\in\Pi(a,b)} \langle T, D\rangle + \beta\,\mathrm{KL}(T \| T^{(t)})`
    approximately by ``inner_iters`` Sinkhorn scalings of :math:`Q = e^{-D/\beta} \odot T^{(t)}`:

    .. math::
        \delta = a / (Q\sigma), \quad \sigma = b / (Q^\top \delta), \quad
        T^{(t+1)} = \mathrm{diag}(\delta)\, Q\, \mathrm{diag}(\sigma),

    starting from :math:`T^{(1)} = \mathbf{1}\mathbf{1}^\top` and carrying :math:`\sigma` across outer
    steps, exactly as the seed's Algorithm 2, here in the log domain. (The seed writes
    :math:`\delta = \mu / (nQ\sigma)`: the factor :math:`1/n` only rescales the plan by a constant, and
    we keep the plan on the marginals instead.) Unlike :func:`sinkhorn`, the fixed point is the exact
    transport plan whatever beta is; beta sets the speed (small beta: fewer outer steps).

    Args:
        cost: (..., N, K) cost matrix.
        beta: the proximal step (> 0), in the units of the cost.
        a, b: marginals with equal mass (uniform by default).
        n_iters: outer iterations (>= 1); inner_iters: scalings per outer step (1 in IPOT).
        tol: stop once the L1 error of the row marginal is <= tol (checked each outer step).

    Returns:
        :class:`OTResult`, as :func:`sinkhorn`.
    """
    _check_common(cost, "beta", beta, n_iters, tol)
    check_int("inner_iters", inner_iters, minimum=1)
    dtype = torch.promote_types(cost.dtype, torch.float32)
    with torch.autocast(device_type=cost.device.type, enabled=False):
        cost = cost.to(dtype)
        a, b = _marginals(cost, a, b, dtype)
        log_a, log_b = _log(a), _log(b)
        log_g = -cost / beta
        log_t = torch.zeros_like(cost)  # T^(1) = 1 1^T
        log_sigma = torch.zeros_like(log_b)
        err, n = float("nan"), n_iters
        for it in range(1, n_iters + 1):
            log_q = log_g + log_t
            log_delta, log_sigma, _, _ = _scaling_loop(log_q, log_a, log_b, log_sigma, inner_iters, None, 1)
            log_t = log_q + log_delta.unsqueeze(-1) + log_sigma.unsqueeze(-2)
            if tol is not None:
                err = float((log_t.detach().exp().sum(-1) - a).abs().sum(-1).max())
                if err <= tol:
                    n = it
                    break
        if tol is None:
            err = float((log_t.detach().exp().sum(-1) - a).abs().sum(-1).max())
        return _result(log_t, cost, n, err)


def cost_matrix(features: torch.Tensor, prototypes: torch.Tensor, metric: str = "cosine") -> torch.Tensor:
    r"""Cost between features (N, D) and prototypes (K, D): ``cosine`` :math:`1 - \cos(z_i, c_j)` (in
    [0, 2]) or ``sqeuclidean`` :math:`\|z_i - c_j\|^2`. Returns (N, K) in float32 (float64 stays)."""
    check_tensor("features", features, ndim=2)
    check_tensor("prototypes", prototypes, ndim=2)
    check_same_width("features", features, "prototypes", prototypes)
    check_choice("metric", metric, ("cosine", "sqeuclidean"))
    dtype = torch.promote_types(features.dtype, torch.float32)
    with torch.autocast(device_type=features.device.type, enabled=False):
        z, c = features.to(dtype), prototypes.to(features.device, dtype)
        if metric == "cosine":
            return 1.0 - F.normalize(z, dim=-1) @ F.normalize(c, dim=-1).T
        return (z.pow(2).sum(-1, keepdim=True) + c.pow(2).sum(-1) - 2 * z @ c.T).clamp_min(0)


# entries of a plan down to -NEGATIVE_TOLERANCE times its largest entry count as 0 in :func:`entropy`
NEGATIVE_TOLERANCE = 1e-6


def entropy(plan: torch.Tensor) -> torch.Tensor:
    r"""The entropy of a transport plan, :math:`H(T) = -\sum_{ij} T_{ij} \log T_{ij}` over the last two
    dimensions (with :math:`0 \log 0 = 0`): how blurred a plan is.

    A plan is non-negative. An exact (LP) solver may return entries a hair below zero (round-off such as
    -1e-9): entries down to ``-NEGATIVE_TOLERANCE`` (1e-6) times the plan's largest entry are clamped to
    0; a more negative entry, a NaN or inf, a complex or integer dtype raise ``ValueError``.

    Args:
        plan: (..., N, K) transport plan, real floating.

    Returns:
        (...) entropies, in the plan's dtype.
    """
    check_tensor("plan", plan, ndim=None, nonempty=False)
    if plan.dim() < 2 or plan.numel() == 0:
        raise ValueError(f"plan must be a non-empty (..., N, K) transport plan, got shape {tuple(plan.shape)}")
    low = plan.amin()
    if bool(low < 0):
        scale = float(plan.abs().amax())
        if float(low) < -NEGATIVE_TOLERANCE * scale:
            raise ValueError(
                f"plan has negative entries (smallest {float(low):.3g}, largest {scale:.3g}); a transport plan is "
                f"non-negative (only round-off down to -{NEGATIVE_TOLERANCE:g} x the largest entry is clamped to 0)")
        plan = plan.clamp_min(0)
    return -torch.xlogy(plan, plan).sum((-2, -1))
