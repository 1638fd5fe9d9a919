"""The run registry through SQLModel: datasets, runs, epoch metrics, artifacts.

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

import csv
import functools
import json
import logging
import os
import random
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, TypeVar

import sqlalchemy
from sqlalchemy import UniqueConstraint, event, update
from sqlalchemy.exc import ArgumentError, DatabaseError, DBAPIError, NoSuchModuleError, OperationalError
from sqlalchemy.types import DateTime, TypeDecorator
from sqlmodel import Field, Session, SQLModel, col, delete, select

from engine import config
from engine.errors import EngineError, RunNotFound
from engine.runfolder import RunFolder

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
LOCK_RETRIES = 6


def utcnow() -> datetime:
    """The current time as an aware UTC datetime."""
    return datetime.now(timezone.utc)


def as_utc(value: datetime | None) -> datetime | None:
    """Return value as an aware UTC datetime (naive values are taken to be UTC already)."""
    if value is None:
        return None
    if value.tzinfo is None:
        return value.replace(tzinfo=timezone.utc)
    return value.astimezone(timezone.utc)


class UTCDateTime(TypeDecorator):
    """DateTime column stored as naive UTC and read back as aware UTC."""

    impl = DateTime
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        """Aware or naive-UTC datetime -> naive UTC for the file."""
        value = as_utc(value)
        return value.replace(tzinfo=None) if value is not None else None

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        """Naive UTC from the file -> aware UTC."""
        return as_utc(value)


# --------------------------------------------------------------------------------------- tables


class Dataset(SQLModel, table=True):
    """A dataset folder known to the app, generated or imported."""

    id: int | None = Field(default=None, primary_key=True)
    name: str = Field(unique=True)
    path: str
    content_hash: str = Field(index=True)
    n_images: int = 0
    n_defective: int = 0
    n_defect_free: int = 0
    created_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)
    source: str = "generated"  # "generated" / "imported"
    details_json: str = "{}"

    @property
    def details(self) -> dict:
        """details_json parsed."""
        return _loads(self.details_json)


class Run(SQLModel, table=True):
    """One training run; id is the run folder name."""

    id: str = Field(primary_key=True)
    name: str = ""
    dataset_path: str = ""
    dataset_hash: str = ""
    status: str = Field(default="queued", index=True)
    pid: int | None = None
    pid_started: float | None = None  # when process pid started (registry.process_started): a reused pid is not it
    heartbeat: datetime | None = Field(default=None, sa_type=UTCDateTime)
    host: str | None = None  # the machine pid belongs to
    created_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)
    started_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    finished_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    epochs_planned: int = 0
    epochs_done: int = 0
    best_epoch: int | None = None
    best_dice: float | None = None
    best_iou: float | None = None
    threshold: float = 0.5
    device: str = ""
    params_json: str = "{}"
    error: str | None = None
    cancel_requested: bool = False
    ready: bool | None = None  # set when training finishes: its recipe met its goal on validation
    ready_reason: str | None = None  # why a run is not ready

    @property
    def params(self) -> dict:
        """params_json parsed."""
        return _loads(self.params_json)


class EpochMetric(SQLModel, table=True):
    """Metrics of one epoch of one run; (run_id, epoch) is unique."""

    __table_args__ = (UniqueConstraint("run_id", "epoch"),)

    id: int | None = Field(default=None, primary_key=True)
    run_id: str = Field(index=True)
    epoch: int
    train_loss: float | None = None
    val_loss: float | None = None
    val_dice: float | None = None
    val_iou: float | None = None
    lr: float | None = None
    seconds: float | None = None  # wall time of this epoch
    images_per_s: float | None = None
    val_ap: float | None = None  # image-level average precision on validation
    val_score: float | None = None  # what the best epoch is chosen by


class Artifact(SQLModel, table=True):
    """An exported model file of a run (ONNX, INT8, ...) with its checks; (run_id, kind, epoch) is unique."""

    id: int | None = Field(default=None, primary_key=True)
    run_id: str = Field(index=True)
    kind: str  # "onnx", "int8", ...
    path: str
    epoch: int | None = None
    size_bytes: int = 0
    created_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)
    accepted: bool = False
    metrics_json: str = "{}"  # parity, dice, latency, ...

    @property
    def metrics(self) -> dict:
        """metrics_json parsed."""
        return _loads(self.metrics_json)


TABLES = [Dataset.__table__, Run.__table__, EpochMetric.__table__, Artifact.__table__]
RUN_FIELDS = set(Run.model_fields)
METRIC_FIELDS = set(EpochMetric.model_fields) - {"id", "run_id", "epoch"}


def _loads(text: str | None) -> dict:
    try:
        value = json.loads(text or "{}")
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def _dumps(value: Any) -> str:
    return json.dumps(value if value is not None else {}, default=str, sort_keys=True)


# --------------------------------------------------------------------------------------- engine

_engines: dict[tuple[int, str], tuple[sqlalchemy.Engine, sqlalchemy.Engine, tuple[int, int] | None]] = {}
_engines_lock = threading.Lock()
SCHEMA_LOCK = 20261204  # the PostgreSQL advisory lock that serialises schema creation
# PostgreSQL's codes for a transaction to run again: serialization failure, deadlock, and a unique row that a
# concurrent transaction inserted first (the retry reads it and updates it instead).
RETRY_SQLSTATES = ("40001", "40P01", "23505")


def _configure(engine: sqlalchemy.Engine) -> None:
    """Set the pragmas on every new connection and let us issue BEGIN ourselves."""

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, connection_record: Any) -> None:
        dbapi_connection.isolation_level = None  # the pysqlite driver must not BEGIN on its own
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA busy_timeout=30000")  # first, so switching to WAL waits too
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")  # safe with WAL; commits need no fsync each
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(connection: sqlalchemy.Connection) -> None:
        mode = connection.get_execution_options().get("sqlite_begin", "")
        connection.exec_driver_sql(f"BEGIN {mode}".strip())


def _is_transient(err: DBAPIError) -> bool:
    """Whether a failed transaction should simply run again: SQLite locked, or a PostgreSQL conflict."""
    code = getattr(err.orig, "sqlstate", None)
    if code is not None:
        return code in RETRY_SQLSTATES
    text = str(err.orig or err).lower()
    return isinstance(err, OperationalError) and ("locked" in text or "busy" in text)


F = TypeVar("F", bound=Callable[..., Any])


def _retry_locked(fn: F) -> F:
    """Retry fn a few times with backoff when the database asks for it (locked, or a serialization conflict)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        for attempt in range(LOCK_RETRIES):
            try:
                return fn(*args, **kwargs)
            except DBAPIError as err:
                if attempt == LOCK_RETRIES - 1 or not _is_transient(err):
                    raise
                delay = 0.05 * 2**attempt + random.uniform(0, 0.05)
                log.warning("registry busy in %s (%s), retrying in %.2f s", fn.__name__,
                            getattr(err.orig, "sqlstate", None) or "locked", delay)
                time.sleep(delay)
        raise AssertionError("unreachable")

    return wrapper  # type: ignore[return-value]


