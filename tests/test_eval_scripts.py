"""The evaluation scripts end to end: tiny demo sets in the release layouts, ir_tiny on the CPU.

Every script is checked against a straightforward reference (an independent model pass with the
flip fusion written out, plain loops for templates, scores and ranks), re-run from its saved
features, and fed hand-made features whose results are known.
"""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from sklearn.metrics import roc_curve

from tests.reference_image import published_input
import utils.eval_common as eval_common
from data import MissingPairSetsError
from face_alignment.similarity import align_face
from net import build_model
from tests.scripts import load_script
from utils.checkpoint import save_lightning_style_checkpoint
from utils.demo_data import generate_demo_data
from utils.demo_eval_data import TINYFACE_ALIGNED_DIR, generate_ijb, generate_ijbs, generate_tinyface
from utils.eval_common import EvalInputError, FeatureSet, MissingFilesError, load_features, save_features
from utils.evaluate_utils import evaluate_pair_set
from utils.ijb import ijb_meta_paths, read_1n_csv, read_landmarks, read_template_media_list, read_template_pair_list
from utils.image import load_image_file
from utils.pairsets import load_pair_bin

REPO = Path(__file__).resolve().parent.parent


ijb_script = load_script("validation_mixed/validate_IJB_BC.py")
tinyface_script = load_script("validation_lq/validate_tinyface.py")
ijbs_script = load_script("validation_lq/validate_IJB_S.py")
hq_script = load_script("validation_hq/eval_5valsets.py")

CPU = ["--device", "cpu"]


# ------------------------------------------------------------------------------------------------
# fixtures and references
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("eval_scripts")


@pytest.fixture(scope="module")
def tiny(work):
    """A random ir_tiny in a Lightning-style checkpoint that records its architecture."""
    torch.manual_seed(0)
    model = build_model("ir_tiny").eval()
    path = save_lightning_style_checkpoint(work / "tiny.ckpt", model, hyper_parameters={"arch": "ir_tiny"})
    return path, model


@pytest.fixture(scope="module")
def ijbc(work):
    return generate_ijb(work / "ijb", "IJBC", seed=0, num_subjects=4)


@pytest.fixture(scope="module")
def tinyface(work):
    return generate_tinyface(work / "tinyface", seed=0, num_subjects=4, probes_per_subject=2, num_distractors=4)


@pytest.fixture(scope="module")
def ijbs(work):
    return generate_ijbs(work / "ijbs", seed=0, num_subjects=4)


def flip_fused(model, rgb_images, use_flip=True):
    """``pre_norm_vector_add`` written out: f = normalize(e1 n1 + e2 n2), norm = |e1 n1 + e2 n2|."""
    x = torch.from_numpy(published_input(np.stack(rgb_images))).float()
    with torch.no_grad():
        e1, n1 = model(x)
        if not use_flip:
            return e1.numpy(), n1.numpy()
        e2, n2 = model(torch.flip(x, dims=[3]))
    v = e1 * n1 + e2 * n2
    norm = v.norm(dim=1, keepdim=True)
    return (v / norm).numpy(), norm.numpy()


def one_hot(indices, dim):
    feats = np.zeros((len(indices), dim), np.float32)
    feats[np.arange(len(indices)), indices] = 1.0
    return feats


def no_model(monkeypatch):
    """Make loading a model fail the test: nothing may be computed before the input checks."""
    def boom(*args, **kwargs):
        raise AssertionError("a model was loaded although the inputs are incomplete")
    monkeypatch.setattr(eval_common, "load_model", boom)


# ------------------------------------------------------------------------------------------------
# IJB-B / IJB-C
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ijbc_run(ijbc, tiny, work):
    out = work / "ijbc_out"
    result = ijb_script.main(["--dataset_name", "IJBC", "--data_root", str(ijbc.root), "--ckpt_path", str(tiny[0]),
                              "--arch", "ir_tiny", *CPU, "--batch_size", "10", "--num_workers", "2",
                              "--save_features", "--output_dir", str(out)])
    return result, out


