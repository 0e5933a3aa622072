"""Verification pair sets: the public ``.bin`` pickles and the memory-mapped layout of AdaFace.

A ``.bin`` file (``lfw.bin``, ``cfp_fp.bin``, ...) is a pickle of ``(bins, issame_list)``: 2·P encoded
112x112 images (pair ``i`` is images ``2i`` and ``2i+1``) and P booleans.

The memfile layout (kept from the original AdaFace code so that converted folders keep working)::

    <root>/<name>/memfile/mem_file.dat        raw float32, N x 3 x 112 x 112, the network input
    <root>/<name>/memfile/mem_file.dat.conf   JSON {"shape": [N, 3, 112, 112], "dtype": "float32"}
    <root>/<name>_list.npy                    the P booleans

The memfile holds exactly what the network sees: BGR, ``(pixel / 255 - 0.5) / 0.5``
(:func:`utils.image.rgb_to_input_array`). Its ``.conf`` also records the ``.bin`` it was made from
(:func:`utils.files.source_stamp`): :func:`ensure_memfile` rebuilds a memfile whose ``.bin`` changed
and, when the folder is read-only, converts into the user cache (:func:`memfile_cache_root`)
instead; :func:`locate_memfile` finds the up-to-date one.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
from multiprocessing import Pool
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
from tqdm import tqdm

from utils.errors import UserError
from utils.files import (interruption_point, is_access_error, is_writable_folder,
                         remove_temporaries, settled_stamp, source_stamp, stamp_change,
                         user_cache_dir, write_atomically)
from utils.image import (INPUT_SIZE, ImageDecodeError, check_input_size, decode_image_bytes,
                         rgb_to_input_array, swap_red_blue)

logger = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]

VAL_SET_NAMES = ("agedb_30", "cfp_fp", "lfw", "cplfw", "calfw")
MEMFILE_SHAPE_TAIL = (3, INPUT_SIZE, INPUT_SIZE)
MEMFILE_DTYPE = "float32"


class PairSetError(UserError, ValueError):
    """A pair-set file (``.bin`` or memfile) is missing, malformed or inconsistent."""


# ----------------------------------------------------------------------------------------------
# .bin pickles
# ----------------------------------------------------------------------------------------------
class _PairSetUnpickler(pickle.Unpickler):
    """Unpickler that only rebuilds the types a pair-set file can hold (no arbitrary code)."""

    _ALLOWED = {
        ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy", "bool_"),
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
        ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
        ("_codecs", "encode"), ("builtins", "bytearray"), ("copy_reg", "_reconstructor"),
        ("copyreg", "_reconstructor"), ("__builtin__", "object"), ("builtins", "object"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}: a pair-set file "
                                         f"holds only image bytes and booleans")
        return super().find_class(module, name)


def _as_bytes(item: object, index: int, path: Path) -> bytes:
    if isinstance(item, bytes):
        return item
    if isinstance(item, (bytearray, memoryview)):
        return bytes(item)
    if isinstance(item, np.ndarray) and item.dtype == np.uint8 and item.ndim == 1:
        return item.tobytes()
    if isinstance(item, str):  # written by Python 2 and loaded without encoding='bytes'
        return item.encode("latin-1")
    raise PairSetError(f"{path}: image {index} is a {type(item).__name__}, expected encoded "
                       f"image bytes")


def load_pair_bin(path: PathLike) -> tuple[list[bytes], np.ndarray]:
    """Read a ``.bin`` pair set: (2·P encoded images, P booleans ``issame``)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: pair-set file not found")
    try:
        with open(path, "rb") as f:
            content = _PairSetUnpickler(f, encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError,
            ImportError, IndexError, KeyError, MemoryError) as exc:
        raise PairSetError(f"{path}: not a readable pair-set pickle ({type(exc).__name__}: "
                           f"{exc})") from exc
    if not isinstance(content, (tuple, list)) or len(content) != 2:
        raise PairSetError(f"{path}: expected a pickled (images, issame) pair, got "
                           f"{type(content).__name__}")
    bins, issame = content
    if not isinstance(bins, (list, tuple, np.ndarray)):
        raise PairSetError(f"{path}: the images are a {type(bins).__name__}, expected a list")
    images = [_as_bytes(item, i, path) for i, item in enumerate(bins)]
    try:
        issame_arr = np.asarray(issame)
    except Exception as exc:  # pragma: no cover
        raise PairSetError(f"{path}: issame list is not an array of booleans ({exc})") from exc
    if issame_arr.ndim != 1 or not (issame_arr.dtype == np.bool_ or
                                    np.issubdtype(issame_arr.dtype, np.integer)):
        raise PairSetError(f"{path}: issame must be a list of booleans, got dtype "
                           f"{issame_arr.dtype} and shape {issame_arr.shape}")
    if issame_arr.dtype != np.bool_:
        if not np.isin(issame_arr, (0, 1)).all():
            raise PairSetError(f"{path}: issame holds values other than 0/1")
        issame_arr = issame_arr.astype(bool)
    if len(images) != 2 * len(issame_arr):
        raise PairSetError(f"{path}: {len(images)} images for {len(issame_arr)} pairs; a pair "
                           f"set holds exactly 2 images per pair")
    return images, issame_arr


