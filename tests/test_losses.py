"""Each loss against an independent computation: naive Python loops in float64, closed forms and
hand-worked cases; plus gradients, extreme temperatures/margins, half precision and bad input."""

import math

import pytest
import torch
import torch.nn.functional as F

from mmalign.losses.contrastive import contrastive_loss
from mmalign.losses.cosine_embedding import cosine_embedding_loss, make_signed_pairs
from mmalign.losses.hypersphere import hypersphere_loss
from mmalign.losses.info_nce import info_nce
from mmalign.retrieval import similarity
from mmalign.losses.mms import AdaptiveMargin, ScheduledMargin, mms_loss
from mmalign.losses.triplet import triplet_loss, triplet_loss_embeddings

D64 = torch.float64


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=D64)


def cos_list(a, b):
    """Cosine similarity matrix as nested Python floats (independent of the library)."""
    def norm(v):
        return math.sqrt(sum(x * x for x in v))
    a, b = a.tolist(), b.tolist()
    return [[sum(x * y for x, y in zip(u, v)) / (norm(u) * norm(v)) for v in b] for u in a]


def ce_loop(row, target_cols):
    """-mean_{j in targets} log softmax(row)_j, in plain Python floats."""
    mx = max(row)
    lse = mx + math.log(sum(math.exp(x - mx) for x in row))
    return -sum(row[j] - lse for j in target_cols) / len(target_cols)


# ----------------------------------------------------------------------------------------- InfoNCE


def test_info_nce_diagonal_equals_cross_entropy():
    a, b = randn(7, 5, seed=1), randn(7, 5, seed=2)
    logits = a @ b.T / 0.5
    want = 0.5 * (F.cross_entropy(logits, torch.arange(7)) + F.cross_entropy(logits.T, torch.arange(7)))
    got = info_nce(a, b, temperature=0.5, normalize=False)
    assert got.dtype == D64
    torch.testing.assert_close(got, want)


def test_info_nce_multi_positive_matches_loop():
    a, b = randn(6, 4, seed=3), randn(8, 4, seed=4)
    la, lb = torch.tensor([0, 0, 1, 2, 3, 3]), torch.tensor([0, 1, 1, 2, 3, 0, 2, 3])
    tau = 0.1
    s = [[x / tau for x in row] for row in cos_list(a, b)]
    st = [list(col) for col in zip(*s)]
    l_ab = sum(ce_loop(s[i], [j for j in range(8) if lb[j] == la[i]]) for i in range(6)) / 6
    l_ba = sum(ce_loop(st[j], [i for i in range(6) if la[i] == lb[j]]) for j in range(8)) / 8
    got = info_nce(a, b, temperature=tau, ids=(la, lb))
    assert got.item() == pytest.approx(0.5 * (l_ab + l_ba), rel=1e-10)


def test_info_nce_errors():
    with pytest.raises(ValueError, match="temperature"):
        info_nce(randn(3, 2), randn(3, 2), temperature=0)
    with pytest.raises(ValueError, match="same length"):
        info_nce(randn(3, 2), randn(4, 2))
    with pytest.raises(ValueError, match="at least one positive"):
        info_nce(randn(2, 2), randn(2, 2), ids=(torch.tensor([0, 5]), torch.tensor([0, 1])))


def test_similarity_float32_under_autocast_and_keeps_float64():
    a, b = randn(5, 8, seed=5).float(), randn(5, 8, seed=6).float()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        s = similarity(a, b)
        loss = info_nce(a, b, temperature=0.01)
    assert s.dtype == torch.float32 and loss.dtype == torch.float32
    torch.testing.assert_close(loss, info_nce(a, b, temperature=0.01))
    assert similarity(a.double(), b.double()).dtype == D64


# ---------------------------------------------------------------------------------------- Triplet


