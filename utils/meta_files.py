"""Protocol (meta) text files: read fast, validate completely, report the first bad line.

The evaluation protocols come as text tables (IJB-B/C's whitespace-separated lists and 1:N csv
files, IJB-S's csv files). They are read with pandas into arrays and checked with vectorised
operations; only when a check fails is the file scanned line by line to name the first bad line.
Every problem is a :class:`MetaFileError` whose one-line message names the file, the line, what
is wrong and what to do, so that a broken file is reported before any image is embedded.

Column kinds: ``"str"`` (any text), ``"int"`` (a whole number), ``"float"`` (a finite number).
"""
from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import pandas as pd

from utils.errors import UserError

PathLike = Union[str, os.PathLike]
Columns = Sequence[Tuple[str, str]]           # (name, kind) in file order

#: What the user can do about a bad line (the end of every message).
FIX_HINT = "correct or remove that line, or restore the file from the dataset release"


class MetaFileError(UserError, ValueError):
    """A protocol file is malformed or inconsistent; the message names the file and the line."""


def fail(path: PathLike, line: Optional[int], problem: str, hint: str = FIX_HINT) -> MetaFileError:
    """The error for ``problem`` at ``line`` of ``path`` (``None``: the whole file)."""
    where = f"{path}, line {line}" if line is not None else str(path)
    return MetaFileError(f"{where}: {problem}; {hint}")


def _value_problem(kind: str, text: str) -> Optional[str]:
    if kind == "str":
        return None
    try:
        value = float(text) if kind == "float" else int(text)
    except ValueError:
        return f"must be {'a number' if kind == 'float' else 'an integer'}, found {text!r}"
    if kind == "float" and not np.isfinite(value):
        return f"must be a finite number, found {text!r}"
    return None


def _lines(path: Path, header: bool) -> Iterator[Tuple[int, str]]:
    """``(line number, text)`` of the non-blank data lines (slow path: error messages only)."""
    with open(path, encoding="utf-8", errors="replace") as f:
        for number, line in enumerate(f, start=1):
            if (header and number == 1) or not line.strip():
                continue
            yield number, line.rstrip("\r\n")


def line_of_row(path: PathLike, row: int, header: bool = False) -> int:
    """The line number of data row ``row`` (0-based; blank lines and the header are skipped)."""
    for i, (number, _) in enumerate(_lines(Path(path), header)):
        if i == row:
            return number
    raise IndexError(f"{path} has no data row {row}")


def _scan(path: Path, columns: Columns, sep: Optional[str], header_fields: Optional[List[str]]) -> None:
    """Raise :class:`MetaFileError` for the first line that does not parse (``sep=None``: whitespace)."""
    count = len(header_fields) if header_fields is not None else len(columns)
    positions = [(header_fields.index(name) if header_fields is not None else i, name, kind)
                 for i, (name, kind) in enumerate(columns)]
    layout = " ".join(header_fields or [name for name, _ in columns])
    for number, line in _lines(path, header_fields is not None):
        fields = [f.strip() for f in line.split(sep)]
        if len(fields) != count:
            kind = "comma-separated" if sep else "whitespace-separated"
            raise fail(path, number, f"expected {count} {kind} columns ({layout}), found {len(fields)}: "
                                     f"{line[:120]!r}")
        for position, name, kind in positions:
            problem = _value_problem(kind, fields[position])
            if problem:
                raise fail(path, number, f"column {name!r} {problem}")


def _check_numbers(path: Path, table: pd.DataFrame, columns: Columns, sep: Optional[str],
                   header_fields: Optional[List[str]]) -> None:
    for name, kind in columns:
        if kind == "float" and not np.isfinite(table[name].to_numpy()).all():
            _scan(path, columns, sep, header_fields)
            row = int(np.flatnonzero(~np.isfinite(table[name].to_numpy()))[0])
            raise fail(path, line_of_row(path, row, header_fields is not None),
                       f"column {name!r} must be a finite number")


