"""Miners against a brute-force loop over anchors (ties, repeated ids, k larger than the pool)."""

import math

import pytest
import torch

from mmalign.miners import (
    anchor_negative_gaps,
    hardest_negatives,
    margin_violation_fraction,
    random_negatives,
    semi_hard_negatives,
)


# ---------------------------------------------------------------- brute-force references (loops)
def ref_pick(scores, keep, k):
    """Per row: the k largest kept scores, ties by lower index, -1 padded. Plain Python."""
    out = []
    for a in range(len(scores)):
        cand = [j for j in range(len(scores[a])) if keep[a][j]]
        cand.sort(key=lambda j: (-scores[a][j], j))
        out.append((cand[:k] + [-1] * k)[:k])
    return out


def ref_hardest(sim, img_ids, txt_ids, k):
    S = sim.tolist()
    n_i, n_t = sim.shape
    keep = [[img_ids[i] != txt_ids[j] for j in range(n_t)] for i in range(n_i)]
    ST = [[S[i][j] for i in range(n_i)] for j in range(n_t)]
    keepT = [[keep[i][j] for i in range(n_i)] for j in range(n_t)]
    return ref_pick(S, keep, k), ref_pick(ST, keepT, k)


def ref_semi_hard(sim, img_ids, txt_ids, margin, k, fallback, p_img, p_txt):
    S = sim.tolist()
    n_i, n_t = sim.shape
    res_i, res_t = [], []
    for i in range(n_i):
        sp = S[i][p_img[i]]
        neg = [j for j in range(n_t) if img_ids[i] != txt_ids[j]]
        semi = [j for j in neg if sp - margin < S[i][j] < sp]
        pool = semi if (semi or fallback == "none") else neg
        pool.sort(key=lambda j: (-S[i][j], j))
        res_i.append((pool[:k] + [-1] * k)[:k])
    for j in range(n_t):
        sp = S[p_txt[j]][j]
        neg = [i for i in range(n_i) if img_ids[i] != txt_ids[j]]
        semi = [i for i in neg if sp - margin < S[i][j] < sp]
        pool = semi if (semi or fallback == "none") else neg
        pool.sort(key=lambda i: (-S[i][j], i))
        res_t.append((pool[:k] + [-1] * k)[:k])
    return res_i, res_t


def tied_case(seed, n_img=9, n_txt=11, n_items=5):
    """Quantised similarities (many ties), repeated ids on both sides, every id on both sides."""
    g = torch.Generator().manual_seed(seed)
    sim = torch.randint(-4, 5, (n_img, n_txt), generator=g).float() / 8
    img_ids = torch.cat([torch.arange(n_items), torch.randint(0, n_items, (n_img - n_items,), generator=g)])
    txt_ids = torch.cat([torch.arange(n_items), torch.randint(0, n_items, (n_txt - n_items,), generator=g)])
    img_ids = img_ids[torch.randperm(n_img, generator=g)]
    txt_ids = txt_ids[torch.randperm(n_txt, generator=g)]
    # paired positive: a random caption/image with the same id
    p_img = torch.tensor([int(torch.nonzero(txt_ids == v).flatten()[-1]) for v in img_ids])
    p_txt = torch.tensor([int(torch.nonzero(img_ids == v).flatten()[0]) for v in txt_ids])
    return sim, img_ids, txt_ids, p_img, p_txt


# ---------------------------------------------------------------- hardest
@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("k", [1, 3, 12])  # 12 > every anchor's number of negatives
def test_hardest_matches_loop(seed, k):
    sim, img_ids, txt_ids, _, _ = tied_case(seed)
    ni, nt = hardest_negatives(sim, ids=(img_ids, txt_ids), k=k)
    ri, rt = ref_hardest(sim, img_ids.tolist(), txt_ids.tolist(), k)
    assert ni.dtype == nt.dtype == torch.long
    assert ni.shape == (9, k) and nt.shape == (11, k)
    assert ni.tolist() == ri and nt.tolist() == rt
    if k == 12:
        assert (ni == -1).any() and (nt == -1).any()


def test_hardest_default_diagonal_and_homework_setting():
    sim = torch.randn(12, 12, generator=torch.Generator().manual_seed(0))
    ni, nt = hardest_negatives(sim, k=3)  # the homework: k = 3 at batch 12, both directions
    ar = torch.arange(12)
    ri, rt = ref_hardest(sim, ar.tolist(), ar.tolist(), 3)
    assert ni.tolist() == ri and nt.tolist() == rt
    assert not (ni == ar[:, None]).any() and not (nt == ar[:, None]).any()


