r"""Output pooling: turn a padded sequence of token features (B, L, D) into one vector (B, D).

The three strategies compared in Crabtree's thesis (sec. 2.4.3, 3.3): average pooling over the real
tokens, multi-head self-attention (MHSA) pooling with or without a learned CLS token, and a full
Transformer block. In the thesis plain average pooling was the strongest and has no hyperparameters.

Mask convention: ``mask`` is a (B, L) bool tensor, True for real tokens and False for padding (the
tokenizer's convention; PyTorch's ``key_padding_mask`` is its negation). Padding never changes the
output: padded positions are excluded from attention keys and from the final mean.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ..checks import check_int, check_probability, check_tensor


def masked_mean(x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    r"""Mean over the real tokens.

    .. math:: \mathrm{pool}(x)_b = \frac{\sum_l m_{bl}\, x_{bl}}{\max(1, \sum_l m_{bl})}

    Args:
        x: (B, L, D) token features.
        mask: (B, L) bool, True for real tokens; None means all tokens are real.

    Returns:
        (B, D); a row with no real token (or an empty sequence, L = 0) gives zeros. Padded values
        never enter (even inf/NaN).
    """
    if isinstance(x, torch.Tensor) and x.dim() != 3:
        raise ValueError(f"expected (B, L, D) token features, got shape {tuple(x.shape)}")
    check_tensor("x", x, ndim=3, finite=False, nonempty=False)
    if mask is None:
        return x.mean(1) if x.shape[1] else x.new_zeros(x.shape[0], x.shape[2])
    _check_mask(x, mask)
    x = torch.where(mask.unsqueeze(-1), x, torch.zeros((), dtype=x.dtype, device=x.device))
    return x.sum(1) / mask.sum(1, keepdim=True).clamp_min(1).to(x.dtype)


class AttentionPool(nn.Module):
    r"""Multi-head self-attention pooling (thesis sec. 2.4.3.2; Vaswani et al., 2017).

    .. math::
        H = \mathrm{MHSA}(X, X, X;\ \text{keys restricted to real tokens}),\qquad
        z = \begin{cases} H_0 & \text{use\_cls (a learned token } c \text{ prepended to } X)\\
                          \mathrm{masked\_mean}(H) & \text{otherwise}\end{cases}

    Args:
        dim: D, the token size (must be divisible by ``heads``).
        heads: number of attention heads (the thesis used 8).
        use_cls: prepend a learned CLS token and return its output, as BERT (Devlin et al., 2019).
        dropout: attention dropout (the thesis tuned 0.1).

    Shapes: ``forward(x (B, L, D), mask (B, L) bool or None) -> (B, D)``. Without CLS, every row
    needs at least one real token.
    """

    def __init__(self, dim: int, heads: int = 4, use_cls: bool = False, dropout: float = 0.0):
        super().__init__()
        check_int("dim", dim, minimum=1), check_int("heads", heads, minimum=1)
        check_probability("dropout", dropout, open_high=True)
        if dim % heads:
            raise ValueError(f"dim={dim} must be divisible by heads={heads}")
        self.attn = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.use_cls = use_cls
        self.cls = nn.Parameter(torch.randn(1, 1, dim) * 0.02) if use_cls else None

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        x, mask = _prepare(x, mask, self.cls, self.attn.embed_dim)
        h, _ = self.attn(x, x, x, key_padding_mask=~mask, need_weights=False)
        return h[:, 0] if self.use_cls else masked_mean(h, mask)


class TransformerPool(nn.Module):
    r"""Transformer-encoder pooling (thesis sec. 2.4.3.3; Vaswani et al., 2017).

    ``layers`` post-norm Transformer encoder blocks (MHSA + feed-forward, residuals, LayerNorm) over
    the real tokens, then the masked mean of their outputs (or the CLS output with ``use_cls``).

    .. math::
        H = \mathrm{LN}(X' + \mathrm{FFN}(X')),\quad X' = \mathrm{LN}(X + \mathrm{MHSA}(X)),\qquad
        z = \mathrm{masked\_mean}(H)

    Args:
        dim: D (divisible by ``heads``); heads: attention heads; layers: encoder blocks;
        ff_dim: feed-forward width (default 4 D; the thesis used 2048); dropout: dropout rate;
        use_cls: prepend a learned CLS token and return its output instead of the mean.

    Shapes: ``forward(x (B, L, D), mask (B, L) bool or None) -> (B, D)``.
    """

    def __init__(self, dim: int, heads: int = 4, layers: int = 1, ff_dim: int | None = None,
                 dropout: float = 0.0, use_cls: bool = False):
        super().__init__()
        check_int("dim", dim, minimum=1), check_int("heads", heads, minimum=1), check_int("layers", layers, minimum=1)
        if ff_dim is not None:
            check_int("ff_dim", ff_dim, minimum=1)
        check_probability("dropout", dropout, open_high=True)
        self.dim = dim
        if dim % heads:
            raise ValueError(f"dim={dim} must be divisible by heads={heads}")
        block = nn.TransformerEncoderLayer(dim, heads, ff_dim or 4 * dim, dropout, batch_first=True)
        self.encoder = nn.TransformerEncoder(block, layers, enable_nested_tensor=False)
        self.use_cls = use_cls
        self.cls = nn.Parameter(torch.randn(1, 1, dim) * 0.02) if use_cls else None

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        x, mask = _prepare(x, mask, self.cls, self.dim)
        h = self.encoder(x, src_key_padding_mask=~mask)
        return h[:, 0] if self.use_cls else masked_mean(h, mask)


def _check_mask(x: torch.Tensor, mask: torch.Tensor) -> None:
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or mask.shape != x.shape[:2]:
        got = (f"{mask.dtype} {tuple(mask.shape)}" if isinstance(mask, torch.Tensor) else type(mask).__name__)
        raise ValueError(
            f"mask must be a bool tensor of shape (B, L) = {tuple(x.shape[:2])} with True for real tokens, "
            f"got {got}"
        )


def _prepare(x: torch.Tensor, mask: torch.Tensor | None, cls: torch.Tensor | None, dim: int | None = None):
    """Check shapes, zero the padded positions (so inf/NaN padding cannot leak through 0-weight
    attention), default the mask, and prepend the CLS token (always a real token)."""
    if isinstance(x, torch.Tensor) and x.dim() != 3:
        raise ValueError(f"expected (B, L, D) token features, got shape {tuple(x.shape)}")
    check_tensor("x", x, ndim=3, finite=False, nonempty=False)
    if dim is not None and x.shape[-1] != dim:
        raise ValueError(f"x has {x.shape[-1]} features per token but this pooling was built with dim={dim}; "
                         f"project the tokens to {dim} first (x shape {tuple(x.shape)})")
    if x.shape[0] == 0:
        raise ValueError(f"x is an empty batch (shape {tuple(x.shape)})")
    if mask is None:
        mask = torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
    _check_mask(x, mask)
    x = torch.where(mask.unsqueeze(-1), x, torch.zeros((), dtype=x.dtype, device=x.device))
    if cls is not None:
        x = torch.cat([cls.expand(x.shape[0], -1, -1).to(x.dtype), x], dim=1)
        mask = torch.cat([mask.new_ones(x.shape[0], 1), mask], dim=1)
    elif not bool(mask.any(1).all()):
        raise ValueError("a sequence has no real token (all padding); attention pooling without CLS needs one "
                         "(use use_cls=True, or drop empty sequences)")
    return x, mask
