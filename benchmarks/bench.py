"""`make bench`: mmalign against the libraries a researcher would pick instead, side by side, one run.

Every comparison uses the same inputs for every contender, checks that the results are equal before
timing anything, times the median of repeats (after a warm-up) and reports ``peer / ours`` (above 1:
ours is faster) and ``ours / floor`` where a plain-torch floor exists (the least work that computes
the same thing). Writes ``results/bench.json`` with the targets met or missed.

    pip install -e .[bench]          # pytorch-metric-learning, faiss-cpu, torch-optimizer, POT
    python benchmarks/bench.py       # or: make bench   (--quick: small sizes, a smoke test, not saved in results/)

Sections: InfoNCE (against PML's NTXentLoss and a two-cross-entropy floor), the bidirectional triplet
loss with the hardest negative (against PML's BatchHardMiner + TripletMarginLoss, and a floor),
Recall@1/5/10 both ways on a large gallery (against faiss IndexFlatIP top-k, and a chunked
matmul + top-k floor) with peak memory, a LAMB step on a 25M-parameter model (against
torch-optimizer's Lamb, and AdamW as the floor), a MoCo queue (against PML's CrossBatchMemory), and
Sinkhorn against POT through benchmarks/bench_sinkhorn.py when ``mmalign.ot`` and POT exist.
Not covered: triplet with *all* semi-hard triplets (mmalign mines one semi-hard negative per anchor,
PML all of them: different losses, nothing equal to compare).
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from mmalign.checks import disabled as checks_disabled
from mmalign.config import results_dir
from mmalign.losses import info_nce, triplet_loss
from mmalign.memory import MoCoQueue
from mmalign.miners import hardest_negatives
from mmalign.optim import LAMB
from mmalign.retrieval import recall_at_k

TARGET_PEER = 1.0  # ours at least as fast as every peer (peer / ours >= 1)
TARGET_FLOOR = 1.5  # and within 1.5x of the floor (ours / floor <= 1.5)


def forward_backward(fn, x0: torch.Tensor, y0: torch.Tensor):
    """A timed closure: the loss ``fn(x, y)`` and its backward on fresh leaf copies of x0, y0; returns
    (loss, grad of x) so that contenders can be checked equal before they are timed."""
    def go():
        x, y = x0.clone().requires_grad_(), y0.clone().requires_grad_()
        loss = fn(x, y)
        loss.backward()
        return loss.detach(), x.grad
    return go


def timed(fn, repeats: int) -> float:
    """Median seconds of ``repeats`` calls after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        gc.collect()
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def close(x, y, tol: float) -> float:
    """Max |x - y| (raises if above tol: a benchmark of different results means nothing)."""
    x, y = torch.as_tensor(x, dtype=torch.float64), torch.as_tensor(y, dtype=torch.float64)
    diff = float((x - y).abs().max())
    if not diff <= tol:
        raise AssertionError(f"results differ: max |difference| {diff:.3g} > {tol:.3g}")
    return diff


def row(ours_s: float, peers: dict, floor_s: float | None = None, **extra) -> dict:
    out = {"ours_s": ours_s, **{f"{k}_s": v for k, v in peers.items()}, **extra}
    for k, v in peers.items():
        if v is not None:
            out[f"{k}/ours"] = v / ours_s
    if floor_s is not None:
        out["floor_s"] = floor_s
        out["ours/floor"] = ours_s / floor_s
    misses = [f"slower than {k} ({v / ours_s:.2f})" for k, v in peers.items() if v is not None and v / ours_s < TARGET_PEER]
    if floor_s is not None and ours_s / floor_s > TARGET_FLOOR:
        misses.append(f"{ours_s / floor_s:.2f}x the floor")
    out["targets met"] = not misses
    if misses:
        out["missed"] = "; ".join(misses)
    return out


def show(name: str, r: dict) -> None:
    ratios = "  ".join(f"{k}={v:.2f}" for k, v in r.items() if "/" in k and isinstance(v, float))
    print(f"{name:<40} ours {r['ours_s'] * 1000:9.2f} ms  {ratios}  {'ok' if r['targets met'] else 'MISSED: ' + r['missed']}",
          flush=True)


