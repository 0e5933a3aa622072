"""utils.recordio: MXNet RecordIO framing, image records, face packs and the label cache."""
from __future__ import annotations

import json
import os
import pickle
import random
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from utils import files, recordio
from utils.image import decode_image_bytes
from utils.recordio import (IRHeader, RecordIOError, RecordReader, RecordWriter,
                            load_face_pack_index, pack_record, read_face_record, rebuild_index,
                            unpack_record, write_face_pack)

MAGIC = struct.pack("<I", 0xCED7230A)
FIXTURE = Path(__file__).resolve().parent / "data" / "mxnet"


def frame(cflag: int, data: bytes) -> bytes:
    """One record part written out by hand from formats.md."""
    return MAGIC + struct.pack("<I", (cflag << 29) | len(data)) + data + b"\0" * (-len(data) % 4)


def write_records(path: Path, records: list[tuple[int, bytes]]) -> None:
    with RecordWriter(path) as writer:
        for key, data in records:
            writer.write(key, data)


# ---------------------------------------------------------------------------------------------
# byte layout
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("payload, expected", [
    (b"", frame(0, b"")),
    (b"abcde", frame(0, b"abcde")),
    (b"abcd", frame(0, b"abcd")),
    # magic at an unaligned position: no split
    (b"x" + MAGIC + b"yzw", frame(0, b"x" + MAGIC + b"yzw")),
    # magic at byte 4: split into a first and a last part, the magic itself not stored
    (b"1234" + MAGIC + b"56", frame(1, b"1234") + frame(3, b"56")),
    # magic alone: an empty first part and an empty last part
    (MAGIC, frame(1, b"") + frame(3, b"")),
    # three aligned occurrences: first, two middles, last
    (MAGIC + b"ab\0\0" + MAGIC + MAGIC + b"z",
     frame(1, b"") + frame(2, b"ab\0\0") + frame(2, b"") + frame(3, b"z")),
    # a partial magic at the end is data
    (b"\0\0\0\0" + MAGIC[:3], frame(0, b"\0\0\0\0" + MAGIC[:3])),
])
def test_frame_record_matches_hand_written_layout(payload, expected):
    assert recordio.frame_record(payload) == expected


def test_writer_file_and_index_layout(tmp_path):
    write_records(tmp_path / "a.rec", [(7, b"abc"), (2, b"1234" + MAGIC + b"5"), (9, b"")])
    expected = frame(0, b"abc") + frame(1, b"1234") + frame(3, b"5") + frame(0, b"")
    assert (tmp_path / "a.rec").read_bytes() == expected
    assert (tmp_path / "a.idx").read_text() == "7\t0\n2\t12\n9\t36\n"


def test_pack_record_layout_scalar_and_array_labels():
    scalar = pack_record(IRHeader(5, 3.0, 7, 2 ** 63 + 1), b"img")
    # A scalar label forces flag 0, exactly as mxnet.recordio.pack does.
    assert scalar == struct.pack("<IfQQ", 0, 3.0, 7, 2 ** 63 + 1) + b"img"
    array = pack_record(IRHeader(0, [1.5, -2.0, 8.0], 1, 2), b"xy")
    assert array == (struct.pack("<IfQQ", 3, 0.0, 1, 2) + struct.pack("<3f", 1.5, -2.0, 8.0)
                     + b"xy")


def test_unpack_record_round_trip():
    header, body = unpack_record(pack_record(IRHeader(0, 12.0, 99, 3), b"\xff\xd8data"))
    assert header == IRHeader(0, 12.0, 99, 3) and body == b"\xff\xd8data"
    header, body = unpack_record(pack_record(IRHeader(0, np.array([4.0, 6.25]), 0, 0), b""))
    assert header.flag == 2 and header.label.dtype == np.float32
    np.testing.assert_array_equal(header.label, [4.0, 6.25])
    assert body == b""


