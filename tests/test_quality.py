"""utils.quality against plain restatements: the indicator of the published AdaFace head, the
error-versus-reject curve (ties in quality rejected in expectation, brute force over every tie
order), pAUC (numerical integration), identification, the Laplacian baseline (OpenCV), template
quality (loops)."""
from __future__ import annotations

import argparse
import itertools
import math

import cv2
import numpy as np
import pytest
import torch

from head import AdaFace
from net import build_model
from utils.checkpoint import save_lightning_style_checkpoint
from utils.quality import (QualityError, error_versus_reject, identification_versus_reject, laplacian_variance,
                           pair_quality, quality_indicator, random_rejection, read_norm_statistics, template_quality,
                           threshold_at_fmr)


# ------------------------------------------------------------------------------------------------
# the indicator
# ------------------------------------------------------------------------------------------------
def published_indicator(z, mean, std, h):
    """The published head.py: safe_norms = clip(z, 0.001, 100); (safe - mean) / (std + 1e-3) * h,
    clipped to [-1, 1] (eps = 1e-3 written here, from the published AdaFace head)."""
    safe = min(max(z, 0.001), 100.0)
    return min(max((safe - mean) / (std + 1e-3) * h, -1.0), 1.0)


def test_quality_indicator_is_the_published_formula():
    norms = [0.0, 5.0, 19.0, 20.0, 21.5, 26.0, 40.0, 150.0]
    mean, std, h = 20.0, 4.0, 0.333
    want = [published_indicator(z, mean, std, h) for z in norms]
    np.testing.assert_allclose(quality_indicator(norms, mean, std, h), want, rtol=1e-12, atol=1e-15)
    # eps matters where the std is tiny: std 0.002 gives (21 - 20) / 0.003 * 0.333 = 111 -> clipped,
    # and 20.0005 gives 0.0005 / 0.003 * 0.333 = 0.0555 (0.08325 without eps)
    assert quality_indicator([20.0005], 20.0, 0.002, 0.333)[0] == pytest.approx(0.0005 / 0.003 * 0.333)
    # torch in, torch out, same values (the head calls it on tensors)
    t = quality_indicator(torch.tensor(norms, dtype=torch.float64), torch.tensor([mean], dtype=torch.float64),
                          torch.tensor([std], dtype=torch.float64), h)
    assert isinstance(t, torch.Tensor)
    np.testing.assert_allclose(t.numpy(), want, rtol=1e-12, atol=1e-15)


def test_indicator_equals_the_heads_margin_scaler_with_its_statistics():
    head = AdaFace(embedding_size=8, classnum=3, m=0.4, h=0.25, s=64.0, t_alpha=0.01)
    norms = torch.tensor([[3.0], [9.0], [14.0], [27.0]])
    scaler = head.margin_scaler(norms)           # updates the statistics first, then uses them
    mean, std = float(head.batch_mean), float(head.batch_std)
    # the EMA of the published head with t_alpha = 0.01, from the initial 20 and 100
    assert mean == pytest.approx(0.01 * 13.25 + 0.99 * 20, rel=1e-6)
    assert std == pytest.approx(0.01 * float(norms.std()) + 0.99 * 100, rel=1e-6)
    want = [published_indicator(float(z), mean, std, 0.25) for z in norms.reshape(-1)]
    np.testing.assert_allclose(scaler.reshape(-1).numpy(), want, rtol=1e-5)


def test_norm_statistics_read_from_a_checkpoint(tmp_path):
    model = build_model("ir_tiny")
    head = {"kernel": torch.zeros(512, 3), "t": torch.zeros(1), "batch_mean": torch.tensor([17.5]),
            "batch_std": torch.tensor([2.5])}
    path = save_lightning_style_checkpoint(tmp_path / "a.ckpt", model, head_state=head,
                                           hyper_parameters=argparse.Namespace(arch="ir_tiny", h=0.4, head="adaface"))
    stats = read_norm_statistics(path)
    assert (stats.batch_mean, stats.batch_std, stats.h) == (17.5, 2.5, 0.4)
    assert stats.indicator([17.5 + 2.501])[0] == pytest.approx(0.4)
    # without h in the arguments: the published default 0.333
    path = save_lightning_style_checkpoint(tmp_path / "b.ckpt", model, head_state=head,
                                           hyper_parameters={"arch": "ir_tiny"})
    assert read_norm_statistics(path).h == 0.333
    # an ArcFace checkpoint has no statistics: one clear error
    path = save_lightning_style_checkpoint(tmp_path / "c.ckpt", model, head_state={"kernel": torch.zeros(512, 3)},
                                           hyper_parameters={"arch": "ir_tiny", "head": "arcface"})
    with pytest.raises(QualityError, match=r"c\.ckpt: holds no AdaFace norm statistics.*--head arcface"):
        read_norm_statistics(path)


