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
    progress(0.5, 1.0, "half")
    progress(1.0, 1.0, "done")
    return {"square": value * value, "pid": os.getpid()}


def refuse(progress) -> None:
    """A worker that fails the way the engine fails on bad input."""
    raise EngineError("dataset gone: pass --data DIR")


def slow_with_cleanup(marker: str, progress) -> None:
    """A worker that cleans up in `finally` (as export's staged files do) while it is stopped."""
    try:
        for step in range(600):
            progress(step, 600, "working")
            time.sleep(0.1)
    finally:
        Path(marker).write_text("cleaned up")


def test_result_and_progress_come_back_from_another_process() -> None:
    seen: list[tuple[float, float, str]] = []
    result = jobs.run_isolated(square_with_progress, 7, progress=lambda *call: seen.append(call))
    assert result["square"] == 49 and result["pid"] != os.getpid()
    assert seen[0] == (0.0, 1.0, "starting a worker process")  # at once, before the child has started
    assert [call for call in seen if call[2] != seen[0][2]] == [(0.5, 1.0, "half"), (1.0, 1.0, "done")]


def silent_then_done(seconds: float, progress) -> str:
    """A worker whose only stage says nothing for a while (an export's ONNX step, a benchmark's warm-up)."""
    progress(0.1, 1.0, "a quiet stage")
    time.sleep(seconds)
    return "ok"


def test_a_quiet_stage_still_moves_the_bar_clock() -> None:
    seen: list[tuple[float, float, str]] = []
    assert jobs.run_isolated(silent_then_done, 3.0, progress=lambda *call: seen.append(call)) == "ok"
    quiet = [call for call in seen if call == (0.1, 1.0, "a quiet stage")]
    assert len(quiet) >= 4, seen  # repeated every 0.5 s: the page's bar redraws its elapsed time and estimate


def test_an_engine_error_keeps_its_message() -> None:
    with pytest.raises(EngineError, match="dataset gone: pass --data DIR"):
        jobs.run_isolated(refuse)


def test_a_caller_that_goes_away_stops_the_worker_and_its_cleanup_runs(tmp_path: Path) -> None:
    marker = tmp_path / "marker"

    class PageLeft(Exception):
        pass

    def leave(done: float, total: float, what: str = "") -> None:
        if done / total > 0.005:
            raise PageLeft

    started = time.monotonic()
    with pytest.raises(PageLeft):
        jobs.run_isolated(slow_with_cleanup, str(marker), progress=leave)
    assert marker.read_text() == "cleaned up"
    assert time.monotonic() - started < 40  # stopped, not left to run its 60 s


def test_one_progress_convention_for_counted_and_staged_work() -> None:
    from engine.progress import describe, part

    assert describe(12, 40, "images") == (0.3, "images 12/40")  # counted work shows its counts
    assert describe(0.4, 1.0, "quantizing") == (0.4, "quantizing")  # staged work its stage
    seen: list[tuple[float, float, str]] = []
    part(lambda *call: seen.append(call), 0.6, 0.4, "benchmark: ")(5, 10, "rounds")
    assert seen == [(0.8, 1.0, "benchmark: rounds 5/10")]  # a sub-job fills its share of the bar, with its counts


def test_time_left_follows_the_pace_so_far() -> None:
    from engine.progress import time_left

    assert time_left(0.25, 30.0) == 90.0
    assert time_left(0.01, 30.0) is None and time_left(1.0, 30.0) is None  # too early to say; done
