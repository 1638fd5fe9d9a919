"""The one writer of a run's state.

A run folder is the record: run.json (status, cause, readiness, ...), metrics.csv, recipe.json and
export/report.json. Every change is written there first, atomically, and then mirrored into the registry by
`registry_sync.sync_run`, which reads the folder with the same readers `registry rebuild` uses, so the two cannot
disagree. A registry that cannot be written (deleted, full disk, read-only) costs a warning, never the run.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from sqlalchemy.exc import SQLAlchemyError

from engine import config, readiness, registry, registry_sync, runs
from engine.data import register_dataset
from engine.errors import EngineError
from engine.runfolder import RunFolder
from engine.storage import WriteError

log = logging.getLogger(__name__)

ACTIVE = ("queued", "running")
# What a resume may change; kept under "before_resume" so that a resume that fails before its first new epoch
# puts the run back exactly as it was.
RESUMABLE_STATE = ("status", "error", "finished_at", "stop_reason", "ready", "ready_reason", "pid", "pid_started")


def _now() -> str:
    return datetime.now(timezone.utc).isoformat()


def mirror(folder: Path, keep_cancel: bool = True) -> bool:
    """Copy a run folder's state into the registry; returns False (and warns) when the registry cannot be written."""
    try:
        registry_sync.sync_run(folder, keep_cancel=keep_cancel)
        return True
    except (SQLAlchemyError, OSError, ValueError) as err:
        print(f"warning: run {folder.name}: the registry was not updated ({_short(err)}); run.json in {folder} "
              f"holds the record, and `python -m engine registry rebuild` copies it back", file=sys.stderr)
        return False


def _short(err: BaseException) -> str:
    text = str(getattr(err, "orig", None) or err)
    return text.splitlines()[0] if text else type(err).__name__


def save(folder: Path, info: dict[str, Any], history: list[dict[str, float]] | None = None,
         keep_cancel: bool = True) -> dict[str, Any]:
    """Write run.json (and metrics.csv when history is given) atomically, then mirror the run; returns info."""
    if history is not None:
        runs.write_metrics(folder, history)
    runs.write_run_json(folder, info)
    mirror(folder, keep_cancel)
    return info


def update(folder: Path, **fields: Any) -> dict[str, Any]:
    """Merge fields into run.json (a new one if there is none yet) and mirror the run; returns the new run.json."""
    info = runs.read_run_json(folder) if RunFolder(folder).run_json.is_file() else {"run_id": folder.name}
    info.update(fields)
    return save(folder, info)


def trained_elsewhere(info: dict[str, Any]) -> int | None:
    """The pid of another live process of this host that is training this run now, else None."""
    pid = info.get("pid")
    if info.get("status") not in ACTIVE or not isinstance(pid, int) or info.get("host") not in (None, config.host()):
        return None
    if pid in (os.getpid(), os.getppid()):  # this process, or the torchrun or job launcher that started it
        return None
    return pid if registry.pid_alive(pid, info.get("pid_started")) else None


def process_fields(pid: int) -> dict[str, Any]:
    """What run.json records of the process that trains a run: its pid, when it started, and its host."""
    return {"pid": pid, "pid_started": registry.process_started(pid), "host": config.host()}


class Heartbeat:
    """Beats for a run in a thread of its own (registry.heartbeat every HEARTBEAT_EVERY_S) until stopped.

    Started when the training process starts, before its slow imports and data loading, so a run is never judged
    by the heartbeat it was queued with; a registry that cannot be written is skipped (run.json keeps the record).
    """

    def __init__(self, run_id: str) -> None:
        self.run_id, self._stop = run_id, threading.Event()
        # The first beat here, before the caller goes on: its first write imports parts of the database driver
        # lazily, and an import in this thread can wait on the caller's (Python's import lock), however slow.
        self._beat_once()
        self._thread = threading.Thread(target=self._beat, name=f"heartbeat-{run_id}", daemon=True)
        self._thread.start()

    def _beat_once(self) -> None:
        try:
            registry.heartbeat(self.run_id)
        except (SQLAlchemyError, OSError):
            pass

    def _beat(self) -> None:
        while not self._stop.wait(registry.HEARTBEAT_EVERY_S):
            self._beat_once()

    def stop(self) -> None:
        """Stop beating (waits for a beat under way)."""
        self._stop.set()
        self._thread.join()


@contextmanager
def beating(run_id: str) -> Iterator[Heartbeat]:
    """A Heartbeat for run_id while the block runs."""
    beat = Heartbeat(run_id)
    try:
        yield beat
    finally:
        beat.stop()


