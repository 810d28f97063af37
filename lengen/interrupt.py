"""Ctrl-C and SIGTERM: stop at the end of a training step, with a checkpoint, or at once.

The command line installs :func:`handler` for SIGINT and SIGTERM. Outside a training loop
the signal raises at once (``KeyboardInterrupt``, or :class:`~lengen.errors.Terminated` for
SIGTERM), and everything already written is kept. Inside one (:func:`soft`), the first signal
only asks the loop to stop after the step it is in: the loop agrees with the other processes
on the step, saves a checkpoint, then raises; ``lengen run --resume`` continues from there. A
second signal raises at once.
"""

from __future__ import annotations

import contextlib
import signal

from lengen.errors import Terminated

_armed = False
_requested: int | None = None


def handler(signum, frame) -> None:
    global _requested
    if _armed and _requested is None:
        _requested = signum
        return
    raise_for(signum)


def raise_for(signum: int) -> None:
    if signum == signal.SIGTERM:
        raise Terminated()
    raise KeyboardInterrupt()


def requested() -> int | None:
    """The signal a training loop was asked to stop for, or None."""
    return _requested


@contextlib.contextmanager
def soft():
    """While inside, a first signal is recorded for the loop instead of raised."""
    global _armed, _requested
    _armed, _requested = True, None
    try:
        yield
    finally:
        _armed = False


@contextlib.contextmanager
def installed():
    """Install :func:`handler` for SIGINT and SIGTERM (the command line does, around a run)."""
    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
