"""DIR_FAR: a hand-computed case with distractors, and equality with the published row-loop algorithm."""
import math

import numpy as np
import pytest

from utils.identification import DIR_FAR, find_thresholds_by_FAR, mate_ranks, rank_rates, tpir_at_fpir


def reference_DIR_FAR(score_mat, label_mat, ranks=(1,), FARs=(1.0,)):
    """The published algorithm written plainly: argsort each row, reverse, look for a mate in the top k."""
    match = label_mat.any(axis=1)
    s_m, l_m, s_nm = score_mat[match], label_mat[match], score_mat[~match]
    max_nm = np.max(s_nm, axis=1)
    if len(FARs) == 1 and FARs[0] >= 1.0:
        thresholds, openset = [np.min(score_mat) - 1e-10], False
    else:
        neg = np.sort(max_nm)[::-1]
        counts = np.round(len(neg) * np.array(FARs)).astype(np.int32)
        thresholds = np.array([neg[0] + 1e-5 if c == 0 else neg[c - 1] for c in counts])
        openset = True
    order = np.argsort(s_m, axis=1)
    sorted_labels = np.array([l_m[r, order[r][::-1]] for r in range(len(l_m))])
    gt = s_m[l_m] if openset else None
    dirs = np.zeros((len(FARs), len(ranks)), dtype=np.float32)
    fars = np.zeros(len(FARs), dtype=np.float32)
    for i, t in enumerate(thresholds):
        for j, k in enumerate(ranks):
            ok = sorted_labels[:, :k].any(axis=1)
            dirs[i, j] = ((gt >= t) & ok if openset else ok).astype(np.float32).mean()
        if len(s_nm):
            fars[i] = (max_nm >= t).astype(np.float32).mean()
    return (dirs.flatten() if 1 in dirs.shape else dirs), fars, thresholds


# gallery subjects 1, 2, 3; probes of subjects 1, 2 (mated) and 4, 5 (distractors, no mate)
SCORES = np.array([[0.65, 0.20, 0.10],    # subject 1: mate ranked first, score 0.65
                   [0.80, 0.50, 0.30],    # subject 2: mate ranked second, score 0.50
                   [0.40, 0.60, 0.20],    # subject 4: top score 0.60
                   [0.30, 0.10, 0.70]])   # subject 5: top score 0.70
LABELS = np.array([1, 2, 4, 5])[:, None] == np.array([1, 2, 3])[None, :]


def test_closed_set_hand_computed():
    dirs, fars, thresholds = DIR_FAR(SCORES, LABELS, ranks=[1, 2, 3])
    np.testing.assert_array_equal(dirs, np.array([0.5, 1.0, 1.0], dtype=np.float32))
    assert thresholds == [SCORES.min() - 1e-10]
    np.testing.assert_array_equal(fars, [1.0])     # every distractor top score is above the minimum


def test_open_set_hand_computed():
    # distractor top scores, high to low: 0.70, 0.60.
    # FAR 0.5 -> round(1) = 1 false alarm -> threshold 0.70: the rank-1 mate (0.65) is rejected.
    # FAR 1.0 (together with another FAR: open set) -> threshold 0.60: subject 1 is detected.
    # FAR 0.1 -> round(0.2) = 0 false alarms -> threshold 0.70 + 1e-5.
    dirs, fars, thresholds = DIR_FAR(SCORES, LABELS, ranks=[1, 2], FARs=[0.1, 0.5, 1.0])
    np.testing.assert_allclose(thresholds, [0.70 + 1e-5, 0.70, 0.60])
    np.testing.assert_array_equal(dirs, np.array([[0.0, 0.0], [0.0, 0.0], [0.5, 0.5]], dtype=np.float32))
    np.testing.assert_array_equal(fars, np.array([0.0, 0.5, 1.0], dtype=np.float32))
    dirs1, _, _ = DIR_FAR(SCORES, LABELS, ranks=[1], FARs=[0.5, 1.0])
    assert dirs1.shape == (2,)


def test_rate_tables_of_the_scripts(caplog):
    # the hand-computed cases above, as the evaluation scripts report them
    assert rank_rates(SCORES, LABELS, (1, 2)) == {"rank-1": 0.5, "rank-2": 1.0}
    assert tpir_at_fpir(SCORES, LABELS, (0.1, 0.5, 1.0)) == pytest.approx(
        {"TPIR@FPIR=0.1": 0.0, "FPIR@FPIR=0.1": 0.0, "TPIR@FPIR=0.5": 0.0, "FPIR@FPIR=0.5": 0.5,
         "TPIR@FPIR=1": 0.5, "FPIR@FPIR=1": 1.0})
    every_probe_mated = tpir_at_fpir(SCORES[:2], LABELS[:2], (0.1,))
    assert math.isnan(every_probe_mated["TPIR@FPIR=0.1"]) and "undefined" in caplog.text


