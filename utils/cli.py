"""What every command-line entry point shares: its logging set-up and its one-line error report.

Entry points (``main.py``, ``convert.py``, ``inference.py``, the evaluation scripts, the
``python -m`` tools) print their results. A bad input (a missing file, an unusable option, a
checkpoint that does not fit, an unwritable output folder) ends with one line ``error: ...`` on
stderr and exit status :data:`EXIT_BAD_INPUT` (2) instead of a traceback; any other exception is a
bug and keeps its traceback (exit status 1, Python's own).
"""
from __future__ import annotations

import logging
import sys
from typing import Callable, Optional, Sequence, Tuple, Type

from utils.errors import UserError

logger = logging.getLogger(__name__)

LOG_FORMAT = "%(levelname)s %(name)s: %(message)s"

#: Exit status of every entry point for bad input (a usage error, as argparse's own).
EXIT_BAD_INPUT = 2

#: What every entry point reports as one line: the project's own error classes, plus what the
#: operating system says about the user's paths (missing, unreadable, unwritable, disk full) and
#: plain ``ValueError`` raised on bad option values.
USER_ERRORS: Tuple[Type[BaseException], ...] = (UserError, OSError, ValueError)


def setup_logging(level: int = logging.INFO) -> None:
    """Log records at ``level`` and above to stderr as ``LEVEL module: message``."""
    logging.basicConfig(level=level, format=LOG_FORMAT)


def user_message(exc: BaseException) -> str:
    """The user-facing text of ``exc``. An error raised in a DataLoader worker reaches the main
    process wrapped in the worker's traceback ("Caught X in DataLoader worker process 0. Original
    Traceback ..."); the message the worker raised is returned instead."""
    text = str(exc)
    if "\nOriginal Traceback" in text:
        marker = f"{type(exc).__name__}: "
        cut = text.rfind(marker)
        if cut >= 0:
            text = text[cut + len(marker):]
    return text.strip()


def report_error(message: object, prog: Optional[str] = None) -> None:
    """Write the one line ``[prog: ]error: message`` to stderr (the command line's own output)."""
    print(f"{prog}: error: {message}" if prog else f"error: {message}", file=sys.stderr)


def run_cli(main: Callable[[Optional[Sequence[str]]], object], argv: Optional[Sequence[str]] = None,
            errors: Tuple[Type[BaseException], ...] = USER_ERRORS, status: int = EXIT_BAD_INPUT,
            prog: Optional[str] = None) -> int:
    """Set up logging and run ``main(argv)``; return 0, or ``status`` after reporting one of the
    user ``errors`` with :func:`report_error` (the traceback goes to the debug log)."""
    setup_logging()
    try:
        main(argv)
    except errors as exc:
        logger.debug("details", exc_info=True)
        report_error(user_message(exc), prog)
        return status
    return 0