def test_unpack_record_errors():
    with pytest.raises(RecordIOError, match="shorter than the 24-byte"):
        unpack_record(b"\0" * 10, "somewhere")
    with pytest.raises(RecordIOError, match="3 float32 label values"):
        unpack_record(struct.pack("<IfQQ", 3, 0.0, 0, 0) + b"\0" * 8)


# ---------------------------------------------------------------------------------------------
# round trips
# ---------------------------------------------------------------------------------------------
def random_payloads(count: int, seed: int = 0) -> list[bytes]:
    rnd = random.Random(seed)
    payloads = [b"", MAGIC, MAGIC * 3, b"x" + MAGIC, b"abcd" + MAGIC, b"abc" + MAGIC + b"d"]
    while len(payloads) < count:
        pieces = []
        for _ in range(rnd.randint(0, 6)):
            pieces.append(bytes(rnd.getrandbits(8) for _ in range(rnd.randint(0, 9))))
            if rnd.random() < 0.5:
                pieces.append(MAGIC)
        payloads.append(b"".join(pieces))
    return payloads


def test_round_trip_random_records_and_keys(tmp_path):
    payloads = random_payloads(200)
    keys = random.Random(1).sample(range(10_000), len(payloads))
    write_records(tmp_path / "r.rec", list(zip(keys, payloads)))
    reader = RecordReader(tmp_path / "r.rec")
    assert len(reader) == len(payloads)
    assert reader.keys == keys
    order = list(range(len(keys)))
    random.Random(2).shuffle(order)
    for i in order:
        assert reader.read(keys[i]) == payloads[i]
    # offsets are the ones written to the .idx
    lines = (tmp_path / "r.idx").read_text().splitlines()
    assert [reader.offset(k) for k in keys] == [int(line.split("\t")[1]) for line in lines]
    assert keys[0] in reader and 10_001 not in reader


def test_round_trip_image_records_with_magic_in_payload(tmp_path):
    records = [
        (0, IRHeader(0, [4.0, 6.0], 0, 0), b""),
        (1, IRHeader(0, 0.0, 1, 0), b"\xff\xd8" + MAGIC + b"\xff\xd9"),
        (2, IRHeader(0, 1.0, 2, 0), MAGIC * 2),  # header is 24 bytes: both magics aligned
        (3, IRHeader(0, np.array([2.0, 0.5], np.float32), 3, 4), b"a" + MAGIC),
    ]
    write_records(tmp_path / "i.rec", [(k, pack_record(h, p)) for k, h, p in records])
    reader = RecordReader(tmp_path / "i.rec")
    for key, header, payload in records:
        got_header, got_payload = read_face_record(reader, key)
        assert got_payload == payload
        assert (got_header.flag, got_header.id, got_header.id2) == (
            0 if np.isscalar(header.label) else len(header.label), header.id, header.id2)
        np.testing.assert_array_equal(got_header.label, header.label)


def test_read_prefix_reads_only_what_is_needed(tmp_path):
    payloads = [b"0123456789", MAGIC + b"abcdefgh", b"ab", b"abcd" + MAGIC + b"xy"]
    write_records(tmp_path / "p.rec", list(enumerate(payloads)))
    reader = RecordReader(tmp_path / "p.rec")
    for key, payload in enumerate(payloads):
        for size in (0, 3, 6, 40):
            assert reader.read_prefix(key, size) == payload[:size]


# ---------------------------------------------------------------------------------------------
# the MXNet-made fixture (tests/data/mxnet, see its README)
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def expected():
    return json.loads((FIXTURE / "expected.json").read_text())


def test_mxnet_fixture_reads_back(expected):
    reader = RecordReader(FIXTURE / "plain.rec")
    assert reader.keys == [item["key"] for item in expected["plain"]]
    for item in expected["plain"]:
        assert reader.read(item["key"]) == bytes.fromhex(item["record_hex"])
    spec = expected["plain_array_record"]
    header, payload = read_face_record(reader, spec["key"])
    assert (header.flag, header.id, header.id2) == (spec["flag"], spec["id"], spec["id2"])
    np.testing.assert_array_equal(header.label, np.array(spec["label"], np.float32))
    assert payload == bytes.fromhex(spec["payload_hex"])
    reader.close()


