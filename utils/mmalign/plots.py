"""The figures the chapters share: training curves, similarity heatmaps, retrieval grids, results tables."""

from __future__ import annotations

import html
from typing import Mapping, Sequence

import numpy as np
import torch

from ._optional import missing_extra

try:
    import matplotlib.pyplot as plt
except ModuleNotFoundError as e:
    raise missing_extra(e, "plots", "mmalign.plots") from e


def _smooth(values: Sequence[float], window: int) -> np.ndarray:
    v = np.asarray(values, float)
    if window <= 1 or len(v) < window:
        return v
    kernel = np.ones(window) / window
    return np.convolve(np.pad(v, (window - 1, 0), mode="edge"), kernel, mode="valid")


def plot_history(history, eval_keys: Sequence[str] = (), smooth: int = 10, title: str | None = None):
    """Training loss per step (raw and smoothed) and, on a second axis, eval metrics over steps."""
    n_axes = 2 if eval_keys else 1
    fig, axes = plt.subplots(1, n_axes, figsize=(5.5 * n_axes, 3.4), squeeze=False)
    ax = axes[0, 0]
    ax.plot(history.step, history.loss, alpha=0.3, color="C0", label="loss")
    ax.plot(history.step, _smooth(history.loss, smooth), color="C0", label=f"loss (mean of {smooth})")
    ax.set(xlabel="step", ylabel="training loss")
    ax.legend(frameon=False)
    if eval_keys:
        ax = axes[0, 1]
        for key in eval_keys:
            steps, values = history.eval_series(key)
            ax.plot(steps, values, marker="o", ms=3, label=key)
        ax.set(xlabel="step", ylabel="validation metric")
        ax.legend(frameon=False)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def plot_runs(histories: Mapping[str, object], key: str = "loss", smooth: int = 10, ax=None,
              ylabel: str | None = None, logy: bool = False):
    """Several runs on one axis: the training loss (``key='loss'``) or an eval metric per step."""
    if ax is None:
        _, ax = plt.subplots(figsize=(6, 3.6))
    for i, (name, h) in enumerate(histories.items()):
        if key == "loss":
            ax.plot(h.step, _smooth(h.loss, smooth), label=name, color=f"C{i}")
        else:
            steps, values = h.eval_series(key)
            ax.plot(steps, values, marker="o", ms=3, label=name, color=f"C{i}")
    ax.set(xlabel="step", ylabel=ylabel or key)
    if logy:
        ax.set_yscale("log")
    ax.legend(frameon=False, fontsize=8)
    return ax


def similarity_heatmap(sim: torch.Tensor | np.ndarray, row_labels: Sequence[str] | None = None,
                       col_labels: Sequence[str] | None = None, title: str = "cosine similarity",
                       ax=None, annotate: bool = False):
    """A heatmap of a (N, M) similarity matrix; the diagonal holds the true pairs in a paired batch."""
    sim = sim.detach().cpu().numpy() if isinstance(sim, torch.Tensor) else np.asarray(sim)
    if sim.ndim != 2:
        raise ValueError(f"expected a 2-d similarity matrix, got shape {sim.shape}")
    if ax is None:
        _, ax = plt.subplots(figsize=(0.45 * sim.shape[1] + 2.5, 0.45 * sim.shape[0] + 1.5))
    im = ax.imshow(sim, cmap="viridis", vmin=min(-0.1, sim.min()), vmax=max(1.0, sim.max()) if sim.max() > 1 else 1.0)
    ax.figure.colorbar(im, ax=ax, fraction=0.046)
    if row_labels is not None:
        ax.set_yticks(range(len(row_labels)), row_labels, fontsize=7)
    if col_labels is not None:
        ax.set_xticks(range(len(col_labels)), col_labels, fontsize=7, rotation=60, ha="right")
    if annotate:
        for i in range(sim.shape[0]):
            for j in range(sim.shape[1]):
                ax.text(j, i, f"{sim[i, j]:.2f}", ha="center", va="center", fontsize=6,
                        color="w" if sim[i, j] < sim.mean() else "k")
    ax.set_title(title)
    return ax