def test_ijbc_end_to_end_equals_a_plain_reference(ijbc, tiny, ijbc_run):
    result, out = ijbc_run
    for name in ("verification_tar_at_far.csv", "identification.csv", "features.npz"):
        assert (out / name).is_file()
    assert (out / "roc_IJBC.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    paths = ijb_meta_paths(ijbc.root, "IJBC")
    saved = load_features(out / "features.npz", "IJBC")
    assert saved.names == ijbc.image_names and saved.meta["fusion_method"] == "pre_norm_vector_add"

    # features: decode, align with the 5 landmarks, embed image and flip
    images, landmarks, _ = read_landmarks(paths["landmarks"])
    some = [0, 7, len(images) - 1]
    aligned = [align_face(load_image_file(paths["image_dir"] / images[i]), landmarks[i]) for i in some]
    want_f, want_n = flip_fused(tiny[1], aligned)
    np.testing.assert_allclose(saved.features[some], want_f, atol=3e-5)
    np.testing.assert_allclose(saved.norms[some], want_n, rtol=1e-4)

    # scores: features x norms, mean per media, sum over medias, normalise, dot product
    feats = saved.features * saved.norms
    _, templates, medias = read_template_media_list(paths["template_media"])
    template_feat = {}
    for t in np.unique(templates):
        in_t = templates == t
        total = np.sum([feats[in_t & (medias == m)].mean(0) for m in np.unique(medias[in_t])], axis=0)
        template_feat[t] = total / np.linalg.norm(total)
    p1, p2, labels = read_template_pair_list(paths["template_pairs"])
    want_scores = np.array([template_feat[a] @ template_feat[b] for a, b in zip(p1, p2)])
    np.testing.assert_allclose(result["scores"], want_scores, atol=1e-5)
    fpr, tpr, _ = roc_curve(labels, want_scores)
    for far, tar in result["tar_at_far"].items():
        nearest = min(range(len(fpr)), key=lambda i: (abs(fpr[i] - far), -tpr[i]))
        assert tar == pytest.approx(tpr[nearest])

    # 1:N rank-1: the best-scoring gallery template has the probe's subject
    gallery = {}
    for key in ("gallery_1", "gallery_2"):
        t, s = read_1n_csv(paths[key])
        gallery.update(zip(t, s))
    probes = dict(zip(*read_1n_csv(paths["probe"])))
    g_ids = sorted(gallery)
    hits = [gallery[g_ids[int(np.argmax([template_feat[p] @ template_feat[g] for g in g_ids]))]] == s
            for p, s in probes.items()]
    assert result["identification"]["merged"]["rank-1"] == pytest.approx(np.mean(hits))


def test_ijbc_rerun_from_saved_features(ijbc, ijbc_run, tmp_path, capsys):
    result, out = ijbc_run
    again = ijb_script.main(["--data_root", str(ijbc.root), "--features_path", str(out / "features.npz"),
                             "--output_dir", str(tmp_path)])
    printed = capsys.readouterr().out
    assert "TAR (%) at FAR" in printed and "G1+G2 merged (published)" in printed and "summary" in printed
    assert again["tar_at_far"] == result["tar_at_far"]
    assert again["identification"] == result["identification"]
    assert (tmp_path / "identification.csv").read_text() == (out / "identification.csv").read_text()


def _oracle_ijb(root, dataset, names, subjects, path, shift=0):
    ids = {s: i for i, s in enumerate(sorted(set(subjects)))}
    rng = np.random.default_rng(0)
    feats = one_hot([(ids[s] + shift) % len(ids) for s in subjects], 16)
    feature_set = FeatureSet(feats, rng.uniform(5, 30, size=(len(names), 1)).astype(np.float32), names,
                             {"kind": dataset, "model": "oracle", "fusion_method": "pre_norm_vector_add"})
    return save_features(path, feature_set)


def test_ijbc_known_answers_with_hand_made_features(ijbc, tmp_path):
    perfect = _oracle_ijb(ijbc.root, "IJBC", ijbc.image_names, ijbc.image_subjects, tmp_path / "perfect.npz")
    result = ijb_script.main(["--data_root", str(ijbc.root), "--features_path", str(perfect),
                              "--output_dir", str(tmp_path / "a")])
    assert all(tar == 1.0 for tar in result["tar_at_far"].values())
    for row in ("G1", "G2", "mean"):
        assert result["identification"][row]["rank-1"] == 1.0
        assert result["identification"][row]["TPIR@FPIR=0.01"] == 1.0
    assert result["identification"]["merged"]["rank-1"] == 1.0

    # only the probe templates' features point at the next subject: no probe finds its subject
    subjects = np.array(ijbc.image_subjects)
    _, templates, _ = read_template_media_list(ijb_meta_paths(ijbc.root, "IJBC")["template_media"])
    probe_templates = [t for t, _ in ijbc.details["probe_templates"]]
    shifted = np.where(np.isin(templates, probe_templates), subjects + 7, subjects)   # subject ids step by 7
    shifted[shifted == subjects.max() + 7] = subjects.min()
    wrong = _oracle_ijb(ijbc.root, "IJBC", ijbc.image_names, list(shifted), tmp_path / "wrong.npz")
    result = ijb_script.main(["--data_root", str(ijbc.root), "--features_path", str(wrong),
                              "--output_dir", str(tmp_path / "b")])
    assert result["identification"]["merged"]["rank-1"] == 0.0
    assert result["tar_at_far"][1e-6] == 0.0


def test_ijbb_layout(tmp_path):
    data = generate_ijb(tmp_path / "data", "IJBB", seed=1, num_subjects=2, gallery_images=1, frames_per_video=1)
    path = _oracle_ijb(data.root, "IJBB", data.image_names, data.image_subjects, tmp_path / "f.npz")
    result = ijb_script.main(["--dataset_name", "ijbb", "--data_root", str(data.root), "--features_path",
                              str(path), "--output_dir", str(tmp_path / "out")])
    assert set(result["identification"]) == {"S1", "S2", "mean", "merged"}
    assert (tmp_path / "out" / "roc_IJBB.png").is_file()


def test_ijbc_missing_images_one_error_before_any_feature(ijbc, tiny, tmp_path, monkeypatch):
    shutil.copytree(ijbc.root / "IJBC", tmp_path / "IJBC")
    for name in ("2.jpg", "5.jpg", "9.jpg"):
        (tmp_path / "IJBC" / "loose_crop" / name).unlink()
    no_model(monkeypatch)
    with pytest.raises(MissingFilesError) as info:
        ijb_script.main(["--data_root", str(tmp_path), "--ckpt_path", str(tiny[0]), *CPU,
                         "--output_dir", str(tmp_path / "out")])
    assert str(info.value) == (f"3 of {len(ijbc.image_names)} IJBC images missing under "
                               f"{tmp_path / 'IJBC' / 'loose_crop'}: 2.jpg, 5.jpg, 9.jpg")
    assert not (tmp_path / "out" / "features.npz").exists()

    for name in ("ijbc_template_pair_label.txt", "ijbc_1N_probe_mixed.csv"):
        (tmp_path / "IJBC" / "meta" / name).unlink()
    with pytest.raises(FileNotFoundError, match="(?s)ijbc_1N_probe_mixed.csv.*ijbc_template_pair_label.txt"):
        ijb_script.main(["--data_root", str(tmp_path), "--ckpt_path", str(tiny[0]), *CPU])


def test_ijbc_errors_reported_in_one_line(ijbc, ijbc_run, tmp_path, capsys):
    status = ijb_script.run_cli(ijb_script.main, ["--data_root", str(ijbc.root), "--model_name", "ir_101_webface12m",
                                                  "--pretrained_dir", str(tmp_path), *CPU])
    assert status == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and str(tmp_path / "adaface_ir101_webface12m.ckpt") in err
    # features of other images
    saved = load_features(ijbc_run[1] / "features.npz")
    partial = FeatureSet(saved.features[:-2], saved.norms[:-2], saved.names[:-2], saved.meta)
    path = save_features(tmp_path / "partial.npz", partial)
    with pytest.raises(EvalInputError, match=f"2 of the {len(saved.names)} images .* no saved feature"):
        ijb_script.main(["--data_root", str(ijbc.root), "--features_path", str(path),
                         "--output_dir", str(tmp_path / "o")])


# ------------------------------------------------------------------------------------------------
# TinyFace
# ------------------------------------------------------------------------------------------------
def _tinyface_reference(aligned_dir, feat_of, ranks=(1, 5, 20)):
    """Plain loops: each probe's gallery sorted by score, the position of its first match."""
    def label(p):
        return int(p.name.split("_")[0])
    probes = sorted((aligned_dir / "Probe").iterdir())
    gallery = sorted((aligned_dir / "Gallery_Match").iterdir())
    distractors = sorted((aligned_dir / "Gallery_Distractor").iterdir())
    g_feats = np.stack([feat_of[f"{p.parent.name}/{p.name}"] for p in gallery + distractors])
    g_labels = [label(p) for p in gallery] + [-100] * len(distractors)
    positions = []
    for probe in probes:
        order = np.argsort(-(g_feats @ feat_of[f"Probe/{probe.name}"]), kind="stable")
        positions.append(next(i for i, g in enumerate(order) if g_labels[g] == label(probe)))
    return {f"rank-{k}": float(np.mean(np.array(positions) < k)) for k in ranks}


def test_tinyface_end_to_end_equals_a_plain_reference(tinyface, tiny, tmp_path):
    out = tmp_path / "out"
    result = tinyface_script.main(["--data_root", str(tinyface.root), "--ckpt_path", str(tiny[0]), *CPU,
                                   "--num_workers", "0", "--batch_size", "8", "--save_features",
                                   "--output_dir", str(out)])        # architecture read from the checkpoint
    aligned_dir = tinyface.root / TINYFACE_ALIGNED_DIR
    saved = load_features(out / "features.npz", "TinyFace")
    assert sorted(saved.names) == sorted(tinyface.image_names)
    some = [0, len(saved.names) - 1]
    want_f, _ = flip_fused(tiny[1], [load_image_file(aligned_dir / saved.names[i]) for i in some])
    np.testing.assert_allclose(saved.features[some], want_f, atol=3e-5)
    want = _tinyface_reference(aligned_dir, dict(zip(saved.names, saved.features)))
    assert result["results"] == pytest.approx(want)
    csv_values = np.loadtxt(out / "result.csv", delimiter=",", skiprows=1)
    np.testing.assert_allclose(csv_values, [[1, 100 * want["rank-1"]], [5, 100 * want["rank-5"]],
                                            [20, 100 * want["rank-20"]]], rtol=1e-6)


def test_tinyface_known_answers_and_labels_from_file_names(tinyface, tmp_path):
    names = tinyface.image_names
    subjects = tinyface.image_subjects
    # identities 1..4 -> axes 0..3; distractors -> their own axes 8..
    axes = [s - 1 if s > 0 else 8 + i for i, s in enumerate(subjects)]
    perfect = save_features(tmp_path / "p.npz", FeatureSet(one_hot(axes, 32), np.ones((len(names), 1), np.float32),
                                                           names, {"kind": "TinyFace", "model": "oracle"}))
    result = tinyface_script.main(["--data_root", str(tinyface.root), "--features_path", str(perfect),
                                   "--output_dir", str(tmp_path / "a")])
    assert result["results"] == {"rank-1": 1.0, "rank-5": 1.0, "rank-20": 1.0}
    # gallery matches pointing at the next identity: rank-1 fails for everybody, rank-20 covers the gallery
    moved = [(a + 1) % 4 if n.startswith("Gallery_Match") else a for a, n in zip(axes, names)]
    wrong = save_features(tmp_path / "w.npz", FeatureSet(one_hot(moved, 32), np.ones((len(names), 1), np.float32),
                                                         names, {"kind": "TinyFace", "model": "oracle"}))
    result = tinyface_script.main(["--data_root", str(tinyface.root), "--features_path", str(wrong),
                                   "--output_dir", str(tmp_path / "b")])
    assert result["results"]["rank-1"] == 0.0 and result["results"]["rank-20"] == 1.0


def test_tinyface_missing_aligned_copies_and_no_release_listing(tinyface, tiny, tmp_path, monkeypatch, caplog):
    shutil.copytree(tinyface.root, tmp_path / "root")
    aligned = tmp_path / "root" / TINYFACE_ALIGNED_DIR
    (aligned / "Probe" / "2_1.jpg").unlink()
    (aligned / "Gallery_Distractor" / "9001_1.jpg").unlink()
    no_model(monkeypatch)
    with pytest.raises(MissingFilesError) as info:
        tinyface_script.main(["--data_root", str(tmp_path / "root"), "--ckpt_path", str(tiny[0]), *CPU])
    assert str(info.value).startswith(f"2 of {len(tinyface.image_names)} TinyFace images have no aligned copy")
    assert "Probe/2_1.jpg, Gallery_Distractor/9001_1.jpg" in str(info.value)

    # without the release's Testing_Set the aligned folder is the protocol (with a warning)
    shutil.rmtree(tmp_path / "root" / "tinyface")
    path = save_features(tmp_path / "f.npz", FeatureSet(
        one_hot([max(s - 1, 0) for s in tinyface.image_subjects], 8),
        np.ones((len(tinyface.image_names), 1), np.float32), tinyface.image_names, {"kind": "TinyFace"}))
    result = tinyface_script.main(["--data_root", str(tmp_path / "root"), "--features_path", str(path),
                                   "--output_dir", str(tmp_path / "out")])
    assert "cannot be detected" in caplog.text
    assert result["results"]["rank-20"] == 1.0


# ------------------------------------------------------------------------------------------------
# IJB-S
# ------------------------------------------------------------------------------------------------
def test_ijbs_protocol_templates(ijbs):
    protocol = ijbs_script.read_protocol(ijbs_script.protocol_files(ijbs.root / "protocols"))
    sizes = {name: len(indices) for name, indices in protocol.sets.items()}
    assert sizes == {"video2image_probe": 6, "video2video_probe": 6, "surveillance_g1": 2, "surveillance_g2": 2,
                     "single_g1": 2, "single_g2": 2, "booking_g1": 2, "booking_g2": 2}
    assert len(protocol.templates) == 10 + 4 + 4            # (subject, video) pairs, single images, bookings
    names = ijbs_script.attach_images(protocol, ijbs_script.list_aligned_images(ijbs.root / "aligned", None))
    assert sorted(names) == sorted(ijbs.image_names)
    booking = protocol.templates[protocol.sets["booking_g1"][0]]
    assert booking.subject == 1 and len(booking.rows) == 2
    assert all(names[r].startswith("1/img_") for r in booking.rows)
    (subject, video), = ijbs.details["dropped"]
    empty = [t for t in protocol.templates if len(t.rows) == 0]
    assert [(t.subject, t.keys) for t in empty] == [(subject, [f"{subject}_videos_{Path(video).stem}"])]
    # template features: mean of the image features, normalised; zeros without images
    feats = np.random.default_rng(0).normal(size=(len(names), 8)).astype(np.float32)
    got = ijbs_script.template_features(protocol, feats)
    for t, template in enumerate(protocol.templates):
        if len(template.rows):
            mean = feats[template.rows].mean(0)
            np.testing.assert_allclose(got[t], mean / np.linalg.norm(mean), atol=1e-6)
        else:
            assert not got[t].any()


def test_ijbs_end_to_end_and_rerun(ijbs, tiny, tmp_path, caplog):
    out = tmp_path / "out"
    result = ijbs_script.main(["--data_root", str(ijbs.root), "--ckpt_path", str(tiny[0]), "--arch", "ir_tiny",
                               *CPU, "--num_workers", "0", "--batch_size", "16", "--save_features",
                               "--output_dir", str(out)])
    assert "1 templates of the protocol have no aligned image" in caplog.text
    assert set(result["results"]) == {"Surveillance-to-Single", "Surveillance-to-Booking",
                                      "Surveillance-to-Surveillance"}
    assert all(row["probes"] == 6 and row["probes_without_images"] == 1 for row in result["results"].values())
    saved = load_features(out / "features.npz", "IJBS")
    assert saved.meta["use_flip_test"] is False                 # as published: no flip test on IJB-S
    some = [0, 5]
    want_f, want_n = flip_fused(tiny[1], [load_image_file(ijbs.root / "aligned" / saved.names[i]) for i in some],
                                use_flip=False)
    np.testing.assert_allclose(saved.features[some], want_f, atol=3e-5)
    np.testing.assert_allclose(saved.norms[some], want_n, rtol=1e-4)
    # the saved features carry the image names: no image folder needed to re-run
    again = ijbs_script.main(["--data_root", str(tmp_path / "nowhere"), "--protocol_dir", str(ijbs.root / "protocols"),
                              "--features_path", str(out / "features.npz"), "--output_dir", str(tmp_path / "again")])
    assert again["results"] == result["results"]


def test_ijbs_known_answers(ijbs, tmp_path):
    # one-hot subject features; the probe template without frames scores 0 against everything.
    # Per gallery 3 mated and 3 non-mated probes; FPIR 1% and 10% of 3 round to 0 false alarms, so
    # the threshold is just above the non-mated top score 0: G1 finds 3/3, G2 2/3 (the empty one).
    names, subjects = ijbs.image_names, ijbs.image_subjects
    path = save_features(tmp_path / "f.npz", FeatureSet(
        one_hot([s - 1 for s in subjects], 8), np.random.default_rng(0).uniform(5, 20, (len(names), 1)),
        names, {"kind": "IJBS", "model": "oracle", "fusion_method": "pre_norm_vector_add"}))
    result = ijbs_script.main(["--data_root", str(ijbs.root), "--features_path", str(path),
                               "--output_dir", str(tmp_path / "out")])
    for row in result["results"].values():
        assert row["TPIR@FPIR=0.01"] == pytest.approx(5 / 6) and row["TPIR@FPIR=0.1"] == pytest.approx(5 / 6)
        assert row["rank-1"] >= 5 / 6 and row["rank-10"] == 1.0


def test_ijbs_missing_protocol_files(ijbs, tiny, tmp_path, monkeypatch):
    shutil.copytree(ijbs.root / "protocols", tmp_path / "protocols")
    (tmp_path / "protocols" / "cs6_metadata.csv").unlink()
    (tmp_path / "protocols" / "galleries" / "cs6_surveillance_to_booking_g2.csv").unlink()
    no_model(monkeypatch)
    with pytest.raises(MissingFilesError, match="(?s)2 IJB-S protocol files missing.*cs6_metadata.csv.*booking_g2"):
        ijbs_script.main(["--data_root", str(tmp_path), "--ckpt_path", str(tiny[0]), *CPU])


# ------------------------------------------------------------------------------------------------
# the five high-quality sets
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pair_sets(work):
    return generate_demo_data(work / "hq", num_train_ids=1, imgs_per_id=1, num_val_ids=8, pairs_per_set=10,
                              make_memfiles=False, make_image_folder=False, show_progress=False)


def test_5valsets_two_checkpoints_from_bin_files(pair_sets, tiny, tmp_path):
    root = tmp_path / "data"
    root.mkdir()
    shutil.copy(pair_sets["bins"]["lfw"], root / "lfw.bin")            # a .bin only: converted to a memfile
    torch.manual_seed(1)
    other = build_model("ir_tiny").eval()
    other_path = save_lightning_style_checkpoint(tmp_path / "other.ckpt", other)
    out = tmp_path / "out"
    result = hq_script.main(["--data_root", str(root), "--val_data_path", ".", "--set_names", "lfw",
                             "--ckpt_path", str(tiny[0]), str(other_path), "--arch", "ir_tiny", *CPU,
                             "--num_workers", "0", "--batch_size", "20", "--save_features", "--output_dir", str(out)])
    assert (root / "lfw" / "memfile" / "mem_file.dat").is_file()
    images, issame = load_pair_bin(root / "lfw.bin")
    rgb = [cv2.cvtColor(cv2.imdecode(np.frombuffer(b, np.uint8), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
           for b in images]
    for label, model in (("tiny", tiny[1]), ("other", other)):
        feats, _ = flip_fused(model, rgb)
        want = evaluate_pair_set(feats, issame)
        assert result["results"][label]["lfw"]["acc"] == pytest.approx(want["acc"])
        assert result["table"][label] == pytest.approx({"LFW": 100 * want["acc"], "AVG": 100 * want["acc"]})
        assert (out / f"{label}_features.npz").is_file()
    lines = (out / "results.csv").read_text().splitlines()
    assert lines[0] == "model,LFW,AVG" and [line.split(",")[0] for line in lines[1:]] == ["tiny", "other"]


def test_5valsets_shell_wrapper_prints_the_paper_table(tmp_path):
    rng = np.random.default_rng(3)
    sets = ["agedb_30", "cfp_fp", "lfw", "cplfw", "calfw"]
    names = [f"{s}/{i}" for s in sets for i in range(20)]
    feats = rng.normal(size=(len(names), 8)).astype(np.float32)
    feats /= np.linalg.norm(feats, axis=1, keepdims=True)
    issame = {f"issame_{s}": rng.random(10) < 0.5 for s in sets}
    path = save_features(tmp_path / "run_features.npz", FeatureSet(feats, np.ones((len(names), 1), np.float32), names,
                                                                   {"kind": "5valsets", "model": "run"}, issame))
    # PYTHON: the interpreter running the suite (a virtual environment's need not be first on PATH)
    done = subprocess.run(["bash", str(REPO / "validation_hq" / "eval_5valsets.sh"), "--features_path", str(path),
                           "--output_dir", str(tmp_path / "out")], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHON": sys.executable})
    assert done.returncode == 0, done.stderr
    header = [line for line in done.stdout.splitlines() if "LFW" in line][0]
    assert [c.strip() for c in header.strip("|").split("|")] == ["model", "LFW", "CFPFP", "CPLFW", "CALFW",
                                                                  "AGEDB", "AVG"]
    want = {s: 100 * evaluate_pair_set(feats[20 * k:20 * k + 20], issame[f"issame_{s}"])["acc"]
            for k, s in enumerate(sets)}
    row = (tmp_path / "out" / "results.csv").read_text().splitlines()[1].split(",")
    got = [float(v) for v in row[1:]]
    expected = [want["lfw"], want["cfp_fp"], want["cplfw"], want["calfw"], want["agedb_30"]]
    np.testing.assert_allclose(got, expected + [np.mean(expected)], atol=1e-4)


def test_5valsets_missing_sets_one_error(tiny, tmp_path, monkeypatch):
    no_model(monkeypatch)
    (tmp_path / "lfw.bin").write_bytes(b"")                # present: not listed
    with pytest.raises(MissingPairSetsError) as info:
        hq_script.main(["--data_root", str(tmp_path), "--val_data_path", ".", "--ckpt_path", str(tiny[0]), *CPU])
    message = str(info.value)
    assert "missing validation pair set(s) cfp_fp, cplfw, calfw, agedb_30:" in message   # not lfw


# ------------------------------------------------------------------------------------------------
# --quality_report (error-versus-reject curves of the feature norm; utils.quality)
# ------------------------------------------------------------------------------------------------
from utils.eval_common import SHARPNESS, VIEW_NORMS  # noqa: E402
from utils.quality import error_versus_reject  # noqa: E402


def _report_files(out, stem="quality"):
    for suffix in ("_pauc.csv", "_evrc.csv"):
        assert (out / f"{stem}{suffix}").is_file()
    assert (out / f"{stem}_evrc.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_5valsets_quality_report_known_answers(tmp_path, capsys):
    """10 lfw pairs, hand-made: genuine pairs 0-4 (0 and 1 fail: orthogonal features), impostors 5-9
    (orthogonal, score 0, so the threshold is 0). Image norms: pair 2 holds the lowest (4), then
    pair 0 (5), pair 1 (6), all others >= 10."""
    issame = np.array([1, 1, 1, 1, 1, 0, 0, 0, 0, 0], bool)
    axes = []
    for i in range(10):
        same = issame[i] and i not in (0, 1)
        axes += [i, i if same else 20 + i]
    norms = 10.0 + np.arange(20)
    norms[[5, 1, 3]] = [4.0, 5.0, 6.0]             # pair 2's first image, pair 0's and pair 1's second
    names = [f"lfw/{i}" for i in range(20)]
    path = save_features(tmp_path / "hand.npz", FeatureSet(
        one_hot(axes, 40), 2 * norms[:, None].astype(np.float32), names,
        {"kind": "5valsets", "model": "hand", "norm_statistics": {"batch_mean": 12.0, "batch_std": 4.0, "h": 1.0}},
        {"issame_lfw": issame, VIEW_NORMS: np.stack([norms, norms], 1).astype(np.float32),
         SHARPNESS: np.ones(20, np.float32)}))
    out = tmp_path / "out"
    result = hq_script.main(["--features_path", str(path), "--set_names", "lfw", "--quality_report",
                             "--output_dir", str(out)])
    report = result["quality"]["hand"]["lfw"]
    fnmr0 = 2 / 5
    # norm: k = 1 rejects pair 2 (a success): 2/4; k = 2 pair 0: 1/3; mean over [0, 0.2] by trapezoids
    norm = report["norm"]["FMR=0.001"]
    np.testing.assert_allclose(norm.error[:4], [fnmr0, 2 / 4, 1 / 3, 0.0])
    assert norm.pauc == pytest.approx(((fnmr0 + 0.5) / 2 * 0.1 + (0.5 + 1 / 3) / 2 * 0.1) / 0.2)
    # indicator (mean 12, std 4, h 1): norms 4, 5, 6 all clip to -1, a tie of pairs 0, 1, 2 (two failures)
    indicator = report["indicator"]["FMR=0.001"]
    np.testing.assert_allclose(indicator.error[:4], [fnmr0, (2 - 2 / 3) / 4, (2 - 4 / 3) / 3, 0.0])
    assert indicator.pauc == pytest.approx(((fnmr0 + 1 / 3) / 2 * 0.1 + (1 / 3 + 2 / 9) / 2 * 0.1) / 0.2)
    # a constant image baseline and random rejection: flat at FNMR(0)
    assert report["laplacian"]["FMR=0.001"].pauc == pytest.approx(fnmr0)
    assert report["random"]["FMR=0.0001"].pauc == pytest.approx(fnmr0)
    _report_files(out, "hand_quality")
    printed = capsys.readouterr().out
    assert "norm pAUC (%)" in printed and "43.33" in printed and "32.22" in printed
    pauc = np.genfromtxt(out / "hand_quality_pauc.csv", delimiter=",", names=True, dtype=None, encoding=None)
    row = next(r for r in pauc if r["measure"] == "norm" and r["operating_point"] == "FMR=0.001")
    assert row["pauc"] == pytest.approx(norm.pauc)


def test_5valsets_quality_report_from_a_model_keeps_view_norms_and_statistics(pair_sets, tiny, tmp_path):
    root = tmp_path / "data"
    root.mkdir()
    shutil.copy(pair_sets["bins"]["lfw"], root / "lfw.bin")
    head = {"kernel": torch.zeros(512, 3), "t": torch.zeros(1), "batch_mean": torch.tensor([300.0]),
            "batch_std": torch.tensor([50.0])}
    ckpt = save_lightning_style_checkpoint(tmp_path / "ada.ckpt", tiny[1], head_state=head,
                                           hyper_parameters={"arch": "ir_tiny", "h": 0.5})
    out = tmp_path / "out"
    result = hq_script.main(["--data_root", str(root), "--val_data_path", ".", "--set_names", "lfw",
                             "--ckpt_path", str(ckpt), *CPU, "--num_workers", "0", "--save_features",
                             "--quality_report", "--output_dir", str(out)])
    saved = load_features(out / "ada_features.npz", "5valsets")
    assert saved.meta["norm_statistics"] == {"batch_mean": 300.0, "batch_std": 50.0, "h": 0.5}
    images, _ = load_pair_bin(root / "lfw.bin")
    rgb = [cv2.cvtColor(cv2.imdecode(np.frombuffer(b, np.uint8), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
           for b in images[:4]]
    _, n1 = flip_fused(tiny[1], rgb, use_flip=False)
    _, n2 = flip_fused(tiny[1], [np.ascontiguousarray(im[:, ::-1]) for im in rgb], use_flip=False)
    np.testing.assert_allclose(saved.arrays[VIEW_NORMS][:4], np.c_[n1, n2], rtol=1e-4)
    assert np.all(saved.arrays[SHARPNESS] > 0)
    assert set(result["quality"]["ada"]["lfw"]) == {"norm", "indicator", "laplacian", "random"}
    _report_files(out, "ada_quality")


def test_ijbc_quality_report_from_saved_features(ijbc, ijbc_run, tmp_path, capsys):
    """Template quality = mean over media of each media's mean image norm; pair quality = min."""
    result, out = ijbc_run
    again = ijb_script.main(["--data_root", str(ijbc.root), "--features_path", str(out / "features.npz"),
                             "--quality_report", "--output_dir", str(tmp_path)])
    saved = load_features(out / "features.npz", "IJBC")
    image_norm = saved.arrays[VIEW_NORMS].astype(np.float64).mean(axis=1)
    paths = ijb_meta_paths(ijbc.root, "IJBC")
    _, templates, medias = read_template_media_list(paths["template_media"])
    t_quality = {}
    for t in np.unique(templates):
        in_t = templates == t
        t_quality[t] = np.mean([image_norm[in_t & (medias == m)].mean() for m in np.unique(medias[in_t])])
    p1, p2, labels = read_template_pair_list(paths["template_pairs"])
    pair_q = np.array([min(t_quality[a], t_quality[b]) for a, b in zip(p1, p2)])
    want = error_versus_reject(again["scores"], labels, pair_q)
    report = again["quality"]["IJBC 1:1"]
    for fmr, curve in want.items():
        got = report["norm"][f"FMR={fmr:g}"]
        np.testing.assert_allclose(got.error, curve.error)
        assert got.pauc == pytest.approx(curve.pauc)
    # the random checkpoint has no AdaFace head: no indicator, the image baseline is there
    assert set(report) == {"norm", "laplacian", "random"}
    assert {"IJBC 1:N G1", "IJBC 1:N G2"} <= set(again["quality"])
    _report_files(tmp_path)
    assert "template quality = mean over media" in capsys.readouterr().out


def test_tinyface_quality_report_rejects_the_probes_of_lowest_quality(tinyface, tmp_path):
    names, subjects = tinyface.image_names, tinyface.image_subjects
    axes = [s - 1 if s > 0 else 8 + i for i, s in enumerate(subjects)]
    probes = [i for i, n in enumerate(names) if n.startswith("Probe")]
    wrong = probes[:2]                                   # two probes point at nobody: rank-1 misses
    for i in wrong:
        axes[i] = 30
    norms = np.full(len(names), 20.0)
    norms[wrong] = [3.0, 2.0]                            # ... and have the lowest norms
    path = save_features(tmp_path / "f.npz", FeatureSet(
        one_hot(axes, 32), norms[:, None].astype(np.float32), names, {"kind": "TinyFace", "model": "hand"},
        {VIEW_NORMS: norms[:, None].astype(np.float32)}))
    result = tinyface_script.main(["--data_root", str(tinyface.root), "--features_path", str(path),
                                   "--quality_report", "--output_dir", str(tmp_path / "out")])
    curve = result["quality"]["TinyFace"]["norm"]["rank-1"]
    n = len(probes)                                      # 8 probes, all mated
    assert curve.items == curve.counted == n
    assert result["results"]["rank-1"] == pytest.approx(1 - 2 / n)
    np.testing.assert_allclose(curve.error[:3], [2 / n, 1 / (n - 1), 0.0])
    assert result["quality"]["TinyFace"]["random"]["rank-1"].pauc == pytest.approx(2 / n)
    _report_files(tmp_path / "out")