def test_triplet_hand_worked():
    # S = [[.9 .5 .1], [.3 .8 .7], [.2 .7 .4]], margin .2
    # image anchors (row i, neg column):  i=0,j=1: .2-.9+.5=-.2 -> 0;  i=1,j=2: .2-.8+.7=.1;  i=2,j=1: .2-.4+.7=.5
    # caption anchors (col i, neg row):   i=0,r=1: .2-.9+.3=-.4 -> 0;  i=1,r=2: .2-.8+.7=.1;  i=2: -1 ignored
    # sum = .7 over 5 valid terms -> mean .14
    s = torch.tensor([[0.9, 0.5, 0.1], [0.3, 0.8, 0.7], [0.2, 0.7, 0.4]], dtype=D64)
    ni, nt = torch.tensor([[1], [2], [1]]), torch.tensor([[1], [2], [-1]])
    assert triplet_loss(s, ni, nt, margin=0.2).item() == pytest.approx(0.14)
    assert triplet_loss(s, ni, nt, margin=0.2, reduction="sum").item() == pytest.approx(0.7)
    assert triplet_loss(s, ni[:, 0], nt[:, 0], margin=0.2).item() == pytest.approx(0.14)  # (B,) means k = 1


def triplet_loop(s, ni, nt, m):
    s, terms = s.tolist(), []
    for i, row in enumerate(ni.tolist()):
        terms += [max(0.0, m - s[i][i] + s[i][j]) for j in row if j >= 0]
    for i, row in enumerate(nt.tolist()):
        terms += [max(0.0, m - s[i][i] + s[r][i]) for r in row if r >= 0]
    return sum(terms) / max(len(terms), 1)


def random_negative_indices(n, k, seed):
    g = torch.Generator().manual_seed(seed)
    neg = torch.randint(0, n - 1, (n, k), generator=g)
    neg = neg + (neg >= torch.arange(n)[:, None]).long()  # skip the diagonal
    neg[torch.rand(n, k, generator=g) < 0.3] = -1
    return neg


@pytest.mark.parametrize("margin", [0.0, 0.2, 1.0, 10.0])
def test_triplet_matches_loop(margin):
    s = torch.tanh(randn(9, 9, seed=7))
    ni, nt = random_negative_indices(9, 4, 8), random_negative_indices(9, 3, 9)
    assert triplet_loss(s, ni, nt, margin=margin).item() == pytest.approx(triplet_loop(s, ni, nt, margin), rel=1e-12)


def test_triplet_large_margin_closed_form_and_all_ignored():
    s = torch.tanh(randn(5, 5, seed=10))
    ni = nt = torch.tensor([[1], [0], [0], [0], [0]])
    # with margin 10 every hinge is active: mean of 10 - S_ii + S_neg
    want = torch.cat([10 - s.diagonal() + s[torch.arange(5), ni[:, 0]], 10 - s.diagonal() + s[ni[:, 0], torch.arange(5)]]).mean()
    torch.testing.assert_close(triplet_loss(s, ni, nt, margin=10.0), want)
    none = torch.full((5, 2), -1)
    s.requires_grad_(True)
    loss = triplet_loss(s, none, none)
    loss.backward()
    assert loss.item() == 0 and s.grad is not None


def test_triplet_gradcheck_and_embeddings():
    s = torch.tanh(randn(5, 5, seed=11)).requires_grad_(True)
    ni, nt = random_negative_indices(5, 2, 12), random_negative_indices(5, 2, 13)
    assert torch.autograd.gradcheck(lambda x: triplet_loss(x, ni, nt, margin=0.3), (s,))
    img, txt = randn(5, 3, seed=14), randn(5, 3, seed=15)
    want = triplet_loop(torch.tensor(cos_list(img, txt), dtype=D64), ni, nt, 0.3)
    assert triplet_loss_embeddings(img, txt, ni, nt, margin=0.3).item() == pytest.approx(want, rel=1e-10)


def test_triplet_half_precision():
    img, txt = randn(6, 8, seed=16), randn(6, 8, seed=17)
    ni, nt = random_negative_indices(6, 2, 18), random_negative_indices(6, 2, 19)
    ref = triplet_loss_embeddings(img, txt, ni, nt)
    for dt in (torch.float16, torch.bfloat16):
        got = triplet_loss_embeddings(img.to(dt), txt.to(dt), ni, nt)
        assert got.dtype == torch.float32 and torch.isfinite(got)
        assert got.item() == pytest.approx(ref.item(), abs=2e-2)


