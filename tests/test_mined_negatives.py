"""A miner's output feeds every loss: InfoNCE, MMS and the contrastive loss take ``negatives=`` (the
triplet loss always did), checked against loops, the full batch as a special case, and bad input."""

import runpy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from mmalign.losses import contrastive_loss, info_nce, mms_loss
from mmalign.retrieval import similarity
from mmalign.miners import hardest_negatives, random_negatives

ROOT = Path(__file__).resolve().parents[1]


def batch(n=6, d=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=1),
            F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=1))


def test_the_example_script_runs_and_matches_its_loops():
    results = runpy.run_path(str(ROOT / "examples" / "mined_negatives.py"))["main"](seed=3)
    assert set(results) == {"hardest k=3", "semi-hard k=2"}
    assert all(set(r) == {"triplet", "InfoNCE", "MMS", "contrastive"} for r in results.values())


def all_negatives(n):
    others = torch.stack([torch.tensor([j for j in range(n) if j != i]) for i in range(n)])
    return others, others.clone()


def test_every_negative_mined_equals_the_whole_batch():
    a, b = batch()
    mined = all_negatives(6)
    torch.testing.assert_close(info_nce(a, b, temperature=0.1, negatives=mined), info_nce(a, b, temperature=0.1))
    torch.testing.assert_close(mms_loss(a, b, temperature=0.1, margin=0.2, negatives=mined), mms_loss(a, b, temperature=0.1, margin=0.2))
    sim = similarity(a, b)
    torch.testing.assert_close(contrastive_loss(sim, negatives=mined), contrastive_loss(sim))


def test_hand_worked_one_negative_each():
    a, b = batch(3)
    s = similarity(a, b) / 0.5
    neg = torch.tensor([[1], [-1], [0]])  # row 1 has none: its loss is -log 1 = 0
    expected_ab = (torch.logsumexp(s[0, [0, 1]], 0) - s[0, 0] + 0 + torch.logsumexp(s[2, [2, 0]], 0) - s[2, 2]) / 3
    expected_ba = (torch.logsumexp(s.T[0, [0, 1]], 0) - s[0, 0] + 0 + torch.logsumexp(s.T[2, [2, 0]], 0) - s[2, 2]) / 3
    got = info_nce(a, b, temperature=0.5, negatives=(neg, neg))
    torch.testing.assert_close(got, 0.5 * (expected_ab + expected_ba))


def test_mined_info_nce_with_several_positives_and_gradients():
    a, b = batch(4)
    ids = torch.tensor([0, 0, 1, 2])
    sim = similarity(a, b)
    mined = hardest_negatives(sim, ids=ids, k=1)
    a.requires_grad_(True)
    loss = info_nce(a, b, temperature=0.1, ids=ids, negatives=mined)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(a.grad).all() and a.grad.abs().sum() > 0
    assert torch.autograd.gradcheck(lambda x: info_nce(x, b, temperature=0.1, ids=ids, negatives=mined),
                                    (a.detach().clone().requires_grad_(True),))


def test_random_negatives_feed_mms_at_low_temperature_without_nan():
    a, b = batch(8)
    mined = random_negatives(similarity(a, b), k=2, generator=torch.Generator().manual_seed(0))
    loss = mms_loss(a.float(), b.float(), temperature=0.01, margin=0.2, negatives=mined)
    assert torch.isfinite(loss)


@pytest.mark.parametrize("negatives,match", [
    (torch.zeros(6, 1, dtype=torch.long), "miner's output, a pair"),
    ((torch.zeros(6, 1), torch.zeros(6, 1, dtype=torch.long)), "integer indices"),
    ((torch.zeros(5, 1, dtype=torch.long), torch.zeros(6, 1, dtype=torch.long)), r"must be \(6, k\)"),
    ((torch.full((6, 1), 6), torch.zeros(6, 1, dtype=torch.long)), r"outside \[-1, 5\]"),
    ((torch.full((6, 1), -2), torch.zeros(6, 1, dtype=torch.long)), r"outside \[-1, 5\]"),
    (([0] * 6, torch.zeros(6, 1, dtype=torch.long)), "LongTensor of indices"),
])
def test_bad_negatives(negatives, match):
    a, b = batch()
    for call in (lambda: info_nce(a, b, negatives=negatives), lambda: mms_loss(a, b, negatives=negatives),
                 lambda: contrastive_loss(similarity(a, b), negatives=negatives)):
        with pytest.raises((ValueError, TypeError), match=match):
            call()
