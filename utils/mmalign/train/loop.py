"""The loop: :func:`fit` and its parts :func:`train_step` (one optimizer step, logged) and
:func:`record_eval` (one evaluation, logged, best weights kept), with the batching of one epoch.

Exact resume: the order of batches in epoch e comes from a generator seeded with (seed, e), so a run
restarted from a checkpoint skips the batches it had already done and continues with the same ones;
model, optimizer (and its parameters outside the model), scheduler, grad scaler, RNG states and any
``stateful`` objects (a queue, a memory, a margin schedule) are restored (:mod:`mmalign.train.state`).
"""

from __future__ import annotations

import copy
import itertools
import time
from pathlib import Path
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset
from torch.utils.data._utils.collate import default_collate

from .. import dist as _dist
from ..checks import check_int, check_positive
from ..config import choose_device
from .distributed import check_all_used, check_outside_parameters, wrap_ddp
from .state import (History, TrainState, _seed_everything, load_checkpoint, outside_parameters, run_fingerprint,
                    save_checkpoint)

__all__ = ["to_device", "epoch_order", "train_step", "record_eval", "fit"]


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


def _stream_batches(data: IterableDataset, batch_size: int, drop_last: bool, collate_fn, epoch: int,
                    start: int = 0, shard: tuple[int, int] = (0, 1)):
    """The batches of one epoch of an IterableDataset, from batch ``start`` on.

    Every process reads the whole stream and keeps its contiguous part of each global batch of
    ``batch_size`` samples (as :func:`_batches` does for indexed data); the batches a resumed run
    has done are read and dropped. ``data.set_epoch(epoch)`` is called first when the dataset has it
    (the DistributedSampler convention), so a dataset can shuffle per epoch from its own seed."""
    if callable(getattr(data, "set_epoch", None)):
        data.set_epoch(epoch)
    rank, world = shard
    per = batch_size // world
    collate = collate_fn or default_collate
    it = iter(data)
    for _ in range(start):  # skip the global batches already trained on
        if len(list(itertools.islice(it, batch_size))) < batch_size:
            return
    while True:
        samples = list(itertools.islice(it, batch_size))
        if not samples or (drop_last and len(samples) < batch_size):
            return
        yield collate(samples[rank * per:(rank + 1) * per] if world > 1 else samples)


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
               after_step: Callable | None = None, find_unused_parameters: bool = False) -> float:
    """One optimizer step on one batch, logged in ``state.history``.

    Moves the batch to ``device``, computes ``loss_fn(state.model, batch)`` (under autocast when ``amp``
    is a dtype), back-propagates through ``state.scaler``, clips the gradients of every parameter the
    optimizer updates to norm ``grad_clip``, steps the optimizer and then the scheduler, counts the step
    (``global_step`` and ``step_in_epoch`` + 1), calls ``after_step`` and appends the step, the loss
    and the ``loss_fn`` metrics (means over processes) to the history.

    Under torch.distributed the loss runs through ``state.ddp``, PyTorch's DistributedDataParallel
    (:func:`mmalign.train.distributed.wrap_ddp`, built at the first step when missing), which averages
    the gradients of the model and of the optimizer's parameters outside it during the backward pass.

    Args:
        state: the run; updated in place.
        loss_fn: ``(model, batch) -> loss`` or ``(loss, {name: float})``, the loss a scalar tensor.
        batch: a tensor, or tuples, lists and dicts of them.
        device: where the batch goes (default: the device of the model's parameters).
        amp: the autocast dtype (``torch.bfloat16``, ``torch.float16``), or None for full precision.
        grad_clip: the largest gradient norm (after unscaling), or None for no clipping.
        after_step: ``(model, batch, global_step)``, called after the optimizer step.
        find_unused_parameters: DDP's setting, used when this call builds ``state.ddp``
            (:func:`mmalign.train.distributed.wrap_ddp`): False requires a gradient for every trainable
            parameter at every step and raises a ValueError naming any that got none.

    Returns:
        The logged loss of this step (before the update, mean over processes), as a float.

    Raises:
        FloatingPointError: the loss is NaN or infinite on some process (nothing is updated, and every
            process raises).
        ValueError: under DDP with ``find_unused_parameters=False``, a trainable parameter got no
            gradient (named; nothing is updated).
    """
    if device is None:
        device = next((p.device for p in state.model.parameters()), torch.device("cpu"))
    device = torch.device(device)
    batch = to_device(batch, device)
    if state.ddp is None and _dist.is_distributed():
        state.ddp = wrap_ddp(state.model, state.optimizer, state.stateful, device, find_unused_parameters)
    with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
        out = state.ddp(loss_fn, batch) if state.ddp is not None else loss_fn(state.model, batch)
    loss, logs = _check_loss(out, state.global_step)
    logged = _dist.all_reduce_mean(loss.detach().float())  # before backward: a NaN on one rank stops every rank
    if not torch.isfinite(logged):
        where = " (mean over processes)" if _dist.is_distributed() else ""
        raise FloatingPointError(f"loss is {logged.item()}{where} at step {state.global_step}: lower the learning "
                                 "rate or raise the temperature")
    state.optimizer.zero_grad(set_to_none=True)
    state.scaler.scale(loss).backward()
    if state.ddp is not None:
        check_all_used(state.ddp, state.global_step)
    if grad_clip is not None:
        state.scaler.unscale_(state.optimizer)
        params = [*state.model.parameters(), *(o.param for o in outside_parameters(state.model, state.optimizer))]
        torch.nn.utils.clip_grad_norm_(params, grad_clip)
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
    history.loss.append(float(logged))
    for k, v in logs.items():
        history.metrics.setdefault(k, []).append(float(_dist.all_reduce_mean(float(v))))
    return history.loss[-1]


