"""GET /models: the default model, the models in memory, and every run that can be served."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends

from api.deps import get_serving
from api.schemas import ModelsResponse
from api.serving import ServingState

router = APIRouter(tags=["service"])


@router.get("/models", response_model=ModelsResponse)
def models(serving: Annotated[ServingState, Depends(get_serving)]) -> dict[str, Any]:
    """Runs with their exported backends; pass one as ?run= to /predict."""
    return serving.models()
