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

from ..checks import check_int

__all__ = ["grad_cache_loss"]


def _as_tuple(out) -> tuple[torch.Tensor, ...]:
    out = out if isinstance(out, (tuple, list)) else (out,)
    if not out or not all(isinstance(t, torch.Tensor) for t in out):
        raise TypeError("embed_fn must return a tensor or a tuple of tensors (one embedding batch per view)")
    return tuple(out)


def _loss_leaves(loss: torch.Tensor, skip: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """The leaf tensors that require grad in the graph of ``loss`` (e.g. a learned temperature), except ``skip``."""
    skip_ids, seen, leaves = {id(t) for t in skip}, set(), []
    stack = [loss.grad_fn] if loss.grad_fn is not None else []
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        variable = getattr(node, "variable", None)  # an AccumulateGrad node holds its leaf
        if isinstance(variable, torch.Tensor) and id(variable) not in skip_ids:
            skip_ids.add(id(variable))
            leaves.append(variable)
        stack.extend(fn for fn, _ in node.next_functions)
    return leaves


class _Cache:
    """What the backward pass needs: the chunks, the embedding function, the RNG state of each chunk's first
    pass, the cached embeddings and the graph of the loss on them."""

    def __init__(self, embed_fn, chunks, rng, sizes, embeddings, loss, autocast, params):
        self.embed_fn, self.chunks, self.rng, self.sizes = embed_fn, chunks, rng, sizes
        self.embeddings, self.loss, self.autocast, self.params = embeddings, loss, autocast, params


def _add(total, grads):
    return [t if g is None else g if t is None else t + g for t, g in zip(total, grads)]


class _GradCache(torch.autograd.Function):
    """Forward: the loss value. Backward: the summed gradient of every trained tensor, returned once."""

    @staticmethod
    def forward(ctx, cache: _Cache, *trained):  # noqa: D401 - autograd API
        ctx.cache = cache
        return cache.loss.detach().clone()

    @staticmethod
    def backward(ctx, grad_out):
        cache = ctx.cache
        params = cache.params
        k = len(cache.embeddings)
        # the cache, d loss / d embeddings, and the gradients of tensors the loss itself uses (a temperature);
        # under torch.distributed a gathered loss runs its collectives here, on every rank in the same order
        first = torch.autograd.grad(cache.loss, [*cache.embeddings, *params], grad_out, allow_unused=True)
        cached = [g if g is not None else torch.zeros_like(e) for g, e in zip(first[:k], cache.embeddings)]
        total = list(first[k:])
        device_type, enabled, dtype = cache.autocast
        start = 0
        for chunk, size, (cpu_rng, cuda_rng) in zip(cache.chunks, cache.sizes, cache.rng):
            with torch.random.fork_rng(devices=range(torch.cuda.device_count()) if cuda_rng is not None else []):
                torch.set_rng_state(cpu_rng)
                if cuda_rng is not None:
                    torch.cuda.set_rng_state_all(cuda_rng)
                with torch.enable_grad(), torch.autocast(device_type, dtype=dtype, enabled=enabled):
                    out = _as_tuple(cache.embed_fn(*chunk))
            pairs = [(o, g[start:start + size]) for o, g in zip(out, cached) if o.requires_grad]
            if pairs:
                # torch.autograd.grad, not backward: nothing is accumulated into .grad chunk by chunk, so each
                # parameter receives its whole gradient once, when this function returns (below), and
                # DistributedDataParallel's hook on it fires once per step, as after an ordinary backward
                grads = torch.autograd.grad([o for o, _ in pairs], params, [g.to(o.dtype) for o, g in pairs],
                                            allow_unused=True)
                total = _add(total, grads)
            start += size
        ctx.cache = cache.loss = cache.embeddings = cache.chunks = cache.params = None
        return (None, *total)


def grad_cache_loss(embed_fn: Callable[..., torch.Tensor | Sequence[torch.Tensor]],
                    loss_fn: Callable[..., torch.Tensor], inputs: Sequence[torch.Tensor], *, chunk_size: int,
                    params: Iterable[torch.Tensor]) -> torch.Tensor:
    r"""The full-batch contrastive loss, whose ``backward()`` runs GradCache's chunked backward.

    .. math::
        \frac{\partial L}{\partial\theta} = \sum_{c}\Big(\frac{\partial L}{\partial z_c}\Big)^{\!\top}
            \frac{\partial z_c}{\partial\theta},

    where :math:`z_c` are the embeddings of chunk c: the cached :math:`\partial L/\partial z` of the whole
    batch is back-propagated through each chunk's encoder pass in turn (Gao et al., 2021). Use it as
    the loss of :func:`mmalign.train.fit` (one process or several) or of a loop of your own::

        def step(model, batch):
            img, txt, ids = batch
            return grad_cache_loss(lambda i, t: model(i, t),
                                   lambda zi, zt: info_nce(zi, zt, temperature=0.07, ids=ids),
                                   (img, txt), chunk_size=256, params=model.parameters())

    **Under torch.distributed** (``fit`` under ``torchrun``), each process caches the chunks of its own
    part of the global batch and ``loss_fn`` gathers the embeddings, e.g.
    ``lambda zi, zt: dist.gathered_info_nce(zi, zt, temperature=0.07, ids=ids, local_loss=True)``: the
    cached gradients then hold every process's contribution (the all-gather's backward sums them) and
    the re-run of each chunk turns them into this process's parameter gradients. These are summed over
    the chunks without touching ``.grad`` (``torch.autograd.grad``) and handed to autograd once per
    parameter when the backward pass leaves this loss, so PyTorch's DistributedDataParallel, whose
    forward ``fit`` runs the loss through, sees one gradient per parameter and averages it across
    processes once, as after an ordinary backward (no ``no_sync`` is needed). Call the plain model in
    ``embed_fn`` (``fit`` passes it), not the DistributedDataParallel wrapper.

    Args:
        embed_fn: ``(*chunk) -> embedding tensor or tuple of them`` (e.g. ``(z_img, z_txt)``), run on
            slices of ``inputs``; it may draw random numbers (dropout): they are replayed.
        loss_fn: ``(*embeddings of the whole batch) -> scalar loss``; it may use parameters of its own
            (a learned temperature), whose gradients are accumulated too (they are found in its graph).
        inputs: tensors with the same first dimension B, cut into chunks of ``chunk_size`` rows.
        chunk_size: rows per encoder pass (>= 1); the last chunk may be shorter.
        params: the trained parameters of the encoders (the gradients reach them through this loss).

    Returns:
        The scalar loss of the whole batch (the value of ``loss_fn``); its ``backward()`` accumulates the
        full-batch gradient into every parameter in ``params`` reached by ``embed_fn`` and into every
        tensor that requires grad in ``loss_fn``'s graph. Call ``backward()`` once (the cache is freed).

    Raises:
        ValueError: bad inputs (chunk_size, inputs of different lengths, no trainable params, a loss
            that is not a scalar).
    """
    if not callable(embed_fn) or not callable(loss_fn):
        raise TypeError("embed_fn and loss_fn must be callables")
    chunk_size = check_int("chunk_size", chunk_size, minimum=1)
    inputs = tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)
    if not inputs or not all(isinstance(t, torch.Tensor) for t in inputs):
        raise ValueError("inputs must be a tensor or a non-empty tuple of tensors with one row per sample")
    n = inputs[0].shape[0]
    if n == 0 or any(t.shape[0] != n for t in inputs):
        raise ValueError(f"inputs need the same, non-zero first dimension, got {[tuple(t.shape) for t in inputs]}")
    seen, trained = set(), []
    for p in params:
        if isinstance(p, torch.Tensor) and p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            trained.append(p)
    if not trained:
        raise ValueError("params holds no tensor that requires grad: pass the trained parameters (model.parameters())")
    chunks = [tuple(t[s:s + chunk_size] for t in inputs) for s in range(0, n, chunk_size)]
    device_type = chunks[0][0].device.type
    autocast = (device_type, torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type))
    rng, parts = [], []
    with torch.no_grad():  # 1. embed chunk by chunk, no graph kept
        for chunk in chunks:
            rng.append((torch.get_rng_state(), torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None))
            parts.append(_as_tuple(embed_fn(*chunk)))
    n_out = len(parts[0])
    if any(len(p) != n_out for p in parts):
        raise ValueError("embed_fn returned a different number of tensors for different chunks")
    sizes = [p[0].shape[0] for p in parts]
    embeddings = [torch.cat([p[k] for p in parts]).detach().requires_grad_() for k in range(n_out)]
    with torch.enable_grad():  # 2. the loss of the whole batch on the cached embeddings, with its graph
        loss = loss_fn(*embeddings)
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        raise ValueError("loss_fn must return a scalar tensor (the loss of the whole batch)")
    # the tensors the loss trains itself (a learned temperature, a bias) get their gradients through this loss too
    trained += _loss_leaves(loss, [*embeddings, *trained])
    cache = _Cache(embed_fn, chunks, rng, sizes, embeddings, loss, autocast, trained)
    return _GradCache.apply(cache, *trained)
