"""Wording that error messages share: naming the first few items of a long list."""
from __future__ import annotations

from typing import Iterable

SHOW_AT_MOST = 5


def name_some(items: Iterable, limit: int = SHOW_AT_MOST) -> str:
    """``'a, b, c'``, or for a longer list its first ``limit`` items and how many more there are:
    ``'a, b, c, d, e, ... and 7 more'``."""
    items = [str(i) for i in items]
    shown = ", ".join(items[:limit])
    more = len(items) - limit
    return shown + (f", ... and {more} more" if more > 0 else "")
