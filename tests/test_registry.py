"""Registry tests on real databases (no mocks): each runs on a SQLite file under tmp_path and on a fresh
database of a throw-away PostgreSQL server (conftest.postgres)."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
import uuid
from datetime import timedelta
from pathlib import Path

import pytest

from engine import config, registry, registry_sync
from engine import database as registry_db  # the fixture `database` names the URL
from engine.errors import EngineError, RunNotFound

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.slow)])  # a PostgreSQL server: slow
def database(request: pytest.FixtureRequest) -> str | None:
    """The registry's database for one test: None for the SQLite file, or the URL of a new PostgreSQL database."""
    if request.param == "sqlite":
        return None
    return request.getfixturevalue("postgres").create_database(f"registry_{uuid.uuid4().hex[:12]}")


@pytest.fixture(autouse=True)
def runs_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, database: str | None) -> Path:
    """Point the registry at a fresh runs folder and database for each test (subprocesses inherit both)."""
    monkeypatch.setattr(config, "RUNS_DIR", tmp_path / "runs")
    monkeypatch.setenv("DEFECTS_RUNS_DIR", str(tmp_path / "runs"))
    monkeypatch.setattr(config, "DATABASE_URL", database)
    if database:
        monkeypatch.setenv("DEFECTS_DATABASE_URL", database)
    yield tmp_path / "runs"
    registry_db.dispose_engines()


def test_engine_is_cached_and_configured(runs_dir: Path, database: str | None) -> None:
    engine = registry_db.get_engine()
    assert engine is registry_db.get_engine()
    if database is None:  # SQLite: a WAL file in the runs folder, waiting for locks
        assert engine is registry_db.get_engine(runs_dir / "registry.db")
        assert (runs_dir / "registry.db").exists()
        with engine.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
            assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == 30000
    else:  # PostgreSQL: nothing in the runs folder, SERIALIZABLE writes
        assert engine.dialect.name == "postgresql" and not (runs_dir / "registry.db").exists()
        with registry_db.write_session() as s:
            assert s.connection().exec_driver_sql("SHOW transaction_isolation").scalar() == "serializable"


SCHEMA_RACER = """
import sys, time
from engine import database, registry
start_at = float(sys.argv[1])
while time.time() < start_at:
    time.sleep(0.002)
database.get_engine()
registry.upsert_dataset("shared", "/data/shared", "hash", 1, 1, 0)
print("ok")
"""