def test_our_writer_reproduces_mxnet_bytes(tmp_path, expected):
    write_records(tmp_path / "plain.rec",
                  [(item["key"], bytes.fromhex(item["record_hex"])) for item in expected["plain"]])
    assert (tmp_path / "plain.rec").read_bytes() == (FIXTURE / "plain.rec").read_bytes()
    assert (tmp_path / "plain.idx").read_bytes() == (FIXTURE / "plain.idx").read_bytes()
    spec = expected["plain_array_record"]
    assert pack_record(IRHeader(0, spec["label"], spec["id"], spec["id2"]),
                       bytes.fromhex(spec["payload_hex"])) == bytes.fromhex(
        expected["plain"][-1]["record_hex"])
    samples = [(s["label"], bytes.fromhex(s["image_hex"])) for s in expected["face_samples"]]
    assert write_face_pack(tmp_path / "face.rec", samples) == 3
    assert (tmp_path / "face.rec").read_bytes() == (FIXTURE / "face.rec").read_bytes()
    assert (tmp_path / "face.idx").read_bytes() == (FIXTURE / "face.idx").read_bytes()


def test_mxnet_face_pack_index_and_images(tmp_path, expected):
    index = load_face_pack_index(FIXTURE / "face.rec", cache_dir=tmp_path, show_progress=False)
    np.testing.assert_array_equal(index.keys, [1, 2, 3])
    np.testing.assert_array_equal(index.labels, [0, 0, 1])
    assert index.num_classes == 2
    reader = RecordReader(FIXTURE / "face.rec")
    for key, sample in zip(index.keys, expected["face_samples"]):
        header, image = read_face_record(reader, int(key))
        assert image == bytes.fromhex(sample["image_hex"]) and header.id == key
        assert decode_image_bytes(image).shape == (16, 16, 3)  # key 2 is split into parts


# ---------------------------------------------------------------------------------------------
# face packs and the label index
# ---------------------------------------------------------------------------------------------
def make_samples(labels: list[int]) -> list[tuple[int, bytes]]:
    return [(label, f"img{i}-".encode() + MAGIC * (i % 3)) for i, label in enumerate(labels)]


def test_write_face_pack_header_and_identity_records(tmp_path):
    samples = make_samples([0, 0, 0, 1, 2, 2])
    assert write_face_pack(tmp_path / "train.rec", samples) == 6
    reader = RecordReader(tmp_path / "train.rec")
    assert reader.keys == list(range(10))
    header, payload = read_face_record(reader, 0)
    assert header.flag == 2 and payload == b""
    np.testing.assert_array_equal(header.label, [7, 10])
    for key in range(1, 7):
        h, img = read_face_record(reader, key)
        assert (h.flag, h.label, h.id, img) == (0, samples[key - 1][0], key, samples[key - 1][1])
    ranges = [tuple(read_face_record(reader, k)[0].label.astype(int)) for k in range(7, 10)]
    assert ranges == [(1, 4), (4, 5), (5, 7)]


def test_write_face_pack_without_header(tmp_path):
    samples = make_samples([0, 1, 1])
    assert write_face_pack(tmp_path / "t.rec", samples, with_header=False) == 3
    reader = RecordReader(tmp_path / "t.rec")
    assert reader.keys == [0, 1, 2]
    assert [read_face_record(reader, k)[1] for k in range(3)] == [s[1] for s in samples]
    index = load_face_pack_index(tmp_path / "t.rec", show_progress=False)
    np.testing.assert_array_equal(index.keys, [0, 1, 2])
    np.testing.assert_array_equal(index.labels, [0, 1, 1])


