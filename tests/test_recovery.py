"""Interrupted work recovers by itself; derived files are rebuilt when their source changed;
read-only data and unwritable outputs (issue #9).

Writers are killed for real: a subprocess runs with ``ADAFACE_TEST_KILL_AT=<tag>:<n>`` and
SIGKILLs (or SIGTERMs) itself at the n-th item (:func:`utils.files.interruption_point`).
"""
from __future__ import annotations

import json
import logging
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import convert
import data
import utils.files as files
import utils.pairsets as pairsets
from tests.reference_image import published_input
from tests.test_convert import LABELS, make_face_pack, smooth_face
from tests.scripts import load_script
from utils.demo_data import ensure_demo_data, generate_demo_data
from utils.image import decode_image_bytes, encode_jpeg, encode_png
from utils.pairsets import memfile_paths, open_memfile, write_pair_bin
from utils.recordio import RecordReader, load_face_pack_index, read_face_record, write_face_pack

REPO = Path(__file__).resolve().parent.parent
DEMO = dict(num_train_ids=3, imgs_per_id=2, num_val_ids=3, pairs_per_set=2)
# what unfinished work leaves: write_atomically's ``.<name>.<random>.tmp``, other ``*.tmp``, the
# demo generator's in-progress marker
UNFINISHED = re.compile(r"^\..+\.[A-Za-z0-9_]{8}\.tmp$|\.tmp$|^\.demo_data_in_progress$")


def run_killed(argv: list, kill_at: str, sig: int = signal.SIGKILL) -> None:
    """Run ``python argv...`` in the repository until it kills itself at ``kill_at``."""
    spec = kill_at + (":TERM" if sig == signal.SIGTERM else "")
    done = subprocess.run([sys.executable, *argv], cwd=REPO, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "ADAFACE_TEST_KILL_AT": spec})
    assert done.returncode == -sig, done.stderr[-2000:]


def leftovers(root: Path) -> list:
    """Temporary files and markers of unfinished work anywhere under ``root``."""
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if UNFINISHED.search(p.name))


def files_of(root: Path) -> dict:
    """Bytes of every data file (memfile ``.conf`` and label caches record paths and times)."""
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and not p.name.endswith(".conf") and p.suffix != ".npz"}


def run_convert(*argv: str) -> list:
    summary = convert.run(convert.build_parser().parse_args(list(argv) + ["--no_progress"]))
    return [(row[1], row[2]) for row in summary.rows]


def identity(path: Path) -> tuple:
    st = path.stat()
    return st.st_ino, st.st_mtime_ns


@pytest.fixture
def pack(tmp_path, rng):
    """A 12-image face pack (4 identities) and two small pair sets, as in test_convert."""
    return make_face_pack(tmp_path / "faces_emore", rng)


# ------------------------------------------------------------------------------------------------
# killed writers
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_killed_demo_generation_is_redone_by_the_next_run(tmp_path, sig):
    out = tmp_path / "demo"
    argv = ["-m", "utils.demo_data", "--out", str(out)] + [
        a for k, v in DEMO.items() for a in (f"--{k}", str(v))]
    run_killed(argv, "demo_data:4", sig)
    assert (out / "imgs").is_dir() and not (out / "meta.json").exists()   # killed half-way
    result = ensure_demo_data(out, show_progress=False, **DEMO)
    assert result["generated"]
    assert leftovers(out) == []
    assert files_of(out) == files_of(generate_demo_data(tmp_path / "ref", show_progress=False,
                                                        **DEMO)["root"])
    assert not ensure_demo_data(out, show_progress=False, **DEMO)["generated"]


def test_killed_unpack_resumes_and_removes_its_temporary_file(pack):
    root, images, _ = pack
    argv = ["convert.py", "--rec_path", str(root), "--make_image_files", "--num_workers", "1",
            "--no_progress"]
    run_killed(argv, "write_atomically:6")     # the settings file, 4 images, killed in the 5th
    assert len(leftovers(root)) == 1 and len(list((root / "imgs").rglob("*.jpg"))) == 4
    assert run_convert("--rec_path", str(root), "--make_image_files", "--num_workers", "1") \
        == [(8, 4)]
    assert leftovers(root) == []
    for key, (label, image) in enumerate(zip(LABELS, images), start=1):
        assert (root / "imgs" / str(label) / f"{key}.jpg").read_bytes() == image


