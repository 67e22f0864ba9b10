"""Progress of long work: rich bars and spinners on a terminal, plain periodic lines everywhere else.

Rich draws nothing on a stream that is not a terminal (a CI log, ``2> log``) until the work ends. There
each task prints a line every tenth of its total or every 30 s, whichever comes first, and one when it
completes (``scoring the model: 120/445 examples (27%), 2m10s, eta 5m50s``), and each status prints its
message when it starts and a reminder every 30 s while it lasts.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

EVERY_S = 30.0
"""Seconds between two plain lines of a task or a status, at most (while it advances, for a task)."""
STEP = 0.1
"""A task prints a plain line each time it crosses another such fraction of its total."""


def duration(seconds: float) -> str:
    """``45s``, ``2m10s``, ``1h05m``."""
    s = max(0, int(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def interactive(console: Console) -> bool:
    """Whether rich can redraw on ``console`` (a terminal that is not dumb, or a notebook)."""
    return (console.is_terminal and not console.is_dumb_terminal) or console.is_jupyter


def _say(console: Console, line: str) -> None:
    console.print(line, markup=False, highlight=False, soft_wrap=True)


class Task:
    """One piece of work of known size. ``advance(n)`` or ``update(completed)``; the task itself is
    the ``advance`` callback (``on_batch=task``)."""

    def __init__(self, display: ProgressDisplay, description: str, total: float, unit: str, scale: float):
        self.description, self.total, self.unit, self.scale = description, total, unit, scale
        self.completed: float = 0
        self._display = display
        self._rich_id: Any = None
        self._start = self._last = display.clock()
        self._mark = 0
        self._finished = False

    def __call__(self, n: float = 1) -> None:
        self.advance(n)

    def advance(self, n: float = 1) -> None:
        self.update(self.completed + n)

    def update(self, completed: float) -> None:
        self.completed = completed
        self._display._update(self)

    def line(self, now: float) -> str:
        """The plain progress line, e.g. ``scoring: 120/445 examples (27%), 2m10s, eta 5m50s``."""
        digits = 1 if self.scale != 1 and self.total / self.scale < 100 else 0
        value = (lambda v: f"{v / self.scale:.{digits}f}") if self.scale != 1 else (lambda v: f"{v:g}")
        unit = f" {self.unit}" if self.unit else ""
        elapsed = now - self._start
        text = f"{self.description}: {value(self.completed)}/{value(self.total)}{unit}"
        if self.total > 0:
            text += f" ({min(self.completed / self.total, 1.0):.0%})"
        text += f", {duration(elapsed)}"
        if 0 < self.completed < self.total:
            text += f", eta {duration(elapsed * (self.total - self.completed) / self.completed)}"
        return text

    def _due(self, now: float, step: float, every_s: float) -> bool:
        """Whether a plain line is due now (and note that it is printed)."""
        if self._finished:
            return False
        if self.total > 0 and self.completed >= self.total:
            self._finished = True
            return True
        mark = math.floor(self.completed * round(1 / step) / self.total) if self.total > 0 else 0
        if mark > self._mark or now - self._last >= every_s:
            self._mark, self._last = mark, now
            return True
        return False


class ProgressDisplay:
    """Tasks with progress on ``console``: rich bars on a terminal, else plain lines (see the module).
    Use it as a context manager; ``task(description, total)`` adds a task."""

    def __init__(
        self,
        console: Console,
        *,
        columns: Sequence[ProgressColumn] | None = None,
        transient: bool = False,
        every_s: float | None = None,
        step: float = STEP,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.console, self.step, self.clock = console, step, clock
        self.every_s = EVERY_S if every_s is None else every_s
        self.interactive = interactive(console)
        self._lock = threading.Lock()
        self._rich: Progress | None = None
        if self.interactive:
            columns = columns or (
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                TextColumn("eta"),
                TimeRemainingColumn(),
            )
            self._rich = Progress(*columns, console=console, transient=transient)

    def __enter__(self) -> ProgressDisplay:
        if self._rich is not None:
            self._rich.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._rich is not None:
            self._rich.__exit__(None, None, None)

    def task(self, description: str, total: float, *, unit: str = "", scale: float = 1) -> Task:
        """A task of ``total`` units; plain lines show ``completed / scale`` and ``unit`` (e.g. MiB)."""
        task = Task(self, description, total, unit, scale)
        if self._rich is not None:
            task._rich_id = self._rich.add_task(description, total=total)
        return task

    def print(self, line: str) -> None:
        """A line above the bars (plain text)."""
        _say(self.console, line)

    def _update(self, task: Task) -> None:
        if self._rich is not None:
            self._rich.update(task._rich_id, completed=task.completed)
            return
        now = self.clock()
        with self._lock:
            due = task._due(now, self.step, self.every_s)
        if due:
            _say(self.console, task.line(now))


@contextmanager
def status(console: Console, message: str, *, every_s: float | None = None) -> Iterator[None]:
    """A spinner with ``message`` on a terminal; elsewhere the message as a line now and a reminder
    (``…: still running, 1m00s``) every ``every_s`` seconds (default ``EVERY_S``) until the block ends."""
    every_s = EVERY_S if every_s is None else every_s
    if interactive(console):
        with console.status(message):
            yield
        return
    _say(console, message)
    start, stop = time.monotonic(), threading.Event()
    what = message.rstrip(" .…")

    def remind() -> None:
        while not stop.wait(every_s):
            _say(console, f"{what}: still running, {duration(time.monotonic() - start)}")

    thread = threading.Thread(target=remind, name="sgl-adaptive-status", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
