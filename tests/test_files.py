"""utils.files.write_atomically: all or nothing, usual permissions, no temporary file left behind."""
import os
import stat

import pytest

from utils import files
from utils.files import write_atomically


def test_writes_replaces_and_creates_the_folder(tmp_path):
    path = tmp_path / "new" / "index.idx"
    assert write_atomically(path, lambda f: f.write("0\t0\n1\t8\n"), text=True) == path
    assert path.read_bytes() == b"0\t0\n1\t8\n"
    write_atomically(path, lambda f: f.write(b"\x00\x01"))
    assert path.read_bytes() == b"\x00\x01" and os.listdir(path.parent) == ["index.idx"]


def test_failure_keeps_the_old_file_and_removes_the_temporary_one(tmp_path):
    path = tmp_path / "cache.npz"
    path.write_bytes(b"old")

    def half_then_fail(f):
        f.write(b"half")
        raise RuntimeError("disk full")
    with pytest.raises(RuntimeError, match="disk full"):
        write_atomically(path, half_then_fail)
    assert path.read_bytes() == b"old" and os.listdir(tmp_path) == ["cache.npz"]


def test_permissions_are_those_of_open_not_the_private_ones_of_tempfile(tmp_path):
    write_atomically(tmp_path / "a.bin", lambda f: f.write(b"x"))
    (tmp_path / "b.bin").write_bytes(b"x")
    mode = stat.S_IMODE((tmp_path / "a.bin").stat().st_mode)
    assert mode == stat.S_IMODE((tmp_path / "b.bin").stat().st_mode) == 0o666 & ~files._UMASK
