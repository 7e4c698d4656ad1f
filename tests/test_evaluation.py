"""Downstream evaluation helpers against scikit-learn / scipy and hand-worked cases."""

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr
from sklearn.metrics import accuracy_score, precision_recall_fscore_support, top_k_accuracy_score

from mmalign.evaluation import (LinearClassifier, choose_threshold, log_ks, pair_benchmark, pair_classification,
                                pair_scores, prompt_embeddings, retrieval_curve, spearman, topk_accuracy,
                                train_classifier, zero_shot_accuracy)
from mmalign.retrieval import recall_at_k


def test_pair_scores_are_row_cosines():
    a, b = torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 3, dtype=torch.float64)
    expected = [float(a[i] @ b[i] / (a[i].norm() * b[i].norm())) for i in range(5)]
    np.testing.assert_allclose(pair_scores(a, b).numpy(), expected, rtol=1e-12)
    with pytest.raises(ValueError, match="same number of pairs"):
        pair_scores(a, b[:4])
    with pytest.raises(ValueError, match="different widths"):
        pair_scores(a, torch.randn(5, 4, dtype=torch.float64))


@pytest.mark.parametrize("seed", range(5))
def test_pair_classification_matches_sklearn(seed):
    rng = np.random.default_rng(seed)
    y, p = rng.integers(0, 2, 60), rng.integers(0, 2, 60)
    out = pair_classification(torch.as_tensor(p), y)
    prec, rec, f1, _ = precision_recall_fscore_support(y, p, labels=[0, 1], zero_division=0)
    for cls, name in enumerate(("dissimilarity", "similarity")):
        assert out[name]["accuracy"] == pytest.approx(100 * accuracy_score(y, p))
        assert out[name]["precision"] == pytest.approx(100 * prec[cls])
        assert out[name]["recall"] == pytest.approx(100 * rec[cls])
        assert out[name]["F1"] == pytest.approx(100 * f1[cls])


def test_a_model_that_always_says_similar_has_zero_dissimilarity_precision():
    # the seed's RoBERTa rows: recall 100 on "similarity", 0 / 0 / 0 on "dissimilarity"
    out = pair_classification(torch.ones(4, dtype=torch.long), [0, 1, 1, 1])
    assert out["dissimilarity"] == {"accuracy": 75.0, "precision": 0.0, "recall": 0.0, "F1": 0.0}
    assert out["similarity"]["recall"] == 100.0 and out["similarity"]["precision"] == 75.0


def test_threshold_maximises_validation_accuracy():
    scores = torch.tensor([0.1, 0.4, 0.35, 0.8, 0.7, 0.2])
    labels = [0, 1, 0, 1, 1, 0]
    t = choose_threshold(scores, labels)
    assert t == pytest.approx((0.35 + 0.4) / 2)
    rng = np.random.default_rng(0)
    for _ in range(5):  # brute force over every possible cut
        s, y = rng.normal(size=40), rng.integers(0, 2, 40)
        t = choose_threshold(torch.as_tensor(s), y)
        best = max(np.mean((s >= c) == y) for c in np.concatenate([s, [s.max() + 1]]))
        assert np.mean((s >= t) == y) == pytest.approx(best)
    with pytest.raises(ValueError, match="empty split"):
        choose_threshold(torch.tensor([]), [])
    with pytest.raises(ValueError, match="0/1 labels"):
        choose_threshold(torch.tensor([0.1, 0.2]), [0, 2])
    with pytest.raises(ValueError, match="one id per row"):
        choose_threshold(torch.tensor([0.1, 0.2]), [0])


def test_spearman_matches_scipy_with_ties():
    rng = np.random.default_rng(1)
    x = rng.integers(0, 5, 50).astype(float)  # many ties, like STS-B grades
    y = x + rng.normal(0, 2, 50)
    assert spearman(x, y) == pytest.approx(spearmanr(x, y).statistic, abs=1e-12)
    assert spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    with pytest.raises(ValueError, match="constant"):
        spearman([1, 1, 1], [1, 2, 3])


def test_pair_benchmark_layout():
    out = pair_benchmark([0.1, 0.9], [0, 1], [0.2, 0.6, 0.95], [0, 0, 1], [0.0, 1.0, 5.0])
    assert set(out) == {"threshold", "dissimilarity", "similarity", "roc_auc", "spearman"}
    assert out["roc_auc"] == 100.0
    assert out["similarity"]["recall"] == 100.0 and out["spearman"] == pytest.approx(100.0)