def write_pair_bin(path: PathLike, images: Sequence[bytes], issame: Sequence[bool]) -> None:
    """Write a ``.bin`` pair set in the public layout: a pickled ``(list of bytes, list of bool)``."""
    path = Path(path)
    images = [bytes(img) for img in images]
    flags = [bool(x) for x in issame]
    if len(images) != 2 * len(flags):
        raise ValueError(f"{path}: {len(images)} images for {len(flags)} pairs; need 2 per pair")
    write_atomically(path, lambda f: pickle.dump((images, flags), f, protocol=4))


# ----------------------------------------------------------------------------------------------
# Memfiles
# ----------------------------------------------------------------------------------------------
def memfile_paths(root: PathLike, name: str) -> tuple[Path, Path, Path]:
    """``(mem_file.dat, mem_file.dat.conf, <name>_list.npy)`` of pair set ``name`` under ``root``."""
    root = Path(root)
    dat = root / name / "memfile" / "mem_file.dat"
    return dat, dat.with_name(dat.name + ".conf"), root / f"{name}_list.npy"


def _convert_hint(root: Path) -> str:
    return f"create it with: python convert.py --rec_path {root} --make_validation_memfiles"


def open_memfile(root: PathLike, name: str) -> tuple[np.memmap, np.ndarray]:
    """Open pair set ``name``: read-only memmap ``(N, 3, 112, 112)`` float32 and ``issame`` (P,)."""
    root = Path(root)
    dat, conf, lst = memfile_paths(root, name)
    for path in (dat, conf, lst):
        if not path.is_file():
            raise FileNotFoundError(f"{path}: memfile of pair set '{name}' not found; "
                                    f"{_convert_hint(root)}")
    try:
        config = json.loads(conf.read_text())
        shape = tuple(int(s) for s in config["shape"])
        dtype = np.dtype(config["dtype"])
    except (ValueError, KeyError, TypeError) as exc:
        raise PairSetError(f"{conf}: not a memfile description with 'shape' and 'dtype' "
                           f"({exc})") from exc
    if len(shape) != 4 or shape[1:] != MEMFILE_SHAPE_TAIL or dtype != np.float32:
        raise PairSetError(f"{conf}: expected shape (N, 3, 112, 112) float32, found {shape} "
                           f"{dtype}")
    expected = int(np.prod(shape)) * dtype.itemsize
    actual = dat.stat().st_size
    if actual != expected:
        raise PairSetError(f"{dat}: {actual} bytes, but {conf.name} describes {shape} {dtype} "
                           f"= {expected} bytes; the conversion was interrupted, "
                           f"{_convert_hint(root)}")
    try:
        issame = np.load(lst, allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise PairSetError(f"{lst}: not a readable .npy file ({exc})") from exc
    if issame.ndim != 1 or 2 * issame.size != shape[0]:
        raise PairSetError(f"{lst}: {issame.size} pairs, but {dat} holds {shape[0]} images "
                           f"(need 2 per pair)")
    data = np.memmap(dat, mode="r", dtype=dtype, shape=shape)
    return data, issame.astype(bool, copy=False)


def memfile_exists(root: PathLike, name: str) -> bool:
    """Whether a complete, consistent memfile of ``name`` exists under ``root``."""
    try:
        data, _ = open_memfile(root, name)
    except (OSError, PairSetError):
        return False
    del data
    return True


def _read_conf(conf: Path) -> dict:
    try:
        return json.loads(conf.read_text())
    except (OSError, ValueError):
        return {}


def _decode_one(args: tuple[bytes, str, bool]) -> np.ndarray:
    data, source, swap = args
    rgb = decode_image_bytes(data, source)
    check_input_size(rgb, source)
    if swap:
        rgb = swap_red_blue(rgb)
    return rgb_to_input_array(rgb)


def bin_to_memfile(bin_path: PathLike, root: PathLike, name: Optional[str] = None,
                   swap_color_channel: bool = False, show_progress: bool = True,
                   num_workers: int = 0) -> Path:
    """Convert a ``.bin`` pair set into the memfile layout under ``root``; returns the ``.dat`` path.

    Every image is decoded to RGB (it must be 112x112), red and blue are exchanged first when
    ``swap_color_channel`` (a source whose images hold them swapped), then turned into the
    network input with :func:`utils.image.rgb_to_input_array`. ``num_workers > 0`` decodes in
    that many processes. The ``.conf`` is written last, with the record of the ``.bin``
    (:func:`utils.files.source_stamp`), so an interrupted conversion is never mistaken for a
    complete one; the temporary files a killed conversion left are removed first.
    """
    bin_path = Path(bin_path)
    root = Path(root)
    name = name or bin_path.name.split(".")[0]
    if not bin_path.is_file():
        raise FileNotFoundError(f"{bin_path}: pair-set file not found")
    stamp = source_stamp([bin_path], base=bin_path.parent)  # before reading: changes show
    images, issame = load_pair_bin(bin_path)
    dat, conf, lst = memfile_paths(root, name)
    dat.parent.mkdir(parents=True, exist_ok=True)
    if conf.exists():
        conf.unlink()  # mark incomplete until done
    remove_temporaries(dat.parent, [conf.name])
    remove_temporaries(root, [lst.name])
    shape = (len(images),) + MEMFILE_SHAPE_TAIL
    tmp = dat.with_name(dat.name + ".tmp")
    mm = np.memmap(tmp, mode="w+", dtype=MEMFILE_DTYPE, shape=shape) if len(images) else None
    tasks = ((img, f"{bin_path}: image {i}", swap_color_channel) for i, img in enumerate(images))
    bar = tqdm(total=len(images), desc=f"{name} -> memfile", unit="img",
               disable=not show_progress)
    try:
        if num_workers > 0 and len(images) > 1:
            with Pool(num_workers) as pool:
                for i, arr in enumerate(pool.imap(_decode_one, tasks, chunksize=64)):
                    mm[i] = arr
                    bar.update()
        else:
            for i, task in enumerate(tasks):
                mm[i] = _decode_one(task)
                bar.update()
                interruption_point("memfile")
    except BaseException as exc:
        bar.close()
        del mm
        tmp.unlink(missing_ok=True)
        if isinstance(exc, (ImageDecodeError, ValueError)) and not isinstance(exc, PairSetError):
            raise PairSetError(str(exc)) from exc
        raise
    bar.close()
    if mm is not None:
        mm.flush()
        del mm
    if not len(images):
        tmp.write_bytes(b"")
    os.replace(tmp, dat)
    write_atomically(lst, lambda f: np.save(f, issame.astype(bool)))
    config = {"shape": list(shape), "dtype": MEMFILE_DTYPE,
              "source": str(bin_path), "swap_color_channel": bool(swap_color_channel),
              "source_stamp": stamp}
    write_atomically(conf, lambda f: f.write(json.dumps(config).encode("utf-8")))
    logger.info("wrote %s (%d images, %d pairs)", dat, len(images), len(issame))
    return dat


def memfile_change(root: PathLike, name: str, bin_path: Optional[PathLike] = None,
                   swap_color_channel: bool = False) -> Optional[str]:
    """Why the memfile of ``name`` under ``root`` cannot be used as it is (a phrase for a log
    line), or None when it is complete, made with this colour setting and from ``bin_path`` as it
    is now (when given and present).

    The check is a ``stat`` of the ``.bin`` (:func:`utils.files.stamp_change`); a record that
    needed a content hash (the ``.bin`` was new at conversion) is replaced, where the folder can
    be written, by a plain one once the ``.bin`` settled. Memfiles that record no source (the
    original AdaFace code's, or older ones of this project) count as made without the swap, and
    as stale only when the ``.bin`` is newer than their ``.conf``.
    """
    _, conf, _ = memfile_paths(root, name)
    try:
        data, _ = open_memfile(root, name)
        del data
    except FileNotFoundError:
        return "there is none"
    except (OSError, PairSetError) as exc:
        return f"it is incomplete or unreadable ({exc})"
    config = _read_conf(conf)
    if bool(config.get("swap_color_channel", False)) != bool(swap_color_channel):
        return (f"it was made with swap_color_channel="
                f"{bool(config.get('swap_color_channel', False))}")
    if bin_path is None or not Path(bin_path).is_file():
        return None
    bin_path = Path(bin_path)
    if "source_stamp" not in config:
        if bin_path.stat().st_mtime_ns > conf.stat().st_mtime_ns:
            return f"{bin_path.name} is newer than the memfile"
        return None
    reason = stamp_change(config["source_stamp"], [bin_path], base=bin_path.parent)
    settled = settled_stamp(config["source_stamp"], [bin_path], base=bin_path.parent)
    if reason is None and settled is not None:
        try:
            write_atomically(conf, lambda f: f.write(json.dumps(
                {**config, "source_stamp": settled}).encode("utf-8")))
        except OSError as exc:  # a read-only folder keeps checking by content
            logger.debug("could not update %s (%s)", conf, exc)
    return reason


def memfile_matches(root: PathLike, name: str, swap_color_channel: bool = False,
                    bin_path: Optional[PathLike] = None) -> bool:
    """Whether a complete memfile of ``name`` exists, made with this colour setting (and from
    ``bin_path`` as it is now, when given): :func:`memfile_change` found nothing."""
    return memfile_change(root, name, bin_path, swap_color_channel) is None


def memfile_cache_root(root: PathLike) -> Path:
    """Where the memfiles of the pair sets in ``root`` go when ``root`` is read-only:
    ``<user cache>/pairsets/<folder name>-<hash of its absolute path>`` (:func:`utils.files.
    user_cache_dir`, ``$ADAFACE_CACHE`` first)."""
    root = Path(root).resolve()
    digest = hashlib.sha1(str(root).encode("utf-8")).hexdigest()[:16]
    return user_cache_dir() / "pairsets" / f"{root.name}-{digest}"


def locate_memfile(root: PathLike, name: str, swap_color_channel: bool = False
                   ) -> Optional[Path]:
    """The folder holding an up-to-date memfile of ``name`` for the pair sets in ``root``:
    ``root`` itself, else its cache folder (:func:`memfile_cache_root`); None if neither."""
    bin_path = Path(root) / f"{name}.bin"
    if memfile_change(root, name, bin_path, swap_color_channel) is None:
        return Path(root)
    if bin_path.is_file():
        cache = memfile_cache_root(root)
        if memfile_change(cache, name, bin_path, swap_color_channel) is None:
            return cache
    return None


def ensure_memfile(bin_path: PathLike, root: PathLike, name: Optional[str] = None,
                   swap_color_channel: bool = False, show_progress: bool = True
                   ) -> tuple[Path, bool]:
    """An up-to-date memfile of ``bin_path`` under ``root``: reused, or (re)built with a log line
    saying why. A ``root`` that cannot be written (read-only data) gets it in its cache folder
    (:func:`memfile_cache_root`) instead. Returns ``(the folder holding it, whether converted)``.
    """
    bin_path, root = Path(bin_path), Path(root)
    name = name or bin_path.name.split(".")[0]
    reason = memfile_change(root, name, bin_path, swap_color_channel)
    if reason is None:
        return root, False
    if not is_writable_folder(root):
        logger.info("%s is not writable: using a memfile of %s in %s", root, bin_path.name,
                    memfile_cache_root(root))
        return _ensure_cached(bin_path, root, name, swap_color_channel, show_progress)
    if reason == "there is none":
        logger.info("converting %s to a memfile", bin_path)
    else:
        logger.info("rebuilding the memfile of %s: %s", bin_path, reason)
    try:
        bin_to_memfile(bin_path, root, name, swap_color_channel, show_progress=show_progress)
    except OSError as exc:
        if not is_access_error(exc):
            raise
        logger.info("cannot write the memfile of %s in %s (%s): using %s instead", bin_path.name,
                    root, exc, memfile_cache_root(root))
        return _ensure_cached(bin_path, root, name, swap_color_channel, show_progress)
    return root, True


def _ensure_cached(bin_path: Path, root: Path, name: str, swap_color_channel: bool,
                   show_progress: bool) -> tuple[Path, bool]:
    cache = memfile_cache_root(root)
    reason = memfile_change(cache, name, bin_path, swap_color_channel)
    if reason is None:
        return cache, False
    if reason != "there is none":
        logger.info("rebuilding the cached memfile of %s: %s", bin_path, reason)
    bin_to_memfile(bin_path, cache, name, swap_color_channel, show_progress=show_progress)
    return cache, True
