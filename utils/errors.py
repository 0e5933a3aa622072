"""The one base class of the project's bad-input errors.

Every error class that means "the user's input is wrong or missing" (a truncated pack, a
checkpoint that does not fit, a bad meta file, ...) derives from :class:`UserError` as well as
from the built-in class it always had (``ValueError``, ``FileNotFoundError``, ...), so callers
that catch the built-in class keep working and every command line reports all of them the same
way (:data:`utils.cli.USER_ERRORS`: one ``error: ...`` line and exit status 2).
"""
from __future__ import annotations


class UserError(Exception):
    """Bad input: reported as one line naming the file and what to do, never as a traceback."""
