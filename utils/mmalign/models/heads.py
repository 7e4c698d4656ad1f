"""Projection heads that map a tower's features into the shared embedding space."""

from __future__ import annotations

import torch
from torch import nn

from ..checks import check_int, check_probability, check_tensor


class ProjectionHead(nn.Module):
    """Standardise frozen features, then a linear map (or a 2-layer MLP) to the shared space.

    ``x -> W (x - mu) / sigma + b``; with ``hidden_dim`` the map is ``Linear -> GELU -> Dropout ->
    Linear``. ``mu`` and ``sigma`` are buffers (not trained), set from training features with
    :meth:`fit_standardizer` or :meth:`from_features`; by default they are 0 and 1.

    Shapes: (B, in_dim) -> (B, out_dim).
    """

    def __init__(self, in_dim: int, out_dim: int, hidden_dim: int | None = None, dropout: float = 0.0):
        super().__init__()
        check_int("in_dim", in_dim), check_int("out_dim", out_dim)
        if in_dim <= 0 or out_dim <= 0:
            raise ValueError(f"in_dim and out_dim must be positive, got {in_dim} and {out_dim}")
        if hidden_dim is not None:
            check_int("hidden_dim", hidden_dim, minimum=1)
        check_probability("dropout", dropout, open_high=True)
        self.register_buffer("mean", torch.zeros(in_dim))
        self.register_buffer("std", torch.ones(in_dim))
        if hidden_dim is None:
            self.net = nn.Linear(in_dim, out_dim)
        else:
            self.net = nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.GELU(), nn.Dropout(dropout),
                                     nn.Linear(hidden_dim, out_dim))
        self.in_dim, self.out_dim = in_dim, out_dim

    @torch.no_grad()
    def fit_standardizer(self, features: torch.Tensor) -> "ProjectionHead":
        """Set mu, sigma from (N, in_dim) training features (constant features get sigma = 1)."""
        if not isinstance(features, torch.Tensor) or features.dim() != 2 or features.shape[1] != self.in_dim:
            got = tuple(features.shape) if isinstance(features, torch.Tensor) else type(features).__name__
            raise ValueError(f"expected (N, {self.in_dim}) features, got {got}")
        check_tensor("features", features, ndim=2)
        self.mean.copy_(features.float().mean(0))
        std = features.float().std(0)
        self.std.copy_(torch.where(std > 1e-6, std, torch.ones_like(std)))
        return self

    @classmethod
    def from_features(cls, features: torch.Tensor, out_dim: int, **kwargs) -> "ProjectionHead":
        check_tensor("features", features, ndim=2)
        return cls(features.shape[1], out_dim, **kwargs).fit_standardizer(features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a (B, {self.in_dim}) torch.Tensor, got {type(x).__name__}")
        if x.dim() == 0 or x.shape[-1] != self.in_dim:
            raise ValueError(f"expected features of size {self.in_dim}, got {tuple(x.shape)}")
        if not x.dtype.is_floating_point:
            raise ValueError(f"features must be floating point, got {x.dtype}; use x.float()")
        return self.net((x - self.mean) / self.std)


class DualEncoder(nn.Module):
    """Two projection heads, one per tower: (image features, text features) -> two (B, D) embeddings."""

    def __init__(self, image_head: nn.Module, text_head: nn.Module):
        super().__init__()
        for name, head in (("image_head", image_head), ("text_head", text_head)):
            if not isinstance(head, nn.Module):
                raise TypeError(f"{name} must be a torch.nn.Module (e.g. a ProjectionHead), got {type(head).__name__}")
        self.image_head, self.text_head = image_head, text_head

    def encode_images(self, x: torch.Tensor) -> torch.Tensor:
        return self.image_head(x)

    def encode_texts(self, x: torch.Tensor) -> torch.Tensor:
        return self.text_head(x)

    def forward(self, image_features: torch.Tensor, text_features: torch.Tensor):
        return self.image_head(image_features), self.text_head(text_features)
