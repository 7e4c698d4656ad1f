"""The run state and its checkpoints: :class:`TrainState` (everything a training run changes), the RNG
states, the run's fingerprint, and :func:`save_checkpoint` / :func:`load_checkpoint`.

Every parameter the optimizer updates is saved, whether or not it lives in the model: parameters
outside the model (a :class:`mmalign.models.temperature.LearnableTemperature` kept next to it, a
learnable bias) are found by :func:`outside_parameters` and stored under the checkpoint's
``"params"`` key by their position in the optimizer (``"group.index"``), so a resumed run restores
them exactly.
"""

from __future__ import annotations

import pickle
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping, NamedTuple

import numpy as np
import torch

from ..data.cache import atomic_write

__all__ = ["History", "TrainState", "OutsideParameter", "outside_parameters", "run_fingerprint", "save_checkpoint",
           "load_checkpoint"]

_CHECKPOINT_KEYS = ("model", "optimizer", "scheduler", "scaler", "stateful", "history", "epoch",
                    "step_in_epoch", "global_step", "rng")


@dataclass
class History:
    """What happened during training: one entry per step, one per evaluation."""

    step: list = field(default_factory=list)
    loss: list = field(default_factory=list)
    metrics: dict = field(default_factory=dict)  # name -> list of per-step floats
    evals: list = field(default_factory=list)  # dicts with step, epoch and the eval metrics
    best: dict | None = None  # the best eval (when keep_best is set)
    seconds: float = 0.0

    def eval_series(self, key: str) -> tuple[list, list]:
        """(steps, values) of one eval metric, for plotting."""
        return [e["step"] for e in self.evals], [e[key] for e in self.evals]

    def to_dict(self) -> dict:
        """Every field as plain lists, dicts and numbers (what a checkpoint stores)."""
        return asdict(self)


def _no_scaler() -> torch.amp.GradScaler:
    return torch.amp.GradScaler("cpu", enabled=False)


@dataclass(eq=False)
class TrainState:
    """Everything a training run changes and a checkpoint restores, in one object.

    :func:`mmalign.train.train_step` and :func:`mmalign.train.record_eval` update it;
    :func:`save_checkpoint` writes it and :func:`load_checkpoint` reads it back in place. The random
    number generators (torch, CUDA, numpy, python's ``random``) are not fields: they are the process's
    global ones, captured by :func:`save_checkpoint` and restored by :func:`load_checkpoint`.

    Attributes:
        model: the module being trained.
        optimizer: its optimizer. Its parameters outside ``model`` (:func:`outside_parameters`) are
            checkpointed too.
        scheduler: a learning-rate scheduler stepped after every optimizer step, or None.
        scaler: the ``torch.amp.GradScaler`` (disabled unless training in float16).
        stateful: other objects with ``state_dict``/``load_state_dict`` (a queue, a margin schedule).
        history: the :class:`History` of the run so far.
        epoch: the epoch in progress (0-based).
        step_in_epoch: batches of that epoch already done; a resumed run starts at the next one.
        global_step: optimizer steps done in all.
        best_state: a CPU copy of the model's weights at the best evaluation so far (``keep_best``), or None.
        best_params: CPU copies of the optimizer's parameters outside the model at that evaluation (a learned
            temperature kept next to the model), keyed by their optimizer position (``"group.index"``, as
            the checkpoint's ``"params"``), or None.
        ddp: under torch.distributed, the ``DistributedDataParallel`` module the loss runs through
            (:func:`mmalign.train.distributed.wrap_ddp`; ``train_step`` builds it when missing). Not saved.
    """

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any = None
    scaler: torch.amp.GradScaler = field(default_factory=_no_scaler)
    stateful: dict = field(default_factory=dict)
    history: History = field(default_factory=History)
    epoch: int = 0
    step_in_epoch: int = 0
    global_step: int = 0
    best_state: dict | None = None
    best_params: dict | None = None
    ddp: Any = None


class OutsideParameter(NamedTuple):
    """A tensor the optimizer updates that is not a parameter of the model."""

    key: str  # "group.index": its position in optimizer.param_groups, the key it is saved under
    name: str  # how errors name it: stateful['temp'].log_scale, or optimizer group 0 parameter 3
    param: torch.Tensor


def outside_parameters(model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                       stateful: Mapping[str, Any] | None = None) -> list[OutsideParameter]:
    """The tensors ``optimizer`` updates that are not parameters of ``model``, in optimizer order.

    A parameter of an ``nn.Module`` among ``stateful`` is named after it (``stateful['temp'].log_scale``),
    any other by its place in the optimizer (``optimizer group 0 parameter 3``).

    Args:
        model: the trained module.
        optimizer: its optimizer.
        stateful: the run's stateful objects (only used for names).

    Returns:
        A list of :class:`OutsideParameter` ``(key, name, param)``, empty when the optimizer holds
        the model's parameters only.
    """
    inside = {id(p) for p in model.parameters()}
    names = {}
    for sname, obj in dict(stateful or {}).items():
        if isinstance(obj, torch.nn.Module):
            for pname, p in obj.named_parameters():
                names.setdefault(id(p), f"stateful[{sname!r}].{pname}")
    out = []
    for g, group in enumerate(optimizer.param_groups):
        for i, p in enumerate(group["params"]):
            if id(p) not in inside:
                name = names.get(id(p), f"optimizer group {g} parameter {i}")
                out.append(OutsideParameter(f"{g}.{i}", f"{name} {tuple(p.shape)}", p))
    return out