@pytest.mark.parametrize("labels", [[1, 1], [0, 2], [0, 1, 0]])
def test_write_face_pack_rejects_ungrouped_labels(tmp_path, labels):
    with pytest.raises(ValueError, match="grouped by label"):
        write_face_pack(tmp_path / "bad.rec", make_samples(labels))


def test_label_index_with_array_labels(tmp_path):
    with RecordWriter(tmp_path / "a.rec") as writer:
        # no record 0: an array label at key 0 would mark the InsightFace header record
        for key, label in zip([1, 2, 5], [3, 3, 0]):
            writer.write(key, pack_record(IRHeader(0, [float(label), 0.5], key, 0), b"i"))
    index = load_face_pack_index(tmp_path / "a.rec", show_progress=False)
    np.testing.assert_array_equal(index.keys, [1, 2, 5])
    np.testing.assert_array_equal(index.labels, [3, 3, 0])
    assert index.num_classes == 4


def test_bad_header_record(tmp_path):
    with RecordWriter(tmp_path / "h.rec") as writer:
        writer.write(0, pack_record(IRHeader(0, [3.0, 0.5], 0, 0), b""))
        writer.write(1, pack_record(IRHeader(0, 0.0, 1, 0), b"i"))
    with pytest.raises(RecordIOError, match=r"key 0 \(byte offset 0\): header record label"):
        load_face_pack_index(tmp_path / "h.rec", show_progress=False)
    with RecordWriter(tmp_path / "h.rec") as writer:
        writer.write(0, pack_record(IRHeader(0, [9.0, 12.0], 0, 0), b""))
        writer.write(1, pack_record(IRHeader(0, 0.0, 1, 0), b"i"))
    with pytest.raises(RecordIOError, match="images are keys 1..8, but the index lists 2"):
        load_face_pack_index(tmp_path / "h.rec", show_progress=False)


def test_label_index_rejects_non_integer_label(tmp_path):
    with RecordWriter(tmp_path / "a.rec") as writer:
        writer.write(0, pack_record(IRHeader(0, 1.5, 0, 0), b"i"))
    with pytest.raises(RecordIOError, match=r"key 0 .*label 1.5"):
        load_face_pack_index(tmp_path / "a.rec", show_progress=False)


def test_label_cache_built_once_reused_and_rebuilt_when_stale(tmp_path, monkeypatch):
    rec = tmp_path / "train.rec"
    write_face_pack(rec, make_samples([0, 0, 1]))
    first = load_face_pack_index(rec, show_progress=False)
    cache = tmp_path / "train.labels.npz"
    assert cache.is_file()

    calls = []
    real_build = recordio.build_face_pack_index
    monkeypatch.setattr(recordio, "build_face_pack_index",
                        lambda *a, **k: calls.append(1) or real_build(*a, **k))
    again = load_face_pack_index(rec, show_progress=False)
    assert calls == []
    np.testing.assert_array_equal(again.keys, first.keys)
    np.testing.assert_array_equal(again.labels, first.labels)
    assert again.num_classes == first.num_classes == 2

    # Rewrite the pack with other labels (same size) and a different mtime: the cache is stale.
    write_face_pack(rec, make_samples([0, 1, 2]))
    stat = rec.stat()
    os.utime(rec, ns=(stat.st_atime_ns, stat.st_mtime_ns + 5_000_000_000))
    rebuilt = load_face_pack_index(rec, show_progress=False)
    assert calls == [1]
    np.testing.assert_array_equal(rebuilt.labels, [0, 1, 2])
    assert rebuilt.num_classes == 3


