"""Masked Margin Softmax (Ilharco et al., 2019; thesis eqs. 2.8-2.9) and its margins: constant,
scheduled (Ilharco et al., 2019) and adaptive (Adaptive Mean Margin, Monfort et al., 2021)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..checks import check_int, check_real
from .._deprecation import keyword_settings
from ._checks import check_all_finite, check_pair, check_temperature, mined_negative_masks, positive_mask
from ..retrieval import _similarity as similarity


@keyword_settings(old_order=("margin", "temperature", "item_ids", "normalize", "negatives"),
                  renamed={"item_ids": "ids"})
def mms_loss(
    a: torch.Tensor,
    b: torch.Tensor,
    *,
    temperature: float = 0.07,
    margin: float | torch.Tensor | tuple[torch.Tensor, torch.Tensor] = 0.0,
    ids=None,
    normalize: bool = True,
    negatives: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    r"""Symmetric Masked Margin Softmax over a paired batch (positive of row i is column i).

    With :math:`S_{ij} = \cos(a_i, b_j)`, a margin :math:`M_i` subtracted from the positive only,
    and :math:`Z_i = \{k \ne i : \mathrm{id}_k = \mathrm{id}_i\}` the masked (same-item) columns,

    .. math::
        \mathrm{MMS}(a, b) = -\frac1B \sum_i \log
            \frac{e^{(S_{ii} - M_i)/\tau}}{e^{(S_{ii} - M_i)/\tau}
                  + \sum_{k \ne i,\ k \notin Z_i} e^{S_{ik}/\tau}},
        \qquad L = \tfrac12\big(\mathrm{MMS}(a, b) + \mathrm{MMS}(b, a)\big).

    The thesis (eq. 2.9) sums the two directions; we average them so that with M = 0 and no masked
    pairs this is exactly :func:`~mmalign.losses.info_nce`. The margin is in similarity (cosine)
    units and is subtracted before dividing by tau; with tau = 1 this is eq. 2.8 as written.
    The margin is a constant of the loss: a tensor margin is detached.

    Args:
        a, b: (B, D) paired embeddings (e.g. images and captions).
        temperature: tau > 0; stable down to 0.01 (log-sum-exp on float32 logits).
        margin: a float, a (B,) tensor (one margin per anchor, both directions), or a pair
            ``(m_ab, m_ba)`` of (B,) tensors, one per direction, as returned by
            :class:`AdaptiveMargin`. For a schedule pass ``ScheduledMargin.value``.
        ids: optional (B,) item ids (or a pair, one per side); other rows of the same item are masked
            out (the set Z), neither positive nor negative.
        normalize: L2-normalise a and b first (cosine similarity).
        negatives: optional output of a miner, ``(neg_for_a (B, k), neg_for_b (B, k'))`` (-1 = none):
            each anchor's denominator then holds its positive and the negatives mined for it only.

    Returns:
        Scalar loss (float32 for half-precision inputs).
    """
    check_pair(a, b)
    check_temperature(temperature)
    n = a.shape[0]
    sim = similarity(a, b, normalize)
    m_ab, m_ba = _as_margins(margin, n, sim)
    eye = torch.eye(n, dtype=torch.bool, device=sim.device)
    masked = torch.zeros_like(eye) if ids is None else positive_mask(ids, n, n, sim.device) & ~eye
    target = torch.arange(n, device=sim.device)
    masked_ab, masked_ba = masked, masked.T
    if negatives is not None:  # everything that is neither the positive nor a mined negative leaves the softmax
        keep_ab, keep_ba = mined_negative_masks(negatives, n, n, sim.device)
        masked_ab, masked_ba = masked_ab | ~(keep_ab | eye), masked_ba | ~(keep_ba | eye)
    logits_ab = ((sim - torch.diag(m_ab)) / temperature).masked_fill(masked_ab, float("-inf"))
    logits_ba = ((sim.T - torch.diag(m_ba)) / temperature).masked_fill(masked_ba, float("-inf"))
    return 0.5 * (F.cross_entropy(logits_ab, target) + F.cross_entropy(logits_ba, target))


def _as_margins(margin, n: int, sim: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """float | () | (n,) | pair of (n,) -> two detached (n,) tensors on sim's device and dtype."""
    if isinstance(margin, (tuple, list)):
        if len(margin) != 2:
            raise ValueError(f"a margin pair must be (m_ab, m_ba), got {len(margin)} items")
        m_ab, m_ba = margin
    else:
        m_ab = m_ba = margin
    out = []
    for m in (m_ab, m_ba):
        if isinstance(m, torch.Tensor) and (m.is_complex() or m.dtype == torch.bool):
            raise ValueError(f"margin must be real numbers, got a {m.dtype} tensor")
        if not isinstance(m, torch.Tensor):
            try:
                check_real("margin", m)
            except TypeError as err:
                raise TypeError(f"margin must be a float, a ({n},) tensor or a pair of them, got {type(m).__name__}") from err
        m = torch.as_tensor(m, dtype=sim.dtype, device=sim.device).detach()
        if m.dim() == 0:
            m = m.expand(n)
        if m.shape != (n,):
            raise ValueError(f"margin must be a float, a ({n},) tensor or a pair of them, got shape {tuple(m.shape)}")
        check_all_finite(("margin", m))
        out.append(m)
    return out[0], out[1]


class ScheduledMargin:
    r"""Step-wise exponentially growing margin (Ilharco et al., 2019, as used in the thesis' MMS Sch.).

    .. math::
        M(t) = \min\big(M_{\max},\; M_0 \cdot f^{\lfloor t / T \rfloor}\big)

    with t the number of :meth:`step` calls so far. Ilharco et al. start at :math:`M_0 = 0.001` and
    multiply by :math:`f = 1.002` every :math:`T = 1000` training steps (the defaults); they set no
    cap, ``max_margin`` adds one (``None`` for none). Margins are in cosine units (see
    :func:`mms_loss`). Usage: ``loss = mms_loss(a, b, sched.value); ...; sched.step()``.
    """

    def __init__(self, start: float = 0.001, factor: float = 1.002, every: int = 1000, max_margin: float | None = 1.0):
        start, factor = check_real("start", start), check_real("factor", factor)
        every = check_int("every", every)
        max_margin = None if max_margin is None else check_real("max_margin", max_margin)
        if start < 0 or factor < 1 or every < 1:
            raise ValueError(f"need start >= 0, factor >= 1 and every >= 1, got {start}, {factor}, {every}")
        if max_margin is not None and max_margin < start:
            raise ValueError(f"max_margin ({max_margin}) is below start ({start})")
        self.start, self.factor, self.every, self.max_margin = start, factor, every, max_margin
        self.num_steps = 0

    @property
    def value(self) -> float:
        k = self.num_steps // self.every
        try:
            m = self.start * self.factor ** k
        except OverflowError:  # factor^k beyond float range: the cap (if any) has long been reached
            m = math.inf if self.start > 0 else 0.0
        if self.max_margin is not None:
            return min(m, self.max_margin)
        if not math.isfinite(m):
            raise ValueError(f"the scheduled margin overflowed after {self.num_steps} steps ({self.start} * "
                             f"{self.factor}^{k}); set max_margin to cap it")
        return m

    def step(self) -> None:
        self.num_steps += 1

    def state_dict(self) -> dict:
        return {"start": self.start, "factor": self.factor, "every": self.every,
                "max_margin": self.max_margin, "num_steps": self.num_steps}

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict`; every value is validated as in the constructor."""
        _check_state(self, state, ("start", "factor", "every", "max_margin", "num_steps"))
        probe = ScheduledMargin(state["start"], state["factor"], state["every"], state["max_margin"])
        num_steps = check_int("state['num_steps']", state["num_steps"], minimum=0)
        self.start, self.factor, self.every, self.max_margin = probe.start, probe.factor, probe.every, probe.max_margin
        self.num_steps = num_steps


class AdaptiveMargin:
    r"""Adaptive Mean Margin (AMM, Monfort et al., 2021, eq. 3; the thesis' MMS Adp.).

    Per anchor and per direction, alpha times the gap between the positive similarity and the mean
    similarity to the anchor's negatives (not masked, not itself), computed on detached cosines:

    .. math::
        M^{a\to b}_i = \alpha\Big(S_{ii} - \frac{1}{|N_i|}\sum_{j \in N_i} S_{ij}\Big), \qquad
        M^{b\to a}_j = \alpha\Big(S_{jj} - \frac{1}{|N^\top_j|}\sum_{i \in N^\top_j} S_{ij}\Big),

    with :math:`N_i = \{j \ne i: \mathrm{id}_j \ne \mathrm{id}_i\}` (all :math:`j \ne i`, i.e. B - 1
    terms, without item ids). An anchor with no negative gets margin 0. Monfort et al. use
    alpha = 0.5. The margin grows as positives separate from negatives and can be negative early
    in training. It is detached (a constant of the loss); Monfort et al.'s remark that alpha = 1
    "removes the positive from the optimisation" holds only without the detach.
    Usage: ``mms_loss(a, b, margin=amm(a, b, ids=ids), ids=ids)``.
    """

    def __init__(self, alpha: float = 0.5):
        alpha = check_real("alpha", alpha)
        if alpha < 0:
            raise ValueError(f"alpha must be >= 0, got {alpha}")
        self.alpha = alpha

    @torch.no_grad()
    @keyword_settings(old_order=("item_ids", "normalize"), renamed={"item_ids": "ids"})
    def __call__(self, a: torch.Tensor, b: torch.Tensor, *, ids=None,
                 normalize: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, D), (B, D) paired embeddings (and optional item ``ids``) -> ``(m_ab, m_ba)``, two detached
        (B,) margins."""
        check_pair(a, b)
        n = a.shape[0]
        sim = similarity(a.detach(), b.detach(), normalize)
        neg = ~positive_mask(ids, n, n, sim.device)  # also excludes the diagonal
        sim_neg = sim * neg
        mean_row = sim_neg.sum(1) / neg.sum(1).clamp(min=1)
        mean_col = sim_neg.sum(0) / neg.sum(0).clamp(min=1)
        pos = sim.diagonal()
        m_ab = torch.where(neg.any(1), self.alpha * (pos - mean_row), 0.0)
        m_ba = torch.where(neg.any(0), self.alpha * (pos - mean_col), 0.0)
        return m_ab, m_ba

    def state_dict(self) -> dict:
        return {"alpha": self.alpha}

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict` (alpha validated as in the constructor)."""
        _check_state(self, state, ("alpha",))
        self.alpha = AdaptiveMargin(state["alpha"]).alpha


def _check_state(obj, state, keys: tuple[str, ...]) -> None:
    """``state`` is a dict holding ``keys`` (the dict saved by ``obj.state_dict()``)."""
    name = type(obj).__name__
    if not isinstance(state, dict):
        raise TypeError(f"{name}.load_state_dict expects the dict saved by state_dict(), got {type(state).__name__}")
    missing = [k for k in keys if k not in state]
    if missing:
        raise ValueError(f"{name} state_dict is missing {missing}; pass the dict saved by {name}.state_dict()")