# ------------------------------------------------------------------------------------------------
# error versus reject
# ------------------------------------------------------------------------------------------------
def brute_force_curve(errors, counted, quality, ks):
    """FNMR after rejecting k items, ties broken by every order of the tied items (all equally
    likely): the ratio of the expected remaining errors to the expected remaining counted items."""
    n = len(quality)
    orders = [p for p in itertools.permutations(range(n))
              if all(quality[p[i]] <= quality[p[i + 1]] for i in range(n - 1))]
    out = []
    for k in ks:
        rej_e = np.mean([sum(errors[i] for i in p[:k]) for p in orders])
        rej_c = np.mean([sum(counted[i] for i in p[:k]) for p in orders])
        out.append((sum(errors) - rej_e) / (sum(counted) - rej_c))
    return np.array(out)


def integrate(curve_x, curve_y, upper, steps=400_000):
    """Mean of the piecewise-linear curve over [0, upper] by a fine midpoint rule."""
    xs = (np.arange(steps) + 0.5) * upper / steps
    return float(np.mean(np.interp(xs, curve_x, curve_y)))


# 8 pairs: quality ties (0.2 x3, 0.5 x2), genuine and impostor pairs in both groups
SCORES = np.array([0.10, 0.95, 0.30, 0.62, 0.40, 0.85, 0.55, 0.20])
LABELS = np.array([1, 1, 1, 0, 1, 0, 1, 0], dtype=bool)
QUALITY = np.array([0.2, 0.9, 0.2, 0.5, 0.2, 0.7, 0.5, 0.1])


def test_threshold_at_fmr_rule():
    scores = np.r_[np.arange(10) / 10.0, [0.95, 0.97]]            # 10 impostors 0.0 .. 0.9, 2 genuine
    labels = np.r_[np.zeros(10, bool), [True, True]]
    assert threshold_at_fmr(scores, labels, 0.1) == (pytest.approx(0.8), pytest.approx(0.1), 10)
    assert threshold_at_fmr(scores, labels, 0.25) == (pytest.approx(0.7), pytest.approx(0.2), 10)
    assert threshold_at_fmr(scores, labels, 1e-3) == (pytest.approx(0.9), 0.0, 10)   # too few impostors
    # a genuine score equal to the threshold is a non-match (a match is strictly above)
    scores[-2] = 0.8
    curve = error_versus_reject(scores, labels, np.ones(12), fmr=0.1)[0.1]
    assert curve.error[0] == 0.5


def test_evrc_equals_the_brute_force_expectation_over_tie_orders():
    # FMR 0.34 with 3 impostors: k = 1, threshold = 0.62, genuine pairs at or below it fail
    threshold = 0.62
    errors = LABELS & ~(SCORES > threshold)
    assert errors.tolist() == [True, False, True, False, True, False, True, False]
    curve = error_versus_reject(SCORES, LABELS, QUALITY, fmr=0.34, max_reject=0.3)[0.34]
    assert curve.threshold == pytest.approx(threshold) and curve.achieved_fmr == pytest.approx(1 / 3)
    # 0.3 of 8 pairs = 2.4: points k = 0 .. 3, the last one beyond 0.3 for the interpolation
    ks = [0, 1, 2, 3]
    np.testing.assert_allclose(curve.reject, np.array(ks) / 8)
    want = brute_force_curve(errors, LABELS, QUALITY, ks)
    np.testing.assert_allclose(curve.error, want, rtol=1e-12)
    # by hand: k = 1 rejects the impostor of quality 0.1 (4/5 still fail); k = 2 rejects one of the
    # three tied genuine failures of quality 0.2 in expectation: (4 - 1) / (5 - 1)
    np.testing.assert_allclose(curve.error[:3], [4 / 5, 4 / 5, 3 / 4])
    assert curve.pauc == pytest.approx(integrate(curve.reject, curve.error, 0.3), abs=1e-6)
    assert curve.counted == 5 and curve.items == 8


def test_evrc_does_not_depend_on_the_input_order():
    perm = np.array([5, 2, 7, 0, 3, 6, 1, 4])
    a = error_versus_reject(SCORES, LABELS, QUALITY, fmr=(0.34,), max_reject=0.5)[0.34]
    b = error_versus_reject(SCORES[perm], LABELS[perm], QUALITY[perm], fmr=(0.34,), max_reject=0.5)[0.34]
    np.testing.assert_array_equal(a.error, b.error)
    assert a.pauc == b.pauc


def test_random_rejection_and_constant_quality_are_flat():
    curve = error_versus_reject(SCORES, LABELS, QUALITY, fmr=0.34, max_reject=0.2)[0.34]
    flat = random_rejection(curve)
    assert np.all(flat.error == curve.error[0]) and flat.pauc == curve.error[0] == pytest.approx(0.8)
    same = error_versus_reject(SCORES, LABELS, np.full(8, 3.0), fmr=0.34, max_reject=0.2)[0.34]
    np.testing.assert_allclose(same.error, 0.8)
    assert same.pauc == pytest.approx(0.8)


