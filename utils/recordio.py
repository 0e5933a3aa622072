"""MXNet RecordIO (``.rec`` + ``.idx``) read and written natively, without mxnet.

The byte layout (see ``formats.md``) is that of dmlc-core's ``RecordIOWriter`` and MXNet's
``MXIndexedRecordIO`` / ``recordio.pack``:

* every record part is ``magic (uint32 LE 0xced7230a) | lrec (uint32 LE) | data | zero padding to 4``
  with ``lrec = cflag << 29 | length``; ``cflag`` is 0 for a whole record, 1/2/3 for the first,
  middle and last part of a record that was split where the magic word occurred at a 4-byte-aligned
  position of the payload (the reader puts the magic word back between the parts);
* the ``.idx`` file is text, one ``<key>\\t<byte offset>\\n`` line per record;
* an image record's payload starts with the 24-byte header ``<IfQQ`` (flag, label, id, id2); when
  ``flag > 0`` the label is the ``flag`` float32 values that follow the header.

InsightFace face packs (MS1MV2 ``faces_emore`` etc.) add a header record at key 0 whose label
``[a, b]`` says that keys ``1 .. a-1`` are images and ``a .. b-1`` are per-identity records.
:func:`load_face_pack_index` lists (key, label) of every image and caches the result beside the pack.
"""
from __future__ import annotations

import hashlib
import io
import logging
import numbers
import os
import struct
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, NamedTuple, Optional, Union

import numpy as np
from tqdm import tqdm

from utils.errors import UserError
from utils.files import remove_temporaries, user_cache_dir, write_atomically

logger = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]

MAGIC = 0xCED7230A
MAGIC_BYTES = struct.pack("<I", MAGIC)
LENGTH_BITS = 29
MAX_RECORD_LENGTH = (1 << LENGTH_BITS) - 1
CFLAG_WHOLE, CFLAG_FIRST, CFLAG_MIDDLE, CFLAG_LAST = 0, 1, 2, 3
_FRAME = struct.Struct("<II")
FRAME_SIZE = _FRAME.size  # 8

IR_FORMAT = "<IfQQ"
_IR = struct.Struct(IR_FORMAT)
IR_SIZE = _IR.size  # 24

# float32 represents every integer up to 2**24 exactly: the largest key a header record can name.
_MAX_EXACT_FLOAT32_INT = 1 << 24
LABEL_CACHE_VERSION = 1


class RecordIOError(UserError, ValueError):
    """A RecordIO file is missing, malformed or does not hold the requested key."""


class IRHeader(NamedTuple):
    """Header of an image record (MXNet's ``recordio.IRHeader``)."""

    flag: int
    label: Union[float, np.ndarray]
    id: int
    id2: int


def default_idx_path(rec_path: PathLike) -> Path:
    """``train.rec`` -> ``train.idx`` (MXNet's convention)."""
    return Path(rec_path).with_suffix(".idx")


# ----------------------------------------------------------------------------------------------
# Record payloads (recordio.pack / unpack)
# ----------------------------------------------------------------------------------------------
def pack_record(header: IRHeader, payload: bytes) -> bytes:
    """Prefix ``payload`` with the image-record header, exactly as MXNet's ``recordio.pack``.

    A scalar label is stored in the header (``flag`` becomes 0). An array label is stored as
    float32 values after the header: ``flag`` becomes their count and the scalar field 0.
    """
    flag, label, rid, rid2 = header
    if isinstance(label, numbers.Number):
        return _IR.pack(0, float(label), int(rid), int(rid2)) + bytes(payload)
    values = np.asarray(label, dtype=np.float32)
    return _IR.pack(values.size, 0.0, int(rid), int(rid2)) + values.tobytes() + bytes(payload)