def _rng_state() -> dict:
    """Every RNG's state as tensors and plain Python values, so a checkpoint loads with weights_only."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, py_gauss = random.getstate()
    state = {"torch": torch.get_rng_state(),
             "numpy": [name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)],
             "python": [version, list(internal), py_gauss]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    # .cpu(): a checkpoint loaded with map_location="cuda" has its RNG states on the GPU, and the
    # generators accept CPU byte tensors only
    torch.set_rng_state(state["torch"].cpu())
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, keys.cpu().numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, internal, py_gauss = state["python"]
    random.setstate((version, tuple(internal), py_gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


def _seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def _plain(value):
    """A JSON-like copy of an optimizer hyperparameter (tensors and tuples become numbers and lists)."""
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    return value if value is None or isinstance(value, (bool, int, float, str)) else repr(value)


def run_fingerprint(model, optimizer, scheduler, seed: int, batch_size: int, drop_last: bool, n: int | None,
                    amp: tuple, grad_clip, stateful: Mapping) -> dict:
    """What a checkpoint must have been trained with to be resumed by this call of :func:`mmalign.train.fit`.

    The model's parameter names and shapes, the optimizer's class and hyperparameters per group
    (as set when ``fit`` is called: learning rate, betas, weight decay, ...), the optimizer's parameters
    outside the model (names and shapes, when there are any), the scheduler's class, seed, batch size,
    drop_last, data size (None for an IterableDataset), mixed precision and gradient clipping. Not in
    it: the number of epochs, ``max_steps`` and the evaluation/checkpoint cadence, which a resumed run
    may change (e.g. to train longer).
    """
    outside = outside_parameters(model, optimizer, stateful)
    return {
        "model": f"{type(model).__name__}: " + ", ".join(f"{k} {tuple(v.shape)}" for k, v in model.state_dict().items()),
        "optimizer": type(optimizer).__name__,
        **{f"group {i} {k}": _plain(v) for i, group in enumerate(optimizer.param_groups)
           for k, v in sorted(group.items()) if k != "params"},
        **({"outside the model": [f"{o.key}: {o.name}" for o in outside]} if outside else {}),
        "scheduler": type(scheduler).__name__ if scheduler is not None else None,
        "seed": seed, "batch_size": batch_size, "drop_last": drop_last, "data size": n,
        "amp": f"{amp[0]} {amp[1]}", "grad_clip": grad_clip, "stateful": sorted(stateful),
    }


def _check_fingerprint(path: Path, saved: dict | None, current: dict | None) -> None:
    if saved is None or current is None:  # a checkpoint from before fingerprints, or no check asked for
        return
    diff = [f"{k}: {saved.get(k)!r} in the checkpoint, {current.get(k)!r} now"
            for k in sorted(set(saved) | set(current)) if saved.get(k) != current.get(k)]
    if diff:
        raise ValueError(
            f"checkpoint {path} was written by a run with other settings, so resuming it would silently train "
            f"with the old ones: {'; '.join(diff[:6])}{' ...' if len(diff) > 6 else ''}. Resume with the same "
            "settings, or delete the file (or pass another checkpoint_path) to start a new run")


def save_checkpoint(path: str | Path, state: TrainState, fingerprint: dict | None = None) -> Path:
    """Write ``state`` and the global RNG states to ``path`` atomically (temporary file, then rename).

    The file holds tensors and plain Python values only, so it loads with ``weights_only=True``. The
    optimizer's parameters outside the model are stored under ``"params"``, keyed by their position in
    the optimizer (:func:`outside_parameters`).

    Args:
        path: the checkpoint file; its folder is created if needed.
        state: the run to save.
        fingerprint: the run's settings (:func:`run_fingerprint`), checked by :func:`load_checkpoint`
            when the run resumes; None records none.

    Returns:
        ``path``, as a Path.
    """
    payload = {
        "model": state.model.state_dict(), "optimizer": state.optimizer.state_dict(),
        "params": {o.key: o.param.detach().clone() for o in outside_parameters(state.model, state.optimizer)},
        "scheduler": state.scheduler.state_dict() if state.scheduler is not None else None,
        "scaler": state.scaler.state_dict(), "stateful": {k: v.state_dict() for k, v in state.stateful.items()},
        "history": state.history.to_dict(), "best_state": state.best_state,
        "best_params": state.best_params, "epoch": state.epoch,
        "step_in_epoch": state.step_in_epoch, "global_step": state.global_step, "rng": _rng_state(),
        "config": fingerprint,
    }
    return atomic_write(path, lambda tmp: torch.save(payload, tmp))


def load_checkpoint(path: str | Path, state: TrainState, fingerprint: dict | None = None, *,
                    map_location: str | torch.device | None = None) -> None:
    """Restore ``state`` and the global RNG states, in place, from a file of :func:`save_checkpoint`.

    The file is read with ``weights_only=True``: nothing in it can run code.

    Args:
        path: the checkpoint file.
        state: the run to restore into; its model, optimizer (and the optimizer's parameters outside the
            model), scheduler, scaler and stateful objects load their saved states, the other fields
            are replaced.
        fingerprint: this run's settings (:func:`run_fingerprint`); when the checkpoint records other
            ones, a ValueError names every setting that differs. None skips the check.
        map_location: where the saved tensors go (default: the device of the model's parameters).

    Raises:
        ValueError: the file is truncated or not a checkpoint of ``fit``, holds pickled Python objects,
            was written with other settings, or by another model, optimizer or set of stateful objects,
            or lacks a parameter of the optimizer that is outside the model. The message names the file
            and the fix.
    """
    path = Path(path)
    if map_location is None:
        map_location = next((p.device for p in state.model.parameters()), torch.device("cpu"))
    ckpt = _read_checkpoint(path, map_location, state.stateful)
    _check_fingerprint(path, ckpt.get("config"), fingerprint)
    saved = ckpt.get("params") or {}
    outside = outside_parameters(state.model, state.optimizer, state.stateful)
    for o in outside:
        value = saved.get(o.key)
        if value is None or tuple(value.shape) != tuple(o.param.shape):
            raise ValueError(
                f"checkpoint {path} does not hold the optimizer's parameter {o.name} (outside the model, at "
                f"optimizer position {o.key}){'' if value is None else f'; it holds shape {tuple(value.shape)}'}: "
                "it was written by a run with other parameters outside the model (or before fit saved them), "
                "so resuming would restart that parameter. Put it in the model or resume with the same "
                "optimizer, or delete the file to start over")
    try:
        state.model.load_state_dict(ckpt["model"])
        state.optimizer.load_state_dict(ckpt["optimizer"])
    except (RuntimeError, ValueError, KeyError) as err:
        raise ValueError(f"checkpoint {path} was saved by another model or optimizer ({err}); "
                         "resume with the same architecture, or delete the file to start over") from None
    with torch.no_grad():  # checked above, before anything was loaded
        for o in outside:
            o.param.copy_(saved[o.key])
    if state.scheduler is not None and ckpt.get("scheduler") is not None:
        state.scheduler.load_state_dict(ckpt["scheduler"])
    state.scaler.load_state_dict(ckpt["scaler"])
    for name, obj in state.stateful.items():
        try:
            obj.load_state_dict(ckpt["stateful"][name])
        except (TypeError, ValueError, KeyError) as err:
            raise ValueError(f"checkpoint {path}: stateful[{name!r}] cannot be restored: {err}") from None
    state.history = History(**ckpt["history"])
    state.best_state = ckpt.get("best_state")
    state.best_params = ckpt.get("best_params")  # absent from checkpoints written before it was saved
    state.epoch, state.step_in_epoch, state.global_step = ckpt["epoch"], ckpt["step_in_epoch"], ckpt["global_step"]
    _set_rng_state(ckpt["rng"])


def _read_checkpoint(path: Path, map_location, stateful: Mapping) -> dict:
    """Read a checkpoint written by ``fit`` and check that it holds everything this run restores."""
    fix = "delete it to start over, or pass another checkpoint_path"
    try:
        # weights_only: a checkpoint holds tensors and plain values only, so nothing in it can run code
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        if "weights_only" in str(err) or "Unsupported global" in str(err):
            raise ValueError(f"checkpoint {path} holds Python objects other than tensors and plain values "
                             f"({str(err).splitlines()[0][:160]}); mmalign does not unpickle them, since loading "
                             "them can run code. A stateful object's or scheduler's state_dict must hold tensors, "
                             f"numbers, strings, lists and dicts only; or {fix}") from None
        raise ValueError(f"checkpoint {path} cannot be read ({type(err).__name__}: {str(err)[:200]}); it is truncated "
                         f"or not a checkpoint of mmalign.train.fit: {fix}") from None
    except Exception as err:  # truncated, empty, not a torch file
        raise ValueError(f"checkpoint {path} cannot be read ({type(err).__name__}: {str(err)[:200]}); it is truncated "
                         f"or not a checkpoint of mmalign.train.fit: {fix}") from None
    if not isinstance(ckpt, dict) or any(k not in ckpt for k in _CHECKPOINT_KEYS):
        missing = [k for k in _CHECKPOINT_KEYS if not isinstance(ckpt, dict) or k not in ckpt]
        raise ValueError(f"checkpoint {path} is not a checkpoint of mmalign.train.fit (missing {missing}): {fix}")
    saved = set(ckpt["stateful"] or {})
    missing, extra = sorted(set(stateful) - saved), sorted(saved - set(stateful))
    if missing or extra:
        raise ValueError(
            f"checkpoint {path} holds stateful objects {sorted(saved)} but this run has {sorted(stateful)}"
            + (f" (missing from the checkpoint: {missing})" if missing else "")
            + (f" (not in this run: {extra})" if extra else "")
            + f"; resume with the same stateful objects, or {fix}")
    return ckpt
