"""Chapter 4's loss with extra memory negatives, and chapter 3's collapse indicator, against loops."""

import math

import torch
import torch.nn.functional as F

from mmalign.experiments.memory import info_nce_with_memory
from mmalign.experiments.sampling import image_cosine
from mmalign.losses import info_nce


def _loop_loss(zi, zt, ids, mem, mem_ids, tau):
    zi, zt, mem = F.normalize(zi, dim=-1), F.normalize(zt, dim=-1), F.normalize(mem, dim=-1)
    b = len(ids)
    i2t = t2i = 0.0
    for a in range(b):  # image anchors: in-batch captions, positives = same id
        logits = [float(zi[a] @ zt[j]) / tau for j in range(b)]
        lse = math.log(sum(math.exp(v) for v in logits))
        pos = [j for j in range(b) if ids[j] == ids[a]]
        i2t += -sum(logits[j] - lse for j in pos) / len(pos)
    for a in range(b):  # caption anchors: batch images + memory images of other ids
        logits = [float(zt[a] @ zi[j]) / tau for j in range(b)]
        extra = [float(zt[a] @ mem[r]) / tau for r in range(len(mem_ids)) if mem_ids[r] != ids[a]]
        lse = math.log(sum(math.exp(v) for v in logits + extra))
        pos = [j for j in range(b) if ids[j] == ids[a]]
        t2i += -sum(logits[j] - lse for j in pos) / len(pos)
    return 0.5 * (i2t / b + t2i / b)


def test_memory_loss_matches_loop():
    g = torch.Generator().manual_seed(0)
    zi, zt = torch.randn(6, 4, generator=g, dtype=torch.float64), torch.randn(6, 4, generator=g, dtype=torch.float64)
    ids = torch.tensor([0, 1, 1, 2, 3, 4])
    mem = torch.randn(5, 4, generator=g, dtype=torch.float64)
    mem_ids = torch.tensor([1, 7, 8, 0, 9])  # two entries share an id with batch items: masked for those anchors
    got = info_nce_with_memory(zi, zt, ids, mem, mem_ids, 0.1)
    assert math.isclose(float(got), _loop_loss(zi, zt, ids, mem, mem_ids, 0.1), rel_tol=1e-9)


def test_empty_memory_is_info_nce_and_gradients_are_finite():
    g = torch.Generator().manual_seed(1)
    zi = torch.randn(8, 5, generator=g, dtype=torch.float64, requires_grad=True)
    zt = torch.randn(8, 5, generator=g, dtype=torch.float64)
    ids = torch.tensor([0, 0, 1, 2, 3, 3, 4, 5])
    empty = info_nce_with_memory(zi, zt, ids, zi[:0].detach(), ids[:0], 0.07)
    assert torch.allclose(empty, info_nce(zi, zt, temperature=0.07, ids=ids), atol=1e-12)
    mem = torch.randn(4, 5, generator=g, dtype=torch.float64, requires_grad=True)
    loss = info_nce_with_memory(zi, zt, ids, mem, torch.tensor([0, 0, 0, 0]), 0.05)  # masked for anchors of id 0
    loss.backward()
    assert torch.isfinite(zi.grad).all() and torch.isfinite(mem.grad).all()


def test_image_cosine_hand_cases():
    ids = torch.tensor([0, 1, 2])
    assert math.isclose(image_cosine(torch.ones(3, 4), ids), 1.0, rel_tol=1e-6)  # collapsed
    assert abs(image_cosine(torch.eye(3), ids)) < 1e-7  # orthogonal
    # same-scene pairs are left out: rows 0 and 1 share a scene, only (0,2), (1,2) and mirrors count
    z = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    assert abs(image_cosine(z, torch.tensor([5, 5, 6]))) < 1e-7