def test_triplet_errors():
    s = torch.zeros(3, 3)
    ok = torch.tensor([[1], [2], [0]])
    with pytest.raises(ValueError, match="square"):
        triplet_loss(torch.zeros(3, 4), ok, ok)
    with pytest.raises(ValueError, match="out of range"):
        triplet_loss(s, torch.tensor([[1], [3], [0]]), ok)
    with pytest.raises(ValueError, match="out of range"):
        triplet_loss(s, ok, torch.tensor([[1], [-2], [0]]))
    with pytest.raises(ValueError, match="own positive"):
        triplet_loss(s, torch.tensor([[0], [2], [0]]), ok)
    with pytest.raises(ValueError, match="integer"):
        triplet_loss(s, ok.float(), ok)
    with pytest.raises(ValueError, match=r"shape \(3, k\)"):
        triplet_loss(s, ok[:2], ok)
    with pytest.raises(ValueError, match="margin"):
        triplet_loss(s, ok, ok, margin=-1)
    # the index scans are value scans: off under checks.disabled() (structural checks stay on)
    from mmalign import checks
    own = torch.tensor([[0], [2], [0]])
    with checks.disabled():
        sim = torch.tensor([[0.9, 0.1, 0.2], [0.3, 0.8, 0.1], [0.2, 0.4, 0.7]])
        want = (torch.relu(0.2 - sim.diagonal() + torch.tensor([0.9, 0.1, 0.2])).sum()
                + torch.relu(0.2 - sim.diagonal() + sim[[1, 2, 0], [0, 1, 2]]).sum()) / 6
        assert torch.allclose(triplet_loss(sim, own, ok), want)  # the formula on what it was given
        with pytest.raises(ValueError, match=r"shape \(3, k\)"):
            triplet_loss(s, ok[:2], ok)
    with pytest.raises(ValueError, match="reduction"):
        triplet_loss(s, ok, ok, reduction="none")


# ------------------------------------------------------------------------------------ Contrastive


def test_contrastive_hand_worked():
    # S = [[1, .5], [-1, 0]], margin 1.5.  d^2 = 2 - 2S.
    # positives (diagonal): d^2 = 0 and 2 -> mean 1
    # negatives: S=.5 -> d=1 -> (1.5-1)^2 = .25;  S=-1 -> d=2 -> 0.  mean .125
    # L = (1 + .125) / 2 = .5625
    s = torch.tensor([[1.0, 0.5], [-1.0, 0.0]], dtype=D64)
    assert contrastive_loss(s, margin=1.5).item() == pytest.approx(0.5625)


@pytest.mark.parametrize("margin", [0.5, 1.4, 2.0])
def test_contrastive_matches_loop_with_label_mask(margin):
    a, b = randn(8, 5, seed=20), randn(8, 5, seed=21)
    ids = torch.tensor([0, 0, 1, 2, 2, 2, 3, 4])
    s = cos_list(a, b)
    pos, neg = [], []
    for i in range(8):
        for j in range(8):
            d = math.sqrt(2 - 2 * s[i][j])
            (pos if ids[i] == ids[j] else neg).append(d * d if ids[i] == ids[j] else max(0.0, margin - d) ** 2)
    want = 0.5 * (sum(pos) / len(pos) + sum(neg) / len(neg))
    got = contrastive_loss(similarity(a, b), margin=margin, ids=ids)
    assert got.item() == pytest.approx(want, rel=1e-10)


def test_contrastive_gradcheck_half_and_single_item_batch():
    a, b = randn(5, 4, seed=22).requires_grad_(True), randn(5, 4, seed=23)
    ids = torch.tensor([0, 1, 1, 2, 3])
    assert torch.autograd.gradcheck(lambda x: contrastive_loss(similarity(x, b), margin=1.2, ids=ids), (a,))
    ref = contrastive_loss(similarity(a, b), ids=ids)
    got = contrastive_loss(similarity(a.detach().half(), b.half()), ids=ids)
    assert torch.isfinite(got) and got.item() == pytest.approx(ref.item(), abs=1e-2)
    # every pair positive: no negatives, the push term is 0 and nothing is NaN
    same = contrastive_loss(similarity(a, b), ids=torch.zeros(5, dtype=torch.long))
    assert torch.isfinite(same)


