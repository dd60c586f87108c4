"""How long jax spent compiling, so that a status line can separate compile time from prefill and decode.

    with CompileClock() as clock:
        ...run jitted work...
    clock.seconds      # tracing + lowering + XLA compilation + loading executables from the persistent cache
    clock.cache_hits   # programs loaded from the persistent compilation cache instead of compiled

jax reports each of these phases through `jax.monitoring` as a duration event, when the phase ends; one listener,
registered on first use, turns each into the interval it covered and hands it to every clock that is running. The
phases nest (a jit traced inside another's trace) and overlap (the backend compile includes a cache load), so a
clock counts the union of its intervals, not their sum. Work between the events (the program itself) is not
counted, so wall time minus `seconds` is the time spent computing.
"""

from __future__ import annotations

import threading
import time

import jax

# the duration events jax records while turning a function into an executable (jax._src.dispatch, compiler.py)
COMPILE_EVENTS = frozenset({
    "/jax/core/compile/jaxpr_trace_duration",
    "/jax/core/compile/jaxpr_to_mlir_module_duration",
    "/jax/core/compile/backend_compile_duration",
    "/jax/compilation_cache/cache_retrieval_time_sec",
})
CACHE_HIT_EVENT = "/jax/compilation_cache/cache_hits"

_running: list[CompileClock] = []
_lock = threading.Lock()
_registered = False


def _on_duration(event: str, duration: float, **kwargs) -> None:
    if event in COMPILE_EVENTS:
        end = time.perf_counter()
        with _lock:
            for clock in _running:
                clock.intervals.append((end - duration, end))


def _on_event(event: str, **kwargs) -> None:
    if event == CACHE_HIT_EVENT:
        with _lock:
            for clock in _running:
                clock.cache_hits += 1


class CompileClock:
    """Context manager summing the compile events of everything jax compiles while it is open (any thread)."""

    def __init__(self):
        self.intervals: list[tuple[float, float]] = []  # (start, end) of each compile phase, perf_counter seconds
        self.cache_hits = 0

    @property
    def seconds(self) -> float:
        """The time covered by at least one compile phase."""
        total, reach = 0.0, float("-inf")
        for start, end in sorted(self.intervals):
            if end > reach:
                total += end - max(start, reach)
                reach = end
        return total

    def __enter__(self) -> CompileClock:
        global _registered
        with _lock:
            if not _registered:
                jax.monitoring.register_event_duration_secs_listener(_on_duration)
                jax.monitoring.register_event_listener(_on_event)
                _registered = True
            _running.append(self)
        return self

    def __exit__(self, *exc) -> None:
        with _lock:
            _running.remove(self)