def text_to_image_grid(queries: Sequence[str], images: np.ndarray, top_idx: torch.Tensor,
                       is_positive: torch.Tensor, max_chars: int = 48):
    """One row per caption query: its top-k images, green frame = a correct image, red = wrong.

    images: (N, H, W, 3) uint8 gallery; top_idx, is_positive: (Q, k). English queries only in the
    titles (matplotlib's font has no Devanagari/Japanese; use :func:`image_to_text_html` for those).
    """
    q, k = top_idx.shape
    fig, axes = plt.subplots(q, k, figsize=(1.45 * k, 1.7 * q), squeeze=False)
    for r in range(q):
        for c in range(k):
            ax = axes[r, c]
            ax.imshow(images[int(top_idx[r, c])])
            ax.set_xticks([])
            ax.set_yticks([])
            colour = "limegreen" if bool(is_positive[r, c]) else "crimson"
            for spine in ax.spines.values():
                spine.set_edgecolor(colour)
                spine.set_linewidth(3)
        text = queries[r] if len(queries[r]) <= max_chars else queries[r][:max_chars - 1] + "…"
        axes[r, 0].set_ylabel(text, rotation=0, ha="right", va="center", fontsize=8)
    fig.suptitle("caption → top-k images (green: correct)", fontsize=10)
    fig.tight_layout()
    return fig


def image_to_text_html(query_images: np.ndarray, texts: Sequence[str], top_idx: torch.Tensor,
                       is_positive: torch.Tensor, scores: torch.Tensor | None = None) -> str:
    """An HTML table: each query image (inline PNG) beside its top-k captions, ✓ for a correct one.

    HTML, not matplotlib, so that Hindi and Japanese captions render in the browser's fonts.
    """
    import base64
    import io

    from PIL import Image

    rows = []
    for r in range(top_idx.shape[0]):
        buf = io.BytesIO()
        Image.fromarray(query_images[r]).resize((96, 96), Image.NEAREST).save(buf, format="PNG")
        img = f'<img src="data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()}" width="96">'
        items = []
        for c in range(top_idx.shape[1]):
            mark = "✓" if bool(is_positive[r, c]) else "✗"
            score = f" <small>({float(scores[r, c]):.2f})</small>" if scores is not None else ""
            items.append(f"<li>{mark} {html.escape(texts[int(top_idx[r, c])])}{score}</li>")
        rows.append(f"<tr><td>{img}</td><td><ol>{''.join(items)}</ol></td></tr>")
    return f"<table><tr><th>image</th><th>top captions (✓ correct)</th></tr>{''.join(rows)}</table>"


def results_table_html(rows: Mapping[str, Mapping[str, float]], columns: Sequence[str] | None = None,
                       higher_is_better: Mapping[str, bool] | None = None, fmt: str = "{:.1f}",
                       bold_best: bool = True) -> str:
    """An HTML table of named rows of numbers with the best value per column in bold."""
    names = list(rows)
    columns = list(columns or next(iter(rows.values())).keys())
    higher_is_better = dict(higher_is_better or {})
    best = {}
    for col in columns:
        values = [rows[n][col] for n in names if col in rows[n]]
        if values and bold_best:
            best[col] = max(values) if higher_is_better.get(col, True) else min(values)
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = []
    for n in names:
        cells = []
        for col in columns:
            v = rows[n].get(col)
            text = "" if v is None else (fmt.format(v) if isinstance(v, float) else str(v))
            cells.append(f"<td><b>{text}</b></td>" if v is not None and v == best.get(col) else f"<td>{text}</td>")
        body.append(f"<tr><th>{html.escape(n)}</th>{''.join(cells)}</tr>")
    return f"<table><tr><th></th>{head}</tr>{''.join(body)}</table>"