def _identity(path: Path) -> tuple[int, int] | None:
    try:
        stat = path.stat()
    except FileNotFoundError:
        return None
    return stat.st_dev, stat.st_ino


def _engines_for(path: Path | None) -> tuple[sqlalchemy.Engine, sqlalchemy.Engine]:
    """(reader, writer) engines of the registry: the server of config.DATABASE_URL, else the SQLite file at path
    (default config.registry_path()), whose writer starts transactions with BEGIN IMMEDIATE.

    A registry file deleted or replaced under a running process is noticed here (one stat per session): the old
    engine is dropped and the file reopened with its schema, so later writes reach the file others read.
    """
    if path is None and config.DATABASE_URL:
        return _server_engines(config.DATABASE_URL)
    path = Path(path if path is not None else config.registry_path()).expanduser()
    key = (os.getpid(), str(path.resolve()))
    with _engines_lock:
        cached = _engines.get(key)
        identity = _identity(path)
        if cached is not None and (identity is None or identity != cached[2]):
            log.warning("%s was deleted or replaced; reopening it", path)
            cached[0].dispose()
            del _engines[key]
            cached = None
        if cached is None:
            path.parent.mkdir(parents=True, exist_ok=True)
            if identity is None:  # a write-ahead log left by a deleted file must not be replayed into a new one
                for suffix in ("-wal", "-shm"):
                    Path(f"{path}{suffix}").unlink(missing_ok=True)
            try:
                engine, writer = _open_sqlite(key[1])
            except DatabaseError as err:
                if not _not_a_database(err):
                    raise
                _set_aside(path)  # the registry only mirrors the run folders: start a new one, rebuilt from them
                engine, writer = _open_sqlite(key[1])
            cached = _engines[key] = (engine, writer, _identity(path))
        return cached[0], cached[1]


