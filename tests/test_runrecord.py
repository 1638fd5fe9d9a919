"""RunRecord, the typed view of run.json: one name, type and default per field, and old or damaged files still read."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from engine import readiness, runs
from engine.errors import RunNotFound
from engine.runrecord import RunRecord


def test_a_record_reads_typed_fields_and_keeps_the_rest() -> None:
    info = {"run_id": "r1", "status": "completed", "ready": False, "ready_reason": "detection 40% below the goal",
            "params": {"max_false_alarm": 0.02, "crop": 192}, "best_epoch": 7, "threshold": 0.65,
            "dataset": {"path": "/data/x", "hash": "abc", "val_painted": True, "counts": {"defective": 4}},
            "wall_seconds": 901.5}
    record = RunRecord.of(info)
    assert (record.run_id, record.status, record.ready, record.best_epoch, record.threshold) == (
        "r1", "completed", False, 7, 0.65)
    assert record.dataset.path == "/data/x" and record.dataset.val_painted and record.dataset.counts == {"defective": 4}
    assert record.param("crop") == 192 and record.param("val_fraction", 0.15) == 0.15
    assert record.model_extra == {"wall_seconds": 901.5}  # fields it does not name pass through
    assert RunRecord.of(record) is record
    assert readiness.false_alarm_goal(record) == readiness.false_alarm_goal(info) == 0.02


def test_an_old_or_damaged_run_json_reads_as_far_as_it_can() -> None:
    """A value of the wrong type reads as the field's default; older runs' names read under today's."""
    record = RunRecord.of({"status": "completed", "pid": "not a number", "ready": "maybe", "threshold": None,
                           "dataset": "/old/layout", "not_ready_reason": "from an older run", "best_val": None})
    assert record.pid is None and record.ready is None and record.threshold == 0.5 and record.best_val == {}
    assert record.dataset.path == "/old/layout" and record.ready_reason == "from an older run"
    assert RunRecord.of({"dataset_path": "/older", "dataset_hash": "h"}).dataset.hash == "h"
    assert readiness.verdict({"status": "completed", "ready": "maybe"}) == (True, None)  # not False: not judged


def test_read_record_refuses_a_run_json_that_is_not_an_object(tmp_path: Path) -> None:
    (tmp_path / "run.json").write_text(json.dumps(["a", "list"]))
    with pytest.raises(RunNotFound, match="not a JSON object"):
        runs.read_record(tmp_path)
    (tmp_path / "run.json").write_text(json.dumps({"run_id": "x", "status": "running"}))
    assert runs.read_record(tmp_path).status == "running"
