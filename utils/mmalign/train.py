"""The one training loop of the course: device and mixed-precision aware, seeded, with a progress bar,
a history for plots, evaluation with best-checkpoint tracking, and checkpoints that resume exactly.

    def step(model, batch):                     # batch: a tuple of tensors already on the device
        img, txt, ids = batch
        zi, zt = model(img, txt)
        return info_nce(zi, zt, 0.07, ids, ids)  # or (loss, {"metric": value})

    history = fit(model, step, (img_feats, txt_feats, ids), optimizer=torch.optim.Adam(model.parameters()),
                  epochs=10, batch_size=128, seed=0, eval_fn=lambda m: {"rsum": ...}, keep_best="rsum")

Exact resume: the order of batches in epoch e comes from a generator seeded with (seed, e), so a run
restarted from a checkpoint skips the batches it had already done and continues with the same ones;
model, optimizer, scheduler, grad scaler, RNG states and any ``stateful`` objects (a queue, a memory,
a margin schedule) are restored.
"""

from __future__ import annotations

import copy
import pickle
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from . import dist as _dist
from .checks import check_int, check_positive
from .config import choose_device

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
        return asdict(self)


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
    torch.set_rng_state(state["torch"])
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, internal, py_gauss = state["python"]
    random.setstate((version, tuple(internal), py_gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


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


def _check_fingerprint(path: Path, saved: dict | None, current: dict) -> None:
    if saved is None:  # a checkpoint from before fingerprints: nothing to compare
        return
    diff = [f"{k}: {saved.get(k)!r} in the checkpoint, {current.get(k)!r} now"
            for k in sorted(set(saved) | set(current)) if saved.get(k) != current.get(k)]
    if diff:
        raise ValueError(
            f"checkpoint {path} was written by a run with other settings, so resuming it would silently train "
            f"with the old ones: {'; '.join(diff[:6])}{' ...' if len(diff) > 6 else ''}. Resume with the same "
            "settings, or delete the file (or pass another checkpoint_path) to start a new run")


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


def _check_fit_args(model, loss_fn, optimizer, data, eval_fn, after_step, collate_fn, stateful) -> None:
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


def _load_checkpoint(path: Path, device, stateful: Mapping) -> dict:
    """Read a checkpoint written by :func:`fit` and check that it holds everything this run restores."""
    fix = "delete it to start over, or pass another checkpoint_path"
    try:
        # weights_only: a checkpoint holds tensors and plain values only, so nothing in it can run code
        ckpt = torch.load(path, map_location=device, weights_only=True)
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
            logits in float32 (``mmalign.losses.similarity`` turns autocast off).

    Under ``torchrun`` (torch.distributed initialised, see :mod:`mmalign.dist`) the same call trains
    data-parallel: ``batch_size`` is the global batch, each process takes its equal part of every
    seeded global batch, gradients are averaged across processes after backward (as DDP does), the
    logged loss and metrics are means over processes, rank 0 alone draws the progress bar and writes
    checkpoints, and a checkpoint resumes on any number of processes (its RNG state is rank 0's).

    Arguments are checked up front (``grad_clip`` > 0, whole positive counts, stateful objects with a
    state_dict); ``seed`` seeds torch, numpy and python's ``random``; a checkpoint that is truncated, or
    lacks a stateful object this run has, raises a ValueError naming the file and the fix.
    """
    _check_fit_args(model, loss_fn, optimizer, data, eval_fn, after_step, collate_fn, stateful)
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
    amp, amp_dtype = _amp_setting(amp, device)
    world = _dist.world_size()
    if world > 1 and (batch_size % world or not drop_last):
        raise ValueError(f"under torch.distributed with {world} processes batch_size is the global batch: it must "
                         f"be divisible by {world} (got {batch_size}) and drop_last must be True (got {drop_last})")
    scaler = torch.amp.GradScaler(device.type, enabled=amp and amp_dtype == torch.float16)
    stateful = dict(stateful or {})
    model.to(device)

    history = History()
    start_epoch, start_in_epoch, global_step = 0, 0, 0
    best_state = None
    checkpoint_path = Path(checkpoint_path) if checkpoint_path else None
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)
    fingerprint = run_fingerprint(model, optimizer, scheduler, seed, batch_size, drop_last, n, (amp, amp_dtype),
                                  grad_clip, stateful)
    if checkpoint_path is not None and checkpoint_path.exists():
        ckpt = _load_checkpoint(checkpoint_path, device, stateful)
        _check_fingerprint(checkpoint_path, ckpt.get("config"), fingerprint)
        try:
            model.load_state_dict(ckpt["model"])
            optimizer.load_state_dict(ckpt["optimizer"])
        except (RuntimeError, ValueError, KeyError) as err:
            raise ValueError(f"checkpoint {checkpoint_path} was saved by another model or optimizer ({err}); "
                             "resume with the same architecture, or delete the file to start over") from None
        if scheduler is not None and ckpt.get("scheduler") is not None:
            scheduler.load_state_dict(ckpt["scheduler"])
        scaler.load_state_dict(ckpt["scaler"])
        for name, obj in stateful.items():
            try:
                obj.load_state_dict(ckpt["stateful"][name])
            except (TypeError, ValueError, KeyError) as err:
                raise ValueError(f"checkpoint {checkpoint_path}: stateful[{name!r}] cannot be restored: {err}") from None
        history = History(**ckpt["history"])
        best_state = ckpt.get("best_state")
        start_epoch, start_in_epoch, global_step = ckpt["epoch"], ckpt["step_in_epoch"], ckpt["global_step"]
        _set_rng_state(ckpt["rng"])
    _dist.broadcast_parameters(model)  # every rank starts from rank 0's weights

    def save(epoch: int, step_in_epoch: int) -> None:
        if checkpoint_path is None or not _dist.is_main():  # rank 0 writes; any number of ranks resumes
            return
        checkpoint_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = checkpoint_path.with_suffix(".tmp")
        torch.save({
            "model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict() if scheduler is not None else None,
            "scaler": scaler.state_dict(), "stateful": {k: v.state_dict() for k, v in stateful.items()},
            "history": history.to_dict(), "best_state": best_state, "epoch": epoch,
            "step_in_epoch": step_in_epoch, "global_step": global_step, "rng": _rng_state(),
            "config": fingerprint,
        }, tmp)
        tmp.replace(checkpoint_path)

    def evaluate(epoch: int) -> None:
        nonlocal best_state
        was_training = model.training
        model.eval()
        with torch.no_grad():
            metrics = {k: float(v) for k, v in eval_fn(model).items()}
        model.train(was_training)
        entry = {"step": global_step, "epoch": epoch, **metrics}
        history.evals.append(entry)
        if keep_best is not None:
            if keep_best not in metrics:
                raise ValueError(f"keep_best={keep_best!r} is not among the eval metrics {sorted(metrics)}")
            if history.best is None or metrics[keep_best] > history.best[keep_best]:
                history.best = dict(entry)
                best_state = copy.deepcopy({k: v.detach().cpu() for k, v in model.state_dict().items()})

    total = epochs * steps_per_epoch if max_steps is None else min(max_steps, epochs * steps_per_epoch)
    bar = None
    if progress and _dist.is_main():
        from tqdm.auto import tqdm
        bar = tqdm(total=total, initial=min(global_step, total), desc=desc, leave=False)
    started = time.perf_counter()
    model.train()
    stopped = False
    for epoch in range(start_epoch, epochs):
        skip = start_in_epoch if epoch == start_epoch else 0
        if max_steps is not None and global_step >= max_steps:
            save(epoch, skip)
            stopped = True
            break
        order = epoch_order(n, seed, epoch)
        batches = _batches(data, order, batch_size, drop_last, collate_fn, num_workers, seed * 100_003 + epoch, skip,
                           shard=(_dist.rank(), world))
        for i, batch in enumerate(batches, start=skip):
            batch = to_device(batch, device)
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp):
                out = loss_fn(model, batch)
            loss, logs = _check_loss(out, global_step)
            if not torch.isfinite(loss):
                raise FloatingPointError(
                    f"loss is {loss.item()} at step {global_step}: lower the learning rate or raise the temperature"
                )
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            _dist.average_gradients(model.parameters())  # as DDP does; no-op in one process
            if grad_clip is not None:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
            scaler.step(optimizer)
            scaler.update()
            if scheduler is not None:
                scheduler.step()
            global_step += 1
            if after_step is not None:
                after_step(model, batch, global_step)
            history.step.append(global_step)
            history.loss.append(float(_dist.all_reduce_mean(loss.detach().float())))
            for k, v in logs.items():
                history.metrics.setdefault(k, []).append(float(_dist.all_reduce_mean(float(v))))
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{history.loss[-1]:.4f}", epoch=epoch + 1)
            if eval_fn is not None and eval_every and global_step % eval_every == 0:
                evaluate(epoch)
            if checkpoint_every and global_step % checkpoint_every == 0:
                save(epoch, i + 1)
            # Stop before the next batch is loaded: loading may draw random numbers (augmentation), and
            # the checkpoint's RNG state must be the one the resumed run starts that batch with.
            if max_steps is not None and global_step >= max_steps and i + 1 < steps_per_epoch:
                save(epoch, i + 1)
                stopped = True
                break
        if stopped:
            break
        if eval_fn is not None and not eval_every:
            evaluate(epoch)
        save(epoch + 1, 0)
    if bar is not None:
        bar.close()
    history.seconds += time.perf_counter() - started
    if keep_best is not None and best_state is not None and not stopped:
        model.load_state_dict(best_state)
    return history