def _open_sqlite(path: str) -> tuple[sqlalchemy.Engine, sqlalchemy.Engine]:
    """(reader, writer) engines of a SQLite file, its schema created or brought up to date."""
    engine = sqlalchemy.create_engine(f"sqlite:///{path}", connect_args={"timeout": 30, "check_same_thread": False})
    _configure(engine)
    writer = engine.execution_options(sqlite_begin="IMMEDIATE")
    try:
        _retry_locked(_create_schema)(writer)
    except BaseException:
        engine.dispose()
        raise
    return engine, writer


def _not_a_database(err: DatabaseError) -> bool:
    text = str(err.orig).lower()
    return "file is not a database" in text or "malformed" in text


def _set_aside(path: Path) -> None:
    """Rename a damaged registry file out of the way (kept for a look), with its journal files; say so."""
    aside = path.with_name(f"{path.name}.damaged-{datetime.now(timezone.utc):%Y%m%d-%H%M%S}")
    try:
        os.rename(path, aside)
        for suffix in ("-wal", "-shm"):
            Path(f"{path}{suffix}").unlink(missing_ok=True)
    except OSError as err:
        raise EngineError(f"the run registry {path} is damaged and cannot be moved aside ({err.strerror or err}); "
                          "delete it, then run `python -m engine registry rebuild`") from None
    log.warning("the run registry %s was damaged; moved to %s and started anew (run `python -m engine registry "
                "rebuild` to copy every run folder back into it)", path, aside.name)


def _server_engines(url: str) -> tuple[sqlalchemy.Engine, sqlalchemy.Engine]:
    """(reader, writer) engines of a database server; the writer's transactions are SERIALIZABLE."""
    key = (os.getpid(), url)
    with _engines_lock:
        if key not in _engines:
            try:
                engine = sqlalchemy.create_engine(url, pool_pre_ping=True)
            except (ArgumentError, NoSuchModuleError, ImportError) as err:
                raise EngineError(f"DEFECTS_DATABASE_URL is not a usable database URL ({err}); for PostgreSQL "
                                  "use postgresql+psycopg://USER:PASSWORD@HOST:PORT/DATABASE") from None
            writer = engine.execution_options(isolation_level="SERIALIZABLE")
            _retry_locked(_create_schema)(engine)
            _engines[key] = (engine, writer, None)
        return _engines[key][0], _engines[key][1]


def _create_schema(engine: sqlalchemy.Engine) -> None:
    """Create the tables, and the columns an older version lacked, in one transaction that processes starting at
    once take in turn (SQLite: BEGIN IMMEDIATE; PostgreSQL: an advisory lock), so it is idempotent and safe."""
    with engine.begin() as connection:
        if connection.dialect.name == "postgresql":
            connection.exec_driver_sql(f"SELECT pg_advisory_xact_lock({SCHEMA_LOCK})")
        SQLModel.metadata.create_all(connection, tables=TABLES)
        inspector = sqlalchemy.inspect(connection)
        for table in TABLES:
            present = {column["name"] for column in inspector.get_columns(table.name)}
            for column in table.columns:
                if column.name not in present:  # all added columns are nullable
                    kind = column.type.compile(dialect=connection.dialect)
                    connection.exec_driver_sql(f'ALTER TABLE "{table.name}" ADD COLUMN "{column.name}" {kind}')


def get_engine(path: Path | None = None) -> sqlalchemy.Engine:
    """The cached engine of the registry (config.DATABASE_URL, else the SQLite file at path, by default
    config.registry_path()); tables created on first use."""
    return _engines_for(path)[0]


def dispose_engines() -> None:
    """Close every cached engine of this process (tests; after changing config.RUNS_DIR)."""
    with _engines_lock:
        for engine, _writer, _file in _engines.values():
            engine.dispose()
        _engines.clear()


