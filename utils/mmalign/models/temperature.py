"""A learnable temperature for contrastive losses (CLIP's ``logit_scale``, Radford et al., 2021)."""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from ..checks import check_positive


class LearnableTemperature(nn.Module):
    r"""The temperature :math:`\tau` of a softmax loss as a trained parameter.

    CLIP learns the inverse temperature as :math:`e^{s}` with :math:`s` initialised at
    :math:`\log(1/0.07)` and keeps :math:`e^{s} \le 100`. Here

    .. math::
        \tau = \exp\big(-\operatorname{clamp}(s,\ \log \sigma_{\min},\ \log \sigma_{\max})\big),

    so :math:`\tau \in [1/\sigma_{\max}, 1/\sigma_{\min}]`; outside the clamp the gradient of
    :math:`s` is zero, as with CLIP's in-place clamp. Calling the module returns :math:`\tau` as a
    0-d float32 tensor on the parameter's device, which every loss of :mod:`mmalign.losses` accepts as
    its ``temperature``; put the module's parameter in the optimizer with the model's::

        temp = LearnableTemperature(0.07)
        opt = torch.optim.AdamW([*model.parameters(), *temp.parameters()], lr=1e-3)
        loss = info_nce(z_img, z_txt, temperature=temp())
    """

    def __init__(self, init: float = 0.07, max_scale: float = 100.0, min_scale: float = 1.0):
        super().__init__()
        init, max_scale, min_scale = (check_positive("init", init), check_positive("max_scale", max_scale),
                                      check_positive("min_scale", min_scale))
        if min_scale > max_scale:
            raise ValueError(f"min_scale ({min_scale}) must not exceed max_scale ({max_scale})")
        if not 1 / max_scale <= init <= 1 / min_scale:
            raise ValueError(f"init temperature {init} lies outside [1/max_scale, 1/min_scale] = "
                             f"[{1 / max_scale:g}, {1 / min_scale:g}]; widen the bounds or change init")
        self.log_scale = nn.Parameter(torch.tensor(math.log(1 / init), dtype=torch.float32))
        self.min_scale, self.max_scale = min_scale, max_scale

    def forward(self) -> torch.Tensor:
        s = self.log_scale.float().clamp(math.log(self.min_scale), math.log(self.max_scale))
        return torch.exp(-s)

    def extra_repr(self) -> str:
        return f"tau={self().item():.4g}, scale in [{self.min_scale:g}, {self.max_scale:g}]"
