"""Lightning's own checkpoint reads, made safe: a ``CheckpointIO`` plugin that reads every file
through :func:`utils.checkpoint.read_checkpoint`.

``main.py`` gives it to ``pl.Trainer``, so resuming (``trainer.fit(ckpt_path=...)``) and testing
the best checkpoint (``trainer.test(ckpt_path=...)``) unpickle with the same allowlist as every
other entry point and refuse anything else unless ``--trust_checkpoint`` was given. (Lightning
alone would hand the file to ``torch.load`` with ``weights_only=None``, which
``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1`` turns into the full unpickler.) Writing is Lightning's own,
except for checkpoints that hold *deferred* tensors (:func:`deferred_tensor`: the sharded head's
full kernel and momentum, gathered into a file on disk instead of into memory): those are written
without an in-memory copy of the file (see :func:`save_with_deferred_tensors`).
"""
from __future__ import annotations

import logging
import os
import tempfile
import uuid
import weakref
import zipfile
import zlib
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Tuple

import torch
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO

from utils.checkpoint import PathLike, read_checkpoint

logger = logging.getLogger(__name__)

_DEFERRED: Dict[int, Tuple[str, int]] = {}   # placeholder data_ptr -> (raw file, bytes)
_COPY_BYTES = 64 * 1024 ** 2                 # raw file -> checkpoint in pieces of this size