def test_contrastive_errors():
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        contrastive_loss(torch.tensor([[14.0, 0.0], [0.0, 1.0]]))  # logits divided by a temperature
    with pytest.raises(ValueError, match="margin"):
        contrastive_loss(torch.eye(2), margin=3.0)
    with pytest.raises(ValueError, match="square"):
        contrastive_loss(torch.zeros(2, 3))
    with pytest.raises(ValueError, match="ids of rows must be 1-d"):
        contrastive_loss(torch.eye(3), ids=torch.tensor([0, 1]))


# ------------------------------------------------------------------------------ Cosine embedding


def test_cosine_embedding_hand_and_torch():
    # pair 0: cos([1,0],[1,1]) = 1/sqrt2, target +1 -> 1 - 1/sqrt2
    # pair 1: cos([1,0],[1,1]) = 1/sqrt2, target -1, margin .5 -> 1/sqrt2 - .5
    # pair 2: cos([1,0],[0,1]) = 0, target -1 -> max(0, 0 - .5) = 0
    a = torch.tensor([[1.0, 0], [1, 0], [1, 0]], dtype=D64)
    b = torch.tensor([[1.0, 1], [1, 1], [0, 1]], dtype=D64)
    y = torch.tensor([1, -1, -1])
    r = 1 / math.sqrt(2)
    assert cosine_embedding_loss(a, b, y, margin=0.5).item() == pytest.approx((1 - r + r - 0.5 + 0) / 3)
    a, b = randn(20, 6, seed=24), randn(20, 6, seed=25)
    y = torch.where(torch.rand(20, generator=torch.Generator().manual_seed(0)) < 0.5, 1, -1)
    for m in (-0.5, 0.0, 0.3, 1.0):
        torch.testing.assert_close(cosine_embedding_loss(a, b, y, margin=m), F.cosine_embedding_loss(a, b, y, margin=m))


def test_cosine_embedding_gradcheck_and_half():
    a, b = randn(6, 4, seed=26).requires_grad_(True), randn(6, 4, seed=27)
    y = torch.tensor([1, -1, 1, -1, -1, 1])
    assert torch.autograd.gradcheck(lambda x: cosine_embedding_loss(x, b, y, margin=0.1), (a,))
    got = cosine_embedding_loss(a.detach().bfloat16(), b.bfloat16(), y, margin=0.1)
    assert got.dtype == torch.float32 and torch.isfinite(got)


def test_cosine_embedding_errors():
    a = randn(3, 2)
    with pytest.raises(ValueError, match=r"\+1"):
        cosine_embedding_loss(a, a, torch.tensor([1, 0, 1]))
    with pytest.raises(ValueError, match=r"shape \(3,\)"):
        cosine_embedding_loss(a, a, torch.tensor([1, -1]))
    with pytest.raises(ValueError, match="same length"):
        cosine_embedding_loss(a, randn(4, 2), torch.tensor([1, -1, 1]))
    with pytest.raises(ValueError, match="margin"):
        cosine_embedding_loss(a, a, torch.tensor([1, -1, 1]), margin=2)


def test_make_signed_pairs():
    ids = torch.tensor([0, 0, 1, 2, 2, 3])
    ia, ib, y = make_signed_pairs(6, negatives_per_positive=3, generator=torch.Generator().manual_seed(0), ids=ids)
    assert torch.equal(ia[:6], torch.arange(6)) and torch.equal(ib[:6], torch.arange(6)) and (y[:6] == 1).all()
    assert (y[6:] == -1).all() and len(y) == 6 + 6 * 3  # every anchor has >= 3 other-item columns
    assert (ids[ia[6:]] != ids[ib[6:]]).all()  # a negative never shares an item id
    for i in range(6):  # distinct negatives per anchor
        cols = ib[6:][ia[6:] == i]
        assert len(set(cols.tolist())) == len(cols) == 3
    again = make_signed_pairs(6, negatives_per_positive=3, generator=torch.Generator().manual_seed(0), ids=ids)
    assert all(torch.equal(x, z) for x, z in zip((ia, ib, y), again))  # seeded
    # fewer valid negatives than asked: take what exists
    ia, ib, y = make_signed_pairs(3, negatives_per_positive=5, generator=torch.Generator().manual_seed(1), ids=torch.tensor([0, 0, 1]))
    assert sorted(zip(ia[3:].tolist(), ib[3:].tolist())) == [(0, 2), (1, 2), (2, 0), (2, 1)]
    # all draws uniform: column counts over many seeds are balanced
    counts = torch.zeros(4)
    for s in range(300):
        _, ib, _ = make_signed_pairs(4, negatives_per_positive=1, generator=torch.Generator().manual_seed(s))
        counts += torch.bincount(ib[4:], minlength=4)
    assert counts.min() > 250 and counts.max() < 350  # 300 expected per column
    with pytest.raises(ValueError, match="ids must have shape"):
        make_signed_pairs(3, negatives_per_positive=1, generator=None, ids=torch.tensor([0, 1]))


