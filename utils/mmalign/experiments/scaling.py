"""Chapter 09: scaling up. Negatives against batch size, softmax (InfoNCE) against sigmoid (SigLIP) loss
as the batch shrinks and grows, gathered negatives on 2 processes (torchrun, gloo), communication against
compute, the memory of the global and the local gathered loss, mixed precision and the float32-logits
rule, retrieval on large galleries in chunks.

The notebook calls these functions, so its live numbers and ``results/09_scaling.json`` compute the
same thing. The multi-process part runs :mod:`mmalign.experiments.scaling_worker` under ``torch.distributed.run``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from torch import nn

from ..checks import check_int
from ..config import Config, seed_everything
from ..data.features import FeatureSplit, scene_features
from ..losses import info_nce, siglip_loss
from ..models.temperature import LearnableTemperature
from ..recipes import evaluate, train_dual_encoder
from ..retrieval import recall_at_k
from .seeds import seeds_for, summarize

TEMPERATURE = 0.07


def budgets(cfg: Config) -> dict:
    """The chapter's sizes, derived from the profile so that the full and gpu profiles scale up."""
    big = cfg.profile != "ci"
    return {
        # negatives per positive at a fixed batch size; batch // 2 is what 2 processes see without gathering
        "negatives": (4, 16, cfg.batch_size // 2, cfg.batch_size),
        "epochs": max(3, cfg.epochs // 3),  # the sweep and the 2-process demo alike
        "demo_batch": cfg.batch_size,
        "timing_sizes": (32, 128, 512) if not big else (64, 256, 1024, 4096),
        "gallery_sizes": (2_000, 6_000, 18_000) if not big else (5_000, 20_000, 60_000),
        "gallery_queries": 1_000 if not big else 2_000,
        "gallery_dim": 128 if not big else 256,
        "chunk": 256,
        "amp_steps": 30 if not big else 100,
        # softmax vs sigmoid loss: global batch sizes, the same epochs (so the same examples seen)
        "loss_batches": (64, 256) if not big else (16, 64, 256, 1024),
        # peak memory of the gathered loss, global form vs local_loss=True: processes and global batches
        # (CI: one launch of 4 processes, each torchrun start costs seconds; the reference also runs 2)
        "memory_worlds": (4,) if not big else (2, 4),
        "memory_batches": (1024, 2048) if not big else (1024, 2048, 4096),
        "memory_dim": cfg.embed_dim,
    }


# ---- 1. negatives per positive ---------------------------------------------------------------------


def local_negatives_loss(n_chunks: int, temperature: float = TEMPERATURE):
    """A pair loss whose negatives come only from ``n_chunks`` equal parts of the batch: the mean of
    :func:`info_nce` over the parts. With ``n_chunks = W`` this is exactly what W processes compute
    when each one scores only its own part (no gathering)."""
    if n_chunks < 1:
        raise ValueError(f"n_chunks must be >= 1, got {n_chunks}")

    def loss(zi, zt, ids):
        if zi.shape[0] % n_chunks:
            raise ValueError(f"batch of {zi.shape[0]} does not split into {n_chunks} equal parts")
        parts = zip(zi.chunk(n_chunks), zt.chunk(n_chunks), ids.chunk(n_chunks))
        return torch.stack([info_nce(a, b, temperature=temperature, ids=i) for a, b, i in parts]).mean()

    return loss


def negatives_sweep(train: FeatureSplit, test: FeatureSplit, cfg: Config, negatives, epochs: int,
                    progress: bool = True, seed: int | None = None) -> dict:
    """Test recalls of the same run (batch ``cfg.batch_size``, same steps) with fewer or more negatives.

    ``seed`` (default ``cfg.seed``) sets the heads' initialisation and the data order, the same for every row."""
    out = {}
    for neg in negatives:
        model, _ = train_dual_encoder(train, None, cfg, local_negatives_loss(cfg.batch_size // neg), epochs=epochs,
                                      progress=progress, desc=f"{neg} in-batch candidates", seed=seed)
        out[f"{neg} candidates"] = evaluate(model, test)
    return out


# ---- 1b. softmax (InfoNCE) against sigmoid (SigLIP) loss ------------------------------------------

SOFTMAX_LEARNED = "InfoNCE, learned τ"
SIGMOID_LEARNED = "SigLIP, learned τ and b"
SOFTMAX_FIXED = f"InfoNCE, τ = {TEMPERATURE}"
LOSS_VARIANTS = (SOFTMAX_LEARNED, SIGMOID_LEARNED, SOFTMAX_FIXED)


def loss_variant(name: str, device: str | torch.device = "cpu"):
    r"""``(pair_loss(z_img, z_txt, ids), parameters outside the heads, settings())`` of one loss of the comparison.

    * ``"InfoNCE, learned τ"``: :func:`mmalign.losses.info_nce` with a
      :class:`~mmalign.models.temperature.LearnableTemperature` initialised at CLIP's 0.07;
    * ``"SigLIP, learned τ and b"``: :func:`mmalign.losses.siglip_loss` with the paper's initialisation,
      :math:`\tau = 0.1` (:math:`t = 1/\tau = 10`) and bias :math:`b = -10`, both learned;
    * ``"InfoNCE, τ = 0.07"``: the chapter's InfoNCE with its fixed temperature.

    Captions of the same scene are positives in every loss (``ids``). The learned temperature and bias
    live outside the model and are trained, checkpointed and reduced by :func:`mmalign.train.fit` as
    parameters of the optimizer; ``settings()`` returns their current values.
    """
    if name == SOFTMAX_FIXED:
        return (lambda zi, zt, ids: info_nce(zi, zt, temperature=TEMPERATURE, ids=ids)), [], \
            (lambda: {"τ after training": TEMPERATURE})
    if name == SOFTMAX_LEARNED:
        temp = LearnableTemperature(TEMPERATURE).to(device)
        return (lambda zi, zt, ids: info_nce(zi, zt, temperature=temp(), ids=ids)), list(temp.parameters()), \
            (lambda: {"τ after training": float(temp().detach())})
    if name == SIGMOID_LEARNED:
        temp = LearnableTemperature(0.1).to(device)
        bias = nn.Parameter(torch.tensor(-10.0, device=device))
        return (lambda zi, zt, ids: siglip_loss(zi, zt, temperature=temp(), bias=bias, ids=ids)), \
            [*temp.parameters(), bias], \
            (lambda: {"τ after training": float(temp().detach()), "b after training": float(bias.detach())})
    raise ValueError(f"name must be one of {list(LOSS_VARIANTS)}, got {name!r}")


def softmax_vs_sigmoid(train: FeatureSplit, test: FeatureSplit, cfg: Config, batch_sizes, epochs: int,
                       losses=LOSS_VARIANTS, progress: bool = True, seed: int | None = None) -> dict:
    """Test recalls of the chapter's heads trained with each loss of :func:`loss_variant` at each batch size.

    Every run trains ``epochs`` epochs (so sees the same examples; a smaller batch takes more steps) with
    the profile's learning rate, from the same initial heads and data order (``seed``, default
    ``cfg.seed``). Rows ``"{loss}, batch {B}"``: :func:`mmalign.recipes.evaluate`'s recalls and rsum, and
    the learned temperature (and bias) at the end.
    """
    out = {}
    for batch in batch_sizes:
        check_int("batch_sizes", batch, minimum=2)
        for name in losses:
            pair_loss, extra, settings = loss_variant(name, cfg.device)
            model, _ = train_dual_encoder(
                train, None, cfg, pair_loss, epochs=epochs, batch_size=batch, seed=seed, progress=progress,
                desc=f"{name}, batch {batch}",
                optimizer=lambda params, extra=extra: torch.optim.AdamW([*params, *extra], lr=cfg.lr, weight_decay=0.0))
            out[f"{name}, batch {batch}"] = {**evaluate(model, test), **settings()}
    return out


# ---- 2. two processes ------------------------------------------------------------------------------


def torchrun_command(args, nproc: int = 2) -> list[str]:
    """The command line of :func:`torchrun`: ``python -m torch.distributed.run --standalone
    --nproc_per_node=NPROC -m mmalign.experiments.scaling_worker ARGS``.

    ``--standalone`` makes torchrun's agent open its rendezvous store on ``localhost:0``: the operating
    system hands it a free port while binding it, and the workers learn that port from the agent. No
    port is picked in advance (a port found free and then bound later can be taken in between by
    another launch on the same machine), so concurrent launches cannot meet each other.
    """
    check_int("nproc", nproc, minimum=1)
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            "-m", "mmalign.experiments.scaling_worker", *map(str, args)]


def torchrun(args, nproc: int = 2, profile: str | None = None, timeout: float = 600) -> str:
    """Run ``torchrun --standalone --nproc_per_node=nproc -m mmalign.experiments.scaling_worker ARGS`` on
    localhost (:func:`torchrun_command`); return the command.

    On CPU the processes use gloo, one thread each. A failure raises with the workers' stderr."""
    cmd = torchrun_command(args, nproc)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    if profile:
        env["MMALIGN_PROFILE"] = profile
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise RuntimeError(f"torchrun {' '.join(cmd[3:])} failed with exit code {done.returncode}:\n"
                           f"{done.stderr[-3000:]}")
    return "torchrun " + " ".join(cmd[3:])


def launch_demo(cfg: Config, out_dir: str | Path, epochs: int, batch_size: int, sizes=(64, 256, 1024),
                nproc: int = 2, timeout: float = 600) -> dict:
    """Run :mod:`mmalign.experiments.scaling_worker` on ``nproc`` processes and return its summary.json (and the command)."""
    out_dir = Path(out_dir)
    command = torchrun(["--out", out_dir, "--epochs", epochs, "--batch-size", batch_size,
                        "--sizes", ",".join(map(str, sizes))], nproc, cfg.profile, timeout)
    summary = json.loads((out_dir / "summary.json").read_text())
    summary["command"] = command
    return summary


def check_on_processes(loss_fn, nproc: int = 2, timeout: float = 300) -> dict:
    """Check ``loss_fn(a, b, temperature)`` on ``nproc`` processes (lab 9): its source is written to a
    file that every worker imports, and :func:`mmalign.experiments.scaling_worker.check_loss` runs it on the fixed batch.

    The function must be self-contained: it may use ``torch``, ``F`` (torch.nn.functional), ``dist``
    (mmalign.dist), ``similarity`` (mmalign.retrieval) and ``info_nce`` (mmalign.losses), which the file
    imports."""
    import inspect
    import textwrap

    source = textwrap.dedent(inspect.getsource(loss_fn))
    header = ("import torch\nimport torch.nn.functional as F\nfrom mmalign import dist\n"
              "from mmalign.losses import info_nce\nfrom mmalign.retrieval import similarity\n\n")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "lab_loss.py"
        path.write_text(header + source)
        try:
            torchrun(["--out", tmp, "--check", f"{path}::{loss_fn.__name__}"], nproc, timeout=timeout)
        except RuntimeError as err:
            if "NotImplementedError" in str(err):  # an unfinished lab: say so plainly
                raise NotImplementedError(f"{loss_fn.__name__} raised NotImplementedError on the workers") from None
            raise
        return torch.load(Path(tmp) / "check.pt")


def local_loss_memory(batch_sizes, nproc: int = 2, dim: int = 128, timeout: float = 600) -> dict:
    """Peak memory per process of one forward + backward of :func:`mmalign.dist.gathered_info_nce`, global
    form against ``local_loss=True``, on ``nproc`` gloo processes for each global batch in ``batch_sizes``
    (:func:`mmalign.experiments.scaling_worker.loss_memory`): ``{"world_size", "dim", "sizes": {str(B): row}}``
    with the measured peaks, the logits' bytes counted (:func:`mmalign.experiments.scaling_worker.logits_bytes`)
    and the largest difference between the two forms' gradients."""
    for b in batch_sizes:
        check_int("batch_sizes", b, minimum=nproc)
        if b % nproc:
            raise ValueError(f"batch_sizes must be divisible by nproc={nproc}, got {b}")
    with tempfile.TemporaryDirectory() as tmp:
        command = torchrun(["--out", tmp, "--memory", ",".join(map(str, batch_sizes)), "--dim", dim], nproc,
                           timeout=timeout)
        out = json.loads((Path(tmp) / "memory.json").read_text())
    out["command"] = command.replace(tmp, "DIR")
    return out


def reference_check(temperature: float = 0.1) -> dict:
    """What :func:`check_on_processes` must return: single-process InfoNCE on the whole batch."""
    from .scaling_worker import check_batch

    a, b = (t.requires_grad_() for t in check_batch())
    loss = info_nce(a, b, temperature=temperature)
    loss.backward()
    return {"loss": float(loss.detach()), "grad_a": a.grad, "grad_b": b.grad}


def one_process_twins(train: FeatureSplit, test: FeatureSplit, cfg: Config, out_dir: str | Path, epochs: int,
                      batch_size: int, nproc: int = 2, progress: bool = True) -> dict:
    """Train in one process what the demo trained on ``nproc``: the full batch (= gathered) and the batch
    cut in ``nproc`` parts (= local); compare weights and recalls with the saved multi-process runs."""
    out = {}
    for name, loss in (("gathered", local_negatives_loss(1)), ("local", local_negatives_loss(nproc))):
        model, _ = train_dual_encoder(train, None, cfg, loss, epochs=epochs, batch_size=batch_size,
                                      progress=progress, desc=f"1 process, {name}")
        theirs = torch.load(Path(out_dir) / f"{name}.pt")
        diff = max(float((v - theirs[k]).abs().max()) for k, v in model.state_dict().items())
        scale = max(float(v.abs().max()) for v in model.state_dict().values())
        out[name] = {"test": evaluate(model, test), "max |weight difference|": diff, "max |weight|": scale}
    return out


# ---- 3. mixed precision ----------------------------------------------------------------------------


def hand_softmax_loss(logits: torch.Tensor) -> torch.Tensor:
    """Cross-entropy with the diagonal as targets, written naively as -log(exp(s_ii) / sum_j exp(s_ij)).

    Deliberately unstable (the library never does this): for the overflow demonstration only."""
    e = logits.exp()
    return -(e.diagonal() / e.sum(1)).log().mean()


def overflow_table(temperatures=(0.07, 0.01), n: int = 64, dim: int = 32, seed: int = 0) -> dict:
    """Loss of aligned pairs (positive cosine about 0.6) with logits kept in each dtype.

    Rows: dtype of the logits and temperature; columns: the hand-written softmax, log-softmax
    (logsumexp) in that dtype, and ``|error|`` against float64."""
    g = torch.Generator().manual_seed(seed)
    a = F.normalize(torch.randn(n, dim, generator=g, dtype=torch.float64), dim=1)
    b = F.normalize(a + 1.3 * F.normalize(torch.randn(n, dim, generator=g, dtype=torch.float64), dim=1), dim=1)
    table = {}
    for tau in temperatures:
        ref = float(F.cross_entropy((a @ b.T) / tau, torch.arange(n)))
        for dtype in (torch.float16, torch.bfloat16, torch.float32):
            logits = (a.to(dtype) @ b.to(dtype).T) / tau
            naive = float(hand_softmax_loss(logits).double())
            lse = float(F.cross_entropy(logits, torch.arange(n)).double())
            table[f"{str(dtype).replace('torch.', '')} logits, tau={tau}"] = {
                "max logit": float(logits.max()), "hand-written softmax": naive, "log-softmax": lse,
                "|log-softmax - float64|": abs(lse - ref)}
        # info_nce on half-precision embeddings: its logits are float32 inside (retrieval.similarity)
        loss = info_nce(a.half(), b.half(), temperature=tau, normalize=False)
        sym_ref = 0.5 * (ref + float(F.cross_entropy((b @ a.T) / tau, torch.arange(n))))
        table[f"info_nce on float16 inputs, tau={tau}"] = {
            "max logit": float((a.half().float() @ b.half().float().T).max() / tau),
            "hand-written softmax": float("nan"), "log-softmax": float(loss),
            "|log-softmax - float64|": abs(float(loss) - sym_ref), "loss dtype": str(loss.dtype)}
    return table


def amp_speed(train: FeatureSplit, cfg: Config, steps: int, batch_size: int | None = None) -> dict:
    """Milliseconds per training step and final loss of the chapter-2 heads, with and without autocast
    (bfloat16 on CPU; float16 with a GradScaler and bfloat16 on CUDA), same seed and steps."""
    from ..train import fit
    from ..recipes import make_dual_encoder

    batch_size = batch_size or cfg.batch_size
    modes = {"float32": False, "bf16 autocast": "bf16"}
    if cfg.device.startswith("cuda"):
        modes["fp16 autocast + GradScaler"] = "fp16"
    out = {}
    for name, amp in modes.items():
        torch.manual_seed(cfg.seed)
        model = make_dual_encoder(train, cfg.embed_dim)

        def step(m, batch):
            zi, zt = m(batch[0], batch[1])
            loss = info_nce(zi, zt, temperature=TEMPERATURE, ids=batch[2])
            return loss, {"loss is float32": float(loss.dtype == torch.float32)}

        h = fit(model, step, train.pairs(), optimizer=torch.optim.AdamW(model.parameters(), lr=cfg.lr), epochs=10_000,
                batch_size=batch_size, seed=cfg.seed, device=cfg.device, amp=amp, max_steps=steps, progress=False)
        out[name] = {"ms per step": 1000 * h.seconds / len(h.loss), "final loss": h.loss[-1],
                     "all losses finite": all(x == x for x in h.loss),
                     "loss is float32": all(h.metrics["loss is float32"])}
    return out


# ---- 4. large galleries ----------------------------------------------------------------------------


def peak_memory_bytes(fn) -> int:
    """Peak bytes held by tensors while ``fn()`` runs: CUDA's counter on a GPU, else the allocation
    timeline of the torch profiler (allocations by operator, frees as they happen)."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    deltas = sorted((e.time_range.start, e.cpu_memory_usage if e.name == "[memory]" else e.self_cpu_memory_usage)
                    for e in prof.events())
    held = peak = 0
    for _, d in deltas:
        held += d
        peak = max(peak, held)
    return int(peak)


def gallery_memory(sizes, n_queries: int, dim: int, chunk: int, seed: int = 0) -> dict:
    """Peak memory and seconds of Recall@1/5/10 on random galleries: all queries at once against
    chunks of ``chunk`` queries (:func:`mmalign.retrieval.recall_at_k`, ``chunk_size``)."""
    g = torch.Generator().manual_seed(seed)
    q = F.normalize(torch.randn(n_queries, dim, generator=g), dim=1)
    out = {}
    for size in sizes:
        gallery = F.normalize(torch.randn(size, dim, generator=g), dim=1)
        q_ids, g_ids = torch.arange(n_queries), torch.arange(size) % n_queries
        row = {}
        for name, c in (("all at once", n_queries), (f"chunks of {chunk}", chunk)):
            start = time.perf_counter()
            row[f"{name}: peak MB"] = peak_memory_bytes(lambda: recall_at_k(q, gallery, q_ids, g_ids,
                                                                            chunk_size=c)) / 2**20
            row[f"{name}: seconds"] = time.perf_counter() - start
        row["score matrix MB (float32)"] = n_queries * size * 4 / 2**20
        out[str(size)] = row
    return out


# ---- the chapter's reference run -------------------------------------------------------------------


def run(cfg: Config, progress: bool = True) -> dict:
    """The chapter's reference run: the candidates sweep and softmax vs sigmoid on every seed of
    :func:`~mmalign.experiments.seeds.seeds_for` (CI: one, full: three; ``table`` the mean, ``std`` the
    spread, ``per_seed`` each seed's rows), the 2-process demo and its twins on ``cfg.seed``, the memory of
    the local and global gathered loss, mixed precision and the gallery memory."""
    torch.set_num_threads(cfg.num_threads or 1)
    seed_everything(cfg.seed)
    train, test = scene_features("train", cfg, progress=progress), scene_features("test", cfg, progress=progress)
    b = budgets(cfg)
    per_seed = {}
    for seed in seeds_for(cfg):
        sweep = negatives_sweep(train, test, cfg, b["negatives"], b["epochs"], progress, seed=seed)
        losses = softmax_vs_sigmoid(train, test, cfg, b["loss_batches"], b["epochs"], progress=progress, seed=seed)
        per_seed[seed] = {**{f"{k} (1 process)": v for k, v in sweep.items()}, **losses}
    with tempfile.TemporaryDirectory() as tmp:
        demo = launch_demo(cfg, tmp, b["epochs"], b["demo_batch"], b["timing_sizes"])
        twins = one_process_twins(train, test, cfg, tmp, b["epochs"], b["demo_batch"], progress=progress)
    return {
        "sizes": {"n_train": cfg.n_train, "n_test": cfg.n_test, "batch_size": cfg.batch_size},
        "budgets": {k: list(v) if isinstance(v, tuple) else v for k, v in b.items()},
        **summarize(per_seed),
        "demo": {k: v for k, v in demo.items() if k != "runs"} | {
            "runs": {k: {"test": v["test"], "seconds": v["seconds"]} for k, v in demo["runs"].items()}},
        "twins": twins,
        "memory": {str(w): local_loss_memory(b["memory_batches"], w, b["memory_dim"]) for w in b["memory_worlds"]},
        "overflow": overflow_table(),
        "amp": amp_speed(train, cfg, b["amp_steps"]),
        "gallery": gallery_memory(b["gallery_sizes"], b["gallery_queries"], b["gallery_dim"], b["chunk"]),
    }
