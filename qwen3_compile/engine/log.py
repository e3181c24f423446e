"""The build log: TensorRT's messages and ours, one file per build.

TensorRT keeps the first logger a process gives it ("the logger passed into createInferBuilder differs
from one already registered ... TensorRT will use the existing one"), so there is one logger per TensorRT
module and process; it writes to whichever log file the current build opened.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType
from typing import TextIO

_LOGGERS: dict[str, object] = {}


class BuildLog:
    """Where a build writes: the file plus the last errors, for the message a user sees."""

    def __init__(self, stream: TextIO | None):
        self.stream = stream
        self.errors: deque[str] = deque(maxlen=8)
        self.start = time.perf_counter()

    def write(self, severity: str, message: str) -> None:
        if severity in ("ERROR", "INTERNAL_ERROR"):
            self.errors.append(message.strip())
        if self.stream is not None:
            self.stream.write(f"[{time.perf_counter() - self.start:8.2f}s] [{severity}] {message.rstrip()}\n")

    def note(self, message: str) -> None:
        self.write("build", message)


_NULL = BuildLog(None)


def trt_logger(trt: ModuleType):
    """The process's logger for this TensorRT module (created once), writing to the active BuildLog."""
    key = trt.__name__
    if key not in _LOGGERS:

        class _Logger(trt.ILogger):
            sink: BuildLog = _NULL

            def __init__(self):
                trt.ILogger.__init__(self)

            def log(self, severity, msg):
                if severity == trt.ILogger.Severity.VERBOSE:  # thousands of lines per layer
                    return
                self.sink.write(str(severity).rsplit(".", 1)[-1], msg)

        _LOGGERS[key] = _Logger()
    return _LOGGERS[key]


@contextmanager
def build_log(trt: ModuleType, path: Path) -> Iterator[BuildLog]:
    """Route TensorRT's messages into `path` while the block runs."""
    logger = trt_logger(trt)
    with open(path, "w") as stream:
        log = BuildLog(stream)
        logger.sink = log
        try:
            yield log
        finally:
            logger.sink = _NULL
