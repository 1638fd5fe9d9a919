"""The run registry through SQLModel: queries over datasets, runs, epoch metrics and artifacts, each in a short
session. The tables are engine/tables.py, the connections engine/database.py, and the rows a run folder stands
for engine/registry_sync.py.

Embedded by default: the SQLite file runs/registry.db. Several processes write it at once (the app, training
jobs, the API), so every connection uses WAL with a busy timeout, every write transaction starts with BEGIN
IMMEDIATE (takes the write lock up front, so read-then-write is atomic and waits instead of failing), and writes
are retried on "database is locked".

Shared: DEFECTS_DATABASE_URL (config.DATABASE_URL, e.g. postgresql+psycopg://...) puts it on a server that
several machines use. Write transactions there are SERIALIZABLE and retried on serialization failures, and
schema creation holds an advisory lock, so processes that start at once do not race.

Every function opens a short session and returns detached objects. All datetimes are timezone-aware UTC in
Python and naive UTC in the database.
"""

from __future__ import annotations

import logging
import os
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy import update
from sqlmodel import Session, col, delete, select

from engine import config
from engine.database import read_session, retry_locked, write_session
from engine.errors import EngineError, RunNotFound
from engine.tables import METRIC_FIELDS, RUN_FIELDS, Artifact, Dataset, EpochMetric, Run, as_utc, dumps, utcnow

log = logging.getLogger(__name__)

# Judged by the heartbeat alone (a run of another host, or one whose process cannot be checked here): the training
# process beats every HEARTBEAT_EVERY_S from its start, so these are far beyond a slow start on a loaded machine
# (84 s measured at load 10-13). A run whose process is checked alive on this host is never shown as failed.
HEARTBEAT_EVERY_S = 5.0
STALE_AFTER_S = 300.0  # a running run without a heartbeat for this long is shown as failed
QUEUED_STALE_AFTER_S = 600.0  # a queued run (or a running one that never beat) after this long
STATUSES = ("queued", "running", "completed", "failed", "cancelled")
ACTIVE_STATUSES = ("queued", "running")
STALE_ERROR = "training process stopped without finishing"


# --------------------------------------------------------------------------------------- datasets


@retry_locked
def upsert_dataset(
    name: str,
    path: str,
    content_hash: str,
    n_images: int,
    n_defective: int,
    n_defect_free: int,
    source: str = "generated",
    details: dict | None = None,
) -> Dataset:
    """Insert a dataset, or update the one with the same name."""
    with write_session() as s:
        dataset = s.exec(select(Dataset).where(Dataset.name == name)).first() or Dataset(name=name)
        dataset.path = str(path)
        dataset.content_hash = content_hash
        dataset.n_images = int(n_images)
        dataset.n_defective = int(n_defective)
        dataset.n_defect_free = int(n_defect_free)
        dataset.source = source
        dataset.details_json = dumps(details)
        s.add(dataset)
        s.commit()
        s.refresh(dataset)
        return dataset


@retry_locked
def note_trained_on(name: str, path: str, content_hash: str, n_images: int, n_defective: int,
                    n_defect_free: int) -> Dataset:
    """Record a folder a run trains on: one already registered keeps its row (name, source, details) with its hash
    and counts brought up to date; a new one is added as "training" under `name`, or `name-2`, ... where another
    folder holds that name."""
    with write_session() as s:
        dataset = s.exec(select(Dataset).where(Dataset.path == str(path))).first()
        if dataset is None:
            taken, free, number = set(s.exec(select(Dataset.name)).all()), name, 1
            while free in taken:
                number += 1
                free = f"{name}-{number}"
            dataset = Dataset(name=free, path=str(path), source="training")
        dataset.content_hash = content_hash
        dataset.n_images, dataset.n_defective = int(n_images), int(n_defective)
        dataset.n_defect_free = int(n_defect_free)
        s.add(dataset)
        s.commit()
        s.refresh(dataset)
        return dataset


