"""Run folders: naming, resolving `demo`/`latest`/ids, run.json, metrics.csv and checkpoints."""

from __future__ import annotations

import csv
import io
import json
import re
import secrets
from datetime import datetime, timezone
from functools import lru_cache
from pathlib import Path
from typing import Any

from engine import config, readiness
from engine.errors import RunNotFound
from engine.metrics import (
    DETECTION_GOAL,
    FALSE_ALARM_GOAL,
)
from engine.runfolder import RunFolder
from engine.runrecord import RunRecord
from engine.storage import atomic_write_json, atomic_write_text, file_version

METRIC_COLUMNS = ["epoch", "train_loss", "val_loss", "val_dice", "val_iou", "val_ap", "val_score", "lr", "seconds",
                  "images_per_s", "minutes", "val_images", "val_detection", "val_false_alarm", "val_ready"]
_EPOCH_FILE = re.compile(r"model_epoch_(\d+)\.pth$")


def new_run_id(name: str = "run") -> str:
    """A unique, sortable run id such as 20261126-103512-synth-3f2a."""
    slug = re.sub(r"[^a-zA-Z0-9_-]+", "-", name).strip("-")[:40] or "run"
    return f"{datetime.now():%Y%m%d-%H%M%S}-{slug}-{secrets.token_hex(2)}"


def run_dir(run_id: str) -> Path:
    """Folder of a run id (the shipped demo run lives in the repository)."""
    if run_id == "demo" and not (config.RUNS_DIR / "demo").is_dir():
        return config.DEMO_RUN_DIR
    return config.RUNS_DIR / run_id


def list_run_dirs() -> list[Path]:
    """Run folders with a run.json, newest first (the demo run included)."""
    folders = {p.parent for p in config.RUNS_DIR.glob("*/run.json")}
    if RunFolder(config.DEMO_RUN_DIR).run_json.is_file():
        folders.add(config.DEMO_RUN_DIR)
    return sorted(folders, key=_mtime, reverse=True)


def _mtime(folder: Path) -> float:
    try:
        return folder.stat().st_mtime
    except OSError:  # deleted meanwhile
        return 0.0


def runs_with_models() -> dict[str, Path]:
    """Run id -> folder of every run that has a checkpoint, newest first (the shipped demo as 'demo')."""
    folders = {("demo" if folder == config.DEMO_RUN_DIR else folder.name): folder for folder in list_run_dirs()}
    return {run_id: folder for run_id, folder in folders.items()
            if RunFolder(folder).best.is_file() or epochs_saved(folder)}


def own_runs_with_model() -> list[Path]:
    """Run folders with a best.pth, newest first, the shipped demo excluded (what `latest` picks from)."""
    return [p for p in list_run_dirs() if p != config.DEMO_RUN_DIR and RunFolder(p).best.is_file()]


def newest_ready_run() -> Path | None:
    """The ready run (readiness.verdict) that finished last, the shipped demo excluded; None if there is none."""
    finished = []
    for folder in own_runs_with_model():
        try:
            info = _cached_run_json(RunFolder(folder).run_json, file_version(RunFolder(folder).run_json))
        except (OSError, RunNotFound):
            continue  # deleted or being rewritten right now
        record = RunRecord.of(info)
        if readiness.verdict(record)[0]:
            finished.append((record.finished_at or "", folder))
    return max(finished, key=lambda item: item[0])[1] if finished else None


def newer_not_ready(folder: Path) -> tuple[str, str] | None:
    """(run id, why not ready) of the newest run with a model, where it is newer than `folder` and not ready: the
    run a user most likely expects to answer, and why another does; None otherwise."""
    newest = own_runs_with_model()
    if not newest or newest[0] == folder:
        return None
    try:
        ready, reason = readiness.verdict(read_record(newest[0]))
    except RunNotFound:
        return None
    return None if ready else (newest[0].name, reason or "not ready")


@lru_cache(maxsize=256)
def _cached_run_json(path: Path, version: tuple) -> dict[str, Any]:  # version in the key: a rewrite is re-read
    return read_run_json(path.parent)


def resolve_run(run: str | None) -> Path:
    """Folder of `run`: an id, `demo`, `latest` (newest run with a best.pth) or `ready` (newest ready run).

    `latest` and `ready` fall back to the demo when no run qualifies.
    """
    run = run or "latest"
    if run == "ready":
        ready = newest_ready_run()
        if ready is not None:
            return ready
        run = "demo"
    if run == "latest":
        with_model = own_runs_with_model()
        if with_model:
            return with_model[0]
        run = "demo"
    folder = run_dir(run)
    if not RunFolder(folder).run_json.is_file():
        raise RunNotFound(f"unknown run '{run}'; list runs with `python -m engine runs`")
    return folder


