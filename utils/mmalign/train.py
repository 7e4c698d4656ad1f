"""The one training loop of the course: device and mixed-precision aware, seeded, with a progress bar,
a history for plots, evaluation with best-checkpoint tracking, and checkpoints that resume exactly.

A typical call::

    def step(model, batch):                     # batch: a tuple of tensors already on the device
        img, txt, ids = batch
        zi, zt = model(img, txt)
        return info_nce(zi, zt, temperature=0.07, ids=ids)  # or (loss, {"metric": value})

    history = fit(model, step, (img_feats, txt_feats, ids), optimizer=torch.optim.Adam(model.parameters()),
                  epochs=10, batch_size=128, seed=0, eval_fn=lambda m: {"rsum": ...}, keep_best="rsum")

Exact resume: the order of batches in epoch e comes from a generator seeded with (seed, e), so a run
restarted from a checkpoint skips the batches it had already done and continues with the same ones;
model, optimizer, scheduler, grad scaler, RNG states and any ``stateful`` objects (a queue, a memory,
a margin schedule) are restored.

:func:`fit` is a short loop over public parts, usable on their own in a loop of your own:
:class:`TrainState` (everything a checkpoint holds), :func:`train_step` (one optimizer step, logged),
:func:`record_eval` (one evaluation, logged, best weights kept) and :func:`save_checkpoint` /
:func:`load_checkpoint`.
"""

from __future__ import annotations

