r"""Three ways to bring depth into image-phrase alignment (course seed 002, problem 4).

1. **Average** (:class:`AverageFusion`): project the RGB and the depth features to the joint space
   and average them; the mean is the image embedding contrasted with the phrase.
2. **Early fusion** (:class:`EarlyFusionEncoder`): combine the two *images* before the projection:
   stack RGB (3 channels) and depth (1 channel) into a 4-channel image and encode it with one CNN,
   so a single feature represents both. When only pretrained per-modality *features* are available,
   :class:`ConcatFusion` is the feature-level counterpart: concatenate, then one projection.
3. **Depth as an augmented view** (:func:`depth_augmented_view_loss`): keep RGB as the image
   embedding and add an image-depth contrastive term, so that images are embedded where their depth
   views are (a CMC-style extra view; Tian et al., 2020).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn

from .._deprecation import keyword_settings
from ..checks import check_int, check_real
from ..losses.info_nce import info_nce
from .depth import small_cnn


class AverageFusion(nn.Module):
    r"""Mean of the projected RGB and depth features.

    .. math:: z = \tfrac12\,(W_r\, f_{rgb} + b_r) + \tfrac12\,(W_d\, f_{depth} + b_d)

    Args:
        rgb_dim, depth_dim: sizes of the two input features; out_dim: joint embedding size.

    Shapes: ``forward(rgb (B, rgb_dim), depth (B, depth_dim)) -> (B, out_dim)``.
    """

    def __init__(self, rgb_dim: int, depth_dim: int, out_dim: int):
        super().__init__()
        _check_dims(rgb_dim, depth_dim, out_dim)
        self.proj_rgb = nn.Linear(rgb_dim, out_dim)
        self.proj_depth = nn.Linear(depth_dim, out_dim)

    def forward(self, rgb: torch.Tensor, depth: torch.Tensor) -> torch.Tensor:
        _check_batch(rgb, depth, self.proj_rgb.in_features, self.proj_depth.in_features)
        return 0.5 * (self.proj_rgb(rgb) + self.proj_depth(depth))


class ConcatFusion(nn.Module):
    r"""Feature-level early fusion: concatenate, then one projection.

    .. math:: z = W\,[f_{rgb};\, f_{depth}] + b

    Shapes: ``forward(rgb (B, rgb_dim), depth (B, depth_dim)) -> (B, out_dim)``.
    """

    def __init__(self, rgb_dim: int, depth_dim: int, out_dim: int):
        super().__init__()
        _check_dims(rgb_dim, depth_dim, out_dim)
        self.rgb_dim, self.depth_dim = rgb_dim, depth_dim
        self.proj = nn.Linear(rgb_dim + depth_dim, out_dim)

    def forward(self, rgb: torch.Tensor, depth: torch.Tensor) -> torch.Tensor:
        _check_batch(rgb, depth, self.rgb_dim, self.depth_dim)
        return self.proj(torch.cat([rgb, depth], dim=-1))


class EarlyFusionEncoder(nn.Module):
    r"""Image-level early fusion: one small CNN from scratch on the 4-channel RGB-D image.

    .. math:: z = \mathrm{CNN}_4([\,x_{rgb};\, d\,]) \in \mathbb{R}^{out\_dim}

    A pretrained 3-channel backbone cannot take the 4th channel without new first-layer weights, so
    this encoder is trained from scratch (the first layer's BatchNorm rescales metres vs [0, 1] RGB).

    Shapes: ``forward(rgb (B, 3, H, W), depth (B, 1, H, W) or (B, H, W)) -> (B, out_dim)``.
    """

    def __init__(self, out_dim: int, width: int = 32):
        super().__init__()
        self.net = small_cnn(4, out_dim, width)

    def forward(self, rgb: torch.Tensor, depth: torch.Tensor) -> torch.Tensor:
        for name, t in (("rgb", rgb), ("depth", depth)):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
            if t.is_complex() or t.dtype == torch.bool:
                raise ValueError(f"{name} must be a real-valued image tensor, got {t.dtype}")
        depth = depth.unsqueeze(1) if depth.dim() == 3 else depth
        if rgb.dim() != 4 or rgb.shape[1] != 3 or depth.dim() != 4 or depth.shape[1] != 1:
            raise ValueError(f"expected rgb (B, 3, H, W) and depth (B, 1, H, W), got {tuple(rgb.shape)} and {tuple(depth.shape)}")
        if rgb.shape[0] != depth.shape[0] or rgb.shape[2:] != depth.shape[2:]:
            raise ValueError(f"rgb {tuple(rgb.shape)} and depth {tuple(depth.shape)} must share batch and H, W; "
                             "resize the depth map to the image size first")
        return self.net(torch.cat([rgb.float(), depth.float()], dim=1))


@keyword_settings(old_order=("temperature", "weight", "pair_loss"))
def depth_augmented_view_loss(
    img: torch.Tensor,
    txt: torch.Tensor,
    depth: torch.Tensor,
    *,
    temperature: float = 0.07,
    weight: float = 1.0,
    pair_loss: Callable[..., torch.Tensor] = info_nce,
) -> torch.Tensor:
    r"""Image-phrase loss plus an intra-image term that treats depth as an augmented view of the image.

    .. math:: L = L_{pair}(z_{img}, z_{txt}) + \lambda\, L_{pair}(z_{img}, z_{depth})

    The first term aligns images and phrases; the second pulls each image towards its own depth view
    and away from the other images' depth (Tian et al., 2020, CMC with the image as core view).

    Args:
        img, txt, depth: (B, D) embeddings; row i of each is the same item.
        temperature: tau passed to ``pair_loss``; weight: :math:`\lambda \ge 0`.
        pair_loss: ``pair_loss(a, b, temperature=...) -> scalar``; symmetric InfoNCE by default.

    Returns:
        The scalar loss.
    """
    weight = check_real("weight", weight)
    if weight < 0:
        raise ValueError(f"weight must be >= 0, got {weight}")
    if not callable(pair_loss):
        raise TypeError(f"pair_loss must be callable (a, b, temperature=...) -> scalar, got {type(pair_loss).__name__}")
    return pair_loss(img, txt, temperature=temperature) + weight * pair_loss(img, depth, temperature=temperature)


def _check_dims(rgb_dim, depth_dim, out_dim) -> None:
    for name, v in (("rgb_dim", rgb_dim), ("depth_dim", depth_dim), ("out_dim", out_dim)):
        check_int(name, v, minimum=1)


def _check_batch(rgb: torch.Tensor, depth: torch.Tensor, rgb_dim: int | None = None,
                 depth_dim: int | None = None) -> None:
    for name, t in (("rgb", rgb), ("depth", depth)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} features must be a torch.Tensor, got {type(t).__name__}")
    if rgb.dim() != 2 or depth.dim() != 2 or rgb.shape[0] != depth.shape[0]:
        raise ValueError(f"expected (B, rgb_dim) and (B, depth_dim) features with the same B, "
                         f"got {tuple(rgb.shape)} and {tuple(depth.shape)}")
    for name, t, want in (("rgb", rgb, rgb_dim), ("depth", depth, depth_dim)):
        if not t.dtype.is_floating_point:
            raise ValueError(f"{name} features must be floating point, got {t.dtype}; use .float()")
        if want is not None and t.shape[1] != want:
            raise ValueError(f"{name} features have width {t.shape[1]} but the fusion was built with "
                             f"{name}_dim={want} (shape {tuple(t.shape)})")
