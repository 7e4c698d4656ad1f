"""Chapter 01's helpers: the cosine pair loss and the pair cosines, against naive loops."""

import math

import pytest
import torch
import torch.nn.functional as F

from mmalign.config import load_config
from mmalign.experiments import dual_encoders as de
from mmalign.losses import make_signed_pairs
from mmalign.models.heads import DualEncoder


def test_cosine_pair_loss_equals_a_loop_over_the_drawn_pairs():
    g = torch.Generator().manual_seed(1)
    zi, zt = torch.randn(10, 5, generator=g, dtype=torch.float64), torch.randn(10, 5, generator=g, dtype=torch.float64)
    ids = torch.tensor([0, 0, 1, 2, 3, 4, 4, 5, 6, 7])
    loss = de.cosine_pair_loss(margin=0.25, negatives_per_positive=3, seed=7)(zi, zt, ids)
    ia, ib, y = make_signed_pairs(10, negatives_per_positive=3, generator=torch.Generator().manual_seed(7), ids=ids)
    terms = []
    for i, j, t in zip(ia.tolist(), ib.tolist(), y.tolist()):
        c = float(zi[i] @ zt[j] / (zi[i].norm() * zt[j].norm()))
        assert (ids[i] == ids[j]) == (t == 1)  # -1 pairs never share a scene
        terms.append(1 - c if t == 1 else max(0.0, c - 0.25))
    assert math.isclose(float(loss), sum(terms) / len(terms), rel_tol=1e-12)


def test_pair_cosines_loop():
    class Split:
        image = torch.randn(4, 3, dtype=torch.float64)
        text = torch.randn(8, 3, dtype=torch.float64)
        image_ids = torch.arange(4)
        text_ids = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])

    model = DualEncoder(torch.nn.Identity(), torch.nn.Identity())
    pos, neg = de.pair_cosines(model, Split)
    expected_pos, expected_neg = [], []
    for i in range(4):
        for j in range(8):
            c = float(F.cosine_similarity(Split.image[i], Split.text[j], dim=0))
            (expected_pos if Split.text_ids[j] == i else expected_neg).append(c)
    assert pos.tolist() == pytest.approx(expected_pos) and neg.tolist() == pytest.approx(expected_neg)


def test_optimizer_settings_scale_lr_by_sqrt_of_the_batch_factor():
    cfg = load_config("ci")
    s = de.optimizer_settings(cfg)
    big = cfg.batch_size * de.LARGE_BATCH_FACTOR
    assert s[f"Adam, B={big}"]["lr"] == pytest.approx(cfg.lr * math.sqrt(de.LARGE_BATCH_FACTOR))
    assert s[f"LAMB, B={big}"]["lr"] == pytest.approx(de.LAMB_LR * math.sqrt(de.LARGE_BATCH_FACTOR))
    assert {v["optimizer"] for v in s.values()} == {"adam", "lamb"}
    assert de.chapter_epochs(cfg) == 5 and de.chapter_epochs(load_config("full")) == 8
