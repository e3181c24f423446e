"""Progress reporting for long stages: a bar with the stage name and counts, or nothing.

Library functions take a `Progress` and call `with progress.stage("name", total) as advance:`;
the CLI passes a `RichProgress` on a terminal and `NO_PROGRESS` for `--json` or pipes.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator


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


def default_progress(enabled: bool = True) -> Progress:
    return RichProgress() if enabled and sys.stderr.isatty() else NO_PROGRESS
