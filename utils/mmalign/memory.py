"""Memories that reach beyond the batch: a ring buffer of hard negatives, a MoCo key queue and the
momentum (EMA) encoder that fills it.

* :class:`HardNegativeMemory` keeps the features of the worst margin violators of past batches and
  reads them back as extra negatives (the memory module of the course homework).
* :class:`MoCoQueue` keeps the most recent keys of a momentum encoder as negatives
  (He et al., 2020, MoCo; ALBEF, Li et al., 2021, keeps one queue per modality).
* :class:`MomentumEncoder` is the slowly moving copy of an encoder that produces those keys.

Both buffers are fixed-size tensors written in place at a wrap-around pointer (no growing
``torch.cat``), store detached features with their item ids (so a loss can mask copies of the
positive), and round-trip through ``state_dict()`` / ``load_state_dict()`` exactly.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from . import dist as _dist
from ._deprecation import keyword_settings
from .checks import check_finite, check_ids, check_int, check_real
from .miners import _check_k, _check_sim, _negative_mask, _paired_positive, _topk_rows

__all__ = ["HardNegativeMemory", "MoCoQueue", "MomentumEncoder"]


class _RingBuffer:
    """``size`` slots of (dim,) features and an item id each, written at a wrap-around pointer.

    Writing n rows is the same as writing them one at a time: row t goes to slot
    ``(ptr + t) % size`` and later rows overwrite earlier ones, so a batch larger than the buffer
    leaves its last ``size`` rows. Reads return the filled slots in slot order (not time order).
    """

    def __init__(self, size: int, dim: int, device=None, dtype: torch.dtype = torch.float32):
        for name, v in (("size", size), ("dim", dim)):
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise ValueError(f"dtype must be a floating-point dtype, got {dtype}")
        self.size, self.dim = size, dim
        self._feats = torch.zeros(size, dim, device=device, dtype=dtype)
        self._ids = torch.full((size,), -1, device=device, dtype=torch.long)
        self.ptr = 0  # next slot to write
        self.count = 0  # filled slots, <= size

    @property
    def device(self) -> torch.device:
        return self._feats.device

    def __len__(self) -> int:
        return self.count

    def to(self, device) -> "_RingBuffer":
        """Move the buffers to ``device`` (in place); returns self."""
        self._feats, self._ids = self._feats.to(device), self._ids.to(device)
        return self

    def _write(self, feats: torch.Tensor, ids, gather: bool = True) -> None:
        if not isinstance(feats, torch.Tensor) or feats.dim() != 2 or feats.shape[1] != self.dim:
            shape = tuple(feats.shape) if isinstance(feats, torch.Tensor) else type(feats).__name__
            raise ValueError(f"expected (n, {self.dim}) features, got {shape}; project them to dim={self.dim} first")
        n = feats.shape[0]
        if not feats.dtype.is_floating_point:
            raise ValueError(f"features must be a real floating-point tensor, got {feats.dtype}; use .float()")
        ids = torch.as_tensor(ids, device=self.device)
        if ids.shape != (n,):
            raise ValueError(f"expected one item id per row: {n} rows but ids of shape {tuple(ids.shape)}")
        if ids.is_floating_point() or ids.dtype == torch.bool or ids.is_complex():
            raise ValueError(f"item ids must be integers, got {ids.dtype}")
        check_finite("features", feats)
        if gather and _dist.is_distributed():  # every rank writes every rank's rows, in rank order
            feats, ids = _dist.all_gather_rows(feats.detach()), _dist.all_gather_rows(ids.long())
            n = feats.shape[0]
        if n == 0:
            return
        keep = min(n, self.size)  # rows that survive: the last `keep`
        start = (self.ptr + n - keep) % self.size
        feats, ids = feats[n - keep :].detach().to(self.device, self._feats.dtype), ids[n - keep :].long()
        first = min(keep, self.size - start)  # slots start.. up to the end, then wrap to 0 (slice copies)
        self._feats[start:start + first], self._ids[start:start + first] = feats[:first], ids[:first]
        if keep > first:  # (no empty copies: at a 0.1 ms call, each dispatch shows)
            self._feats[:keep - first], self._ids[:keep - first] = feats[first:], ids[first:]
        self.ptr = (self.ptr + n) % self.size
        self.count = min(self.count + n, self.size)

    def _valid(self) -> tuple[torch.Tensor, torch.Tensor]:
        # slots fill from 0 and are never emptied, so the filled ones are always 0..count-1
        return self._feats[: self.count], self._ids[: self.count]

    def state_dict(self) -> dict:
        """Copies of the buffers and the pointer: restoring them resumes the exact same buffer."""
        return {"features": self._feats.clone(), "item_ids": self._ids.clone(), "ptr": self.ptr, "count": self.count}

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict` (into this buffer's device and dtype)."""
        if not isinstance(state, dict):
            raise TypeError(f"load_state_dict expects the dict saved by state_dict(), got {type(state).__name__}")
        missing = {"features", "item_ids", "ptr", "count"} - set(state)
        if missing:
            raise ValueError(f"state_dict is missing {sorted(missing)}; pass the dict saved by state_dict()")
        feats, ids = state["features"], state["item_ids"]
        if not isinstance(feats, torch.Tensor) or not isinstance(ids, torch.Tensor):
            raise TypeError("state_dict['features'] and ['item_ids'] must be tensors; pass the dict saved by state_dict()")
        if tuple(feats.shape) != (self.size, self.dim):
            raise ValueError(
                f"saved buffer is {tuple(feats.shape)} but this one is ({self.size}, {self.dim}); "
                "create it with the same size and dim"
            )
        if not feats.dtype.is_floating_point:
            raise ValueError(f"state_dict['features'] must be floating point, got {feats.dtype}")
        ids = check_ids("state_dict['item_ids']", ids, self.size)
        ptr = check_int("state_dict['ptr']", state["ptr"], minimum=0, maximum=self.size - 1)
        count = check_int("state_dict['count']", state["count"], minimum=0, maximum=self.size)
        if count < self.size and ptr != count:
            raise ValueError(f"state_dict has ptr={ptr} but count={count}: a buffer that is not full writes at "
                             "slot count; the state is corrupt or from another buffer")
        check_finite("state_dict['features']", feats[:count])
        self._feats.copy_(feats)
        self._ids.copy_(ids)
        self.ptr, self.count = ptr, count

    def __repr__(self) -> str:
        return f"{type(self).__name__}(size={self.size}, dim={self.dim}, filled={self.count}, device={self.device})"


