"""utils.demo_eval_data: IJB-B/C, TinyFace and IJB-S demo sets in the real layouts."""
import csv

import numpy as np
import pytest

from face_alignment.similarity import align_face
from utils.demo_data import IdentityBank, render_identity_image
from utils.demo_eval_data import (TINYFACE_ALIGNED_DIR, TINYFACE_SUBSETS, generate_ijb, generate_ijbs,
                                  generate_tinyface, main, render_loose_crop)
from utils.ijb import (ijb_meta_paths, read_1n_csv, read_landmarks, read_template_media_list,
                       read_template_pair_list, unique_template_subjects)
from utils.image import load_image_file


@pytest.fixture(scope="module")
def ijbc(tmp_path_factory):
    return generate_ijb(tmp_path_factory.mktemp("ijbc"), "IJBC", seed=3, num_subjects=4)


def test_loose_crop_aligns_back_to_the_face():
    rng = np.random.default_rng(0)
    face = render_identity_image(IdentityBank(0).get("t", 0), rng)
    for trial in range(3):
        photo, landmarks = render_loose_crop(face, np.random.default_rng(trial))
        assert photo.shape[0] > 112 and photo.shape[1] > 112 and landmarks.shape == (5, 2)
        aligned = align_face(photo, landmarks)
        err = np.abs(aligned.astype(float) - face.astype(float)).mean()
        # landmarks 6 px off give a visibly worse crop: the landmarks are the true ones
        off = np.abs(align_face(photo, landmarks + [6.0, 0.0]).astype(float) - face.astype(float)).mean()
        assert err < 4.0, err          # two bilinear resamplings
        assert off > 3 * err


def test_ijb_layout_reads_with_the_release_readers(ijbc):
    paths = ijb_meta_paths(ijbc.root, "IJBC")
    images, landmarks, faceness = read_landmarks(paths["landmarks"])
    tm_images, templates, medias = read_template_media_list(paths["template_media"])
    np.testing.assert_array_equal(images, tm_images)
    assert list(images) == ijbc.image_names == [f"{i + 1}.jpg" for i in range(len(images))]
    assert landmarks.shape == (len(images), 5, 2) and np.all((faceness > 0) & (faceness <= 1))
    for name, points in zip(images[:4], landmarks[:4]):
        rgb = load_image_file(paths["image_dir"] / name)
        assert np.all(points >= 0) and np.all(points[:, 0] < rgb.shape[1]) and np.all(points[:, 1] < rgb.shape[0])

    # 1:1 pairs: every enrolment template against every probe template, label = same subject
    p1, p2, label = read_template_pair_list(paths["template_pairs"])
    g1, g1_s = unique_template_subjects(*read_1n_csv(paths["gallery_1"]))
    g2, g2_s = unique_template_subjects(*read_1n_csv(paths["gallery_2"]))
    probes, probe_s = unique_template_subjects(*read_1n_csv(paths["probe"]))
    assert set(g1_s).isdisjoint(g2_s) and set(probe_s) == set(g1_s) | set(g2_s)
    subject_of = dict(zip(np.concatenate([g1, g2, probes]), np.concatenate([g1_s, g2_s, probe_s])))
    assert len(p1) == (len(g1) + len(g2)) * len(probes) == ijbc.counts["pairs"]
    np.testing.assert_array_equal(label, [int(subject_of[a] == subject_of[b]) for a, b in zip(p1, p2)])
    assert label.sum() == ijbc.counts["genuine_pairs"] == 2 * 4
    # a video: several images of one probe template share a media id
    probe_medias = medias[np.isin(templates, probes)]
    assert np.unique(probe_medias).size < probe_medias.size


def test_ijbb_uses_its_prefix_and_galleries(tmp_path):
    result = generate_ijb(tmp_path, "IJBB", num_subjects=2, gallery_images=1, frames_per_video=1)
    paths = ijb_meta_paths(tmp_path, "IJBB")
    assert paths["gallery_1"].name == "ijbb_1N_gallery_S1.csv" and paths["gallery_1"].is_file()
    assert len(read_template_media_list(paths["template_media"])[0]) == result.counts["images"] == 2 * 4


