"""GET /health: liveness and the default model; never needs the API key."""

from __future__ import annotations

import os
from typing import Annotated, Any

from fastapi import APIRouter, Depends

import engine
from api.deps import get_serving
from api.schemas import HealthResponse
from api.serving import ServingState
from engine import config

router = APIRouter(tags=["service"])


@router.get("/health", response_model=HealthResponse)
def health(serving: Annotated[ServingState, Depends(get_serving)]) -> dict[str, Any]:
    """Always 200 while the process is up; `status` is `no_model` when nothing can be served yet."""
    return {**serving.health(), "version": engine.__version__, "host": config.host(), "pid": os.getpid()}
