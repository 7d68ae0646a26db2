"""User-facing errors: one line that names the file, line and field at fault, never a stack trace."""

from __future__ import annotations


class UserError(Exception):
    """A mistake in the user's input (file, flag, config). The CLI prints `echosim: error: <message>` and exits 2."""

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