def _read() -> Session:
    return Session(_engines_for(None)[0], expire_on_commit=False)


def _write() -> Session:
    return Session(_engines_for(None)[1], expire_on_commit=False)


# --------------------------------------------------------------------------------------- datasets


@_retry_locked
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
    with _write() as s:
        dataset = s.exec(select(Dataset).where(Dataset.name == name)).first() or Dataset(name=name)
        dataset.path = str(path)
        dataset.content_hash = content_hash
        dataset.n_images = int(n_images)
        dataset.n_defective = int(n_defective)
        dataset.n_defect_free = int(n_defect_free)
        dataset.source = source
        dataset.details_json = _dumps(details)
        s.add(dataset)
        s.commit()
        s.refresh(dataset)
        return dataset


@_retry_locked
def note_trained_on(name: str, path: str, content_hash: str, n_images: int, n_defective: int,
                    n_defect_free: int) -> Dataset:
    """Record a folder a run trains on: one already registered keeps its row (name, source, details) with its hash
    and counts brought up to date; a new one is added as "training" under `name`, or `name-2`, ... where another
    folder holds that name."""
    with _write() as s:
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


@_retry_locked
def find_dataset_by_hash(content_hash: str) -> Dataset | None:
    """The newest dataset with this content hash, or None."""
    with _read() as s:
        query = select(Dataset).where(Dataset.content_hash == content_hash)
        return s.exec(query.order_by(col(Dataset.created_at).desc(), col(Dataset.id).desc())).first()


@_retry_locked
def list_datasets() -> list[Dataset]:
    """All datasets, newest first."""
    with _read() as s:
        query = select(Dataset).order_by(col(Dataset.created_at).desc(), col(Dataset.id).desc())
        return list(s.exec(query).all())


# --------------------------------------------------------------------------------------- runs


def _run_values(fields: dict[str, Any]) -> dict[str, Any]:
    """Check field names and normalise values; `params` (a dict) is accepted for params_json."""
    fields = dict(fields)
    if "params" in fields:
        fields["params_json"] = _dumps(fields.pop("params"))
    unknown = set(fields) - RUN_FIELDS
    if unknown:
        raise TypeError(f"unknown Run field(s): {', '.join(sorted(unknown))}")
    if "status" in fields and fields["status"] not in STATUSES:
        raise ValueError(f"unknown run status {fields['status']!r}; expected one of {', '.join(STATUSES)}")
    for key in ("heartbeat", "created_at", "started_at", "finished_at"):
        if isinstance(fields.get(key), datetime):
            fields[key] = as_utc(fields[key])
    if isinstance(fields.get("params_json"), dict):
        fields["params_json"] = _dumps(fields["params_json"])
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


@_retry_locked
def create_run(run_id: str, **fields: Any) -> Run:
    """Insert a run (status "queued" unless given); fields are Run columns, or params=dict."""
    values = _run_values(fields)
    values.setdefault("name", run_id)
    with _write() as s:
        if s.get(Run, run_id) is not None:
            raise EngineError(f"run {run_id!r} already exists in the registry; choose another run id")
        run = Run(id=run_id, **values)
        s.add(run)
        s.commit()
        return run


@_retry_locked
def update_run(run_id: str, **fields: Any) -> Run:
    """Set fields of a run and return it as stored; RunNotFound if it does not exist.

    Setting status to "queued" or "running" also sets heartbeat to now unless one is given, so a
    re-queued (resumed) run is not shown as failed because of its old heartbeat.
    """
    values = _run_values(fields)
    if values.get("status") in ACTIVE_STATUSES and "heartbeat" not in values:
        values["heartbeat"] = utcnow()
    with _write() as s:
        run = s.get(Run, run_id)
        if run is None:
            raise RunNotFound(f"run {run_id!r} not found in the registry; check the run id")
        for key, value in values.items():
            setattr(run, key, value)
        s.add(run)
        s.commit()
        return run


@_retry_locked
def get_run(run_id: str) -> Run | None:
    """The run with its effective status (a dead active run shows as failed), or None."""
    with _read() as s:
        return _effective(s.get(Run, run_id))