# ---- InfoNCE ---------------------------------------------------------------------------------------


def bench_info_nce(sizes, dim: int, repeats: int, pml_max: int) -> dict:
    from pytorch_metric_learning.distances import CosineSimilarity
    from pytorch_metric_learning.losses import NTXentLoss

    out = {}
    for b in sizes:
        g = torch.Generator().manual_seed(b)
        x0, y0 = torch.randn(b, dim, generator=g), torch.randn(b, dim, generator=g)
        labels = torch.arange(b)
        tau = 0.07

        def run(fn, x0=x0, y0=y0):
            return forward_backward(fn, x0, y0)

        def ours(x, y):
            return info_nce(x, y, temperature=tau)

        def floor(x, y):
            logits = F.normalize(x, dim=1) @ F.normalize(y, dim=1).T / tau
            return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels))

        ntxent = NTXentLoss(temperature=tau, distance=CosineSimilarity())

        ref_labels = labels.clone()  # PML treats ref_labels *identical* to labels as self-pairs (diagonal dropped)

        def pml(x, y):  # anchors x against references y, then the other way: the symmetric loss
            return 0.5 * (ntxent(x, labels, ref_emb=y, ref_labels=ref_labels)
                          + ntxent(y, labels, ref_emb=x, ref_labels=ref_labels))

        ref_loss, ref_grad = run(floor)()
        l, gr = run(ours)()
        diff = max(close(l, ref_loss, 1e-5), close(gr, ref_grad, 1e-6))
        peers = {}
        if b <= pml_max:
            pl, pg = run(pml)()
            diff = max(diff, close(pl, ref_loss, 1e-4), close(pg, ref_grad, 1e-6))
            peers["pml_ntxent"] = timed(run(pml), repeats)
        else:
            peers["pml_ntxent"] = None
        with checks_disabled():
            ours_s = timed(run(ours), repeats)
        r = row(ours_s, peers, timed(run(floor), repeats), max_abs_diff=diff,
                ours_with_input_checks_s=timed(run(ours), repeats))
        if b > pml_max:
            r["pml_ntxent"] = f"not run: above --pml-max {pml_max} (its pair tables grow as B^3 in memory)"
        out[f"B={b}"] = r
        show(f"info_nce forward+backward B={b}", r)
    return out


# ---- triplet, hardest negative ---------------------------------------------------------------------


def bench_triplet_hardest(sizes, dim: int, repeats: int, margin: float = 0.2) -> dict:
    from pytorch_metric_learning.distances import CosineSimilarity
    from pytorch_metric_learning.losses import TripletMarginLoss
    from pytorch_metric_learning.miners import BatchHardMiner
    from pytorch_metric_learning.reducers import MeanReducer

    out = {}
    for b in sizes:
        g = torch.Generator().manual_seed(b)
        x0, y0 = torch.randn(b, dim, generator=g), torch.randn(b, dim, generator=g)
        ids = torch.arange(b)

        def run(fn, x0=x0, y0=y0):
            return forward_backward(fn, x0, y0)

        def ours(x, y):
            sim = F.normalize(x, dim=1) @ F.normalize(y, dim=1).T
            neg_i, neg_t = hardest_negatives(sim.detach(), ids=ids, k=1)
            return triplet_loss(sim, neg_i, neg_t, margin=margin)

        def floor(x, y):
            sim = F.normalize(x, dim=1) @ F.normalize(y, dim=1).T
            pos = sim.diagonal()
            off = sim.detach().clone()
            off.fill_diagonal_(float("-inf"))
            j, r = off.argmax(1), off.argmax(0)
            return 0.5 * (F.relu(margin - pos + sim[ids, j]).mean() + F.relu(margin - pos + sim[r, ids]).mean())

        dist, miner = CosineSimilarity(), BatchHardMiner(distance=CosineSimilarity())
        loss_fn = TripletMarginLoss(margin=margin, distance=dist, reducer=MeanReducer())

        ref = ids.clone()  # PML treats ref_labels *identical* to labels as self-pairs (diagonal dropped)

        def pml(x, y):
            t1 = miner(x, ids, y, ref)
            t2 = miner(y, ids, x, ref)
            return 0.5 * (loss_fn(x, ids, t1, y, ref) + loss_fn(y, ids, t2, x, ref))

        ref_loss, ref_grad = run(floor)()
        diff = 0.0
        for fn in (ours, pml):
            l, gr = run(fn)()
            diff = max(diff, close(l, ref_loss, 1e-5), close(gr, ref_grad, 1e-6))
        with checks_disabled():
            ours_s = timed(run(ours), repeats)
        r = row(ours_s, {"pml": timed(run(pml), repeats)}, timed(run(floor), repeats), max_abs_diff=diff,
                ours_with_input_checks_s=timed(run(ours), repeats))
        out[f"B={b}"] = r
        show(f"triplet hardest fwd+bwd B={b}", r)
    return out