@retry_locked
def find_dataset_by_hash(content_hash: str) -> Dataset | None:
    """The newest dataset with this content hash, or None."""
    with read_session() as s:
        query = select(Dataset).where(Dataset.content_hash == content_hash)
        return s.exec(query.order_by(col(Dataset.created_at).desc(), col(Dataset.id).desc())).first()


@retry_locked
def list_datasets() -> list[Dataset]:
    """All datasets, newest first."""
    with read_session() as s:
        query = select(Dataset).order_by(col(Dataset.created_at).desc(), col(Dataset.id).desc())
        return list(s.exec(query).all())


# --------------------------------------------------------------------------------------- runs


def _run_values(fields: dict[str, Any]) -> dict[str, Any]:
    """Check field names and normalise values; `params` (a dict) is accepted for params_json."""
    fields = dict(fields)
    if "params" in fields:
        fields["params_json"] = dumps(fields.pop("params"))
    unknown = set(fields) - RUN_FIELDS
    if unknown:
        raise TypeError(f"unknown Run field(s): {', '.join(sorted(unknown))}")
    if "status" in fields and fields["status"] not in STATUSES:
        raise ValueError(f"unknown run status {fields['status']!r}; expected one of {', '.join(STATUSES)}")
    for key in ("heartbeat", "created_at", "started_at", "finished_at"):
        if isinstance(fields.get(key), datetime):
            fields[key] = as_utc(fields[key])
    if isinstance(fields.get("params_json"), dict):
        fields["params_json"] = dumps(fields["params_json"])
    return fields


def process_started(pid: int) -> float | None:
    """When process pid started, in seconds after this host booted (Linux /proc; None where unknown)."""
    try:
        ticks = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
        return ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def pid_alive(pid: int, started: float | None = None) -> bool:
    """Whether a process with this pid exists on this host (a zombie counts as gone), and, given when it started
    (process_started), is that process and not a later one that got its pid."""
    if pid <= 0:
        return False
    if os.name == "nt":  # os.kill would terminate it on Windows; rely on the heartbeat there
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: exists, owned by someone else
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        if stat.rsplit(")", 1)[1].split()[0] == "Z":
            return False
    except (OSError, IndexError):
        return True
    now_started = process_started(pid) if started is not None else None
    return now_started is None or abs(now_started - started) < 0.05


def _fmt(moment: datetime | None) -> str:
    return as_utc(moment).strftime("%Y-%m-%d %H:%M:%S UTC") if moment else "never"


def stale_reason(run: Run, now: datetime | None = None) -> str | None:
    """Why an active run is considered dead (the error to show), or None if it is not."""
    if run.status not in ACTIVE_STATUSES:
        return None
    now = as_utc(now) or utcnow()
    last = as_utc(run.heartbeat) or as_utc(run.started_at) or as_utc(run.created_at)
    on_this_host = run.host in (None, "", config.host())  # another machine's run is judged by its heartbeat alone
    if run.pid is not None and on_this_host and os.name != "nt":
        if not pid_alive(run.pid, run.pid_started):
            return f"{STALE_ERROR} (no heartbeat since {_fmt(last)}; process {run.pid} is gone)"
        return None  # its process is alive: however late its heartbeat (a slow start, a loaded machine), not failed
    # A running run must beat every STALE_AFTER_S; a queued one (or one that never beat) gets longer.
    limit = STALE_AFTER_S if run.status == "running" and run.heartbeat is not None else QUEUED_STALE_AFTER_S
    if last is not None and (now - last).total_seconds() > limit:
        return f"{STALE_ERROR} (no heartbeat since {_fmt(last)})"
    return None


def _effective(run: Run | None, now: datetime | None = None) -> Run | None:
    """Show a dead active run as failed (on the detached object only, nothing is written)."""
    if run is not None:
        reason = stale_reason(run, now)
        if reason:
            run.status = "failed"
            run.error = reason
    return run


