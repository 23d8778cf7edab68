"""One exception family for everything a user can trigger.

Every error carries a one-line message with the actual values and, where there is one, a hint that names
the flag or step that fixes it. The CLI prints ``error: <message>`` and ``Note: <hint>`` and exits 2.
"""

from __future__ import annotations

import re

_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def first_line(exc: BaseException, limit: int = 240) -> str:
    """The first line of an exception's message (its type name when empty), without terminal colour codes (the
    exporters colour theirs), cut to ``limit`` characters."""
    lines = _ANSI.sub("", str(exc)).strip().splitlines()
    return (lines[0] if lines else type(exc).__name__)[:limit]


class BnfoldError(Exception):
    """Base class: a problem with the user's input that bnfold can explain."""

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message}\nNote: {self.hint}"


class LoadError(BnfoldError):
    """The model file cannot be read, is of an unknown format, or does not match the architecture."""


class UnsafeModelError(LoadError):
    """The file would run code (or touch files) when loaded or run; refused without ``--trust``."""


class UnsafePickleError(UnsafeModelError):
    """A whole pickled module was refused because loading it would run code from the file."""


class ArchError(LoadError):
    """``--arch module:factory`` cannot be imported or called."""


class InputSpecError(BnfoldError):
    """Input shapes are missing or malformed."""


class ModelRunError(BnfoldError):
    """The model raised while running on the example inputs."""


class OutputError(BnfoldError):
    """The output path cannot be written."""


class DataError(BnfoldError):
    """The calibration data cannot be read, or cannot be used as it is."""