def unpack_record(record: bytes, source: str = "<record>") -> tuple[IRHeader, bytes]:
    """Split a record payload into its :class:`IRHeader` and the remaining bytes (the image).

    Like MXNet's ``recordio.unpack``: with ``flag > 0`` the label is a float32 array of
    ``flag`` values. ``source`` names the record in error messages.
    """
    if len(record) < IR_SIZE:
        raise RecordIOError(f"{source}: record of {len(record)} bytes is shorter than the "
                            f"{IR_SIZE}-byte image header")
    flag, label, rid, rid2 = _IR.unpack_from(record, 0)
    body = memoryview(record)[IR_SIZE:]
    if flag > 0:
        if len(body) < 4 * flag:
            raise RecordIOError(f"{source}: header says {flag} float32 label values follow, but "
                                f"only {len(body)} bytes do")
        label = np.frombuffer(body[:4 * flag], dtype=np.float32).copy()
        body = body[4 * flag:]
    return IRHeader(flag, label, rid, rid2), bytes(body)


# ----------------------------------------------------------------------------------------------
# Framing (dmlc RecordIOWriter::WriteRecord / RecordIOReader::NextRecord)
# ----------------------------------------------------------------------------------------------
def _aligned_magic_positions(data: bytes) -> list[int]:
    positions = []
    pos = data.find(MAGIC_BYTES)
    while pos >= 0:
        if pos % 4 == 0:
            positions.append(pos)
            pos = data.find(MAGIC_BYTES, pos + 4)
        else:
            pos = data.find(MAGIC_BYTES, pos + 1)
    return positions


def frame_record(record: bytes) -> bytes:
    """The bytes dmlc-core's RecordIO writer puts in the ``.rec`` file for one record."""
    record = bytes(record)
    length = len(record)
    if length > MAX_RECORD_LENGTH:
        raise RecordIOError(f"record of {length} bytes exceeds the RecordIO limit of "
                            f"{MAX_RECORD_LENGTH} bytes")
    out = io.BytesIO()
    start = 0
    for pos in _aligned_magic_positions(record):
        cflag = CFLAG_FIRST if start == 0 else CFLAG_MIDDLE
        out.write(_FRAME.pack(MAGIC, (cflag << LENGTH_BITS) | (pos - start)))
        out.write(record[start:pos])
        start = pos + 4
    cflag = CFLAG_LAST if start != 0 else CFLAG_WHOLE
    out.write(_FRAME.pack(MAGIC, (cflag << LENGTH_BITS) | (length - start)))
    out.write(record[start:])
    out.write(b"\0" * (-length % 4))
    return out.getvalue()


# ----------------------------------------------------------------------------------------------
# Writer
# ----------------------------------------------------------------------------------------------
class RecordWriter:
    """Write an indexed RecordIO pack byte for byte as MXNet's ``MXIndexedRecordIO`` does.

    ``write(key, record)`` appends one record (use :func:`pack_record` for image records) and its
    ``key\\toffset`` line to the ``.idx`` file.
    """

    def __init__(self, rec_path: PathLike, idx_path: Optional[PathLike] = None):
        self.rec_path = Path(rec_path)
        self.idx_path = Path(idx_path) if idx_path is not None else default_idx_path(rec_path)
        self.rec_path.parent.mkdir(parents=True, exist_ok=True)
        self.idx_path.parent.mkdir(parents=True, exist_ok=True)
        self._rec = open(self.rec_path, "wb")
        self._idx = open(self.idx_path, "w", newline="\n")
        self._keys: set[int] = set()
        self._offset = 0

    def tell(self) -> int:
        """Byte offset at which the next record will start."""
        return self._offset

    def write(self, key: int, record: bytes) -> None:
        """Append ``record`` under ``key`` (keys must be unique integers)."""
        if self._rec is None:
            raise RecordIOError(f"{self.rec_path}: writer is closed")
        key = int(key)
        if key in self._keys:
            raise RecordIOError(f"{self.rec_path}: key {key} written twice")
        framed = frame_record(record)
        self._rec.write(framed)
        self._idx.write(f"{key}\t{self._offset}\n")
        self._keys.add(key)
        self._offset += len(framed)

    def close(self) -> None:
        if self._rec is not None:
            self._rec.close()
            self._idx.close()
            self._rec = self._idx = None

    def __enter__(self) -> "RecordWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ----------------------------------------------------------------------------------------------
