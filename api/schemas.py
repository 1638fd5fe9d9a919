"""Pydantic models of every answer the API gives, errors included (they document /docs)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from engine.readiness import Served
from engine.runfolder import BACKENDS

BackendName = Literal[BACKENDS]  # Literal of a tuple: one of its strings
BackendRequest = Literal[("auto", *BACKENDS)]


class ErrorResponse(BaseModel):
    """Every 4xx/5xx answer: one line saying what was wrong and what to do."""

    detail: str = Field(examples=["upload.svg: an SVG image; send a PNG, JPEG, BMP or TIFF image"])


class ModelInfo(Served):
    """Which model answered, and whether its run is ready (engine.readiness.Served)."""

    run: str
    epoch: int | None = None
    backend: BackendName
    device: str = "cpu"


class ImageSize(BaseModel):
    """Size of the uploaded image; the mask has the same size."""

    width: int
    height: int


class Region(BaseModel):
    """One connected defect region (engine fields added later, such as area_mm2, pass through)."""

    model_config = ConfigDict(extra="allow")

    bbox: list[int] = Field(description="x, y, width, height in pixels", min_length=4, max_length=4)
    area_px: int
    mean_score: float
    max_score: float
    elongation: float | None = Field(None, description="long / short side of the minimum-area rectangle")
    shape: str | None = Field(None, description="`scratch-like` or `spot-like`")


class Timings(BaseModel):
    """Milliseconds spent per step."""

    decode: float
    inference: float
    total: float = Field(description="whole request on the server: read, queue, decode, inference, answer")
    queue: float | None = Field(None, description="waiting for a free inference slot (part of total)")


class PredictResponse(BaseModel):
    """The verdict, regions and optional mask for one image."""

    model: ModelInfo
    warning: str | None = Field(None, description="what this verdict does not vouch for: the run is not ready, "
                                                  "or the demo model answered (trained on generated images only)")
    image: ImageSize
    threshold: float
    verdict: Literal["ok", "defect"]
    defect_fraction: float
    max_score: float
    regions: list[Region] = Field(description="the regions that count under the run's inspection recipe")
    recipe: dict[str, Any] | None = Field(None, description="the rules applied: threshold, min region area, ...")
    mask_png_base64: str | None = Field(None, description="binary mask (0/255) as base64 PNG, with return_mask=true")
    timings_ms: Timings


class BackendChoice(BaseModel):
    """What `auto` serves for a run on this machine, timed once when the model is first served."""

    backend: BackendName
    p50_ms: dict[str, float] = Field(description="batch-1 latency of each gated backend at 256x256 (empty: one choice)")
    rule: str
    refused: dict[str, str] = Field(default_factory=dict,
                                    description="exported backends not served on this machine, and why: a failed "
                                                "accuracy gate or re-check on this CPU, with the Dice drop")


class NewestRun(BaseModel):
    """A newer run than the default model, not ready, so not answering by default."""

    run: str
    ready: bool = False
    ready_reason: str


class HealthResponse(Served):
    """Liveness and whether the default model is loaded."""

    status: Literal["ok", "no_model"]
    model: ModelInfo | None = None
    detail: str | None = Field(None, description="why no model is loaded")
    ready: bool = Field(False, description="whether the default model is ready to serve (see ModelInfo.ready)")
    default_run: str = Field(description="DEFECTS_API_RUN: `ready` follows the newest ready run, `latest` the newest "
                                         "run with a checkpoint; anything else is a pinned run")
    backend_choice: BackendChoice | None = Field(None, description="how `auto` picked the default model's backend")
    newest_run: NewestRun | None = Field(None, description="the newest run with a model, where `ready` passed it "
                                                            "over as not ready (it answers with ?run=)")
    version: str
    host: str = Field(description="name of the machine that answered (its hostname): which replica, behind a "
                                  "load balancer")
    pid: int = Field(description="process id of the worker that answered (`serve --workers N` runs N of them)")


class CatalogEntry(Served):
    """A run folder (engine.runrecord.RunRecord's fields) and the backends it can be served with."""

    run: str
    name: str | None = None
    status: str | None = None
    best_epoch: int | None = None
    best_dice: float | None = None
    threshold: float | None = None
    backends: list[str]
    default_backend: str | None = None


class ModelsResponse(BaseModel):
    """Default model, the models loaded in memory, and every run that can be asked for with ?run=."""

    default: ModelInfo | None
    loaded: list[ModelInfo]
    runs: list[CatalogEntry]


def error_responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses=` entries for error codes, all with the ErrorResponse body."""
    text = {401: "Missing or wrong X-API-Key (only when DEFECTS_API_KEY is set)",
            404: "Unknown run, or the requested backend is not exported for it",
            409: "The backend named (?backend=, or DEFECTS_API_BACKEND) failed its accuracy gate on this machine; "
                 "`detail` says which gate, by how much, and what `auto` serves instead",
            413: "Upload larger than DEFECTS_MAX_UPLOAD_MB, or an image larger than DEFECTS_MAX_IMAGE_PIXELS",
            415: "Not a PNG, JPEG, BMP or TIFF image, or an empty, corrupt or truncated one",
            422: "A parameter is missing or out of range",
            503: "No model is available (nothing trained and no demo run)"}
    return {code: {"model": ErrorResponse, "description": text[code]} for code in codes}
