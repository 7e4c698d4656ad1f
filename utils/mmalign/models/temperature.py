"""A learnable temperature for contrastive losses (CLIP's ``logit_scale``, Radford et al., 2021)."""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from ..checks import check_positive


class LearnableTemperature(nn.Module):
    r"""The temperature :math:`\tau` of a softmax loss as a trained parameter.

    CLIP learns the inverse temperature as :math:`e^{s}` with :math:`s` initialised at
    :math:`\log(1/0.07)` and clamps :math:`s` in place so that :math:`e^{s} \le 100`. Here

    .. math::
        s \leftarrow \operatorname{clamp}(s,\ \log \sigma_{\min},\ \log \sigma_{\max}), \qquad \tau = e^{-s},

    so :math:`\tau \in [1/\sigma_{\max}, 1/\sigma_{\min}]`. The clamp is a projection of the parameter
    itself (:meth:`clamp_`), done in place at the start of every call, as CLIP does after each step:
    an optimizer step that carries :math:`s` past a bound is undone before :math:`s` is used, and the
    gradient at the bound is the true one, so the temperature leaves the bound as soon as the loss
    asks for it. (A clamp inside the forward instead would give a zero gradient past the bound while
    Adam's momentum kept pushing the raw parameter further out: tau would stay at the bound for good.)
    The projection needs no host sync and leaves graphs built by earlier calls valid (no operation
    saves :math:`s` for the backward pass).

    Calling the module returns :math:`\tau` as a 0-d float32 tensor on the parameter's device, which
    every loss of :mod:`mmalign.losses` accepts as its ``temperature``.

    **Register it in the model** (an attribute of the model's ``nn.Module``) so that its parameter is
    in ``model.parameters()`` (the optimizer) *and* in ``model.state_dict()`` (every checkpoint,
    ``mmalign.train.fit``'s included); a temperature handed only to the optimizer is not saved, and a
    resumed run would restart it at ``init`` while the optimizer's moments say otherwise::

        model.temperature = LearnableTemperature(0.07)        # a submodule: trained and checkpointed
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        loss = info_nce(z_img, z_txt, temperature=model.temperature())

    Kept outside a model, save and restore its ``state_dict()`` with the checkpoint yourself (a
    ``stateful`` object of ``fit``). A state holding a NaN or inf is refused on load.
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

    @torch.no_grad()
    def clamp_(self) -> "LearnableTemperature":
        """Project the parameter onto its bounds in place, :math:`s \\in [\\log\\sigma_{\\min}, \\log\\sigma_{\\max}]`
        (CLIP's ``logit_scale.clamp_``); every call of the module does it first. Returns the module."""
        self.log_scale.clamp_(math.log(self.min_scale), math.log(self.max_scale))
        return self

    def forward(self) -> torch.Tensor:
        self.clamp_()
        return torch.exp(-self.log_scale.float())

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        value = state_dict.get(prefix + "log_scale")
        if isinstance(value, torch.Tensor) and not bool(torch.isfinite(value).all()):
            raise ValueError(f"{prefix}log_scale in the state_dict is {value.tolist()}, not a finite number; the "
                             "checkpoint was saved after the temperature diverged: resume from an earlier one")
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        return f"tau={self().item():.4g}, scale in [{self.min_scale:g}, {self.max_scale:g}]"
