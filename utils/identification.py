"""Closed- and open-set identification: ``DIR_FAR`` (TinyFace, IJB-S, IJB-B/C 1:N).

The definitions are those of the ``DIR_FAR`` helper that AdaFace's low-quality evaluation uses
(borrowed from Yichun Shi's Probabilistic-Face-Embeddings code):

* a probe is *mated* when its row of ``label_mat`` has a True (its identity is in the gallery);
* rank-k: a mated probe succeeds when a mate is among the ``k`` highest-scoring gallery entries.
  Entries are ordered by ``np.argsort(scores)`` reversed, which fixes the order of equal scores;
* closed set (``FARs == [1.0]``): DIR = fraction of mated probes that succeed at rank k; the returned
  threshold is ``min(score_mat) - 1e-10``;
* open set: ``max_nm`` = the top score of each non-mated probe, sorted high to low; for a false
  alarm rate ``far``, ``n = round(far * #non-mated)`` (AdaFace's copy rounds; the original code
  truncates) and the threshold is ``max_nm[n - 1]`` (``n >= 1``) or ``max_nm[0] + 1e-5`` (``n == 0``).
  DIR = fraction of mated probes whose (single) mate score is ``>= threshold`` and that succeed at
  rank k; the returned FAR is the fraction of non-mated probes whose top score is ``>= threshold``.

The ranking is vectorised: the rank of the best mate is the number of gallery scores above the best
mate score; only rows where a non-mate ties with that score (or that hold a NaN) are ordered with
``np.argsort`` to reproduce the reference order exactly.
"""
from __future__ import annotations

import logging
from typing import Dict, Optional, Sequence

import numpy as np

logger = logging.getLogger(__name__)

_ROWS_PER_CHUNK_ELEMENTS = 1 << 24     # ~16 M score entries per chunk for the rank computation


def find_thresholds_by_FAR(score_vec: np.ndarray, label_vec: np.ndarray, FARs: Optional[Sequence[float]] = None,
                           epsilon: float = 1e-5) -> np.ndarray:
    """Thresholds on the negative scores (``~label_vec``) that give the false alarm rates ``FARs``.

    ``n = round(far * num_neg)`` negatives lie at or above the threshold (``score_neg[n-1]`` with the
    negatives sorted high to low; ``score_neg[0] + epsilon`` when ``n == 0``). With ``FARs=None``
    every distinct negative score is a threshold, plus one above and one below all of them.
    """
    score_vec = np.asarray(score_vec)
    label_vec = np.asarray(label_vec)
    if score_vec.ndim != 1 or score_vec.shape != label_vec.shape:
        raise ValueError(f"score_vec {score_vec.shape} and label_vec {label_vec.shape} must be equal 1-D shapes")
    score_neg = np.sort(score_vec[~label_vec.astype(bool)])[::-1]     # high to low
    if len(score_neg) < 1:
        raise ValueError("find_thresholds_by_FAR needs at least one negative score")
    if FARs is None:
        thresholds = np.unique(score_neg)
        thresholds = np.insert(thresholds, 0, thresholds[0] + epsilon)
        return np.insert(thresholds, thresholds.size, thresholds[-1] - epsilon)
    num_false_alarms = np.round(len(score_neg) * np.asarray(FARs)).astype(np.int32)
    return np.array([score_neg[0] + epsilon if n == 0 else score_neg[n - 1] for n in num_false_alarms])