# ---------------------------------------------------------------------------------------- MMS


def mms_loop(a, b, tau, m_ab, m_ba, ids=None):
    s = cos_list(a, b)
    n = len(s)
    ids = list(range(n)) if ids is None else ids.tolist()

    def direction(sim, m):
        total = 0.0
        for i in range(n):
            cols = [k for k in range(n) if k == i or ids[k] != ids[i]]  # drop the masked set Z
            row = [(sim[i][k] - (m[i] if k == i else 0.0)) / tau for k in cols]
            total += ce_loop(row, [cols.index(i)])
        return total / n

    st = [list(c) for c in zip(*s)]
    return 0.5 * (direction(s, m_ab) + direction(st, m_ba))


def test_mms_hand_worked():
    # a = e1, e2; b = (1, 0), (.6, .8) -> S = [[1, .6], [0, .8]]; tau = 1, M = .1
    # a->b rows: [.9, .6] -> log(1+e^-.3) = .554355;  [0, .7] -> log(1+e^-.7) = .403186;  mean .478771
    # b->a rows (S^T): [.9, 0] -> log(1+e^-.9) = .341154;  [.6, .7] -> log(1+e^-.1) = .644397;  mean .492775
    # L = (.478771 + .492775) / 2 = .485773
    a = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=D64)
    b = torch.tensor([[1.0, 0.0], [0.6, 0.8]], dtype=D64)
    assert mms_loss(a, b, temperature=1.0, margin=0.1).item() == pytest.approx(0.485773, abs=1e-6)


@pytest.mark.parametrize("tau", [1.0, 0.07, 0.01])
def test_mms_zero_margin_equals_info_nce(tau):
    a, b = randn(10, 6, seed=30), randn(10, 6, seed=31)
    torch.testing.assert_close(mms_loss(a, b, temperature=tau, margin=0.0), info_nce(a, b, temperature=tau))


@pytest.mark.parametrize("tau,margin", [(0.07, 0.2), (0.01, 0.5), (1.0, -0.3), (0.05, 5.0)])
def test_mms_matches_loop_with_mask(tau, margin):
    a, b = randn(8, 5, seed=32), randn(8, 5, seed=33)
    ids = torch.tensor([0, 1, 1, 2, 3, 3, 3, 4])
    want = mms_loop(a, b, tau, [margin] * 8, [margin] * 8, ids)
    got = mms_loss(a, b, temperature=tau, margin=margin, ids=ids)
    assert torch.isfinite(got) and got.item() == pytest.approx(want, rel=1e-9)


def test_mms_per_anchor_margins_and_gradcheck():
    a, b = randn(5, 3, seed=34).requires_grad_(True), randn(5, 3, seed=35).requires_grad_(True)
    m_ab, m_ba = randn(5, seed=36) * 0.1, randn(5, seed=37) * 0.1
    ids = torch.tensor([0, 0, 1, 2, 3])
    want = mms_loop(a.detach(), b.detach(), 0.2, m_ab.tolist(), m_ba.tolist(), ids)
    assert mms_loss(a, b, temperature=0.2, margin=(m_ab, m_ba), ids=ids).item() == pytest.approx(want, rel=1e-10)
    assert torch.autograd.gradcheck(lambda x, y: mms_loss(x, y, temperature=0.2, margin=(m_ab, m_ba), ids=ids), (a, b))
    # a (B,) margin is used for both directions
    want = mms_loop(a.detach(), b.detach(), 0.2, m_ab.tolist(), m_ab.tolist())
    assert mms_loss(a, b, temperature=0.2, margin=m_ab).item() == pytest.approx(want, rel=1e-10)