def test_label_cache_falls_back_to_user_cache_dir(tmp_path, monkeypatch):
    pack_dir = tmp_path / "readonly_pack"
    rec = pack_dir / "train.rec"
    write_face_pack(rec, make_samples([0, 1, 1]))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    real_mkstemp = files.tempfile.mkstemp

    def mkstemp(*args, dir=None, **kwargs):  # the pack's folder refuses new files
        if Path(dir).resolve() == pack_dir.resolve():
            raise PermissionError(13, "Permission denied", str(dir))
        return real_mkstemp(*args, dir=dir, **kwargs)

    monkeypatch.setattr(files.tempfile, "mkstemp", mkstemp)
    index = load_face_pack_index(rec, show_progress=False)
    np.testing.assert_array_equal(index.labels, [0, 1, 1])
    assert not (pack_dir / "train.labels.npz").exists()
    cached = list((tmp_path / "xdg" / "adaface").glob("train-*.labels.npz"))
    assert len(cached) == 1
    monkeypatch.setattr(recordio, "build_face_pack_index",
                        lambda *a, **k: pytest.fail("cache in the user dir was not reused"))
    np.testing.assert_array_equal(load_face_pack_index(rec, show_progress=False).labels,
                                  [0, 1, 1])


def test_unreadable_label_cache_is_rebuilt(tmp_path):
    rec = tmp_path / "train.rec"
    write_face_pack(rec, make_samples([0, 1]))
    (tmp_path / "train.labels.npz").write_bytes(b"not a zip file")
    index = load_face_pack_index(rec, show_progress=False)
    np.testing.assert_array_equal(index.labels, [0, 1])
    with np.load(tmp_path / "train.labels.npz") as data:
        np.testing.assert_array_equal(data["labels"], [0, 1])


# ---------------------------------------------------------------------------------------------
# processes: pickling, forked DataLoader workers
# ---------------------------------------------------------------------------------------------
class RecordDataset(Dataset):
    def __init__(self, reader: RecordReader):
        self.reader = reader

    def __len__(self) -> int:
        return len(self.reader)

    def __getitem__(self, i: int):
        data = self.reader.read(self.reader.keys[i])
        return (torch.tensor(list(data), dtype=torch.uint8),
                torch.tensor([os.getpid(), self.reader._pid]))


def test_reader_pickles_and_works_in_dataloader_workers(tmp_path):
    payloads = random_payloads(40, seed=3)
    write_records(tmp_path / "d.rec", list(enumerate(payloads)))
    reader = RecordReader(tmp_path / "d.rec")
    assert reader.read(0) == payloads[0]  # the parent opens its handle before the fork
    clone = pickle.loads(pickle.dumps(reader))
    assert clone._fd is None and [clone.read(k) for k in range(40)] == payloads

    loader = DataLoader(RecordDataset(reader), batch_size=None, num_workers=2, shuffle=False)
    seen = []
    for i, (data, pids) in enumerate(loader):
        assert bytes(data.tolist()) == payloads[i]
        assert pids[0] == pids[1] != os.getpid()  # each worker opened its own file
        seen.append(int(pids[0]))
    assert len(set(seen)) == 2
    assert reader._pid == os.getpid() and reader.read(5) == payloads[5]


# ---------------------------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------------------------
def test_missing_idx_suggests_rebuild(tmp_path):
    write_records(tmp_path / "x.rec", [(0, b"a")])
    (tmp_path / "x.idx").unlink()
    with pytest.raises(RecordIOError) as err:
        RecordReader(tmp_path / "x.rec")
    assert "x.idx" in str(err.value) and "not found" in str(err.value)
    assert f"python convert.py --rebuild_index --rec_path {tmp_path / 'x.rec'}" in str(err.value)
    with pytest.raises(RecordIOError, match=r"x\.idx: index file .* not found; rebuild it"):
        load_face_pack_index(tmp_path / "x.rec", show_progress=False)


def test_missing_rec(tmp_path):
    with pytest.raises(RecordIOError, match="nothing.rec: RecordIO file not found"):
        RecordReader(tmp_path / "nothing.rec")