import copy
import pickle
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from . import dist as _dist
from .checks import check_int, check_positive
from .config import choose_device
from .data.cache import atomic_write

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

    :func:`train_step` and :func:`record_eval` update it; :func:`save_checkpoint` writes it and
    :func:`load_checkpoint` reads it back in place. The random number generators (torch, CUDA, numpy,
    python's ``random``) are not fields: they are the process's global ones, captured by
    :func:`save_checkpoint` and restored by :func:`load_checkpoint`.

    Attributes:
        model: the module being trained.
        optimizer: its optimizer.
        scheduler: a learning-rate scheduler stepped after every optimizer step, or None.
        scaler: the ``torch.amp.GradScaler`` (disabled unless training in float16).
        stateful: other objects with ``state_dict``/``load_state_dict`` (a queue, a margin schedule).
        history: the :class:`History` of the run so far.
        epoch: the epoch in progress (0-based).
        step_in_epoch: batches of that epoch already done; a resumed run starts at the next one.
        global_step: optimizer steps done in all.
        best_state: a CPU copy of the weights at the best evaluation so far (``keep_best``), or None.
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


def to_device(batch: Any, device: torch.device) -> Any:
    """Move tensors inside tuples, lists and dicts to ``device`` (other values unchanged)."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, Mapping):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # a namedtuple takes positional fields
        return type(batch)(*(to_device(v, device) for v in batch))
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


def epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The shuffled sample order of one epoch; a pure function of (n, seed, epoch)."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))


def _batches(data, order: torch.Tensor, batch_size: int, drop_last: bool, collate_fn, num_workers: int,
             loader_seed: int = 0, start: int = 0, shard: tuple[int, int] = (0, 1)):
    """The batches of one epoch from batch ``start`` on (earlier ones are not loaded at all).

    ``shard = (rank, world)``: each global batch of ``batch_size`` is cut into ``world`` equal
    contiguous parts and this process gets part ``rank`` (the DistributedSampler equivalent that keeps
    the seeded epoch order, so W processes see exactly the global batches one process would)."""
    n_batches = len(order) // batch_size if drop_last else -(-len(order) // batch_size)
    rank, world = shard
    if world > 1:
        per = batch_size // world
        order = torch.cat([order[b * batch_size:(b + 1) * batch_size][rank * per:(rank + 1) * per]
                           for b in range(n_batches)]) if n_batches else order[:0]
        batch_size = per
    if isinstance(data, (tuple, list)) and all(isinstance(t, torch.Tensor) for t in data):
        for b in range(start, n_batches):
            idx = order[b * batch_size:(b + 1) * batch_size]
            yield tuple(t[idx] for t in data)
        return
    chunks = [order[b * batch_size:(b + 1) * batch_size].tolist() for b in range(start, n_batches)]
    if not chunks:
        return
    # A DataLoader iterator draws its worker base seed from `generator`, or from the global torch RNG when
    # none is given, which would shift dropout masks after an exact resume: give it its own generator.
    yield from DataLoader(data, batch_sampler=chunks, collate_fn=collate_fn, num_workers=num_workers,
                          generator=torch.Generator().manual_seed(loader_seed))


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


def run_fingerprint(model, optimizer, scheduler, seed: int, batch_size: int, drop_last: bool, n: int,
                    amp: tuple, grad_clip, stateful: Mapping) -> dict:
    """What a checkpoint must have been trained with to be resumed by this call of :func:`fit`.

    The model's parameter names and shapes, the optimizer's class and hyperparameters per group
    (as set when ``fit`` is called: learning rate, betas, weight decay, ...), the scheduler's class,
    seed, batch size, drop_last, data size, mixed precision and gradient clipping. Not in it: the
    number of epochs, ``max_steps`` and the evaluation/checkpoint cadence, which a resumed run may
    change (e.g. to train longer).
    """
    return {
        "model": f"{type(model).__name__}: " + ", ".join(f"{k} {tuple(v.shape)}" for k, v in model.state_dict().items()),
        "optimizer": type(optimizer).__name__,
        **{f"group {i} {k}": _plain(v) for i, group in enumerate(optimizer.param_groups)
           for k, v in sorted(group.items()) if k != "params"},
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

    The file holds tensors and plain Python values only, so it loads with ``weights_only=True``.

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
        "scheduler": state.scheduler.state_dict() if state.scheduler is not None else None,
        "scaler": state.scaler.state_dict(), "stateful": {k: v.state_dict() for k, v in state.stateful.items()},
        "history": state.history.to_dict(), "best_state": state.best_state, "epoch": state.epoch,
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
        state: the run to restore into; its model, optimizer, scheduler, scaler and stateful objects
            load their saved states, the other fields are replaced.
        fingerprint: this run's settings (:func:`run_fingerprint`); when the checkpoint records other
            ones, a ValueError names every setting that differs. None skips the check.
        map_location: where the saved tensors go (default: the device of the model's parameters).

    Raises:
        ValueError: the file is truncated or not a checkpoint of :func:`fit`, holds pickled Python
            objects, was written with other settings, or by another model, optimizer or set of
            stateful objects. The message names the file and the fix.
    """
    path = Path(path)
    if map_location is None:
        map_location = next((p.device for p in state.model.parameters()), torch.device("cpu"))
    ckpt = _read_checkpoint(path, map_location, state.stateful)
    _check_fingerprint(path, ckpt.get("config"), fingerprint)
    try:
        state.model.load_state_dict(ckpt["model"])
        state.optimizer.load_state_dict(ckpt["optimizer"])
    except (RuntimeError, ValueError, KeyError) as err:
        raise ValueError(f"checkpoint {path} was saved by another model or optimizer ({err}); "
                         "resume with the same architecture, or delete the file to start over") from None
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
    state.epoch, state.step_in_epoch, state.global_step = ckpt["epoch"], ckpt["step_in_epoch"], ckpt["global_step"]
    _set_rng_state(ckpt["rng"])


def _read_checkpoint(path: Path, map_location, stateful: Mapping) -> dict:
    """Read a checkpoint written by :func:`fit` and check that it holds everything this run restores."""
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


_AMP_DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}


def _amp_setting(amp, device: torch.device) -> tuple[bool, torch.dtype]:
    """(enabled, dtype) from ``amp``: None (on for CUDA), a bool (float16 on CUDA, bfloat16 elsewhere)
    or a dtype name ``"bf16"``/``"fp16"``."""
    if isinstance(amp, str):
        if amp.lower() not in _AMP_DTYPES:
            raise ValueError(f"amp must be None, a bool or one of {sorted(_AMP_DTYPES)}, got {amp!r}")
        return True, _AMP_DTYPES[amp.lower()]
    if amp is not None and not isinstance(amp, bool):
        raise TypeError(f"amp must be None, a bool or one of {sorted(_AMP_DTYPES)}, got {type(amp).__name__}")
    enabled = (device.type == "cuda") if amp is None else amp
    return enabled, torch.float16 if device.type == "cuda" else torch.bfloat16


