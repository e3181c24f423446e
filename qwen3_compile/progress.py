"""Progress reporting for long stages: a bar with the stage name and counts, or nothing.

Library functions take a `Progress` and call `with progress.stage("name", total) as advance:`;
the CLI passes a `RichProgress` on a terminal and `NO_PROGRESS` for `--json` or pipes; long stages in
logs (the export of a large checkpoint, layer by layer) use `LineProgress`: one line per step with an ETA.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Callable, Iterator
from typing import TextIO


class Progress:
    """No-op reporter (also the interface)."""

    @contextlib.contextmanager
    def stage(self, name: str, total: int | None = None, unit: str = "") -> Iterator[Callable[[int], None]]:
        yield lambda n=1: None


NO_PROGRESS = Progress()


class RichProgress(Progress):
    """A rich progress bar on stderr, one task per stage."""

    def __init__(self) -> None:
        from rich.console import Console

        self.console = Console(stderr=True)

    @contextlib.contextmanager
    def stage(self, name: str, total: int | None = None, unit: str = "") -> Iterator[Callable[[int], None]]:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )
        from rich.progress import Progress as _Bar

        columns = [
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn(unit),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
        ]
        with _Bar(*columns, console=self.console, transient=False) as bar:
            task = bar.add_task(name, total=total)
            yield lambda n=1: bar.advance(task, n)


def eta_seconds(done: int, total: int | None, elapsed: float) -> float | None:
    """Time left at the pace so far (None before the first step or without a total)."""
    if not total or done <= 0:
        return None
    return elapsed / done * max(total - done, 0)


def format_duration(seconds: float) -> str:
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


class LineProgress(Progress):
    """One line per step on `stream` (default stderr): `name: 3/24 layers, 0:41 elapsed, ETA 4:52`."""

    def __init__(self, stream: TextIO | None = None, clock: Callable[[], float] = time.monotonic):
        self.stream, self.clock = stream, clock

    @contextlib.contextmanager
    def stage(self, name: str, total: int | None = None, unit: str = "") -> Iterator[Callable[[int], None]]:
        start, done = self.clock(), 0

        def advance(n: int = 1) -> None:
            nonlocal done
            done += n
            elapsed = self.clock() - start
            count = f"{done}/{total}" if total else str(done)
            line = f"{name}: {count} {unit}".rstrip() + f", {format_duration(elapsed)} elapsed"
            eta = eta_seconds(done, total, elapsed)
            if eta is not None:
                line += f", ETA {format_duration(eta)}"
            print(line, file=self.stream or sys.stderr, flush=True)

        yield advance


def default_progress(enabled: bool = True) -> Progress:
    return RichProgress() if enabled and sys.stderr.isatty() else NO_PROGRESS