def test_ties_in_index_order_on_wide_rows():
    # long rows of three distinct values: an unstable sort / topk reorders the ties here
    g = torch.Generator().manual_seed(0)
    sim = torch.randint(0, 3, (3, 3000), generator=g).float()
    img_ids, txt_ids = torch.arange(3), torch.arange(3000) % 7
    ni, nt = hardest_negatives(sim, ids=(img_ids, txt_ids), k=40)
    ri, rt = ref_hardest(sim, img_ids.tolist(), txt_ids.tolist(), 40)
    assert ni.tolist() == ri and nt.tolist() == rt


def test_all_same_id_gives_no_negatives():
    sim = torch.rand(3, 4)
    ni, nt = hardest_negatives(sim, ids=(torch.zeros(3, dtype=torch.long), torch.zeros(4, dtype=torch.long)), k=2)
    assert (ni == -1).all() and (nt == -1).all()


# ---------------------------------------------------------------- semi-hard
@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("k", [1, 2, 12])
@pytest.mark.parametrize("fallback", ["hardest", "none"])
@pytest.mark.parametrize("margin", [0.25, 0.6])
def test_semi_hard_matches_loop(seed, k, fallback, margin):
    sim, img_ids, txt_ids, p_img, p_txt = tied_case(seed)
    ni, nt = semi_hard_negatives(sim, margin=margin, ids=(img_ids, txt_ids), k=k, fallback=fallback, pos_for_images=p_img, pos_for_texts=p_txt)
    ri, rt = ref_semi_hard(sim, img_ids.tolist(), txt_ids.tolist(), margin, k, fallback, p_img.tolist(), p_txt.tolist())
    assert ni.tolist() == ri and nt.tolist() == rt


def ref_all_semi_hard(sim, img_ids, txt_ids, margin, fallback, p_img, p_txt):
    """Every semi-hard negative per anchor as a table: entry j is j where candidate j is semi-hard (or
    the anchor's hardest negative when it has none and fallback='hardest'), -1 elsewhere. Plain Python."""
    def rows(S, a_ids, b_ids, pos):
        out = []
        for a in range(len(S)):
            sp = S[a][pos[a]]
            neg = [j for j in range(len(S[a])) if a_ids[a] != b_ids[j]]
            semi = [j for j in neg if sp - margin < S[a][j] < sp]
            if not semi and fallback == "hardest" and neg:
                semi = [sorted(neg, key=lambda j: (-S[a][j], j))[0]]
            out.append([j if j in semi else -1 for j in range(len(S[a]))])
        return out
    S = sim.tolist()
    ST = [list(col) for col in zip(*S)]
    return rows(S, img_ids, txt_ids, p_img), rows(ST, txt_ids, img_ids, p_txt)


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("fallback", ["hardest", "none"])
@pytest.mark.parametrize("margin", [0.25, 0.6])
def test_all_semi_hard_negatives_match_loop(seed, fallback, margin):
    sim, img_ids, txt_ids, p_img, p_txt = tied_case(seed)
    ni, nt = semi_hard_negatives(sim, margin=margin, ids=(img_ids, txt_ids), k=None, fallback=fallback,
                                 pos_for_images=p_img, pos_for_texts=p_txt)
    ri, rt = ref_all_semi_hard(sim, img_ids.tolist(), txt_ids.tolist(), margin, fallback, p_img.tolist(),
                               p_txt.tolist())
    assert ni.tolist() == ri and nt.tolist() == rt


def test_all_semi_hard_triplets_loss_equals_the_masked_sum():
    """k=None into triplet_loss: the mean hinge over every semi-hard triplet of both directions (FaceNet's
    'all anchor-positive pairs' with semi-hard negatives), written as a masked sum over sim."""
    from mmalign.losses import triplet_loss

    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, 16, generator=g, dtype=torch.float64), torch.randn(64, 16, generator=g, dtype=torch.float64)
    sim = torch.nn.functional.normalize(x, dim=1) @ torch.nn.functional.normalize(y, dim=1).T
    m = 0.2
    ni, nt = semi_hard_negatives(sim, margin=m, k=None, fallback="none")
    got = triplet_loss(sim, ni, nt, margin=m)
    pos, off = sim.diagonal(), ~torch.eye(64, dtype=torch.bool)
    win_i = off & (sim < pos[:, None]) & (sim > pos[:, None] - m)
    win_t = off & (sim < pos[None, :]) & (sim > pos[None, :] - m)
    total = ((m - pos[:, None] + sim) * win_i).sum() + ((m - pos[None, :] + sim) * win_t).sum()
    assert win_i.sum() > 64 and ni.shape == (64, 64)
    assert torch.allclose(got, total / (win_i.sum() + win_t.sum()), rtol=1e-12, atol=0)


