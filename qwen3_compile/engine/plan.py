"""Network -> serialized plan through Polygraphy's loaders (its config for TensorRT or TensorRT-RTX,
optimisation profiles, a timing cache shared between standard TensorRT builds), with a progress monitor that
reports the builder's phases and cancels the build on Ctrl-C (the plan is then never written)."""

from __future__ import annotations

import signal
import threading
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

from qwen3_compile.backends.tensorrt.profiles import ShapeProfile
from qwen3_compile.engine.log import BuildLog
from qwen3_compile.engine.network import ParsedNetwork
from qwen3_compile.errors import CheckFailedError
from qwen3_compile.progress import NO_PROGRESS, Progress
from qwen3_compile.targets import Target


@dataclass(frozen=True)
class BuiltPlan:
    data: memoryview  # the serialized engine (host memory)
    seconds: float

    @property
    def nbytes(self) -> int:
        return self.data.nbytes


def _progress_monitor(trt: ModuleType, log: BuildLog, cancel: threading.Event, advance):
    class Monitor(trt.IProgressMonitor):
        def __init__(self):
            trt.IProgressMonitor.__init__(self)

        def phase_start(self, phase_name, parent_phase, num_steps):
            parent = f" in {parent_phase}" if parent_phase else ""
            log.note(f"phase {phase_name} ({num_steps} steps){parent}")

        def step_complete(self, phase_name, step):
            return not cancel.is_set()  # False cancels the build

        def phase_finish(self, phase_name):
            if phase_name == "Building engine":
                advance(1)

    return Monitor()


@contextmanager
def _cancel_on_interrupt() -> Iterator[threading.Event]:
    """Ctrl-C sets the event (the monitor then stops TensorRT) instead of waiting inside C++."""
    cancel = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield cancel
        return
    previous = signal.getsignal(signal.SIGINT)

    def handler(signum, frame):
        cancel.set()

    signal.signal(signal.SIGINT, handler)
    try:
        yield cancel
    finally:
        signal.signal(signal.SIGINT, previous)
    if cancel.is_set():
        raise KeyboardInterrupt


@contextmanager
def _quiet_polygraphy() -> Iterator[None]:
    """Polygraphy prints its configuration and failures on stdout; manifest, build.log and our errors hold
    them instead."""
    from polygraphy.logger import G_LOGGER

    with G_LOGGER.verbosity(G_LOGGER.CRITICAL + 1), warnings.catch_warnings():
        # Polygraphy sets a timing cache, which TensorRT-RTX >= 1.2 deprecates (a no-op there)
        warnings.filterwarnings("ignore", category=DeprecationWarning, message=".*[Tt]iming cache")
        yield


def _polygraphy_profiles(profiles: list[ShapeProfile]):
    from polygraphy.backend.trt import Profile

    out = []
    for profile in profiles:
        p = Profile()
        for name, (lo, opt, hi) in profile.shapes.items():
            p.add(name, lo, opt, hi)
        out.append(p)
    return out


def build_plan(
    trt: ModuleType,
    parsed: ParsedNetwork,
    target: Target,
    profiles: list[ShapeProfile],
    timing_cache: Path | None,
    log: BuildLog,
    optimization_level: int | None = None,
    progress: Progress = NO_PROGRESS,
) -> BuiltPlan:
    from polygraphy.backend.trt import EngineBytesFromNetwork

    options = dict(
        profiles=_polygraphy_profiles(profiles),
        load_timing_cache=str(timing_cache) if timing_cache and timing_cache.exists() else None,
        builder_optimization_level=optimization_level,
    )
    if timing_cache is not None:
        timing_cache.parent.mkdir(parents=True, exist_ok=True)
    with _cancel_on_interrupt() as cancel, progress.stage(f"build {target.name} engine", total=1) as advance:
        options["progress_monitor"] = _progress_monitor(trt, log, cancel, advance)
        if trt.__name__ == "tensorrt_rtx":
            from polygraphy.backend.tensorrt_rtx import CreateConfigRTX

            config = CreateConfigRTX(compute_capabilities=[target.compute_capability], **options)
        else:
            from polygraphy.backend.trt import CreateConfig

            config = CreateConfig(**options)
        start = time.perf_counter()
        loader = EngineBytesFromNetwork(
            (parsed.builder, parsed.network, parsed.parser),
            config,
            save_timing_cache=str(timing_cache) if timing_cache else None,
        )
        try:
            with _quiet_polygraphy():
                data = loader()
        except Exception as err:  # Polygraphy raises PolygraphyException("Invalid Engine ...")
            if cancel.is_set():
                raise KeyboardInterrupt from None
            errors = "; ".join(e[:300] + (" ..." if len(e) > 300 else "") for e in log.errors) or str(err)
            raise CheckFailedError(
                f"TensorRT could not build the engine for {target.name}: {errors}",
                fix="read the build log; another MoE lowering (--moe-lowering) or TensorRT version may help.",
            ) from None
        seconds = time.perf_counter() - start
    log.note(f"built in {seconds:.2f} s")
    return BuiltPlan(memoryview(data), seconds)
