"""10-fold pair verification (LFW, CFP-FP, AgeDB-30, CALFW, CPLFW, ...).

The protocol of InsightFace's ``calculate_roc`` as used by AdaFace (``evaluate_utils.evaluate``):

* the embeddings of pair ``i`` are rows ``2i`` and ``2i+1``; the distance of a pair is the squared
  Euclidean distance between its two (already L2-normalised) embeddings;
* a pair is predicted "same" when its distance is strictly below the threshold; thresholds are
  ``np.arange(0, 4, 0.01)``;
* the pairs are split in order into ``nrof_folds`` folds (``KFold(shuffle=False)``); on each fold the
  threshold with the best accuracy on the other folds is chosen (the first one when several tie, as
  ``np.argmax`` does) and the accuracy of this fold at that threshold is recorded;
* ``tpr``/``fpr`` are the ROC (per threshold) of each test fold, averaged over the folds.

Instead of a Python loop over 400 thresholds x 10 folds this module counts, for all thresholds at
once, how many distances of each class fall below each threshold (a sorted search); the counts and
therefore every returned number are identical to the loop.
"""
from __future__ import annotations

import logging
from typing import Dict, Sequence, Tuple

import numpy as np
from sklearn.model_selection import KFold

logger = logging.getLogger(__name__)

THRESHOLDS = np.arange(0, 4, 0.01)


def _pair_distances(embeddings: np.ndarray, actual_issame: np.ndarray) -> np.ndarray:
    """Squared Euclidean distance of each pair (rows 2i, 2i+1), with input validation."""
    if embeddings.ndim != 2:
        raise ValueError(f"embeddings must have shape (2 * num_pairs, D), got {embeddings.shape}")
    if actual_issame.ndim != 1:
        raise ValueError(f"actual_issame must be a 1-D sequence of booleans, got shape {actual_issame.shape}")
    if embeddings.shape[0] != 2 * actual_issame.shape[0]:
        raise ValueError(f"{embeddings.shape[0]} embeddings for {actual_issame.shape[0]} pairs; "
                         f"expected exactly 2 embeddings per pair (rows 2i and 2i+1)")
    norms = np.linalg.norm(embeddings[: min(len(embeddings), 64)].astype(np.float64), axis=1)
    if norms.size and not np.allclose(norms, 1.0, atol=1e-3):
        logger.warning("evaluate(): embeddings do not look L2-normalised (norms %.3f..%.3f); the "
                       "thresholds 0..3.99 assume unit vectors", norms.min(), norms.max())
    diff = np.subtract(embeddings[0::2], embeddings[1::2])
    return np.sum(np.square(diff), 1)


def _counts_below(sorted_values: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """For each threshold t, how many values are strictly below t."""
    return np.searchsorted(sorted_values, thresholds, side="left")


def calculate_roc(thresholds: np.ndarray, dist: np.ndarray, actual_issame: np.ndarray,
                  nrof_folds: int = 10) -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """10-fold ROC and accuracy from pair distances; see the module docstring.

    Returns ``(tpr, fpr, accuracy, best_thresholds)``: mean ROC over folds (one value per threshold),
    per-fold accuracy and per-fold chosen threshold.
    """
    thresholds = np.asarray(thresholds, dtype=np.float64)
    dist = np.asarray(dist, dtype=np.float64)    # exact; comparisons happen in float64 as np.less does
    issame = np.asarray(actual_issame).astype(bool)
    if dist.shape != issame.shape:
        raise ValueError(f"{dist.shape[0]} distances for {issame.shape[0]} pair labels")
    nrof_pairs = len(issame)
    if nrof_pairs < nrof_folds:
        raise ValueError(f"{nrof_pairs} pairs cannot be split into {nrof_folds} folds")
    folds = list(KFold(n_splits=nrof_folds, shuffle=False).split(np.arange(nrof_pairs)))

    # per fold, per threshold: true/false accepts in that fold
    tp = np.empty((nrof_folds, len(thresholds)), dtype=np.int64)
    fp = np.empty_like(tp)
    n_pos = np.empty(nrof_folds, dtype=np.int64)
    n_neg = np.empty(nrof_folds, dtype=np.int64)
    for k, (_, test) in enumerate(folds):
        same = issame[test]
        pos, neg = np.sort(dist[test][same]), np.sort(dist[test][~same])
        tp[k], fp[k] = _counts_below(pos, thresholds), _counts_below(neg, thresholds)
        n_pos[k], n_neg[k] = len(pos), len(neg)
    tn = n_neg[:, None] - fp

    tprs = np.zeros(tp.shape)
    fprs = np.zeros(tp.shape)
    accuracy = np.zeros(nrof_folds)
    best_thresholds = np.zeros(nrof_folds)
    for k, (train, test) in enumerate(folds):
        train_correct = (tp.sum(0) - tp[k]) + (tn.sum(0) - tn[k])
        acc_train = train_correct.astype(np.float64) / len(train)
        best = int(np.argmax(acc_train))          # first best threshold, as the loop does
        best_thresholds[k] = thresholds[best]
        if n_pos[k]:
            tprs[k] = tp[k].astype(np.float64) / n_pos[k]
        if n_neg[k]:
            fprs[k] = fp[k].astype(np.float64) / n_neg[k]
        accuracy[k] = float(tp[k, best] + tn[k, best]) / len(test)
    return np.mean(tprs, 0), np.mean(fprs, 0), accuracy, best_thresholds


def evaluate(embeddings, actual_issame: Sequence[bool], nrof_folds: int = 10
             ) -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The pair-verification protocol of AdaFace/InsightFace.

    ``embeddings``: (2P, D) L2-normalised embeddings, pair ``i`` at rows ``2i`` and ``2i+1``;
    ``actual_issame``: P booleans. Returns ``(tpr, fpr, accuracy, best_thresholds)`` exactly as the
    published ``evaluate_utils.evaluate``: mean ROC over folds at the 400 thresholds, per-fold
    accuracies and per-fold best thresholds.
    """
    embeddings = np.asarray(embeddings)
    issame = np.asarray(actual_issame)
    dist = _pair_distances(embeddings, issame)
    return calculate_roc(THRESHOLDS, dist, issame, nrof_folds=nrof_folds)


def evaluate_pair_set(embeddings, issame: Sequence[bool], nrof_folds: int = 10) -> Dict[str, float]:
    """Summary of :func:`evaluate`: ``acc`` (mean fold accuracy), ``acc_std`` (std over folds),
    ``best_threshold`` (mean of the per-fold thresholds)."""
    _, _, accuracy, best_thresholds = evaluate(embeddings, issame, nrof_folds=nrof_folds)
    return {"acc": float(accuracy.mean()), "acc_std": float(accuracy.std()),
            "best_threshold": float(best_thresholds.mean())}