def _check_loss(out, step: int) -> tuple[torch.Tensor, Mapping]:
    """``loss_fn``'s result as ``(scalar loss tensor, logs)``, or a clear error."""
    if isinstance(out, tuple):
        if len(out) != 2 or not isinstance(out[1], Mapping):
            raise TypeError(f"loss_fn must return a loss or a pair (loss, {{name: float}}); at step {step} it "
                            f"returned a tuple of {len(out)} items ({', '.join(type(o).__name__ for o in out)})")
        loss, logs = out
    else:
        loss, logs = out, {}
    if not isinstance(loss, torch.Tensor):
        raise TypeError(f"loss_fn must return the loss as a torch.Tensor with gradients, got {type(loss).__name__} "
                        f"{loss!r} at step {step}; do not call .item() or float() on it")
    if loss.numel() != 1:
        raise ValueError(f"loss_fn must return a scalar loss, got a tensor of shape {tuple(loss.shape)} at step {step}; "
                         "reduce it with .mean() or .sum()")
    if not loss.requires_grad:
        raise ValueError(f"the loss at step {step} does not require grad (computed under torch.no_grad(), detached, "
                         "or from no trainable parameter); return the loss built from the model's outputs")
    return loss.reshape(()), logs


def train_step(state: TrainState, loss_fn: Callable, batch: Any, *, device: str | torch.device | None = None,
               amp: torch.dtype | None = None, grad_clip: float | None = None,
               after_step: Callable | None = None) -> float:
    """One optimizer step on one batch, logged in ``state.history``.

    Moves the batch to ``device``, computes ``loss_fn(state.model, batch)`` (under autocast when ``amp``
    is a dtype), back-propagates through ``state.scaler``, averages the gradients across processes
    under torch.distributed, clips them to norm ``grad_clip``, steps the optimizer and then the
    scheduler, counts the step (``global_step`` and ``step_in_epoch`` + 1), calls ``after_step`` and
    appends the step, the loss and the ``loss_fn`` metrics (means over processes) to the history.

    Args:
        state: the run; updated in place.
        loss_fn: ``(model, batch) -> loss`` or ``(loss, {name: float})``, the loss a scalar tensor.
        batch: a tensor, or tuples, lists and dicts of them.
        device: where the batch goes (default: the device of the model's parameters).
        amp: the autocast dtype (``torch.bfloat16``, ``torch.float16``), or None for full precision.
        grad_clip: the largest gradient norm (after unscaling), or None for no clipping.
        after_step: ``(model, batch, global_step)``, called after the optimizer step.

    Returns:
        The logged loss of this step (before the update), as a float.

    Raises:
        FloatingPointError: the loss is NaN or infinite (nothing is updated).
    """
    if device is None:
        device = next((p.device for p in state.model.parameters()), torch.device("cpu"))
    device = torch.device(device)
    batch = to_device(batch, device)
    with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
        out = loss_fn(state.model, batch)
    loss, logs = _check_loss(out, state.global_step)
    if not torch.isfinite(loss):
        raise FloatingPointError(
            f"loss is {loss.item()} at step {state.global_step}: lower the learning rate or raise the temperature")
    state.optimizer.zero_grad(set_to_none=True)
    state.scaler.scale(loss).backward()
    _dist.average_gradients(state.model.parameters())  # as DDP does; no-op in one process
    if grad_clip is not None:
        state.scaler.unscale_(state.optimizer)
        torch.nn.utils.clip_grad_norm_(state.model.parameters(), grad_clip)
    state.scaler.step(state.optimizer)
    state.scaler.update()
    if state.scheduler is not None:
        state.scheduler.step()
    state.global_step += 1
    state.step_in_epoch += 1
    if after_step is not None:
        after_step(state.model, batch, state.global_step)
    history = state.history
    history.step.append(state.global_step)
    history.loss.append(float(_dist.all_reduce_mean(loss.detach().float())))
    for k, v in logs.items():
        history.metrics.setdefault(k, []).append(float(_dist.all_reduce_mean(float(v))))
    return history.loss[-1]


