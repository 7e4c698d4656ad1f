"""Chapter 9's multi-process worker: ``torchrun --nproc_per_node=2 -m mmalign.experiments.scaling_worker --out DIR``.

Every process loads the cached features of the profile (``MMALIGN_PROFILE``), then

1. trains the chapter-2 dual encoder twice with the same global batch, seed and budget through
   :func:`mmalign.recipes.train_dual_encoder` (so through :func:`mmalign.train.fit`, which shards the
   batches and averages the gradients through DistributedDataParallel): once with **local** negatives (each process's InfoNCE sees
   only its own B/W pairs) and once with **gathered** negatives (:func:`mmalign.dist.gathered_info_nce`);
2. times communication against compute for a few local batch sizes: the all-gather of the
   embeddings (forward and its backward all-reduce), the all-reduce of the heads' gradients, and the
   forward + backward of one step.

Rank 0 writes ``DIR/summary.json`` (test recalls, loss curves, timings) and the two trained state
dicts ``DIR/{local,gathered}.pt``; the notebook compares them with one-process runs.

``--memory SIZES`` instead measures, for each global batch B of ``SIZES`` (comma-separated), the peak
memory of one forward and backward pass of :func:`mmalign.dist.gathered_info_nce` on every process, in
the global form and with ``local_loss=True``, and how far the two forms' gradients differ; rank 0
writes ``DIR/memory.json`` (see :func:`loss_memory`).

``--check FILE::FUNCTION`` instead checks a student's loss ``FUNCTION(a, b, temperature)`` (lab 9)
on a fixed float64 batch: rank 0 writes ``DIR/check.pt`` with the mean of the ranks' losses and the
gradient of the global loss with respect to every row (see :func:`check_loss`).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from .. import dist
from ..config import load_config
from ..losses import info_nce

TEMPERATURE = 0.07


def local_pair_loss(zi, zt, ids):
    """InfoNCE over this process's pairs only (the negatives of B/W rows)."""
    return info_nce(zi, zt, temperature=TEMPERATURE, ids=ids)


def gathered_pair_loss(zi, zt, ids):
    """InfoNCE over the whole global batch, gathered across processes."""
    return dist.gathered_info_nce(zi, zt, temperature=TEMPERATURE, ids=ids)


def _median_ms(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats + 1):
        dist.barrier()
        start = time.perf_counter()
        fn()
        times.append(1000 * (time.perf_counter() - start))
    return statistics.median(times[1:])  # the first call warms up


def comm_vs_compute(model, d_img: int, d_txt: int, sizes, repeats: int = 10) -> dict:
    """Median milliseconds per step part, for each local batch size n (the same on every rank)."""
    out = {}
    params = list(model.parameters())
    for n in sizes:
        g = torch.Generator().manual_seed(dist.rank())
        img, txt = torch.randn(n, d_img, generator=g), torch.randn(n, d_txt, generator=g)
        ids = dist.rank_offset_labels(n)

        def compute():
            model.zero_grad(set_to_none=True)
            zi, zt = model(img, txt)
            info_nce(zi, zt, temperature=TEMPERATURE, ids=ids).backward()

        with torch.no_grad():
            zi, zt = model(img, txt)
        emb = zi.detach().requires_grad_()

        def gather():
            dist.all_gather(emb).sum().backward()  # forward all-gather + backward all-reduce

        def reduce_grads():  # what DDP's buckets carry: every gradient, summed over ranks (one flat buffer)
            flat = torch.cat([p.grad.reshape(-1) for p in params if p.grad is not None])
            if dist.is_distributed():
                torch.distributed.all_reduce(flat)

        compute()
        out[str(n)] = {"compute (forward + backward)": _median_ms(compute, repeats),
                       "all-gather embeddings (+ its backward)": _median_ms(gather, repeats),
                       "all-reduce gradients": _median_ms(reduce_grads, repeats)}
    return out


