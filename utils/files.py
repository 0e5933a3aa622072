"""Writing a file so that readers never see it half-written (caches, indexes, converted data)."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import IO, Callable, Union

PathLike = Union[str, os.PathLike]

# The process's file-creation mask, read once at import (os.umask can only be read by setting it).
_UMASK = os.umask(0o022)
os.umask(_UMASK)


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
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path