def record_eval(state: TrainState, eval_fn: Callable[[torch.nn.Module], dict], keep_best: str | None = None) -> dict:
    """Evaluate ``state.model`` and append the result to ``state.history.evals``.

    ``eval_fn`` runs in eval mode without gradients; the model's train/eval mode is restored after.
    With ``keep_best``, an evaluation that beats every earlier one on that metric (strictly greater)
    becomes ``state.history.best`` and a CPU copy of the weights becomes ``state.best_state``.

    Args:
        state: the run; updated in place.
        eval_fn: ``model -> {name: number}``.
        keep_best: the metric to maximise, or None.

    Returns:
        The record appended: ``{"step": global_step, "epoch": epoch, **metrics}``, metrics as floats.

    Raises:
        ValueError: ``keep_best`` is not among the metrics ``eval_fn`` returned.
    """
    model = state.model
    was_training = model.training
    model.eval()
    with torch.no_grad():
        metrics = {k: float(v) for k, v in eval_fn(model).items()}
    model.train(was_training)
    entry = {"step": state.global_step, "epoch": state.epoch, **metrics}
    state.history.evals.append(entry)
    if keep_best is not None:
        if keep_best not in metrics:
            raise ValueError(f"keep_best={keep_best!r} is not among the eval metrics {sorted(metrics)}")
        if state.history.best is None or metrics[keep_best] > state.history.best[keep_best]:
            state.history.best = dict(entry)
            state.best_state = copy.deepcopy({k: v.detach().cpu() for k, v in model.state_dict().items()})
    return entry


class _Settings(NamedTuple):
    epochs: int
    batch_size: int
    seed: int
    grad_clip: float | None
    n: int
    steps_per_epoch: int
    device: torch.device
    amp: tuple[bool, torch.dtype]
    world: int