def logits_bytes(batch: int, world: int, local_loss: bool, itemsize: int = 4) -> int:
    """Bytes of the similarity logits one process holds for a global batch of ``batch`` pairs on ``world``
    processes: the global form scores the gathered B x B matrix (its transpose, for the other direction,
    is a view), the local form its n = B/W rows of each view against the B gathered columns of the other,
    2 x n x B numbers (open_clip's ``ClipLoss(local_loss=True)``). In one process both forms are the
    plain B x B loss."""
    for name, value in (("batch", batch), ("world", world), ("itemsize", itemsize)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if batch % world:
        raise ValueError(f"batch ({batch}) must be divisible by world ({world})")
    n = batch // world
    return (2 * n * batch if local_loss and world > 1 else batch * batch) * itemsize


def loss_memory(sizes, dim: int = 128, temperature: float = TEMPERATURE, seed: int = 0) -> dict:
    """Peak memory of one forward + backward of the gathered InfoNCE on this process, global form against
    ``local_loss=True``, for each global batch B in ``sizes`` (n = B / W rows on each process).

    The embeddings are random (n, dim) float32 leaves, different on every rank. Peak bytes come from
    :func:`mmalign.experiments.scaling.peak_memory_bytes` (the torch profiler's allocation timeline on
    CPU, CUDA's counter on a GPU), after one unmeasured warm-up call of each form. The two forms'
    gradients with respect to this rank's embeddings are compared (they must be equal: the all-gather's
    backward sums every rank's contribution). Returns ``{str(B): {column: value}}`` with the largest
    value over ranks of every column.
    """
    from .scaling import peak_memory_bytes

    out = {}
    w = dist.world_size()
    for batch in sizes:
        n = batch // w
        g = torch.Generator().manual_seed(seed * 1000 + dist.rank())
        a0, b0 = torch.randn(n, dim, generator=g), torch.randn(n, dim, generator=g)
        row, grads = {}, {}
        for name, local in (("global", False), ("local", True)):
            a, b = a0.clone().requires_grad_(), b0.clone().requires_grad_()

            def step():
                dist.gathered_info_nce(a, b, temperature=temperature, local_loss=local).backward()

            step()  # warm-up: one-time allocations are not the loss's
            a.grad = b.grad = None
            row[f"{name}: peak MB"] = peak_memory_bytes(step) / 2**20
            row[f"{name}: logits MB"] = logits_bytes(batch, w, local) / 2**20
            grads[name] = torch.cat([a.grad, b.grad])
        row["max |gradient difference|"] = float((grads["global"] - grads["local"]).abs().max())
        row["max |gradient|"] = float(grads["global"].abs().max())
        values = torch.tensor(list(row.values()), dtype=torch.float64)
        if dist.is_distributed():
            torch.distributed.all_reduce(values, op=torch.distributed.ReduceOp.MAX)
        out[str(batch)] = dict(zip(row, values.tolist()))
    return out


def check_batch(n: int = 16, dim: int = 6, seed: int = 0):
    """The fixed float64 batch of the lab check: (n, dim) image and caption embeddings."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, dim, generator=g, dtype=torch.float64), torch.randn(n, dim, generator=g, dtype=torch.float64)


def check_loss(loss_fn, temperature: float = 0.1) -> dict:
    """Run ``loss_fn(a_local, b_local, temperature)`` on this rank's rows of :func:`check_batch`.

    The global loss is the mean of the ranks' losses (what averaging gradients optimises), so the
    gradient of the global loss with respect to this rank's rows is this rank's ``.grad`` divided by
    the world size (the all-gather's backward already summed every rank's contribution). Returns the
    global loss and the full (n, dim) gradients, gathered in rank order, on every rank.
    """
    a_all, b_all = check_batch()
    n = a_all.shape[0] // dist.world_size()
    rows = slice(dist.rank() * n, (dist.rank() + 1) * n)
    a, b = a_all[rows].clone().requires_grad_(), b_all[rows].clone().requires_grad_()
    loss = loss_fn(a, b, temperature)
    loss.backward()
    w = dist.world_size()
    return {"loss": float(dist.all_reduce_mean(loss.detach())),
            "grad_a": dist.all_gather_ids(a.grad / w), "grad_b": dist.all_gather_ids(b.grad / w)}


def _load_function(spec: str):
    import importlib.util

    path, _, name = spec.partition("::")
    module_spec = importlib.util.spec_from_file_location("lab_loss", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return getattr(module, name)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="folder for summary.json and the state dicts (rank 0)")
    parser.add_argument("--epochs", type=int, default=None, help="default: the profile's")
    parser.add_argument("--batch-size", type=int, default=None, help="global batch (default: the profile's)")
    parser.add_argument("--sizes", default="64,256,1024", help="local batch sizes of the timing")
    parser.add_argument("--check", default=None, help="FILE::FUNCTION: check a loss function (lab 9)")
    parser.add_argument("--memory", default=None, help="global batch sizes: peak memory of local vs global loss")
    parser.add_argument("--dim", type=int, default=128, help="embedding width of --memory")
    args = parser.parse_args(argv)

    dist.init()  # gloo on CPU, NCCL on CUDA; a plain `python -m` run is one process
    if args.check:
        torch.set_num_threads(1)
        result = check_loss(_load_function(args.check))
        if dist.is_main():
            Path(args.out).mkdir(parents=True, exist_ok=True)
            torch.save(result, Path(args.out) / "check.pt")
        dist.barrier()
        dist.cleanup()
        return
    if args.memory:
        torch.set_num_threads(1)
        result = {"world_size": dist.world_size(), "dim": args.dim,
                  "sizes": loss_memory([int(s) for s in args.memory.split(",")], args.dim)}
        if dist.is_main():
            Path(args.out).mkdir(parents=True, exist_ok=True)
            (Path(args.out) / "memory.json").write_text(json.dumps(result, indent=1))
        dist.barrier()
        dist.cleanup()
        return
    cfg = load_config()
    torch.set_num_threads(cfg.num_threads or 1)
    from ..data.features import scene_features
    from ..recipes import evaluate, train_dual_encoder

    train, test = scene_features("train", cfg, progress=False), scene_features("test", cfg, progress=False)
    summary = {"world_size": dist.world_size(), "backend": torch.distributed.get_backend()
               if dist.is_distributed() else "none", "batch_size": args.batch_size or cfg.batch_size,
               "epochs": args.epochs or cfg.epochs, "runs": {}}
    out = Path(args.out)
    for name, loss in (("local", local_pair_loss), ("gathered", gathered_pair_loss)):
        start = time.perf_counter()
        model, history = train_dual_encoder(train, None, cfg, loss, epochs=args.epochs, batch_size=args.batch_size,
                                            progress=False)
        seconds = time.perf_counter() - start
        if dist.is_main():
            summary["runs"][name] = {"test": evaluate(model, test), "loss": history.loss, "seconds": seconds}
            out.mkdir(parents=True, exist_ok=True)
            torch.save(model.state_dict(), out / f"{name}.pt")
    sizes = [int(s) for s in args.sizes.split(",")]
    summary["timing_ms"] = comm_vs_compute(model, train.image.shape[1], train.text.shape[1], sizes)
    if dist.is_main():
        (out / "summary.json").write_text(json.dumps(summary, indent=1))
    dist.barrier()
    dist.cleanup()


if __name__ == "__main__":
    main()