# ---- recall on a large gallery ---------------------------------------------------------------------


def _peak_mb(fn) -> float:
    from mmalign.experiments.scaling import peak_memory_bytes

    return peak_memory_bytes(fn) / 2**20


def bench_recall(n_images: int, captions_per_image: int, dim: int, repeats: int, ks=(1, 5, 10)) -> dict:
    import faiss
    import numpy as np

    g = torch.Generator().manual_seed(0)
    img = F.normalize(torch.randn(n_images, dim, generator=g), dim=1)
    img_ids = torch.arange(n_images)
    txt_ids = torch.arange(n_images).repeat_interleave(captions_per_image)
    # noise 4x the signal: positives at cosine ~0.24 among 100k captions, so recall is far from 0 and from 1
    txt = F.normalize(img[txt_ids] + 4.0 * F.normalize(torch.randn(len(txt_ids), dim, generator=g), dim=1), dim=1)
    kmax = max(ks)

    def from_topk(top, q_ids, g_ids):  # (Q, kmax) gallery indices -> recall@k
        hit = g_ids[top] == q_ids[:, None]
        return {k: float(hit[:, :k].any(1).float().mean()) for k in ks}

    def ours():
        return (recall_at_k(img, txt, img_ids, txt_ids, ks, normalize=False),
                recall_at_k(txt, img, txt_ids, img_ids, ks, normalize=False))

    def floor(chunk=1024):
        def topk(q, gal):
            return torch.cat([torch.topk(q[s:s + chunk] @ gal.T, kmax, dim=1).indices for s in range(0, len(q), chunk)])
        return from_topk(topk(img, txt), img_ids, txt_ids), from_topk(topk(txt, img), txt_ids, img_ids)

    faiss.omp_set_num_threads(torch.get_num_threads())
    x_img, x_txt = img.numpy(), txt.numpy()

    def peer():
        it, ti = faiss.IndexFlatIP(dim), faiss.IndexFlatIP(dim)
        it.add(x_txt)
        ti.add(x_img)
        _, top_i2t = it.search(x_img, kmax)
        _, top_t2i = ti.search(x_txt, kmax)
        return (from_topk(torch.from_numpy(top_i2t.astype(np.int64)), img_ids, txt_ids),
                from_topk(torch.from_numpy(top_t2i.astype(np.int64)), txt_ids, img_ids))

    results = {"ours": ours(), "faiss": peer(), "floor": floor()}
    diff = max(abs(results[n][d][k] - results["floor"][d][k]) for n in ("ours", "faiss") for d in (0, 1) for k in ks)
    if diff > 1e-4:  # random float data: no ties, so expected recall = top-k recall
        raise AssertionError(f"recalls differ by {diff}: {results}")
    with checks_disabled():
        ours_s = timed(ours, repeats)
        ours_mb = _peak_mb(ours)
    r = row(ours_s, {"faiss": timed(peer, repeats)}, timed(floor, repeats), max_abs_diff=diff,
            ours_peak_MB=ours_mb, floor_peak_MB=_peak_mb(floor),
            recall={"i2t": results["ours"][0], "t2i": results["ours"][1]})
    r["peak under 2 GB"] = ours_mb < 2048
    if not r["targets met"]:
        r["why"] = ("ours is at the floor (one matmul and one top-k per chunk of queries, in torch); faiss's "
                    "flat search fuses the top-k into its blocked inner-product kernel in C++")
    show(f"recall@1/5/10 both ways {n_images}x{n_images * captions_per_image}", r)
    return {f"{n_images} images x {n_images * captions_per_image} captions": r}


