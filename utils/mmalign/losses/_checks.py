"""Input checks shared by the losses, on top of the library-wide policy in :mod:`mmalign.checks`:
clear errors instead of silent broadcasting, NaN losses or errors from inside torch.

Every loss checks its embeddings (2-d, real floating, non-empty, same width), its numbers
(temperature > 0, margins in range) and, with one fused scan per call, that no input is NaN/inf.
"""

from __future__ import annotations

import torch

from ..checks import (check_all_finite, check_embeddings, check_id_pair, check_nonnegative, check_positive,
                      check_tensor)

__all__ = ["check_pair", "check_temperature", "check_sim", "positive_mask", "check_all_finite",
           "check_nonnegative", "check_positive"]


def check_pair(a: torch.Tensor, b: torch.Tensor, same_length: bool = True, names: tuple[str, str] = ("a", "b"),
               finite: bool = True) -> None:
    """Two (N, D) / (M, D) embedding batches with the same D (and N == M if ``same_length``), real
    floating and (unless ``finite=False``) free of NaN/inf, scanned in one fused pass."""
    na, nb = names
    for name, t in ((na, a), (nb, b)):
        if isinstance(t, torch.Tensor) and t.dim() != 2:
            raise ValueError(f"expected 2-d (batch, dim) embeddings, got shapes {tuple(a.shape)} and {tuple(b.shape)}"
                             if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)
                             else f"{name} must be 2-d (batch, dim), got shape {tuple(t.shape)}")
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        if a.shape[0] == 0 or b.shape[0] == 0:
            raise ValueError(f"empty batch: {na} has shape {tuple(a.shape)}, {nb} has shape {tuple(b.shape)}")
    check_embeddings(na, a, finite=False)
    check_embeddings(nb, b, finite=False)
    if a.shape[1] != b.shape[1]:
        raise ValueError(
            f"embedding sizes differ: {na} has {a.shape[1]} features, {nb} has {b.shape[1]}; "
            "project both views to the same dim first"
        )
    if same_length and a.shape[0] != b.shape[0]:
        raise ValueError(
            f"paired batches must have the same length, got {a.shape[0]} and {b.shape[0]} "
            "(pass item ids to use a label mask instead of the diagonal)"
        )
    if a.device != b.device:
        raise ValueError(f"{na} is on {a.device} but {nb} is on {b.device}; move both to one device")
    if finite:
        check_all_finite((na, a), (nb, b))


def check_temperature(temperature) -> float:
    """tau: a finite number > 0 (a 0-d tensor, e.g. a learned temperature, is allowed)."""
    if isinstance(temperature, torch.Tensor):
        if temperature.numel() != 1:
            raise ValueError(f"temperature must be a number, got a tensor of shape {tuple(temperature.shape)}")
        value = float(temperature.detach())
        if not value > 0 or value == float("inf"):
            raise ValueError(f"temperature must be > 0 and finite, got {value}")
        return value
    try:
        return check_positive("temperature", temperature)
    except ValueError as err:
        raise ValueError(f"temperature must be > 0 and finite, got {temperature}") from err


def check_sim(sim, square: bool = True, name: str = "sim") -> int:
    """A (B, B) (or any 2-d if not ``square``) real floating similarity matrix without NaN/inf."""
    if isinstance(sim, torch.Tensor) and sim.dim() == 2 and square and (sim.shape[0] != sim.shape[1] or sim.shape[0] == 0):
        raise ValueError(
            f"expected a square (B, B) similarity matrix of a paired batch (positive on the diagonal), "
            f"got shape {tuple(sim.shape)}"
        )
    if isinstance(sim, torch.Tensor) and sim.dim() != 2:
        raise ValueError(f"expected a square (B, B) similarity matrix (2-d), got shape {tuple(sim.shape)}")
    check_tensor(name, sim, ndim=2)
    return sim.shape[0]


def positive_mask(ids, n_a: int, n_b: int, device, sides: tuple[str, str] = ("a", "b")) -> torch.Tensor:
    """(n_a, n_b) bool mask of pairs with equal item ids; ``ids`` as in :func:`mmalign.checks.check_id_pair`
    (None: the diagonal)."""
    pair = check_id_pair(ids, n_a, n_b, device=device, sides=sides)
    if pair is None:
        return torch.eye(n_a, n_b, dtype=torch.bool, device=device)
    return pair[0][:, None] == pair[1][None, :]


def mined_negative_masks(negatives, n_a: int, n_b: int, device,
                         rows: tuple[slice, slice] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Masks of the negatives a miner chose, for any loss: ``(keep_ab (n_a, n_b), keep_ba (n_b, n_a))``.

    ``negatives`` is what every miner of :mod:`mmalign.miners` returns: ``(neg_for_a, neg_for_b)``,
    LongTensors (n_a, k) of column indices for each row anchor and (n_b, k') of row indices for each
    column anchor; -1 marks "no valid negative" and is ignored. ``keep_ab[i, j]`` is True when the
    miner chose column j as a negative of row i (the a -> b direction), ``keep_ba[j, i]`` when it chose
    row i for column j (b -> a).

    ``rows = (rows of a, rows of b)`` (two slices) builds only those anchors' rows of each mask, e.g. one
    process's rows of a gathered batch (the whole ``negatives`` is still checked).
    """
    if not isinstance(negatives, (tuple, list)) or len(negatives) != 2:
        raise ValueError("negatives must be a miner's output, a pair (neg_for_a, neg_for_b) of index tensors, got "
                         f"{type(negatives).__name__}")
    masks = []
    for name, neg, n_anchor, n_other in (("negatives[0] (for rows)", negatives[0], n_a, n_b),
                                         ("negatives[1] (for columns)", negatives[1], n_b, n_a)):
        if not isinstance(neg, torch.Tensor):
            raise TypeError(f"{name} must be a LongTensor of indices, got {type(neg).__name__}")
        if neg.dtype.is_floating_point or neg.dtype.is_complex or neg.dtype == torch.bool:
            raise ValueError(f"{name} must hold integer indices, got {neg.dtype}")
        if neg.dim() != 2 or neg.shape[0] != n_anchor:
            raise ValueError(f"{name} must be ({n_anchor}, k): one row of indices per anchor, got shape {tuple(neg.shape)}")
        if neg.numel() and (int(neg.min()) < -1 or int(neg.max()) >= n_other):
            raise ValueError(f"{name} holds indices outside [-1, {n_other - 1}] (-1 = no negative); was it mined on "
                             "this batch?")
        neg = neg.to(device).long()
        if rows is not None:
            neg = neg[rows[len(masks)]]
        mask = torch.zeros(neg.shape[0], n_other + 1, dtype=torch.bool, device=device)
        mask.scatter_(1, torch.where(neg < 0, n_other, neg), True)  # -1 goes to a spare column, dropped below
        masks.append(mask[:, :n_other])
    return masks[0], masks[1]