def test_topk_accuracy_matches_sklearn_and_ties_count_against():
    rng = np.random.default_rng(2)
    logits, labels = rng.normal(size=(30, 6)), rng.integers(0, 6, 30)
    ours = topk_accuracy(torch.as_tensor(logits), labels, ks=(1, 3, 5))
    for k in (1, 3, 5):
        assert ours[k] == pytest.approx(100 * top_k_accuracy_score(labels, logits, k=k, labels=range(6)))
    assert topk_accuracy(torch.zeros(4, 5), [0, 1, 2, 3], ks=(1, 4)) == {1: 0.0, 4: 0.0}
    with pytest.raises(ValueError, match="k must be <= 6"):
        topk_accuracy(torch.as_tensor(logits), labels, ks=(7,))


def test_prompt_ensembling_and_zero_shot_by_hand():
    vocab = {"a red thing": [1.0, 0.0], "the red one": [1.0, 1.0], "a blue thing": [0.0, 1.0], "the blue one": [0.0, 2.0]}
    enc = lambda texts: torch.tensor([vocab[t] for t in texts])  # noqa: E731
    classes = prompt_embeddings(enc, ["red", "blue"], ["a {} thing", "the {} one"])
    red = (torch.tensor([1.0, 0.0]) + torch.tensor([1.0, 1.0]) / 2 ** 0.5)
    torch.testing.assert_close(classes[0], red / red.norm())
    torch.testing.assert_close(classes[1], torch.tensor([0.0, 1.0]))
    images = torch.tensor([[1.0, 0.1], [0.1, 1.0], [0.6, 0.4]])
    assert zero_shot_accuracy(images, classes, [0, 1, 1], ks=(1, 2)) == {1: pytest.approx(200 / 3), 2: 100.0}
    with pytest.raises(ValueError, match="no '{}'"):
        prompt_embeddings(enc, ["red"], ["a red thing"])


def test_linear_probe_learns_a_separable_problem():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 5, generator=g)
    y = (x[:, 0] + x[:, 1] > 0).long()
    curve = train_classifier(LinearClassifier(x[:150], 2), (x[:150], y[:150]), (x[150:], y[150:]), epochs=15,
                             lr=0.05, batch_size=32, progress=False)
    assert list(curve) == list(range(1, 16)) and curve[15] > 90


def test_retrieval_curve_is_recall_and_log_ks():
    assert log_ks(1000, 4) == [1, 10, 100, 1000]
    q, g = torch.randn(8, 4), torch.randn(20, 4)
    ids = torch.arange(8)
    gids = torch.arange(20) % 8
    curve = retrieval_curve(q, g, ids, gids, [1, 5, 20])
    ref = recall_at_k(q, g, ids, gids, [1, 5, 20])
    assert curve == {k: pytest.approx(100 * v) for k, v in ref.items()} and curve[20] == 100.0


def test_roc_auc_against_counting_pairs_and_the_fixed_threshold_protocol():
    from mmalign.evaluation import pair_benchmark, roc_auc

    g = torch.Generator().manual_seed(3)
    scores = torch.randint(0, 6, (40,), generator=g).double() / 5  # many ties
    labels = (torch.rand(40, generator=g) < 0.4).long()
    pos, neg = scores[labels == 1], scores[labels == 0]
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p in pos.tolist() for n in neg.tolist())
    assert roc_auc(scores, labels) == pytest.approx(wins / (len(pos) * len(neg)))
    assert roc_auc([0.1, 0.9], [0, 1]) == 1.0 and roc_auc([0.9, 0.1], [0, 1]) == 0.0
    with pytest.raises(ValueError, match="both classes"):
        roc_auc([0.1, 0.2], [1, 1])
    with pytest.raises(ValueError, match="NaN"):
        roc_auc([0.1, float("nan")], [0, 1])
    # the seed's protocol: a fixed threshold, no validation; everything above 0.9 is "similar"
    out = pair_benchmark([0.0, 1.0], [0, 1], [0.95, 0.5, 0.92, 0.1], [1, 1, 0, 0], threshold=0.9)
    assert out["threshold"] == 0.9 and out["similarity"]["accuracy"] == 50.0
    assert out["similarity"]["precision"] == 50.0 and out["roc_auc"] == 75.0
    tuned = pair_benchmark([0.2, 0.6], [0, 1], [0.95, 0.5, 0.92, 0.1], [1, 1, 0, 0])
    assert 0.2 < tuned["threshold"] <= 0.6