def read_run_json(folder: Path) -> dict[str, Any]:
    """The run.json of a run folder."""
    try:
        return json.loads(RunFolder(folder).run_json.read_text())
    except (OSError, ValueError) as err:
        raise RunNotFound(f"{folder}: run.json missing or unreadable ({err})") from err


def read_record(folder: Path) -> RunRecord:
    """The run.json of a run folder as a RunRecord (what a reader of a run uses)."""
    info = read_run_json(folder)
    if not isinstance(info, dict):
        raise RunNotFound(f"{folder}: run.json is not a JSON object")
    return RunRecord.of(info)


def write_run_json(folder: Path, info: dict[str, Any]) -> None:
    """Atomically replace run.json."""
    info["updated_at"] = datetime.now(timezone.utc).isoformat()
    atomic_write_json(RunFolder(folder).run_json, info)


def epochs_saved(folder: Path) -> list[int]:
    """Epoch numbers that have a model_epoch_N.pth, ascending."""
    return sorted(int(m.group(1)) for p in folder.glob("model_epoch_*.pth") if (m := _EPOCH_FILE.search(p.name)))


def checkpoint_path(folder: Path, epoch: int | str | None = "best") -> Path:
    """Path of a run's checkpoint: `best`, `last`, or an epoch number."""
    if epoch in (None, "best"):
        path = RunFolder(folder).best
        if path.is_file():
            return path
        epoch = "last"
    saved = epochs_saved(folder)
    if epoch == "last":
        if not saved:
            raise RunNotFound(f"run {folder.name} has no checkpoints yet")
        epoch = saved[-1]
    try:
        epoch = int(epoch)
    except (TypeError, ValueError):
        raise RunNotFound(f"epoch must be a number, 'best' or 'last', not '{epoch}'") from None
    path = RunFolder(folder).epoch(epoch)
    if not path.is_file():
        raise RunNotFound(f"run {folder.name} has no epoch {epoch} (saved: {saved or 'none'})")
    return path


def read_metrics(folder: Path) -> list[dict[str, float]]:
    """Rows of metrics.csv as dicts of floats (epoch as int)."""
    path = RunFolder(folder).metrics
    if not path.is_file():
        return []
    rows = []
    with path.open(newline="") as handle:
        for row in csv.DictReader(handle):
            rows.append({k: (int(v) if k == "epoch" else float(v)) for k, v in row.items() if v not in ("", None)})
    return rows


def write_metrics(folder: Path, rows: list[dict[str, float]]) -> None:
    """Atomically rewrite metrics.csv from rows."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=METRIC_COLUMNS, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(RunFolder(folder).metrics, buffer.getvalue())


def delete_run(run_id: str) -> None:
    """Delete a run's folder and its registry rows; refuses the demo run and a run that is still active."""
    import shutil

    from engine import registry
    from engine.errors import EngineError

    if run_id == "demo" or run_dir(run_id).resolve() == config.DEMO_RUN_DIR.resolve():
        raise EngineError("the demo run ships with the app and cannot be deleted")
    row = registry.get_run(run_id)
    folder = config.RUNS_DIR / run_id
    if row is None and not folder.is_dir():
        raise RunNotFound(f"unknown run '{run_id}'; it may already be deleted")
    if row is not None and row.status in registry.ACTIVE_STATUSES:
        raise EngineError(f"run {run_id} is {row.status}; cancel it before deleting")
    if folder.resolve().parent != config.RUNS_DIR.resolve():  # never follow an id out of the runs folder
        raise EngineError(f"'{run_id}' is not a run folder name")
    if folder.is_dir():
        shutil.rmtree(folder)
    registry.delete_run(run_id)


# --------------------------------------------------------------------------------------- goals
# Readiness itself is decided in engine.readiness; these read the goals a run was trained to from its folder.


def goals_of(folder: Path) -> tuple[float, float]:
    """(false-alarm goal, detection goal) of the run in `folder`; the defaults where its run.json cannot be read."""
    try:
        record = read_record(folder)
    except RunNotFound:
        return FALSE_ALARM_GOAL, DETECTION_GOAL
    return readiness.false_alarm_goal(record), readiness.detection_goal(record)


def goal_of(folder: Path) -> float:
    """false_alarm_goal of the run in `folder`; the default goal where its run.json cannot be read."""
    try:
        return readiness.false_alarm_goal(read_record(folder))
    except RunNotFound:
        return FALSE_ALARM_GOAL


