"""Convert between the public face-data formats and the layouts training reads.

Usage::

    python convert.py --rec_path <root>/faces_emore            # both steps below
    python convert.py --rec_path <root>/faces_emore --make_image_files
    python convert.py --rec_path <root>/faces_emore --make_validation_memfiles
    python convert.py --rebuild_index --rec_path <root>/faces_emore/train.rec
    python convert.py --make_record --image_folder <dir> --rec_path <out_dir>

Image files are written in true colours, exactly the JPEG bytes stored in the pack; the
validation memfiles hold the network input (BGR, ``(pixel/255 - 0.5)/0.5``). Every step can be
interrupted and rerun: finished outputs are skipped.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
import textwrap
import time
from multiprocessing import Pool
from pathlib import Path
from typing import Iterable, Iterator, Optional, Sequence

import numpy as np
from prettytable import PrettyTable
from tqdm import tqdm

from utils.cli import run_cli
from utils.errors import UserError
from utils.files import (interruption_point, is_access_error, is_writable_folder,
                         remove_temporaries, settled_stamp, source_stamp, stamp_change,
                         write_atomically)
from utils.image import (IMAGE_EXTENSIONS, check_input_size, decode_image_bytes,
                         encode_jpeg, is_image_file, swap_red_blue)
from utils.pairsets import bin_to_memfile, memfile_change
from utils.recordio import (RecordReader, default_idx_path, face_pack_image_keys,
                            image_label, load_face_pack_index, read_face_record, rebuild_index,
                            write_face_pack)

logger = logging.getLogger("convert")

SWAPPED_JPEG_QUALITY = 100
CHUNK = 256
INFO_NAME = ".convert_info.json"
PACK_RECORD_NAME = "train.source.json"
_OUR_IMAGE_NAME = re.compile(r"^(\d+)\.(jpg|png)$")


class ConvertError(UserError):
    """A conversion cannot proceed (the message says why and what to do)."""


class Summary:
    """Rows of the closing table: step, written, skipped, total, seconds."""

    def __init__(self) -> None:
        self.rows: list[tuple[str, int, int, int, float]] = []

    def add(self, step: str, written: int, skipped: int, seconds: float) -> None:
        self.rows.append((step, written, skipped, written + skipped, seconds))

    def table(self) -> PrettyTable:
        table = PrettyTable(["step", "written", "skipped", "total", "seconds"])
        for step, written, skipped, total, seconds in self.rows:
            table.add_row([step, written, skipped, total, f"{seconds:.1f}"])
        table.align["step"] = "l"
        return table


def _chunks(items: Sequence, size: int) -> Iterator[Sequence]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


def _image_extension(data: bytes) -> str:
    return ".png" if data[:8] == b"\x89PNG\r\n\x1a\n" else ".jpg"


# ----------------------------------------------------------------------------------------------
# RecordIO -> image folders
# ----------------------------------------------------------------------------------------------
_unpack_state: dict = {}


def _init_unpack(reader: RecordReader, out_dir: Path, swap: bool, overwrite: bool) -> None:
    _unpack_state.update(reader=reader, out_dir=out_dir, swap=swap, overwrite=overwrite,
                         made_dirs=set())


def _unpack_chunk(keys: Sequence[int]) -> tuple[int, int]:
    """Write the images of ``keys``; returns (written, skipped)."""
    reader: RecordReader = _unpack_state["reader"]
    out_dir: Path = _unpack_state["out_dir"]
    swap: bool = _unpack_state["swap"]
    overwrite: bool = _unpack_state["overwrite"]
    made_dirs: set = _unpack_state["made_dirs"]
    written = skipped = 0
    for key in keys:
        source = f"{reader.rec_path}: key {key}"
        header, image = read_face_record(reader, key)
        label = image_label(header, source)
        label_dir = out_dir / str(label)
        if label not in made_dirs:
            label_dir.mkdir(parents=True, exist_ok=True)
            made_dirs.add(label)
        if swap:
            path = label_dir / f"{key}.jpg"
            if not overwrite and path.is_file() and path.stat().st_size > 0:
                skipped += 1
                continue
            rgb = swap_red_blue(decode_image_bytes(image, source))
            data = encode_jpeg(rgb, quality=SWAPPED_JPEG_QUALITY)
            write_atomically(path, lambda f: f.write(data))
        else:
            path = label_dir / f"{key}{_image_extension(image)}"
            if not overwrite and path.is_file() and path.stat().st_size == len(image):
                skipped += 1
                continue
            write_atomically(path, lambda f: f.write(image))
        written += 1
    return written, skipped


def _read_info(info_path: Path) -> dict:
    try:
        info = json.loads(info_path.read_text()) if info_path.is_file() else {}
    except ValueError:
        info = {}
    return info if isinstance(info, dict) else {}


def _write_info(info_path: Path, info: dict) -> None:
    write_atomically(info_path, lambda f: f.write(json.dumps(info) + "\n"), text=True)


def _unpack_mode(info_path: Path, previous: dict, swap: bool, sources: list[Path],
                 overwrite: bool) -> Optional[str]:
    """How to treat the files already in the folder: None (keep the complete ones),
    ``"rewrite"`` (rewrite every file) or ``"rebuild"`` (the pack changed: rewrite every file
    and remove those it no longer holds). Refuses to mix colour settings without --overwrite."""
    if not previous:
        return "rewrite" if overwrite else None
    if previous.get("swap_color_channel") not in (None, swap) and not overwrite:
        raise ConvertError(
            f"{info_path.parent} was written with swap_color_channel="
            f"{previous['swap_color_channel']}; rerun with the same setting, or add "
            f"--overwrite to rewrite every file")
    if previous.get("mode") == "rebuild":
        logger.info("%s: continuing the interrupted rebuild", info_path.parent)
        return "rebuild"
    if "source_stamp" in previous:
        reason = stamp_change(previous["source_stamp"], sources, base=sources[0].parent)
        if reason is not None:
            logger.info("rebuilding %s: %s", info_path.parent, reason)
            return "rebuild"
    if overwrite or previous.get("mode") == "rewrite":
        return "rewrite"
    return None


def _prune(out_dir: Path, keys: np.ndarray, labels: np.ndarray) -> int:
    """Remove the image files named like ours (``<label>/<key>.jpg|png``) that the pack does not
    hold under that label any more, and label folders left empty; returns how many files."""
    label_of = dict(zip(keys.tolist(), labels.tolist()))
    removed = 0
    for folder in (p for p in out_dir.iterdir() if p.is_dir() and p.name.isdigit()):
        for path in folder.iterdir():
            match = _OUR_IMAGE_NAME.match(path.name)
            if match and label_of.get(int(match.group(1))) != int(folder.name):
                path.unlink()
                removed += 1
        if not any(folder.iterdir()):
            folder.rmdir()
    if removed:
        logger.info("removed %d image file(s) of %s that the pack no longer holds", removed, out_dir)
    return removed


def make_image_files(rec_path: Path, swap_color_channel: bool, num_workers: int,
                     overwrite: bool = False, show_progress: bool = True) -> tuple[int, int]:
    """Unpack ``<rec_path>/train.rec`` into ``<rec_path>/imgs/<label>/<key>.jpg``.

    ``imgs/.convert_info.json`` records the pack (:func:`utils.files.source_stamp` of
    ``train.rec`` and ``train.idx``), the colour setting and whether the run finished. A rerun
    resumes (complete files are kept, the temporaries a killed run left removed); after the pack
    changed, every file is rewritten and those the pack no longer holds are removed.
    """
    rec_file = rec_path / "train.rec"
    sources = [rec_file, default_idx_path(rec_file)]
    stamp_now = source_stamp(sources, base=rec_path, hash_racy=False)
    reader = RecordReader(rec_file)
    keys = face_pack_image_keys(reader).tolist()
    out_dir = rec_path / "imgs"
    info_path = out_dir / INFO_NAME
    previous = _read_info(info_path)
    mode = _unpack_mode(info_path, previous, bool(swap_color_channel), sources, overwrite)
    if out_dir.is_dir() and not previous.get("complete", False):
        for folder in [out_dir] + [p for p in out_dir.iterdir() if p.is_dir()]:
            remove_temporaries(folder)
    info = {"source": str(rec_file.resolve()), "swap_color_channel": bool(swap_color_channel),
            "source_stamp": stamp_now, "mode": mode, "complete": False}
    _write_info(info_path, info)
    written = skipped = 0
    bar = tqdm(total=len(keys), desc="train.rec -> imgs/", unit="img", disable=not show_progress)
    chunks = list(_chunks(keys, CHUNK))
    rewrite = mode is not None
    try:
        if num_workers > 1 and len(chunks) > 1:
            with Pool(num_workers, initializer=_init_unpack,
                      initargs=(reader, out_dir, swap_color_channel, rewrite)) as pool:
                for (w, s), chunk in zip(pool.imap(_unpack_chunk, chunks), chunks):
                    written, skipped = written + w, skipped + s
                    bar.update(len(chunk))
        else:
            _init_unpack(reader, out_dir, swap_color_channel, rewrite)
            for chunk in chunks:
                w, s = _unpack_chunk(chunk)
                written, skipped = written + w, skipped + s
                bar.update(len(chunk))
    finally:
        bar.close()
        reader.close()
    if mode == "rebuild":
        index = load_face_pack_index(rec_file, show_progress=show_progress)
        _prune(out_dir, index.keys, index.labels)
    _write_info(info_path, {**info, "mode": None, "complete": True})
    return written, skipped


# ----------------------------------------------------------------------------------------------
# .bin -> memfiles
# ----------------------------------------------------------------------------------------------
def find_pair_bins(rec_path: Path) -> list[Path]:
    return sorted(p for p in rec_path.glob("*.bin") if p.is_file())


def make_validation_memfiles(rec_path: Path, swap_color_channel: bool, num_workers: int,
                             overwrite: bool = False,
                             show_progress: bool = True) -> tuple[list[str], list[str]]:
    """Turn every ``*.bin`` in ``rec_path`` into ``<rec_path>/<name>/memfile``; (written, skipped).

    A complete memfile made from the ``.bin`` as it is now, with this colour setting, is kept;
    any other is rebuilt, with a log line saying why."""
    written, skipped = [], []
    for bin_path in find_pair_bins(rec_path):
        name = bin_path.name.split(".")[0]
        reason = "--overwrite" if overwrite else memfile_change(rec_path, name, bin_path,
                                                                swap_color_channel)
        if reason is None:
            skipped.append(name)
            continue
        if reason != "there is none":
            logger.info("rebuilding the memfile of %s: %s", bin_path, reason)
        bin_to_memfile(bin_path, rec_path, name=name, swap_color_channel=swap_color_channel,
                       show_progress=show_progress, num_workers=num_workers)
        written.append(name)
    return written, skipped


# ----------------------------------------------------------------------------------------------
# Image folder -> RecordIO
# ----------------------------------------------------------------------------------------------
def _sorted_names(items: list, key) -> list:
    """Sort by name; numerically when every name is an integer (``2`` before ``10``)."""
    if items and all(key(item).isdigit() for item in items):
        return sorted(items, key=lambda item: (int(key(item)), key(item)))
    return sorted(items, key=key)


def list_image_folder(image_folder: Path, stats: Optional[list] = None
                      ) -> tuple[list[str], list[tuple[int, Path]]]:
    """Identities and their image files, both sorted by name (numerically when every name is an
    integer, so that a folder written by ``--make_image_files`` packs back to the same labels).
    A ``stats`` list receives each file's ``os.stat_result`` (one ``stat`` per file)."""
    if not image_folder.is_dir():
        raise ConvertError(f"{image_folder}: image folder not found")
    names = _sorted_names([p.name for p in image_folder.iterdir()
                           if p.is_dir() and not p.name.startswith(".")], key=lambda n: n)
    samples: list[tuple[int, Path]] = []
    identities: list[str] = []
    for name in names:
        with os.scandir(image_folder / name) as it:
            entries = _sorted_names([e for e in it if is_image_file(e.name) and e.is_file()],
                                    key=lambda e: Path(e.name).stem)
        if not entries:
            logger.warning("%s: no images, identity skipped", image_folder / name)
            continue
        label = len(identities)
        identities.append(name)
        samples.extend((label, Path(e.path)) for e in entries)
        if stats is not None:
            stats.extend(e.stat() for e in entries)
    if not samples:
        raise ConvertError(f"{image_folder}: no identity subfolders with images "
                           f"({', '.join(IMAGE_EXTENSIONS)})")
    return identities, samples


