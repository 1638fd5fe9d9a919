"""The run registry's tables (SQLModel): datasets, runs, epoch metrics, artifacts; all datetimes aware UTC in Python,
naive UTC in the database."""

from __future__ import annotations

import json
from datetime import datetime, timezone
from typing import Any

from sqlalchemy import UniqueConstraint
from sqlalchemy.types import DateTime, TypeDecorator
from sqlmodel import Field, SQLModel


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
        return loads(self.details_json)


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
        return loads(self.params_json)


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
        return loads(self.metrics_json)


TABLES = [Dataset.__table__, Run.__table__, EpochMetric.__table__, Artifact.__table__]
RUN_FIELDS = set(Run.model_fields)
METRIC_FIELDS = set(EpochMetric.model_fields) - {"id", "run_id", "epoch"}


def loads(text: str | None) -> dict:
    """A JSON column's dict ({} where it is empty or not a JSON object)."""
    try:
        value = json.loads(text or "{}")
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def dumps(value: Any) -> str:
    """A value as a JSON column (sorted keys; {} for None)."""
    return json.dumps(value if value is not None else {}, default=str, sort_keys=True)
