r"""Depth as a view: a small CNN trained from scratch on 1-channel depth, or a colormap so that a
pretrained RGB encoder can read depth as a 3-channel image (the usual trick for RGB-D with
ImageNet backbones, e.g. Eitel et al., 2015; Gupta et al., 2014 used HHA for the same purpose).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn

from .._optional import missing_extra
from ..checks import check_int


def small_cnn(in_channels: int, out_dim: int, width: int = 32) -> nn.Sequential:
    """Three stride-2 conv blocks (width, 2 width, 4 width), global average pool, linear to out_dim.
    (B, in_channels, H, W) -> (B, out_dim) for any H, W."""
    for name, v in (("in_channels", in_channels), ("out_dim", out_dim), ("width", width)):
        check_int(name, v, minimum=1)
    def block(i, o):
        return [nn.Conv2d(i, o, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(o), nn.ReLU(inplace=True)]
    return nn.Sequential(
        nn.BatchNorm2d(in_channels),  # learned input normalisation: depth in metres has no fixed scale
        *block(in_channels, width), *block(width, 2 * width), *block(2 * width, 4 * width),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4 * width, out_dim),
    )


class DepthEncoder(nn.Module):
    r"""Small CNN on a depth map, trained from scratch.

    .. math:: z = W\,\mathrm{GAP}(\mathrm{conv}_3(\mathrm{conv}_2(\mathrm{conv}_1(\mathrm{BN}(d))))) \in \mathbb{R}^{out\_dim}

    Args:
        out_dim: size of the output feature.
        width: channels of the first conv block (then 2x and 4x).

    Shapes: ``forward(depth (B, 1, H, W) or (B, H, W)) -> (B, out_dim)``; depth in metres.
    """

    def __init__(self, out_dim: int, width: int = 32):
        super().__init__()
        self.net = small_cnn(1, out_dim, width)

    def forward(self, depth: torch.Tensor) -> torch.Tensor:
        return self.net(_as_b1hw(depth).float())


def colorize_depth(depth: torch.Tensor, cmap: str = "viridis") -> torch.Tensor:
    r"""Depth maps to RGB images through a matplotlib colormap, per-image min-max normalised.

    .. math::
        x = \frac{d - \min d}{\max d - \min d}\ (0 \text{ if constant}),\qquad
        \mathrm{rgb} = \mathrm{LUT}\big[\min(\lfloor N x \rfloor, N-1)\big]

    which is exactly what ``matplotlib.colormaps[cmap](x)`` does for an N-colour map.
    Non-finite pixels (missing depth) are ignored by the min/max and get the first colour.

    Args:
        depth: (B, H, W) or (B, 1, H, W), any float or integer dtype, any device.
        cmap: a matplotlib colormap name.

    Returns:
        (B, 3, H, W) float32 in [0, 1] on ``depth``'s device.
    """
    try:
        import matplotlib
    except ModuleNotFoundError as e:  # pragma: no cover
        raise missing_extra(e, "data", "mmalign.models.depth.colorize_depth") from e
    try:
        cm = matplotlib.colormaps[cmap]
    except KeyError:
        raise ValueError(f"unknown colormap {cmap!r}; see matplotlib.colormaps for names such as 'viridis'") from None
    d = _as_b1hw(depth)[:, 0].float()  # (B, H, W)
    lut = torch.as_tensor(cm(np.arange(cm.N))[:, :3], dtype=torch.float32, device=d.device)  # (N, 3)
    finite = torch.isfinite(d)
    lo = torch.where(finite, d, torch.inf).amin(dim=(1, 2), keepdim=True)
    hi = torch.where(finite, d, -torch.inf).amax(dim=(1, 2), keepdim=True)
    span = hi - lo
    ok = finite & torch.isfinite(span) & (span > 0)
    x = torch.where(ok, (d - lo) / torch.where(span > 0, span, 1.0), 0.0)
    idx = (x * cm.N).long().clamp_(0, cm.N - 1)
    return lut[idx].permute(0, 3, 1, 2).contiguous()


def _as_b1hw(depth: torch.Tensor) -> torch.Tensor:
    if not isinstance(depth, torch.Tensor):
        raise TypeError(f"depth must be a torch.Tensor (B, H, W) or (B, 1, H, W), got {type(depth).__name__}")
    if depth.is_complex() or depth.dtype == torch.bool:
        raise ValueError(f"depth must be real-valued (metres), got {depth.dtype}")
    if depth.dim() in (3, 4) and depth.numel() == 0:
        raise ValueError(f"depth is empty (shape {tuple(depth.shape)})")
    if depth.dim() == 3:
        return depth.unsqueeze(1)
    if depth.dim() == 4 and depth.shape[1] == 1:
        return depth
    raise ValueError(f"depth must be (B, H, W) or (B, 1, H, W), got shape {tuple(depth.shape)}")
