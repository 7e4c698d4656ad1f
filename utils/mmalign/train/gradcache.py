"""Contrastive batches larger than memory by gradient caching (Gao et al., 2021, "Scaling Deep Contrastive
Learning Batch Size under Memory Limited Setup", GradCache).

A contrastive loss couples every pair of the batch, so it cannot be split into independent
micro-batches the way an average loss can. GradCache splits the *encoder* instead:

1. embed the batch chunk by chunk without a graph (only the (B, D) embeddings are kept);
2. compute the loss on the whole batch from those embeddings, and its gradient with respect to
   them (the "cache"): the B x B logits are the one full-batch cost;
3. run each chunk through the encoder again, with a graph, and back-propagate its slice of the
   cached gradient; the parameter gradients add up to the full-batch gradient exactly.

Peak activation memory is that of one chunk instead of the whole batch, for one extra forward pass.
Random draws in the encoder (dropout) are replayed: each chunk's second pass starts from the RNG state
of its first one.
"""

from __future__ import annotations

from typing import Callable, Iterable, Sequence

import torch

from .. import dist as _dist
from ..checks import check_int

__all__ = ["grad_cache_loss"]


def _as_tuple(out) -> tuple[torch.Tensor, ...]:
    out = out if isinstance(out, (tuple, list)) else (out,)
    if not out or not all(isinstance(t, torch.Tensor) for t in out):
        raise TypeError("embed_fn must return a tensor or a tuple of tensors (one embedding batch per view)")
    return tuple(out)


class _GradCache(torch.autograd.Function):
    @staticmethod
    def forward(ctx, anchor, embed_fn, loss_fn, chunks):  # noqa: D401 - autograd API
        device_type = chunks[0][0].device.type
        ctx.autocast = (device_type, torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type))
        ctx.embed_fn, ctx.chunks, ctx.rng = embed_fn, chunks, []
        parts = []
        with torch.no_grad():
            for chunk in chunks:
                ctx.rng.append((torch.get_rng_state(), torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None))
                parts.append(_as_tuple(embed_fn(*chunk)))
        n_out = len(parts[0])
        if any(len(p) != n_out for p in parts):
            raise ValueError("embed_fn returned a different number of tensors for different chunks")
        ctx.sizes = [p[0].shape[0] for p in parts]
        ctx.embeddings = [torch.cat([p[k] for p in parts]).detach().requires_grad_() for k in range(n_out)]
        with torch.enable_grad():
            ctx.loss = loss_fn(*ctx.embeddings)  # the graph of the loss on the cached embeddings
        if not isinstance(ctx.loss, torch.Tensor) or ctx.loss.numel() != 1:
            raise ValueError("loss_fn must return a scalar tensor (the loss of the whole batch)")
        return ctx.loss.detach().clone()

    @staticmethod
    def backward(ctx, grad_out):
        # the cache: d loss / d embeddings (and the gradients of parameters used by loss_fn, e.g. a temperature)
        torch.autograd.backward(ctx.loss, grad_out)
        cached = [e.grad if e.grad is not None else torch.zeros_like(e) for e in ctx.embeddings]
        device_type, enabled, dtype = ctx.autocast
        start = 0
        for chunk, size, (cpu_rng, cuda_rng) in zip(ctx.chunks, ctx.sizes, ctx.rng):
            with torch.random.fork_rng(devices=range(torch.cuda.device_count()) if cuda_rng is not None else []):
                torch.set_rng_state(cpu_rng)
                if cuda_rng is not None:
                    torch.cuda.set_rng_state_all(cuda_rng)
                with torch.enable_grad(), torch.autocast(device_type, dtype=dtype, enabled=enabled):
                    out = _as_tuple(ctx.embed_fn(*chunk))
            pairs = [(o, g[start:start + size]) for o, g in zip(out, cached) if o.requires_grad]
            if pairs:
                torch.autograd.backward([o for o, _ in pairs], [g.to(o.dtype) for o, g in pairs])
            start += size
        ctx.loss = ctx.embeddings = ctx.chunks = None
        return None, None, None, None


