"""``sgl_adaptive.progress``: plain periodic lines when stderr is not a terminal, rich bars when it is."""

from __future__ import annotations

import io
import re
import time

from rich.console import Console

from sgl_adaptive import progress
from sgl_adaptive.progress import ProgressDisplay, duration, status


def log_console() -> Console:
    return Console(file=io.StringIO(), width=100)  # a file, not a terminal: what `2> log` gives


def lines(console: Console) -> list[str]:
    return console.file.getvalue().splitlines()


def test_a_task_prints_a_line_every_tenth_and_once_at_the_end():
    console, clock = log_console(), [0.0]
    with ProgressDisplay(console, clock=lambda: clock[0]) as display:
        task = display.task("eval", 445, unit="examples")
        for _ in range(445):
            clock[0] += 0.1
            task()
        task.advance(0)  # after the end: nothing more
    out = lines(console)
    assert len(out) == 10, out  # 10%, 20%, ... 90%, then 445/445
    assert out[0] == "eval: 45/445 examples (10%), 4s, eta 40s"
    assert out[-1] == "eval: 445/445 examples (100%), 44s"
    percents = [int(re.search(r"\((\d+)%\)", line).group(1)) for line in out]
    assert percents == sorted(percents) and percents[-1] == 100


def test_slow_work_prints_at_least_every_30_seconds():
    console, clock = log_console(), [0.0]
    with ProgressDisplay(console, clock=lambda: clock[0]) as display:
        task = display.task("sampling prompts", 1000, unit="prompts")
        for _ in range(20):  # 2% of the total in 200 s: no tenth crossed, but 30 s passed
            clock[0] += 10.0
            task()
    out = lines(console)
    assert len(out) == 6 and out[0].startswith("sampling prompts: 3/1000 prompts (0%), 30s, eta "), out


def test_bytes_are_shown_in_mib():
    console = log_console()
    with ProgressDisplay(console) as display:
        task = display.task("assembling GGUF", 50 * 2**20, unit="MiB", scale=2**20)
        task.update(25 * 2**20)
    assert lines(console)[0].startswith("assembling GGUF: 25.0/50.0 MiB (50%), 0s")


def test_a_status_prints_its_message_then_reminders():
    console = log_console()
    with status(console, "converting GGUF (about 1–2 minutes) …", every_s=0.05):
        time.sleep(0.3)
    out = lines(console)
    assert out[0] == "converting GGUF (about 1–2 minutes) …"
    assert len(out) >= 3 and all(
        x.startswith("converting GGUF (about 1–2 minutes): still running, ") for x in out[1:]
    )
    settled = len(lines(console))
    time.sleep(0.15)
    assert len(lines(console)) == settled  # no reminder after the block


def test_a_terminal_gets_rich_bars_not_plain_lines(monkeypatch):
    monkeypatch.setattr(progress, "EVERY_S", 0.0)
    console = Console(file=io.StringIO(), force_terminal=True, width=100)
    with ProgressDisplay(console) as display:
        task = display.task("eval", 10)
        for _ in range(10):
            task()
    assert display.interactive
    assert "eval: " not in console.file.getvalue() and "━" in console.file.getvalue()


def test_durations():
    assert [duration(s) for s in (0, 45.9, 130, 3900)] == ["0s", "45s", "2m10s", "1h05m"]