def _encode_for_pack(task: tuple[Path, bool]) -> bytes:
    """Bytes to store for one image file: unchanged, or colour-swapped and re-encoded."""
    path, swap = task
    data = path.read_bytes()
    rgb = decode_image_bytes(data, str(path))
    check_input_size(rgb, str(path))
    if swap:
        return encode_jpeg(swap_red_blue(rgb), quality=SWAPPED_JPEG_QUALITY)
    return data


def _pack_change(out_dir: Path, record: dict, image_folder: Path, samples: list, stats: list,
                 swap_color_channel: bool) -> Optional[str]:
    """Why the pack in ``out_dir`` (made as ``record`` says) is not the packing of
    ``image_folder`` as it is now (a phrase for a log line), or None. One ``stat`` per image
    (already taken by the listing)."""
    rec_file = out_dir / "train.rec"
    if not rec_file.is_file():
        return "there is none"
    if not record:
        return f"it has no {PACK_RECORD_NAME} (not made by --make_record, or interrupted)"
    if record.get("image_folder") != str(image_folder.resolve()):
        return f"it was made from {record.get('image_folder')}"
    if record.get("swap_color_channel") != bool(swap_color_channel):
        return f"it was made with swap_color_channel={record.get('swap_color_channel')}"
    pack_files = [rec_file, default_idx_path(rec_file)]
    reason = stamp_change(record.get("pack_stamp"), pack_files, base=out_dir)
    if reason is not None:
        return reason
    return stamp_change(record.get("source_stamp"), [p for _, p in samples], base=image_folder,
                        stats=stats)