@retry_locked
def create_run(run_id: str, **fields: Any) -> Run:
    """Insert a run (status "queued" unless given); fields are Run columns, or params=dict."""
    values = _run_values(fields)
    values.setdefault("name", run_id)
    with write_session() as s:
        if s.get(Run, run_id) is not None:
            raise EngineError(f"run {run_id!r} already exists in the registry; choose another run id")
        run = Run(id=run_id, **values)
        s.add(run)
        s.commit()
        return run


@retry_locked
def update_run(run_id: str, **fields: Any) -> Run:
    """Set fields of a run and return it as stored; RunNotFound if it does not exist.

    Setting status to "queued" or "running" also sets heartbeat to now unless one is given, so a
    re-queued (resumed) run is not shown as failed because of its old heartbeat.
    """
    values = _run_values(fields)
    if values.get("status") in ACTIVE_STATUSES and "heartbeat" not in values:
        values["heartbeat"] = utcnow()
    with write_session() as s:
        run = s.get(Run, run_id)
        if run is None:
            raise RunNotFound(f"run {run_id!r} not found in the registry; check the run id")
        for key, value in values.items():
            setattr(run, key, value)
        s.add(run)
        s.commit()
        return run


@retry_locked
def get_run(run_id: str) -> Run | None:
    """The run with its effective status (a dead active run shows as failed), or None."""
    with read_session() as s:
        return _effective(s.get(Run, run_id))


@retry_locked
def list_runs() -> list[Run]:
    """All runs, newest first, with effective status."""
    now = utcnow()
    with read_session() as s:
        runs = s.exec(select(Run).order_by(col(Run.created_at).desc(), col(Run.id).desc())).all()
        return [_effective(run, now) for run in runs]


@retry_locked
def heartbeat(run_id: str) -> bool | None:
    """Set the run's heartbeat to now and return whether a cancel was requested (None if the run is unknown)."""
    with write_session() as s:
        statement = (
            update(Run).where(col(Run.id) == run_id).values(heartbeat=utcnow()).returning(Run.cancel_requested)
        )
        flag = s.execute(statement).scalar_one_or_none()
        s.commit()
        return None if flag is None else bool(flag)


@retry_locked
def request_cancel(run_id: str) -> None:
    """Ask the training process of a run to stop at its next heartbeat; RunNotFound if unknown."""
    with write_session() as s:
        result = s.execute(update(Run).where(col(Run.id) == run_id).values(cancel_requested=True))
        s.commit()
    if result.rowcount == 0:
        raise RunNotFound(f"run {run_id!r} not found in the registry; check the run id")


@retry_locked
def mark_stale() -> list[str]:
    """Persist status "failed" (with the reason) for active runs whose process is gone; return their ids."""
    marked = []
    with write_session() as s:
        now = utcnow()
        for run in s.exec(select(Run).where(col(Run.status).in_(ACTIVE_STATUSES))).all():
            reason = stale_reason(run, now)
            if reason:
                run.status, run.error, run.finished_at = "failed", reason, run.finished_at or now
                s.add(run)
                marked.append(run.id)
        s.commit()
    return marked


@retry_locked
def delete_run(run_id: str) -> None:
    """Delete the registry rows of a run, its epochs and artifacts (files are left alone)."""
    with write_session() as s:
        _delete_run_rows(s, run_id)
        s.commit()


def _delete_run_rows(s: Session, run_id: str) -> None:
    s.exec(delete(EpochMetric).where(col(EpochMetric.run_id) == run_id))
    s.exec(delete(Artifact).where(col(Artifact.run_id) == run_id))
    s.exec(delete(Run).where(col(Run.id) == run_id))


# --------------------------------------------------------------------------------------- epochs