# ---- LAMB ------------------------------------------------------------------------------------------


def _model(width: int, depth: int) -> torch.nn.Module:
    torch.manual_seed(0)
    layers = [torch.nn.Linear(width, width) for _ in range(depth)]
    model = torch.nn.Sequential(*layers)
    with torch.no_grad():
        for p in model.parameters():  # keep every layer's norm below torch-optimizer's clamp of 10
            p.mul_(0.2)
    return model


def bench_lamb(width: int, depth: int, repeats: int) -> dict:
    import torch_optimizer

    def make(kind):
        model = _model(width, depth)
        g = torch.Generator().manual_seed(1)
        for p in model.parameters():
            p.grad = torch.randn(p.shape, generator=g) * 1e-2
        if kind == "ours":
            opt = LAMB(model.parameters(), lr=1e-3, weight_decay=0.01, bias_correction=False)
        elif kind == "torch_optimizer":
            opt = torch_optimizer.Lamb(model.parameters(), lr=1e-3, weight_decay=0.01, eps=1e-6, debias=False)
        else:
            opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01, eps=1e-6)
        return model, opt

    n_params = sum(p.numel() for p in _model(width, depth).parameters())
    states = {}
    for kind in ("ours", "torch_optimizer"):
        model, opt = make(kind)
        for _ in range(3):
            opt.step()
        states[kind] = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    diff = close(states["ours"], states["torch_optimizer"], 1e-6)
    times = {}
    for kind in ("ours", "torch_optimizer", "adamw"):
        _, opt = make(kind)
        times[kind] = timed(opt.step, repeats)
    r = row(times["ours"], {"torch_optimizer": times["torch_optimizer"]}, times["adamw"], max_abs_diff=diff,
            parameters=n_params)
    if not r["targets met"]:
        r["why"] = ("torch-optimizer folds the weight decay and the step into fused `add_(x, alpha=...)` calls; "
                    "ours keeps two separate multiplications so that the update is bit-identical to the "
                    "written-out formula (tests/test_dist.py), one extra pass over each parameter")
    show(f"LAMB step, {n_params / 1e6:.1f}M parameters", r)
    return {f"{n_params / 1e6:.1f}M parameters": r}


# ---- queue -----------------------------------------------------------------------------------------


def bench_queue(size: int, dim: int, batch: int, steps: int, repeats: int) -> dict:
    from pytorch_metric_learning.losses import ContrastiveLoss, CrossBatchMemory

    g = torch.Generator().manual_seed(0)
    keys = torch.randn(steps, batch, dim, generator=g)
    ids = torch.randint(0, 10_000, (steps, batch), generator=g)

    def ours():
        q = MoCoQueue(size, dim)
        for t in range(steps):
            q.enqueue(keys[t], ids[t])
            read = q.keys
        return q.keys, q.ids, read

    def peer():
        m = CrossBatchMemory(ContrastiveLoss(), dim, memory_size=size)
        for t in range(steps):
            m.add_to_memory(keys[t], ids[t], batch)
            read = m.embedding_memory if m.has_been_filled else m.embedding_memory[:m.queue_idx]
        return m.embedding_memory, m.label_memory, read

    (ok, oi, _), (pk, pi, _) = ours(), peer()
    diff = close(ok, pk, 0.0)
    if not torch.equal(oi, pi):
        raise AssertionError("queue ids differ")
    with checks_disabled():
        ours_s = timed(ours, repeats)
    r = row(ours_s, {"pml_crossbatchmemory": timed(peer, repeats)}, max_abs_diff=diff,
            note=f"{steps} enqueues of {batch} keys and a read after each")
    show(f"queue {size}x{dim}", r)
    return {f"{size} x {dim}, batch {batch}": r}