def test_semi_hard_window_is_strict_and_fallback_differs():
    # image 0: positive 0.5; negatives at 0.5 (tie with positive: not semi-hard), 0.4 (semi-hard),
    # 0.3 (exactly s_pos - margin: not semi-hard), 0.9 (harder than the positive: not semi-hard)
    sim = torch.tensor([[0.5, 0.5, 0.4, 0.3, 0.9],
                        [0.0, 0.8, 0.0, 0.0, 0.0],
                        [0.0, 0.0, 0.8, 0.0, 0.0],
                        [0.0, 0.0, 0.0, 0.8, 0.0],
                        [0.0, 0.0, 0.0, 0.0, 0.8]], dtype=torch.float64)
    ni, _ = semi_hard_negatives(sim, margin=0.2, k=2, fallback="none")
    assert ni[0].tolist() == [2, -1]
    # images 1..4: every negative (0.0) is below s_pos - margin = 0.6: none semi-hard
    assert (ni[1:] == -1).all()
    nh, _ = semi_hard_negatives(sim, margin=0.2, k=2, fallback="hardest")
    assert nh[0].tolist() == [2, -1]  # has a semi-hard one: no fallback, padding kept
    assert nh[1].tolist() == [0, 2]  # fallback: hardest (all 0.0, ties in index order)


# ---------------------------------------------------------------- random
def test_random_negatives_valid_without_replacement_and_padded():
    sim, img_ids, txt_ids, _, _ = tied_case(0)
    ni, nt = random_negatives(sim, ids=(img_ids, txt_ids), k=12, generator=torch.Generator().manual_seed(1))
    for a in range(9):
        got = [j for j in ni[a].tolist() if j >= 0]
        want = {j for j in range(11) if img_ids[a] != txt_ids[j]}
        assert set(got) == want and len(got) == len(want)  # all of them, each once, then -1
        assert ni[a, len(got):].eq(-1).all()
    for b in range(11):
        got = [i for i in nt[b].tolist() if i >= 0]
        assert set(got) == {i for i in range(9) if img_ids[i] != txt_ids[b]} and len(got) == len(set(got))


