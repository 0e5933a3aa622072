"""utils.pairsets: .bin pair-set pickles and the memfile layout."""
from __future__ import annotations

import json
import os
import pickle

import numpy as np
import pytest

from tests.reference_image import published_input
from utils.image import encode_jpeg, encode_png
from utils.pairsets import (VAL_SET_NAMES, PairSetError, bin_to_memfile, load_pair_bin,
                            memfile_exists, memfile_matches, memfile_paths, open_memfile,
                            write_pair_bin)


@pytest.fixture
def faces(rng):
    return [rng.integers(0, 256, size=(112, 112, 3), dtype=np.uint8) for _ in range(6)]


@pytest.fixture
def png_bin(tmp_path, faces):
    path = tmp_path / "lfw.bin"
    write_pair_bin(path, [encode_png(f) for f in faces], [True, False, True])
    return path


def test_val_set_names_order():
    assert VAL_SET_NAMES == ("agedb_30", "cfp_fp", "lfw", "cplfw", "calfw")


def test_bin_round_trip_and_public_layout(png_bin, faces):
    with open(png_bin, "rb") as f:
        raw = pickle.load(f, encoding="bytes")
    assert isinstance(raw, tuple) and isinstance(raw[0], list) and raw[1] == [True, False, True]
    assert all(isinstance(b, bytes) for b in raw[0])
    images, issame = load_pair_bin(png_bin)
    assert images == [encode_png(f) for f in faces]
    assert issame.dtype == bool and issame.tolist() == [True, False, True]


def test_bin_with_numpy_issame_and_protocol_2(tmp_path, faces):
    images = [encode_jpeg(f) for f in faces[:4]]
    path = tmp_path / "cfp_fp.bin"
    with open(path, "wb") as f:
        pickle.dump((images, np.array([False, True])), f, protocol=2)
    got, issame = load_pair_bin(path)
    assert got == images and issame.tolist() == [False, True]


def test_bin_errors(tmp_path, faces):
    with pytest.raises(FileNotFoundError, match="nope.bin: pair-set file not found"):
        load_pair_bin(tmp_path / "nope.bin")
    bad = tmp_path / "bad.bin"
    bad.write_bytes(b"\x80\x04this is not a pickle")
    with pytest.raises(PairSetError, match="bad.bin: not a readable pair-set pickle"):
        load_pair_bin(bad)
    good = pickle.dumps(([b"a", b"b"], [True]))
    bad.write_bytes(good[:-5])  # truncated
    with pytest.raises(PairSetError, match="bad.bin: not a readable"):
        load_pair_bin(bad)
    bad.write_bytes(pickle.dumps(([b"a", b"b", b"c"], [True])))
    with pytest.raises(PairSetError, match="bad.bin: 3 images for 1 pairs"):
        load_pair_bin(bad)
    bad.write_bytes(pickle.dumps({"bins": []}))
    with pytest.raises(PairSetError, match="expected a pickled"):
        load_pair_bin(bad)
    bad.write_bytes(pickle.dumps(([b"a", 5], [True])))
    with pytest.raises(PairSetError, match="image 1 is a int"):
        load_pair_bin(bad)
    with pytest.raises(ValueError, match="3 images for 1 pairs"):
        write_pair_bin(tmp_path / "w.bin", [b"a", b"b", b"c"], [True])


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_bin_refuses_code_in_pickle(tmp_path):
    path = tmp_path / "evil.bin"
    path.write_bytes(pickle.dumps(([_Evil(), b"x"], [True])))
    with pytest.raises(PairSetError, match="evil.bin: .*refusing to load"):
        load_pair_bin(path)


def test_bin_to_memfile_holds_network_input(tmp_path, png_bin, faces):
    dat = bin_to_memfile(png_bin, tmp_path / "root", show_progress=False)
    root = tmp_path / "root"
    assert dat == root / "lfw" / "memfile" / "mem_file.dat"
    conf = json.loads((root / "lfw" / "memfile" / "mem_file.dat.conf").read_text())
    assert conf["shape"] == [6, 3, 112, 112] and conf["dtype"] == "float32"
    assert np.load(root / "lfw_list.npy").tolist() == [True, False, True]
    data, issame = open_memfile(root, "lfw")
    assert isinstance(data, np.memmap) and data.dtype == np.float32 and not data.flags.writeable
    assert issame.tolist() == [True, False, True]
    for i, face in enumerate(faces):  # PNG is lossless: exact network input
        np.testing.assert_allclose(data[i], published_input(face), rtol=0, atol=1e-6)
    assert memfile_exists(root, "lfw") and memfile_matches(root, "lfw", False)
    assert not memfile_matches(root, "lfw", True)


