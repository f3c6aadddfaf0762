"""User errors: one line, naming where the problem is and what to do.

Every error caused by the user's input (files, options, disk) is raised as
:class:`UserError`. The command line turns it into::

    cryodask: error: <where>: <what is wrong and what to do>

on stderr with exit status 2 and no traceback. ``where`` names the file, and
the row or field when there is one (``particles.star, row 17, rlnDefocusU``).
"""

from __future__ import annotations

from os import PathLike


class UserError(Exception):
    """Bad input from the user: a file, a row or field, or an option.

    Parameters
    ----------
    where
        The file (and row / field) or option at fault.
    what
        What is wrong and what to do about it, in one sentence.
    """

    def __init__(self, where: str | PathLike[str], what: str) -> None:
        self.where = str(where)
        self.what = what
        super().__init__(f"{self.where}: {self.what}")


def where(path: str | PathLike[str], row: int | None = None, field: str | None = None) -> str:
    """Format a location as ``file, row N, field`` (rows are 1-based, as users count)."""
    parts = [str(path)]
    if row is not None:
        parts.append(f"row {row}")
    if field is not None:
        parts.append(field)
    return ", ".join(parts)
