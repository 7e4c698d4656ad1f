"""Cost of mmalign's input checks on chapter 2's training loop (the loss zoo).

Times ``mmalign.train.fit`` steps of the chapter's dual encoder (CI-profile shapes: 1280-d image and
384-d caption features, 3 captions per scene, batch 128, embed 128, Adam) for every loss of the zoo,
with the checks on (the default) and inside ``mmalign.checks.disabled()`` (the element-wise scans off:
finiteness and the few value scans; the structural checks run in both). Two estimates:

* ``step on/off``: the median step of whole fit runs, alternating on/off (noisy when other
  processes share the machine);
* ``scan``: the median loss call (forward + backward of one batch, the only code that differs) with
  checks on minus off, alternating call by call so both see the same load; divided by the median
  step it is the share of a training step the scans take.

Random features stand in for the cached ones (same shapes, same step cost).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/check_overhead.py [--repeats 7] [--scenes 1200]

``--chapter 8`` times chapter 8's CODIS step instead (CI-profile budget: batch 64, width 64, one layer,
queue 512, 64 codewords, every term on: ITC, intra, ITM, MLM, codebook; patches (64, 9, 1280), tokens
(64, 16, 384), 38 MLM classes): ``Codis.losses`` + backward + AdamW step + ``after_step``, checks on and
off alternating step by step, plus the structural boundary checks of ``Codis.losses`` alone (they run
in both; ``train_codis`` runs its steps inside ``checks.disabled()``, so they are all it pays)::

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/check_overhead.py --chapter 8 [--steps 400]

Measured (issue 19, after MLM moved before the frozen encoder, so the step also reads the masked
captions' states, and with the value scans (codebook target rows, plan mass, MLM label range) switched
off by ``checks.disabled()`` too; CPU, 1 torch thread, a 2-core machine shared with other jobs, load
1.4-2.5; three runs of 400 steps): a step of 145-149 ms; checks on minus off -2.0, -1.5 and +0.05 ms in
the medians, so the element scans cost less than the noise of the medians (about 1 %); the scan of
patches, tokens and masked tokens at the boundary alone 0.30-0.49 ms, 0.2-0.3 % of a step; the structural
boundary checks 26-56 us, 0.02-0.04 %. (Issue 22 measured, before these changes and at load ~3, a step
of 194-219 ms and scans of 0.5-1.0 %.)

Budget (issue 11): the checks cost < 2 % of a step.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from mmalign import checks
from mmalign.config import load_config
from mmalign.experiments.loss_zoo import zoo_losses
from mmalign.models.heads import DualEncoder, ProjectionHead
from mmalign.train import fit


def step_times(pair_loss, img, txt, ids, cfg, epochs: int) -> list[float]:
    """Seconds of every training step of one fit run (fresh heads, fixed seed), from after_step stamps."""
    torch.manual_seed(0)
    model = DualEncoder(ProjectionHead.from_features(img, cfg.embed_dim), ProjectionHead.from_features(txt, cfg.embed_dim))
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.0)
    stamps = [time.perf_counter()]

    def step(m, batch):
        zi_in, zt_in, b_ids = batch
        zi, zt = m(zi_in, zt_in)
        return pair_loss(zi, zt, b_ids)

    fit(model, step, (img, txt, ids), optimizer=opt, epochs=epochs, batch_size=cfg.batch_size, seed=0,
        device="cpu", amp=False, progress=False, after_step=lambda *_: stamps.append(time.perf_counter()))
    return [b - a for a, b in zip(stamps[1:-1], stamps[2:])]  # the first step includes the set-up


def loss_call_times(pair_loss, img, txt, ids, cfg, calls: int) -> tuple[list[float], list[float]]:
    """Seconds of single loss calls (forward + backward of one batch), alternating checks on / off
    call by call, so that both sides see the same machine load."""
    g = torch.Generator().manual_seed(1)
    w_i, w_t = torch.randn(img.shape[1], cfg.embed_dim, generator=g), torch.randn(txt.shape[1], cfg.embed_dim, generator=g)
    b_ids = ids[: cfg.batch_size]
    on, off = [], []
    for i in range(calls):
        zi = (img[: cfg.batch_size] @ w_i).requires_grad_()
        zt = (txt[: cfg.batch_size] @ w_t).requires_grad_()
        flag = i % 2 == 0
        checks.set_enabled(flag)
        start = time.perf_counter()
        pair_loss(zi, zt, b_ids).backward()
        (on if flag else off).append(time.perf_counter() - start)
    checks.set_enabled(None)
    return on, off


def chapter8(steps: int, tokens_len: int = 16, vocab: int = 38) -> None:
    """Chapter 8's CODIS step with the checks on and off (interleaved), and the boundary checks alone."""
    from mmalign.experiments.codis import budgets
    from mmalign.models.codis import Codis, CodisConfig

    budget = budgets(load_config("ci"))
    b = budget["batch_size"]
    cfg = CodisConfig(width=budget["width"], layers=budget["layers"], heads=budget["heads"], embed_dim=budget["embed_dim"],
                      queue_size=budget["queue_size"], momentum=budget["momentum"], alpha=budget["alpha"],
                      n_codewords=budget["n_codewords"], max_tokens=tokens_len, vocab_size=vocab, max_patches=9,
                      intra=True, codebook=True)
    torch.manual_seed(0)
    model = Codis(cfg)
    opt = torch.optim.AdamW(model.trainable_parameters(), lr=budget["lr"])
    g = torch.Generator().manual_seed(0)
    n_batches = 8
    data = []
    for i in range(n_batches):
        patches, tokens = torch.randn(b, 9, 1280, generator=g), torch.randn(b, tokens_len, 384, generator=g)
        lengths = torch.randint(4, tokens_len + 1, (b,), generator=g)
        mask = torch.arange(tokens_len)[None, :] < lengths[:, None]
        labels = torch.randint(0, vocab, (b, tokens_len), generator=g).masked_fill(~mask, -100)
        labels = labels.masked_fill(torch.rand(b, tokens_len, generator=g) > 0.15, -100)  # BERT's 15 %
        masked_tokens = torch.randn(b, tokens_len, 384, generator=g)  # the masked captions' states
        data.append((patches, tokens, mask, torch.arange(b) + i * b, labels, masked_tokens))
    gen = torch.Generator().manual_seed(1)

    def one_step(batch) -> float:
        start = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        model.losses(*batch[:5], generator=gen, mlm_tokens=batch[5])["total"].backward()
        opt.step()
        model.after_step()
        return time.perf_counter() - start

    for i in range(20):  # warm-up: fill the queues
        one_step(data[i % n_batches])
    on, off = [], []
    for i in range(steps):
        flag = i % 2 == 0
        checks.set_enabled(flag)
        (on if flag else off).append(one_step(data[i % n_batches]))
    checks.set_enabled(None)
    boundary_on, boundary_off = [], []
    for i in range(4000):  # the boundary checks alone, with and without their finiteness scan, interleaved
        flag = i % 2 == 0
        checks.set_enabled(flag)
        batch = data[i % n_batches]
        start = time.perf_counter()
        model._check_batch(*batch[:5], gen, batch[5])
        (boundary_on if flag else boundary_off).append(time.perf_counter() - start)
    checks.set_enabled(None)
    step_on, step_off = statistics.median(on), statistics.median(off)
    diff = step_on - step_off
    scan = max(0.0, diff)
    structural = statistics.median(boundary_off)
    boundary_scan = statistics.median(boundary_on) - structural
    print(f"boundary checks of Codis.losses alone: {1e6 * statistics.median(boundary_on):.0f} us with the scan of "
          f"patches, tokens and masked tokens, {1e6 * structural:.0f} us without: the scan "
          f"{1e6 * boundary_scan:.0f} us")
    print(f"chapter 8 CODIS step (batch {b}, every term on, torch threads {torch.get_num_threads()}, {steps} steps)")
    print(f"step with checks on {1e3 * step_on:.2f} ms, off {1e3 * step_off:.2f} ms (medians, interleaved)")
    print(f"element scans (finiteness and value scans), on - off: {1e6 * diff:+.0f} us = {100 * diff / step_off:+.2f}% "
          "of a step" + (" (on was not slower: below the noise of the medians)" if diff <= 0 else ""))
    print(f"the boundary scan alone: {100 * boundary_scan / step_off:.2f}% of a step")
    print(f"boundary checks of Codis.losses (structural, on in both): {1e6 * structural:.0f} us = "
          f"{100 * structural / step_off:.2f}% of a step")
    print(f"policy cost with checks on: {100 * (scan + structural) / step_off:.2f}% of a step (budget 2%); "
          f"inside checks.disabled() (as train_codis runs): {100 * structural / step_off:.2f}% plus the structural "
          "checks inside the losses")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chapter", type=int, choices=(2, 8), default=2, help="2: the loss zoo; 8: the CODIS step")
    parser.add_argument("--steps", type=int, default=400, help="chapter 8: steps timed (half on, half off)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--scenes", type=int, default=1200)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--calls", type=int, default=2000, help="loss calls timed per loss (half on, half off)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.chapter == 8:
        chapter8(args.steps)
        return
    cfg = load_config("ci")
    g = torch.Generator().manual_seed(0)
    n_scenes, k = args.scenes, 3
    scene_img = torch.randn(n_scenes, 1280, generator=g)
    ids = torch.arange(n_scenes).repeat_interleave(k)
    img = scene_img[ids]
    txt = torch.randn(n_scenes * k, 384, generator=g)
    steps = (n_scenes * k // cfg.batch_size) * args.epochs
    losses = zoo_losses(cfg, steps)
    print(f"{len(losses)} losses, {steps} steps per run, {args.repeats} repeats, torch threads {torch.get_num_threads()}")
    print(f"{'loss':<14}{'step on':>10}{'step off':>10}{'loss call':>11}{'scan':>9}{'scan/step':>11}")
    worst = 0.0
    for name, make in losses.items():
        on, off = [], []
        for r in range(args.repeats):
            for flag in ((True, False) if r % 2 == 0 else (False, True)):
                checks.set_enabled(flag)
                (on if flag else off).extend(step_times(make(), img, txt, ids, cfg, args.epochs))
                checks.set_enabled(None)
        c_on, c_off = loss_call_times(make(), img, txt, ids, cfg, args.calls)
        step_on, step_off = statistics.median(on), statistics.median(off)
        scan = max(0.0, statistics.median(c_on) - statistics.median(c_off))
        share = scan / step_off
        worst = max(worst, share)
        print(f"{name:<14}{1e3 * step_on:>8.3f}ms{1e3 * step_off:>8.3f}ms{1e3 * statistics.median(c_off):>9.3f}ms"
              f"{1e6 * scan:>7.1f}us{100 * share:>10.2f}%")
    print(f"worst share of a training step spent in the finiteness scans: {100 * worst:.2f}% (budget 2%)")
    print("step on/off: median step of whole fit runs (noisy on a shared machine); scan: median loss call "
          "with checks on minus off, interleaved call by call")


if __name__ == "__main__":
    main()