def test_mms_margin_is_detached():
    a, b = randn(4, 3, seed=38).requires_grad_(True), randn(4, 3, seed=39)
    m = (a * 0).sum(1) + 0.3  # a margin that depends on a
    mms_loss(a, b, margin=m).backward()
    g1 = a.grad.clone()
    a.grad = None
    mms_loss(a, b, margin=0.3).backward()
    torch.testing.assert_close(g1, a.grad)


def test_mms_half_autocast_and_extreme_temperature():
    a, b = randn(16, 32, seed=40).float(), randn(16, 32, seed=41).float()
    ref = mms_loss(a, b, temperature=0.01, margin=0.2)
    assert torch.isfinite(ref)
    for dt in (torch.float16, torch.bfloat16):
        got = mms_loss(a.to(dt), b.to(dt), temperature=0.01, margin=0.2)
        assert got.dtype == torch.float32 and torch.isfinite(got)
        assert got.item() == pytest.approx(ref.item(), rel=5e-2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = mms_loss(a, b, temperature=0.01, margin=0.2)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, ref)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_mms_cuda_fp16_autocast():
    a, b = randn(64, 32, seed=42).float(), randn(64, 32, seed=43).float()
    ids = torch.arange(64) // 2
    ref = mms_loss(a, b, temperature=0.01, margin=0.2, ids=ids)
    with torch.autocast("cuda", dtype=torch.float16):
        got = mms_loss(a.cuda().half(), b.cuda().half(), temperature=0.01, margin=AdaptiveMargin()(a.cuda(), b.cuda(), ids=ids.cuda()), ids=ids.cuda())
        got_const = mms_loss(a.cuda(), b.cuda(), temperature=0.01, margin=0.2, ids=ids.cuda())
    assert got.device.type == "cuda" and got.dtype == torch.float32 and torch.isfinite(got)
    assert got_const.item() == pytest.approx(ref.item(), rel=1e-4)


def test_mms_errors():
    a = randn(4, 3)
    with pytest.raises(ValueError, match="temperature"):
        mms_loss(a, a, temperature=-1, margin=0.1)
    with pytest.raises(ValueError, match="same length"):
        mms_loss(a, randn(5, 3), margin=0.1)
    with pytest.raises(ValueError, match=r"\(4,\) tensor"):
        mms_loss(a, a, margin=torch.zeros(3))
    with pytest.raises(ValueError, match="pair"):
        mms_loss(a, a, margin=(torch.zeros(4),))
    with pytest.raises(ValueError, match="embedding sizes"):
        mms_loss(a, randn(4, 2), margin=0.1)


def test_scheduled_margin():
    sched = ScheduledMargin(start=0.001, factor=1.002, every=1000)
    values = []
    for _ in range(3001):
        values.append(sched.value)
        sched.step()
    assert values[0] == values[999] == 0.001
    assert values[1000] == pytest.approx(0.001 * 1.002) and values[2999] == pytest.approx(0.001 * 1.002**2)
    assert values[3000] == pytest.approx(0.001 * 1.002**3)
    capped = ScheduledMargin(start=0.1, factor=2.0, every=1, max_margin=0.5)
    seq = []
    for _ in range(5):
        seq.append(capped.value)
        capped.step()
    assert seq == pytest.approx([0.1, 0.2, 0.4, 0.5, 0.5])
    resumed = ScheduledMargin()
    resumed.load_state_dict(capped.state_dict())
    assert resumed.value == capped.value == 0.5 and resumed.num_steps == 5
    with pytest.raises(ValueError, match="factor"):
        ScheduledMargin(factor=0.5)


