"""Exception handlers: every client mistake becomes a 4xx with a one-line JSON `detail`, never a 500."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from api.serving import ModelUnavailable
from engine.errors import EngineError, GateFailed, ImageError, RunNotFound
from engine.imageio import ImageTooLarge

log = logging.getLogger("api")

# First match wins, so subclasses come before their parents.
STATUS_FOR_ERROR: tuple[tuple[type[EngineError], int], ...] = (
    (ImageTooLarge, 413), (ImageError, 415), (ModelUnavailable, 503), (RunNotFound, 404), (GateFailed, 409),
    (EngineError, 422),
)


def status_for(err: EngineError) -> int:
    """HTTP status for an engine error."""
    return next(code for kind, code in STATUS_FOR_ERROR if isinstance(err, kind))


def install(app: FastAPI) -> None:
    """Register the handlers on app."""

    @app.exception_handler(EngineError)
    async def engine_error(request: Request, exc: EngineError) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=status_for(exc))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        parts = []
        for error in exc.errors():
            where = ".".join(str(p) for p in error.get("loc", ())[1:]) or "request"
            parts.append(f"{where}: {error.get('msg', 'invalid')}")
        return JSONResponse({"detail": "; ".join(parts) or "invalid request"}, status_code=422)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        status, detail = exc.status_code, str(exc.detail)
        if status == 400:  # FastAPI could not parse the body; the contract answers bad input with 422
            status, detail = 422, f"{detail.rstrip('.')}: send the image as the multipart/form-data field `file`"
        return JSONResponse({"detail": detail}, status_code=status, headers=exc.headers)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        return JSONResponse({"detail": f"internal error ({type(exc).__name__}); see the server log"}, status_code=500)
