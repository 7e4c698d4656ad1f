"""The distributed wrapper of the training loop: PyTorch's ``DistributedDataParallel`` around the loss.

Under ``torchrun`` (:func:`mmalign.dist.init`), :func:`mmalign.train.fit` and
:func:`mmalign.train.train_step` run the loss through :func:`wrap_ddp`'s module: a
``torch.nn.parallel.DistributedDataParallel`` (gloo on CPU, NCCL on CUDA) around a small module
whose forward is ``loss_fn(model, batch)``. So

* the loss function receives the plain model (``model["image"]``, ``model.encode_text(...)`` keep
  working; the DDP wrapper is not what it sees), yet every forward goes through DDP, whose
  bucketed all-reduce of the gradients overlaps the backward pass (the pattern of PyTorch Lightning's
  module wrapper);
* the optimizer's parameters outside the model (:func:`mmalign.train.state.outside_parameters`, e.g. a
  :class:`mmalign.models.temperature.LearnableTemperature` kept next to the model) are registered in that
  module, so DDP broadcasts rank 0's values at the start and averages their gradients like the model's.

DDP averages gradients over the W processes: a loss that every process computes on the gathered batch
(:func:`mmalign.dist.gathered_info_nce`) then gets exactly the single-process gradient (see
:mod:`mmalign.dist`).

``find_unused_parameters`` is False by default (the cheap setting: DDP does not search the graph after
every forward), so every trainable parameter must receive a gradient at every step. One that does not
(a head the loss skips, a frozen branch left in the optimizer) would leave its bucket unreduced and
make DDP fail at the *next* step with a message that gives parameter indices; :func:`check_all_used`
instead stops the step that missed it, naming every such parameter and the two fixes: pass
``find_unused_parameters=True`` to :func:`mmalign.train.fit` (DDP then marks them as reduced; their
gradient stays None on every process, as in one process) or take them out of the optimizer / set
``requires_grad=False``.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import torch
from torch import nn

from .. import dist as _dist
from .state import OutsideParameter, outside_parameters

__all__ = ["LossModule", "wrap_ddp", "check_outside_parameters", "check_all_used"]


class LossModule(nn.Module):
    """The module DDP wraps: ``forward(loss_fn, batch) = loss_fn(model, batch)``.

    Args:
        model: the trained module (``self.model``).
        outside: parameters the optimizer updates that are not in ``model`` (registered here, so that
            DDP reduces their gradients too).
    """

    def __init__(self, model: nn.Module, outside: Sequence[nn.Parameter] = ()):
        super().__init__()
        self.model = model
        self.outside = nn.ParameterList(list(outside))  # the same Parameter objects, not copies

    def forward(self, loss_fn: Callable, batch: Any):
        """Run ``loss_fn(self.model, batch)``."""
        return loss_fn(self.model, batch)


def check_outside_parameters(outside: Sequence[OutsideParameter], device: torch.device | None = None,
                             distributed: bool | None = None) -> None:
    """Refuse what the training loop cannot save or reduce, naming the parameter.

    Under torch.distributed a tensor the optimizer updates outside the model must be an
    ``nn.Parameter`` (DDP reduces parameters only); every one must be on the training ``device``.

    Raises:
        ValueError: naming the parameter and the fix.
    """
    distributed = _dist.is_distributed() if distributed is None else distributed
    for o in outside:
        if distributed and not isinstance(o.param, nn.Parameter):
            raise ValueError(
                f"the optimizer updates {o.name}, a plain tensor outside the model; under torch.distributed its "
                "gradient could not be averaged across processes, so the processes would drift apart. Make it "
                "a torch.nn.Parameter (or a parameter of the model, or of an nn.Module such as "
                "LearnableTemperature) before building the optimizer")
        if device is not None and o.param.device != torch.device(device) and not (
                torch.device(device).type == o.param.device.type and torch.device(device).index is None):
            raise ValueError(
                f"the optimizer updates {o.name}, which is on {o.param.device} while the model trains on {device}; "
                f"move it there before building the optimizer (e.g. temperature.to({str(device)!r}))")


def wrap_ddp(model: nn.Module, optimizer: torch.optim.Optimizer, stateful: Mapping[str, Any] | None = None,
             device: str | torch.device | None = None, find_unused_parameters: bool = False) -> nn.Module:
    """A ``DistributedDataParallel`` around :class:`LossModule` ``(model, the optimizer's parameters
    outside it)``: call it as ``ddp(loss_fn, batch)``.

    Construction broadcasts rank 0's parameters and buffers (model and outside parameters) to every
    rank. On CUDA the module is bound to the process's GPU (``device_ids=[device.index]``).

    Args:
        model: the trained module, already on ``device``.
        optimizer: its optimizer.
        stateful: the run's stateful objects (names for errors).
        device: the training device (default: the model's).
        find_unused_parameters: DDP's setting of that name: True lets a step leave some trainable
            parameters without a gradient (at the cost of a graph search after every forward pass);
            False (default) requires every one to get a gradient (:func:`check_all_used`).

    Raises:
        ValueError: outside torch.distributed, or an outside parameter that cannot be reduced or is on
            another device (:func:`check_outside_parameters`).
    """
    if not _dist.is_distributed():
        raise ValueError("wrap_ddp needs an initialised process group of more than one process "
                         "(run under torchrun and call mmalign.dist.init() first)")
    if device is None:
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
    device = torch.device(device)
    outside = outside_parameters(model, optimizer, stateful)
    check_outside_parameters(outside, device, distributed=True)
    module = LossModule(model, [o.param for o in outside])
    device_ids = [device.index if device.index is not None else torch.cuda.current_device()] \
        if device.type == "cuda" else None
    if not isinstance(find_unused_parameters, bool):
        raise ValueError(f"find_unused_parameters must be True or False, got {find_unused_parameters!r}")
    return nn.parallel.DistributedDataParallel(module, device_ids=device_ids,
                                               find_unused_parameters=find_unused_parameters)


def check_all_used(ddp: nn.Module, step: int) -> None:
    """After the backward pass of a ``find_unused_parameters=False`` DDP step, refuse a trainable parameter
    that received no gradient, naming it (``model.head.weight``, ``outside[0]`` for the optimizer's first
    parameter outside the model), before the optimizer steps.

    Raises:
        ValueError: naming the parameters and the fixes (on every process whose step missed them).
    """
    if getattr(ddp, "find_unused_parameters", True):
        return
    missing = [name for name, p in ddp.module.named_parameters() if p.requires_grad and p.grad is None]
    if missing:
        names = [n.replace("outside.", "outside[", 1) + "]" if n.startswith("outside.") else n for n in missing]
        raise ValueError(
            f"under DistributedDataParallel with find_unused_parameters=False, step {step} gave no gradient to "
            f"{', '.join(names)} (model.* are the model's parameters, outside[i] the optimizer's i-th parameter "
            "outside the model): DDP cannot average a gradient that was never computed. If the loss skips them "
            "on purpose, pass find_unused_parameters=True to fit (or train_step); otherwise take them out of the "
            "optimizer or set requires_grad=False")
