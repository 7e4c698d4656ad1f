"""`make bench`: mmalign against the libraries a researcher would pick instead, side by side, one run.

Every comparison gives every contender the same inputs (built from the same seeds), checks that the
results are equal before it reports a time, times the median of repeats after a warm-up, and reports
``peer / ours`` (above 1: ours is faster) and ``ours / floor`` where a plain-torch floor exists (the
least torch work that computes the same thing). Writes ``results/bench.json`` with the targets met or
missed, and the measured reason where one is missed.

**One process per contender.** Each contender of each comparison runs in a fresh Python process,
so that no library's thread pool or allocator state slows another's: faiss-cpu ships its own OpenMP
runtime, and in one process with torch it slowed torch's small operations up to 80x on a 2-core
machine. The parent process only compares the saved results and writes the table.

    pip install -e .[bench]          # pytorch-metric-learning, faiss-cpu, torch-optimizer, POT
    python benchmarks/bench.py       # or: make bench   (--quick: small sizes, a smoke test, not saved in results/)

Sections: InfoNCE (PML's NTXentLoss), the bidirectional triplet loss with the hardest negative (PML's
BatchHardMiner + TripletMarginLoss) and with *all* semi-hard triplets (PML's TripletMarginMiner
"semihard" + TripletMarginLoss), Recall@1/5/10 both ways (faiss IndexFlatIP top-k) with peak memory,
a LAMB step on a 25M-parameter model (torch-optimizer's Lamb), a MoCo queue (PML's CrossBatchMemory),
and Sinkhorn against POT (benchmarks/bench_sinkhorn.py). ``ours`` runs with the input checks' element
scans off (``mmalign.checks.disabled()``, as in a hot loop); its time with the checks on is reported
beside it.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

TARGET_PEER = 1.0  # ours at least as fast as every peer (peer / ours >= 1)
TARGET_FLOOR = 1.5  # and within 1.5x of the floor (ours / floor <= 1.5)


# ---- helpers run inside a worker ------------------------------------------------------------------


def timed(fn, repeats: int, warm_up: bool = True) -> float:
    """Median seconds of ``repeats`` calls (after one warm-up call unless the caller just made one)."""
    if warm_up:
        fn()
    times = []
    for _ in range(repeats):
        gc.collect()
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def forward_backward(fn, x0: torch.Tensor, y0: torch.Tensor):
    """The loss ``fn(x, y)`` and its backward on fresh leaf copies of x0, y0; returns {loss, grad of x}."""
    def go():
        x, y = x0.clone().requires_grad_(), y0.clone().requires_grad_()
        loss = fn(x, y)
        loss.backward()
        return {"loss": loss.detach(), "grad": x.grad}
    return go


def pair(b: int, dim: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, dim, generator=g), torch.randn(b, dim, generator=g)


# ---- contenders: each builder returns (result_fn, timed_fn) -------------------------------------------
# result_fn() gives the values checked for equality (a dict of tensors / floats); timed_fn is what is timed.


def info_nce_contender(name: str, p: dict):
    x0, y0 = pair(p["B"], p["dim"], p["B"])
    tau, labels = 0.07, torch.arange(p["B"])
    if name == "ours":
        from mmalign.losses import info_nce

        def fn(x, y):
            return info_nce(x, y, temperature=tau)
    elif name == "floor":
        def fn(x, y):
            logits = F.normalize(x, dim=1) @ F.normalize(y, dim=1).T / tau
            return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels))
    else:  # pml: anchors x against references y, then the other way (the symmetric loss)
        from pytorch_metric_learning.distances import CosineSimilarity
        from pytorch_metric_learning.losses import NTXentLoss

        ntxent, ref_labels = NTXentLoss(temperature=tau, distance=CosineSimilarity()), labels.clone()
        # (PML treats ref_labels *identical* to labels as self-pairs and drops the diagonal)

        def fn(x, y):
            return 0.5 * (ntxent(x, labels, ref_emb=y, ref_labels=ref_labels)
                          + ntxent(y, labels, ref_emb=x, ref_labels=ref_labels))
    go = forward_backward(fn, x0, y0)
    return go, go


def triplet_hardest_contender(name: str, p: dict, margin: float = 0.2):
    x0, y0 = pair(p["B"], p["dim"], p["B"])
    ids = torch.arange(p["B"])
    if name == "ours":
        from mmalign.losses import triplet_loss
        from mmalign.miners import hardest_negatives

        def fn(x, y):
            sim = F.normalize(x, dim=1) @ F.normalize(y, dim=1).T
            neg_i, neg_t = hardest_negatives(sim.detach(), ids=ids, k=1)
            return triplet_loss(sim, neg_i, neg_t, margin=margin)
    elif name == "floor":
        def fn(x, y):
            sim = F.normalize(x, dim=1) @ F.normalize(y, dim=1).T
            pos, off = sim.diagonal(), sim.detach().clone()
            off.fill_diagonal_(float("-inf"))
            j, r = off.argmax(1), off.argmax(0)
            return 0.5 * (F.relu(margin - pos + sim[ids, j]).mean() + F.relu(margin - pos + sim[r, ids]).mean())
    else:
        from pytorch_metric_learning.distances import CosineSimilarity
        from pytorch_metric_learning.losses import TripletMarginLoss
        from pytorch_metric_learning.miners import BatchHardMiner
        from pytorch_metric_learning.reducers import MeanReducer

        miner = BatchHardMiner(distance=CosineSimilarity())
        loss_fn = TripletMarginLoss(margin=margin, distance=CosineSimilarity(), reducer=MeanReducer())
        ref = ids.clone()

        def fn(x, y):
            t1, t2 = miner(x, ids, y, ref), miner(y, ids, x, ref)
            return 0.5 * (loss_fn(x, ids, t1, y, ref) + loss_fn(y, ids, t2, x, ref))
    go = forward_backward(fn, x0, y0)
    return go, go


def triplet_semihard_contender(name: str, p: dict, margin: float = 0.2):
    """The mean hinge over *all* semi-hard triplets of both directions (s_pos - m < s_neg < s_pos)."""
    x0, y0 = pair(p["B"], p["dim"], p["B"])
    ids = torch.arange(p["B"])
    if name == "ours":
        from mmalign.losses import triplet_loss
        from mmalign.miners import semi_hard_negatives

        def fn(x, y):
            sim = F.normalize(x, dim=1) @ F.normalize(y, dim=1).T
            neg_i, neg_t = semi_hard_negatives(sim.detach(), margin=margin, k=None, fallback="none")
            return triplet_loss(sim, neg_i, neg_t, margin=margin)
    elif name == "floor":
        def fn(x, y):
            sim = F.normalize(x, dim=1) @ F.normalize(y, dim=1).T
            pos, s = sim.diagonal(), sim.detach()
            p_, off = pos.detach(), ~torch.eye(len(ids), dtype=torch.bool)
            win_i = off & (s < p_[:, None]) & (s > p_[:, None] - margin)
            win_t = off & (s < p_[None, :]) & (s > p_[None, :] - margin)
            total = ((margin - pos[:, None] + sim) * win_i).sum() + ((margin - pos[None, :] + sim) * win_t).sum()
            return total / (win_i.sum() + win_t.sum())
    else:  # PML: the miner's triplets of each direction, summed, over the number of triplets of both
        from pytorch_metric_learning.distances import CosineSimilarity
        from pytorch_metric_learning.losses import TripletMarginLoss
        from pytorch_metric_learning.miners import TripletMarginMiner
        from pytorch_metric_learning.reducers import SumReducer

        miner = TripletMarginMiner(margin=margin, type_of_triplets="semihard", distance=CosineSimilarity())
        loss_fn = TripletMarginLoss(margin=margin, distance=CosineSimilarity(), reducer=SumReducer())
        ref = ids.clone()

        def fn(x, y):
            t1, t2 = miner(x, ids, y, ref), miner(y, ids, x, ref)
            total = loss_fn(x, ids, t1, y, ref) + loss_fn(y, ids, t2, x, ref)
            return total / (len(t1[0]) + len(t2[0]))
    go = forward_backward(fn, x0, y0)
    return go, go


def _recall_data(p: dict):
    g = torch.Generator().manual_seed(0)
    n, dim = p["images"], p["dim"]
    img = F.normalize(torch.randn(n, dim, generator=g), dim=1)
    img_ids = torch.arange(n)
    txt_ids = torch.arange(n).repeat_interleave(p["captions_per_image"])
    # noise 4x the signal: positives at cosine ~0.24 among the captions, so recall is far from 0 and from 1
    txt = F.normalize(img[txt_ids] + 4.0 * F.normalize(torch.randn(len(txt_ids), dim, generator=g), dim=1), dim=1)
    return img, txt, img_ids, txt_ids


def recall_contender(name: str, p: dict, ks=(1, 5, 10)):
    img, txt, img_ids, txt_ids = _recall_data(p)
    kmax = max(ks)

    def from_topk(top, q_ids, g_ids):  # (Q, kmax) gallery indices -> recall@k
        hit = g_ids[top] == q_ids[:, None]
        return {f"R@{k}": float(hit[:, :k].any(1).float().mean()) for k in ks}

    if name == "ours":
        from mmalign.retrieval import retrieval_report

        def go():
            report = retrieval_report(img, txt, img_ids, txt_ids, ks)
            return {key: v for key, v in report.items() if key != "rsum"}
    elif name == "floor":  # chunked matmul + top-k per direction: the plain-torch computation
        def topk(q, gal, chunk=1024):
            return torch.cat([torch.topk(q[s:s + chunk] @ gal.T, kmax, dim=1).indices for s in range(0, len(q), chunk)])

        def go():
            i2t, t2i = from_topk(topk(img, txt), img_ids, txt_ids), from_topk(topk(txt, img), txt_ids, img_ids)
            return {**{f"i2t_{k}": v for k, v in i2t.items()}, **{f"t2i_{k}": v for k, v in t2i.items()}}
    elif name == "gemm":  # the similarity matrix alone, both directions, no ranking: a bound, not a result
        def go(chunk=1024):
            for q, gal in ((img, txt), (txt, img)):
                for s in range(0, len(q), chunk):
                    q[s:s + chunk] @ gal.T
            return {}
    else:  # faiss: an exact inner-product index per direction, top-k search
        import faiss
        import numpy as np

        faiss.omp_set_num_threads(torch.get_num_threads())
        x_img, x_txt = img.numpy(), txt.numpy()

        def go():
            it, ti = faiss.IndexFlatIP(x_img.shape[1]), faiss.IndexFlatIP(x_img.shape[1])
            it.add(x_txt)
            ti.add(x_img)
            _, top_i2t = it.search(x_img, kmax)
            _, top_t2i = ti.search(x_txt, kmax)
            i2t = from_topk(torch.from_numpy(top_i2t.astype(np.int64)), img_ids, txt_ids)
            t2i = from_topk(torch.from_numpy(top_t2i.astype(np.int64)), txt_ids, img_ids)
            return {**{f"i2t_{k}": v for k, v in i2t.items()}, **{f"t2i_{k}": v for k, v in t2i.items()}}
    return go, go


def _lamb_model(width: int, depth: int) -> torch.nn.Module:
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(depth)])
    with torch.no_grad():
        for q in model.parameters():  # keep every layer's norm below torch-optimizer's clamp of 10
            q.mul_(0.2)
    return model


def lamb_contender(name: str, p: dict):
    def make():
        model = _lamb_model(p["width"], p["depth"])
        g = torch.Generator().manual_seed(1)
        for q in model.parameters():
            q.grad = torch.randn(q.shape, generator=g) * 1e-2
        if name == "ours":
            from mmalign.optim import LAMB

            opt = LAMB(model.parameters(), lr=1e-3, weight_decay=0.01, bias_correction=False)
        elif name == "torch_optimizer":
            import torch_optimizer

            opt = torch_optimizer.Lamb(model.parameters(), lr=1e-3, weight_decay=0.01, eps=1e-6, debias=False)
        else:  # floor: AdamW's for-loop step (Adam + decoupled decay, no layer-wise trust ratio)
            opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01, eps=1e-6, foreach=False)
        return model, opt

    def result():
        model, opt = make()
        for _ in range(3):
            opt.step()
        flat = torch.cat([q.detach().reshape(-1) for q in model.parameters()])
        return {"params": flat, "parameters": len(flat)}
    _, opt = make()
    return result, opt.step


def queue_contender(name: str, p: dict):
    g = torch.Generator().manual_seed(0)
    keys = torch.randn(p["steps"], p["batch"], p["dim"], generator=g)
    ids = torch.randint(0, 10_000, (p["steps"], p["batch"]), generator=g)
    if name == "ours":
        from mmalign.memory import MoCoQueue

        def go():
            q = MoCoQueue(p["size"], p["dim"])
            for t in range(p["steps"]):
                q.enqueue(keys[t], ids[t])
                read = q.keys
            return {"keys": q.keys, "ids": q.ids, "read": read}
    else:
        from pytorch_metric_learning.losses import ContrastiveLoss, CrossBatchMemory

        def go():
            m = CrossBatchMemory(ContrastiveLoss(), p["dim"], memory_size=p["size"])
            for t in range(p["steps"]):
                m.add_to_memory(keys[t], ids[t], p["batch"])
                read = m.embedding_memory if m.has_been_filled else m.embedding_memory[:m.queue_idx]
            return {"keys": m.embedding_memory, "ids": m.label_memory, "read": read}
    return go, go


# ---- sections -------------------------------------------------------------------------------------
# contenders: the first is ours; "floor" (if any) is the reference for equality, else ours is.
# tol: the largest |difference| from the reference allowed per contender (a benchmark of different
# results means nothing).

SECTIONS = {
    "info_nce": dict(build=info_nce_contender, contenders=("ours", "floor", "pml_ntxent"),
                     tol={"ours": 1e-5, "pml_ntxent": 1e-4},
                     cases=lambda quick: [dict(B=b, dim=256) for b in ((256, 1024) if quick else (256, 1024, 4096))],
                     label=lambda p: f"B={p['B']}", checks=True),
    "triplet_hardest": dict(build=triplet_hardest_contender, contenders=("ours", "floor", "pml"),
                            tol={"ours": 1e-5, "pml": 1e-5},
                            cases=lambda quick: [dict(B=b, dim=256) for b in ((256, 1024) if quick else (1024, 4096))],
                            label=lambda p: f"B={p['B']}", checks=True),
    "triplet_semihard": dict(build=triplet_semihard_contender, contenders=("ours", "floor", "pml"),
                             tol={"ours": 1e-5, "pml": 1e-5},
                             cases=lambda quick: [dict(B=b, dim=256) for b in ((256,) if quick else (1024, 4096))],
                             label=lambda p: f"B={p['B']}, all semi-hard triplets", checks=True),
    "recall": dict(build=recall_contender, contenders=("ours", "floor", "faiss", "gemm"),
                   tol={"ours": 1e-4, "faiss": 1e-4},
                   cases=lambda quick: ([dict(images=200, captions_per_image=5, dim=64)] if quick else
                                        [dict(images=1000, captions_per_image=5, dim=256),
                                         dict(images=20_000, captions_per_image=5, dim=256)]),
                   label=lambda p: f"{p['images']} images x {p['images'] * p['captions_per_image']} captions",
                   memory=("ours", "floor")),
    "lamb": dict(build=lamb_contender, contenders=("ours", "floor", "torch_optimizer"), reference="ours",
                 tol={"torch_optimizer": 1e-6},  # the floor (AdamW) is another optimizer: timed, not compared
                 cases=lambda quick: [dict(width=1024, depth=2) if quick else dict(width=2048, depth=6)],
                 label=lambda p: f"{p['depth'] * (p['width'] ** 2 + p['width']) / 1e6:.1f}M parameters"),
    "queue": dict(build=queue_contender, contenders=("ours", "pml_crossbatchmemory"),
                  tol={"pml_crossbatchmemory": 0.0},
                  cases=lambda quick: ([dict(size=4096, dim=256, batch=256, steps=64)] if quick else
                                       [dict(size=65_536, dim=256, batch=b, steps=512) for b in (256, 1024)]),
                  label=lambda p: f"{p['size']} x {p['dim']}, batch {p['batch']}", checks=True),
}


def worker(section: str, contender: str, params: dict, repeats: int, checks: bool, out: str) -> None:
    """Run one contender in this (fresh) process and save its result, median time and peak memory."""
    from mmalign.checks import set_enabled

    spec = SECTIONS[section]
    set_enabled(checks if contender == "ours" else None)
    result_fn, timed_fn = spec["build"](contender, params)
    saved = {}
    if contender in spec.get("memory", ()):  # the result call, under the memory profiler (not timed)
        from mmalign.experiments.scaling import peak_memory_bytes

        box = {}
        saved["peak_MB"] = peak_memory_bytes(lambda: box.setdefault("result", result_fn())) / 2**20
        saved["result"] = box["result"]
    else:
        saved["result"] = result_fn()
    # (when the result call ran the timed function, it was the warm-up)
    saved["seconds"] = timed(timed_fn, repeats, warm_up=result_fn is not timed_fn)
    torch.save(saved, out)


# ---- the parent: one process per contender, then compare and tabulate ---------------------------------


def run_worker(section: str, contender: str, params: dict, repeats: int, threads: int, checks: bool = False) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           "OPENBLAS_NUM_THREADS": str(threads)}
    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "result.pt")
        cmd = [sys.executable, __file__, "--worker", section, contender, "--params", json.dumps(params),
               "--repeats", str(repeats), "--threads", str(threads), "--out", out] + (["--checks"] if checks else [])
        done = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"{section}/{contender} {params} failed:\n{done.stderr[-3000:]}")
        return torch.load(out, weights_only=True)


def max_difference(a, b) -> float:
    """Max |a - b| over the values of two result dicts (tensors or numbers, same keys)."""
    if a.keys() != b.keys():
        raise AssertionError(f"results have different keys: {sorted(a)} vs {sorted(b)}")
    diff = 0.0
    for key in a:
        x, y = torch.as_tensor(a[key], dtype=torch.float64), torch.as_tensor(b[key], dtype=torch.float64)
        if x.shape != y.shape:
            raise AssertionError(f"{key}: shapes differ, {tuple(x.shape)} vs {tuple(y.shape)}")
        if x.numel():
            diff = max(diff, float((x - y).abs().max()))
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
    print(f"{name:<46} ours {r['ours_s'] * 1000:9.2f} ms  {ratios}  {'ok' if r['targets met'] else 'MISSED: ' + r['missed']}",
          flush=True)


WHY = {  # the measured reason a target is missed, written after reading the profile (README, chapter 9)
    "recall": ("faiss's flat search is BLAS sgemm + a heap per block, as ours is sgemm + top-k; the difference is "
               "the sgemm: faiss-cpu's OpenBLAS runs it faster on this CPU than torch's MKL (see gemm_s, torch's "
               "similarity matrices alone, with no ranking)"),
    "lamb": ("torch-optimizer adds the weight decay and the scaled step with fused `add_(x, alpha=...)` calls, one "
             "pass each, which round once (an FMA); ours multiplies then adds, two passes each, so that the update "
             "equals the written-out formula bit for bit (tests/test_dist.py); the floor, AdamW, has no trust ratio "
             "(two norms per parameter)"),
    "triplet_semihard": ("the floor sums a masked (B, B) hinge; ours goes through the miner's index table (what any "
                         "loss takes), which is (B, B) too, plus the gathers of its entries: on random embeddings "
                         "nearly every negative is semi-hard"),
}


def bench_section(name: str, quick: bool, repeats: int, threads: int, pml_max: int) -> dict:
    spec, out = SECTIONS[name], {}
    for params in spec["cases"](quick):
        label = spec["label"](params)
        results, peers, skipped = {}, {}, {}
        for contender in spec["contenders"]:
            if contender == "pml_ntxent" and params["B"] > pml_max:
                skipped[contender] = f"not run: above --pml-max {pml_max} (its pair tables grow as B^3 in memory)"
                continue
            results[contender] = run_worker(name, contender, params, repeats, threads)
        reference = spec.get("reference") or ("floor" if "floor" in results else "ours")
        diff = 0.0
        for contender, r in results.items():
            tol = spec["tol"].get(contender)
            if contender == reference or tol is None:
                continue
            d = max_difference(r["result"], results[reference]["result"])
            if not d <= tol:
                raise AssertionError(f"{name} {label}: {contender} differs from {reference} by {d:.3g} > {tol:.3g}")
            diff = max(diff, d)
        for contender in spec["contenders"]:
            if contender not in ("ours", "floor", "gemm"):
                peers[contender] = results[contender]["seconds"] if contender in results else None
        extra = {"max_abs_diff": diff, **skipped}
        if spec.get("checks"):
            extra["ours_with_input_checks_s"] = run_worker(name, "ours", params, repeats, threads, checks=True)["seconds"]
        if "gemm" in results:
            extra["gemm_s"] = results["gemm"]["seconds"]
        for contender in spec.get("memory", ()):
            extra[f"{contender}_peak_MB"] = results[contender]["peak_MB"]
        if name == "recall":
            extra["recall"] = results["ours"]["result"]
        if name == "lamb":
            extra["parameters"] = results["ours"]["result"]["parameters"]
        r = row(results["ours"]["seconds"], peers, results["floor"]["seconds"] if "floor" in results else None, **extra)
        if not r["targets met"] and name in WHY:
            r["why"] = WHY[name]
        out[label] = r
        show(f"{name} {label}", r)
    return out


def bench_sinkhorn(quick: bool, threads: int) -> dict:
    script = Path(__file__).with_name("bench_sinkhorn.py")
    try:
        import mmalign.ot  # noqa: F401
        import ot  # noqa: F401
    except ImportError as err:
        return {"skipped": f"needs mmalign.ot and POT: {err}"}
    from mmalign.config import results_dir

    # (--quick writes to a temporary file: a smoke test never touches the committed results)
    path = Path(tempfile.gettempdir()) / "bench_sinkhorn_quick.json" if quick else results_dir() / "bench_sinkhorn.json"
    args = [sys.executable, str(script), "--threads", str(threads), "--out", str(path)] + (
        ["--n", "512", "--k", "128", "--repeats", "2"] if quick else [])
    done = subprocess.run(args, capture_output=True, text=True)
    if done.returncode != 0:
        return {"failed": done.stderr[-2000:]}
    r = json.loads(path.read_text())
    ratio = r.get("ratio_pot_torch_over_ours")
    print(f"{'sinkhorn (bench_sinkhorn.py)':<46} ours {r['ours_s'] * 1000:9.2f} ms  pot_torch/ours={ratio:.2f}", flush=True)
    return {"see": "results/bench_sinkhorn.json", **r}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes: a smoke test of the script")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                        help="torch / OpenMP threads of every contender (default: the machine's cores)")
    parser.add_argument("--pml-max", type=int, default=256, help="largest B for PML's NTXentLoss (memory)")
    parser.add_argument("--only", default=None, help="comma-separated sections to run")
    parser.add_argument("--out", default=None, help="default: results/bench.json (with --quick: a temporary file)")
    parser.add_argument("--worker", nargs=2, metavar=("SECTION", "CONTENDER"), help=argparse.SUPPRESS)
    parser.add_argument("--params", default="{}", help=argparse.SUPPRESS)
    parser.add_argument("--checks", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.worker:
        worker(*args.worker, json.loads(args.params), args.repeats or 3, args.checks, args.out)
        return
    try:
        import faiss  # noqa: F401
        import pytorch_metric_learning  # noqa: F401
        import torch_optimizer  # noqa: F401
    except ImportError as err:
        raise SystemExit(f"{err.name} is missing: pip install -e .[bench]") from None
    from mmalign.config import results_dir

    quick = args.quick
    repeats = args.repeats or (2 if quick else 5)
    names = list(SECTIONS) + ["sinkhorn"]
    chosen = args.only.split(",") if args.only else names
    unknown = [name for name in chosen if name not in names]
    if unknown:
        parser.error(f"unknown section(s) {unknown} in --only; choose from {', '.join(names)}")
    out = {"date": datetime.date.today().isoformat(), "quick": quick, "repeats": repeats, "threads": args.threads,
           "machine": f"{platform.system()} {platform.machine()}, {os.cpu_count()} cores, {args.threads} thread(s)",
           "processes": "one fresh process per contender", "torch": torch.__version__, "versions": _versions(),
           "targets": f"peer/ours >= {TARGET_PEER} for every peer, ours/floor <= {TARGET_FLOOR}",
           "results": {}}
    path = Path(args.out) if args.out else (Path(tempfile.gettempdir()) / "bench_quick.json" if quick
                                            else results_dir() / "bench.json")
    if args.only and path.exists():  # rerun some sections: keep the others of the existing file
        previous = json.loads(path.read_text())
        rerun = {**previous.get("sections_rerun", {}), **{name: {"date": out["date"], "repeats": repeats}
                                                         for name in chosen}}
        out = {**previous, "sections_rerun": rerun}
    for name in chosen:
        if name == "sinkhorn":
            out["results"][name] = bench_sinkhorn(quick, args.threads)
        else:
            # recall at 20k x 100k takes ~20 s a call: fewer repeats
            reps = max(1, repeats // 2) if name == "recall" and not quick else repeats
            out["results"][name] = bench_section(name, quick, reps, args.threads, min(args.pml_max, 256) if quick
                                                 else args.pml_max)
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