def queue(folder: Path, **fields: Any) -> dict[str, Any]:
    """Mark a run as queued for a (new or resumed) training process; a resume remembers the state it left."""
    info = runs.read_run_json(folder) if RunFolder(folder).run_json.is_file() else {"run_id": folder.name}
    already_queued = info.get("status") == "queued"  # by jobs.start_training: a cancel asked meanwhile stands
    if info.get("status") not in (None, *ACTIVE):
        info["before_resume"] = {key: info.get(key) for key in (*RESUMABLE_STATE, "epochs_done")}
    info.update(fields, status="queued", error=None, created_at=info.get("created_at") or _now())
    return save(folder, info, keep_cancel=already_queued)


def fail(folder: Path, error: str) -> dict[str, Any] | None:
    """Record that the training process of a run failed, with its cause, in run.json and the registry.

    A resume that failed before its first new epoch puts the run back as it was and records only the error.
    When run.json cannot be written (a read-only folder), the registry still gets the record, the WriteError is
    raised, and `reconcile` copies the registry's cause into run.json once the folder is writable again.
    Returns run.json as written, or None when the run has no run.json (it never started).
    """
    if not RunFolder(folder).run_json.is_file():
        return None
    info = runs.read_run_json(folder)
    before = info.pop("before_resume", None)
    if before is not None and int(info.get("epochs_done") or 0) <= int(before.get("epochs_done") or 0):
        info.update({key: before.get(key) for key in RESUMABLE_STATE}, resume_error=f"{_now()}: {error}")
    else:
        judged = readiness.stopped(f"training failed: {error}")
        info.update(status="failed", error=error, finished_at=_now(), pid=None, pid_started=None, ready=judged.ready,
                    ready_reason=judged.reason)
    try:
        runs.write_run_json(folder, info)
    except WriteError:
        try:
            registry_sync.sync_run(folder, info=info)
        except (SQLAlchemyError, OSError, ValueError):
            pass
        raise
    mirror(folder)
    return info


def cancelled_before_start(folder: Path) -> dict[str, Any]:
    """Record that a run was cancelled while its process was still starting: a resume goes back to the state it
    left; a new run ends cancelled, with nothing trained. Returns run.json as written."""
    info = runs.read_run_json(folder)
    before = info.pop("before_resume", None)
    if before is not None:
        info.update({key: before.get(key) for key in RESUMABLE_STATE}, resume_error=f"{_now()}: cancelled before "
                    "the resumed training started")
    else:
        judged = readiness.stopped("training was cancelled")
        info.update(status="cancelled", stop_reason="cancelled before training started", finished_at=_now(),
                    pid=None, pid_started=None, ready=judged.ready, ready_reason=judged.reason)
    return save(folder, info, keep_cancel=False)


def reconcile(folder: Path) -> bool:
    """A run.json that says queued/running while its process is gone is marked failed, with the cause the registry
    recorded when there is one; returns whether it was."""
    try:
        info = runs.read_run_json(folder)
    except EngineError:
        return False
    pid = info.get("pid")
    if info.get("status") not in ACTIVE or pid is None or registry.pid_alive(int(pid), info.get("pid_started")):
        return False
    row = registry.get_run(folder.name)
    recorded = row is not None and row.status == "failed" and row.error and not row.error.startswith(
        registry.STALE_ERROR)
    fail(folder, row.error if recorded else f"{registry.STALE_ERROR} (process {pid} is gone)")
    return True


def rebuild() -> tuple[int, int]:
    """Rebuild the registry from the folders: reconcile dead runs, mirror every run, re-register the datasets the
    runs used and those under the data folder; returns (runs, datasets)."""
    folders = sorted(p.parent for p in config.RUNS_DIR.glob("*/run.json"))
    for folder in folders:
        reconcile(folder)
    count = registry_sync.rebuild()
    paths = {Path(p) for p in _dataset_paths(folders)}
    if config.DATA_DIR.is_dir():
        paths |= {p for p in config.DATA_DIR.iterdir() if (p / "images").is_dir()}
    datasets = 0
    for path in sorted(paths):
        try:
            register_dataset(path, source="rebuilt")
            datasets += 1
        except EngineError as err:
            log.warning("dataset %s not registered: %s", path, err)
    return count, datasets


def _dataset_paths(folders: list[Path]) -> list[str]:
    paths = []
    for folder in folders:
        try:
            path = runs.read_record(folder).dataset.path
        except EngineError:
            continue
        if path and (Path(path) / "images").is_dir():
            paths.append(str(path))
    return paths


# --------------------------------------------------------------------------------------- tables


def _duration_s(started: Any, finished: Any) -> float | None:
    """Seconds between two ISO timestamps or datetimes (finished missing: until now)."""
    def parse(value: Any) -> datetime | None:
        if value in (None, ""):
            return None
        moment = value if isinstance(value, datetime) else datetime.fromisoformat(str(value))
        return moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)

    try:
        start, end = parse(started), parse(finished) or datetime.now(timezone.utc)
    except ValueError:
        return None
    return round((end - start).total_seconds(), 1) if start else None


