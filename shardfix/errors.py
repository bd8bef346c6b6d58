"""The error hierarchy: every user-facing failure is a ``ShardfixError`` with one clear message.

The CLI maps :class:`ShardfixError` subclasses to exit code 2 (bad input or usage) and
:class:`InternalError` to exit code 1. Messages name the path, key or flag at fault and say
what to do about it.
"""

from __future__ import annotations


class ShardfixError(Exception):
    """Base class for errors shardfix reports to the user without a traceback."""

    exit_code = 2


class BadInputError(ShardfixError):
    """The input is not something shardfix can read (wrong path, wrong format, bad flag)."""


class UnsafeInputError(ShardfixError):
    """The input would need arbitrary code execution (full unpickling) to read."""


class IncompleteSourceError(ShardfixError):
    """The checkpoint is missing data: a rank file, a chunk, bytes past the end of a file."""


class ReconcileConflictError(ShardfixError):
    """Targets disagree with each other or with the checkpoint in ways no rule can fix."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"{len(self.problems)} problem(s) reconciling the checkpoint:\n{lines}")


class OutputError(ShardfixError):
    """The output directory cannot be written as asked (exists, not ours, disk full)."""


class StrictError(ShardfixError):
    """``--strict``: the run produced warnings, each of which is treated as an error (exit 3)."""

    exit_code = 3


class InternalError(ShardfixError):
    """A failure that is shardfix's fault or the machine's, not the user's input."""

    exit_code = 1
