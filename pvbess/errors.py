"""Errors a user can fix, with one formatter for where the problem is.

``DataError`` is raised for site data that cannot be used as they are (a user's
CSV, a generated series, the EV sessions): one paragraph naming the source, the
column, the first offending row and/or time, and the problem.
"""

from __future__ import annotations

from typing import NoReturn


class DataError(ValueError):
    """Site data cannot be used as they are.

    The message is one paragraph naming the file or series, the column and the first
    offending row (1-based) and/or timestamp. The same facts are kept as attributes.
    """

    def __init__(
        self,
        message: str,
        *,
        path: str | None = None,
        column: str | None = None,
        row: int | None = None,
        time: str | None = None,
    ) -> None:
        super().__init__(message)
        self.path = path
        self.column = column
        self.row = row
        self.time = time


def fail(
    source: str,
    column: str,
    problem: str,
    *,
    row: int | None = None,
    where: str = "",
    time: str | None = None,
    hint: str = "",
) -> NoReturn:
    """Raise DataError: '<source>, column '<column>'[, <where>]: <problem>[ <hint>]'.

    ``row`` is 1-based (None = the whole source); ``where`` says how a user finds
    that row (a file line, a session id, a time).
    """
    message = f"{source}, column {column!r}" + (f", {where}" if where else "")
    message += f": {problem}" + (f" {hint}" if hint else "")
    raise DataError(message, path=source, column=column, row=row, time=time)