@retry_locked
def record_epoch(run_id: str, epoch: int, **metrics: float | None) -> None:
    """Write the metrics of one epoch, replacing an earlier row for the same (run_id, epoch)."""
    unknown = set(metrics) - METRIC_FIELDS
    if unknown:
        raise TypeError(f"unknown epoch metric(s): {', '.join(sorted(unknown))}")
    with write_session() as s:
        query = select(EpochMetric).where(EpochMetric.run_id == run_id, EpochMetric.epoch == int(epoch))
        row = s.exec(query).first() or EpochMetric(run_id=run_id, epoch=int(epoch))
        for key in METRIC_FIELDS:
            value = metrics.get(key)
            setattr(row, key, float(value) if value is not None else None)
        s.add(row)
        s.commit()


@retry_locked
def epoch_metrics(run_id: str) -> list[EpochMetric]:
    """The epoch rows of a run, ordered by epoch."""
    with read_session() as s:
        query = select(EpochMetric).where(EpochMetric.run_id == run_id).order_by(col(EpochMetric.epoch))
        return list(s.exec(query).all())


# --------------------------------------------------------------------------------------- artifacts


def _artifact_query(run_id: str, kind: str, epoch: int | None) -> Any:
    epoch_match = col(Artifact.epoch).is_(None) if epoch is None else col(Artifact.epoch) == epoch
    return select(Artifact).where(Artifact.run_id == run_id, Artifact.kind == kind, epoch_match)


@retry_locked
def add_artifact(
    run_id: str,
    kind: str,
    path: str,
    size_bytes: int,
    accepted: bool,
    epoch: int | None = None,
    metrics: dict | None = None,
) -> Artifact:
    """Record an exported file of a run; replaces the artifact with the same (run_id, kind, epoch)."""
    with write_session() as s:
        for old in s.exec(_artifact_query(run_id, kind, epoch)).all():
            s.delete(old)
        artifact = Artifact(
            run_id=run_id,
            kind=kind,
            path=str(path),
            epoch=epoch,
            size_bytes=int(size_bytes),
            accepted=bool(accepted),
            metrics_json=dumps(metrics),
        )
        s.add(artifact)
        s.commit()
        s.refresh(artifact)
        return artifact


@retry_locked
def list_artifacts(run_id: str | None = None) -> list[Artifact]:
    """Artifacts of one run (or of all runs), oldest first."""
    with read_session() as s:
        query = select(Artifact)
        if run_id is not None:
            query = query.where(Artifact.run_id == run_id)
        return list(s.exec(query.order_by(col(Artifact.created_at), col(Artifact.id))).all())


MODEL_KINDS = ("onnx", "int8")  # artifacts that are model files; recipes are artifacts too, but not exports


def list_exports(run_id: str | None = None) -> list[Artifact]:
    """Exported model files that were kept and are still on disk (no recipes, rejected or replaced files)."""
    return [a for a in list_artifacts(run_id) if a.kind in MODEL_KINDS and a.accepted and Path(a.path).is_file()]


@retry_locked
def replace_run_rows(run: Run, epochs: list[EpochMetric], artifacts: list[Artifact], keep_cancel: bool) -> None:
    """Replace the rows of one run with `run`, its epochs and artifacts (the heartbeat, and a pending cancel
    request where keep_cancel, kept)."""
    with write_session() as s:
        old = s.get(Run, run.id)
        run = Run(**run.model_dump())  # a fresh copy, so a retry starts from a clean object
        if run.status in ACTIVE_STATUSES:  # the heartbeat lives only here; a new active row starts beating now
            run.heartbeat = (old.heartbeat if old is not None else None) or utcnow()
        run.cancel_requested = bool(keep_cancel and old is not None and old.cancel_requested)
        _delete_run_rows(s, run.id)
        s.flush()
        latest: dict[tuple[str, int | None], Artifact] = {}
        for artifact in artifacts:  # keep the last of duplicate (kind, epoch)
            latest[(artifact.kind, artifact.epoch)] = artifact
        s.add_all([run, *(type(row)(**row.model_dump()) for row in [*epochs, *latest.values()])])
        s.commit()
