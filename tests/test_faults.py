"""Faults an operator can cause, with real training processes and real files: each ends in one line on stderr,
a non-zero exit status, and the same state and cause in run.json and in the registry.

Full disk and read-only folder use real mounts (a small tmpfs, a read-only bind mount) and are skipped where
this process may not mount (not root, or a container without the capability).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from engine import config, database, registry, runstore
from tests.timing import scaled, wait_until

pytestmark = pytest.mark.slow

# Epochs of a couple of seconds: long enough to act between two of them, short enough for the suite.
TRAIN = ["--epochs", "3", "--base", "8", "--depth", "2", "--crop", "32", "--batch-size", "8",
         "--steps-per-epoch", "150", "--init", "none"]


class Place:
    """A runs folder of its own, for processes (environment) and for this process's registry reads."""

    def __init__(self, root: Path, data: Path) -> None:
        self.runs, self.data = root, data
        self.env = {**os.environ, "DEFECTS_RUNS_DIR": str(root), "DEFECTS_DATA_DIR": str(data.parent),
                    "PYTHONUNBUFFERED": "1"}

    def engine(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
        """Run `python -m engine ARGS` to the end (timeout: on the reference machine, see tests.timing)."""
        return subprocess.run([sys.executable, "-m", "engine", *args], cwd=config.ROOT, env=self.env,
                              capture_output=True, text=True, timeout=scaled(timeout), check=False)

    def start_training(self, run_id: str, *extra: str) -> subprocess.Popen:
        """A training process in the background."""
        return subprocess.Popen([sys.executable, "-m", "engine", "train", "--data", str(self.data), "--run-id",
                                 run_id, *TRAIN, *extra], cwd=config.ROOT, env=self.env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)

    @contextmanager
    def registry(self) -> Iterator[None]:
        """Point this process's registry (and data folder) at this place for a while."""
        saved = config.RUNS_DIR, config.DATA_DIR
        database.dispose_engines()
        config.RUNS_DIR, config.DATA_DIR = self.runs, self.data.parent
        try:
            yield
        finally:
            database.dispose_engines()
            config.RUNS_DIR, config.DATA_DIR = saved

    def states(self, run_id: str) -> tuple[dict, registry.Run | None]:
        """(run.json, the registry row) of a run."""
        info = json.loads((self.runs / run_id / "run.json").read_text())
        with self.registry():
            return info, registry.get_run(run_id)


def wait_for_epoch(folder: Path, epoch: int, process: subprocess.Popen, timeout: float = 40) -> None:
    """Until metrics.csv holds `epoch` (fails if the process ends first); timeout as in tests.timing.scaled."""
    def reached() -> bool:
        metrics = folder / "metrics.csv"
        if metrics.is_file() and len(metrics.read_text().strip().splitlines()) > epoch:
            return True
        assert process.poll() is None, process.communicate()
        return False

    wait_until(reached, timeout, f"epoch {epoch}", every=0.05)


def finish(process: subprocess.Popen, timeout: float = 60) -> tuple[int, str]:
    """Wait for a process (timeout as in tests.timing.scaled); returns (exit status, stderr)."""
    _out, err = process.communicate(timeout=scaled(timeout))
    return process.returncode, err


def one_line_error(stderr: str) -> str:
    """The error line, after checking it is one line (warnings may come before it) and no traceback."""
    assert "Traceback" not in stderr, stderr
    lines = [line for line in stderr.strip().splitlines() if line.startswith("error:")]
    assert len(lines) == 1, stderr
    return lines[0]


def agree(place: Place, run_id: str, status: str) -> tuple[dict, registry.Run]:
    """run.json and the registry say the same status and cause; returns both."""
    info, row = place.states(run_id)
    assert row is not None, "the registry lost the run"
    assert info["status"] == row.status == status, (info["status"], row.status, info.get("error"), row.error)
    assert info.get("error") == row.error
    return info, row


def can_mount() -> bool:
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    probe = Path(f"/tmp/.mount-probe-{os.getpid()}")
    probe.mkdir(exist_ok=True)
    ok = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(probe)], capture_output=True,
                        check=False).returncode == 0
    if ok:
        subprocess.run(["umount", str(probe)], check=False)
    probe.rmdir()
    return ok


