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
from .checks import check_embeddings, check_ids, check_positive
from .losses import info_nce, siglip_loss
from .losses._checks import check_pair, check_temperature, mined_negative_masks, positive_mask
from .losses.info_nce import _multi_positive_ce
from .losses.siglip import _check_bias, _siglip_logits_loss
from .retrieval import _similarity

__all__ = ["is_distributed", "rank", "world_size", "is_main", "init", "cleanup", "free_port", "all_gather",
           "all_gather_ids", "all_gather_rows", "rank_offset_labels", "gathered_info_nce", "gathered_siglip_loss", "all_reduce_mean", "broadcast_object",
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


_DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.int16,
           torch.int8, torch.uint8, torch.bool, torch.complex64, torch.complex128]
_MAX_DIMS = 8


def _shapes_on_every_rank(x: torch.Tensor) -> list[tuple[tuple[int, ...], int]]:
    """(shape, dtype code) of ``x`` on every rank, in rank order: one small all-gather."""
    code = _DTYPES.index(x.dtype) if x.dtype in _DTYPES else len(_DTYPES)
    device = x.device if td.get_backend() != "nccl" else torch.device("cuda", torch.cuda.current_device())
    mine = torch.tensor([x.dim(), code, *x.shape, *[0] * (_MAX_DIMS - x.dim())], dtype=torch.long, device=device)
    parts = [torch.empty_like(mine) for _ in range(world_size())]
    td.all_gather(parts, mine)
    return [(tuple(int(v) for v in t[2:2 + int(t[0])]), int(t[1])) for t in parts]


def _check_same_size(x: torch.Tensor) -> None:
    """Every rank passes the same shape and dtype (one small all-gather of shape and dtype code), or
    every rank raises a ValueError that lists what each rank passed (instead of a hang or an abort
    inside the collective when the widths or dtypes differ)."""
    if x.dim() > _MAX_DIMS:
        raise ValueError(f"all_gather takes tensors of at most {_MAX_DIMS} dimensions, got shape {tuple(x.shape)}")
    seen = _shapes_on_every_rank(x)
    if len({shape for shape, _ in seen}) > 1 and len({shape[1:] for shape, _ in seen}) == 1:
        raise ValueError(f"all_gather needs the same number of rows on every rank, got {[s_[0] for s_, _ in seen]} "
                         "per rank; shard the batch evenly (fit does: the global batch size must be divisible by "
                         "the number of processes)")
    if len(set(seen)) > 1:
        names = [str(_DTYPES[c]).replace("torch.", "") if c < len(_DTYPES) else "other" for _, c in seen]
        raise ValueError("all_gather needs the same shape and dtype on every rank, got "
                         + ", ".join(f"rank {r}: {shape} {name}" for r, ((shape, _), name) in enumerate(zip(seen, names)))
                         + "; every process must build its tensor the same way (same model widths, same dtype, "
                         "same autocast setting)")


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


def all_gather_rows(x: torch.Tensor) -> torch.Tensor:
    """Every rank's (n_r, ...) tensor concatenated in rank order, where n_r may differ between ranks
    (no gradient): what a queue or memory that every rank keeps identical stores. Identity in one process.

    The trailing shape and the dtype must agree across ranks (a ValueError on every rank lists them).
    Two collectives: one for the sizes, one for the rows padded to the largest n_r.
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if not is_distributed():
        return x
    if x.dim() == 0 or x.dim() > _MAX_DIMS:
        raise ValueError(f"all_gather_rows takes tensors of 1 to {_MAX_DIMS} dimensions, got shape {tuple(x.shape)}")
    seen = _shapes_on_every_rank(x)
    if len({(shape[1:], c) for shape, c in seen}) > 1:
        raise ValueError("all_gather_rows needs the same trailing shape and dtype on every rank, got "
                         + ", ".join(f"rank {r}: {shape} dtype code {c}" for r, (shape, c) in enumerate(seen)))
    rows = [shape[0] for shape, _ in seen]
    padded = x.detach().new_zeros((max(rows), *x.shape[1:]))
    padded[:x.shape[0]] = x.detach()
    out = [torch.empty_like(padded) for _ in rows]
    td.all_gather(out, padded.contiguous())
    return torch.cat([t[:n] for t, n in zip(out, rows)], 0)


def rank_offset_labels(n_local: int, device=None) -> torch.Tensor:
    """Global item ids of this rank's rows when the positives are the diagonal: ``rank * n + arange(n)``."""
    if not isinstance(n_local, int) or isinstance(n_local, bool) or n_local < 1:
        raise ValueError(f"n_local must be a positive int (rows on this rank), got {n_local!r}")
    return rank() * n_local + torch.arange(n_local, device=device)


