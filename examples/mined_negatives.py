"""Hard-negative mining for any loss, outside the course: a miner's output feeds the triplet loss,
InfoNCE, the masked margin softmax and the contrastive loss alike (pytorch-metric-learning style).

    python examples/mined_negatives.py

Each mined loss is checked against a plain loop over anchors, so the script doubles as a test
(tests/test_mined_negatives.py runs it).
"""

import math

import torch
import torch.nn.functional as F

from mmalign.losses import contrastive_loss, info_nce, mms_loss, triplet_loss
from mmalign.retrieval import similarity
from mmalign.miners import hardest_negatives, semi_hard_negatives


def loop_softmax_loss(sim, neg_i, neg_t, temperature, margin=0.0):
    """Symmetric InfoNCE / MMS over the positive (the diagonal) and each anchor's mined negatives."""
    total = 0.0
    for s, negs in ((sim, neg_i), (sim.T, neg_t)):
        for i in range(s.shape[0]):
            cols = [i] + [int(j) for j in negs[i] if j >= 0]
            logits = [(float(s[i, j]) - (margin if j == i else 0.0)) / temperature for j in cols]
            top = max(logits)
            total += -(logits[0] - top - math.log(sum(math.exp(x - top) for x in logits))) / s.shape[0]
    return total / 2


def loop_contrastive(sim, neg_i, neg_t, margin):
    """Positives pulled, the mined negative pairs (either direction) pushed beyond the margin."""
    n = sim.shape[0]
    pairs = {(i, int(j)) for i in range(n) for j in neg_i[i] if j >= 0} | {(int(i), j) for j in range(n) for i in neg_t[j] if i >= 0}
    pull = sum(2 - 2 * float(sim[i, i]) for i in range(n)) / n
    push = sum(max(0.0, margin - math.sqrt(max(2 - 2 * float(sim[i, j]), 1e-8))) ** 2 for i, j in pairs) / max(len(pairs), 1)
    return 0.5 * (pull + push)


def main(seed: int = 0, batch: int = 16, dim: int = 8) -> dict:
    g = torch.Generator().manual_seed(seed)
    img = F.normalize(torch.randn(batch, dim, generator=g, dtype=torch.float64), dim=1)
    txt = F.normalize(img + 0.8 * torch.randn(batch, dim, generator=g, dtype=torch.float64), dim=1)
    sim = similarity(img, txt)
    results = {}
    for name, (neg_i, neg_t) in {"hardest k=3": hardest_negatives(sim, k=3),
                                 "semi-hard k=2": semi_hard_negatives(sim, margin=0.2, k=2)}.items():
        mined = (neg_i, neg_t)
        got = {
            "triplet": float(triplet_loss(sim, neg_i, neg_t, margin=0.2)),
            "InfoNCE": float(info_nce(img, txt, temperature=0.1, negatives=mined)),
            "MMS": float(mms_loss(img, txt, margin=0.1, temperature=0.1, negatives=mined)),
            "contrastive": float(contrastive_loss(sim, margin=1.0, negatives=mined)),
        }
        want = {
            "InfoNCE": loop_softmax_loss(sim, neg_i, neg_t, 0.1),
            "MMS": loop_softmax_loss(sim, neg_i, neg_t, 0.1, margin=0.1),
            "contrastive": loop_contrastive(sim, neg_i, neg_t, 1.0),
        }
        for loss, value in want.items():
            assert abs(got[loss] - value) < 1e-9, f"{name} {loss}: library {got[loss]} vs loop {value}"
        results[name] = got
    return results


if __name__ == "__main__":
    for miner, losses in main().items():
        print(f"{miner:14s} " + "  ".join(f"{k} {v:.4f}" for k, v in losses.items()))
    print("every mined loss equals its loop")
