"""Shared figures, HTML tables and the retrieval explorer."""

import re

import matplotlib

matplotlib.use("Agg")

import matplotlib.colors as mcolors  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

import mmalign.widgets as W  # noqa: E402
from mmalign.plots import (image_to_text_html, plot_history, plot_runs, results_table_html,  # noqa: E402
                           similarity_heatmap, text_to_image_grid)
from mmalign.train import History  # noqa: E402


@pytest.fixture(autouse=True)
def _close_figures(monkeypatch):
    monkeypatch.setenv("MPLBACKEND", "Agg")
    yield
    plt.close("all")


def history(losses, evals=()):
    h = History(step=list(range(1, len(losses) + 1)), loss=list(losses))
    h.evals = [dict(step=s, epoch=i, **vals) for i, (s, vals) in enumerate(evals)]
    return h


def moving_mean(values, w):
    """Trailing mean over w values, the first value repeated before the start."""
    out = []
    for i in range(len(values)):
        window = [values[max(j, 0)] for j in range(i - w + 1, i + 1)]
        out.append(sum(window) / w)
    return out


def test_plot_history_lines_and_smoothing():
    losses = [5.0, 3.0, 4.0, 1.0, 2.0, 0.5]
    h = history(losses, [(3, {"rsum": 10.0, "r1": 1.0}), (6, {"rsum": 20.0, "r1": 2.0})])
    fig = plot_history(h, eval_keys=("rsum", "r1"), smooth=3, title="run")
    assert len(fig.axes) == 2 and fig._suptitle.get_text() == "run"
    raw, smooth = fig.axes[0].get_lines()
    assert list(raw.get_ydata()) == losses
    np.testing.assert_allclose(smooth.get_ydata(), moving_mean(losses, 3))
    eval_lines = fig.axes[1].get_lines()
    assert len(eval_lines) == 2
    assert list(eval_lines[0].get_xdata()) == [3, 6] and list(eval_lines[0].get_ydata()) == [10.0, 20.0]
    assert len(plot_history(h).axes) == 1
    # fewer points than the window: no smoothing
    np.testing.assert_allclose(plot_history(history([3.0, 1.0]), smooth=10).axes[0].get_lines()[1].get_ydata(),
                               [3.0, 1.0])


def test_plot_runs():
    runs = {"a": history([3, 2, 1], [(3, {"m": 0.5})]), "b": history([4, 3, 2], [(3, {"m": 0.7})]),
            "c": history([1, 1, 1], [(3, {"m": 0.1})])}
    ax = plot_runs(runs, smooth=1, logy=True)
    assert [line.get_label() for line in ax.get_lines()] == ["a", "b", "c"]
    assert list(ax.get_lines()[1].get_ydata()) == [4, 3, 2] and ax.get_yscale() == "log"
    ax = plot_runs(runs, key="m")
    assert [list(line.get_ydata()) for line in ax.get_lines()] == [[0.5], [0.7], [0.1]]
    assert ax.get_ylabel() == "m"


def test_similarity_heatmap():
    sim = torch.tensor([[0.9, 0.1, -0.2], [0.0, 0.8, 0.3]])
    ax = similarity_heatmap(sim, ["i0", "i1"], ["t0", "t1", "t2"], annotate=True)
    np.testing.assert_allclose(ax.get_images()[0].get_array(), sim.numpy())
    assert [t.get_text() for t in ax.get_yticklabels()] == ["i0", "i1"]
    assert sorted(t.get_text() for t in ax.texts) == sorted(f"{v:.2f}" for v in sim.flatten().tolist())
    with pytest.raises(ValueError, match=r"expected a 2-d similarity matrix, got shape \(3,\)"):
        similarity_heatmap(np.zeros(3))


def test_text_to_image_grid_frames_follow_is_positive():
    images = np.random.default_rng(0).integers(0, 255, (6, 8, 8, 3), dtype=np.uint8)
    top = torch.tensor([[0, 3, 5], [2, 1, 4]])
    pos = torch.tensor([[True, False, True], [False, False, True]])
    fig = text_to_image_grid(["a red sphere", "x" * 80], images, top, pos, max_chars=20)
    axes = np.array(fig.axes).reshape(2, 3)
    green, red = mcolors.to_rgba("limegreen"), mcolors.to_rgba("crimson")
    for r in range(2):
        for c in range(3):
            want = green if pos[r, c] else red
            assert all(s.get_edgecolor() == want for s in axes[r, c].spines.values()), (r, c)
            assert np.array_equal(axes[r, c].get_images()[0].get_array(), images[int(top[r, c])])
    assert axes[0, 0].get_ylabel() == "a red sphere"
    assert axes[1, 0].get_ylabel() == "x" * 19 + "…"