@keyword_settings(old_order=("temperature", "ids", "ids_b", "normalize"), id_pairs={("ids", "ids_b"): "ids"})
def gathered_info_nce(a: torch.Tensor, b: torch.Tensor, *, temperature: float = 0.07, ids=None,
                      normalize: bool = True, negatives=None, local_loss: bool = False) -> torch.Tensor:
    """Symmetric InfoNCE of the whole (gathered) batch, computed on every rank: the single-process
    :func:`mmalign.losses.info_nce` of the concatenation of every rank's ``a`` and ``b``.

    Args:
        a, b: (n, D) local embeddings of the two views on this rank (same n on every rank).
        temperature: tau > 0.
        ids: optional (n,) item ids shared by ``a`` and ``b`` (e.g. scene ids), or a pair ``(ids of a,
            ids of b)``. Gathered across ranks, so items with equal ids on different ranks are positives.
            Without ids, the rank offset makes the global diagonal the positives.
        normalize: L2-normalise a and b first (cosine similarity).
        negatives: optional output of a miner run on the gathered batch (e.g. ``hardest_negatives`` of
            the similarity of the gathered embeddings, the same on every rank): ``(neg_for_a (W*n, k),
            neg_for_b (W*n, k'))``, global indices, -1 for none; each row's softmax then runs over its
            positives and its mined negatives (as :func:`mmalign.losses.info_nce`'s ``negatives``).
        local_loss: compute only this rank's rows: its n rows of ``a`` against the W*n gathered columns
            of ``b``, and its rows of ``b`` against the gathered ``a`` (open_clip's ``local_loss``): the
            logits take n x W*n memory instead of W*n x W*n. The value returned is then this rank's part
            of the global loss times W (the mean over ranks is the global loss) and the gradients,
            averaged over ranks, are the global form's.
    Returns:
        The scalar loss: the global loss, equal on every rank (``local_loss=False``), or W times this
        rank's part of it (``local_loss=True``). Its gradient, averaged over ranks by the training loop
        (DDP), equals the single-process gradient.

    Example (mining on the gathered batch)::

        ga, gb = dist.all_gather(zi).detach(), dist.all_gather(zt).detach()
        neg = hardest_negatives(similarity(ga, gb), ids=dist.all_gather_ids(ids), k=8)
        loss = dist.gathered_info_nce(zi, zt, temperature=0.07, ids=ids, negatives=neg, local_loss=True)
    """
    a = check_embeddings("a", a)
    b = check_embeddings("b", b)
    check_positive("temperature", temperature)
    ids, ids_b = _split_ids(ids, a, b)
    if not isinstance(local_loss, bool):
        raise ValueError(f"local_loss must be True or False, got {local_loss!r}")
    if not is_distributed():
        return info_nce(a, b, temperature=temperature, ids=(ids, ids_b), normalize=normalize, negatives=negatives)
    ga, gb, gi, gib = _gather_pair(a, b, ids, ids_b)
    if not local_loss:
        return info_nce(ga, gb, temperature=temperature, ids=(gi, gib), normalize=normalize, negatives=negatives)
    n_a, n_b, r = a.shape[0], b.shape[0], rank()
    rows_a, rows_b = slice(r * n_a, (r + 1) * n_a), slice(r * n_b, (r + 1) * n_b)
    # this rank's rows only, never a (W n_a, W n_b) matrix: logits and masks are (n_a, W n_b) and (n_b, W n_a)
    pos_ab = positive_mask((gi[rows_a], gib), n_a, gb.shape[0], a.device)
    pos_ba = positive_mask((gib[rows_b], gi), n_b, ga.shape[0], a.device)
    logits_ab = _similarity(a, gb, normalize) / temperature
    logits_ba = _similarity(b, ga, normalize) / temperature
    if negatives is not None:
        keep_ab, keep_ba = mined_negative_masks(negatives, ga.shape[0], gb.shape[0], a.device, rows=(rows_a, rows_b))
        logits_ab = logits_ab.masked_fill(~(pos_ab | keep_ab), float("-inf"))
        logits_ba = logits_ba.masked_fill(~(pos_ba | keep_ba), float("-inf"))
    return 0.5 * (_multi_positive_ce(logits_ab, pos_ab) + _multi_positive_ce(logits_ba, pos_ba))