def _require_file(path: Path) -> None:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")


def _dtype(kind: str):
    return {"str": str, "int": np.int64, "float": np.float64}[kind]


def read_whitespace_table(path: PathLike, columns: Columns) -> pd.DataFrame:
    """A header-less, whitespace-separated table with exactly ``len(columns)`` columns on every
    non-blank line, parsed and checked (see the module docstring); columns named as given."""
    path = Path(path)
    _require_file(path)
    names = [name for name, _ in columns]
    try:
        table = pd.read_csv(path, sep=r"\s+", header=None, engine="c", quoting=csv.QUOTE_NONE,
                            keep_default_na=False, dtype={i: _dtype(k) for i, (_, k) in enumerate(columns)})
    except pd.errors.EmptyDataError:
        raise fail(path, None, "the file is empty") from None
    except (pd.errors.ParserError, ValueError, TypeError, OverflowError):
        table = None
    if table is None or table.shape[1] != len(columns):
        _scan(path, columns, None, None)
        raise fail(path, None, f"cannot be read as columns {' '.join(names)}")
    table.columns = names
    _check_numbers(path, table, columns, None, None)
    return table


def _fields_per_line(data: bytes, sep: bytes) -> Tuple[np.ndarray, np.ndarray]:
    """``(fields, line numbers)`` of the non-blank lines of ``data``, counted without a Python loop."""
    buf = np.frombuffer(data, dtype=np.uint8)
    ends = np.flatnonzero(buf == ord("\n"))
    if len(buf) and buf[-1] != ord("\n"):
        ends = np.append(ends, len(buf))
    starts = np.concatenate([[0], ends[:-1] + 1]).astype(np.int64)
    separators = np.concatenate([[0], np.cumsum(buf == ord(sep), dtype=np.int64)])
    visible = np.concatenate([[0], np.cumsum(buf > ord(" "), dtype=np.int64)])
    fields = separators[ends] - separators[starts] + 1
    nonblank = visible[ends] - visible[starts] > 0
    return fields[nonblank], np.flatnonzero(nonblank) + 1


def read_csv_table(path: PathLike, columns: Columns) -> pd.DataFrame:
    """The named ``columns`` of a comma-separated file with a header line; every line must have
    the header's number of fields (as ``np.loadtxt`` requires in the published code)."""
    path = Path(path)
    _require_file(path)
    data = path.read_bytes()
    fields, numbers = _fields_per_line(data, b",")
    if len(fields) == 0:
        raise fail(path, None, "the file is empty")
    header_fields = [f.strip() for f in data.split(b"\n", 1)[0].decode("utf-8-sig", "replace").rstrip("\r").split(",")]
    lacking = [name for name, _ in columns if name not in header_fields]
    if lacking or numbers[0] != 1:
        raise fail(path, 1, f"the header line must name the columns {', '.join(n for n, _ in columns)} "
                            f"(found {','.join(header_fields)})", "restore the file from the dataset release")
    bad = np.flatnonzero(fields != fields[0])
    if len(bad):
        line = int(numbers[bad[0]])
        text = data.split(b"\n", line)[line - 1].decode("utf-8", "replace").rstrip("\r")
        raise fail(path, line, f"expected {fields[0]} comma-separated columns ({','.join(header_fields)}), "
                               f"found {fields[bad[0]]}: {text[:120]!r}")
    try:
        table = pd.read_csv(path, usecols=[name for name, _ in columns], engine="c", quoting=csv.QUOTE_NONE,
                            keep_default_na=False, dtype={name: _dtype(kind) for name, kind in columns})
    except (pd.errors.ParserError, ValueError, TypeError, OverflowError):
        _scan(path, columns, ",", header_fields)
        raise fail(path, None, f"cannot be read as columns {', '.join(n for n, _ in columns)}") from None
    _check_numbers(path, table, columns, ",", header_fields)
    return table