def make_record(image_folder: Path, out_dir: Path, swap_color_channel: bool, num_workers: int,
                overwrite: bool = False, show_progress: bool = True) -> tuple[int, int]:
    """Pack ``image_folder`` (one subfolder per identity) into ``out_dir/train.rec`` + ``.idx``.

    ``train.source.json`` beside the pack records the images it was made from (names, sizes,
    modification times; a content hash for images modified just before) and is written last:
    a rerun reuses the pack only if the folder is unchanged, and redoes an interrupted one.
    """
    stats: list = []
    started_ns = time.time_ns()
    identities, samples = list_image_folder(image_folder, stats)
    rec_file = out_dir / "train.rec"
    record_path = out_dir / PACK_RECORD_NAME
    tmp_rec = out_dir / ".train.rec.tmp"
    for leftover in (tmp_rec, default_idx_path(tmp_rec)):  # of a killed run
        if leftover.is_file():
            logger.info("removing %s, left by an interrupted run", leftover)
            leftover.unlink()
    remove_temporaries(out_dir, ["identities.tsv", PACK_RECORD_NAME])
    record = _read_info(record_path)
    reason = "--overwrite" if overwrite else _pack_change(out_dir, record, image_folder, samples,
                                                          stats, swap_color_channel)
    if reason is None:
        settled = settled_stamp(record["source_stamp"], [p for _, p in samples],
                                base=image_folder, stats=stats)
        if settled is not None:  # checked by content this time; by a stat from now on
            write_atomically(record_path, lambda f: f.write(
                json.dumps({**record, "source_stamp": settled}) + "\n"), text=True)
        return 0, len(samples)
    if reason != "there is none":
        logger.info("rebuilding %s: %s", rec_file, reason)
    stamp = source_stamp([p for _, p in samples], base=image_folder, stats=stats,
                         started_ns=started_ns)
    out_dir.mkdir(parents=True, exist_ok=True)
    tasks = [(path, swap_color_channel) for _, path in samples]
    bar = tqdm(total=len(samples), desc=f"{image_folder.name} -> train.rec", unit="img",
               disable=not show_progress)

    def payloads(encoded: Iterable[bytes]) -> Iterator[tuple[int, bytes]]:
        for (label, _), data in zip(samples, encoded):
            bar.update()
            interruption_point("make_record")
            yield label, data

    try:
        if num_workers > 1 and len(tasks) > 1:
            with Pool(num_workers) as pool:
                write_face_pack(tmp_rec, payloads(pool.imap(_encode_for_pack, tasks,
                                                             chunksize=64)))
        else:
            write_face_pack(tmp_rec, payloads(map(_encode_for_pack, tasks)))
    except BaseException:
        for path in (tmp_rec, default_idx_path(tmp_rec)):
            path.unlink(missing_ok=True)
        raise
    finally:
        bar.close()
    record_path.unlink(missing_ok=True)  # the pack is incomplete until the record is back
    os.replace(default_idx_path(tmp_rec), default_idx_path(rec_file))
    os.replace(tmp_rec, rec_file)
    write_atomically(out_dir / "identities.tsv", lambda f: f.write(
        "".join(f"{label}\t{name}\n" for label, name in enumerate(identities))), text=True)
    pack_stamp = source_stamp([rec_file, default_idx_path(rec_file)], base=out_dir,
                              hash_racy=False)
    made = {"image_folder": str(image_folder.resolve()),
            "swap_color_channel": bool(swap_color_channel), "images": len(samples),
            "identities": len(identities), "source_stamp": stamp, "pack_stamp": pack_stamp}
    write_atomically(record_path, lambda f: f.write(json.dumps(made) + "\n"), text=True)
    load_face_pack_index(rec_file, show_progress=show_progress)  # cache the labels now
    return len(samples), 0


