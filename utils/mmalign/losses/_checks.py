"""Input checks shared by the losses: clear errors instead of silent broadcasting."""

from __future__ import annotations

import torch


def check_pair(a: torch.Tensor, b: torch.Tensor, same_length: bool = True) -> None:
    """Two (N, D) / (M, D) embedding batches with the same D (and N == M if ``same_length``)."""
    if a.dim() != 2 or b.dim() != 2:
        raise ValueError(f"expected 2-d (batch, dim) embeddings, got shapes {tuple(a.shape)} and {tuple(b.shape)}")
    if a.shape[1] != b.shape[1]:
        raise ValueError(
            f"embedding sizes differ: {a.shape[1]} vs {b.shape[1]}; project both views to the same dim first"
        )
    if same_length and a.shape[0] != b.shape[0]:
        raise ValueError(
            f"paired batches must have the same length, got {a.shape[0]} and {b.shape[0]} "
            "(pass item ids to use a label mask instead of the diagonal)"
        )
    if a.shape[0] == 0 or b.shape[0] == 0:
        raise ValueError("empty batch")


def positive_mask(labels_a, labels_b, n_a: int, n_b: int, device) -> torch.Tensor:
    """(n_a, n_b) bool mask of pairs with equal item ids; a missing side defaults to arange."""
    la = torch.arange(n_a, device=device) if labels_a is None else torch.as_tensor(labels_a, device=device)
    lb = torch.arange(n_b, device=device) if labels_b is None else torch.as_tensor(labels_b, device=device)
    if la.shape != (n_a,) or lb.shape != (n_b,):
        raise ValueError(
            f"labels must be 1-d with one id per row: got {tuple(la.shape)} for {n_a} rows and {tuple(lb.shape)} for {n_b} rows"
        )
    return la[:, None] == lb[None, :]
