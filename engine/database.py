"""The registry's database connections: the SQLite file runs/registry.db (WAL, busy timeout, BEGIN IMMEDIATE
writers), or the server of DEFECTS_DATABASE_URL (SERIALIZABLE writers, an advisory lock around schema creation);
cached engines per process, a damaged file set aside, and retries where the database asks for them."""

from __future__ import annotations

import functools
import logging
import os
import random
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, TypeVar

import sqlalchemy
from sqlalchemy import event
from sqlalchemy.exc import ArgumentError, DatabaseError, DBAPIError, NoSuchModuleError, OperationalError
from sqlmodel import Session, SQLModel

from engine import config
from engine.errors import EngineError
from engine.tables import TABLES

log = logging.getLogger(__name__)
LOCK_RETRIES = 6

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


def retry_locked(fn: F) -> F:
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
        retry_locked(_create_schema)(writer)
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
            retry_locked(_create_schema)(engine)
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


def read_session() -> Session:
    return Session(_engines_for(None)[0], expire_on_commit=False)


def write_session() -> Session:
    return Session(_engines_for(None)[1], expire_on_commit=False)