def _argsort_rank_of_mate(scores: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """0-based position of the first mate in the order ``np.argsort(scores, axis=1)[:, ::-1]``."""
    order = np.argsort(scores, axis=1)[:, ::-1]
    return np.argmax(np.take_along_axis(labels, order, axis=1), axis=1)


def mate_ranks(score_mat_m: np.ndarray, label_mat_m: np.ndarray) -> np.ndarray:
    """0-based rank of the best-ranked mate of every (mated) probe row, in the reference order."""
    num_rows, num_cols = score_mat_m.shape
    ranks = np.empty(num_rows, dtype=np.int64)
    step = max(1, _ROWS_PER_CHUNK_ELEMENTS // max(num_cols, 1))
    for start in range(0, num_rows, step):
        s = score_mat_m[start:start + step]
        lab = label_mat_m[start:start + step]
        best_mate = np.where(lab, s, -np.inf).max(axis=1, keepdims=True)
        rank = np.count_nonzero(s > best_mate, axis=1)
        # a non-mate with exactly the best mate score (or a NaN, which argsort puts last, i.e. first
        # after reversal): the argsort order decides who comes first
        needs_sort = np.any((s == best_mate) & ~lab, axis=1)
        if np.issubdtype(s.dtype, np.floating):
            needs_sort |= np.isnan(s).any(axis=1)
        tied = np.flatnonzero(needs_sort)
        if tied.size:
            rank[tied] = _argsort_rank_of_mate(s[tied], lab[tied])
        ranks[start:start + step] = rank
    return ranks


def DIR_FAR(score_mat, label_mat, ranks: Sequence[int] = (1,), FARs: Sequence[float] = (1.0,),
            get_false_indices: bool = False):
    """Detection and identification rate at the given ranks and false alarm rates.

    ``score_mat``: (P, G) probe-by-gallery similarity scores; ``label_mat``: (P, G) booleans (True where
    the gallery entry has the probe's identity). Returns ``(DIRs, FARs, thresholds)``; ``DIRs`` is
    (F, R) float32, flattened when F or R is 1. With ``get_false_indices=True`` also returns
    ``match_indices, false_retrieval, false_reject, false_accept, sort_idx_mat_m`` as the reference does.
    See the module docstring for the definitions.
    """
    score_mat = np.asarray(score_mat)
    label_mat = np.asarray(label_mat)
    if score_mat.ndim != 2 or score_mat.shape != label_mat.shape:
        raise ValueError(f"score_mat {score_mat.shape} and label_mat {label_mat.shape} must be equal (P, G) shapes")
    if score_mat.shape[1] == 0:
        raise ValueError("DIR_FAR: the gallery is empty (score_mat has no columns)")
    label_mat = label_mat.astype(bool)
    ranks, far_targets = list(ranks), list(FARs)

    match_indices = label_mat.any(axis=1)
    score_mat_m, label_mat_m = score_mat[match_indices], label_mat[match_indices]
    score_mat_nm = score_mat[~match_indices]
    if score_mat_m.shape[0] == 0:
        raise ValueError("DIR_FAR: no probe has a mate in the gallery (label_mat has no True)")
    max_score_nm = np.max(score_mat_nm, axis=1)

    openset = not (len(far_targets) == 1 and far_targets[0] >= 1.0)
    if openset:
        if score_mat_nm.shape[0] == 0:
            raise ValueError("open-set identification (FAR < 1.0) needs at least one probe without a mate")
        thresholds = find_thresholds_by_FAR(max_score_nm, np.zeros(max_score_nm.shape, dtype=bool), FARs=far_targets)
        num_mates = label_mat_m.sum(axis=1)
        if np.any(num_mates != 1):
            raise ValueError(f"open-set identification needs exactly one mate per mated probe; "
                             f"{int(np.sum(num_mates != 1))} probes have several")
        gt_score_m = score_mat_m[label_mat_m]
    else:
        thresholds = [np.min(score_mat) - 1e-10]

    mate_rank = mate_ranks(score_mat_m, label_mat_m)
    DIRs = np.zeros([len(far_targets), len(ranks)], dtype=np.float32)
    FARs_out = np.zeros([len(far_targets)], dtype=np.float32)
    if get_false_indices:
        false_retrieval = np.zeros([len(far_targets), len(ranks), score_mat_m.shape[0]], dtype=bool)
        false_reject = np.zeros_like(false_retrieval)
        false_accept = np.zeros([len(far_targets), len(ranks), score_mat_nm.shape[0]], dtype=bool)
    for i, threshold in enumerate(thresholds):
        for j, rank in enumerate(ranks):
            success_retrieval = mate_rank < rank
            if openset:
                success_threshold = gt_score_m >= threshold
                DIRs[i, j] = (success_threshold & success_retrieval).astype(np.float32).mean()
            else:
                DIRs[i, j] = success_retrieval.astype(np.float32).mean()
            if get_false_indices:
                false_retrieval[i, j] = ~success_retrieval
                false_accept[i, j] = max_score_nm >= threshold
                if openset:
                    false_reject[i, j] = ~success_threshold
        if score_mat_nm.shape[0] > 0:
            FARs_out[i] = (max_score_nm >= threshold).astype(np.float32).mean()

    if DIRs.shape[0] == 1 or DIRs.shape[1] == 1:
        DIRs = DIRs.flatten()
    if get_false_indices:
        sort_idx_mat_m = np.argsort(score_mat_m, axis=1)
        return (DIRs, FARs_out, thresholds, match_indices, false_retrieval, false_reject, false_accept,
                sort_idx_mat_m)
    return DIRs, FARs_out, thresholds


def rank_rates(score_mat, label_mat, ranks: Sequence[int]) -> Dict[str, float]:
    """Closed-set identification: ``{'rank-k': DIR}`` (fractions of the mated probes), ``DIR_FAR``
    at FAR 1.0."""
    dirs, _, _ = DIR_FAR(score_mat, label_mat, ranks=list(ranks), FARs=[1.0])
    return {f"rank-{r}": float(v) for r, v in zip(ranks, np.atleast_1d(dirs))}


def tpir_at_fpir(score_mat, label_mat, fpirs: Sequence[float]) -> Dict[str, float]:
    """Open-set identification at rank 1: ``TPIR@FPIR=f`` and the achieved ``FPIR@FPIR=f`` for each
    target ``f`` (thresholds from the top scores of the probes without a mate). When every probe has
    a mate no threshold can be set: the rates are NaN, with a warning."""
    label_mat = np.asarray(label_mat, dtype=bool)
    if label_mat.ndim == 2 and label_mat.any(axis=1).all():
        logger.warning("identification: every probe has a mate in the gallery; TPIR@FPIR is undefined (NaN)")
        tpir = fpir = np.full(len(fpirs), np.nan)
    else:
        tpir, fpir, _ = DIR_FAR(score_mat, label_mat, ranks=[1], FARs=list(fpirs))
        tpir, fpir = np.atleast_1d(tpir), np.atleast_1d(fpir)
    result: Dict[str, float] = {}
    for target, t, f in zip(fpirs, tpir, fpir):
        result[f"TPIR@FPIR={target:g}"] = float(t)
        result[f"FPIR@FPIR={target:g}"] = float(f)
    return result
