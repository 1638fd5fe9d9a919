"""Deadlines for tests that wait on events (a file, a registry row, a log line), scaled by how slow this machine is
now: a loaded 2-core machine or a CI runner takes several times longer than a workstation, and a test must not
fail for that."""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable

# Seconds the probe takes on an unloaded 2-core AMD EPYC (best 0.028 s, typical 0.05 s): factor 1 there.
REFERENCE_S = 0.05
_measured: list[float] = []


def _probe() -> float:
    """Seconds of a fixed piece of pure-Python work (the kind of CPU time training start-up and the registry use)."""
    start, total = time.perf_counter(), 0
    for i in range(1_000_000):
        total += i * i
    return time.perf_counter() - start


def slowness() -> float:
    """How many times slower than the reference machine this one is now (at least 1; DEFECTS_TEST_SLOWNESS sets
    it). Measured once per test session, as the median of five probes, so a loaded machine counts as slow."""
    if os.environ.get("DEFECTS_TEST_SLOWNESS"):
        return max(1.0, float(os.environ["DEFECTS_TEST_SLOWNESS"]))
    if not _measured:
        _measured.append(max(1.0, statistics.median(_probe() for _ in range(5)) / REFERENCE_S))
    return _measured[0]


def scaled(seconds: float) -> float:
    """A deadline of `seconds` on the reference machine, made generous (x3) and scaled by slowness()."""
    return 3 * seconds * slowness()


def wait_until(predicate: Callable[[], object], seconds: float, what: str, every: float = 0.2) -> None:
    """Poll predicate until it is true; AssertionError naming `what` once scaled(seconds) have passed."""
    limit = scaled(seconds)
    deadline = time.monotonic() + limit
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached in {limit:.0f} s (slowness {slowness():.1f})")
        time.sleep(every)
