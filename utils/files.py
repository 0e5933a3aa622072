"""Files the project writes: all-or-nothing writes, their leftovers, the records of their sources.

* :func:`write_atomically`: readers never see a half-written file; a killed writer leaves only a
  hidden ``.<name>.<random>.tmp`` beside it, which :func:`remove_temporaries` clears.
* :func:`source_stamp` / :func:`stamp_change`: a derived file (memfile, pack, unpacked folder)
  records what it was made from and is rebuilt when that changed. The check costs one ``stat`` per
  source file; only a source modified within :data:`RACY_NS` of the conversion (when its time
  stamp cannot tell two versions apart) is compared by content hash, as git does for its index,
  until :func:`settled_stamp` replaces that record by a plain one.
* :func:`user_cache_dir`, :func:`is_writable_folder`: where derived files go when the data
  folder is read-only.
"""
from __future__ import annotations

import errno
import hashlib
import logging
import os
import re
import signal
import tempfile
import time
from pathlib import Path
from typing import IO, Callable, Dict, Optional, Sequence, Union

logger = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]

# The process's file-creation mask, read once at import (os.umask can only be read by setting it).
_UMASK = os.umask(0o022)
os.umask(_UMASK)

#: A source modified less than this before a conversion started may change again without a
#: visible change of its modification time (file systems keep time in ticks of up to 2 s).
RACY_NS = 2_000_000_000
#: Sources listed by name in a stamp (more are summarised by a digest only).
_NAMED_SOURCES = 16
#: The temporary files of :func:`write_atomically`: ``.<name>.<8 random characters>.tmp``.
TEMPORARY_PATTERN = re.compile(r"^\..+\.[A-Za-z0-9_]{8}\.tmp$")
_ACCESS_ERRNOS = (errno.EACCES, errno.EPERM, errno.EROFS)


def write_atomically(path: PathLike, write: Callable[[IO], None], text: bool = False) -> Path:
    """Create or replace ``path`` in one step: ``write(f)`` fills a temporary file beside it (the
    folder is created if needed), which then takes its place. On any failure the temporary file is
    removed and the error propagates, leaving an existing ``path`` untouched. ``text=True`` opens
    the file as UTF-8 text with ``\\n`` line endings. The file gets the usual permissions (those
    of ``open``), not the private ones of ``tempfile``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)
        with (os.fdopen(fd, "w", encoding="utf-8", newline="\n") if text else os.fdopen(fd, "wb")) as f:
            write(f)
            interruption_point("write_atomically")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def remove_temporaries(folder: PathLike, names: Optional[Sequence[str]] = None) -> int:
    """Remove what killed :func:`write_atomically` calls left in ``folder`` (all of them, or those
    of the files ``names``); returns how many. Only the project's own temporary names match."""
    folder = Path(folder)
    removed = 0
    try:
        entries = list(os.scandir(folder))
    except (FileNotFoundError, NotADirectoryError):
        return 0
    prefixes = tuple(f".{n}." for n in names) if names is not None else None
    for entry in entries:
        if not TEMPORARY_PATTERN.match(entry.name) or not entry.is_file(follow_symlinks=False):
            continue
        if prefixes is not None and not entry.name.startswith(prefixes):
            continue
        os.unlink(entry.path)
        removed += 1
    if removed:
        logger.info("removed %d temporary file(s) that an interrupted run left in %s", removed,
                    folder)
    return removed