def test_random_negatives_never_same_id_and_deterministic():
    sim, img_ids, txt_ids, _, _ = tied_case(3)
    a = random_negatives(sim, ids=(img_ids, txt_ids), k=2, generator=torch.Generator().manual_seed(7))
    b = random_negatives(sim, ids=(img_ids, txt_ids), k=2, generator=torch.Generator().manual_seed(7))
    c = random_negatives(sim, ids=(img_ids, txt_ids), k=2, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not (torch.equal(a[0], c[0]) and torch.equal(a[1], c[1]))
    ni, nt = a
    ok = ni >= 0
    assert (img_ids[:, None].expand_as(ni)[ok] != txt_ids[ni[ok]]).all()
    ok = nt >= 0
    assert (txt_ids[:, None].expand_as(nt)[ok] != img_ids[nt[ok]]).all()


@pytest.mark.parametrize("k", [1, 2])
def test_random_negatives_uniform(k):
    # 6000 image anchors of item 0; captions 0..5 with ids 0..5 -> 5 valid negatives each time
    n, m = 6000, 6
    sim = torch.zeros(n, m)
    img_ids, txt_ids = torch.zeros(n, dtype=torch.long), torch.arange(m)
    ni, nt = random_negatives(sim, ids=(img_ids, txt_ids), k=k, generator=torch.Generator().manual_seed(0))
    assert (ni != 0).all() and (ni[:, :1] != ni[:, 1:]).all()  # never the positive, no repeats
    counts = torch.bincount(ni.flatten(), minlength=m)[1:].double()
    expected = n * k / 5
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 18.5  # 4 degrees of freedom: p ~ 0.001 (deterministic under the seed)
    assert (nt[0] == -1).all() and (nt[1:] >= 0).all()  # caption 0 has no negative image


# ---------------------------------------------------------------- diagnostics
def test_gaps_and_violation_fraction_match_loop():
    sim, img_ids, txt_ids, p_img, p_txt = tied_case(2)
    ni, nt = hardest_negatives(sim, ids=(img_ids, txt_ids), k=12)
    gi, gt = anchor_negative_gaps(sim, ni, nt, pos_for_images=p_img, pos_for_texts=p_txt)
    S = sim.tolist()
    ref_i = [S[i][p_img[i]] - S[i][j] for i in range(9) for j in ni[i].tolist() if j >= 0]
    ref_t = [S[p_txt[j]][j] - S[i][j] for j in range(11) for i in nt[j].tolist() if i >= 0]
    assert gi.tolist() == pytest.approx(ref_i) and gt.tolist() == pytest.approx(ref_t)
    for margin in (0.0, 0.2, 1.0):
        frac = margin_violation_fraction(sim, ni, nt, margin=margin, pos_for_images=p_img, pos_for_texts=p_txt)
        ref = sum(g < margin for g in ref_i + ref_t) / len(ref_i + ref_t)
        assert float(frac) == pytest.approx(ref)
    empty = torch.full((9, 1), -1), torch.full((11, 1), -1)
    assert math.isnan(float(margin_violation_fraction(sim, *empty, margin=0.2, pos_for_images=p_img, pos_for_texts=p_txt)))


def test_violation_fraction_hand_case():
    sim = torch.tensor([[0.9, 0.8], [0.1, 0.5]])
    ni, nt = hardest_negatives(sim, k=1)  # ni = [[1],[0]], nt = [[1],[0]]
    # gaps: img0 0.9-0.8=0.1, img1 0.5-0.1=0.4, txt0 0.9-0.1=0.8, txt1 0.5-0.8=-0.3
    assert float(margin_violation_fraction(sim, ni, nt, margin=0.2)) == pytest.approx(2 / 4)


# ---------------------------------------------------------------- bad input
def test_bad_inputs():
    sim = torch.rand(4, 4)
    with pytest.raises(ValueError, match="2-d"):
        hardest_negatives(torch.rand(4))
    with pytest.raises(ValueError, match="k must be a positive integer"):
        hardest_negatives(sim, k=0)
    with pytest.raises(ValueError, match="k must be a positive integer"):
        random_negatives(sim, k=1.5)
    with pytest.raises(ValueError, match="not square"):
        hardest_negatives(torch.rand(3, 4))
    with pytest.raises(ValueError, match="one ids tensor labels both sides"):
        hardest_negatives(torch.rand(3, 4), ids=torch.arange(3))
    with pytest.raises(ValueError, match="one id per row"):
        hardest_negatives(sim, ids=(torch.arange(3), torch.arange(4)))
    with pytest.raises(ValueError, match="NaN or inf"):
        hardest_negatives(torch.tensor([[0.0, float("nan")], [0.0, 1.0]]))
    with pytest.raises(ValueError, match="floating-point"):
        hardest_negatives(torch.ones(2, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="margin must be > 0"):
        semi_hard_negatives(sim, margin=0.0)
    with pytest.raises(ValueError, match="fallback must be"):
        semi_hard_negatives(sim, fallback="easy")
    with pytest.raises(ValueError, match="pass pos_for_images"):
        semi_hard_negatives(torch.rand(3, 4), ids=(torch.tensor([0, 1, 2]), torch.tensor([0, 1, 2, 0])))
    with pytest.raises(ValueError, match="different id"):
        semi_hard_negatives(sim, pos_for_images=torch.tensor([1, 0, 2, 3]))
    with pytest.raises(ValueError, match="neg_for_images must be"):
        margin_violation_fraction(sim, torch.zeros(3, 1, dtype=torch.long), torch.zeros(4, 1, dtype=torch.long), margin=0.2)
    with pytest.raises(ValueError, match="outside"):
        anchor_negative_gaps(torch.rand(2, 3), torch.zeros(2, 1, dtype=torch.long), torch.full((3, 1), 2), pos_for_images=torch.tensor([0, 1]), pos_for_texts=torch.tensor([0, 1, 0]))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_cuda_matches_cpu():
    sim, img_ids, txt_ids, p_img, p_txt = tied_case(4)
    for fn, kw in ((hardest_negatives, {}), (semi_hard_negatives, dict(pos_for_images=p_img, pos_for_texts=p_txt))):
        cpu = fn(sim, img_ids, txt_ids, k=3, **kw)
        gpu = fn(sim.cuda(), img_ids.cuda(), txt_ids.cuda(), k=3, **{n: v.cuda() for n, v in kw.items()})
        assert gpu[0].is_cuda and torch.equal(gpu[0].cpu(), cpu[0]) and torch.equal(gpu[1].cpu(), cpu[1])
    g = torch.Generator(device="cuda").manual_seed(0)
    ni, _ = random_negatives(sim.cuda(), ids=(img_ids, txt_ids), k=2, generator=g)
    assert ni.is_cuda
