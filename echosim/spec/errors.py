"""The error base of the whole project: a mistake in the user's input, one line naming the file, line and field.

It lives in the scheduler core because the core sits under every other package: traces, cost models, the
simulator, the engine and validation each subclass it with their own type, and the CLI prints any of them as one
line (`echosim: error: ...`, exit 2) instead of a stack trace.
"""

from __future__ import annotations


class InputError(ValueError):
    """A mistake in the user's input (file, flag, config, request)."""

    def __init__(self, message: str, *, path: str | None = None, line: int | None = None,
                 field: str | None = None):
        where = ""
        if path is not None:
            where = str(path)
            if line is not None:
                where += f":{line}"
            where += ": "
        if field is not None:
            message = f"field '{field}': {message}"
        super().__init__(where + message)
        self.path, self.line, self.field = path, line, field


class SpecError(InputError):
    """A scheduler-core input at fault: per-node records, calibration data, policy settings."""
