"""engine.jobs.run_isolated: heavy page work in a fresh process, with progress, errors and interruption."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from engine import jobs
from engine.errors import EngineError


def square_with_progress(value: int, progress) -> dict:
    """A worker: reports progress twice, answers with its pid (so the test sees it ran elsewhere)."""
    progress("half", 0.5)
    progress("done", 1.0)
    return {"square": value * value, "pid": os.getpid()}


def refuse(progress) -> None:
    """A worker that fails the way the engine fails on bad input."""
    raise EngineError("dataset gone: pass --data DIR")


def slow_with_cleanup(marker: str, progress) -> None:
    """A worker that cleans up in `finally` (as export's staged files do) while it is stopped."""
    try:
        for step in range(600):
            progress("working", step / 600)
            time.sleep(0.1)
    finally:
        Path(marker).write_text("cleaned up")


def test_result_and_progress_come_back_from_another_process() -> None:
    seen: list[tuple[str, float]] = []
    result = jobs.run_isolated(square_with_progress, 7, progress=lambda stage, f: seen.append((stage, f)))
    assert result["square"] == 49 and result["pid"] != os.getpid()
    assert seen == [("half", 0.5), ("done", 1.0)]


def test_an_engine_error_keeps_its_message() -> None:
    with pytest.raises(EngineError, match="dataset gone: pass --data DIR"):
        jobs.run_isolated(refuse)


def test_a_caller_that_goes_away_stops_the_worker_and_its_cleanup_runs(tmp_path: Path) -> None:
    marker = tmp_path / "marker"

    class PageLeft(Exception):
        pass

    def leave(stage: str, fraction: float) -> None:
        if fraction > 0.005:
            raise PageLeft

    started = time.monotonic()
    with pytest.raises(PageLeft):
        jobs.run_isolated(slow_with_cleanup, str(marker), progress=leave)
    assert marker.read_text() == "cleaned up"
    assert time.monotonic() - started < 40  # stopped, not left to run its 60 s