def _run_duration(run: Any) -> float | None:
    """Wall time of a registry run: until now while active, until finished_at otherwise (None if unknown)."""
    if run.started_at is None:
        return None
    if run.status in ("queued", "running"):
        return _duration_s(run.started_at, None)
    return _duration_s(run.started_at, run.finished_at) if run.finished_at else None


def _when(value: Any) -> str:
    """A timestamp (datetime or ISO text) as 'YYYY-MM-DD HH:MM' UTC, '' when missing or unreadable."""
    try:
        moment = value if isinstance(value, datetime) else datetime.fromisoformat(str(value))
    except (TypeError, ValueError):
        return ""
    moment = moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)
    return moment.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M")


def refresh() -> None:
    """Bring the registry up to the run folders: mirror a folder it lacks, drop a row whose folder is gone, and
    record a run whose process died."""
    rows = {run.id: run for run in registry.list_runs()}
    folders = {("demo" if folder == config.DEMO_RUN_DIR else folder.name): folder for folder in runs.list_run_dirs()}
    for run_id in rows.keys() - folders.keys():  # the folder is the record: deleted by hand, the run is gone
        registry.delete_run(run_id)
    for run_id, folder in folders.items():
        run = rows.get(run_id)
        if run is None:
            mirror(folder)
        elif run.status == "failed" and (run.error or "").startswith(registry.STALE_ERROR):
            reconcile(folder)  # shown failed because its process is gone: make run.json say so too


def list_runs() -> list[registry.Run]:
    """Every run, newest first, from the registry once it is brought up to the folders (see `refresh`)."""
    refresh()
    return registry.list_runs()


def overview() -> list[dict[str, Any]]:
    """One row per run for tables, newest first, from the registry once it is brought up to the folders."""
    rows: list[dict[str, Any]] = []
    sources = {d.content_hash: d.source for d in reversed(registry.list_datasets())}  # the newest row wins
    for run in list_runs():
        params = run.params
        rows.append({
            "run_id": run.id, "name": run.name, "status": run.status,
            "dataset": Path(run.dataset_path).name if run.dataset_path else "", "dataset_hash": run.dataset_hash,
            # A time-budget run plans no number of epochs: then only the ones done.
            "epochs": f"{run.epochs_done}/{run.epochs_planned}" if run.epochs_planned else f"{run.epochs_done}",
            "best_epoch": run.best_epoch, "best_dice": run.best_dice, "best_iou": run.best_iou,
            "threshold": run.threshold,  # training's best-Dice threshold; recipe.verdict_threshold is the one used
            "preset": params.get("preset"), "crop": params.get("crop"), "batch_size": params.get("batch_size"),
            "lr": params.get("lr"), "device": run.device,
            "duration_s": _run_duration(run), "created_at": _when(run.created_at), "error": run.error,
            "ready": readiness.ready_label(run.status, run.ready), "ready_reason": run.ready_reason or "",
            "validated_on": _validated_on(run.id, run.dataset_path, sources.get(run.dataset_hash)),
        })
    return rows


def _validated_on(run_id: str, dataset_path: str, source: str | None) -> str:
    """What a run's best_dice was measured on: "painted defects" (painted onto good parts), "generated images" (the
    demo, or a set the generator made: images_kind) or "labelled defects" (the user's own)."""
    try:
        painted = runs.read_record(runs.run_dir(run_id)).dataset.val_painted
    except EngineError:
        return ""
    if painted:
        return "painted defects"
    if run_id == "demo":
        return "generated images"
    kind = images_kind(dataset_path, source)
    return "labelled defects" if kind == "real images" else kind


_SOURCE_KINDS = {"painted": "painted defects", "generated": "generated images", "sample": "generated images"}


def images_kind(folder: str | Path | None, source: str | None = None) -> str:
    """What the images of a set are, in words for readiness lines and tables: "generated images", "painted
    defects" (the generator's, on good parts) or "real images"; a manifest `generate` wrote says generated,
    else `source`, else the source the registry has for the folder."""
    from engine import synthset

    if not folder:
        return _SOURCE_KINDS.get(source or "", "real images")
    path = Path(folder).resolve()
    try:
        header = (path / "manifest.csv").read_text(encoding="utf-8").splitlines()[:1]
    except (OSError, UnicodeDecodeError):
        header = []
    source = "generated" if header == [",".join(synthset.MANIFEST_COLUMNS)] else source
    if source is None:
        source = next((d.source for d in registry.list_datasets() if Path(d.path) == path), None)
    return _SOURCE_KINDS.get(source or "", "real images")
