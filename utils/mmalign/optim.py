"""LAMB: layer-wise adaptive moments for large-batch training (You et al., 2020, Algorithm 2)."""

from __future__ import annotations

import torch

from .checks import check_positive, check_real, check_tensor


def lamb_trust_ratio(weight: torch.Tensor, update: torch.Tensor, clamp: float = 10.0) -> torch.Tensor:
    r"""Layer-wise trust ratio :math:`\min(\lVert w \rVert / \lVert u \rVert, c)`, or 1 if either norm is 0.

    Args:
        weight: a parameter tensor w (any shape).
        update: the Adam-plus-weight-decay update u for it (same shape).
        clamp: c > 0, the largest ratio allowed.

    Returns:
        0-d tensor on weight's device (no host sync).
    """
    for name, t in (("weight", weight), ("update", update)):
        check_tensor(name, t, finite=False, nonempty=False)
    if weight.shape != update.shape:
        raise ValueError(f"weight {tuple(weight.shape)} and update {tuple(update.shape)} must have the same shape")
    clamp = check_positive("clamp", clamp)
    w_norm, u_norm = weight.norm(), update.norm()
    ratio = (w_norm / u_norm).clamp(0, clamp)
    return torch.where((w_norm > 0) & (u_norm > 0), ratio, torch.ones_like(ratio))


class LAMB(torch.optim.Optimizer):
    r"""LAMB optimizer (You et al., 2020, "Large Batch Optimization for Deep Learning", Algorithm 2).

    For each parameter tensor (a "layer") w with gradient g, at step t:

    .. math::
        m_t = \beta_1 m_{t-1} + (1-\beta_1) g, \quad v_t = \beta_2 v_{t-1} + (1-\beta_2) g^2,
        \quad \hat m_t = \frac{m_t}{1-\beta_1^t}, \quad \hat v_t = \frac{v_t}{1-\beta_2^t},

    .. math::
        u_t = \frac{\hat m_t}{\sqrt{\hat v_t} + \epsilon} + \lambda w, \qquad
        w \leftarrow w - \eta\, r(w, u_t)\, u_t,

    with the trust ratio :math:`r` from :func:`lamb_trust_ratio` (:math:`\lVert w\rVert/\lVert u_t\rVert`
    clamped to [0, clamp], 1 if either norm is 0). The weight decay is decoupled (added to the
    update, as in AdamW); put biases and norm layers in a group with ``weight_decay=0`` if wanted.

    Args:
        params: parameters or param groups.
        lr: eta. betas: (beta_1, beta_2). eps: added to sqrt(v_hat).
        weight_decay: lambda. clamp: upper bound of the trust ratio (the WIT project uses 10).
        bias_correction: divide the moments by (1 - beta^t) (Algorithm 2 does).

    Memory: the two moments per parameter, and two scratch buffers as large as the largest parameter
    (reused by every parameter and step, never saved).
    """

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-6,
                 weight_decay: float = 0.01, clamp: float = 10.0, bias_correction: bool = True):
        lr, eps, weight_decay = check_real("lr", lr), check_real("eps", eps), check_real("weight_decay", weight_decay)
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise ValueError(f"betas must be a pair (beta1, beta2) such as (0.9, 0.999), got {betas!r}")
        betas = (check_real("betas[0]", betas[0]), check_real("betas[1]", betas[1]))
        clamp = check_real("clamp", clamp)
        if lr < 0 or eps < 0 or weight_decay < 0:
            raise ValueError(f"lr, eps and weight_decay must be >= 0, got {lr}, {eps}, {weight_decay}")
        if not (0 <= betas[0] < 1 and 0 <= betas[1] < 1):
            raise ValueError(f"betas must be in [0, 1), got {betas}")
        if clamp <= 0:
            raise ValueError(f"clamp must be > 0, got {clamp}")
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, clamp=clamp,
                        bias_correction=bias_correction)
        super().__init__(params, defaults)

    def _scratch_for(self, p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Two scratch tensors shaped like ``p``: views of one buffer per (device, dtype), as large as the
        largest parameter seen (not part of the state: nothing to save or restore)."""
        buffers = self.__dict__.setdefault("_scratch", {})
        key, n = (p.device, p.dtype), p.numel()
        if key not in buffers or buffers[key].shape[1] < n:
            buffers[key] = torch.empty(2, n, device=p.device, dtype=p.dtype)
        flat = buffers[key][:, :n]
        return flat[0].view_as(p), flat[1].view_as(p)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise ValueError("LAMB does not support sparse gradients; use dense embeddings (sparse=False)")
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                state["step"] += 1
                m, v, t = state["exp_avg"], state["exp_avg_sq"], state["step"]
                m.mul_(beta1).add_(p.grad, alpha=1 - beta1)
                v.mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
                # update = m_hat / (sqrt(v_hat) + eps) + weight_decay * p, the same operations in the same
                # order as written out (so the same bits), written into two scratch buffers that live as
                # long as the optimizer: a fresh tensor per parameter and step costs page faults, which
                # were a quarter of the step on a 25M-parameter model (benchmarks/bench.py, lamb)
                scratch, update = self._scratch_for(p)
                if group["bias_correction"]:
                    denom = torch.div(v, 1 - beta2**t, out=scratch).sqrt_()
                    update = torch.div(m, 1 - beta1**t, out=update).div_(denom.add_(group["eps"]))
                else:
                    update = torch.div(m, torch.sqrt(v, out=scratch).add_(group["eps"]), out=update)
                    denom = scratch
                update.add_(torch.mul(p, group["weight_decay"], out=denom))
                ratio = lamb_trust_ratio(p, update, group["clamp"])
                p.sub_(update.mul_(group["lr"] * ratio))
        return loss