def test_killed_make_record_is_redone(pack, tmp_path):
    root, _, _ = pack
    run_convert("--rec_path", str(root), "--make_image_files", "--num_workers", "1")
    out = tmp_path / "packed"
    argv = ["convert.py", "--make_record", "--image_folder", str(root / "imgs"), "--rec_path",
            str(out), "--num_workers", "1", "--no_progress"]
    partial = {".train.rec.tmp", ".train.rec.idx"}             # the pack being written
    run_killed(argv, "make_record:7")                           # the first packing, killed
    assert {p.name for p in out.iterdir()} == partial
    assert run_convert(*argv[1:6], "--num_workers", "1") == [(12, 0)]
    assert not partial & {p.name for p in out.iterdir()} and leftovers(out) == []
    assert (out / "train.rec").read_bytes() == (root / "train.rec").read_bytes()
    run_killed(argv + ["--overwrite"], "make_record:7")         # a killed redo of a good pack
    assert partial <= {p.name for p in out.iterdir()}
    assert run_convert(*argv[1:6], "--num_workers", "1") == [(0, 12)]
    assert not partial & {p.name for p in out.iterdir()} and leftovers(out) == []
    assert (out / "train.rec").read_bytes() == (root / "train.rec").read_bytes()


def test_killed_memfile_conversion_is_redone(pack, tmp_path):
    root, _, pairs = pack
    code = (f"from utils.pairsets import bin_to_memfile; "
            f"bin_to_memfile({str(root / 'lfw.bin')!r}, {str(root)!r}, show_progress=False)")
    run_killed(["-c", code], "memfile:3")
    assert leftovers(root) == ["lfw/memfile/mem_file.dat.tmp"]
    assert data.ensure_pair_memfiles(root, ["lfw"], show_progress=False) == ["lfw"]
    assert leftovers(root) == []
    images, issame = open_memfile(root, "lfw")
    want = published_input(np.stack([decode_image_bytes(b) for b in pairs[:4]]))
    np.testing.assert_allclose(images, want, atol=1e-6)
    assert issame.tolist() == [True, False]


def test_killed_label_cache_write_is_cleaned_up(pack):
    root, _, _ = pack
    code = (f"from utils.recordio import load_face_pack_index; "
            f"load_face_pack_index({str(root / 'train.rec')!r}, show_progress=False)")
    run_killed(["-c", code], "write_atomically:1")
    assert len(leftovers(root)) == 1 and not (root / "train.labels.npz").exists()
    index = load_face_pack_index(root / "train.rec", show_progress=False)
    assert index.labels.tolist() == LABELS and (root / "train.labels.npz").is_file()
    assert leftovers(root) == []


# ------------------------------------------------------------------------------------------------
# stale outputs
# ------------------------------------------------------------------------------------------------
def test_memfile_rebuilt_when_its_bin_is_replaced_and_reused_otherwise(pack, rng, caplog):
    root, _, _ = pack
    dat = memfile_paths(root, "lfw")[0]
    assert data.ensure_pair_memfiles(root, ["lfw"], show_progress=False) == ["lfw"]
    before = identity(dat)
    assert data.ensure_pair_memfiles(root, ["lfw"], show_progress=False) == []
    assert convert.make_validation_memfiles(root, False, 1, show_progress=False) \
        == (["agedb_30"], ["lfw"])
    assert identity(dat) == before
    new = [encode_png(smooth_face(rng)) for _ in range(4)]
    write_pair_bin(root / "lfw.bin", new, [False, False])        # replaced: same pair count
    with caplog.at_level(logging.INFO):
        assert data.ensure_pair_memfiles(root, ["lfw"], show_progress=False) == ["lfw"]
    assert "rebuilding the memfile of" in caplog.text
    images, issame = data.ValidationPairDataset(root, ["lfw"]), open_memfile(root, "lfw")[1]
    want = published_input(np.stack([decode_image_bytes(b) for b in new]))
    np.testing.assert_allclose(np.stack([images[i][0].numpy() for i in range(4)]), want,
                               atol=1e-6)
    assert issame.tolist() == [False, False]
    write_pair_bin(root / "lfw.bin", new[::-1], [True, True])    # convert.py sees it too
    assert run_convert("--rec_path", str(root), "--make_validation_memfiles",
                       "--num_workers", "1") == [(1, 1)]
    assert open_memfile(root, "lfw")[1].tolist() == [True, True]


