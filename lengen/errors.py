"""User-facing errors.

Everything a user can get wrong (a misspelt plugin name, a malformed benchmarks.toml, a
window longer than the data, a loss that became NaN) raises :class:`LengenError` with a
one-line message that names the input and the fix. The CLI prints that line and exits
non-zero; it never shows a traceback for these.
"""

from __future__ import annotations

import difflib


class LengenError(Exception):
    """An error caused by user input, with a message fit to print as one line."""

    exit_code = 2


class UnknownComponentError(LengenError, KeyError):
    def __str__(self) -> str:  # KeyError would quote the message
        return self.args[0]


class DuplicateComponentError(LengenError):
    pass


class ConfigError(LengenError):
    pass


class TrainingDivergedError(LengenError):
    """The training loss became NaN or infinite (``step``: the optimizer step, 1-based)."""

    exit_code = 3

    def __init__(self, message: str, step: int | None = None):
        super().__init__(message)
        self.step = step


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the process was, so that it unwinds like Ctrl-C."""


def did_you_mean(name: str, options, *, kind: str) -> str:
    """``unknown architecture 'swx'. Did you mean 'sw'? Available: sw, ttt``."""
    options = sorted(options)
    close = difflib.get_close_matches(name, options, n=3, cutoff=0.5)
    msg = f"unknown {kind} {name!r}."
    if close:
        msg += " Did you mean " + " or ".join(repr(c) for c in close) + "?"
    msg += " Available: " + (", ".join(options) if options else "(none)") + "."
    return msg