def grad_cache_loss(embed_fn: Callable[..., torch.Tensor | Sequence[torch.Tensor]],
                    loss_fn: Callable[..., torch.Tensor], inputs: Sequence[torch.Tensor], *, chunk_size: int,
                    params: Iterable[torch.Tensor]) -> torch.Tensor:
    r"""The full-batch contrastive loss, whose ``backward()`` runs GradCache's chunked backward.

    .. math::
        \frac{\partial L}{\partial\theta} = \sum_{c}\Big(\frac{\partial L}{\partial z_c}\Big)^{\!\top}
            \frac{\partial z_c}{\partial\theta},

    where :math:`z_c` are the embeddings of chunk c: the cached :math:`\partial L/\partial z` of the whole
    batch is back-propagated through each chunk's encoder pass in turn (Gao et al., 2021). Use it as
    the loss of :func:`mmalign.train.fit` (one process) or of a loop of your own::

        def step(model, batch):
            img, txt, ids = batch
            return grad_cache_loss(lambda i, t: model(i, t),
                                   lambda zi, zt: info_nce(zi, zt, temperature=0.07, ids=ids),
                                   (img, txt), chunk_size=256, params=model.parameters())

    Args:
        embed_fn: ``(*chunk) -> embedding tensor or tuple of them`` (e.g. ``(z_img, z_txt)``), run on
            slices of ``inputs``; it may draw random numbers (dropout): they are replayed.
        loss_fn: ``(*embeddings of the whole batch) -> scalar loss``; it may use parameters of its own
            (a learned temperature), whose gradients are accumulated too.
        inputs: tensors with the same first dimension B, cut into chunks of ``chunk_size`` rows.
        chunk_size: rows per encoder pass (>= 1); the last chunk may be shorter.
        params: the trained parameters (they connect the returned loss to the graph; the gradients
            are accumulated into their ``.grad`` by the backward pass).

    Returns:
        The scalar loss of the whole batch (the value of ``loss_fn``); its ``backward()`` accumulates the
        full-batch gradient into every parameter reached by ``embed_fn`` and ``loss_fn``. Call
        ``backward()`` once (the cache is freed).

    Raises:
        ValueError: under torch.distributed (DistributedDataParallel's gradient hooks expect one
            backward pass; use ``ddp.no_sync()`` in a loop of your own), or bad inputs.
    """
    if _dist.is_distributed():
        raise ValueError("grad_cache_loss runs one process: under torch.distributed (DistributedDataParallel) each "
                         "chunk's backward would trigger the gradient all-reduce again; gather negatives with "
                         "mmalign.dist.gathered_info_nce(local_loss=True) instead, or use ddp.no_sync() by hand")
    if not callable(embed_fn) or not callable(loss_fn):
        raise TypeError("embed_fn and loss_fn must be callables")
    chunk_size = check_int("chunk_size", chunk_size, minimum=1)
    inputs = tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)
    if not inputs or not all(isinstance(t, torch.Tensor) for t in inputs):
        raise ValueError("inputs must be a tensor or a non-empty tuple of tensors with one row per sample")
    n = inputs[0].shape[0]
    if n == 0 or any(t.shape[0] != n for t in inputs):
        raise ValueError(f"inputs need the same, non-zero first dimension, got {[tuple(t.shape) for t in inputs]}")
    anchor = next((p for p in params if isinstance(p, torch.Tensor) and p.requires_grad), None)
    if anchor is None:
        raise ValueError("params holds no tensor that requires grad: pass the trained parameters (model.parameters())")
    chunks = [tuple(t[s:s + chunk_size] for t in inputs) for s in range(0, n, chunk_size)]
    return _GradCache.apply(anchor, embed_fn, loss_fn, chunks)