needs_mount = pytest.mark.skipif(not can_mount(), reason="needs root and mount (tmpfs, bind mounts)")


@pytest.fixture
def place(tmp_path: Path, tiny_dataset: Path) -> Place:
    """A runs folder and a copy of the tiny dataset of this test's own."""
    data = tmp_path / "data" / "tiny"
    shutil.copytree(tiny_dataset, data)
    (tmp_path / "runs").mkdir()
    return Place(tmp_path / "runs", data)


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory, tiny_dataset: Path) -> tuple[Path, Path]:
    """A completed run made by a real process: (its runs folder, its dataset)."""
    root = tmp_path_factory.mktemp("finished")
    data = root / "data" / "tiny"
    shutil.copytree(tiny_dataset, data)
    place = Place(root / "runs", data)
    result = place.engine("train", "--data", str(data), "--run-id", "done", "--epochs", "2", "--base", "8",
                          "--depth", "2", "--crop", "32", "--batch-size", "8", "--steps-per-epoch", "4",
                          "--init", "none")
    assert result.returncode == 0, result.stderr
    return root / "runs", data


def copy_of_finished(finished: tuple[Path, Path], tmp_path: Path) -> Place:
    """A Place with a copy of the finished run (and its dataset) and a registry rebuilt from it."""
    runs_dir, data = finished
    shutil.copytree(runs_dir, tmp_path / "runs", ignore=shutil.ignore_patterns("registry.db*"))
    shutil.copytree(data, tmp_path / "data" / "tiny")
    place = Place(tmp_path / "runs", tmp_path / "data" / "tiny")
    run_json = place.runs / "done" / "run.json"
    info = json.loads(run_json.read_text())
    info["dataset"]["path"] = info["params"]["data"] = str(place.data)  # the copy trains on its own dataset
    run_json.write_text(json.dumps(info))
    assert place.engine("registry", "rebuild").returncode == 0
    return place


# ------------------------------------------------------------------------------------------ faults


@needs_mount
def test_full_disk_during_training(tmp_path: Path, tiny_dataset: Path) -> None:
    runs_dir = tmp_path / "runs"
    runs_dir.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(runs_dir)], check=True)
    try:
        data = tmp_path / "data" / "tiny"
        shutil.copytree(tiny_dataset, data)
        place = Place(runs_dir, data)
        process = place.start_training("full")
        wait_for_epoch(runs_dir / "full", 1, process)
        with (runs_dir / "filler").open("wb") as filler:  # the disk fills up during epoch 2
            try:
                while True:
                    filler.write(b"\0" * (1 << 20))
                    filler.flush()
            except OSError:
                pass
        code, stderr = finish(process)
        line = one_line_error(stderr)
        assert code != 0
        assert "no space left on device while writing" in line and "disk is full" in line, line
        info, row = agree(place, "full", "failed")
        assert "no space left on device while writing" in info["error"] and "model_epoch_2.pth" in info["error"]
        assert info["epochs_done"] == 1 and row.epochs_done == 1
        assert not list((runs_dir / "full").glob(".*tmp")), "a temp file was left behind"
    finally:
        subprocess.run(["umount", "-l", str(runs_dir)], check=False)


@needs_mount
def test_read_only_run_folder_during_training(place: Place) -> None:
    process = place.start_training("frozen")
    folder = place.runs / "frozen"
    wait_for_epoch(folder, 1, process)
    subprocess.run(["mount", "--bind", str(folder), str(folder)], check=True)
    try:
        subprocess.run(["mount", "-o", "remount,bind,ro", str(folder)], check=True)
        code, stderr = finish(process)
        line = one_line_error(stderr)
        assert code != 0 and "read-only file system while writing" in line, line
        info, row = place.states("frozen")
        assert info["status"] == "running"  # the folder could not take the record ...
        assert row.status == "failed" and "read-only file system" in row.error  # ... the registry has it
    finally:
        subprocess.run(["umount", str(folder)], check=False)
    assert place.engine("registry", "rebuild").returncode == 0  # writable again: the folder gets the cause
    info, _row = agree(place, "frozen", "failed")
    assert "read-only file system while writing" in info["error"]


