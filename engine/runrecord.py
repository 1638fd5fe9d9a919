"""RunRecord: the typed view of a run's run.json that every reader of a run uses; the JSON on disk stays as it is.

run.json is written by training, runstore and tuning as they go (runstore.save is the one writer) and read by the
registry, serving, export, labels, the CLI and the pages. Read through RunRecord, a field has one name, one type and
one default, and a run.json that is old, hand-edited or half-written reads as far as it can: a value of the wrong
type reads as the field's default rather than failing the reader. Fields this model does not name pass through.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal, TypedDict

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator


class _Tolerant(BaseModel):
    """A model whose fields fall back to their default where run.json holds a value of another type."""

    model_config = ConfigDict(extra="allow")

    @field_validator("*", mode="wrap")
    @classmethod
    def _or_default(cls, value: Any, handler: Any, info: ValidationInfo) -> Any:
        try:
            return handler(value)
        except ValidationError:
            return cls.model_fields[info.field_name].get_default(call_default_factory=True)


class DatasetRef(_Tolerant):
    """The dataset a run trained on, as run.json records it."""

    path: str = ""
    hash: str = ""
    counts: dict[str, int] = Field(default_factory=dict)
    val_carved_from_train: bool = False
    val_painted: bool = False  # validation held no real defect, so defects were painted on its good images


class RunRecord(_Tolerant):
    """A run's record: what it was asked to do, where it stands, what it chose and its verdict."""

    run_id: str | None = None
    name: str | None = None
    status: str | None = None  # queued, running, completed, failed, cancelled
    command: str = ""
    params: dict[str, Any] = Field(default_factory=dict)  # the TrainConfig, every automatic value resolved
    dataset: DatasetRef = Field(default_factory=DatasetRef)
    arch: dict[str, Any] = Field(default_factory=dict)
    parameters: int = 0
    init: str | None = None
    normalisation: dict[str, float] | None = None
    device: str = ""
    machine: str | None = None
    versions: dict[str, str] = Field(default_factory=dict)
    # the process that trains it, and its pulse
    pid: int | None = None
    pid_started: float | None = None
    host: str | None = None
    heartbeat: str | None = None
    created_at: str | None = None
    started_at: str | None = None
    finished_at: str | None = None
    epochs_planned: int = 0
    epochs_done: int = 0
    stop_reason: str | None = None
    error: str | None = None
    # what validation chose
    threshold: float = 0.5  # the best-Dice threshold; verdicts use the recipe's
    best_epoch: int | None = None
    best_dice: float | None = None
    best_iou: float | None = None
    best_val: dict[str, Any] = Field(default_factory=dict)
    recipe: dict[str, Any] | None = None
    # the verdict (readiness.judge decides; these hold what it decided)
    ready: bool | None = None
    ready_reason: str | None = None
    ready_note: str | None = None
    tuned_on: dict[str, Any] | None = None  # the tuning that last decided readiness, where one did
    time_shares: dict[str, float] | None = None
    time_to_ready: dict[str, Any] | None = None
    curve: list[dict[str, Any]] = Field(default_factory=list)

    @model_validator(mode="before")
    @classmethod
    def _older_names(cls, data: Any) -> Any:
        """Read the names older runs used: a dataset given as its path, its path and hash at the top level, the
        reason under `not_ready_reason`."""
        if not isinstance(data, Mapping):
            return {}
        data = dict(data)
        dataset = data.get("dataset")
        if isinstance(dataset, str):
            data["dataset"] = {"path": dataset}
        elif not isinstance(dataset, Mapping) and (data.get("dataset_path") or data.get("dataset_hash")):
            data["dataset"] = {"path": str(data.get("dataset_path") or ""), "hash": str(data.get("dataset_hash") or "")}
        if data.get("ready_reason") is None and data.get("not_ready_reason"):
            data["ready_reason"] = data["not_ready_reason"]
        return data

    @classmethod
    def of(cls, info: RunRecord | Mapping[str, Any]) -> RunRecord:
        """The record of a run.json's dict (a record is returned as it is)."""
        return info if isinstance(info, RunRecord) else cls.model_validate(info)

    def param(self, name: str, default: Any = None) -> Any:
        """One of the run's training parameters, `default` where the run did not record it (older runs)."""
        value = self.params.get(name)
        return default if value is None else value


class GroupCount(TypedDict):
    """Defective images of one kind or size band, and how many of them a recipe found."""

    n: int
    found: int


class TuneResult(TypedDict, total=False):
    """A recipe chosen on labelled images (TuneStats.best, training_recipe, tune_run) and what it measured there:
    the dict the readiness rules judge and recipe.json's `tuning` keeps (the same JSON)."""

    # the recipe
    threshold: float
    min_region_px: int
    sure_score: float | None  # a smaller region counts where its peak reaches this; None: no sure tier
    sure_min_px: int
    outline_threshold: float | None  # a counted region's mask reaches down to it (tuning.add_outline)
    # what it measured on the images it was chosen on
    detection_rate: float | None  # None where the images hold no defect
    false_alarm_rate: float | None  # None where they hold no good image
    dice: float | None
    false_alarm_bound: float | None  # the upper confidence bound of false alarms
    confidence: float
    held_out_false_alarm_rate: float | None  # on good images the recipe was not chosen on (each half by the other)
    per_kind: dict[str, GroupCount]
    by_size: dict[str, GroupCount]
    n_images: int
    n_defective: int
    n_defect_free: int
    # the goals and how it was chosen
    max_false_alarm: float
    goal_detection: float
    goal_on: Literal["measured", "bound"]
    goal_met: bool  # False where no recipe met the false-alarm goal (then: the fewest false alarms)
    cautious: bool  # the most cautious recipe within one standard error of the most detections
    false_alarms_measured: bool
    # tune_run's additions
    without_sure_tier: dict[str, Any]  # what a single minimum area would have found, where a sure tier won
    readiness: str | None  # the run's readiness after the tuning, in words, where the tuning decided it