# ----------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------
EPILOG = "\n\n".join(textwrap.fill(paragraph, 79) for paragraph in (
    "With only --rec_path DIR, both --make_image_files and --make_validation_memfiles run.",
    "Colours: the public packs and .bin files hold true-colour JPEGs. Without "
    "--swap_color_channel the image files are the pack's JPEG bytes, unchanged, and the "
    "memfiles hold the BGR network input made from the decoded RGB images.",
    "--swap_color_channel declares that the SOURCE holds red and blue swapped: image files "
    "are decoded, red and blue exchanged and re-encoded as JPEG (quality 100), so that they "
    "hold true colours; memfiles are converted with red and blue exchanged; with --make_record "
    "each image is decoded, swapped and re-encoded as JPEG (quality 100) before packing. Do "
    "not use it on the public releases.",
    "Rerunning skips finished outputs (image files of the right size, complete memfiles, an "
    "existing complete pack or index) and removes the temporary files of an interrupted run; "
    "an output whose source changed since it was made (another train.rec, a replaced .bin, "
    "an image of --image_folder added, removed or rewritten) is rebuilt; --overwrite redoes "
    "everything.",
))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=EPILOG)
    parser.add_argument("-r", "--rec_path", type=Path, default=Path("./faces_emore"),
                        help="folder holding train.rec/train.idx and *.bin (default "
                             "./faces_emore); with --rebuild_index the .rec file itself (or its "
                             "folder); with --make_record the output folder")
    parser.add_argument("--make_image_files", action="store_true",
                        help="unpack train.rec into <rec_path>/imgs/<label>/<key>.jpg")
    parser.add_argument("--make_validation_memfiles", action="store_true",
                        help="turn every <rec_path>/*.bin into <rec_path>/<name>/memfile/"
                             "mem_file.dat(+.conf) and <rec_path>/<name>_list.npy")
    parser.add_argument("--rebuild_index", action="store_true",
                        help="rebuild the missing .idx of --rec_path by scanning the .rec")
    parser.add_argument("--make_record", action="store_true",
                        help="pack --image_folder (one subfolder per identity, sorted by name; "
                             "numerically when all names are integers) into "
                             "<rec_path>/train.rec/.idx with an InsightFace header record")
    parser.add_argument("--image_folder", type=Path, default=None,
                        help="input folder of --make_record")
    parser.add_argument("--swap_color_channel", action="store_true",
                        help="the source holds red and blue swapped: swap them back while "
                             "converting (see below)")
    parser.add_argument("--num_workers", type=int, default=os.cpu_count() or 1,
                        help="processes for decoding/encoding/writing (default: all cores)")
    parser.add_argument("--overwrite", action="store_true",
                        help="redo work whose output already exists")
    parser.add_argument("--no_progress", action="store_true", help="hide progress bars")
    return parser


