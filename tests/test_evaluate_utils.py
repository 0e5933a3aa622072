"""10-fold pair verification against a straightforward loop over folds and thresholds."""
import numpy as np
import pytest
from sklearn.model_selection import KFold

from utils.evaluate_utils import THRESHOLDS, evaluate, evaluate_pair_set


def _accuracy_at(threshold, dist, issame):
    predict = np.less(dist, threshold)
    tp = np.sum(predict & issame)
    fp = np.sum(predict & ~issame)
    tn = np.sum(~predict & ~issame)
    fn = np.sum(~predict & issame)
    tpr = 0 if tp + fn == 0 else float(tp) / float(tp + fn)
    fpr = 0 if fp + tn == 0 else float(fp) / float(fp + tn)
    return tpr, fpr, float(tp + tn) / dist.size


def reference_evaluate(embeddings, issame, nrof_folds=10):
    """The published protocol written as plain loops (insightface calculate_roc)."""
    issame = np.asarray(issame)
    dist = np.sum(np.square(np.subtract(embeddings[0::2], embeddings[1::2])), 1)
    thresholds = np.arange(0, 4, 0.01)
    tprs = np.zeros((nrof_folds, len(thresholds)))
    fprs = np.zeros((nrof_folds, len(thresholds)))
    accuracy = np.zeros(nrof_folds)
    best_thresholds = np.zeros(nrof_folds)
    for k, (train, test) in enumerate(KFold(n_splits=nrof_folds, shuffle=False).split(np.arange(len(issame)))):
        acc_train = np.array([_accuracy_at(t, dist[train], issame[train])[2] for t in thresholds])
        best = np.argmax(acc_train)
        best_thresholds[k] = thresholds[best]
        for i, t in enumerate(thresholds):
            tprs[k, i], fprs[k, i], _ = _accuracy_at(t, dist[test], issame[test])
        accuracy[k] = _accuracy_at(thresholds[best], dist[test], issame[test])[2]
    return np.mean(tprs, 0), np.mean(fprs, 0), accuracy, best_thresholds


def _random_pairs(rng, num_pairs, dim=32, noise=1.0):
    issame = rng.random(num_pairs) < 0.5
    a = rng.normal(size=(num_pairs, dim))
    b = np.where(issame[:, None], a + noise * rng.normal(size=(num_pairs, dim)), rng.normal(size=(num_pairs, dim)))
    emb = np.empty((2 * num_pairs, dim), dtype=np.float32)
    emb[0::2], emb[1::2] = a, b
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    return emb, issame


@pytest.mark.parametrize("num_pairs,noise", [(600, 1.0), (613, 0.7), (250, 3.0)])
def test_evaluate_equals_the_loop_reference_exactly(num_pairs, noise):
    emb, issame = _random_pairs(np.random.default_rng(num_pairs), num_pairs, noise=noise)
    got = evaluate(emb, issame)
    want = reference_evaluate(emb, issame)
    for g, w in zip(got, want):
        assert g.shape == w.shape
        np.testing.assert_array_equal(g, w)
    assert 0.5 < got[2].mean() < 1.0      # a real, non-trivial accuracy


def test_ties_pick_the_first_best_threshold():
    # distances ~0.505 (same) and ~2.5 (different): every threshold in [0.51, 2.5] is perfect;
    # the first one, 0.51, must be chosen on every fold
    num_pairs = 100
    issame = np.arange(num_pairs) % 2 == 0
    emb = np.zeros((2 * num_pairs, 2), dtype=np.float64)
    emb[0::2] = [1.0, 0.0]
    angle = np.where(issame, np.arccos(1 - 0.505 / 2), np.arccos(1 - 2.5 / 2))
    emb[1::2, 0], emb[1::2, 1] = np.cos(angle), np.sin(angle)
    tpr, fpr, accuracy, best = evaluate(emb, issame)
    np.testing.assert_array_equal(accuracy, np.ones(10))
    np.testing.assert_allclose(best, 0.51)
    np.testing.assert_array_equal(best, reference_evaluate(emb, issame)[3])
    assert tpr[0] == 0 and tpr[-1] == 1 and fpr[52] == 0 and fpr[-1] == 1


def test_perfectly_separable_pairs_give_accuracy_one():
    rng = np.random.default_rng(0)
    num_pairs = 300
    base = rng.normal(size=(num_pairs, 64))
    base /= np.linalg.norm(base, axis=1, keepdims=True)
    issame = rng.random(num_pairs) < 0.5
    emb = np.empty((2 * num_pairs, 64))
    emb[0::2] = base
    emb[1::2] = np.where(issame[:, None], base, -base)      # distance 0 or 4
    summary = evaluate_pair_set(emb, issame)
    assert summary["acc"] == 1.0 and summary["acc_std"] == 0.0
    assert summary["best_threshold"] == pytest.approx(THRESHOLDS[1])   # 0.01: the first > distance 0


def test_summary_matches_evaluate():
    emb, issame = _random_pairs(np.random.default_rng(7), 400)
    _, _, accuracy, best = evaluate(emb, issame)
    summary = evaluate_pair_set(emb, issame)
    assert summary == {"acc": accuracy.mean(), "acc_std": accuracy.std(), "best_threshold": best.mean()}


def test_bad_inputs():
    emb, issame = _random_pairs(np.random.default_rng(1), 50)
    with pytest.raises(ValueError, match="exactly 2 embeddings per pair"):
        evaluate(emb[:-2], issame)
    with pytest.raises(ValueError, match="cannot be split into 10 folds"):
        evaluate(emb[:10], issame[:5])
