"""Contrastive losses across processes: all-gather *with gradient*, item ids that stay correct across
ranks, and the few helpers a training loop needs under ``torchrun``.

A contrastive loss scores every positive pair against the other items of the batch, so its
negatives grow with the batch (CLIP, Radford et al., 2021; SimCLR, Chen et al., 2020). With data
parallel training each process holds only B/W of the batch; gathering every process's embeddings
gives each one the full B x B similarity matrix again::

    torchrun --nproc_per_node=2 train.py          # each process:
    dist.init()                                   # gloo on CPU, NCCL on CUDA, from torchrun's env
    zi, zt = model(img, txt)                      # the local B/W rows
    loss = gathered_info_nce(zi, zt, 0.07, ids)   # the single-process loss of the whole batch

How the gradient crosses processes (the documented choice): :func:`all_gather` is an autograd
function. Its forward concatenates every rank's slice in rank order (this rank's slice holds the
caller's own values, and its gradient flows back to the caller's graph). Its backward receives the gradient of
the whole gathered tensor on every rank, **sums it across ranks** (an all-reduce) and returns this
rank's slice. Every rank computes the same global loss L, so the summed gradient is W x dL/dz_local;
averaging parameter gradients across the W ranks (what DDP does, and so :func:`mmalign.train.fit`) then
gives exactly the single-process gradient dL/dtheta. Detaching the other ranks' slices instead and
keeping only the local path gives dL/dz_local, W times too small after averaging: a classic bug that
``tests/test_dist.py`` would catch.

Item ids: without ids the positives are the diagonal of the *global* matrix, so local row i of rank
r is global item ``r * B_local + i`` (the rank offset); with ids (scene ids, several captions per
image) the ids are gathered too, so a caption of the same scene held by another rank is a positive,
never a negative.

Outside ``torch.distributed`` (one process) every function here is the identity, so the same code
runs in a notebook and under torchrun.
"""

from __future__ import annotations

import datetime
import os
import socket

import torch
import torch.distributed as td

from ._deprecation import keyword_settings
from .checks import check_embeddings, check_positive
from .losses import info_nce

__all__ = ["is_distributed", "rank", "world_size", "is_main", "init", "cleanup", "free_port", "all_gather",
           "all_gather_ids", "rank_offset_labels", "gathered_info_nce", "all_reduce_mean", "broadcast_object",
           "barrier"]


def is_distributed() -> bool:
    """True inside an initialised process group of more than one process."""
    return td.is_available() and td.is_initialized() and td.get_world_size() > 1


def rank() -> int:
    """This process's rank (0 outside torch.distributed)."""
    return td.get_rank() if td.is_available() and td.is_initialized() else 0


def world_size() -> int:
    """The number of processes (1 outside torch.distributed)."""
    return td.get_world_size() if td.is_available() and td.is_initialized() else 1


def is_main() -> bool:
    """True on rank 0: the one process that prints, draws progress bars and writes files."""
    return rank() == 0