def deferred_tensor(shape: Tuple[int, ...], raw_path: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A placeholder of ``shape`` whose content is the raw (row-major, native byte order) file
    ``raw_path``: :func:`save_with_deferred_tensors` writes the file's bytes in its place. The
    placeholder's memory is never written (untouched pages cost no resident memory); the file is
    deleted once the placeholder is garbage (or after the save)."""
    placeholder = torch.empty(shape, dtype=dtype)
    nbytes = placeholder.numel() * placeholder.element_size()
    if os.path.getsize(raw_path) != nbytes:
        raise ValueError(f"{raw_path}: holds {os.path.getsize(raw_path)} bytes, {shape} needs {nbytes}")
    key = placeholder.data_ptr()
    _DEFERRED[key] = (raw_path, nbytes)
    weakref.finalize(placeholder, _forget, key, raw_path)
    return placeholder


def _forget(key: int, raw_path: str) -> None:
    if _DEFERRED.get(key, (None,))[0] == raw_path:
        del _DEFERRED[key]
    try:
        os.unlink(raw_path)
    except FileNotFoundError:
        pass


def _deferred_in(obj: Any, found: Dict[int, torch.Tensor]) -> Dict[int, torch.Tensor]:
    if torch.is_tensor(obj):
        if obj.numel() and obj.data_ptr() in _DEFERRED:
            found[obj.data_ptr()] = obj
    elif isinstance(obj, dict):
        for value in obj.values():
            _deferred_in(value, found)
    elif isinstance(obj, (list, tuple)):
        for value in obj:
            _deferred_in(value, found)
    return found


def _record_data_offsets(path: str) -> Dict[str, Tuple[int, int]]:
    """``{record name: (offset of its data in the file, size)}`` of a torch zip checkpoint
    (records are stored uncompressed)."""
    offsets = {}
    with open(path, "rb") as f, zipfile.ZipFile(f) as archive:
        for info in archive.infolist():
            f.seek(info.header_offset + 26)
            name_len, extra_len = int.from_bytes(f.read(2), "little"), int.from_bytes(f.read(2), "little")
            offsets[info.filename] = (info.header_offset + 30 + name_len + extra_len, info.file_size)
    return offsets


def _write_crc32s(path: str) -> None:
    """Fill in the CRC-32 of every record of the torch zip file ``path`` (written with CRC-32s
    off): in its data descriptor and its central-directory entry, where ``torch.save`` puts them.
    Reads the file once, in pieces."""
    with open(path, "r+b") as f:
        with zipfile.ZipFile(f) as archive:
            infos, central = archive.infolist(), archive.start_dir
        data = _record_data_offsets(path)
        for info in infos:
            offset, size = data[info.filename]
            crc, done = 0, 0
            f.seek(offset)
            while done < size:
                piece = f.read(min(_COPY_BYTES, size - done))
                if not piece:
                    raise RuntimeError(f"{path}: record {info.filename} ends early")
                crc, done = zlib.crc32(piece, crc), done + len(piece)
            packed = crc.to_bytes(4, "little")
            if info.flag_bits & 0x08:                      # data descriptor after the data
                f.seek(offset + size)
                f.seek(offset + size + (4 if f.read(4) == b"PK\x07\x08" else 0))
                f.write(packed)
            else:
                f.seek(info.header_offset + 14)
                f.write(packed)
            f.seek(central)                                # this record's central-directory entry
            if f.read(4) != b"PK\x01\x02":
                raise RuntimeError(f"{path}: unexpected zip central directory")
            f.seek(central + 16)
            f.write(packed)
            f.seek(central + 28)
            lengths = f.read(6)
            central += 46 + sum(int.from_bytes(lengths[i:i + 2], "little") for i in (0, 2, 4))


def save_with_deferred_tensors(checkpoint: dict, path: PathLike) -> bool:
    """Write ``checkpoint`` to ``path`` with every deferred tensor's raw file copied in place of its
    placeholder, piece by piece; False (nothing written) when it holds no deferred tensor.

    ``torch.save`` writes the placeholders' (untouched, zero) pages straight to a temporary file
    beside ``path`` (CRC-32s off: the records are patched afterwards, then every CRC-32 is computed
    and filled in, so zip tools can verify the file); each placeholder's record is found by a random 16-byte tag written into its first
    bytes, overwritten with the raw file in pieces of 64 MiB, and the file renamed onto ``path``.
    Resident memory: the checkpoint's other tensors and one piece (no copy of the whole file, as
    Lightning's in-memory buffer would hold)."""
    found = _deferred_in(checkpoint, {})
    if not found:
        return False
    tags = {}
    for key, tensor in found.items():
        tag = uuid.uuid4().bytes
        tensor.view(-1).view(torch.uint8)[:16].copy_(torch.frombuffer(bytearray(tag), dtype=torch.uint8))
        tags[tag] = key
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")  # utils.files naming
    os.close(fd)
    crc = torch.serialization.get_crc32_options()
    try:
        torch.serialization.set_crc32_options(False)
        torch.save(checkpoint, tmp)
        torch.serialization.set_crc32_options(crc)
        patched = 0
        with open(tmp, "r+b") as out:
            for offset, size in _record_data_offsets(tmp).values():
                if size < 16:
                    continue
                out.seek(offset)
                key = tags.get(out.read(16))
                if key is None:
                    continue
                raw_path, nbytes = _DEFERRED[key]
                if nbytes != size:
                    raise RuntimeError(f"{tmp}: a deferred record holds {size} bytes, expected {nbytes}")
                with open(raw_path, "rb") as raw:
                    out.seek(offset)
                    while True:
                        piece = raw.read(_COPY_BYTES)
                        if not piece:
                            break
                        out.write(piece)
                patched += 1
        if patched != len(found):
            raise RuntimeError(f"{tmp}: found {patched} of the {len(found)} deferred records")
        _write_crc32s(tmp)
        with open(tmp, "r+b") as out:
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    finally:
        torch.serialization.set_crc32_options(crc)
    logger.debug("wrote %s with %d deferred tensor(s)", path, len(found))
    return True


class SafeCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` whose loads go through :func:`read_checkpoint` (on the CPU; Lightning
    moves the state to the model's device); ``trust=True`` allows the full unpickler."""

    def __init__(self, trust: bool = False, mmap: bool = False) -> None:
        super().__init__()
        self.trust = trust
        self.mmap = mmap

    def save_checkpoint(self, checkpoint: dict[str, Any], path: PathLike,
                        storage_options: Optional[Any] = None) -> None:
        """Lightning's save, or :func:`save_with_deferred_tensors` when ``checkpoint`` holds
        deferred tensors (the sharded head's)."""
        if storage_options is not None or not save_with_deferred_tensors(checkpoint, path):
            super().save_checkpoint(checkpoint, path, storage_options)

    def load_checkpoint(self, path: PathLike, map_location: Optional[Callable] = None,
                        weights_only: Optional[bool] = None) -> dict[str, Any]:
        """Read ``path`` safely; ``map_location`` and ``weights_only`` are Lightning's and ignored:
        files are read to the CPU, and whether to trust them is this plugin's ``trust``. With
        ``mmap`` the tensors map the file (the reader must copy what it keeps: the sharded head
        takes its columns, then copies the rest, in ``Trainer.on_load_checkpoint``)."""
        return read_checkpoint(path, trust=self.trust, mmap=self.mmap)
