"""Log-domain Sinkhorn: mmalign.ot.sinkhorn against POT's ot.sinkhorn(method="sinkhorn_log").

N = 4096 features, K = 1024 prototypes (cosine cost), epsilon = 0.05, uniform marginals, 50 iterations,
the same inputs for both (float32 torch tensors on the CPU, so POT runs its torch backend; and POT on
the float64 numpy arrays, its default). Checks that the plans are equal, times the median of repeats and
writes the ratio POT / ours to results/bench_sinkhorn.json. Needs the optional extra: pip install POT
(``pip install -e .[bench]``). Run: python benchmarks/bench_sinkhorn.py [--repeats 5] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from mmalign.config import results_dir
from mmalign.ot import cost_matrix, sinkhorn


def timed(fn, repeats: int, warm_up: bool = True) -> tuple[float, object]:
    if warm_up:
        fn()
    times, out = [], None
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=4096)
    parser.add_argument("--k", type=int, default=1024)
    parser.add_argument("--iters", type=int, default=50)
    parser.add_argument("--epsilon", type=float, default=0.05)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=None, help="default: results/bench_sinkhorn.json")
    args = parser.parse_args()
    try:
        import ot as pot
    except ImportError:
        raise SystemExit("POT is not installed: pip install POT (or pip install -e .[bench])") from None
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    cost = cost_matrix(torch.randn(args.n, 128, generator=g), torch.randn(args.k, 128, generator=g))  # float32
    a = torch.full((args.n,), 1.0 / args.n)
    b = torch.full((args.k,), 1.0 / args.k)

    ours_s, ours = timed(lambda: sinkhorn(cost, args.epsilon, a, b, n_iters=args.iters).plan, args.repeats)
    # stopThr=0: POT never stops early, so both run exactly `iters` iterations
    pot_s, pot_plan = timed(lambda: pot.sinkhorn(a, b, cost, args.epsilon, method="sinkhorn_log",
                                                 numItermax=args.iters, stopThr=0.0, warn=False), args.repeats)
    a64, b64, c64 = a.double().numpy(), b.double().numpy(), cost.double().numpy()
    pot_np_s, pot_np_plan = timed(lambda: pot.sinkhorn(a64, b64, c64, args.epsilon, method="sinkhorn_log",
                                                       numItermax=args.iters, stopThr=0.0, warn=False),
                                  1, warm_up=False)  # numpy is slow: one timed call is enough
    diff_torch = float((ours - pot_plan).abs().max())
    diff_np = float((ours.double() - torch.as_tensor(pot_np_plan)).abs().max())
    scale = float(ours.abs().max())
    equal = diff_torch <= 1e-4 * scale and diff_np <= 1e-3 * scale
    result = {
        "n": args.n, "k": args.k, "iters": args.iters, "epsilon": args.epsilon, "repeats": args.repeats,
        "threads": args.threads, "ours_s": ours_s, "pot_torch_s": pot_s, "pot_numpy_s": pot_np_s,
        "ratio_pot_torch_over_ours": pot_s / ours_s, "ratio_pot_numpy_over_ours": pot_np_s / ours_s,
        "max_abs_plan_diff_torch": diff_torch, "max_abs_plan_diff_numpy": diff_np, "max_plan_entry": scale,
        "plans_equal": equal, "pot_version": pot.__version__, "torch": torch.__version__,
        "machine": f"{platform.system()} {platform.machine()}, {torch.get_num_threads()} torch thread(s)",
    }
    path = Path(args.out) if args.out else Path(results_dir()) / "bench_sinkhorn.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    if not equal:
        raise SystemExit(f"the plans differ (max abs diff {diff_torch:.3g} / {diff_np:.3g} of max entry {scale:.3g})")


if __name__ == "__main__":
    main()
