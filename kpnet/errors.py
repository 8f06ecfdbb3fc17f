"""The two kinds of failure a command reports without a traceback."""

from __future__ import annotations

from pathlib import Path


class KpnetError(Exception):
    """Bad input or usage: exit code 2, one line naming the file (or option) and the culprit."""

    exit_code = 2

    def __init__(self, source: str | Path | None, message: str) -> None:
        self.source = str(source) if source is not None else None
        self.message = message
        super().__init__(self.line())

    def line(self) -> str:
        return f"{self.source}: {self.message}" if self.source else self.message


class CheckFailed(KpnetError):
    """A check the user asked for (e.g. `--min-ap`) did not pass: exit code 1."""

    exit_code = 1


class KpnetWarning(UserWarning):
    """Something kpnet repaired or suspects but carries on with (a Python warning; the CLI prints `warning: <line>`)."""


def warn(source: str | Path | None, message: str) -> None:
    """Emit a KpnetWarning as one line naming the file (or option) and what was done."""
    import warnings

    warnings.warn(f"{source}: {message}" if source else message, KpnetWarning, stacklevel=3)