def test_registry_deleted_while_training(place: Place) -> None:
    process = place.start_training("orphan")
    wait_for_epoch(place.runs / "orphan", 1, process)
    for name in ("registry.db", "registry.db-wal", "registry.db-shm"):
        (place.runs / name).unlink(missing_ok=True)
    code, stderr = finish(process)
    assert code == 0, stderr
    info, row = agree(place, "orphan", "completed")
    assert info["epochs_done"] == row.epochs_done == 3
    with place.registry():
        assert [m.epoch for m in registry.epoch_metrics("orphan")] == [1, 2, 3]
        (place.runs / "registry.db").unlink()
        assert runstore.rebuild() == (1, 1)  # an idle rebuild brings back the run and its dataset
        assert [d.path for d in registry.list_datasets()] == [str(place.data.resolve())]
        assert registry.get_run("orphan").status == "completed"


def test_dataset_deleted_then_a_failed_resume_leaves_the_run_as_it_was(finished: tuple[Path, Path],
                                                                      tmp_path: Path) -> None:
    place = copy_of_finished(finished, tmp_path)
    before, _row = agree(place, "done", "completed")
    shutil.rmtree(place.data)
    result = place.engine("train", "--resume", "done", "--epochs", "4")
    line = one_line_error(result.stderr)
    assert result.returncode == 2 and str(place.data) in line, line
    info, _row = agree(place, "done", "completed")
    assert {k: info[k] for k in ("ready", "ready_reason", "epochs_done", "finished_at")} == \
        {k: before[k] for k in ("ready", "ready_reason", "epochs_done", "finished_at")}
    assert str(place.data) in info["resume_error"] and "before_resume" not in info


def test_sigkill_then_rebuild_leaves_no_ghost(place: Place) -> None:
    process = place.start_training("killed")
    wait_for_epoch(place.runs / "killed", 1, process)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    info, row = place.states("killed")
    assert info["status"] == "running" and row.status == "failed"  # the registry sees the process is gone
    result = place.engine("registry", "rebuild")
    assert result.returncode == 0, result.stderr
    info, _row = agree(place, "killed", "failed")
    assert f"process {process.pid} is gone" in info["error"]


def test_a_run_that_is_training_cannot_be_resumed_by_a_second_process(place: Place) -> None:
    process = place.start_training("busy")
    try:
        wait_for_epoch(place.runs / "busy", 1, process)
        result = place.engine("train", "--resume", "busy", "--epochs", "400")
        line = one_line_error(result.stderr)
        assert result.returncode == 2 and f"run busy is training now (process {process.pid})" in line, line
        assert json.loads((place.runs / "busy" / "run.json").read_text())["pid"] == process.pid  # still the first's
    finally:
        process.kill()
        process.communicate(timeout=30)


def test_a_damaged_registry_file_is_set_aside_and_rebuilt_from_the_run_folders(finished: tuple[Path, Path],
                                                                               tmp_path: Path) -> None:
    place = copy_of_finished(finished, tmp_path)
    for suffix in ("", "-wal", "-shm"):
        Path(f"{place.runs / 'registry.db'}{suffix}").unlink(missing_ok=True)
    (place.runs / "registry.db").write_text("not a database: a disk error, a bad copy")
    result = place.engine("registry", "rebuild")
    assert result.returncode == 0, result.stderr
    assert "damaged" in result.stderr and "registry rebuilt" in result.stdout
    aside = list(place.runs.glob("registry.db.damaged-*"))
    assert len(aside) == 1 and aside[0].read_text().startswith("not a database")  # kept for a look
    agree(place, "done", "completed")
    listed = place.engine("runs")
    assert listed.returncode == 0 and "done" in listed.stdout, listed.stderr


def test_corrupt_resume_file_is_one_line_and_changes_nothing(finished: tuple[Path, Path], tmp_path: Path) -> None:
    place = copy_of_finished(finished, tmp_path)
    (place.runs / "done" / "resume.pth").write_bytes(b"PK\x03\x04 not a checkpoint")
    before = (place.runs / "done" / "run.json").read_bytes()
    result = place.engine("train", "--resume", "done", "--epochs", "4")
    line = one_line_error(result.stderr)
    assert result.returncode == 2 and "resume.pth is unreadable" in line, line
    assert (place.runs / "done" / "run.json").read_bytes() == before
    agree(place, "done", "completed")