# ---- Sinkhorn (benchmarks/bench_sinkhorn.py, owned by chapter 8) ---------------------------------------


def bench_sinkhorn(quick: bool) -> dict:
    script = Path(__file__).with_name("bench_sinkhorn.py")
    try:
        import mmalign.ot  # noqa: F401
        import ot  # noqa: F401
    except ImportError as err:
        return {"skipped": f"needs mmalign.ot and POT: {err}"}
    args = [sys.executable, str(script)] + (["--n", "512", "--k", "128", "--repeats", "2"] if quick else [])
    done = subprocess.run(args, capture_output=True, text=True)
    if done.returncode != 0:
        return {"failed": done.stderr[-2000:]}
    r = json.loads((results_dir() / "bench_sinkhorn.json").read_text())
    ratio = r.get("ratio_pot_torch_over_ours")
    print(f"{'sinkhorn (bench_sinkhorn.py)':<40} ours {r['ours_s'] * 1000:9.2f} ms  pot_torch/ours={ratio:.2f}", flush=True)
    return {"see": "results/bench_sinkhorn.json", **r}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes: a smoke test of the script")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--pml-max", type=int, default=256, help="largest B for PML's NTXentLoss (memory)")
    parser.add_argument("--only", default=None, help="comma-separated sections to run")
    parser.add_argument("--out", default=None, help="default: results/bench.json (with --quick: a temporary file)")
    args = parser.parse_args(argv)
    try:
        import faiss  # noqa: F401
        import pytorch_metric_learning  # noqa: F401
        import torch_optimizer  # noqa: F401
    except ImportError as err:
        raise SystemExit(f"{err.name} is missing: pip install -e .[bench]") from None
    torch.set_num_threads(args.threads)
    quick = args.quick
    repeats = args.repeats or (2 if quick else 5)
    sections = {
        "info_nce": lambda: bench_info_nce((256, 1024) if quick else (256, 1024, 4096), 256, repeats,
                                           min(args.pml_max, 256) if quick else args.pml_max),
        "triplet_hardest": lambda: bench_triplet_hardest((256, 1024) if quick else (1024, 4096), 256, repeats),
        "recall": lambda: bench_recall(1000 if quick else 20_000, 5, 256, max(1, repeats // 2) if not quick else 1),
        "lamb": lambda: bench_lamb(1024 if quick else 2048, 2 if quick else 6, repeats),
        "queue": lambda: bench_queue(4096 if quick else 65_536, 256, 256, 64 if quick else 512, repeats),
        "sinkhorn": lambda: bench_sinkhorn(quick),
    }
    chosen = args.only.split(",") if args.only else list(sections)
    unknown = [name for name in chosen if name not in sections]
    if unknown:
        parser.error(f"unknown section(s) {unknown} in --only; choose from {', '.join(sections)}")
    out = {"date": datetime.date.today().isoformat(), "quick": quick, "repeats": repeats, "threads": args.threads,
           "machine": f"{platform.system()} {platform.machine()}, {torch.get_num_threads()} torch thread(s)",
           "torch": torch.__version__, "versions": _versions(),
           "targets": f"peer/ours >= {TARGET_PEER} for every peer, ours/floor <= {TARGET_FLOOR}",
           "results": {}}
    import tempfile

    path = Path(args.out) if args.out else (Path(tempfile.gettempdir()) / "bench_quick.json" if quick
                                            else results_dir() / "bench.json")
    if args.only and path.exists():  # rerun some sections: keep the others of the existing file
        previous = json.loads(path.read_text())
        rerun = {**previous.get("sections_rerun", {}), **{name: {"date": out["date"], "repeats": repeats}
                                                         for name in chosen}}
        out = {**previous, "sections_rerun": rerun}
    for name in chosen:
        out["results"][name] = sections[name]()
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {path}")


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("pytorch-metric-learning", "faiss-cpu", "torch-optimizer", "POT"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


if __name__ == "__main__":
    main()
