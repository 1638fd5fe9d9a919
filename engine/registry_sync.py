"""The registry rows a run folder stands for (the folders are the truth; the registry mirrors them): read them from
run.json, metrics.csv, export/report.json and recipe.json, sync one run, rebuild every run."""

from __future__ import annotations

import csv
import json
import logging
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from engine import config, registry, runs
from engine.errors import RunNotFound
from engine.registry import STATUSES
from engine.runfolder import RunFolder
from engine.runrecord import RunRecord
from engine.tables import METRIC_FIELDS, Artifact, EpochMetric, Run, as_utc, dumps

log = logging.getLogger(__name__)


def _parse_time(value: Any) -> datetime | None:
    if value in (None, ""):
        return None
    try:
        if isinstance(value, (int, float)):
            return datetime.fromtimestamp(float(value), timezone.utc)
        return as_utc(datetime.fromisoformat(str(value)))
    except (ValueError, OverflowError, OSError):
        return None


def _number(value: Any, kind: type = float) -> Any:
    if value in (None, ""):
        return None
    try:
        return kind(float(value)) if kind is int else kind(value)
    except (TypeError, ValueError):
        return None


def _mtime(path: Path) -> datetime:
    return datetime.fromtimestamp(path.stat().st_mtime, timezone.utc)


def _run_from_folder(folder: Path, record: RunRecord) -> Run:
    return Run(
        id=folder.name,  # the folder is the run: a copied folder is a run of its own
        name=str(record.name or record.run_id or folder.name),
        dataset_path=record.dataset.path,
        dataset_hash=record.dataset.hash,
        status=record.status if record.status in STATUSES else "failed",
        pid=record.pid,
        pid_started=record.pid_started,
        host=record.host,
        heartbeat=_parse_time(record.heartbeat),
        created_at=_parse_time(record.created_at) or _mtime(RunFolder(folder).run_json),
        started_at=_parse_time(record.started_at),
        finished_at=_parse_time(record.finished_at),
        epochs_planned=record.epochs_planned,
        epochs_done=record.epochs_done,
        best_epoch=record.best_epoch,
        best_dice=record.best_dice,
        best_iou=record.best_iou,
        threshold=record.threshold,
        device=record.device,
        params_json=dumps(record.params),
        error=record.error,
        ready=record.ready,
        ready_reason=record.ready_reason,
    )


def _epochs_from_csv(path: Path, run_id: str) -> list[EpochMetric]:
    rows: dict[int, EpochMetric] = {}
    if not path.exists():
        return []
    try:
        with path.open(newline="", encoding="utf-8") as handle:
            for line in csv.DictReader(handle):
                epoch = _number(line.get("epoch"), int)
                if epoch is None:
                    log.warning("%s: skipping a row without a valid epoch", path)
                    continue
                values = {key: _number(line.get(key)) for key in METRIC_FIELDS}
                rows[epoch] = EpochMetric(run_id=run_id, epoch=epoch, **values)  # a later row wins
    except (OSError, csv.Error, UnicodeDecodeError) as err:
        log.warning("%s: unreadable metrics (%s); epochs skipped", path, err)
        return []
    return [rows[epoch] for epoch in sorted(rows)]


def _resolve_artifact_path(folder: Path, value: str) -> str:
    path = Path(value)
    if path.is_absolute():
        return str(path)
    for candidate in (folder / path, RunFolder(folder).exported(path)):
        if candidate.exists():
            return str(candidate)
    return str(folder / path)


def _artifacts_from_report(path: Path, run_id: str) -> list[Artifact]:
    if not path.exists():
        return []
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
        entries = [*(report.get("artifacts") or []), *(report.get("retired") or [])]
    except (OSError, ValueError, AttributeError) as err:
        log.warning("%s: unreadable report (%s); artifacts skipped", path, err)
        return []
    folder = path.parent.parent
    artifacts = []
    for entry in entries:
        if not isinstance(entry, dict) or not entry.get("kind") or not entry.get("path"):
            log.warning("%s: skipping an artifact without kind or path", path)
            continue
        file_path = _resolve_artifact_path(folder, str(entry["path"]))
        size = _number(entry.get("size_bytes"), int)
        if size is None:
            size = Path(file_path).stat().st_size if Path(file_path).exists() else 0
        artifacts.append(
            Artifact(
                run_id=run_id,
                kind=str(entry["kind"]),
                path=file_path,
                epoch=_number(entry.get("epoch"), int),
                size_bytes=size,
                created_at=_parse_time(entry.get("created_at")) or _mtime(path),
                accepted=bool(entry.get("accepted", False)),
                metrics_json=dumps(entry.get("metrics") if isinstance(entry.get("metrics"), dict) else {}),
            )
        )
    return artifacts


def _recipe_artifact(path: Path, run_id: str) -> list[Artifact]:
    """The inspection recipe of a run folder as an artifact row (as engine.recipe.save_recipe records it)."""
    try:
        recipe = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return []
    return [Artifact(run_id=run_id, kind="recipe", path=str(path), epoch=None, size_bytes=path.stat().st_size,
                     created_at=_mtime(path), accepted=True, metrics_json=dumps(recipe))]


def read_run_folder(folder: Path, info: dict | None = None) -> tuple[Run, list[EpochMetric], list[Artifact]]:
    """The registry rows a run folder stands for (run.json, or `info` in its place, metrics.csv,
    export/report.json, recipe.json); ValueError if run.json is missing or unreadable."""
    try:
        if info is not None and not isinstance(info, dict):
            raise ValueError("not a JSON object")
        run = _run_from_folder(folder, runs.read_record(folder) if info is None else RunRecord.of(info))
    except (RunNotFound, ValueError, TypeError, AttributeError) as err:
        raise ValueError(f"{folder}: run.json is unreadable ({err})") from err
    epochs = _epochs_from_csv(RunFolder(folder).metrics, run.id)
    artifacts = _artifacts_from_report(RunFolder(folder).report, run.id)
    artifacts += _recipe_artifact(RunFolder(folder).recipe, run.id)
    return run, epochs, artifacts


def sync_run(folder: Path, keep_cancel: bool = True, info: dict | None = None) -> None:
    """Make the registry rows of one run exactly what its folder says (the heartbeat, which lives only here, and
    a pending cancel request unless keep_cancel=False, are kept); `info` stands in for an unwritable run.json."""
    registry.replace_run_rows(*read_run_folder(folder, info), keep_cancel=keep_cancel)


def rebuild(runs_dir: Path | None = None) -> int:
    """Recreate the run, epoch and artifact rows from the run folders in runs_dir; return the number of runs."""
    runs_dir = Path(runs_dir if runs_dir is not None else config.RUNS_DIR)
    if not runs_dir.is_dir():
        return 0
    count = 0
    for folder in sorted(p for p in runs_dir.iterdir() if RunFolder(p).run_json.is_file()):
        try:
            sync_run(folder, keep_cancel=False)
        except ValueError as err:
            log.warning("skipping run folder: %s", err)
            continue
        count += 1
    return count
