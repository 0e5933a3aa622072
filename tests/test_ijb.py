"""IJB evaluation: template features, pair scores, TAR@FAR, 1:N and the meta-file readers."""
import math

import numpy as np
import pytest

from utils.ijb import (FAR_TARGETS, format_tar_far_table, identification, ijb_meta_paths,
                       image2template_feature, image2template_feature_reference, mean_over_galleries,
                       read_1n_csv, read_landmarks, read_template_media_list, read_template_pair_list,
                       select_template_features, tar_at_far, template_rows, unique_template_subjects,
                       verification, verification_reference)


# ------------------------------------------------------------------------------------------------
# template features
# ------------------------------------------------------------------------------------------------
def test_template_aggregation_hand_computed():
    # template 20: media 7 = frames (1,0,0) and (0,1,0) -> mean (0.5, 0.5, 0); media 9 = still (0,0,2)
    #   sum (0.5, 0.5, 2) -> / sqrt(4.5)
    # template 10: media 8 = one still (3, 0, 0) -> (1, 0, 0)   (images interleaved on purpose)
    feats = np.array([[1, 0, 0], [3, 0, 0], [0, 0, 2], [0, 1, 0]], dtype=np.float32)
    templates = np.array([20, 10, 20, 20])
    medias = np.array([7, 8, 9, 7])
    want = np.array([[1, 0, 0], [0.5 / math.sqrt(4.5), 0.5 / math.sqrt(4.5), 2 / math.sqrt(4.5)]])
    for func in (image2template_feature, image2template_feature_reference):
        got, unique_templates = func(feats, templates, medias)
        np.testing.assert_array_equal(unique_templates, [10, 20])
        np.testing.assert_allclose(got, want, rtol=1e-6)
    assert image2template_feature(feats, templates, medias)[0].dtype == np.float32


def _random_protocol(rng, num_images=400, dim=16, num_templates=30):
    feats = rng.normal(size=(num_images, dim)).astype(np.float32)
    template_ids = rng.choice(np.arange(1000, 5000), num_templates, replace=False)
    templates = template_ids[rng.integers(0, num_templates, num_images)]
    templates[:num_templates] = template_ids                      # every template has images
    medias = rng.integers(0, 12, num_images)                      # media ids shared across templates
    return feats, templates, medias


@pytest.mark.parametrize("seed", range(3))
def test_template_features_equal_reference_on_random_data(seed):
    feats, templates, medias = _random_protocol(np.random.default_rng(seed))
    fast, unique_fast = image2template_feature(feats, templates, medias)
    slow, unique_slow = image2template_feature_reference(feats, templates, medias)
    np.testing.assert_array_equal(unique_fast, unique_slow)
    np.testing.assert_allclose(fast, slow, atol=1e-6)
    fast64, _ = image2template_feature(feats.astype(np.float64), templates, medias)
    slow64, _ = image2template_feature_reference(feats.astype(np.float64), templates, medias)
    assert fast64.dtype == np.float64
    np.testing.assert_allclose(fast64, slow64, atol=1e-12)


@pytest.mark.parametrize("method", ["auto", "gram", "gather"])
def test_verification_equals_reference(method):
    rng = np.random.default_rng(5)
    feats, templates, medias = _random_protocol(rng)
    template_feats, unique_templates = image2template_feature_reference(feats, templates, medias)
    # pairs referencing every template, with repeats, in both orders
    p1 = np.concatenate([unique_templates, rng.choice(unique_templates, 3000)])
    p2 = np.concatenate([unique_templates[::-1], rng.choice(unique_templates, 3000)])
    want = verification_reference(template_feats, unique_templates, p1, p2, batch_size=700)
    got = verification(template_feats.astype(np.float32), unique_templates, p1, p2, batch_size=64, method=method)
    assert got.dtype == np.float64 and got.shape == (len(p1),)
    np.testing.assert_allclose(got, want, atol=1e-6)
    np.testing.assert_allclose(verification(template_feats, unique_templates, p1, p2, method=method), want,
                               atol=1e-12)


