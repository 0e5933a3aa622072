"""convert.py end to end on a small generated pack and pair sets."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import convert
from tests.reference_image import published_input
from utils.image import decode_image_bytes, encode_jpeg, encode_png, load_image_file
from utils.pairsets import open_memfile, write_pair_bin
from utils.recordio import RecordReader, load_face_pack_index, read_face_record, write_face_pack

LABELS = [0, 0, 0, 1, 1, 2, 3, 3, 3, 3, 3, 3]  # 12 images, 4 identities (3 has keys 7..12)
REPO = Path(__file__).resolve().parent.parent


def smooth_face(rng: np.random.Generator) -> np.ndarray:
    """A 112x112 image with distinct colour channels that survives JPEG well."""
    y, x = np.mgrid[0:112, 0:112] / 111.0
    a, b, c = rng.uniform(0.2, 0.8, size=3)
    rgb = np.stack([200 * x * a + 30, 180 * y * b + 40, 120 * (1 - x) * c + 60], axis=-1)
    return rgb.astype(np.uint8)


def make_face_pack(root, rng):
    """A 12-image face pack (4 identities) and two small pair sets in ``root``: (root, the pack's
    JPEG bytes, the pair sets' PNG bytes)."""
    images = [encode_jpeg(smooth_face(rng)) for _ in LABELS]
    write_face_pack(root / "train.rec", zip(LABELS, images))
    pair_images = [encode_png(smooth_face(rng)) for _ in range(8)]
    write_pair_bin(root / "lfw.bin", pair_images[:4], [True, False])
    write_pair_bin(root / "agedb_30.bin", pair_images[4:], [False, True])
    return root, images, pair_images


@pytest.fixture
def dataset(tmp_path, rng):
    return make_face_pack(tmp_path / "faces_emore", rng)


def run(*argv: str) -> convert.Summary:
    args = convert.build_parser().parse_args(list(argv) + ["--no_progress"])
    return convert.run(args)


def counts(summary: convert.Summary) -> list[tuple[int, int]]:
    return [(row[1], row[2]) for row in summary.rows]


def test_default_converts_images_and_memfiles(dataset):
    root, images, pair_images = dataset
    summary = run("--rec_path", str(root), "--num_workers", "1")
    assert counts(summary) == [(12, 0), (2, 0)]
    for key, (label, image) in enumerate(zip(LABELS, images), start=1):
        path = root / "imgs" / str(label) / f"{key}.jpg"
        assert path.read_bytes() == image  # the pack's JPEG bytes, unchanged (true colours)
    assert sorted(p.name for p in (root / "imgs").iterdir() if p.is_dir()) == ["0", "1", "2", "3"]
    for name, first in (("lfw", 0), ("agedb_30", 4)):
        data, issame = open_memfile(root, name)
        assert data.shape == (4, 3, 112, 112)
        for i in range(4):
            rgb = decode_image_bytes(pair_images[first + i])
            np.testing.assert_allclose(data[i], published_input(rgb), atol=1e-6)
    assert open_memfile(root, "lfw")[1].tolist() == [True, False]


def test_folder_labels_agree_with_pack_labels(dataset):
    root, _, _ = dataset
    run("--rec_path", str(root), "--make_image_files", "--num_workers", "1")
    index = load_face_pack_index(root / "train.rec", show_progress=False)
    for key, label in zip(index.keys, index.labels):
        assert (root / "imgs" / str(label) / f"{key}.jpg").is_file()


def test_resume_skips_finished_work(dataset):
    root, images, _ = dataset
    run("--rec_path", str(root), "--num_workers", "1")
    untouched = root / "imgs" / "0" / "1.jpg"
    before = untouched.stat().st_mtime_ns
    (root / "imgs" / "3" / "9.jpg").unlink()
    (root / "imgs" / "1" / "4.jpg").write_bytes(images[3][:100])  # an interrupted write
    summary = run("--rec_path", str(root), "--num_workers", "1")
    assert counts(summary) == [(2, 10), (0, 2)]
    assert untouched.stat().st_mtime_ns == before
    assert (root / "imgs" / "1" / "4.jpg").read_bytes() == images[3]
    assert (root / "imgs" / "3" / "9.jpg").read_bytes() == images[8]
    # an interrupted memfile (conf written last) is redone
    (root / "lfw" / "memfile" / "mem_file.dat.conf").unlink()
    summary = run("--rec_path", str(root), "--make_validation_memfiles", "--num_workers", "1")
    assert counts(summary) == [(1, 1)]
    assert open_memfile(root, "lfw")[0].shape == (4, 3, 112, 112)


def test_worker_pool_gives_the_same_files(dataset, monkeypatch):
    root, images, _ = dataset
    monkeypatch.setattr(convert, "CHUNK", 5)  # several chunks over 2 processes
    summary = run("--rec_path", str(root), "--make_image_files", "--num_workers", "2")
    assert counts(summary) == [(12, 0)]
    for key, (label, image) in enumerate(zip(LABELS, images), start=1):
        assert (root / "imgs" / str(label) / f"{key}.jpg").read_bytes() == image


def test_make_record_round_trip_is_byte_identical(dataset, tmp_path):
    root, _, _ = dataset
    run("--rec_path", str(root), "--make_image_files", "--num_workers", "1")
    out = tmp_path / "repacked"
    summary = run("--make_record", "--image_folder", str(root / "imgs"), "--rec_path", str(out),
                  "--num_workers", "2")
    assert counts(summary) == [(12, 0)]
    assert (out / "train.rec").read_bytes() == (root / "train.rec").read_bytes()
    assert (out / "train.idx").read_bytes() == (root / "train.idx").read_bytes()
    assert (out / "train.labels.npz").is_file()
    assert counts(run("--make_record", "--image_folder", str(root / "imgs"),
                      "--rec_path", str(out))) == [(0, 12)]


def test_make_record_named_identities(tmp_path, rng):
    folder = tmp_path / "people"
    files = {}
    for name, count in (("bob", 2), ("alice", 1), ("carol", 3)):
        (folder / name).mkdir(parents=True)
        for i in range(count):
            data = encode_jpeg(smooth_face(rng))
            (folder / name / f"img_{i}.jpg").write_bytes(data)
            files[(name, i)] = data
    (folder / "empty").mkdir()
    (folder / "notes.txt").write_text("not an identity")
    run("--make_record", "--image_folder", str(folder), "--rec_path", str(tmp_path / "out"),
        "--num_workers", "1")
    assert (tmp_path / "out" / "identities.tsv").read_text() == "0\talice\n1\tbob\n2\tcarol\n"
    index = load_face_pack_index(tmp_path / "out" / "train.rec", show_progress=False)
    assert index.labels.tolist() == [0, 1, 1, 2, 2, 2] and index.num_classes == 3
    reader = RecordReader(tmp_path / "out" / "train.rec")
    expected = [files[("alice", 0)], files[("bob", 0)], files[("bob", 1)]] + \
               [files[("carol", i)] for i in range(3)]
    assert [read_face_record(reader, int(k))[1] for k in index.keys] == expected


def test_swap_color_channel(dataset, tmp_path):
    root, images, _ = dataset
    run("--rec_path", str(root), "--num_workers", "1")
    swapped_root = tmp_path / "swapped"
    swapped_root.mkdir()
    for name in ("train.rec", "train.idx", "lfw.bin", "agedb_30.bin"):
        (swapped_root / name).write_bytes((root / name).read_bytes())
    summary = run("--rec_path", str(swapped_root), "--swap_color_channel", "--num_workers", "1")
    assert counts(summary) == [(12, 0), (2, 0)]
    for key, (label, image) in enumerate(zip(LABELS, images), start=1):
        got = load_image_file(swapped_root / "imgs" / str(label) / f"{key}.jpg").astype(int)
        want = decode_image_bytes(image)[:, :, ::-1].astype(int)
        assert np.abs(got - want).mean() < 1.5  # re-encoded at quality 100
        assert np.abs(got - want[:, :, ::-1]).mean() > 10  # and really swapped
    for name in ("lfw", "agedb_30"):
        np.testing.assert_array_equal(open_memfile(swapped_root, name)[0],
                                      open_memfile(root, name)[0][:, ::-1])
    # mixing settings in one output folder is refused
    with pytest.raises(convert.ConvertError, match="swap_color_channel=True"):
        run("--rec_path", str(swapped_root), "--make_image_files", "--num_workers", "1")
    summary = run("--rec_path", str(swapped_root), "--make_image_files", "--overwrite",
                  "--num_workers", "1")
    assert counts(summary) == [(12, 0)]
    assert (swapped_root / "imgs" / "0" / "1.jpg").read_bytes() == images[0]


def test_swap_color_channel_make_record(tmp_path, rng):
    folder = tmp_path / "swapped_folder"
    (folder / "0").mkdir(parents=True)
    face = smooth_face(rng)
    (folder / "0" / "0.png").write_bytes(encode_png(face[:, :, ::-1]))  # stored swapped
    run("--make_record", "--image_folder", str(folder), "--rec_path", str(tmp_path / "o"),
        "--swap_color_channel", "--num_workers", "1")
    _, image = read_face_record(RecordReader(tmp_path / "o" / "train.rec"), 1)
    assert image[:2] == b"\xff\xd8"  # re-encoded as JPEG
    assert np.abs(decode_image_bytes(image).astype(int) - face.astype(int)).mean() < 1.5


def test_rebuild_index(dataset):
    root, _, _ = dataset
    original = (root / "train.idx").read_bytes()
    (root / "train.idx").unlink()
    summary = run("--rebuild_index", "--rec_path", str(root / "train.rec"))
    assert counts(summary) == [(17, 0)]
    assert (root / "train.idx").read_bytes() == original
    assert counts(run("--rebuild_index", "--rec_path", str(root))) == [(0, 17)]


def test_errors_are_reported_cleanly(tmp_path, rng, capsys):
    assert convert.main(["--rec_path", str(tmp_path / "missing"), "--no_progress"]) == 2
    assert "missing: folder not found" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert convert.main(["--rec_path", str(tmp_path / "empty"), "--make_validation_memfiles",
                         "--no_progress"]) == 2
    assert "no *.bin pair sets found" in capsys.readouterr().err
    folder = tmp_path / "faces" / "0"
    folder.mkdir(parents=True)
    (folder / "small.jpg").write_bytes(encode_jpeg(smooth_face(rng)[:90, :90]))
    assert convert.main(["--make_record", "--image_folder", str(tmp_path / "faces"),
                         "--rec_path", str(tmp_path / "o"), "--num_workers", "1",
                         "--no_progress"]) == 2
    err = capsys.readouterr().err
    assert "small.jpg: expected an aligned 112x112" in err
    assert not (tmp_path / "o" / "train.rec").exists()
    assert not any((tmp_path / "o").glob(".train*"))


def test_help_documents_colour_handling():
    out = subprocess.run([sys.executable, "convert.py", "--help"], cwd=REPO, capture_output=True,
                         text=True, check=True, env={**os.environ, "COLUMNS": "100"}).stdout
    out = " ".join(out.split())
    assert "--swap_color_channel" in out
    assert "red and blue swapped" in out and "quality 100" in out
    assert "JPEG bytes, unchanged" in out