def test_bin_to_memfile_swap_and_workers(tmp_path, png_bin):
    plain = bin_to_memfile(png_bin, tmp_path, name="plain", show_progress=False)
    swapped = bin_to_memfile(png_bin, tmp_path, name="swapped", swap_color_channel=True,
                             show_progress=False, num_workers=2)
    a = np.fromfile(plain, np.float32).reshape(-1, 3, 112, 112)
    b = np.fromfile(swapped, np.float32).reshape(-1, 3, 112, 112)
    np.testing.assert_array_equal(b, a[:, ::-1])
    assert memfile_matches(tmp_path, "swapped", True)
    pooled = bin_to_memfile(png_bin, tmp_path, name="pooled", show_progress=False, num_workers=2)
    assert pooled.read_bytes() == plain.read_bytes()


def test_bin_to_memfile_rejects_wrong_size(tmp_path, faces):
    images = [encode_jpeg(f) for f in faces[:3]] + [encode_jpeg(faces[3][:100, :100])]
    write_pair_bin(tmp_path / "calfw.bin", images, [True, False])
    with pytest.raises(PairSetError, match=r"calfw.bin: image 3: expected an aligned 112x112"):
        bin_to_memfile(tmp_path / "calfw.bin", tmp_path, show_progress=False)
    assert not memfile_exists(tmp_path, "calfw")
    dat, conf, _ = memfile_paths(tmp_path, "calfw")
    assert not conf.exists() and not dat.exists()
    assert not dat.with_name("mem_file.dat.tmp").exists()


def test_bin_to_memfile_rejects_undecodable(tmp_path, faces):
    write_pair_bin(tmp_path / "x.bin", [encode_png(faces[0]), b"garbage"], [True])
    with pytest.raises(PairSetError, match=r"x.bin: image 1: not a decodable image"):
        bin_to_memfile(tmp_path / "x.bin", tmp_path, show_progress=False)


def test_open_memfile_written_by_the_original_code(tmp_path, rng):
    """The original AdaFace layout: conf holds only shape and dtype."""
    data = rng.standard_normal((4, 3, 112, 112)).astype(np.float32)
    dat, conf, lst = memfile_paths(tmp_path, "agedb_30")
    dat.parent.mkdir(parents=True)
    with open(str(dat) + ".conf", "w") as f:
        json.dump({"shape": tuple(data.shape), "dtype": str(data.dtype)}, f)
    mm = np.memmap(dat, mode="w+", shape=data.shape, dtype=data.dtype)
    mm[:] = data
    mm.flush()
    del mm
    np.save(str(tmp_path / "agedb_30") + "_list", np.array([True, False]))
    got, issame = open_memfile(tmp_path, "agedb_30")
    np.testing.assert_array_equal(got, data)
    assert issame.tolist() == [True, False]
    assert memfile_matches(tmp_path, "agedb_30", False)


def test_open_memfile_errors(tmp_path, png_bin):
    with pytest.raises(FileNotFoundError, match=r"mem_file.dat: memfile of pair set 'lfw' not "
                                                r"found; create it with: python convert.py"):
        open_memfile(tmp_path, "lfw")
    bin_to_memfile(png_bin, tmp_path, show_progress=False)
    dat, conf, lst = memfile_paths(tmp_path, "lfw")

    full = dat.read_bytes()
    dat.write_bytes(full[:-4])
    with pytest.raises(PairSetError, match=r"mem_file.dat: 903164 bytes, but mem_file.dat.conf "
                                           r"describes \(6, 3, 112, 112\)"):
        open_memfile(tmp_path, "lfw")
    assert not memfile_exists(tmp_path, "lfw")
    dat.write_bytes(full)

    np.save(lst, np.array([True, False]))
    with pytest.raises(PairSetError, match=r"lfw_list.npy: 2 pairs, but .* holds 6 images"):
        open_memfile(tmp_path, "lfw")
    np.save(lst, np.array([True, False, True]))

    text = conf.read_text()
    conf.write_text("{broken")
    with pytest.raises(PairSetError, match="mem_file.dat.conf: not a memfile description"):
        open_memfile(tmp_path, "lfw")
    conf.write_text(json.dumps({"shape": [6, 3, 112, 112], "dtype": "float64"}))
    with pytest.raises(PairSetError, match="expected shape"):
        open_memfile(tmp_path, "lfw")
    conf.write_text(text)
    assert memfile_exists(tmp_path, "lfw")