def test_image_to_text_html_marks_and_escapes():
    images = np.zeros((2, 8, 8, 3), np.uint8)
    texts = ["a <b>bold</b> cube", "एक लाल गोला", "赤い球", "a & b"]
    top = torch.tensor([[1, 0], [3, 2]])
    pos = torch.tensor([[True, False], [False, True]])
    out = image_to_text_html(images, texts, top, pos, scores=torch.tensor([[0.91, 0.5], [0.3, 0.25]]))
    items = re.findall(r"<li>(.*?)</li>", out)
    assert items == ["✓ एक लाल गोला <small>(0.91)</small>", "✗ a &lt;b&gt;bold&lt;/b&gt; cube <small>(0.50)</small>",
                     "✗ a &amp; b <small>(0.30)</small>", "✓ 赤い球 <small>(0.25)</small>"]
    assert out.count("<img src=\"data:image/png;base64,") == 2 and "<b>bold" not in out
    assert "<small>" not in image_to_text_html(images, texts, top, pos)


def test_results_table_bolds_best_per_column():
    rows = {"ours": {"R@1": 50.0, "loss": 0.30, "n": 3}, "base<line>": {"R@1": 40.0, "loss": 0.20, "n": 5},
            "other": {"R@1": 45.5, "loss": 0.25}}
    out = results_table_html(rows, higher_is_better={"loss": False})
    body = re.findall(r"<tr><th>(.*?)</th>(.*?)</tr>", out)
    cells = {name: re.findall(r"<td>(.*?)</td>", rest) for name, rest in body}
    assert cells["ours"] == ["<b>50.0</b>", "0.3", "3"]
    assert cells["base&lt;line&gt;"] == ["40.0", "<b>0.2</b>", "<b>5</b>"]  # loss: lower is better
    assert cells["other"] == ["45.5", "0.2", ""]  # 0.25 -> "0.2" (round half to even); no n: empty cell
    assert "<th>R@1</th><th>loss</th><th>n</th>" in out
    plain = results_table_html(rows, columns=["R@1"], bold_best=False, fmt="{:.2f}")
    assert "<b>" not in plain and "50.00" in plain and "loss" not in plain


def test_results_table_min_is_better_only_for_named_columns():
    rows = {"a": {"err": 1.0, "acc": 0.9}, "b": {"err": 2.0, "acc": 0.95}}
    out = results_table_html(rows, higher_is_better={"err": False}, fmt="{:.2f}")
    assert "<b>1.00</b>" in out and "<b>2.00</b>" not in out
    assert "<b>0.95</b>" in out and "<b>0.90</b>" not in out


# ---------------------------------------------------------------- retrieval explorer
@pytest.fixture
def explorer_inputs():
    g = torch.Generator().manual_seed(0)
    images = np.random.default_rng(0).integers(0, 255, (3, 8, 8, 3), dtype=np.uint8)
    img_emb = torch.randn(3, 4, generator=g)
    txt_emb = img_emb.repeat_interleave(2, 0) + 0.01 * torch.randn(6, 4, generator=g)
    texts = [f"caption {i} of image {i // 2}" for i in range(6)]
    return images, texts, img_emb, txt_emb, torch.arange(3), torch.arange(3).repeat_interleave(2)


def test_retrieval_explorer_renders_both_modes(monkeypatch, explorer_inputs):
    images, texts, img_emb, txt_emb, img_ids, txt_ids = explorer_inputs
    grids, tables = [], []
    real_grid, real_html = W.text_to_image_grid, W.image_to_text_html
    monkeypatch.setattr(W, "text_to_image_grid", lambda *a, **k: grids.append(a) or real_grid(*a, **k))
    monkeypatch.setattr(W, "image_to_text_html", lambda *a, **k: tables.append(a) or real_html(*a, **k))
    box = W.retrieval_explorer(images, texts, img_emb, txt_emb, img_ids, txt_ids, k=2)
    import ipywidgets

    assert isinstance(box, ipywidgets.VBox)
    mode, index = box.children[0].children
    assert len(grids) == 1 and grids[0][0] == [texts[0]]
    assert grids[0][2][0, 0].item() == 0 and grids[0][3].tolist() == [[True, False]]  # caption 0 -> image 0 first
    index.value = 5
    assert grids[-1][0] == [texts[5]] and grids[-1][2][0, 0].item() == 2 and bool(grids[-1][3][0, 0])
    mode.value = "image → captions"  # index 5 is out of range for 3 images: clamped, no error
    assert tables and index.max == 2 and index.description == "image #"
    query, _, idx, positive = tables[-1][:4]
    assert set(idx[0].tolist()) == {4, 5} and positive.tolist() == [[True, True]]
    assert np.array_equal(query, images[2:3])
    index.value = 0
    assert set(tables[-1][2][0].tolist()) == {0, 1}
    mode.value = "caption → images"
    assert index.max == 5 and index.description == "caption #"


def test_retrieval_explorer_mismatched_lengths(explorer_inputs):
    images, texts, img_emb, txt_emb, img_ids, txt_ids = explorer_inputs
    with pytest.raises(ValueError, match="3 images for 2 image embeddings.*pass matching lists"):
        W.retrieval_explorer(images, texts, img_emb[:2], txt_emb, img_ids, txt_ids)
    with pytest.raises(ValueError, match="5 captions for 6 text embeddings"):
        W.retrieval_explorer(images, texts[:5], img_emb, txt_emb, img_ids, txt_ids)