def _fit_settings(model, loss_fn, data, *, optimizer, epochs, batch_size, seed, device, amp, eval_fn, eval_every,
                  keep_best, stateful, after_step, checkpoint_every, max_steps, grad_clip, drop_last, collate_fn,
                  num_workers) -> _Settings:
    """Check every argument of :func:`fit` (raising an error that names it) and derive the run's settings."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be a callable (model, batch) -> loss, got {type(loss_fn).__name__}")
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"optimizer must be a torch.optim.Optimizer (e.g. torch.optim.Adam(model.parameters())), "
                        f"got {type(optimizer).__name__}")
    for name, fn in (("eval_fn", eval_fn), ("after_step", after_step), ("collate_fn", collate_fn)):
        if fn is not None and not callable(fn):
            raise TypeError(f"{name} must be callable, got {type(fn).__name__}")
    for name, obj in dict(stateful or {}).items():
        if not (callable(getattr(obj, "state_dict", None)) and callable(getattr(obj, "load_state_dict", None))):
            raise TypeError(f"stateful[{name!r}] ({type(obj).__name__}) needs state_dict() and load_state_dict() "
                            "so that a checkpoint can restore it")
    if isinstance(data, (tuple, list)):
        if not data:
            raise ValueError("data is empty; pass a tuple of tensors with one row per sample, or a Dataset")
    elif not (hasattr(data, "__getitem__") and hasattr(data, "__len__")):
        raise TypeError(f"data must be a tuple of tensors or a torch Dataset, got {type(data).__name__}")
    if keep_best is not None and eval_fn is None:
        raise ValueError(f"keep_best={keep_best!r} needs an eval_fn that returns that metric")
    epochs, batch_size = check_int("epochs", epochs), check_int("batch_size", batch_size)
    if epochs <= 0 or batch_size <= 0:
        raise ValueError(f"epochs and batch_size must be positive, got {epochs} and {batch_size}")
    seed = check_int("seed", seed, minimum=0)
    for name, value in (("eval_every", eval_every), ("checkpoint_every", checkpoint_every), ("max_steps", max_steps)):
        if value is not None:
            check_int(name, value, minimum=1)
    check_int("num_workers", num_workers, minimum=0)
    if grad_clip is not None:
        grad_clip = check_positive("grad_clip", grad_clip)
    n = len(data[0]) if isinstance(data, (tuple, list)) else len(data)
    if isinstance(data, (tuple, list)) and any(len(t) != n for t in data):
        raise ValueError(f"all tensors in data need the same first dimension, got {[len(t) for t in data]}")
    steps_per_epoch = n // batch_size if drop_last else -(-n // batch_size)
    if steps_per_epoch == 0:
        raise ValueError(f"batch_size {batch_size} is larger than the data ({n} samples) with drop_last=True")
    device = torch.device(device) if device is not None else choose_device()
    amp = _amp_setting(amp, device)
    world = _dist.world_size()
    if world > 1 and (batch_size % world or not drop_last):
        raise ValueError(f"under torch.distributed with {world} processes batch_size is the global batch: it must "
                         f"be divisible by {world} (got {batch_size}) and drop_last must be True (got {drop_last})")
    return _Settings(epochs, batch_size, seed, grad_clip, n, steps_per_epoch, device, amp, world)


def _progress_bar(total: int, done: int, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=min(done, total), desc=desc, leave=False)


def fit(
    model: torch.nn.Module,
    loss_fn: Callable,
    data: Sequence[torch.Tensor] | Dataset,
    *,
    optimizer: torch.optim.Optimizer,
    epochs: int,
    batch_size: int,
    seed: int = 0,
    device: str | torch.device | None = None,
    amp: bool | str | None = None,
    scheduler: Any = None,
    eval_fn: Callable[[torch.nn.Module], dict] | None = None,
    eval_every: int | None = None,
    keep_best: str | None = None,
    stateful: Mapping[str, Any] | None = None,
    after_step: Callable | None = None,
    checkpoint_path: str | Path | None = None,
    checkpoint_every: int | None = None,
    max_steps: int | None = None,
    grad_clip: float | None = None,
    drop_last: bool = True,
    collate_fn: Callable | None = None,
    num_workers: int = 0,
    progress: bool = True,
    desc: str = "training",
) -> History:
    """Train ``model`` with ``loss_fn(model, batch)`` for ``epochs`` epochs and return its History.

    Args:
        data: a tuple of tensors with the same first dimension (fast path: batches are tuples of
            tensor slices), or a torch Dataset (batched by a DataLoader with ``collate_fn``).
        loss_fn: ``(model, batch) -> loss`` or ``(loss, {name: float})``; the batch is on the device.
        eval_fn: ``model -> {name: float}``, run in eval mode without gradients every ``eval_every``
            steps (default: at the end of every epoch).
        keep_best: an eval metric to maximise; the best weights are loaded back at the end and
            ``history.best`` records when they were reached.
        stateful: objects with ``state_dict``/``load_state_dict`` saved in checkpoints (queues, ...).
        after_step: ``(model, batch, step)`` called after each optimizer step (EMA updates, enqueue).
        checkpoint_path: where to save; if the file exists, training resumes from it, provided it was
            written with the same settings (:func:`run_fingerprint`; a mismatch raises and says what
            differs). Checkpoints load with ``weights_only=True``.
        checkpoint_every: also save every this many steps (always at epoch ends and at ``max_steps``).
        max_steps: stop after this many steps in total (e.g. to simulate an interrupted run).
        amp: autocast (float16 + GradScaler on CUDA, bfloat16 on CPU); default on for CUDA only;
            ``"bf16"`` or ``"fp16"`` picks the dtype (fp16 always gets a GradScaler). Losses keep their
            logits in float32 (``mmalign.retrieval.similarity`` turns autocast off).

    Under ``torchrun`` (torch.distributed initialised, see :mod:`mmalign.dist`) the same call trains
    data-parallel: ``batch_size`` is the global batch, each process takes its equal part of every
    seeded global batch, gradients are averaged across processes after backward (as DDP does), the
    logged loss and metrics are means over processes, rank 0 alone draws the progress bar and writes
    checkpoints, and a checkpoint resumes on any number of processes (its RNG state is rank 0's).

    Arguments are checked up front (``grad_clip`` > 0, whole positive counts, stateful objects with a
    state_dict); ``seed`` seeds torch, numpy and python's ``random``; a checkpoint that is truncated, or
    lacks a stateful object this run has, raises a ValueError naming the file and the fix.

    Returns:
        The run's :class:`History` (after a resume, the checkpoint's history continued). With
        ``keep_best`` the model ends with the best weights, unless ``max_steps`` stopped the run early.
    """
    epochs, batch_size, seed, grad_clip, n, steps_per_epoch, device, amp, world = _fit_settings(
        model, loss_fn, data, optimizer=optimizer, epochs=epochs, batch_size=batch_size, seed=seed, device=device,
        amp=amp, eval_fn=eval_fn, eval_every=eval_every, keep_best=keep_best, stateful=stateful,
        after_step=after_step, checkpoint_every=checkpoint_every, max_steps=max_steps, grad_clip=grad_clip,
        drop_last=drop_last, collate_fn=collate_fn, num_workers=num_workers)
    scaler = torch.amp.GradScaler(device.type, enabled=amp[0] and amp[1] == torch.float16)
    model.to(device)
    state = TrainState(model, optimizer, scheduler, scaler, dict(stateful or {}))
    _seed_everything(seed)
    fingerprint = run_fingerprint(model, optimizer, scheduler, seed, batch_size, drop_last, n, amp, grad_clip,
                                  state.stateful)
    checkpoint_path = Path(checkpoint_path) if checkpoint_path else None
    if checkpoint_path is not None and checkpoint_path.exists():
        load_checkpoint(checkpoint_path, state, fingerprint, map_location=device)
    _dist.broadcast_parameters(model)  # every rank starts from rank 0's weights

    def save() -> None:  # rank 0 writes; the checkpoint resumes on any number of processes
        if checkpoint_path is not None and _dist.is_main():
            save_checkpoint(checkpoint_path, state, fingerprint)

    total = epochs * steps_per_epoch if max_steps is None else min(max_steps, epochs * steps_per_epoch)
    bar = _progress_bar(total, state.global_step, desc) if progress and _dist.is_main() else None
    started, stopped = time.perf_counter(), False
    model.train()
    for epoch in range(state.epoch, epochs):  # state.epoch == epoch throughout; step_in_epoch counts on
        stopped = max_steps is not None and state.global_step >= max_steps
        if stopped:
            break
        batches = _batches(data, epoch_order(n, seed, epoch), batch_size, drop_last, collate_fn, num_workers,
                           seed * 100_003 + epoch, start=state.step_in_epoch, shard=(_dist.rank(), world))
        for batch in batches:
            loss = train_step(state, loss_fn, batch, device=device, amp=amp[1] if amp[0] else None,
                              grad_clip=grad_clip, after_step=after_step)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.4f}", epoch=epoch + 1)
            if eval_fn is not None and eval_every and state.global_step % eval_every == 0:
                record_eval(state, eval_fn, keep_best)
            if checkpoint_every and state.global_step % checkpoint_every == 0:
                save()
            # Stop before the next batch is loaded: loading may draw random numbers (augmentation), and
            # the checkpoint's RNG state must be the one the resumed run starts that batch with.
            stopped = max_steps is not None and state.global_step >= max_steps and state.step_in_epoch < steps_per_epoch
            if stopped:
                break
        if stopped:
            break
        if eval_fn is not None and not eval_every:
            record_eval(state, eval_fn, keep_best)
        state.epoch, state.step_in_epoch = epoch + 1, 0
        save()
    if stopped:
        save()
    if bar is not None:
        bar.close()
    state.history.seconds += time.perf_counter() - started
    if keep_best is not None and state.best_state is not None and not stopped:
        model.load_state_dict(state.best_state)
    return state.history