@_retry_locked
def list_runs() -> list[Run]:
    """All runs, newest first, with effective status."""
    now = utcnow()
    with _read() as s:
        runs = s.exec(select(Run).order_by(col(Run.created_at).desc(), col(Run.id).desc())).all()
        return [_effective(run, now) for run in runs]


@_retry_locked
def heartbeat(run_id: str) -> bool | None:
    """Set the run's heartbeat to now and return whether a cancel was requested (None if the run is unknown)."""
    with _write() as s:
        statement = (
            update(Run).where(col(Run.id) == run_id).values(heartbeat=utcnow()).returning(Run.cancel_requested)
        )
        flag = s.execute(statement).scalar_one_or_none()
        s.commit()
        return None if flag is None else bool(flag)


@_retry_locked
def request_cancel(run_id: str) -> None:
    """Ask the training process of a run to stop at its next heartbeat; RunNotFound if unknown."""
    with _write() as s:
        result = s.execute(update(Run).where(col(Run.id) == run_id).values(cancel_requested=True))
        s.commit()
    if result.rowcount == 0:
        raise RunNotFound(f"run {run_id!r} not found in the registry; check the run id")


@_retry_locked
def mark_stale() -> list[str]:
    """Persist status "failed" (with the reason) for active runs whose process is gone; return their ids."""
    marked = []
    with _write() as s:
        now = utcnow()
        for run in s.exec(select(Run).where(col(Run.status).in_(ACTIVE_STATUSES))).all():
            reason = stale_reason(run, now)
            if reason:
                run.status, run.error, run.finished_at = "failed", reason, run.finished_at or now
                s.add(run)
                marked.append(run.id)
        s.commit()
    return marked


@_retry_locked
def delete_run(run_id: str) -> None:
    """Delete the registry rows of a run, its epochs and artifacts (files are left alone)."""
    with _write() as s:
        _delete_run_rows(s, run_id)
        s.commit()


def _delete_run_rows(s: Session, run_id: str) -> None:
    s.exec(delete(EpochMetric).where(col(EpochMetric.run_id) == run_id))
    s.exec(delete(Artifact).where(col(Artifact.run_id) == run_id))
    s.exec(delete(Run).where(col(Run.id) == run_id))


# --------------------------------------------------------------------------------------- epochs


@_retry_locked
def record_epoch(run_id: str, epoch: int, **metrics: float | None) -> None:
    """Write the metrics of one epoch, replacing an earlier row for the same (run_id, epoch)."""
    unknown = set(metrics) - METRIC_FIELDS
    if unknown:
        raise TypeError(f"unknown epoch metric(s): {', '.join(sorted(unknown))}")
    with _write() as s:
        query = select(EpochMetric).where(EpochMetric.run_id == run_id, EpochMetric.epoch == int(epoch))
        row = s.exec(query).first() or EpochMetric(run_id=run_id, epoch=int(epoch))
        for key in METRIC_FIELDS:
            value = metrics.get(key)
            setattr(row, key, float(value) if value is not None else None)
        s.add(row)
        s.commit()


@_retry_locked
def epoch_metrics(run_id: str) -> list[EpochMetric]:
    """The epoch rows of a run, ordered by epoch."""
    with _read() as s:
        query = select(EpochMetric).where(EpochMetric.run_id == run_id).order_by(col(EpochMetric.epoch))
        return list(s.exec(query).all())


# --------------------------------------------------------------------------------------- artifacts


def _artifact_query(run_id: str, kind: str, epoch: int | None) -> Any:
    epoch_match = col(Artifact.epoch).is_(None) if epoch is None else col(Artifact.epoch) == epoch
    return select(Artifact).where(Artifact.run_id == run_id, Artifact.kind == kind, epoch_match)


@_retry_locked
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
    with _write() as s:
        for old in s.exec(_artifact_query(run_id, kind, epoch)).all():
            s.delete(old)
        artifact = Artifact(
            run_id=run_id,
            kind=kind,
            path=str(path),
            epoch=epoch,
            size_bytes=int(size_bytes),
            accepted=bool(accepted),
            metrics_json=_dumps(metrics),
        )
        s.add(artifact)
        s.commit()
        s.refresh(artifact)
        return artifact


