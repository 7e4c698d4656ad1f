"""Retrieval metrics against brute-force references: exact tie handling, several positives, chunking."""

import itertools
import math

import pytest
import torch

import mmalign.retrieval as R
from mmalign.retrieval import as_percentages, chance_recall, precision_at_k, recall_at_k, retrieval_report, top_k


# ---------------------------------------------------------------- helpers
def embeddings_for_scores(scores):
    """Query/gallery embeddings whose dot products (normalize=False) are exactly ``scores`` (Q, G).

    Query i is the i-th unit vector, gallery item j holds column j of ``scores``; small integers are
    exact in float32, so ties in ``scores`` are exact ties in the similarity matrix.
    """
    s = torch.as_tensor(scores, dtype=torch.float32)
    return torch.eye(s.shape[0]), s.T.contiguous()


def brute_force_recall(scores, q_ids, g_ids, k):
    """Expected Recall@K under a uniformly random order of tied items, by enumerating every ranking.

    For each query, every permutation of the gallery that sorts the scores in non-increasing order is
    one equally likely tie-break; the expected hit is the fraction of those with a positive in the top K.
    """
    total = 0.0
    for i, row in enumerate(scores):
        valid = [perm for perm in itertools.permutations(range(len(row)))
                 if all(row[perm[r]] >= row[perm[r + 1]] for r in range(len(row) - 1))]
        hits = sum(any(g_ids[j] == q_ids[i] for j in perm[:k]) for perm in valid)
        total += hits / len(valid)
    return total / len(scores)


def sort_loop_recall(scores, q_ids, g_ids, k):
    """Recall@K for tie-free scores: sort each row, look for a positive in the first K."""
    hits = 0
    for i, row in enumerate(scores.tolist()):
        order = sorted(range(len(row)), key=lambda j: -row[j])
        hits += any(g_ids[j] == q_ids[i] for j in order[:k])
    return hits / len(scores)


# ---------------------------------------------------------------- recall@K
def test_recall_hand_worked_ties():
    # query 0: positive (col 0) tied with 2 negatives at the top -> P(hit@1) = 1/3, P(hit@2) = 2/3.
    # query 1: one negative strictly above the positive, then the positive tied with one negative.
    scores = [[5, 5, 5, 1], [1, 4, 3, 3]]
    q, g = embeddings_for_scores(scores)
    got = recall_at_k(q, g, [0, 1], [0, 9, 1, 9], ks=(1, 2, 3), normalize=False)
    # query 1 @1: 0; @2: 1/2; @3: 1
    assert got[1] == pytest.approx((1 / 3 + 0) / 2, abs=1e-12)
    assert got[2] == pytest.approx((2 / 3 + 1 / 2) / 2, abs=1e-12)
    assert got[3] == pytest.approx((1 + 1) / 2, abs=1e-12)


@pytest.mark.parametrize("trial", range(4))
def test_recall_matches_permutation_enumeration(trial):
    g = torch.Generator().manual_seed(trial)
    n_q, n_g = 5, 7
    scores = torch.randint(0, 3, (n_q, n_g), generator=g)  # values in {0,1,2}: many ties
    g_ids = [0, 0, 0, 1, 1, 2, 3]  # item 0 has 3 captions, item 1 has 2
    q_ids = [0, 1, 2, 3, 0]
    q, gal = embeddings_for_scores(scores)
    got = recall_at_k(q, gal, q_ids, g_ids, ks=(1, 2, 3, 5, 7), normalize=False)
    for k in (1, 2, 3, 5, 7):
        assert got[k] == pytest.approx(brute_force_recall(scores.tolist(), q_ids, g_ids, k), abs=1e-9), k


def test_recall_several_positives_image_with_three_captions():
    # 4 images, 3 captions each; image i is close to captions 3i..3i+2 except image 2, whose
    # captions are ranked 2nd-4th behind a caption of image 3.
    torch.manual_seed(0)
    img = torch.randn(4, 8, dtype=torch.float64)
    txt = img.repeat_interleave(3, 0) + 0.01 * torch.randn(12, 8, dtype=torch.float64)
    txt[9] = img[2] * 1.0  # caption of image 3 identical in direction to image 2
    txt_ids = torch.arange(4).repeat_interleave(3)
    sim = torch.nn.functional.normalize(img, dim=1) @ torch.nn.functional.normalize(txt, dim=1).T
    got = recall_at_k(img, txt, torch.arange(4), txt_ids, ks=(1, 2, 12))
    for k in (1, 2, 12):
        assert got[k] == pytest.approx(sort_loop_recall(sim, torch.arange(4).tolist(), txt_ids.tolist(), k))
    assert got[1] == pytest.approx(0.75)  # image 2 misses at 1 ...
    assert got[2] == pytest.approx(1.0)  # ... and finds one of its 3 captions at 2