def test_schema_creation_is_safe_when_processes_start_at_once(runs_dir: Path, database: str | None) -> None:
    start_at = time.time() + 3.0
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = [subprocess.Popen([sys.executable, "-c", SCHEMA_RACER, str(start_at)], cwd=ROOT, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(4)]
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0 and out.strip() == "ok", err
    assert [d.name for d in registry.list_datasets()] == ["shared"]


def test_an_older_registry_gains_the_new_columns(database: str | None) -> None:
    engine = registry_db.get_engine()
    with engine.begin() as conn:  # what an older version made: no readiness or host columns
        for column in ("ready", "ready_reason", "host"):
            conn.exec_driver_sql(f'ALTER TABLE run DROP COLUMN "{column}"')
    registry_db.dispose_engines()
    registry.create_run("old", status="completed")
    registry.update_run("old", ready=True, host="line-3")
    assert registry.get_run("old").ready is True and registry.get_run("old").host == "line-3"


def test_create_update_get_list_runs() -> None:
    run = registry.create_run("20261126-103512-synth", epochs_planned=5, params={"lr": 0.001}, device="cpu")
    assert run.status == "queued" and run.name == "20261126-103512-synth"
    assert run.params == {"lr": 0.001}
    registry.create_run("20261126-110000-other", name="other")
    with pytest.raises(EngineError):
        registry.create_run("20261126-110000-other")

    started = registry.utcnow()
    updated = registry.update_run(
        "20261126-103512-synth", status="running", pid=os.getpid(), heartbeat=started, started_at=started
    )
    assert updated.status == "running" and updated.pid == os.getpid()

    got = registry.get_run("20261126-103512-synth")
    assert got is not None and got.status == "running" and got.error is None
    assert got.started_at == started and got.started_at.tzinfo is not None
    assert registry.get_run("missing") is None

    assert [r.id for r in registry.list_runs()] == ["20261126-110000-other", "20261126-103512-synth"]

    with pytest.raises(RunNotFound):
        registry.update_run("missing", status="failed")
    with pytest.raises(TypeError):
        registry.update_run("20261126-103512-synth", no_such_field=1)
    with pytest.raises(ValueError):
        registry.update_run("20261126-103512-synth", status="exploded")


def test_record_epoch_upsert_replaces() -> None:
    registry.create_run("r1")
    registry.record_epoch("r1", 2, train_loss=0.4, val_dice=0.6, seconds=1.5)
    registry.record_epoch("r1", 1, train_loss=0.9, val_dice=0.3, seconds=1.0, images_per_s=80.0)
    registry.record_epoch("r1", 2, train_loss=0.2, val_dice=0.7, seconds=2.0)  # after resume
    rows = registry.epoch_metrics("r1")
    assert [r.epoch for r in rows] == [1, 2]
    assert rows[1].train_loss == 0.2 and rows[1].val_dice == 0.7 and rows[1].seconds == 2.0
    assert rows[0].images_per_s == 80.0
    with pytest.raises(TypeError):
        registry.record_epoch("r1", 3, accuracy=1.0)


def test_artifacts_replace_same_kind_and_epoch() -> None:
    registry.create_run("r1")
    registry.add_artifact("r1", "onnx", "/x/model.onnx", 100, True, metrics={"parity": 1e-6})
    registry.add_artifact("r1", "onnx", "/x/model2.onnx", 120, True)  # same (run, kind, epoch=None)
    registry.add_artifact("r1", "int8", "/x/model.int8.onnx", 40, False, epoch=3, metrics={"dice": 0.5})
    registry.add_artifact("r1", "int8", "/x/model.int8.e4.onnx", 40, True, epoch=4)
    registry.create_run("r2")
    registry.add_artifact("r2", "onnx", "/y/model.onnx", 100, True)

    arts = registry.list_artifacts("r1")
    assert [(a.kind, a.epoch, a.path) for a in arts] == [
        ("onnx", None, "/x/model2.onnx"),
        ("int8", 3, "/x/model.int8.onnx"),
        ("int8", 4, "/x/model.int8.e4.onnx"),
    ]
    assert arts[1].metrics == {"dice": 0.5} and arts[1].accepted is False
    assert len(registry.list_artifacts()) == 4


def test_delete_run_removes_rows_not_files(runs_dir: Path) -> None:
    registry.create_run("r1")
    registry.create_run("r2")
    folder = runs_dir / "r1"
    folder.mkdir(parents=True)
    (folder / "best.pth").write_bytes(b"x")
    registry.record_epoch("r1", 1, train_loss=1.0)
    registry.record_epoch("r2", 1, train_loss=1.0)
    registry.add_artifact("r1", "onnx", str(folder / "model.onnx"), 1, True)
    registry.delete_run("r1")
    assert registry.get_run("r1") is None
    assert registry.epoch_metrics("r1") == [] and registry.list_artifacts("r1") == []
    assert len(registry.epoch_metrics("r2")) == 1
    assert (folder / "best.pth").exists()


def test_datasets_upsert_by_name_and_find_by_hash() -> None:
    first = registry.upsert_dataset("steel", "/d/steel", "h1", 10, 6, 4)
    second = registry.upsert_dataset("steel", "/d/steel2", "h2", 12, 7, 5, source="imported", details={"k": 1})
    assert first.id == second.id
    assert registry.find_dataset_by_hash("h1") is None
    found = registry.find_dataset_by_hash("h2")
    assert found is not None and found.path == "/d/steel2" and found.details == {"k": 1}
    assert found.source == "imported"
    registry.upsert_dataset("alu", "/d/alu", "h3", 1, 0, 1)
    assert {d.name for d in registry.list_datasets()} == {"steel", "alu"}


def test_training_keeps_an_imported_row_and_never_takes_another_folders_name() -> None:
    registry.upsert_dataset("parts", "/d/parts", "h1", 66, 6, 60, source="imported", details={"layout": "folder"})
    same = registry.note_trained_on("parts", "/d/parts", "h2", 67, 6, 61)  # a folder the user imported
    assert (same.name, same.source, same.details, same.content_hash, same.n_images) == \
        ("parts", "imported", {"layout": "folder"}, "h2", 67)
    other = registry.note_trained_on("parts", "/elsewhere/parts", "h3", 5, 0, 5)  # a folder of the same name
    assert (other.name, other.source, other.path) == ("parts-2", "training", "/elsewhere/parts")
    assert registry.note_trained_on("parts", "/third/parts", "h4", 5, 0, 5).name == "parts-3"
    assert registry.note_trained_on("parts", "/elsewhere/parts", "h3", 5, 0, 5).id == other.id
    assert {d.name: d.path for d in registry.list_datasets()}["parts"] == "/d/parts"


def test_a_plain_folder_of_good_parts_registered_by_training_is_offered(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """Inspect, Review and Train list what dataset_choices gives: a folder of images without images/ counts too."""
    import cv2
    import numpy as np

    from engine.data import dataset_choices

    monkeypatch.setattr(config, "DATA_DIR", tmp_path / "data")
    line = tmp_path / "line"
    line.mkdir()
    cv2.imwrite(str(line / "good_001.png"), np.full((32, 32), 128, np.uint8))
    registry.note_trained_on("line", str(line), "h1", 1, 0, 1)
    registry.note_trained_on("gone", str(tmp_path / "gone"), "h2", 1, 0, 1)  # deleted since
    assert dataset_choices() == {"line": line}


def test_heartbeat_returns_cancel_request() -> None:
    registry.create_run("r1", status="running", pid=os.getpid())
    assert registry.heartbeat("r1") is False
    assert registry.get_run("r1").heartbeat is not None
    registry.request_cancel("r1")
    assert registry.heartbeat("r1") is True
    assert registry.heartbeat("missing") is None
    with pytest.raises(RunNotFound):
        registry.request_cancel("missing")


def test_effective_status() -> None:
    now = registry.utcnow()
    old = now - timedelta(seconds=registry.STALE_AFTER_S + 30)
    very_old = now - timedelta(seconds=registry.QUEUED_STALE_AFTER_S + 30)
    registry.create_run("stale", status="running", pid=None, heartbeat=old, created_at=old)  # no process to check
    started = registry.process_started(os.getpid())
    # Its process is checked alive on this host: however old its heartbeat (a slow start under load), not failed.
    registry.create_run("slow-start", status="queued", pid=os.getpid(), pid_started=started, created_at=very_old)
    registry.create_run("slow-beat", status="running", pid=os.getpid(), pid_started=started, heartbeat=very_old)
    # Its pid now belongs to a later process: the run's own process is gone.
    registry.create_run("reused", status="running", pid=os.getpid(), pid_started=started - 100, heartbeat=now)
    done = subprocess.Popen([sys.executable, "-c", "pass"])
    done.wait()
    registry.create_run("gone", status="running", pid=done.pid, heartbeat=now)
    registry.create_run("live", status="running", pid=os.getpid(), heartbeat=now)
    registry.create_run("queued-old", created_at=very_old)
    registry.create_run("queued-new")
    registry.create_run("finished", status="completed", pid=done.pid, heartbeat=very_old)

    status = {run.id: run for run in registry.list_runs()}
    assert status["stale"].status == "failed"
    assert status["stale"].error.startswith("training process stopped without finishing (no heartbeat since")
    assert status["gone"].status == "failed" and str(done.pid) in status["gone"].error
    assert status["live"].status == "running" and status["live"].error is None
    assert status["slow-start"].status == "queued" and status["slow-beat"].status == "running"
    assert status["reused"].status == "failed" and f"process {os.getpid()} is gone" in status["reused"].error
    assert status["queued-old"].status == "failed"
    assert status["queued-new"].status == "queued"
    assert status["finished"].status == "completed"
    assert registry.get_run("gone").status == "failed"

    # Reading does not write; a heartbeat that resumes makes the run live again.
    registry.update_run("stale", heartbeat=registry.utcnow())
    assert registry.get_run("stale").status == "running"

    # Re-queueing an old run (resume) counts as a sign of life.
    registry.update_run("queued-old", status="queued")
    assert registry.get_run("queued-old").status == "queued"
    registry.update_run("queued-old", heartbeat=very_old)
    assert registry.get_run("queued-old").status == "failed"

    # A pid on another machine says nothing here: such a run is judged by its heartbeat alone.
    registry.create_run("elsewhere", status="running", pid=done.pid, host="another-machine", heartbeat=now)
    assert registry.get_run("elsewhere").status == "running"
    registry.update_run("elsewhere", heartbeat=old)
    assert registry.get_run("elsewhere").status == "failed"
    registry.update_run("elsewhere", heartbeat=now)

    assert sorted(registry.mark_stale()) == ["gone", "queued-old", "reused"]
    stored = registry.update_run("gone")  # returns the stored row
    assert stored.status == "failed" and stored.finished_at is not None


WRITER = """
import sys
from engine import database, registry
run_id, start_at = sys.argv[1], float(sys.argv[2])
database.get_engine()
import time
while time.time() < start_at:
    time.sleep(0.005)
registry.create_run(run_id, status="running", epochs_planned=200)
for epoch in range(1, 201):
    registry.record_epoch(run_id, epoch, train_loss=1.0 / epoch, val_dice=epoch / 200, seconds=0.01)
    registry.heartbeat(run_id)
    registry.update_run(run_id, epochs_done=epoch)
registry.add_artifact(run_id, "onnx", "model.onnx", 1, True)
print("ok")
"""


def test_two_processes_write_at_once(runs_dir: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    start_at = time.time() + 3.0  # both import first, then write at the same moment
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", WRITER, f"proc-{i}", str(start_at)],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
        assert out.strip() == "ok"
    for i in range(2):
        run = registry.get_run(f"proc-{i}")
        assert run is not None and run.epochs_done == 200 and run.heartbeat is not None
        assert [m.epoch for m in registry.epoch_metrics(f"proc-{i}")] == list(range(1, 201))
        assert len(registry.list_artifacts(f"proc-{i}")) == 1


def _write_run_folder(runs_dir: Path, run_id: str, **overrides: object) -> Path:
    folder = runs_dir / run_id
    (folder / "export").mkdir(parents=True)
    info = {
        "run_id": run_id,
        "name": f"name of {run_id}",
        "status": "completed",
        "dataset": {"path": "data/procedural_images", "hash": "abc123"},
        "params": {"epochs": 2, "lr": 0.001},
        "device": "cpu",
        "epochs_planned": 2,
        "epochs_done": 2,
        "best_epoch": 2,
        "best_dice": 0.71,
        "best_iou": 0.55,
        "threshold": 0.45,
        "created_at": "2026-11-26T10:35:12+00:00",
        "started_at": "2026-11-26T10:35:13+00:00",
        "finished_at": "2026-11-26T10:40:00+00:00",
        "error": None,
        **overrides,
    }
    (folder / "run.json").write_text(json.dumps(info))
    (folder / "metrics.csv").write_text(
        "epoch,train_loss,val_loss,val_dice,val_iou,lr,seconds,images_per_s\n"
        "1,0.9,0.8,0.5,0.4,0.001,12.5,40.0\n"
        "2,0.5,0.6,0.71,0.55,0.0005,12.0,\n"
    )
    (folder / "export" / "model.onnx").write_bytes(b"0" * 64)
    report = {
        "artifacts": [
            {"kind": "onnx", "path": "export/model.onnx", "size_bytes": 64, "accepted": True, "epoch": 2,
             "metrics": {"parity_max_abs": 1e-6, "latency_ms": 3.2}},
            {"kind": "int8", "path": "model.int8.onnx", "accepted": False, "epoch": 2, "metrics": {"dice": 0.6}},
        ]
    }
    (folder / "export" / "report.json").write_text(json.dumps(report))
    return folder


def test_rebuild_from_run_folders(runs_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    good = _write_run_folder(runs_dir, "20261126-103512-synth")
    done = subprocess.Popen([sys.executable, "-c", "pass"])
    done.wait()
    _write_run_folder(runs_dir, "20261126-120000-crashed", status="running", pid=done.pid, finished_at=None)
    broken = runs_dir / "20261126-130000-broken"
    broken.mkdir()
    (broken / "run.json").write_text("{not json")
    (runs_dir / "not-a-run").mkdir()

    registry.create_run("20261126-103512-synth", status="failed")  # stale row, replaced
    registry.record_epoch("20261126-103512-synth", 9, train_loss=5.0)

    with caplog.at_level(logging.WARNING, logger="engine.registry"):
        assert registry_sync.rebuild() == 2
    assert "20261126-130000-broken" in caplog.text

    run = registry.get_run("20261126-103512-synth")
    assert run.status == "completed" and run.name == "name of 20261126-103512-synth"
    assert run.dataset_path == "data/procedural_images" and run.dataset_hash == "abc123"
    assert run.params == {"epochs": 2, "lr": 0.001} and run.threshold == 0.45
    assert run.best_epoch == 2 and run.best_dice == 0.71 and run.created_at.hour == 10
    metrics = registry.epoch_metrics(run.id)
    assert [m.epoch for m in metrics] == [1, 2]
    assert metrics[0].seconds == 12.5 and metrics[1].images_per_s is None
    arts = {a.kind: a for a in registry.list_artifacts(run.id)}
    assert Path(arts["onnx"].path) == good / "export" / "model.onnx"
    assert arts["onnx"].accepted and arts["onnx"].metrics["latency_ms"] == 3.2
    assert Path(arts["int8"].path) == good / "model.int8.onnx" and arts["int8"].size_bytes == 0

    crashed = registry.get_run("20261126-120000-crashed")
    assert crashed.status == "failed" and "stopped without finishing" in crashed.error
    assert registry.get_run("20261126-130000-broken") is None

    # Idempotent: a second rebuild replaces rather than duplicates.
    assert registry_sync.rebuild(runs_dir) == 2
    assert len(registry.epoch_metrics(run.id)) == 2 and len(registry.list_artifacts(run.id)) == 2


APP_PAGES = """
import sys, time
from engine import jobs, registry, runstore, train
data, seconds = sys.argv[1], float(sys.argv[2])
# What the Train, Runs and Home pages do while trainings run: start one, watch it, list, register data, cancel.
run_id = jobs.start_training(train.TrainConfig(data=data, epochs=200, base=8, depth=2, crop=32, batch_size=8,
                                               steps_per_epoch=4, init="none", name="from-the-app"))
deadline, rounds = time.time() + seconds, 0
while time.time() < deadline:
    registry.list_datasets(), registry.list_exports(), jobs.active_runs(), runstore.list_runs()
    jobs.progress(run_id)
    registry.upsert_dataset(f"imported-{rounds % 3}", f"/data/imported-{rounds}", f"hash-{rounds}", 10, 2, 8,
                            source="imported")
    rounds += 1
jobs.cancel(run_id)
while registry.get_run(run_id).status in registry.ACTIVE_STATUSES:
    time.sleep(0.2)
print("ok", rounds, registry.get_run(run_id).status)
"""


def _rows() -> dict:
    """Every run, epoch and artifact row as plain values, without row ids and the registry-only heartbeat."""
    runs = {r.id: r.model_dump(exclude={"heartbeat", "cancel_requested"}) for r in registry.list_runs()}
    epochs = {(m.run_id, m.epoch): m.model_dump(exclude={"id"}) for run_id in runs
              for m in registry.epoch_metrics(run_id)}
    artifacts = sorted((a.run_id, a.kind, a.epoch, a.path, a.accepted, a.metrics_json)
                       for a in registry.list_artifacts())
    return {"runs": runs, "epochs": epochs, "artifacts": artifacts}


@pytest.mark.slow
def test_trainings_app_and_api_at_once(runs_dir: Path, tiny_dataset: Path) -> None:
    """Two trainings, the app's pages and the API on one registry at once: no lock or integrity error anywhere,
    every row written, and a rebuild from the run folders gives the same rows."""
    import httpx

    from tests.test_api import uvicorn_server

    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    logs = [runs_dir.parent / f"process-{i}.log" for i in range(3)]
    runs_dir.mkdir(parents=True, exist_ok=True)
    image = next((tiny_dataset / "images").iterdir()).read_bytes()
    trainings = [subprocess.Popen([sys.executable, "-m", "engine", "train", "--data", str(tiny_dataset), "--epochs",
                                   "6", "--base", "8", "--depth", "2", "--crop", "32", "--batch-size", "8",
                                   "--steps-per-epoch", "4", "--init", "none", "--name", f"training-{i}"],
                                  cwd=ROOT, env=env, stdout=logs[i].open("w"), stderr=subprocess.STDOUT)
                 for i in range(2)]
    app = subprocess.Popen([sys.executable, "-c", APP_PAGES, str(tiny_dataset), "15"], cwd=ROOT, env=env,
                           stdout=logs[2].open("w"), stderr=subprocess.STDOUT)
    answers = []
    with uvicorn_server(DEFECTS_RUNS_DIR=str(runs_dir)) as base:
        while app.poll() is None or any(t.poll() is None for t in trainings):
            answers.append(httpx.get(f"{base}/models", timeout=30).status_code)
            answers.append(httpx.post(f"{base}/predict", files={"file": ("part.png", image, "image/png")},
                                      timeout=30).status_code)
    for process, log in zip([*trainings, app], logs):
        text = log.read_text()
        assert process.wait(timeout=60) == 0, text
        for problem in ("locked", "IntegrityError", "UniqueViolation", "SerializationFailure", "not updated",
                        "Traceback"):
            assert problem not in text, text
    assert answers and set(answers) == {200}
    job_logs = [log.read_text()[-3000:] for log in runs_dir.glob("*from-the-app*/train.log")]
    assert logs[2].read_text().split()[-1] == "cancelled", job_logs

    before = _rows()
    names = {run["name"] for run in before["runs"].values()} - {"demo"}  # the app lists the shipped demo run too
    assert names == {"training-0", "training-1", "from-the-app"}
    for run_id, run in before["runs"].items():
        if run["name"].startswith("training-"):
            assert run["status"] == "completed" and run["epochs_done"] == 6
            assert [epoch for (rid, epoch) in before["epochs"] if rid == run_id] == list(range(1, 7))
    assert len({d.name for d in registry.list_datasets()} & {"imported-0", "imported-1", "imported-2"}) == 3
    assert registry_sync.rebuild() == 3
    assert _rows() == before