@_retry_locked
def list_artifacts(run_id: str | None = None) -> list[Artifact]:
    """Artifacts of one run (or of all runs), oldest first."""
    with _read() as s:
        query = select(Artifact)
        if run_id is not None:
            query = query.where(Artifact.run_id == run_id)
        return list(s.exec(query.order_by(col(Artifact.created_at), col(Artifact.id))).all())


MODEL_KINDS = ("onnx", "int8")  # artifacts that are model files; recipes are artifacts too, but not exports


def list_exports(run_id: str | None = None) -> list[Artifact]:
    """Exported model files that were kept and are still on disk (no recipes, rejected or replaced files)."""
    return [a for a in list_artifacts(run_id) if a.kind in MODEL_KINDS and a.accepted and Path(a.path).is_file()]


# --------------------------------------------------------------------------------------- rebuild


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


def _run_from_folder(folder: Path, info: dict) -> Run:
    dataset = info.get("dataset") or {}
    if isinstance(dataset, str):
        dataset = {"path": dataset}
    status = info.get("status") if info.get("status") in STATUSES else "failed"
    threshold = _number(info.get("threshold"))
    return Run(
        id=folder.name,  # the folder is the run: a copied folder is a run of its own
        name=str(info.get("name") or info.get("run_id") or folder.name),
        dataset_path=str(dataset.get("path") or info.get("dataset_path") or ""),
        dataset_hash=str(dataset.get("hash") or info.get("dataset_hash") or ""),
        status=status,
        pid=_number(info.get("pid"), int),
        pid_started=_number(info.get("pid_started")),
        host=info.get("host") if isinstance(info.get("host"), str) else None,
        heartbeat=_parse_time(info.get("heartbeat")),
        created_at=_parse_time(info.get("created_at")) or _mtime(RunFolder(folder).run_json),
        started_at=_parse_time(info.get("started_at")),
        finished_at=_parse_time(info.get("finished_at")),
        epochs_planned=_number(info.get("epochs_planned"), int) or 0,
        epochs_done=_number(info.get("epochs_done"), int) or 0,
        best_epoch=_number(info.get("best_epoch"), int),
        best_dice=_number(info.get("best_dice")),
        best_iou=_number(info.get("best_iou")),
        threshold=threshold if threshold is not None else 0.5,
        device=str(info.get("device") or ""),
        params_json=_dumps(info.get("params") if isinstance(info.get("params"), dict) else {}),
        error=info.get("error"),
        ready=info.get("ready") if isinstance(info.get("ready"), bool) else None,
        ready_reason=info.get("ready_reason"),
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
                metrics_json=_dumps(entry.get("metrics") if isinstance(entry.get("metrics"), dict) else {}),
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
                     created_at=_mtime(path), accepted=True, metrics_json=_dumps(recipe))]


@_retry_locked
def _replace_run_rows(run: Run, epochs: list[EpochMetric], artifacts: list[Artifact], keep_cancel: bool) -> None:
    with _write() as s:
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


def read_run_folder(folder: Path, info: dict | None = None) -> tuple[Run, list[EpochMetric], list[Artifact]]:
    """The registry rows a run folder stands for (run.json, or `info` in its place, metrics.csv,
    export/report.json, recipe.json); ValueError if run.json is missing or unreadable."""
    try:
        if info is None:
            info = json.loads(RunFolder(folder).run_json.read_text(encoding="utf-8"))
        if not isinstance(info, dict):
            raise ValueError("not a JSON object")
        run = _run_from_folder(folder, info)
    except (OSError, ValueError, TypeError, AttributeError) as err:
        raise ValueError(f"{folder}: run.json is unreadable ({err})") from err
    epochs = _epochs_from_csv(RunFolder(folder).metrics, run.id)
    artifacts = _artifacts_from_report(RunFolder(folder).report, run.id)
    artifacts += _recipe_artifact(RunFolder(folder).recipe, run.id)
    return run, epochs, artifacts


def sync_run(folder: Path, keep_cancel: bool = True, info: dict | None = None) -> None:
    """Make the registry rows of one run exactly what its folder says (the heartbeat, which lives only here, and
    a pending cancel request unless keep_cancel=False, are kept); `info` stands in for an unwritable run.json."""
    _replace_run_rows(*read_run_folder(folder, info), keep_cancel=keep_cancel)


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