def record_eval(state: TrainState, eval_fn: Callable[[torch.nn.Module], dict], keep_best: str | None = None) -> dict:
    """Evaluate ``state.model`` and append the result to ``state.history.evals``.

    ``eval_fn`` runs in eval mode without gradients; the model's train/eval mode is restored after.
    Under torch.distributed it runs on rank 0 only (every rank holds the same weights) and its metrics
    are broadcast, so every rank records the same entry; it must therefore not call collectives. An
    error in it is raised on every rank. With ``keep_best``, an evaluation that beats every earlier one
    on that metric (strictly greater) becomes ``state.history.best``, a CPU copy of the weights
    becomes ``state.best_state`` and copies of the optimizer's parameters outside the model (a learned
    temperature kept next to it) become ``state.best_params``.

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
    metrics, error = None, None
    if _dist.is_main():
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                metrics = {k: float(v) for k, v in eval_fn(model).items()}
        except Exception as err:  # noqa: BLE001 - re-raised below, on every rank
            if not _dist.is_distributed():
                raise
            error = f"{type(err).__name__}: {err}"
        finally:
            model.train(was_training)
    if _dist.is_distributed():
        metrics, error = _dist.broadcast_object((metrics, error))
        if error is not None:
            raise RuntimeError(f"eval_fn failed on rank 0 at step {state.global_step}: {error}")
    entry = {"step": state.global_step, "epoch": state.epoch, **metrics}
    state.history.evals.append(entry)
    if keep_best is not None:
        if keep_best not in metrics:
            raise ValueError(f"keep_best={keep_best!r} is not among the eval metrics {sorted(metrics)}")
        if state.history.best is None or metrics[keep_best] > state.history.best[keep_best]:
            state.history.best = dict(entry)
            state.best_state = copy.deepcopy({k: v.detach().cpu() for k, v in model.state_dict().items()})
            outside = outside_parameters(model, state.optimizer, state.stateful) if state.optimizer is not None else []
            state.best_params = {o.key: o.param.detach().cpu().clone() for o in outside} or None
    return entry


class _Settings(NamedTuple):
    epochs: int
    batch_size: int
    seed: int
    grad_clip: float | None
    n: int | None  # None: an IterableDataset
    steps_per_epoch: int | None
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
    iterable = isinstance(data, IterableDataset)
    if isinstance(data, (tuple, list)):
        if not data:
            raise ValueError("data is empty; pass a tuple of tensors with one row per sample, or a Dataset")
    elif not iterable and not (hasattr(data, "__getitem__") and hasattr(data, "__len__")):
        raise TypeError(f"data must be a tuple of tensors, a map-style torch Dataset (with __getitem__ and __len__) "
                        f"or a torch IterableDataset, got {type(data).__name__}")
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
    if iterable:
        if num_workers:
            raise ValueError(f"an IterableDataset is read in the training process (num_workers=0), got num_workers="
                             f"{num_workers}: every worker would yield the whole stream, repeating each sample. "
                             "Parallelise the reading inside the dataset, or pass a map-style Dataset")
        n, steps_per_epoch = None, None
    else:
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


def _progress_bar(total: int | None, done: int, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=done if total is None else min(done, total), desc=desc, leave=False)


def fit(
    model: torch.nn.Module,
    loss_fn: Callable,
    data: Sequence[torch.Tensor] | Dataset | IterableDataset,
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
    find_unused_parameters: bool = False,
    progress: bool = True,
    desc: str = "training",
) -> History:
    """Train ``model`` with ``loss_fn(model, batch)`` for ``epochs`` epochs and return its History.

    Args:
        data: a tuple of tensors with the same first dimension (fast path: batches are tuples of
            tensor slices), a map-style torch Dataset (batched by a DataLoader with ``collate_fn``), or
            a torch ``IterableDataset``: a stream of samples, batched in the training process
            (``num_workers`` must be 0) with ``collate_fn`` (default: torch's ``default_collate``). An
            epoch ends when the stream does; ``data.set_epoch(epoch)`` is called first when the dataset
            has it, so it can reshuffle per epoch. Under torch.distributed every process reads the
            whole stream and keeps its part of every global batch; an exact resume reads and drops the
            batches already done, so the stream must give the same samples when read again.
        loss_fn: ``(model, batch) -> loss`` or ``(loss, {name: float})``; the batch is on the device.
        optimizer: updates the model's parameters and possibly others outside it (a
            :class:`mmalign.models.temperature.LearnableTemperature` kept next to the model): those are
            checkpointed, restored and (under torch.distributed) reduced too. fit refuses to start, naming
            the parameter, when one is on another device, or is a plain tensor under torch.distributed.
        eval_fn: ``model -> {name: float}``, run in eval mode without gradients every ``eval_every``
            steps (default: at the end of every epoch); under torch.distributed on rank 0 only.
        keep_best: an eval metric to maximise; the best weights (and the values the optimizer's parameters
            outside the model had then) are loaded back at the end and ``history.best`` records when they
            were reached.
        stateful: objects with ``state_dict``/``load_state_dict`` saved in checkpoints (queues, ...).
        after_step: ``(model, batch, step)`` called after each optimizer step (EMA updates, enqueue).
        checkpoint_path: where to save; if the file exists, training resumes from it, provided it was
            written with the same settings (:func:`mmalign.train.state.run_fingerprint`; a mismatch raises
            and says what differs). Checkpoints load with ``weights_only=True``.
        checkpoint_every: also save every this many steps (always at epoch ends and at ``max_steps``).
        max_steps: stop after this many steps in total (e.g. to simulate an interrupted run).
        amp: autocast (float16 + GradScaler on CUDA, bfloat16 on CPU); default on for CUDA only;
            ``"bf16"`` or ``"fp16"`` picks the dtype (fp16 always gets a GradScaler). Losses keep their
            logits in float32 (``mmalign.retrieval.similarity`` turns autocast off).
        find_unused_parameters: under torch.distributed, DDP's setting of that name. False (default, the
            cheap one) requires every trainable parameter to get a gradient at every step: a step that
            leaves one without raises a ValueError naming it. True lets a step skip parameters (DDP
            then searches the graph after every forward pass); their gradient stays None, as in one process.

    Under ``torchrun`` (torch.distributed initialised, see :mod:`mmalign.dist`) the same call trains
    data-parallel: ``batch_size`` is the global batch, each process takes its equal part of every
    seeded global batch, the loss runs through PyTorch's ``DistributedDataParallel``
    (:mod:`mmalign.train.distributed`: gloo on CPU, NCCL on CUDA), which averages the gradients during
    the backward pass, the logged loss and metrics are means over processes, rank 0 alone evaluates,
    draws the progress bar and writes checkpoints, and a checkpoint resumes on any number of processes
    (its RNG state is rank 0's).

    Arguments are checked up front (``grad_clip`` > 0, whole positive counts, stateful objects with a
    state_dict); ``seed`` seeds torch, numpy and python's ``random``; a checkpoint that is truncated, or
    lacks a stateful object or an optimizer parameter this run has, raises a ValueError naming the file
    and the fix.

    Returns:
        The run's :class:`History` (after a resume, the checkpoint's history continued). With
        ``keep_best`` the model ends with the best weights, unless ``max_steps`` stopped the run early.
    """
    epochs, batch_size, seed, grad_clip, n, steps_per_epoch, device, amp, world = _fit_settings(
        model, loss_fn, data, optimizer=optimizer, epochs=epochs, batch_size=batch_size, seed=seed, device=device,
        amp=amp, eval_fn=eval_fn, eval_every=eval_every, keep_best=keep_best, stateful=stateful,
        after_step=after_step, checkpoint_every=checkpoint_every, max_steps=max_steps, grad_clip=grad_clip,
        drop_last=drop_last, collate_fn=collate_fn, num_workers=num_workers)
    if not isinstance(find_unused_parameters, bool):
        raise ValueError(f"find_unused_parameters must be True or False, got {find_unused_parameters!r}")
    scaler = torch.amp.GradScaler(device.type, enabled=amp[0] and amp[1] == torch.float16)
    model.to(device)
    state = TrainState(model, optimizer, scheduler, scaler, dict(stateful or {}))
    check_outside_parameters(outside_parameters(model, optimizer, state.stateful), device)
    _seed_everything(seed)
    fingerprint = run_fingerprint(model, optimizer, scheduler, seed, batch_size, drop_last, n, amp, grad_clip,
                                  state.stateful)
    checkpoint_path = Path(checkpoint_path) if checkpoint_path else None
    if checkpoint_path is not None and checkpoint_path.exists():
        load_checkpoint(checkpoint_path, state, fingerprint, map_location=device)
    if world > 1:  # DDP broadcasts rank 0's weights (model and outside parameters) to every rank
        state.ddp = wrap_ddp(model, optimizer, state.stateful, device, find_unused_parameters)

    def save() -> None:  # rank 0 writes; the checkpoint resumes on any number of processes
        if checkpoint_path is None:
            return
        if _dist.is_main():
            save_checkpoint(checkpoint_path, state, fingerprint)
        if world > 1:  # no rank goes on before the file is written: a run that starts next resumes from it
            _dist.barrier()

    if steps_per_epoch is None:
        total = max_steps
    else:
        total = epochs * steps_per_epoch if max_steps is None else min(max_steps, epochs * steps_per_epoch)
    bar = _progress_bar(total, state.global_step, desc) if progress and _dist.is_main() else None
    started, stopped = time.perf_counter(), False
    model.train()
    for epoch in range(state.epoch, epochs):  # state.epoch == epoch throughout; step_in_epoch counts on
        stopped = max_steps is not None and state.global_step >= max_steps
        if stopped:
            break
        if n is None:
            batches = _stream_batches(data, batch_size, drop_last, collate_fn, epoch, start=state.step_in_epoch,
                                      shard=(_dist.rank(), world))
        else:
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
            stopped = max_steps is not None and state.global_step >= max_steps and (
                steps_per_epoch is None or state.step_in_epoch < steps_per_epoch)
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
        best_params = state.best_params or {}
        with torch.no_grad():  # and the parameters outside the model, as they were at that evaluation
            for o in outside_parameters(model, optimizer, state.stateful):
                if o.key in best_params:
                    o.param.copy_(best_params[o.key])
    return state.history
