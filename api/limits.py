"""Request body limit as pure ASGI middleware, so a too-large upload gets the API's JSON 413 like every other error."""

from __future__ import annotations

from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send


class BodyLimit:
    """Refuse a body over `max_bytes`: from its Content-Length before reading it, else while it streams in.

    Starlette's own RequestBodyLimitMiddleware answers plain text ("Content Too Large") whenever the client
    sent a Content-Length; clients that read `response.json()['detail']` would crash on it.
    """

    def __init__(self, app: ASGIApp, max_bytes: int, detail: str) -> None:
        self.app, self.max_bytes, self.detail = app, max_bytes, detail

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = Headers(scope=scope).get("content-length", "")
        if length.isdigit() and int(length) > self.max_bytes:
            return await JSONResponse({"detail": self.detail}, status_code=413,
                                      headers={"Connection": "close"})(scope, receive, send)
        received = 0

        async def receive_limited() -> Message:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_bytes:  # handled by the app's HTTPException handler (JSON)
                raise HTTPException(413, self.detail)
            return message

        await self.app(scope, receive_limited, send)