def test_adaptive_margin_matches_loop():
    a, b = randn(6, 4, seed=44), randn(6, 4, seed=45)
    ids = torch.tensor([0, 0, 1, 2, 3, 3])
    s = cos_list(a, b)
    m_ab, m_ba = AdaptiveMargin(alpha=0.5)(a, b, ids=ids)
    for i in range(6):
        row = [s[i][j] for j in range(6) if ids[j] != ids[i]]
        col = [s[j][i] for j in range(6) if ids[j] != ids[i]]
        assert m_ab[i].item() == pytest.approx(0.5 * (s[i][i] - sum(row) / len(row)), rel=1e-10)
        assert m_ba[i].item() == pytest.approx(0.5 * (s[i][i] - sum(col) / len(col)), rel=1e-10)
    # without ids: mean over the B - 1 off-diagonal entries (Monfort et al. eq. 3)
    m_ab, _ = AdaptiveMargin(1.0)(a, b)
    assert m_ab[0].item() == pytest.approx(s[0][0] - sum(s[0][1:]) / 5, rel=1e-10)
    # detached, anchors without negatives get 0, state round trip
    x = a.clone().requires_grad_(True)
    assert not AdaptiveMargin()(x, b)[0].requires_grad
    m_ab, m_ba = AdaptiveMargin()(a, b, ids=torch.zeros(6, dtype=torch.long))
    assert (m_ab == 0).all() and (m_ba == 0).all()
    amm = AdaptiveMargin(0.1)
    amm.load_state_dict(AdaptiveMargin(0.7).state_dict())
    assert amm.alpha == 0.7
    loss = mms_loss(a, b, temperature=0.07, margin=AdaptiveMargin()(a, b, ids=ids), ids=ids)
    assert torch.isfinite(loss)


# --------------------------------------------------------------------------------- Hypersphere


def test_hypersphere_hand_worked():
    # x = y = (e1, e2): align = 0. Pairs j >= i: (0,0) d^2=0 -> 1, (0,1) d^2=2 -> e^-4, (1,1) -> 1
    # uniformity = (2 + e^-4) / 3 = .672772
    x = torch.eye(2, dtype=D64)
    assert hypersphere_loss(x, x).item() == pytest.approx((2 + math.exp(-4)) / 3)
    assert hypersphere_loss(x, x, log_uniformity=True).item() == pytest.approx(math.log((2 + math.exp(-4)) / 3))
    # scaling the inputs changes nothing (normalised inside)
    assert hypersphere_loss(3 * x, 0.5 * x).item() == pytest.approx((2 + math.exp(-4)) / 3)


@pytest.mark.parametrize("alpha,t,la,lu,log", [(2, 2, 1, 1, False), (1, 0.5, 0.3, 2, False), (3, 5, 1, 0.5, True)])
def test_hypersphere_matches_loop(alpha, t, la, lu, log):
    x, y = randn(7, 4, seed=50), randn(7, 4, seed=51)
    xn = [[v / math.sqrt(sum(w * w for w in r)) for v in r] for r in x.tolist()]
    yn = [[v / math.sqrt(sum(w * w for w in r)) for v in r] for r in y.tolist()]
    d2 = [[sum((p - q) ** 2 for p, q in zip(u, v)) for v in yn] for u in xn]
    align = sum(d2[i][i] ** (alpha / 2) for i in range(7)) / 7
    unif = sum(math.exp(-t * d2[i][j]) for i in range(7) for j in range(i, 7)) / (7 * 8 / 2)
    want = la * align + lu * (math.log(unif) if log else unif)
    got = hypersphere_loss(x, y, alpha=alpha, t=t, lambda_align=la, lambda_uniform=lu, log_uniformity=log)
    assert got.item() == pytest.approx(want, rel=1e-10)


def test_hypersphere_gradcheck_half_errors():
    x, y = randn(5, 3, seed=52).requires_grad_(True), randn(5, 3, seed=53).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda p, q: hypersphere_loss(p, q, log_uniformity=True), (x, y))
    assert torch.autograd.gradcheck(lambda p, q: hypersphere_loss(p, q, alpha=1.5, t=3), (x, y))
    for dt in (torch.float16, torch.bfloat16):
        got = hypersphere_loss(x.detach().to(dt), y.detach().to(dt), t=20, log_uniformity=True)
        assert got.dtype == torch.float32 and torch.isfinite(got)
    with pytest.raises(ValueError, match="t must be > 0|alpha and t"):
        hypersphere_loss(x, y, t=0)
    with pytest.raises(ValueError, match="same length"):
        hypersphere_loss(x, y[:3])