def free_port() -> int:
    """A free TCP port on localhost (for MASTER_PORT when processes are spawned by hand, as the tests do)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init(backend: str | None = None, timeout_s: float = 120.0) -> bool:
    """Initialise the default process group from torchrun's environment (RANK, WORLD_SIZE, MASTER_ADDR,
    MASTER_PORT); return True when running distributed.

    ``backend`` defaults to ``nccl`` when CUDA is available and ``gloo`` otherwise (gloo is what the
    CPU tests and chapter 9 use). Without ``WORLD_SIZE`` in the environment (a plain ``python`` run)
    nothing is initialised and False comes back. On CUDA each process takes the GPU ``LOCAL_RANK``.
    """
    if td.is_initialized():
        return is_distributed()
    if "WORLD_SIZE" not in os.environ:
        return False
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend not in ("gloo", "nccl"):
        raise ValueError(f"backend must be 'gloo' (CPU) or 'nccl' (CUDA), got {backend!r}")
    check_positive("timeout_s", timeout_s)
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    td.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    return is_distributed()


def cleanup() -> None:
    """Destroy the process group (call at the end of a worker)."""
    if td.is_available() and td.is_initialized():
        td.destroy_process_group()


def barrier() -> None:
    """Wait for every rank (no-op in one process)."""
    if is_distributed():
        td.barrier()


def _check_same_size(x: torch.Tensor) -> None:
    sizes = [torch.zeros(1, dtype=torch.long, device=x.device) for _ in range(world_size())]
    td.all_gather(sizes, torch.tensor([x.shape[0]], dtype=torch.long, device=x.device))
    sizes = [int(s) for s in sizes]
    if len(set(sizes)) != 1:
        raise ValueError(f"all_gather needs the same number of rows on every rank, got {sizes} per rank; "
                         "shard the batch evenly (fit does: the global batch size must be divisible by the "
                         "number of processes)")


class _AllGather(torch.autograd.Function):
    """Forward: concatenate every rank's slice. Backward: sum the gradient across ranks, keep ours."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        parts = [torch.empty_like(x) for _ in range(td.get_world_size())]
        td.all_gather(parts, x.contiguous())
        ctx.rank, ctx.n = td.get_rank(), x.shape[0]
        return torch.cat(parts, 0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous().clone()
        td.all_reduce(grad, op=td.ReduceOp.SUM)
        return grad[ctx.rank * ctx.n:(ctx.rank + 1) * ctx.n]


def all_gather(x: torch.Tensor) -> torch.Tensor:
    """(W * n, ...) concatenation of every rank's (n, ...) tensor in rank order, differentiable.

    This rank's rows hold ``x``'s values; the backward sums the gathered gradient across
    ranks (see the module docstring). Every rank must pass the same shape. Identity in one process.
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if not is_distributed():
        return x
    _check_same_size(x)
    return _AllGather.apply(x)


def all_gather_ids(ids: torch.Tensor, check_sizes: bool = True) -> torch.Tensor:
    """Every rank's item ids concatenated in rank order (no gradient; integer ids).

    ``check_sizes=False`` skips the collective that checks equal sizes (when they are known equal)."""
    if not isinstance(ids, torch.Tensor):
        raise TypeError(f"ids must be a torch.Tensor, got {type(ids).__name__}")
    if not is_distributed():
        return ids
    if check_sizes:
        _check_same_size(ids)
    parts = [torch.empty_like(ids) for _ in range(world_size())]
    td.all_gather(parts, ids.contiguous())
    return torch.cat(parts, 0)


def rank_offset_labels(n_local: int, device=None) -> torch.Tensor:
    """Global item ids of this rank's rows when the positives are the diagonal: ``rank * n + arange(n)``."""
    if not isinstance(n_local, int) or isinstance(n_local, bool) or n_local < 1:
        raise ValueError(f"n_local must be a positive int (rows on this rank), got {n_local!r}")
    return rank() * n_local + torch.arange(n_local, device=device)


@keyword_settings(old_order=("temperature", "ids", "ids_b", "normalize"), id_pairs={("ids", "ids_b"): "ids"})
def gathered_info_nce(a: torch.Tensor, b: torch.Tensor, *, temperature: float = 0.07, ids=None,
                      normalize: bool = True) -> torch.Tensor:
    """Symmetric InfoNCE of the whole (gathered) batch, computed on every rank: the single-process
    :func:`mmalign.losses.info_nce` of the concatenation of every rank's ``a`` and ``b``.

    Args:
        a, b: (n, D) local embeddings of the two views on this rank (same n on every rank).
        temperature: tau > 0.
        ids: optional (n,) item ids shared by ``a`` and ``b`` (e.g. scene ids), or a pair ``(ids of a,
            ids of b)``. Gathered across ranks, so items with equal ids on different ranks are positives.
            Without ids, the rank offset makes the global diagonal the positives.
        normalize: L2-normalise a and b first (cosine similarity).
    Returns:
        The scalar global loss, equal on every rank; its gradient, averaged over ranks by the training
        loop, equals the single-process gradient.
    """
    a = check_embeddings("a", a)
    b = check_embeddings("b", b)
    check_positive("temperature", temperature)
    if isinstance(ids, (tuple, list)) and len(ids) == 2 and not all(isinstance(i, int) for i in ids):
        ids, ids_b = ids
        if ids is None or ids_b is None:
            raise ValueError("ids=(ids of a, ids of b) needs both sides; pass one tensor when a and b share ids")
    else:
        ids_b = None
    if ids is None:
        if a.shape[0] != b.shape[0]:
            raise ValueError(f"without ids a and b need the same number of rows, got {a.shape[0]} and {b.shape[0]}")
        ids = ids_b = rank_offset_labels(a.shape[0], a.device)
    ids_b = ids if ids_b is None else ids_b
    if not is_distributed():
        return info_nce(a, b, temperature=temperature, ids=(ids, ids_b), normalize=normalize)
    if a.shape[0] == b.shape[0] and a.shape[1] == b.shape[1] and a.dtype == b.dtype:
        # one collective for both views (and one for both id vectors): [a | b] side by side
        ga, gb = all_gather(torch.cat([a, b], 1)).split(a.shape[1], dim=1)
        gi, gib = all_gather_ids(torch.stack([torch.as_tensor(ids, device=a.device),
                                              torch.as_tensor(ids_b, device=a.device)], 1), False).unbind(1)
    else:
        ga, gb = all_gather(a), all_gather(b)
        gi, gib = all_gather_ids(torch.as_tensor(ids, device=a.device)), all_gather_ids(
            torch.as_tensor(ids_b, device=b.device))
    return info_nce(ga, gb, temperature=temperature, ids=(gi, gib), normalize=normalize)


def all_reduce_mean(x: torch.Tensor | float) -> torch.Tensor:
    """The mean of a tensor (or float) over ranks, without gradient (for logging losses and metrics)."""
    t = torch.as_tensor(x, dtype=torch.float64).detach().clone() if not isinstance(x, torch.Tensor) \
        else x.detach().clone()
    if not is_distributed():
        return t
    if td.get_backend() == "nccl" and t.device.type != "cuda":
        t = t.cuda()
    td.all_reduce(t, op=td.ReduceOp.SUM)
    return t / world_size()


def broadcast_object(obj, src: int = 0):
    """Rank ``src``'s picklable ``obj`` on every rank (identity in one process): metrics of an evaluation
    that ran on rank 0 only."""
    if not is_distributed():
        return obj
    box = [obj if rank() == src else None]
    td.broadcast_object_list(box, src=src)
    return box[0]
