"""Progress of long work: rich bars on a terminal, plain lines anywhere else.

On a terminal, :func:`make_progress` is a rich ``Progress`` and :func:`phase` a spinner. When
the console is not a terminal (output redirected to a file, CI, ``nohup``, a batch job) a
rich display would print nothing until it ends; there, both print timestamped lines instead:
one when a phase or task starts, one when it ends, and for long tasks (more than
``PHASE_STEPS`` units, e.g. training steps) one every ``LENGEN_PROGRESS_EVERY`` seconds
(default 30) with the count, the task's own info (loss, tokens/s), the elapsed time and the
ETA. Shorter tasks (evaluation modes, checkpoints) print a line at every unit.
"""

from __future__ import annotations

import contextlib
import os
import time

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

#: default seconds between two progress lines of one long task
EVERY_S = 30.0
#: tasks with at most this many units print a line at each unit
PHASE_STEPS = 20


def interval() -> float:
    """Seconds between progress lines (``LENGEN_PROGRESS_EVERY``, default 30)."""
    try:
        return max(0.0, float(os.environ.get("LENGEN_PROGRESS_EVERY", EVERY_S)))
    except ValueError:
        return EVERY_S


def clock(seconds: float | None) -> str:
    """``75.2`` -> ``"1:15"``, ``3725`` -> ``"1:02:05"``; ``"-"`` when unknown."""
    if seconds is None or seconds != seconds or seconds == float("inf"):
        return "-"
    s = int(round(max(0.0, seconds)))
    h, rest = divmod(s, 3600)
    return f"{h}:{rest // 60:02d}:{rest % 60:02d}" if h else f"{rest // 60}:{rest % 60:02d}"


def _say(console, text: str) -> None:
    console.print(f"{time.strftime('%H:%M:%S')} {text}", markup=False, highlight=False, soft_wrap=True)


class PlainProgress:
    """The part of rich's ``Progress`` that lengen uses (``add_task``, ``update``, a context
    manager), printing plain lines (see the module docstring)."""

    def __init__(self, console, every: float | None = None):
        self.console = console
        self.every = interval() if every is None else every
        self.tasks: dict[int, dict] = {}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def add_task(self, description: str, total: float | None = None, info: str = "", **_fields) -> int:
        tid = len(self.tasks)
        now = time.monotonic()
        self.tasks[tid] = {"description": description, "total": total, "completed": 0, "info": info,
                           "start": now, "printed": None, "done": False}
        _say(self.console, f"{description}: start" + (f", {total:g} to do" if total else "")
             + (f" ({info})" if info else ""))
        return tid

    def update(self, task_id, *, completed: float | None = None, advance: float | None = None,
               info: str | None = None, **_fields) -> None:
        t = self.tasks.get(task_id)
        if t is None or t["done"]:
            return
        if completed is not None:
            t["completed"] = completed
        if advance is not None:
            t["completed"] += advance
        if info is not None:
            t["info"] = info
        now = time.monotonic()
        total, c = t["total"], t["completed"]
        finished = bool(total) and c >= total
        short = bool(total) and total <= PHASE_STEPS
        if not (finished or short or t["printed"] is None or now - t["printed"] >= self.every):
            return
        t["printed"] = now
        elapsed = now - t["start"]
        if finished:
            t["done"] = True
            _say(self.console, f"{t['description']}: done, {c:g}/{total:g} in {clock(elapsed)}"
                 + (f"  {t['info']}" if t["info"] else ""))
            return
        eta = (total - c) * elapsed / c if total and c else None
        pct = f" ({100 * c / total:.0f}%)" if total else ""
        _say(self.console, f"{t['description']}  {c:g}/{total:g}{pct}" + (f"  {t['info']}" if t["info"] else "")
             + f"  elapsed {clock(elapsed)}  eta {clock(eta)}")


def make_progress(console):
    """Rich progress bars on a terminal, :class:`PlainProgress` lines elsewhere."""
    if not console.is_terminal:
        return PlainProgress(console)
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        console=console,
        transient=False,
    )


class _PlainStatus:
    def __init__(self, console):
        self.console = console

    def update(self, message: str) -> None:
        _say(self.console, f"  {message}")


@contextlib.contextmanager
def phase(console, message: str):
    """A phase of work (loading the data, ...): a spinner on a terminal whose text ``update``
    changes; elsewhere a line when it starts, one per update and one when it ends."""
    if console.is_terminal:
        with console.status(message) as spinner:
            yield spinner
        return
    t0 = time.monotonic()
    _say(console, f"{message} ...")
    yield _PlainStatus(console)
    _say(console, f"{message}: done in {time.monotonic() - t0:.1f} s")
