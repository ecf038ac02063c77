"""User-facing errors.

Every problem a user can fix (bad config, bad data, missing package) is raised as
:class:`TunelabError`: one paragraph that says what is wrong, where (file, line or
record, field) and how to fix it. The CLI prints these without a traceback; anything
else is a bug and keeps its traceback.
"""

from __future__ import annotations


class TunelabError(Exception):
    """A problem in the user's input or environment, explained in one paragraph."""


class ConfigError(TunelabError):
    """The run configuration is invalid."""


class DataError(TunelabError):
    """A dataset file or record cannot be used."""

    def __init__(self, message: str, *, file: str | None = None, record: int | None = None,
                 line: int | None = None, field: str | None = None, hint: str | None = None):
        self.file, self.record, self.line, self.field = file, record, line, field
        where = []
        if file:
            where.append(f"file {file}")
        if line is not None:
            where.append(f"line {line}")
        elif record is not None:
            where.append(f"record {record}")
        if field:
            where.append(f"field '{field}'")
        text = message if not where else f"{', '.join(where)}: {message}"
        if hint:
            text = f"{text} {hint}"
        super().__init__(text)