def test_a_record_checked_by_content_settles_to_a_stat_check(pack, monkeypatch):
    root, _, _ = pack
    dat, conf, _ = memfile_paths(root, "lfw")
    assert data.ensure_pair_memfiles(root, ["lfw"], show_progress=False) == ["lfw"]
    assert "content_sha1" in json.loads(conf.read_text())["source_stamp"]   # the .bin was new
    before = identity(dat)
    monkeypatch.setattr(files, "RACY_NS", 0)                 # as if the .bin had settled
    assert data.ensure_pair_memfiles(root, ["lfw"], show_progress=False) == []
    assert "content_sha1" not in json.loads(conf.read_text())["source_stamp"]
    hashed: list = []
    monkeypatch.setattr(files, "_content_sha1", lambda paths: hashed.append(paths) or "")
    assert data.ensure_pair_memfiles(root, ["lfw"], show_progress=False) == []
    assert hashed == [] and identity(dat) == before


def test_make_record_rebuilt_when_an_image_changes_with_the_same_size_and_count(tmp_path, rng,
                                                                               monkeypatch):
    folder = tmp_path / "faces"
    for name in ("a", "b"):
        (folder / name).mkdir(parents=True)
        for k in range(2):
            (folder / name / f"{k}.jpg").write_bytes(encode_jpeg(smooth_face(rng)))
    out = tmp_path / "out"
    argv = ("--make_record", "--image_folder", str(folder), "--rec_path", str(out),
            "--num_workers", "1")
    assert run_convert(*argv) == [(4, 0)]
    before = identity(out / "train.rec")
    assert run_convert(*argv) == [(0, 4)] and identity(out / "train.rec") == before
    # rewrite one image's contents: same size, and even its old modification time back
    target = folder / "b" / "0.jpg"
    old, st = target.read_bytes(), target.stat()
    changed = bytearray(old)
    changed[-20] ^= 0x01                                    # inside the entropy-coded data
    target.write_bytes(bytes(changed))
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))
    decode_image_bytes(bytes(changed))                      # still a valid image
    assert run_convert(*argv) == [(4, 0)]
    reader = RecordReader(out / "train.rec")
    assert read_face_record(reader, 3)[1] == bytes(changed)
    assert run_convert(*argv) == [(0, 4)]
    record = out / convert.PACK_RECORD_NAME
    assert "content_sha1" in json.loads(record.read_text())["source_stamp"]
    monkeypatch.setattr(files, "RACY_NS", 0)                 # the images settled: stat from now on
    assert run_convert(*argv) == [(0, 4)]
    assert "content_sha1" not in json.loads(record.read_text())["source_stamp"]


def test_unpacked_folder_rebuilt_when_the_pack_changes(pack, rng, caplog):
    root, _, _ = pack
    argv = ("--rec_path", str(root), "--make_image_files", "--num_workers", "1")
    assert run_convert(*argv) == [(12, 0)]
    kept = root / "imgs" / "0" / "1.jpg"
    before = identity(kept)
    assert run_convert(*argv) == [(0, 12)] and identity(kept) == before
    labels = [0, 0, 1, 1, 1]
    images = [encode_jpeg(smooth_face(rng)) for _ in labels]
    write_face_pack(root / "train.rec", zip(labels, images))   # another pack in its place
    with caplog.at_level(logging.INFO):
        assert run_convert(*argv) == [(5, 0)]
    assert "rebuilding" in caplog.text
    found = sorted(p.relative_to(root / "imgs").as_posix() for p in (root / "imgs").rglob("*.jpg"))
    assert found == ["0/1.jpg", "0/2.jpg", "1/3.jpg", "1/4.jpg", "1/5.jpg"]
    for key, (label, image) in enumerate(zip(labels, images), start=1):
        assert (root / "imgs" / str(label) / f"{key}.jpg").read_bytes() == image


# ------------------------------------------------------------------------------------------------
# read-only data, unwritable outputs
# ------------------------------------------------------------------------------------------------
@pytest.fixture
def read_only(monkeypatch):
    """Make folders unwritable: chmod where that works; as root (whom chmod does not stop) the
    write probe of the modules under test reports them unwritable."""
    folders: list = []

    def make(folder: Path) -> Path:
        folders.append(folder)
        if os.geteuid() != 0:
            folder.chmod(0o555)
        return folder

    if os.geteuid() == 0:
        real = files.is_writable_folder

        def probe(path):
            return Path(path) not in folders and real(path)
        monkeypatch.setattr(pairsets, "is_writable_folder", probe, raising=False)
        monkeypatch.setattr(convert, "is_writable_folder", probe, raising=False)
    yield make
    for folder in folders:
        folder.chmod(0o755)


