"""The HTTP API's middleware, as plain ASGI callables (Starlette's ``BaseHTTPMiddleware`` costs
a task group and memory streams per request and layer, the larger part of a /topk answer's
time here). Each finds the process's :class:`~cliper_prod.serving.service.Service` through
``scope["app"].state.service()`` (see :func:`~cliper_prod.serving.api.create_app`). Outermost
first: :class:`RecordMetrics`, :class:`LimitBody`, :class:`CatchAll`.
"""

from __future__ import annotations

import logging
import time

from fastapi.routing import APIRoute
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from cliper_prod.errors import incident_id

logger = logging.getLogger(__name__)


class RecordMetrics:
    """Every answer by endpoint and status, with its time in the process (outermost, so the
    413s, 411s and 500s of the other middleware count too). An endpoint is the path of one of
    the app's API routes, read from the app itself (a new route is counted under its own name
    with nothing else to change); any other path is ``other``."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.endpoints: frozenset[str] | None = None  # the routes are all added by the first call

    def endpoint(self, scope: Scope) -> str:
        if self.endpoints is None:
            self.endpoints = frozenset(route.path for route in scope["app"].routes
                                       if isinstance(route, APIRoute))
        return scope["path"] if scope["path"] in self.endpoints else "other"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status = time.perf_counter(), 500

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)
        try:
            await self.app(scope, receive, send_status)
        finally:
            scope["app"].state.service().metrics.request(self.endpoint(scope), status,
                                                       time.perf_counter() - start)


class LimitBody:
    """Refuse a POST without Content-Length (411) or over ``max_request_bytes`` (413) before
    reading its body."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            length = next((value for name, value in scope["headers"]
                           if name == b"content-length"), None)
            limit = scope["app"].state.service().settings.max_request_bytes
            if length is None:
                return await JSONResponse({"detail": "Content-Length required"},
                                          status_code=411)(scope, receive, send)
            if not length.isdigit() or int(length) > limit:
                return await JSONResponse({"detail": f"request body over {limit:,} bytes"},
                                          status_code=413)(scope, receive, send)
        await self.app(scope, receive, send)


class CatchAll:
    """An unexpected exception: logged with a request id, answered as a 500 with that id (if
    the answer had begun, the connection is dropped instead)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        started = False

        async def watch(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)
        try:
            await self.app(scope, receive, watch)
        except Exception:
            request_id = incident_id()
            logger.exception("%s %s failed (request id %s)", scope.get("method"),
                             scope.get("path"), request_id)
            if started or scope["type"] != "http":
                raise
            await JSONResponse({"detail": "internal error", "request_id": request_id},
                               status_code=500)(scope, receive, send)