def test_find_thresholds_by_far_rounds_like_the_reference():
    scores = np.array([0.9, 0.1, 0.5, 0.7, 0.3])
    labels = np.zeros(5, dtype=bool)
    # 5 negatives: FAR 0.1 -> round(0.5) = 0 (half to even); 0.3 -> round(1.5) = 2; 0.5 -> round(2.5) = 2
    np.testing.assert_allclose(find_thresholds_by_FAR(scores, labels, FARs=[0.1, 0.3, 0.5, 1.0]),
                               [0.9 + 1e-5, 0.7, 0.7, 0.1])
    every = find_thresholds_by_FAR(scores, labels)
    np.testing.assert_allclose(every, [0.1 + 1e-5, 0.1, 0.3, 0.5, 0.7, 0.9, 0.9 - 1e-5])


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("integer_scores", [False, True])
def test_equals_reference_on_random_data_with_ties(seed, integer_scores):
    rng = np.random.default_rng(seed)
    num_probes, num_gallery = 120, 40
    gallery_ids = np.arange(num_gallery)
    probe_ids = rng.integers(0, 60, num_probes)               # ids >= 40 are distractors
    labels = probe_ids[:, None] == gallery_ids[None, :]
    scores = rng.normal(size=(num_probes, num_gallery)).astype(np.float32)
    scores[labels] += 1.0
    if integer_scores:                                        # many exact ties with the mate score
        scores = np.round(scores * 2).astype(np.float32)
    for ranks, fars in [([1, 5, 10], [1.0]), ([1, 3], [0.01, 0.1, 0.5]), ([1], [0.2])]:
        got = DIR_FAR(scores, labels, ranks=ranks, FARs=fars)
        want = reference_DIR_FAR(scores, labels, ranks=ranks, FARs=fars)
        for g, w in zip(got, want):
            np.testing.assert_array_equal(np.asarray(g), np.asarray(w))


def test_several_mates_per_probe_closed_set_and_ranks():
    # TinyFace-style gallery with several images per identity; ties decided by argsort order
    scores = np.array([[0.1, 0.9, 0.9, 0.3],
                       [0.5, 0.2, 0.5, 0.5]])
    labels = np.array([[True, False, False, True],
                       [False, True, True, False]])
    want = reference_DIR_FAR(scores, labels, ranks=[1, 2, 3])[0]
    np.testing.assert_array_equal(DIR_FAR(scores, labels, ranks=[1, 2, 3])[0], want)
    order = np.argsort(scores, axis=1)[:, ::-1]
    first_mate = [int(np.flatnonzero(labels[r, order[r]])[0]) for r in range(2)]
    np.testing.assert_array_equal(mate_ranks(scores, labels), first_mate)
    with pytest.raises(ValueError, match="exactly one mate"):
        DIR_FAR(np.vstack([scores, [[0.0, 0.1, 0.2, 0.3]]]), np.vstack([labels, [[False] * 4]]),
                FARs=[0.1, 0.5])


def test_get_false_indices_outputs():
    out = DIR_FAR(SCORES, LABELS, ranks=[1], FARs=[0.5, 1.0], get_false_indices=True)
    dirs, fars, thresholds, match, false_retrieval, false_reject, false_accept, sort_idx = out
    np.testing.assert_array_equal(match, [True, True, False, False])
    np.testing.assert_array_equal(false_retrieval[:, 0], [[False, True], [False, True]])
    np.testing.assert_array_equal(false_reject[:, 0], [[True, True], [False, True]])
    np.testing.assert_array_equal(false_accept[:, 0], [[False, True], [True, True]])
    np.testing.assert_array_equal(sort_idx, np.argsort(SCORES[:2], axis=1))


def test_errors():
    with pytest.raises(ValueError, match="equal"):
        DIR_FAR(SCORES, LABELS[:, :2])
    with pytest.raises(ValueError, match="no probe has a mate"):
        DIR_FAR(SCORES, np.zeros_like(LABELS))
    with pytest.raises(ValueError, match="without a mate"):
        DIR_FAR(SCORES[:2], LABELS[:2], FARs=[0.1, 0.5])