# ----------------------------------------------------------------------------------------------
# Where derived files go
# ----------------------------------------------------------------------------------------------
def user_cache_dir() -> Path:
    """The project's cache folder: ``$ADAFACE_CACHE``, else ``$XDG_CACHE_HOME/adaface``, else
    ``~/.cache/adaface``."""
    if os.environ.get("ADAFACE_CACHE"):
        return Path(os.environ["ADAFACE_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "adaface"


def is_access_error(exc: BaseException) -> bool:
    """Whether ``exc`` says a path may not be written (permission, read-only file system)."""
    return isinstance(exc, PermissionError) or (isinstance(exc, OSError)
                                                and exc.errno in _ACCESS_ERRNOS)


def is_writable_folder(path: PathLike) -> bool:
    """Whether files can be created in ``path`` (or, if it does not exist yet, in the nearest
    existing folder above it, where it would be created): tried with a probe file, not guessed
    from the mode bits, which do not stop root and do not know about read-only mounts. Creates
    nothing that stays."""
    path = Path(path).absolute()
    while not path.exists() and path.parent != path:
        path = path.parent
    try:
        fd, probe = tempfile.mkstemp(prefix=".write_probe.", dir=path)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        if is_access_error(exc):
            return False
        raise
    return True


# ----------------------------------------------------------------------------------------------
# Records of sources
# ----------------------------------------------------------------------------------------------
def _relative(path: Path, base: Optional[Path]) -> str:
    return path.relative_to(base).as_posix() if base is not None else str(path)


def _content_sha1(paths: Sequence[Path]) -> str:
    digest = hashlib.sha1()
    for path in paths:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        digest.update(b"\0")
    return digest.hexdigest()


def _stat_rows(paths: Sequence[Path], base: Optional[Path],
               stats: Optional[Sequence[os.stat_result]]) -> list:
    stats = stats if stats is not None else [os.stat(p) for p in paths]
    return [[_relative(p, base), int(s.st_size), int(s.st_mtime_ns)] for p, s in zip(paths, stats)]


def _stat_sha1(rows: list) -> str:
    return hashlib.sha1("".join(f"{r}\t{s}\t{m}\n" for r, s, m in rows).encode("utf-8")).hexdigest()


def source_stamp(paths: Sequence[PathLike], base: Optional[PathLike] = None,
                 stats: Optional[Sequence[os.stat_result]] = None,
                 started_ns: Optional[int] = None, hash_racy: bool = True) -> Dict[str, object]:
    """The record of ``paths`` (the sources of a derived file) that :func:`stamp_change` checks.

    Take it *before* reading the sources (``started_ns``: when the conversion started, default
    now), so that a change during the conversion shows. It holds each source's size and
    modification time (named by its path relative to ``base``; summarised by a digest beyond
    16 sources) and, only when a source was modified within :data:`RACY_NS` of ``started_ns``,
    a hash of the contents (``hash_racy=False``: never; for large files such as packs, whose
    size and time stamp are trusted). ``stats`` (one per path) saves the ``stat`` calls of a
    caller that has them.
    """
    paths = [Path(p) for p in paths]
    base = Path(base) if base is not None else None
    started_ns = time.time_ns() if started_ns is None else int(started_ns)
    rows = _stat_rows(paths, base, stats)
    stamp: Dict[str, object] = {"count": len(rows), "stat_sha1": _stat_sha1(rows),
                                "recorded_ns": started_ns,
                                "newest_mtime_ns": max((r[2] for r in rows), default=0)}
    if len(rows) <= _NAMED_SOURCES:
        stamp["files"] = rows
    if hash_racy and stamp["newest_mtime_ns"] > started_ns - RACY_NS:
        stamp["content_sha1"] = _content_sha1(paths)
    return stamp


def stamp_change(stamp: Optional[dict], paths: Sequence[PathLike], base: Optional[PathLike] = None,
                 stats: Optional[Sequence[os.stat_result]] = None) -> Optional[str]:
    """Why ``paths`` are not the sources recorded in ``stamp`` (a phrase for a log line), or None
    when they are. Costs one ``stat`` per path (none with ``stats``), and a content hash only
    when the record holds one (taken within :data:`RACY_NS` of a source's modification)."""
    if not isinstance(stamp, dict) or "stat_sha1" not in stamp:
        return "it holds no record of its sources"
    paths = [Path(p) for p in paths]
    base = Path(base) if base is not None else None
    try:
        rows = _stat_rows(paths, base, stats)
    except FileNotFoundError as exc:
        return f"{exc.filename} is gone"
    if len(rows) != stamp.get("count"):
        return f"it was made from {stamp.get('count')} source file(s), there are {len(rows)} now"
    if _stat_sha1(rows) != stamp["stat_sha1"]:
        then = {r[0]: r[1:] for r in stamp.get("files") or []}
        for name, size, mtime in rows:
            if name in then and then[name] != [size, mtime]:
                return (f"{name} changed since (size {then[name][0]} -> {size} bytes, "
                        f"modified {time.ctime(mtime / 1e9)})")
            if then and name not in then:
                return f"{name} is new"
        return f"the names, sizes or modification times of its {len(rows)} source files changed"
    if "content_sha1" in stamp:  # recorded only for sources modified just before the record
        if stamp["content_sha1"] != _content_sha1(paths):
            return "the contents of its sources changed (same sizes and modification times)"
    return None


def settled_stamp(stamp: dict, paths: Sequence[PathLike], base: Optional[PathLike] = None,
                  stats: Optional[Sequence[os.stat_result]] = None) -> Optional[dict]:
    """A plain record (no content hash) to store in place of ``stamp`` once its sources, just
    found unchanged by :func:`stamp_change`, were last modified more than :data:`RACY_NS` ago:
    from then on a later change shows in the modification time, and checks are a ``stat`` again.
    None when ``stamp`` holds no hash or the sources are still that recent."""
    started_ns = time.time_ns()
    if "content_sha1" not in stamp or int(stamp.get("newest_mtime_ns", 0)) > started_ns - RACY_NS:
        return None
    return source_stamp(paths, base, stats, started_ns=started_ns)


# ----------------------------------------------------------------------------------------------
# Test hook
# ----------------------------------------------------------------------------------------------
_KILL_AT = os.environ.get("ADAFACE_TEST_KILL_AT", "")
_kill_counts: Dict[str, int] = {}


def interruption_point(tag: str) -> None:
    """A place where tests interrupt a writer for real. With ``ADAFACE_TEST_KILL_AT=<tag>:<n>``
    (``:TERM`` appended: SIGTERM instead of SIGKILL) the process kills itself at the ``n``-th
    call with that ``tag``; without it (always, outside the tests) this does nothing."""
    if not _KILL_AT:
        return
    parts = _KILL_AT.split(":")
    if parts[0] != tag:
        return
    _kill_counts[tag] = _kill_counts.get(tag, 0) + 1
    if _kill_counts[tag] == int(parts[1]):
        os.kill(os.getpid(), signal.SIGTERM if parts[2:] == ["TERM"] else signal.SIGKILL)
        time.sleep(60)  # the signal is delivered before this returns