def test_truncated_record(tmp_path):
    write_records(tmp_path / "t.rec", [(0, b"abcd"), (1, b"x" * 40)])
    data = (tmp_path / "t.rec").read_bytes()
    (tmp_path / "t.rec").write_bytes(data[:-10])
    reader = RecordReader(tmp_path / "t.rec")
    assert reader.read(0) == b"abcd"
    with pytest.raises(RecordIOError, match=r"t\.rec: key 1: truncated record at byte offset 12"):
        reader.read(1)
    (tmp_path / "t.rec").write_bytes(data[:15])  # cut inside the second record's header
    with pytest.raises(RecordIOError, match="key 1: truncated record at byte offset 12"):
        RecordReader(tmp_path / "t.rec").read(1)
    with pytest.raises(RecordIOError, match="key 1: truncated"):
        rebuild_index(tmp_path / "t.rec", tmp_path / "new.idx", show_progress=False)


def test_wrong_magic_at_offset(tmp_path):
    write_records(tmp_path / "m.rec", [(0, b"abcd"), (1, b"efgh")])
    (tmp_path / "m.idx").write_text("0\t0\n1\t16\n")  # 16 is inside record 1
    reader = RecordReader(tmp_path / "m.rec")
    with pytest.raises(RecordIOError, match=r"m\.rec: key 1: no RecordIO magic at byte offset 16"):
        reader.read(1)


def test_offset_inside_multi_part_record(tmp_path):
    write_records(tmp_path / "s.rec", [(0, b"abcd" + MAGIC + b"ef")])
    (tmp_path / "s.idx").write_text("0\t0\n1\t12\n")  # 12 is the record's last part
    with pytest.raises(RecordIOError, match="key 1: byte offset 12 is inside a multi-part"):
        RecordReader(tmp_path / "s.rec").read(1)


def test_unknown_key(tmp_path):
    write_records(tmp_path / "k.rec", [(3, b"a"), (8, b"b")])
    reader = RecordReader(tmp_path / "k.rec")
    with pytest.raises(RecordIOError, match=r"k\.rec: key 5 not found in .*k\.idx"):
        reader.read(5)
    with pytest.raises(RecordIOError, match="key 9 not found"):
        reader.offset(9)


def test_malformed_idx(tmp_path):
    write_records(tmp_path / "b.rec", [(0, b"a")])
    (tmp_path / "b.idx").write_text("0\t0\n1\tten\n")
    with pytest.raises(RecordIOError, match=r"b\.idx: line 2 is not"):
        RecordReader(tmp_path / "b.rec")
    (tmp_path / "b.idx").write_text("0\t0\t4\n1\n")
    with pytest.raises(RecordIOError, match="line 1 is not"):
        RecordReader(tmp_path / "b.rec")
    (tmp_path / "b.idx").write_text("0\t0\n\n0\t0\n")
    with pytest.raises(RecordIOError, match="key 0 is listed more than once"):
        RecordReader(tmp_path / "b.rec")


def test_duplicate_key_on_write(tmp_path):
    with RecordWriter(tmp_path / "d.rec") as writer:
        writer.write(1, b"a")
        with pytest.raises(RecordIOError, match="key 1 written twice"):
            writer.write(1, b"b")


# ---------------------------------------------------------------------------------------------
# rebuilding a lost index
# ---------------------------------------------------------------------------------------------
def test_rebuild_index_reproduces_sequential_index(tmp_path):
    write_face_pack(tmp_path / "train.rec", make_samples([0, 0, 1, 2, 2, 2]))
    original = (tmp_path / "train.idx").read_bytes()
    (tmp_path / "train.idx").unlink()
    assert rebuild_index(tmp_path / "train.rec", show_progress=False) == 10
    assert (tmp_path / "train.idx").read_bytes() == original


def test_rebuild_index_rejects_garbage(tmp_path):
    shutil.copy(FIXTURE / "plain.rec", tmp_path / "g.rec")
    with open(tmp_path / "g.rec", "ab") as f:
        f.write(b"garbage!")
    with pytest.raises(RecordIOError, match="key 7: no RecordIO magic at byte offset 172"):
        rebuild_index(tmp_path / "g.rec", show_progress=False)