def test_perfect_quality_lowers_the_pauc_as_computed_by_hand():
    # 10 genuine pairs, 2 fail; their quality is the lowest: rejecting them empties the errors
    scores = np.r_[np.full(8, 0.9), [0.1, 0.2], np.linspace(0.0, 0.5, 10)]
    labels = np.r_[np.ones(10, bool), np.zeros(10, bool)]
    quality = np.r_[np.full(8, 1.0), [0.0, 0.0], np.full(10, 1.0)]
    curve = error_versus_reject(scores, labels, quality, fmr=0.1, max_reject=0.2)[0.1]
    # the two failures tie at the bottom: after k = 1 one of them is gone in expectation
    np.testing.assert_allclose(curve.error, [2 / 10, 1 / 9, 0.0, 0.0, 0.0, 0.0])   # k = 0 .. 4, and 5
    # mean over [0, 0.2]: trapezoids (0.2 + 1/9) / 2 * 0.05 + (1/9) / 2 * 0.05, over 0.2
    assert curve.pauc == pytest.approx(((0.2 + 1 / 9) / 2 * 0.05 + (1 / 9) / 2 * 0.05) / 0.2)


def test_pair_quality_is_the_lower_of_the_two():
    np.testing.assert_array_equal(pair_quality([1.0, 5.0, 2.0], [3.0, 4.0, 2.0]), [1.0, 4.0, 2.0])


def test_identification_versus_reject_equals_a_plain_restatement():
    rng = np.random.default_rng(3)
    scores = rng.normal(size=(7, 5))
    gallery = np.array([0, 1, 2, 3, 4])
    probes = np.array([0, 1, 2, 3, 4, 0, 9])              # the last probe has no mate
    labels = probes[:, None] == gallery[None, :]
    quality = np.array([0.3, 0.1, 0.3, 0.3, 0.8, 0.1, 0.0])
    curve = identification_versus_reject(scores, labels, quality, max_reject=0.45)
    mated = labels.any(axis=1)
    misses = np.array([m and gallery[np.argmax(s)] != p for s, p, m in zip(scores, probes, mated)])
    ks = list(range(0, 5))                                 # 0.45 * 7 = 3.15: k = 0 .. 4
    np.testing.assert_allclose(curve.error, brute_force_curve(misses, mated, quality, ks), rtol=1e-12)
    assert curve.error[0] == pytest.approx(misses.sum() / 6)
    assert curve.pauc == pytest.approx(integrate(curve.reject, curve.error, 0.45), abs=1e-6)


def test_bad_inputs_are_one_clear_error():
    with pytest.raises(QualityError, match="different lengths"):
        error_versus_reject(SCORES, LABELS, QUALITY[:5])
    with pytest.raises(QualityError, match="no impostor"):
        error_versus_reject(SCORES, np.ones(8, bool), QUALITY)
    with pytest.raises(QualityError, match="NaN"):
        error_versus_reject(SCORES, LABELS, np.r_[QUALITY[:7], np.nan])


# ------------------------------------------------------------------------------------------------
# the image baseline and templates
# ------------------------------------------------------------------------------------------------
def test_laplacian_variance_equals_opencv_on_the_interior(rng):
    bgr = rng.integers(0, 256, size=(2, 20, 24, 3)).astype(np.uint8)
    bgr[1] = cv2.GaussianBlur(bgr[1], (0, 0), 2.0)            # a blurred image is less sharp
    x = torch.from_numpy((bgr.astype(np.float32) / 255.0 - 0.5) / 0.5).permute(0, 3, 1, 2)
    got = laplacian_variance(x).numpy()
    for i in range(2):
        grey = cv2.cvtColor(bgr[i].astype(np.float32), cv2.COLOR_BGR2GRAY).astype(np.float64)
        lap = cv2.Laplacian(grey, cv2.CV_64F, ksize=1)[1:-1, 1:-1]   # kernel [[0,1,0],[1,-4,1],[0,1,0]]
        assert got[i] == pytest.approx(lap.var(), rel=1e-4)
    assert got[1] < got[0] / 10


def test_template_quality_is_the_mean_over_media_of_media_means():
    templates = np.array([7, 7, 7, 7, 3, 3, 9])
    medias = np.array([1, 1, 1, 2, 5, 6, 8])
    quality = np.array([1.0, 2.0, 3.0, 10.0, 4.0, 6.0, 0.5])
    ids, q = template_quality(quality, templates, medias)
    np.testing.assert_array_equal(ids, [3, 7, 9])
    # template 7: media 1 mean 2, media 2 mean 10 -> 6 (the image mean would be 4)
    np.testing.assert_allclose(q, [5.0, 6.0, 0.5])
    assert not math.isclose(q[1], quality[:4].mean())