def test_tinyface_layout(tmp_path):
    result = generate_tinyface(tmp_path, seed=1, num_subjects=3, probes_per_subject=2, num_distractors=4)
    for subset in TINYFACE_SUBSETS:
        originals = sorted(p.name for p in (tmp_path / "tinyface" / "Testing_Set" / subset).iterdir())
        aligned = sorted(p.name for p in (tmp_path / TINYFACE_ALIGNED_DIR / subset).iterdir())
        assert originals == aligned and originals
    probe_names = sorted(p.name for p in (tmp_path / TINYFACE_ALIGNED_DIR / "Probe").iterdir())
    assert probe_names == ["1_1.jpg", "1_2.jpg", "2_1.jpg", "2_2.jpg", "3_1.jpg", "3_2.jpg"]
    stems = [n.rsplit("/", 1)[1].split(".")[0] for n in result.image_names]
    assert len(set(stems)) == len(stems) == 6 + 3 + 4            # names are unique keys
    small = load_image_file(tmp_path / "tinyface" / "Testing_Set" / "Probe" / "1_1.jpg")
    big = load_image_file(tmp_path / TINYFACE_ALIGNED_DIR / "Probe" / "1_1.jpg")
    assert big.shape == (112, 112, 3) and 16 <= small.shape[0] <= 32


def test_generation_is_deterministic_and_refuses_to_overwrite(tmp_path):
    generate_tinyface(tmp_path / "a", seed=5, num_subjects=2, num_distractors=1)
    generate_tinyface(tmp_path / "b", seed=5, num_subjects=2, num_distractors=1)
    generate_tinyface(tmp_path / "c", seed=6, num_subjects=2, num_distractors=1)
    rel = f"{TINYFACE_ALIGNED_DIR}/Probe/1_1.jpg"
    assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes()
    assert (tmp_path / "a" / rel).read_bytes() != (tmp_path / "c" / rel).read_bytes()
    with pytest.raises(FileExistsError, match="tinyface"):
        generate_tinyface(tmp_path / "a", seed=5, num_subjects=2, num_distractors=1)
    generate_tinyface(tmp_path / "a", seed=6, num_subjects=2, num_distractors=1, overwrite=True)
    assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "c" / rel).read_bytes()


def _csv(path):
    with open(path, newline="") as f:
        return list(csv.reader(f))


def test_ijbs_layout(tmp_path):
    result = generate_ijbs(tmp_path, seed=2, num_subjects=4, frames_per_video=2, booking_images=2)
    proto = tmp_path / "protocols"
    meta = _csv(proto / "cs6_metadata.csv")[1:]
    probes = [r[0] for r in _csv(proto / "cs6_surveillance_to_single-booking_probe.csv")[1:]]
    assert probes == [r[0] for r in _csv(proto / "cs6_surveillance_to_surveillance_probe.csv")[1:]]
    assert len(probes) == 4 + 1
    # the shared probe video shows two subjects
    shared = probes[-1]
    assert sorted(int(r[0]) for r in meta if r[1] == shared) == [1, 1, 2, 2]
    # every written frame is listed in the metadata; the frames of one (subject, video) are missing
    (subject, video), = result.details["dropped"]
    listed = {(int(r[0]), f"videos_{r[1].split('/')[1].split('.')[0]}_{r[2]}") for r in meta
              if r[1].startswith("videos")}
    written = {(int(p.parent.name), p.stem) for p in (tmp_path / "aligned").rglob("videos_*.jpg")}
    assert written < listed
    assert {s for s, name in listed - written} == {subject} and len(listed - written) == 2
    assert not list((tmp_path / "aligned" / str(subject)).glob(f"videos_{video.split('/')[1][:-4]}_*"))
    # galleries: G1 and G2 split the subjects; booking lists every still of a subject
    for g, members in ((1, {1, 3}), (2, {2, 4})):
        for kind in ("single", "booking", "surveillance"):
            rows = _csv(proto / "galleries" / f"cs6_surveillance_to_{kind}_g{g}.csv")
            assert rows[0][:3] == ["TEMPLATE_ID", "SUBJECT_ID", "FILENAME"]
            assert {int(r[1]) for r in rows[1:]} == members
            assert len(rows) - 1 == len(members) * (2 if kind == "booking" else 1)
    stills = sorted(p.name for p in (tmp_path / "aligned" / "1").glob("img_*.jpg"))
    assert len(stills) == 2 and load_image_file(tmp_path / "aligned" / "1" / stills[0]).shape == (112, 112, 3)


def test_cli_prints_the_command_to_run(tmp_path, capsys):
    result = main(["--out", str(tmp_path), "--kind", "tinyface", "--num_subjects", "2"])
    out = capsys.readouterr().out
    assert "validation_lq/validate_tinyface.py --data_root" in out and str(tmp_path) in out
    assert result.counts["images"] == 2 * 2 + 2 + 8