def test_collapsed_model_scores_chance_not_100():
    n_img, per = 4, 3
    img = torch.ones(n_img, 16)
    txt = torch.ones(n_img * per, 16)
    img_ids, txt_ids = torch.arange(n_img), torch.arange(n_img).repeat_interleave(per)
    i2t = recall_at_k(img, txt, img_ids, txt_ids, ks=(1, 5, 10))
    t2i = recall_at_k(txt, img, txt_ids, img_ids, ks=(1, 2, 3))
    for k in (1, 5, 10):
        assert i2t[k] == pytest.approx(chance_recall(12, 3, k), abs=1e-12)
        assert i2t[k] == pytest.approx(1 - math.comb(9, k) / math.comb(12, k), abs=1e-12)
    for k in (1, 2, 3):
        assert t2i[k] == pytest.approx(k / 4, abs=1e-12)
    assert i2t[1] == pytest.approx(0.25) and i2t[1] < 1.0


def test_perfect_model_scores_1_and_100_percent():
    torch.manual_seed(1)
    img = torch.randn(10, 32)
    txt = img.repeat_interleave(5, 0)  # 5 captions, all exactly on their image
    ids_i, ids_t = torch.arange(10), torch.arange(10).repeat_interleave(5)
    report = retrieval_report(img, txt, ids_i, ids_t, ks=(1, 5, 10))
    percent = as_percentages(report)
    for key in ("i2t_R@1", "i2t_R@5", "i2t_R@10", "t2i_R@1", "t2i_R@5", "t2i_R@10"):
        assert report[key] == pytest.approx(1.0) and percent[key] == pytest.approx(100.0)
    assert report["rsum"] == pytest.approx(6.0) and percent["rsum"] == pytest.approx(600.0)


def test_as_percentages_scales_fractions_and_refuses_percentages():
    report = {"i2t_R@1": 0.25, "t2i_R@1": 0.5, "rsum": 0.75}
    assert as_percentages(report) == {"i2t_R@1": 25.0, "t2i_R@1": 50.0, "rsum": 75.0}
    with pytest.raises(ValueError, match="in percent already"):
        as_percentages(as_percentages(report))
    with pytest.raises(ValueError, match="the dict that retrieval_report returns"):
        as_percentages({"i2t_R@1": 0.5})


def test_chunked_equals_unchunked_and_matches_loop():
    g = torch.Generator().manual_seed(3)
    q, gal = torch.randn(500, 24, generator=g), torch.randn(700, 24, generator=g)
    q_ids = torch.randint(0, 350, (500,), generator=g)
    g_ids = torch.cat([torch.arange(350), torch.randint(0, 350, (350,), generator=g)])
    results = {cs: recall_at_k(q, gal, q_ids, g_ids, ks=(1, 5, 10, 50), chunk_size=cs) for cs in (1, 7, None)}
    assert results[1] == results[7] == results[None]
    sim = torch.nn.functional.normalize(q.double(), dim=1) @ torch.nn.functional.normalize(gal.double(), dim=1).T
    for k in (1, 10, 50):
        assert results[None][k] == pytest.approx(sort_loop_recall(sim, q_ids.tolist(), g_ids.tolist(), k), abs=1e-12)


