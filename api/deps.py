"""What routes depend on: the serving state of the app that received the request, and the API key check."""

from __future__ import annotations

import hmac

from fastapi import HTTPException, Request, Security
from fastapi.security import APIKeyHeader

from api.serving import ServingState


def get_serving(request: Request) -> ServingState:
    """The ServingState of the app that received the request."""
    return request.app.state.serving


_api_key_header = APIKeyHeader(name="X-API-Key", auto_error=False,
                               description="The value of DEFECTS_API_KEY on the server")


def require_api_key(request: Request, key: str | None = Security(_api_key_header)) -> None:
    """401 unless X-API-Key equals DEFECTS_API_KEY (compared in constant time)."""
    expected = get_serving(request).settings.api_key
    if expected is None:
        return
    if key is None or not hmac.compare_digest(key.encode(), expected.encode()):
        reason = "missing" if key is None else "wrong"
        raise HTTPException(401, f"{reason} X-API-Key header; send the key the server was started with "
                                 "(DEFECTS_API_KEY)", headers={"WWW-Authenticate": "X-API-Key"})