def test_verification_bipartite_pairs_and_errors():
    rng = np.random.default_rng(2)
    feats = rng.normal(size=(50, 8)).astype(np.float32)
    unique_templates = np.arange(50) * 3 + 1
    p1 = rng.choice(unique_templates[:10], 2000)          # enrollment x verification, as in IJB
    p2 = rng.choice(unique_templates[10:], 2000)
    want = np.einsum("ij,ij->i", feats[(p1 - 1) // 3].astype(np.float64), feats[(p2 - 1) // 3])
    for method in ("auto", "gram", "gather"):
        np.testing.assert_allclose(verification(feats, unique_templates, p1, p2, method=method), want, atol=1e-5)
    with pytest.raises(ValueError, match=r"p2: 1 template id\(s\) have no images.*\[5\]"):
        verification(feats, unique_templates, p1[:3], np.array([4, 5, 7]))
    with pytest.raises(ValueError, match="sorted and unique"):
        verification(feats, unique_templates[::-1], p1, p2)


@pytest.mark.parametrize("unique_templates", [np.array([3, 8, 20, 21]),                  # lookup table
                                              np.array([3, 8, 20, 10 ** 12])])           # searchsorted
def test_template_rows_both_lookups(unique_templates):
    np.testing.assert_array_equal(template_rows(unique_templates, unique_templates[[2, 0, 3, 3, 1]]),
                                  [2, 0, 3, 3, 1])
    for absent in (1, 5, 22, 10 ** 13):       # below, between, above the known ids
        with pytest.raises(ValueError, match=rf"pairs: 1 template id\(s\).*\[{absent}\]"):
            template_rows(unique_templates, np.array([8, absent, 3]), "pairs")


# ------------------------------------------------------------------------------------------------
# TAR @ FAR
# ------------------------------------------------------------------------------------------------
def test_perfectly_separable_scores_give_tar_one_everywhere():
    rng = np.random.default_rng(0)
    labels = (rng.random(20000) < 0.1).astype(int)
    scores = np.where(labels == 1, rng.uniform(0.6, 1.0, labels.size), rng.uniform(-1.0, 0.4, labels.size))
    assert tar_at_far(scores, labels) == {far: 1.0 for far in FAR_TARGETS}


def test_tar_at_far_hand_computed():
    # 4 genuine, 10 impostor scores. roc_curve keeps only the corners of the staircase:
    # (FPR, TPR) = (0, 0) (0, .25) (.1, .25) (.1, .75) (.8, .75) (.8, 1) (1, 1)
    genuine = [0.95, 0.85, 0.8, 0.1]
    impostor = [0.9, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.15, 0.05, 0.0]
    scores = np.array(genuine + impostor)
    labels = np.array([1] * 4 + [0] * 10)
    result = tar_at_far(scores, labels, far_targets=(0.0, 1e-6, 0.1, 0.2, 0.5))
    # FAR 0 and 1e-6: nearest FPR 0, highest TPR there 0.25; FAR 0.1 and 0.2: FPR 0.1 -> 0.75;
    # FAR 0.5: the nearest kept point is FPR 0.8 (|0.3| < |0.4|), highest TPR there 1.0
    assert result == {0.0: 0.25, 1e-6: 0.25, 0.1: 0.75, 0.2: 0.75, 0.5: 1.0}


def test_tar_at_far_matches_published_reading_on_random_scores():
    from sklearn.metrics import roc_curve
    rng = np.random.default_rng(4)
    labels = (rng.random(5000) < 0.3).astype(int)
    scores = np.round(rng.normal(size=5000) + labels, 2)          # coarse scores: many ties
    fpr, tpr, _ = roc_curve(labels, scores)
    fpr, tpr = np.flipud(fpr), np.flipud(tpr)
    want = {}
    for far in FAR_TARGETS:
        _, index = min(zip(abs(fpr - far), range(len(fpr))))
        want[far] = tpr[index]
    assert tar_at_far(scores, labels) == want


def test_tar_at_far_errors_and_table():
    with pytest.raises(ValueError, match="both 0"):
        tar_at_far(np.ones(3), np.ones(3))
    with pytest.raises(ValueError, match="NaN"):
        tar_at_far(np.array([0.1, np.nan]), np.array([0, 1]))
    table = format_tar_far_table({"ir50-IJBC": {1e-4: 0.9612, 1e-3: 0.97}})
    text = str(table)
    assert "0.0001" in text and "96.12" in text and "97.00" in text and "ir50-IJBC" in text


# ------------------------------------------------------------------------------------------------
# 1:N
# ------------------------------------------------------------------------------------------------
def test_identification_per_gallery_and_mean():
    # gallery subjects 1, 2 (unit vectors e0, e1); probes of subject 1 (near e0), 2 (closer to e0 than e1),
    # 3 (a distractor with top score 0.5)
    gallery = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    probes = np.array([[0.9, 0.1, 0.0], [0.6, 0.55, 0.0], [0.5, 0.0, 0.5]])
    result = identification(gallery, [1, 2], probes, [1, 2, 3], ranks=(1, 2), fpirs=(0.5, 1.0))
    assert result["rank-1"] == 0.5 and result["rank-2"] == 1.0
    # FPIR 0.5 -> round(0.5) = 0 false alarms -> threshold 0.5 + 1e-5: probe 1 (mate 0.9, rank 1) passes
    assert result["TPIR@FPIR=0.5"] == 0.5 and result["FPIR@FPIR=0.5"] == 0.0
    # FPIR 1.0 (open set) -> threshold 0.5; probe 2 fails at rank 1
    assert result["TPIR@FPIR=1"] == 0.5 and result["FPIR@FPIR=1"] == 1.0
    assert result["num_mated"] == 2 and result["num_nonmated"] == 1
    # a second gallery where everybody is mated: TPIR is undefined
    other = identification(gallery, [1, 2], probes[:2], [1, 2], ranks=(1, 2), fpirs=(0.5, 1.0))
    assert math.isnan(other["TPIR@FPIR=0.5"])
    mean = mean_over_galleries([result, {**result, "rank-1": 1.0}])
    assert mean["rank-1"] == 0.75 and mean["num_mated"] == 4


def test_template_subject_helpers():
    unique_templates, subjects = unique_template_subjects(np.array([5, 3, 5, 3, 9]), np.array([50, 30, 50, 30, 90]))
    np.testing.assert_array_equal(unique_templates, [3, 5, 9])
    np.testing.assert_array_equal(subjects, [30, 50, 90])
    feats = np.arange(12.0).reshape(4, 3)
    np.testing.assert_array_equal(select_template_features(feats, np.array([1, 3, 5, 9]), np.array([9, 3])),
                                  feats[[3, 1]])


# ------------------------------------------------------------------------------------------------
# meta files (written here in the InsightFace release formats)
# ------------------------------------------------------------------------------------------------
def test_readers_round_trip(tmp_path):
    media = tmp_path / "ijbc_face_tid_mid.txt"
    media.write_text("1.jpg 1 69544\n2.jpg 1 3864\n3.jpg 2 3864\n")
    images, templates, medias = read_template_media_list(media)
    assert images.tolist() == ["1.jpg", "2.jpg", "3.jpg"]
    np.testing.assert_array_equal(templates, [1, 1, 2])
    np.testing.assert_array_equal(medias, [69544, 3864, 3864])

    pairs = tmp_path / "ijbc_template_pair_label.txt"
    pairs.write_text("1 11065 1\n1 11066 0\n")
    t1, t2, label = read_template_pair_list(pairs)
    assert t1.tolist() == [1, 1] and t2.tolist() == [11065, 11066] and label.tolist() == [1, 0]

    landmarks = tmp_path / "ijbc_name_5pts_score.txt"
    landmarks.write_text("1.jpg 10 20 30 21 20.5 30 12 40 28 41 0.99\n"
                         "2.jpg 1 2 3 4 5 6 7 8 9 10 0.5\n")
    names, points, faceness = read_landmarks(landmarks)
    assert names.tolist() == ["1.jpg", "2.jpg"]
    assert points.shape == (2, 5, 2) and points.dtype == np.float32
    np.testing.assert_allclose(points[0], [[10, 20], [30, 21], [20.5, 30], [12, 40], [28, 41]])
    np.testing.assert_allclose(faceness, [0.99, 0.5])

    csv = tmp_path / "ijbc_1N_gallery_G1.csv"
    csv.write_text("TEMPLATE_ID,SUBJECT_ID,FILENAME,SIGHTING_ID\n1,100,img/1.jpg,5\n1,100,img/2.jpg,6\n7,200,a.jpg,1\n")
    template_ids, subject_ids = read_1n_csv(csv)
    assert template_ids.tolist() == [1, 1, 7] and subject_ids.tolist() == [100, 100, 200]


def test_readers_reject_bad_files(tmp_path):
    bad = tmp_path / "ijbc_template_pair_label.txt"
    bad.write_text("1 2 1\n3 x 0\n")
    with pytest.raises(ValueError, match=r"ijbc_template_pair_label.txt, line 2: column 't2'"):
        read_template_pair_list(bad)
    bad.write_text("1 2 1\n3 4 0 9\n")
    with pytest.raises(ValueError, match="ijbc_template_pair_label.txt, line 2: expected 3 .*found 4"):
        read_template_pair_list(bad)
    bad.write_text("1 2 1\n3 4 2\n")
    with pytest.raises(ValueError, match="line 2: the label must be 0 or 1, found 2"):
        read_template_pair_list(bad)
    short = tmp_path / "lm.txt"
    short.write_text("1.jpg 1 2 3 4 5 6 7 8 9 10\n")
    with pytest.raises(ValueError, match="lm.txt, line 1: expected 12 .*found 11"):
        read_landmarks(short)
    csv = tmp_path / "probe.csv"
    csv.write_text("TEMPLATE,SUBJECT\n1,2\n")
    with pytest.raises(ValueError, match="probe.csv, line 1: the header line must name the columns TEMPLATE_ID, SUBJECT_ID"):
        read_1n_csv(csv)
    with pytest.raises(FileNotFoundError, match="nothing.txt"):
        read_template_media_list(tmp_path / "nothing.txt")


def test_meta_paths_list_every_missing_file(tmp_path):
    meta = tmp_path / "IJBB" / "meta"
    meta.mkdir(parents=True)
    (meta / "ijbb_face_tid_mid.txt").write_text("1.jpg 1 1\n")
    with pytest.raises(FileNotFoundError) as err:
        ijb_meta_paths(tmp_path, "IJBB", parts=("verification", "identification"))
    message = str(err.value)
    for name in ("ijbb_template_pair_label.txt", "ijbb_1N_gallery_S1.csv", "ijbb_1N_gallery_S2.csv",
                 "ijbb_1N_probe_mixed.csv"):
        assert name in message
    assert "ijbb_face_tid_mid.txt" not in message
    (meta / "ijbb_template_pair_label.txt").write_text("1 1 1\n")
    paths = ijb_meta_paths(tmp_path, "ijbb", parts=("verification",))
    assert paths["template_pairs"] == meta / "ijbb_template_pair_label.txt"
    with pytest.raises(ValueError, match="IJBB' or 'IJBC"):
        ijb_meta_paths(tmp_path, "IJBA")