def test_retrieval_report_keys_values_and_symmetry():
    g = torch.Generator().manual_seed(4)
    img, txt = torch.randn(20, 8, generator=g), torch.randn(40, 8, generator=g)
    ids_i, ids_t = torch.arange(20), torch.arange(20).repeat(2)
    rep = retrieval_report(img, txt, ids_i, ids_t, ks=(1, 5))
    assert list(rep) == ["i2t_R@1", "i2t_R@5", "t2i_R@1", "t2i_R@5", "rsum"]
    i2t = recall_at_k(img, txt, ids_i, ids_t, ks=(1, 5))
    t2i = recall_at_k(txt, img, ids_t, ids_i, ks=(1, 5))
    assert rep["i2t_R@5"] == pytest.approx(i2t[5]) and rep["t2i_R@1"] == pytest.approx(t2i[1])
    assert rep["rsum"] == pytest.approx(i2t[1] + i2t[5] + t2i[1] + t2i[5])
    swapped = retrieval_report(txt, img, ids_t, ids_i, ks=(1, 5))
    for k in (1, 5):
        assert swapped[f"i2t_R@{k}"] == pytest.approx(rep[f"t2i_R@{k}"])
        assert swapped[f"t2i_R@{k}"] == pytest.approx(rep[f"i2t_R@{k}"])


# ---------------------------------------------------------------- chance level
@pytest.mark.parametrize("n_gallery,n_pos,k", [(10, 1, 1), (10, 1, 4), (12, 3, 5), (9, 4, 2), (8, 5, 4), (6, 2, 6)])
def test_chance_recall_against_enumeration(n_gallery, n_pos, k):
    # Under a random ranking the positives' positions are a uniform P-subset of 0..G-1.
    subsets = list(itertools.combinations(range(n_gallery), n_pos))
    expected = sum(min(s) < k for s in subsets) / len(subsets)
    assert chance_recall(n_gallery, n_pos, k) == pytest.approx(expected, abs=1e-12)


def test_chance_recall_large_gallery_closed_form():
    assert chance_recall(25000, 5, 10) == pytest.approx(1 - math.comb(24995, 10) / math.comb(25000, 10), rel=1e-7)


# ---------------------------------------------------------------- top_k and precision@k
def test_top_k_matches_torch_topk_on_full_matrix():
    g = torch.Generator().manual_seed(5)
    q, gal = torch.randn(37, 12, generator=g), torch.randn(53, 12, generator=g)
    full = torch.nn.functional.normalize(q, dim=1) @ torch.nn.functional.normalize(gal, dim=1).T
    ref = full.topk(6, dim=1)
    for cs in (1, 7, None):
        vals, idx = top_k(q, gal, 6, chunk_size=cs)
        assert torch.equal(idx, ref.indices)
        torch.testing.assert_close(vals, ref.values, rtol=0, atol=1e-6)
    vals, idx = top_k(q, gal, 3, normalize=False)
    assert torch.equal(idx, (q @ gal.T).topk(3, dim=1).indices)


def precision_loop(scores, q_ids, g_ids, max_k):
    """Mean precision@k, ties broken pessimistically: among equal scores, negatives rank first."""
    out = [0.0] * max_k
    for i, row in enumerate(scores):
        order = sorted(range(len(row)), key=lambda j: (-row[j], g_ids[j] == q_ids[i]))
        for k in range(1, max_k + 1):
            out[k - 1] += sum(g_ids[j] == q_ids[i] for j in order[:k]) / k
    return [v / len(scores) for v in out]


@pytest.mark.parametrize("trial", range(3))
def test_precision_at_k_matches_loop_with_pessimistic_ties(trial):
    g = torch.Generator().manual_seed(10 + trial)
    scores = torch.randint(0, 3, (6, 9), generator=g)
    g_ids = [0, 0, 0, 1, 1, 2, 3, 4, 5]
    q_ids = [0, 1, 2, 3, 0, 1]
    q, gal = embeddings_for_scores(scores)
    got = precision_at_k(q, gal, q_ids, g_ids, max_k=9, chunk_size=2, normalize=False)
    assert got.shape == (9,)
    torch.testing.assert_close(got, torch.tensor(precision_loop(scores.tolist(), q_ids, g_ids, 9)), rtol=0, atol=1e-6)


def test_precision_collapsed_model_is_pessimistic():
    # all scores tie: negatives first -> 7 negatives precede the 2 positives
    q, gal = torch.ones(1, 4), torch.ones(9, 4)
    got = precision_at_k(q, gal, [0], [0, 1, 2, 0, 3, 4, 5, 6, 7], max_k=9)
    expected = torch.tensor([0.0] * 7 + [1 / 8, 2 / 9])
    torch.testing.assert_close(got, expected)


# ---------------------------------------------------------------- bad input
def _ok():
    return torch.randn(3, 4), torch.randn(5, 4), [0, 1, 2], [0, 1, 2, 0, 1]