def _resolve_rec_file(path: Path) -> Path:
    return path / "train.rec" if path.is_dir() else path


def _require_writable(folder: Path) -> None:
    """One clear error before any work when ``folder`` (created if missing) cannot be written."""
    if not is_writable_folder(folder):
        raise ConvertError(f"{folder}: cannot write here (permission denied or read-only file "
                           f"system); fix the folder's permissions, or copy the input into a "
                           f"writable folder and give that as --rec_path")


def run(args: argparse.Namespace) -> Summary:
    """Run the steps that ``args`` ask for; an unwritable output is one :class:`ConvertError`
    naming the path."""
    try:
        return _run_steps(args)
    except OSError as exc:
        if not is_access_error(exc):
            raise
        raise ConvertError(f"{exc.filename or args.rec_path}: cannot write ({exc.strerror}); fix "
                           f"the permissions, or give a writable --rec_path") from exc


def _run_steps(args: argparse.Namespace) -> Summary:
    summary = Summary()
    progress = not args.no_progress
    workers = max(1, int(args.num_workers))
    if args.rebuild_index:
        rec_file = _resolve_rec_file(args.rec_path)
        idx_file = default_idx_path(rec_file)
        start = time.time()
        if idx_file.is_file() and not args.overwrite:
            count = len(RecordReader(rec_file))
            summary.add(f"index {idx_file.name} (exists)", 0, count, time.time() - start)
        else:
            _require_writable(idx_file.parent)
            count = rebuild_index(rec_file, show_progress=progress)
            summary.add(f"index {idx_file.name}", count, 0, time.time() - start)
        return summary
    if args.make_record:
        if args.image_folder is None:
            raise ConvertError("--make_record needs --image_folder DIR")
        _require_writable(args.rec_path)
        start = time.time()
        written, skipped = make_record(args.image_folder, args.rec_path, args.swap_color_channel,
                                       workers, overwrite=args.overwrite, show_progress=progress)
        summary.add(f"{args.image_folder.name} -> train.rec", written, skipped, time.time() - start)
        return summary

    explicit = args.make_image_files or args.make_validation_memfiles
    do_images = args.make_image_files or not explicit
    do_memfiles = args.make_validation_memfiles or not explicit
    rec_path = args.rec_path
    if not rec_path.is_dir():
        raise ConvertError(f"{rec_path}: folder not found (give the folder that holds train.rec "
                           f"and the .bin files)")
    has_rec = (rec_path / "train.rec").is_file()
    bins = find_pair_bins(rec_path)
    if do_images and not has_rec:
        if args.make_image_files:
            raise ConvertError(f"{rec_path / 'train.rec'}: not found")
        logger.warning("%s: no train.rec, image files skipped", rec_path)
        do_images = False
    if do_memfiles and not bins:
        if args.make_validation_memfiles:
            raise ConvertError(f"{rec_path}: no *.bin pair sets found")
        logger.warning("%s: no *.bin pair sets, memfiles skipped", rec_path)
        do_memfiles = False
    if not (do_images or do_memfiles):
        raise ConvertError(f"{rec_path}: neither train.rec nor *.bin files found")
    _require_writable(rec_path)
    if do_images:
        start = time.time()
        written, skipped = make_image_files(rec_path, args.swap_color_channel, workers,
                                            overwrite=args.overwrite, show_progress=progress)
        summary.add("train.rec -> imgs/ (images)", written, skipped, time.time() - start)
    if do_memfiles:
        start = time.time()
        written_sets, skipped_sets = make_validation_memfiles(
            rec_path, args.swap_color_channel, workers, overwrite=args.overwrite,
            show_progress=progress)
        summary.add("*.bin -> memfiles (pair sets)", len(written_sets), len(skipped_sets),
                    time.time() - start)
    return summary




def _run(argv: Optional[Sequence[str]]) -> None:
    print(run(build_parser().parse_args(argv)).table())


def main(argv: Optional[Sequence[str]] = None) -> int:
    return run_cli(_run, argv, prog="convert.py")


if __name__ == "__main__":
    sys.exit(main())
