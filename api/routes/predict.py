"""POST /predict: verdict, regions and optional mask for one uploaded image."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, File, Query, UploadFile

from api.deps import get_serving
from api.schemas import BackendRequest, PredictResponse, error_responses
from api.serving import ServingState

router = APIRouter(tags=["inference"])

RUN_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"  # ids, `demo`, `latest`, `ready`; no path separators
IMAGE_TYPES = "image/png, image/jpeg, image/bmp, image/tiff"
# Documents which files the multipart field takes (clients and Schemathesis read it from the spec).
FILE_ENCODING = {"requestBody": {"content": {"multipart/form-data": {"encoding": {"file": {"contentType": IMAGE_TYPES}}}}}}


@router.post("/predict", response_model=PredictResponse, responses=error_responses(404, 409, 413, 415, 422, 503),
             openapi_extra=FILE_ENCODING)
def predict(
    serving: Annotated[ServingState, Depends(get_serving)],
    file: Annotated[UploadFile, File(description="PNG, JPEG, BMP or TIFF; the format is read from the content",
                                     json_schema_extra={"minLength": 1})],  # an empty file is a 415, so say so
    threshold: Annotated[float | None, Query(ge=0.0, le=1.0, allow_inf_nan=False,
                                                      description="default: the run's own threshold")] = None,
    run: Annotated[str | None, Query(pattern=RUN_PATTERN, description="run id, `demo`, `latest` or `ready`; "
                                     "default: DEFECTS_API_RUN (the newest ready run)")] = None,
    backend: Annotated[BackendRequest | None,
                       Query(description="default: DEFECTS_API_BACKEND, by default `auto`: the fastest exported "
                                         "backend that passed the accuracy gate on this machine (see /health)")] = None,
    return_mask: Annotated[bool, Query(description="add the binary mask as a base64 PNG")] = False,
) -> dict[str, Any]:
    """Segment defects in one image at full resolution (large images are tiled, never resized)."""
    # A plain `def`: FastAPI runs it in the thread pool, so inference never blocks the event loop.
    return serving.predict(file.file, file.filename or "upload", threshold, run, backend, return_mask)
