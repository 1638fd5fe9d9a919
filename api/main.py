"""The FastAPI app: `uvicorn api.main:app` or `python -m engine serve`."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Security
from fastapi_offline import FastAPIOffline
from starlette.concurrency import run_in_threadpool

import engine
from api import errors
from api.deps import require_api_key
from api.limits import BodyLimit
from api.routes import health, models, predict
from api.schemas import error_responses
from api.serving import ServingState
from api.settings import MULTIPART_SLACK, Settings

DESCRIPTION = """Metal-surface defect segmentation. `POST /predict` takes one image (multipart field `file`)
and answers the verdict, the defect regions and optionally the mask. Errors are a 4xx with a JSON `detail`.
Set `DEFECTS_API_KEY` on the server to require an `X-API-Key` header on every route except `/health`."""


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    """Load the default model once before the first request (off the event loop); stop the inference threads."""
    await run_in_threadpool(app.state.serving.load_default)
    yield
    await run_in_threadpool(app.state.serving.close)


def create_app(settings: Settings | None = None) -> FastAPI:
    """A configured app; settings default to the DEFECTS_* environment variables."""
    settings = settings or Settings.from_env()
    # FastAPIOffline: /docs and /redoc load their scripts from the installed package, not a CDN (factories run offline).
    app = FastAPIOffline(title="Defect detection API", version=engine.__version__, description=DESCRIPTION,
                         lifespan=lifespan)
    app.state.serving = ServingState(settings)
    # Only an app with a key declares and enforces it, so /docs shows the Authorize button only then.
    protected = {"dependencies": [Security(require_api_key)], "responses": error_responses(401)} if settings.api_key else {}
    app.include_router(health.router)
    app.include_router(predict.router, **protected)
    app.include_router(models.router, **protected)
    errors.install(app)
    app.add_middleware(BodyLimit, max_bytes=settings.max_upload_bytes + MULTIPART_SLACK,
                       detail=f"request body larger than the upload limit of {settings.max_upload_mb:g} MB "
                              "(DEFECTS_MAX_UPLOAD_MB)")
    return app


app = create_app()