class HardNegativeMemory(_RingBuffer):
    r"""A fixed-size memory of hard negatives, read back as extra negatives in later batches.

    After each step, :meth:`select_violators` picks the batch items that most violate the margin
    for some anchor, :meth:`write` stores their (detached) features and item ids, and the next step
    scores its anchors against :meth:`read` as well as against the batch (the memory module of the
    course homework; a fixed-size version of the memory bank of Wu et al., 2018). Mask memory
    entries whose id equals the anchor's id, as for in-batch negatives.

    Args:
        size: number of slots (> 0); the oldest entries are overwritten first.
        dim: feature size.
        device, dtype: where and how the features are stored (float32 by default).
    """

    @keyword_settings(renamed={"item_ids": "ids"})
    def write(self, features: torch.Tensor, ids: torch.Tensor, *, gather: bool = True) -> None:
        """Store (n, dim) ``features`` with their (n,) item ``ids``; a batch larger than the
        memory keeps its last ``size`` rows. Features are detached and cast to the memory's dtype.

        Under torch.distributed (and ``gather=True``) every rank's rows are gathered first, in rank
        order (:func:`mmalign.dist.all_gather_rows`; n may differ between ranks), so every process holds
        the same memory, the one a single process would hold after writing the global batch's rows.
        ``gather=False`` keeps a memory per process (its own rows only)."""
        self._write(features, ids, gather)

    def read(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(features (count, dim), ids (count,))`` of the filled slots, in slot order."""
        return self._valid()

    @staticmethod
    @keyword_settings(old_order=("k", "margin", "row_ids", "col_ids", "pos_for_cols"),
                      id_pairs={("row_ids", "col_ids"): "ids"})
    def select_violators(
        sim: torch.Tensor,
        *,
        k: int = 1,
        margin: float = 0.2,
        ids=None,
        pos_for_cols: torch.Tensor | None = None,
    ) -> torch.Tensor:
        r"""Rows of ``sim`` that are among the k worst margin violators of some column anchor.

        The rows are the candidates to store and the columns the anchors that will read them: to
        store image features for caption anchors pass ``sim`` (B_img, B_txt) as is; to store
        captions for image anchors pass ``sim.T`` (and swap the ids). Row i violates anchor j when

        .. math::
            \mathrm{id}_i \ne \mathrm{id}_j \quad\text{and}\quad s_{ij} > s_{\mathrm{pos}}(j) - m,

        with :math:`s_{\mathrm{pos}}(j)` = ``sim[pos_for_cols[j], j]`` (the diagonal by default).
        Each anchor nominates its k most similar violators (ties in index order).

        Args:
            sim: (B_rows, B_cols) similarity matrix, detached or not (only indices come out).
            k: violators nominated per anchor (>= 1).
            margin: m; m = 0 keeps only negatives ranked above the positive.
            ids: optional item ids, one (B,) tensor for a square ``sim`` or a pair ``(row ids, column ids)``;
                default: the diagonal pairs.
            pos_for_cols: optional (B_cols,) row index of each anchor's positive.

        Returns:
            A 1-d LongTensor of distinct row indices, sorted by :math:`\max_j (s_{ij} - s_{\mathrm{pos}}(j))`
            over the anchors j that nominated row i, from mildest to worst (ties by index), so that
            when they overflow the memory the worst violators are the ones kept. Write them with
            ``memory.write(features[rows], ids[rows])``.
        """
        _check_sim(sim)
        _check_k(k)
        margin = check_real("margin", margin)
        valid = _negative_mask(sim, ids)
        s_pos = _paired_positive(sim.T, valid.T, pos_for_cols, "pos_for_cols")  # (cols,)
        excess = sim - s_pos[None, :]  # (rows, cols)
        picked = _topk_rows(excess.T, valid.T & (excess.T > -margin), k)  # (cols, k) row indices
        chosen = torch.zeros(sim.shape, dtype=torch.bool, device=sim.device)
        cols = torch.arange(sim.shape[1], device=sim.device)[:, None].expand_as(picked)
        ok = picked >= 0
        chosen[picked[ok], cols[ok]] = True
        worst = excess.masked_fill(~chosen, float("-inf")).amax(1)
        rows = torch.nonzero(worst > float("-inf")).flatten()
        return rows[torch.sort(worst[rows], stable=True).indices]


class MoCoQueue(_RingBuffer):
    r"""The MoCo dictionary: a queue of the most recent keys and their item ids (He et al., 2020).

    Each step enqueues the batch's keys and thereby drops the oldest ones, so the negatives of
    :func:`mmalign.losses.moco.moco_loss` come from many past batches of a slowly moving key
    encoder (:class:`MomentumEncoder`). ALBEF (Li et al., 2021) keeps two: image keys for text
    queries and text keys for image queries. A last short batch, or a batch larger than the
    queue, is handled as if the keys were enqueued one by one.

    Args:
        size: K, the number of keys kept (> 0).
        dim: key size.
        device, dtype: where and how the keys are stored (float32 by default).
    """

    @keyword_settings(renamed={"item_ids": "ids"})
    def enqueue(self, keys: torch.Tensor, ids: torch.Tensor, *, gather: bool = True) -> None:
        """Append (n, dim) ``keys`` (detached) with their (n,) item ``ids``, dropping the oldest.

        Under torch.distributed (and ``gather=True``) every rank's keys are gathered first, in rank
        order, as MoCo's own recipe does (``concat_all_gather`` before ``_dequeue_and_enqueue``): every
        process holds the same queue, the one a single process holds after enqueuing the global batch.
        ``gather=False`` keeps a queue per process."""
        self._write(keys, ids, gather)

    @property
    def keys(self) -> torch.Tensor:
        """(count, dim) view of the filled slots, in slot order."""
        return self._valid()[0]

    @property
    def ids(self) -> torch.Tensor:
        """(count,) item ids of :attr:`keys`."""
        return self._valid()[1]


class MomentumEncoder(nn.Module):
    r"""A frozen copy of an encoder that follows the online one by an exponential moving average.

    .. math::
        \theta_k \leftarrow m\,\theta_k + (1 - m)\,\theta_q

    on every parameter; buffers (e.g. BatchNorm running statistics) are copied from the online
    encoder. The copy never receives gradients and runs under ``torch.no_grad()`` (He et al., 2020,
    MoCo; ALBEF's momentum model, Li et al., 2021).

    Args:
        module: the online encoder; it is deep-copied at construction (so theta_k = theta_q at start).
        momentum: m in [0, 1]; 0.999 in MoCo, 0.995 in ALBEF. m = 0 copies, m = 1 freezes.
    """

    def __init__(self, module: nn.Module, momentum: float = 0.999):
        super().__init__()
        if not isinstance(module, nn.Module):
            raise ValueError(f"module must be a torch.nn.Module, got {type(module).__name__}")
        momentum = check_real("momentum", momentum)
        if not 0.0 <= momentum <= 1.0:
            raise ValueError(f"momentum must be in [0, 1] (e.g. 0.999), got {momentum}")
        self.momentum = float(momentum)
        self.module = copy.deepcopy(module)
        self.module.requires_grad_(False)

    @torch.no_grad()
    def update(self, online: nn.Module) -> None:
        """One EMA step towards ``online`` (same architecture as the wrapped module)."""
        if not isinstance(online, nn.Module):
            raise ValueError(f"online must be the torch.nn.Module that was wrapped, got {type(online).__name__}")
        for kind, mine, theirs in (
            ("parameters", self.module.named_parameters(), online.named_parameters()),
            ("buffers", self.module.named_buffers(), online.named_buffers()),
        ):
            mine, theirs = dict(mine), dict(theirs)
            if mine.keys() != theirs.keys() or any(mine[n].shape != theirs[n].shape for n in mine):
                raise ValueError(
                    f"the online module's {kind} do not match the momentum copy; "
                    "pass the same encoder (architecture) that was wrapped"
                )
            for name, t in mine.items():
                src = theirs[name].detach().to(t.device)
                if kind == "buffers" or not t.is_floating_point():
                    t.copy_(src)
                else:
                    t.mul_(self.momentum).add_(src, alpha=1.0 - self.momentum)

    @torch.no_grad()
    def forward(self, *args, **kwargs):
        """Run the momentum copy without building a graph."""
        return self.module(*args, **kwargs)