def test_read_only_pair_sets_are_converted_into_the_cache(pack, tmp_path, monkeypatch,
                                                          read_only, caplog):
    from net import build_model
    from utils.checkpoint import save_lightning_style_checkpoint

    root, _, pairs = pack
    monkeypatch.setenv("ADAFACE_CACHE", str(tmp_path / "cache"))
    torch.manual_seed(0)
    ckpt = save_lightning_style_checkpoint(tmp_path / "tiny.ckpt", build_model("ir_tiny").eval(),
                                           hyper_parameters={"arch": "ir_tiny"})
    argv = ["--data_root", str(root), "--val_data_path", ".", "--set_names", "lfw",
            "--ckpt_path", str(ckpt), "--arch", "ir_tiny", "--device", "cpu", "--num_workers",
            "0", "--batch_size", "8", "--nrof_folds", "2"]
    before = sorted(p.name for p in root.iterdir())
    read_only(root)
    script = load_script("validation_hq/eval_5valsets.py")
    with caplog.at_level(logging.INFO):
        result = script.main(argv + ["--output_dir", str(tmp_path / "out_ro")])
    assert "is not writable" in caplog.text
    assert sorted(p.name for p in root.iterdir()) == before           # nothing written there
    cache = pairsets.memfile_cache_root(root)
    assert str(cache).startswith(str(tmp_path / "cache"))
    want = published_input(np.stack([decode_image_bytes(b) for b in pairs[:4]]))
    np.testing.assert_allclose(open_memfile(cache, "lfw")[0], want, atol=1e-6)
    # the same numbers as from a writable copy of the folder
    copy = tmp_path / "copy"
    copy.mkdir()
    (copy / "lfw.bin").write_bytes((root / "lfw.bin").read_bytes())
    argv[1] = str(copy)
    assert script.main(argv + ["--output_dir", str(tmp_path / "out_rw")])["results"] \
        == result["results"]
    # reused from the cache next time
    dat = memfile_paths(cache, "lfw")[0]
    stamp = identity(dat)
    assert data.ensure_pair_memfiles(root, ["lfw"], show_progress=False) == []
    assert identity(dat) == stamp


def test_stale_memfile_in_a_read_only_folder_is_rebuilt_in_the_cache(pack, tmp_path, rng,
                                                                      monkeypatch, read_only):
    root, _, _ = pack
    monkeypatch.setenv("ADAFACE_CACHE", str(tmp_path / "cache"))
    data.ensure_pair_memfiles(root, ["lfw"], show_progress=False)
    new = [encode_png(smooth_face(rng)) for _ in range(4)]
    write_pair_bin(root / "lfw.bin", new, [False, True])    # replaced, then the folder locked
    stale = identity(memfile_paths(root, "lfw")[0])
    read_only(root)
    assert data.ensure_pair_memfiles(root, ["lfw"], show_progress=False) == ["lfw"]
    assert identity(memfile_paths(root, "lfw")[0]) == stale
    dataset = data.ValidationPairDataset(root, ["lfw"])
    want = published_input(np.stack([decode_image_bytes(b) for b in new]))
    np.testing.assert_allclose(np.stack([dataset[i][0].numpy() for i in range(4)]), want,
                               atol=1e-6)
    assert dataset.issame(0).tolist() == [False, True]


def test_unwritable_convert_output_is_one_line_naming_the_folder(pack, read_only, capsys,
                                                                 monkeypatch):
    root, _, _ = pack
    read_only(root)
    assert convert.main(["--rec_path", str(root), "--no_progress", "--num_workers", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"convert.py: error: {root}: cannot write here")
    assert "permissions" in err[0] and not (root / "imgs").exists()
    out = root.parent / "new" / "out"                   # the check itself creates nothing
    assert convert.main(["--make_record", "--image_folder", str(root / "nothing"),
                         "--rec_path", str(out), "--no_progress"]) == 2
    assert "image folder not found" in capsys.readouterr().err and not out.parent.exists()

    def denied(*args, **kwargs):        # a subfolder refused half-way
        raise PermissionError(13, "Permission denied", str(root / "imgs" / "3"))
    monkeypatch.setattr(convert, "make_image_files", denied)
    monkeypatch.setattr(convert, "is_writable_folder", lambda path: True)
    assert convert.main(["--rec_path", str(root), "--make_image_files", "--no_progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"convert.py: error: {root / 'imgs' / '3'}: cannot write (Permission denied); "
                   f"fix the permissions, or give a writable --rec_path"]
