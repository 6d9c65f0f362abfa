"""User-facing errors: one line that names the file or key at fault and says what to do.

The CLI prints these without a traceback; anything else is a bug in semiseg.
"""

from __future__ import annotations


class SemisegError(Exception):
    """An error caused by the user's input (data, config, command line), not by semiseg."""


class DataError(SemisegError):
    """A dataset file or layout is missing, unreadable or inconsistent."""


class ConfigError(SemisegError):
    """A configuration key or value is unknown or invalid."""


class CheckpointError(SemisegError):
    """A checkpoint is missing, truncated, or not a semiseg checkpoint."""


def one_line(exc: BaseException) -> str:
    """A library's exception as `Type: message` on one line (some, e.g. nibabel's, span several)."""
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