def _gather_pair(a, b, ids, ids_b):
    """Gathered (a, b, ids of a, ids of b), with gradient through a and b."""
    if a.shape[0] == b.shape[0] and a.shape[1] == b.shape[1] and a.dtype == b.dtype:
        # one collective for both views (and one for both id vectors): [a | b] side by side
        ga, gb = all_gather(torch.cat([a, b], 1)).split(a.shape[1], dim=1)
        gi, gib = all_gather_ids(torch.stack([torch.as_tensor(ids, device=a.device),
                                              torch.as_tensor(ids_b, device=a.device)], 1), False).unbind(1)
    else:
        ga, gb = all_gather(a), all_gather(b)
        gi, gib = all_gather_ids(torch.as_tensor(ids, device=a.device)), all_gather_ids(
            torch.as_tensor(ids_b, device=b.device))
    return ga, gb, gi, gib


def _split_ids(ids, a, b):
    """(ids of a, ids of b) from one tensor, a pair, or None (the rank offset: the global diagonal)."""
    if isinstance(ids, (tuple, list)) and len(ids) == 2 and not all(isinstance(i, int) for i in ids):
        ids, ids_b = ids
        if ids is None or ids_b is None:
            raise ValueError("ids=(ids of a, ids of b) needs both sides; pass one tensor when a and b share ids")
        return ids, ids_b
    if ids is None:
        if a.shape[0] != b.shape[0]:
            raise ValueError(f"without ids a and b need the same number of rows, got {a.shape[0]} and {b.shape[0]}")
        ids = rank_offset_labels(a.shape[0], a.device)
    return ids, ids


def gathered_siglip_loss(a: torch.Tensor, b: torch.Tensor, *, temperature: float | torch.Tensor = 0.1,
                         bias: float | torch.Tensor = -10.0, ids=None, normalize: bool = True) -> torch.Tensor:
    r"""SigLIP across processes: this rank's rows of ``a`` against the gathered columns of ``b``.

    The sigmoid loss is a sum of independent pair terms (:func:`mmalign.losses.siglip_loss`), so each
    rank computes the n x W*n block of its own rows and nothing is lost: the paper (Zhai et al., 2023)
    passes the caption chunks around the devices for the same blocks; here they are gathered
    (differentiably, :func:`all_gather`). Returns W times this rank's part of the global loss
    :math:`-\frac{1}{Wn}\sum_{i,j}\log\sigma(z_{ij}(s_{ij}/\tau + b))`, so the mean over ranks is the
    single-process loss of the whole batch and the gradients averaged over ranks (DDP) are its
    gradients, including those of a learned temperature and bias.

    Args:
        a, b: (n, D) local embeddings of the two views on this rank (same n on every rank).
        temperature: tau > 0 (a float or a 0-d tensor).
        bias: b (a float or a 0-d tensor).
        ids: optional (n,) item ids shared by ``a`` and ``b``, or a pair ``(ids of a, ids of b)``;
            gathered, so equal ids on different ranks are positives. Without ids the global diagonal.
        normalize: L2-normalise a and b first.
    Returns:
        The scalar loss of this rank (see above); in one process, ``siglip_loss`` of the batch.
    """
    a = check_embeddings("a", a)
    b = check_embeddings("b", b)
    check_temperature(temperature)
    _check_bias(bias)
    ids, ids_b = _split_ids(ids, a, b)
    if not is_distributed():
        return siglip_loss(a, b, temperature=temperature, bias=bias, ids=(ids, ids_b), normalize=normalize)
    gb = all_gather(b)
    gib = all_gather_ids(torch.as_tensor(ids_b, device=b.device))
    ids = check_ids("ids", ids, a.shape[0], a.device)
    check_pair(a, gb, same_length=False, finite=False)
    pos = ids[:, None] == gib[None, :]  # (n, W n): this rank's rows
    logits = _similarity(a, gb, normalize) / temperature + bias
    return _siglip_logits_loss(logits, pos, a.shape[0])


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