@pytest.mark.parametrize("make,match", [
    (lambda q, g, qi, gi: (q[0], g, qi, gi, (1,)), "must be 2-d"),
    (lambda q, g, qi, gi: (q, g[:, :3], qi, gi, (1,)), "query dim 4 != gallery dim 3"),
    (lambda q, g, qi, gi: (q, g[:0], qi, [], (1,)), "empty query or gallery"),
    (lambda q, g, qi, gi: (q, g, qi, gi, (1, 6)), "1 <= K <= gallery size"),
    (lambda q, g, qi, gi: (q, g, qi, gi, (0,)), "1 <= K <= gallery size"),
    (lambda q, g, qi, gi: (q, g, qi, gi, ()), "1 <= K <= gallery size"),
    (lambda q, g, qi, gi: (q, g, qi[:2], gi, (1,)), "query ids must be 1-d with one id per row"),
    (lambda q, g, qi, gi: (q, g, qi, gi + [3], (1,)), "gallery ids must be 1-d with one id per row"),
    (lambda q, g, qi, gi: (q, g, [0, 1, 7], gi, (1,)), r"query 2 \(id 7\) has no positive"),
    (lambda q, g, qi, gi: (q.index_fill(0, torch.tensor([1]), float("nan")), g, qi, gi, (1,)), "NaN or inf"),
    (lambda q, g, qi, gi: (q, g.index_fill(0, torch.tensor([4]), float("inf")), qi, gi, (1,)), "NaN or inf"),
])
def test_recall_bad_input(make, match):
    q, g, qi, gi, ks = make(*_ok())
    with pytest.raises(ValueError, match=match):
        recall_at_k(q, g, qi, gi, ks=ks)


def test_missing_positive_reported_with_global_index_when_chunked():
    q, g = torch.randn(6, 4), torch.randn(5, 4)
    with pytest.raises(ValueError, match=r"query 4 \(id 9\) has no positive"):
        recall_at_k(q, g, [0, 1, 2, 0, 9, 1], [0, 1, 2, 0, 1], ks=(1,), chunk_size=2)


def test_top_k_and_precision_bad_input():
    q, g, qi, gi = _ok()
    with pytest.raises(ValueError, match="k must be in 1..5"):
        top_k(q, g, 6)
    with pytest.raises(ValueError, match="k must be in 1..5"):
        top_k(q, g, 0)
    with pytest.raises(ValueError, match="query dim"):
        top_k(q, g[:, :2], 1)
    with pytest.raises(ValueError, match="max_k must be in 1..5"):
        precision_at_k(q, g, qi, gi, max_k=6)
    with pytest.raises(ValueError, match="one id per row"):
        precision_at_k(q, g, qi, gi[:4], max_k=2)


# ---------------------------------------------------------------- memory bound
def test_large_gallery_is_scored_in_bounded_chunks(monkeypatch):
    # 20000 x 20000 took ~23 s on a 2-core box (bool reductions dominate), so 12000 x 12000 here (~4 s).
    n, chunk = 12000, 512
    g = torch.Generator().manual_seed(7)
    gallery = torch.randn(n, 16, generator=g)
    perm = torch.randperm(n, generator=g)
    query = gallery[perm]  # query i is gallery item perm[i]: its only positive, at cosine 1
    shapes = []
    real = R.similarity

    def spy(a, b, normalize=True):
        shapes.append((a.shape[0], b.shape[0]))
        return real(a, b, normalize)

    monkeypatch.setattr(R, "similarity", spy)
    got = recall_at_k(query, gallery, perm, torch.arange(n), ks=(1, 5), chunk_size=chunk)
    assert got == {1: 1.0, 5: 1.0}
    assert max(rows for rows, _ in shapes) == chunk
    assert sum(rows for rows, _ in shapes) == n and len(shapes) == -(-n // chunk)


def test_default_chunk_holds_about_16m_scores(monkeypatch):
    shapes = []
    real = R.similarity
    monkeypatch.setattr(R, "similarity", lambda a, b, normalize=True: shapes.append(a.shape[0]) or real(a, b, normalize))
    n_g = (1 << 24) // 3 + 1  # 3 rows would exceed 2^24 scores
    q = torch.randn(5, 1)
    g = torch.randn(n_g, 1)
    top_k(q, g, 1)
    assert shapes == [2, 2, 1]