# Reader
# ----------------------------------------------------------------------------------------------
def _rebuild_hint(rec_path: Path) -> str:
    return f"rebuild it with: python convert.py --rebuild_index --rec_path {rec_path}"


def _parse_idx(idx_path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Read a ``.idx`` file into (keys, offsets) int64 arrays, in file order."""
    try:
        raw = idx_path.read_bytes()
    except OSError as exc:
        raise RecordIOError(f"{idx_path}: cannot read index file ({exc.strerror})") from exc
    text = raw.strip()
    lines = text.count(b"\n") + 1 if text else 0
    values = None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            values = np.fromstring(text.decode("ascii"), dtype=np.int64, sep=" ")
    except (UnicodeDecodeError, ValueError, AttributeError):
        pass
    if values is None or values.size != 2 * lines or not _one_tab_per_line(text, lines):
        values = _parse_idx_lines(idx_path, raw)  # slow path: blank lines or an error to report
    pairs = values.reshape(-1, 2)
    return np.ascontiguousarray(pairs[:, 0]), np.ascontiguousarray(pairs[:, 1])


def _one_tab_per_line(text: bytes, lines: int) -> bool:
    buf = np.frombuffer(text, dtype=np.uint8)
    tabs = np.flatnonzero(buf == 9)
    if tabs.size != lines:
        return False
    ends = np.append(np.flatnonzero(buf == 10), buf.size)
    starts = np.concatenate(([0], ends[:-1] + 1))
    return bool(np.all((tabs > starts) & (tabs < ends)))


def _parse_idx_lines(idx_path: Path, raw: bytes) -> np.ndarray:
    values: list[int] = []
    for number, line in enumerate(raw.split(b"\n"), start=1):
        if not line.strip():
            continue
        fields = line.strip().split(b"\t")
        try:
            if len(fields) != 2:
                raise ValueError
            values += [int(fields[0]), int(fields[1])]
        except ValueError:
            raise RecordIOError(f"{idx_path}: line {number} is not '<key>\\t<offset>': "
                                f"{line[:80]!r}") from None
    return np.asarray(values, dtype=np.int64)


class RecordReader:
    """Random access to the records of an indexed RecordIO pack.

    The file is opened lazily, once per process (the owning pid is remembered, and a forked
    DataLoader worker opens its own handle); pickling drops the handle, so the reader can be
    handed to DataLoader workers and DDP processes.
    """

    def __init__(self, rec_path: PathLike, idx_path: Optional[PathLike] = None):
        self.rec_path = Path(rec_path)
        self.idx_path = Path(idx_path) if idx_path is not None else default_idx_path(rec_path)
        if not self.rec_path.is_file():
            raise RecordIOError(f"{self.rec_path}: RecordIO file not found")
        if not self.idx_path.is_file():
            raise RecordIOError(f"{self.idx_path}: index file of {self.rec_path} not found; "
                                f"{_rebuild_hint(self.rec_path)}")
        self.file_size = self.rec_path.stat().st_size
        self._key_array, self._offsets = _parse_idx(self.idx_path)
        self._keys_list: Optional[list[int]] = None
        self._build_lookup()
        self._fd: Optional[int] = None
        self._pid: Optional[int] = None

    # -- key lookup ----------------------------------------------------------------------------
    def _build_lookup(self) -> None:
        keys = self._key_array
        n = keys.size
        self._first_key = int(keys[0]) if n else 0
        self._contiguous = bool(n == 0 or np.array_equal(keys, np.arange(self._first_key,
                                                                          self._first_key + n)))
        if self._contiguous:
            self._sorted_keys = self._sorted_pos = None
        else:
            order = np.argsort(keys, kind="stable")
            self._sorted_keys = keys[order]
            self._sorted_pos = order
            if n > 1 and np.any(self._sorted_keys[1:] == self._sorted_keys[:-1]):
                dup = int(self._sorted_keys[1:][self._sorted_keys[1:] == self._sorted_keys[:-1]][0])
                raise RecordIOError(f"{self.idx_path}: key {dup} is listed more than once")

    def _position(self, key: int) -> int:
        key = int(key)
        if self._contiguous:
            pos = key - self._first_key
            if 0 <= pos < self._key_array.size:
                return pos
        else:
            pos = int(np.searchsorted(self._sorted_keys, key))
            if pos < self._sorted_keys.size and self._sorted_keys[pos] == key:
                return int(self._sorted_pos[pos])
        raise RecordIOError(f"{self.rec_path}: key {key} not found in {self.idx_path} "
                            f"({self._key_array.size} keys)")

    @property
    def keys(self) -> list[int]:
        """All keys, in ``.idx`` order."""
        if self._keys_list is None:
            self._keys_list = self._key_array.tolist()
        return self._keys_list

    @property
    def key_array(self) -> np.ndarray:
        """All keys as an int64 array, in ``.idx`` order."""
        return self._key_array

    @property
    def offsets(self) -> np.ndarray:
        """Byte offset of each record, aligned with :attr:`key_array`."""
        return self._offsets

    def __len__(self) -> int:
        return int(self._key_array.size)

    def __contains__(self, key: object) -> bool:
        try:
            self._position(int(key))  # type: ignore[arg-type]
        except (RecordIOError, TypeError, ValueError):
            return False
        return True

    def offset(self, key: int) -> int:
        """Byte offset of the record ``key`` in the ``.rec`` file."""
        return int(self._offsets[self._position(key)])

    # -- file access ---------------------------------------------------------------------------
    def _file(self) -> int:
        pid = os.getpid()
        if self._fd is None or self._pid != pid:
            # After a fork the inherited descriptor belongs to the parent: open our own.
            flags = os.O_RDONLY | getattr(os, "O_BINARY", 0)
            try:
                self._fd = os.open(self.rec_path, flags)
            except OSError as exc:
                raise RecordIOError(f"{self.rec_path}: cannot open ({exc.strerror})") from exc
            self._pid = pid
        return self._fd

    def _pread(self, size: int, offset: int) -> bytes:
        fd = self._file()
        if hasattr(os, "pread"):
            return os.pread(fd, size, offset)
        os.lseek(fd, offset, os.SEEK_SET)  # pragma: no cover (Windows)
        return os.read(fd, size)  # pragma: no cover

    def _read_part_header(self, offset: int, key: object) -> tuple[int, int]:
        head = self._pread(FRAME_SIZE, offset)
        return self._check_part_header(head, offset, key)

    def _check_part_header(self, head: bytes, offset: int, key: object) -> tuple[int, int]:
        if len(head) < FRAME_SIZE:
            raise RecordIOError(f"{self.rec_path}: key {key}: truncated record at byte offset "
                                f"{offset} (file ends at {self.file_size})")
        magic, lrec = _FRAME.unpack_from(head, 0)
        if magic != MAGIC:
            raise RecordIOError(f"{self.rec_path}: key {key}: no RecordIO magic at byte offset "
                                f"{offset} (found 0x{magic:08x}); the .idx does not match this "
                                f".rec, {_rebuild_hint(self.rec_path)}")
        return lrec >> LENGTH_BITS, lrec & MAX_RECORD_LENGTH

    def read_at(self, offset: int, key: object = "?") -> tuple[bytes, int]:
        """Read the (joined) record that starts at ``offset``; returns it and the next offset."""
        parts = []
        pos = offset
        first = True
        while True:
            cflag, length = self._read_part_header(pos, key)
            if first and cflag not in (CFLAG_WHOLE, CFLAG_FIRST):
                raise RecordIOError(f"{self.rec_path}: key {key}: byte offset {offset} is inside "
                                    f"a multi-part record (continuation flag {cflag})")
            if not first and cflag not in (CFLAG_MIDDLE, CFLAG_LAST):
                raise RecordIOError(f"{self.rec_path}: key {key}: record at byte offset {offset} "
                                    f"is missing its continuation part at offset {pos}")
            data = self._pread(length, pos + FRAME_SIZE) if length else b""
            if len(data) < length:
                raise RecordIOError(f"{self.rec_path}: key {key}: truncated record at byte offset "
                                    f"{pos}: {length} bytes announced, {len(data)} present")
            parts.append(data)
            pos += FRAME_SIZE + length + (-length % 4)
            if cflag in (CFLAG_WHOLE, CFLAG_LAST):
                break
            first = False
        return MAGIC_BYTES.join(parts), pos

    def read(self, key: int) -> bytes:
        """The record stored under ``key`` (multi-part records joined)."""
        return self.read_at(self.offset(key), key)[0]

    def read_prefix(self, key: int, size: int) -> bytes:
        """At least the first ``size`` bytes of record ``key`` (fewer only if it is shorter).

        Used to read image headers without reading the image: one small read in the common case.
        """
        offset = self.offset(key)
        head = self._pread(FRAME_SIZE + size, offset)
        cflag, length = self._check_part_header(head[:FRAME_SIZE], offset, key)
        if cflag == CFLAG_WHOLE:
            want = min(size, length)
            data = head[FRAME_SIZE:FRAME_SIZE + want]
            if len(data) < want:
                raise RecordIOError(f"{self.rec_path}: key {key}: truncated record at byte offset "
                                    f"{offset}: {length} bytes announced, file ends at "
                                    f"{self.file_size}")
            return data
        return self.read_at(offset, key)[0][:size]

    def close(self) -> None:
        if self._fd is not None and self._pid == os.getpid():
            try:
                os.close(self._fd)
            except OSError:  # pragma: no cover
                pass
        self._fd = None
        self._pid = None

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_fd"] = None
        state["_pid"] = None
        state["_keys_list"] = None
        return state

    def __enter__(self) -> "RecordReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # pragma: no cover (interpreter shutdown)
            pass

    def __repr__(self) -> str:
        return f"RecordReader({str(self.rec_path)!r}, {len(self)} records)"


def read_face_record(reader: RecordReader, key: int) -> tuple[IRHeader, bytes]:
    """Header and encoded image bytes of image record ``key``."""
    offset = reader.offset(key)
    record = reader.read_at(offset, key)[0]
    return unpack_record(record, f"{reader.rec_path}: key {key} (byte offset {offset})")


def rebuild_index(rec_path: PathLike, idx_path: Optional[PathLike] = None,
                  show_progress: bool = True) -> int:
    """Scan ``rec_path`` from start to end and write its ``.idx`` (keys 0, 1, 2, ... in file order).

    That is the key numbering of InsightFace's packs and of any pack written with consecutive
    keys. Returns the number of records.
    """
    rec_path = Path(rec_path)
    idx_path = Path(idx_path) if idx_path is not None else default_idx_path(rec_path)
    if not rec_path.is_file():
        raise RecordIOError(f"{rec_path}: RecordIO file not found")
    size = rec_path.stat().st_size
    lines = []
    with open(rec_path, "rb") as f, tqdm(total=size, unit="B", unit_scale=True,
                                         desc=f"indexing {rec_path.name}",
                                         disable=not show_progress) as bar:
        pos = 0
        start = 0
        in_record = False
        while pos < size:
            head = f.read(FRAME_SIZE)
            if len(head) < FRAME_SIZE:
                raise RecordIOError(f"{rec_path}: key {len(lines)}: truncated record header at "
                                    f"byte offset {pos} (file ends at {size})")
            magic, lrec = _FRAME.unpack(head)
            if magic != MAGIC:
                raise RecordIOError(f"{rec_path}: key {len(lines)}: no RecordIO magic at byte "
                                    f"offset {pos} (found 0x{magic:08x})")
            cflag, length = lrec >> LENGTH_BITS, lrec & MAX_RECORD_LENGTH
            if not in_record:
                if cflag not in (CFLAG_WHOLE, CFLAG_FIRST):
                    raise RecordIOError(f"{rec_path}: key {len(lines)}: continuation part without "
                                        f"a first part at byte offset {pos}")
                start = pos
            elif cflag not in (CFLAG_MIDDLE, CFLAG_LAST):
                raise RecordIOError(f"{rec_path}: key {len(lines)}: record at byte offset {start} "
                                    f"is missing its continuation part at offset {pos}")
            step = FRAME_SIZE + length + (-length % 4)
            if pos + step > size:
                raise RecordIOError(f"{rec_path}: key {len(lines)}: truncated record at byte "
                                    f"offset {pos}: {length} bytes announced, file ends at {size}")
            f.seek(pos + step)
            pos += step
            bar.update(step)
            in_record = cflag in (CFLAG_FIRST, CFLAG_MIDDLE)
            if not in_record:
                lines.append(f"{len(lines)}\t{start}\n")
        if in_record:
            raise RecordIOError(f"{rec_path}: key {len(lines)}: truncated multi-part record at "
                                f"byte offset {start}")
    write_atomically(idx_path, lambda f: f.write("".join(lines)), text=True)
    logger.info("wrote %s (%d records)", idx_path, len(lines))
    return len(lines)


# ----------------------------------------------------------------------------------------------
# InsightFace face packs
# ----------------------------------------------------------------------------------------------
def write_face_pack(rec_path: PathLike, samples: Iterable[tuple[int, bytes]],
                    with_header: bool = True) -> int:
    """Write an InsightFace-style face pack from ``(label, encoded image bytes)`` samples.

    Samples must be grouped by label, labels ``0 .. K-1`` in order. With the header, record 0
    has label ``[N+1, N+1+K]``, images are keys ``1 .. N`` (scalar label, ``id`` = key) and
    identity ``c`` is record ``N+1+c`` with label ``[first key, end key)``. Without it, images
    are keys ``0 .. N-1``. The ``.idx`` is written beside (``train.rec`` -> ``train.idx``).
    Returns N.
    """
    rec_path = Path(rec_path)
    key = 1 if with_header else 0
    starts: list[int] = []  # first key of each identity
    with RecordWriter(rec_path) as writer:
        if with_header:
            # Placeholder of the same size, rewritten once N and K are known.
            placeholder = frame_record(pack_record(IRHeader(0, [0.0, 0.0], 0, 0), b""))
            writer.write(0, pack_record(IRHeader(0, [0.0, 0.0], 0, 0), b""))
        for label, image in samples:
            label = int(label)
            if label != len(starts) - 1:
                if label != len(starts):
                    raise ValueError(f"{rec_path}: samples must be grouped by label, labels 0, 1, "
                                     f"2, ... in order; got label {label} after "
                                     f"{len(starts) - 1} (sample {key - int(with_header)})")
                starts.append(key)
            writer.write(key, pack_record(IRHeader(0, float(label), key, 0), image))
            key += 1
        num_images = key - int(with_header)
        if with_header:
            end = key + len(starts)
            if end > _MAX_EXACT_FLOAT32_INT:
                raise RecordIOError(f"{rec_path}: {end} records exceed what a float32 header "
                                    f"label can address exactly; use with_header=False")
            for first, stop in zip(starts, starts[1:] + [key]):
                writer.write(key, pack_record(IRHeader(0, [float(first), float(stop)], 0, 0), b""))
                key += 1
            header = frame_record(pack_record(IRHeader(0, [float(num_images + 1), float(end)],
                                                       0, 0), b""))
            assert len(header) == len(placeholder)
            writer._rec.seek(0)
            writer._rec.write(header)
    return num_images


@dataclass
class FacePackIndex:
    """Record key and integer identity label of every image of a face pack."""

    keys: np.ndarray  # int64, record key of each image
    labels: np.ndarray  # int64, identity of each image
    num_classes: int

    def __len__(self) -> int:
        return int(self.keys.size)


def label_cache_paths(rec_path: PathLike, cache_dir: Optional[PathLike] = None) -> list[Path]:
    """Where the label index of ``rec_path`` is cached, in the order they are tried."""
    rec_path = Path(rec_path).resolve()
    digest = hashlib.sha1(str(rec_path).encode("utf-8")).hexdigest()[:16]
    keyed_name = f"{rec_path.stem}-{digest}.labels.npz"
    if cache_dir is not None:
        return [Path(cache_dir) / keyed_name]
    return [rec_path.with_name(rec_path.stem + ".labels.npz"), user_cache_dir() / keyed_name]


def _source_stamp(rec_path: Path, idx_path: Path) -> np.ndarray:
    rec_stat, idx_stat = rec_path.stat(), idx_path.stat()
    return np.array([rec_stat.st_size, rec_stat.st_mtime_ns, idx_stat.st_size,
                     idx_stat.st_mtime_ns, LABEL_CACHE_VERSION], dtype=np.int64)


def _load_cached(path: Path, stamp: np.ndarray) -> Optional[FacePackIndex]:
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as data:
            if not np.array_equal(data["stamp"], stamp):
                logger.info("label cache %s is stale; rebuilding", path)
                return None
            return FacePackIndex(keys=data["keys"], labels=data["labels"],
                                 num_classes=int(data["num_classes"]))
    except Exception as exc:  # unreadable or foreign cache: rebuild it
        logger.warning("ignoring unreadable label cache %s (%s)", path, exc)
        return None


def _save_cache(path: Path, index: FacePackIndex, stamp: np.ndarray, rec_path: Path) -> bool:
    """Write the label cache; False (the caller tries the next place) where the folder refuses it.
    The temporary file of a killed earlier write is removed first."""
    try:
        remove_temporaries(path.parent, [path.name])
        write_atomically(path, lambda f: np.savez(f, keys=index.keys, labels=index.labels,
                                                  num_classes=index.num_classes, stamp=stamp,
                                                  source=str(rec_path)))
        return True
    except OSError as exc:
        logger.info("could not write label cache %s (%s)", path, exc)
        return False


def _label_of(prefix: bytes, reader: RecordReader, key: int) -> float:
    if len(prefix) < IR_SIZE:
        raise RecordIOError(f"{reader.rec_path}: key {key} (byte offset {reader.offset(key)}): "
                            f"record of {len(prefix)} bytes is shorter than the {IR_SIZE}-byte "
                            f"image header")
    flag, label, _, _ = _IR.unpack_from(prefix, 0)
    if flag > 0:
        if len(prefix) < IR_SIZE + 4:
            raise RecordIOError(f"{reader.rec_path}: key {key} (byte offset "
                                f"{reader.offset(key)}): label array announced but missing")
        label = struct.unpack_from("<f", prefix, IR_SIZE)[0]
    return label


def face_pack_image_keys(reader: RecordReader) -> np.ndarray:
    """Keys of the image records of a face pack, without reading the images.

    With an InsightFace header record (key 0, ``flag > 0``, label ``[a, b]``) the images are keys
    ``1 .. a-1``; otherwise every key of the ``.idx`` is an image.
    """
    if len(reader) and 0 in reader:
        offset = reader.offset(0)
        header, _ = unpack_record(reader.read_prefix(0, IR_SIZE + 8),
                                  f"{reader.rec_path}: key 0 (byte offset {offset})")
        if header.flag > 0:
            if header.flag < 2:
                raise RecordIOError(f"{reader.rec_path}: key 0 (byte offset {offset}): header "
                                    f"record label {header.label} is not an [images end, "
                                    f"identities end] pair")
            end_images, end_ids = float(header.label[0]), float(header.label[1])
            if not (end_images.is_integer() and end_ids.is_integer() and end_ids >= end_images):
                raise RecordIOError(f"{reader.rec_path}: key 0 (byte offset {offset}): header "
                                    f"record label {header.label.tolist()} is not an [images "
                                    f"end, identities end] pair of keys")
            end_images = int(end_images)
            if end_images < 1 or end_images > len(reader):
                raise RecordIOError(f"{reader.rec_path}: key 0 (byte offset {offset}): header "
                                    f"record says images are keys 1..{end_images - 1}, but the "
                                    f"index lists {len(reader)} records")
            return np.arange(1, end_images, dtype=np.int64)
    return reader.key_array.astype(np.int64, copy=True)


def _identity(label: float, source: str) -> int:
    label = float(label)
    if not (label >= 0 and label.is_integer()):
        raise RecordIOError(f"{source}: label {label} is not a non-negative integer identity")
    return int(label)


def image_label(header: IRHeader, source: str = "<record>") -> int:
    """The integer identity of an image record (first value of an array label)."""
    return _identity(header.label if header.flag == 0 else header.label[0], source)


def build_face_pack_index(reader: RecordReader, show_progress: bool = True) -> FacePackIndex:
    """List the images of a face pack and read each one's label (small reads, no payloads)."""
    image_keys = face_pack_image_keys(reader)
    labels = np.empty(image_keys.size, dtype=np.int64)
    for i, key in enumerate(tqdm(image_keys.tolist(), desc=f"indexing labels of "
                                 f"{reader.rec_path.name}", unit="rec", mininterval=1.0,
                                 disable=not show_progress)):
        label = _label_of(reader.read_prefix(key, IR_SIZE + 4), reader, key)
        labels[i] = _identity(label, f"{reader.rec_path}: key {key} (byte offset "
                                     f"{reader.offset(key)})")
    num_classes = int(labels.max()) + 1 if labels.size else 0
    return FacePackIndex(keys=image_keys, labels=labels, num_classes=num_classes)


def load_face_pack_index(rec_path: PathLike, cache_dir: Optional[PathLike] = None,
                         show_progress: bool = True,
                         idx_path: Optional[PathLike] = None) -> FacePackIndex:
    """Keys and labels of every image of a face pack, cached in ``<stem>.labels.npz``.

    The cache lives beside the pack, or (directory not writable) in the user cache
    (:func:`utils.files.user_cache_dir`: ``$ADAFACE_CACHE``, ``$XDG_CACHE_HOME/adaface`` or
    ``~/.cache/adaface``) under a name derived from the pack's absolute path; with ``cache_dir``
    it lives there. It records the size and mtime_ns of the ``.rec`` and ``.idx`` taken before
    they are read (a pack rewritten during indexing is indexed again next time) and is rebuilt,
    with a log line, when they change.
    """
    rec_path = Path(rec_path).resolve()
    idx_path = Path(idx_path) if idx_path is not None else default_idx_path(rec_path)
    if not rec_path.is_file():
        raise RecordIOError(f"{rec_path}: RecordIO file not found")
    if not idx_path.is_file():
        raise RecordIOError(f"{idx_path}: index file of {rec_path} not found; "
                            f"{_rebuild_hint(rec_path)}")
    stamp = _source_stamp(rec_path, idx_path)
    candidates = label_cache_paths(rec_path, cache_dir)
    for path in candidates:
        cached = _load_cached(path, stamp)
        if cached is not None:
            logger.debug("label index of %s loaded from %s", rec_path, path)
            return cached
    with RecordReader(rec_path, idx_path) as reader:
        index = build_face_pack_index(reader, show_progress=show_progress)
    for path in candidates:
        if _save_cache(path, index, stamp, rec_path):
            logger.info("cached the label index of %s in %s", rec_path, path)
            break
    else:
        logger.warning("could not cache the label index of %s anywhere", rec_path)
    return index
