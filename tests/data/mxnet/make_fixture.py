"""Write the MXNet-made reference packs in this folder (needs mxnet, NOT used by the tests).

Run once in a throw-away environment:

    python3 -m venv /tmp/mxvenv
    /tmp/mxvenv/bin/pip install mxnet==1.9.1 numpy==1.23.5 pillow
    /tmp/mxvenv/bin/python tests/data/mxnet/make_fixture.py tests/data/mxnet

It writes, with mxnet's own MXIndexedRecordIO and recordio.pack:

* ``plain.rec/.idx``: raw records under non-consecutive keys that exercise the framing (empty
  record, the magic word alone, lengths that need padding, the magic at aligned and unaligned
  positions, a trailing partial magic) plus one packed record with an array label;
* ``face.rec/.idx``: an InsightFace-style face pack (header record, 3 images of 2 identities,
  identity records) whose second image carries the magic word at aligned positions after its JPEG
  data, so it is split into parts;
* ``expected.json``: what was written, so that the tests can check every byte without mxnet.
"""
import io
import json
import struct
import sys
from pathlib import Path

import mxnet as mx
import numpy as np
from PIL import Image

MAGIC = struct.pack("<I", 0xCED7230A)


def tiny_jpeg(seed):
    rgb = np.random.RandomState(seed).randint(0, 256, size=(16, 16, 3)).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def main(out_dir):
    out = Path(out_dir)
    plain = [
        (10, b""),
        (3, MAGIC),
        (7, b"abcde"),
        (0, b"xy" + MAGIC + b"zz" + MAGIC + b"q"),
        (5, MAGIC + MAGIC + b"tail" + MAGIC),
        (1, b"\0\0\0\0" + MAGIC[:3]),
    ]
    array_header = mx.recordio.IRHeader(0, [1.0, 0.25, -3.5], 9, 11)
    array_record = mx.recordio.pack(array_header, b"payload")
    plain.append((42, array_record))
    w = mx.recordio.MXIndexedRecordIO(str(out / "plain.idx"), str(out / "plain.rec"), "w")
    for key, rec in plain:
        w.write_idx(key, rec)
    w.close()

    image_b = tiny_jpeg(1)
    pad = b"\0" * (-(24 + len(image_b)) % 4)
    image_b = image_b + pad + MAGIC + b"xx" + MAGIC + b"\0\0" + MAGIC + b"end"
    samples = [(0, tiny_jpeg(0)), (0, image_b), (1, tiny_jpeg(2))]
    n = len(samples)
    w = mx.recordio.MXIndexedRecordIO(str(out / "face.idx"), str(out / "face.rec"), "w")
    w.write_idx(0, mx.recordio.pack(mx.recordio.IRHeader(0, [n + 1, n + 1 + 2], 0, 0), b""))
    for key, (label, img) in enumerate(samples, start=1):
        w.write_idx(key, mx.recordio.pack(mx.recordio.IRHeader(0, float(label), key, 0), img))
    w.write_idx(n + 1, mx.recordio.pack(mx.recordio.IRHeader(0, [1, 3], 0, 0), b""))
    w.write_idx(n + 2, mx.recordio.pack(mx.recordio.IRHeader(0, [3, 4], 0, 0), b""))
    w.close()

    expected = {
        "made_with": f"mxnet {mx.__version__}, numpy {np.__version__}",
        "plain": [{"key": k, "record_hex": r.hex()} for k, r in plain],
        "plain_array_record": {"key": 42, "flag": 3, "label": [1.0, 0.25, -3.5], "id": 9,
                               "id2": 11, "payload_hex": b"payload".hex()},
        "face_samples": [{"label": lab, "image_hex": img.hex()} for lab, img in samples],
    }
    (out / "expected.json").write_text(json.dumps(expected, indent=1) + "\n")

    # Read everything back with mxnet as a sanity check of the fixture itself.
    r = mx.recordio.MXIndexedRecordIO(str(out / "plain.idx"), str(out / "plain.rec"), "r")
    for key, rec in plain:
        assert r.read_idx(key) == rec, key
    r = mx.recordio.MXIndexedRecordIO(str(out / "face.idx"), str(out / "face.rec"), "r")
    header, _ = mx.recordio.unpack(r.read_idx(2))
    assert header.label == 0.0
    print("wrote", sorted(p.name for p in out.iterdir()))


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).parent)
