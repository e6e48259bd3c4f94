"""The HTTP API of ``cliper-prod serve``, the same under both engines (no Ray in it).

Endpoints: ``POST /topk``, ``POST /similar``, ``POST /embed``, ``GET /healthz``,
``GET /metadata``; the OpenAPI schema is at ``/openapi.json``, and ``/docs`` renders it as one
self-contained page (:mod:`~cliper_prod.serving.docs_page`: no CDN). Every /topk, /similar and
/embed answer names the ``bundle`` (id) that answered it. Each answers through the
:class:`~cliper_prod.serving.service.Service` of the process, which the engine's
``app.state.service()`` finds: the Ray engine wraps this app in a deployment
(:mod:`cliper_prod.serving.ray_engine`), the local one runs it under uvicorn
(:mod:`cliper_prod.serving.local_engine`).

Requests are validated by their schema (422), by the bundle (400: unknown ids, k too large) and
by size (413 over ``max_request_bytes``, 411 without Content-Length); an answer is never a 500
for bad input. Bodies are read within ``read_timeout_s`` (else 408) and parsed by
:func:`~cliper_prod.features.items.loads_strict`, the CLI's reader (NaN, Infinity and lone
surrogates are a 422). An unexpected exception is logged with a request id and answered as a
500 with that id (:mod:`~cliper_prod.serving.middleware`). /topk and /embed answers are written
by orjson and not validated again against their models, which only document them.
"""

# No `from __future__ import annotations`: FastAPI reads the endpoint annotations at runtime.
import asyncio
import logging
from typing import Annotated, Callable

import orjson
from fastapi import FastAPI, HTTPException, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse
from fastapi.routing import APIRoute
from pydantic import (BaseModel, ConfigDict, Field, StrictInt, WithJsonSchema,
                      model_validator)

from cliper_prod import __version__
from cliper_prod.features.items import StrictJSONError, loads_strict
from cliper_prod.messages import shorten
from cliper_prod.runtime.ranking import QueryError, UnsupportedQuery
from cliper_prod.serving.docs_page import docs_html
from cliper_prod.serving.middleware import CatchAll, LimitBody, RecordMetrics
from cliper_prod.serving.service import RequestError, Service

logger = logging.getLogger(__name__)


class TopKRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    users: list[str] | None = Field(None, min_length=1,
                                    description="External user ids (user_ids.txt).")
    history: list[str] | None = Field(
        None, min_length=1, description="Instead of users: one user the model never saw, by "
        "the item ids they interacted with; folded in by the backbone's user rule, the history "
        "excluded from the ranking, unknown ids listed in the answer's unknown_items.")
    k: StrictInt = Field(20, ge=1, description="Items per user (at most the bundle's max_k); "
                         "an integer, never a string or a boolean.")
    exclude: list[str] = Field(default_factory=list,
                               description="Item ids to leave out for every user of the "
                                           "request, besides their training items.")
    exclude_per_user: list[list[str]] | None = Field(
        None, description="With users: one list of item ids per user (same order and length "
        "as users), left out of that user's ranking inside the graph, exactly.")
    items: list[str] | None = Field(
        None, min_length=1, description="With users: an allowlist; each user is ranked among "
        "these items only (scored exactly from the item table).")

    @model_validator(mode="after")
    def one_way_to_name_users(self) -> "TopKRequest":
        if (self.users is None) == (self.history is None):
            raise ValueError("give exactly one of 'users' and 'history'")
        if self.history is not None and (self.exclude_per_user is not None
                                         or self.items is not None):
            raise ValueError("'exclude_per_user' and 'items' go with 'users', not 'history'")
        if self.exclude_per_user is not None and len(self.exclude_per_user) != len(self.users):
            raise ValueError(f"'exclude_per_user' has {len(self.exclude_per_user)} lists for "
                             f"{len(self.users)} users")
        return self


class Ranking(BaseModel):
    user_id: str | None = Field(description="The user id; null for a user given by a history.")
    items: list[str]
    scores: list[float]
    unknown_items: list[str] | None = Field(None, description="A history's unknown item ids "
                                                              "(only when it had some).")


BUNDLE_ID = Field(description="The id of the bundle that answered (its manifest_sha256, "
                             "first 12 hex digits; /metadata's bundle.id).")


class TopKResponse(BaseModel):
    bundle: str = BUNDLE_ID
    results: list[Ranking]


class SimilarRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    items: list[str] = Field(min_length=1, description="Item ids (item_ids.txt).")
    k: StrictInt = Field(20, ge=1, description="Similar items per item (at most the catalog "
                         "less one).")


class Similar(BaseModel):
    item_id: str
    items: list[str] = Field(description="Most similar first: cosine on the served item "
                                         "embeddings, the item itself left out.")
    scores: list[float]


class SimilarResponse(BaseModel):
    bundle: str = BUNDLE_ID
    results: list[Similar]


class EmbedItem(BaseModel):
    """One item in the JSONL schema of ``cliper-prod embed``; other keys are ignored."""

    item_id: str
    title: str | None = None
    brand: str | None = None
    description: str | None = None
    categories: str | list[str] | list[list[str]] | None = None
    image: str | None = Field(None, description="A path under the server's --image-root.")
    image_base64: str | None = Field(None, description="Or the image file itself, base64.")


#: An /embed item as the OpenAPI schema types it, received as a plain object: a record that
#: does not fit is that item's entry in ``errors`` (the CLI's per-item policy), not a 422.
ItemRecord = Annotated[dict, WithJsonSchema(EmbedItem.model_json_schema())]


class EmbedRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    items: list[ItemRecord] = Field(
        min_length=1, description="Items in the JSONL schema (EmbedItem); an item that does "
        "not fit it is reported in the answer's errors, the others embedded.")


class EmbeddedItem(BaseModel):
    item_id: str
    text_feature: list[float]
    image_embedding: list[float]


class ItemProblem(BaseModel):
    line: int
    item_id: str | None
    action: str
    reason: str


class EmbedResponse(BaseModel):
    bundle: str = BUNDLE_ID
    items: list[EmbeddedItem]
    errors: list[ItemProblem]


class StrictJSONRequest(Request):
    """A request whose body must arrive within ``read_timeout_s`` (408) and be strict JSON
    (422): the one place request bodies are read and parsed."""

    async def body(self) -> bytes:
        timeout = self.app.state.service().settings.read_timeout_s
        try:
            async with asyncio.timeout(timeout):
                return await super().body()
        except TimeoutError:
            raise HTTPException(408, f"request body not received within {timeout:g} s") from None

    async def json(self) -> object:
        if not hasattr(self, "_json"):
            try:
                self._json = loads_strict(await self.body())
            except StrictJSONError as exc:
                raise HTTPException(422, [{"type": "json_invalid", "loc": ["body"],
                                           "msg": f"JSON decode error: {exc}"}]) from None
        return self._json


class StrictJSONRoute(APIRoute):
    """Routes that hand their endpoint a :class:`StrictJSONRequest`."""

    def get_route_handler(self) -> Callable:
        handler = super().get_route_handler()

        async def strict(request: Request) -> Response:
            return await handler(StrictJSONRequest(request.scope, request.receive))
        return strict


def _problem(error: dict) -> dict:
    """A validation error without the client's ``input`` (megabytes, perhaps) and with the
    keys of its location cut short."""
    message = error["msg"]
    if "error" in error.get("ctx", {}) and str(error["ctx"]["error"]) not in message:
        message += f": {error['ctx']['error']}"
    return {"type": error["type"], "msg": shorten(message),
            "loc": [shorten(part) if isinstance(part, str) else part for part in error["loc"]]}


async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
    """422 that states what is wrong where, never echoing the value."""
    return JSONResponse({"detail": [_problem(e) for e in exc.errors()[:20]]}, status_code=422)


async def unanswerable(request: Request, exc: RequestError | QueryError) -> JSONResponse:
    """What the service cannot answer as asked, and why: the service's own refusals with their
    status (404, 413), the runtime's :class:`QueryError` as a 400 (501: a kind of query the
    bundle cannot answer at all)."""
    status = exc.status if isinstance(exc, RequestError) else \
        501 if isinstance(exc, UnsupportedQuery) else 400
    return JSONResponse({"detail": str(exc)}, status_code=status)


def _json(content: dict) -> Response:
    return Response(orjson.dumps(content), media_type="application/json")


def _service(request: Request) -> Service:
    return request.app.state.service()


async def topk(body: TopKRequest, request: Request) -> Response:
    """Top-k items per user, their training items, ``exclude`` and their
    ``exclude_per_user`` left out, among the ``items`` allowlist when given; or of one user
    given by a history, the history and ``exclude`` left out."""
    if body.history is not None:
        return _json(await _service(request).topk_history(body.history, body.k, body.exclude))
    return _json(await _service(request).topk(body.users, body.k, body.exclude,
                                              body.exclude_per_user, body.items))


async def similar(body: SimilarRequest, request: Request) -> Response:
    """The k items most similar to each item (cosine on the served item embeddings)."""
    return _json(await _service(request).similar(body.items, body.k))


async def embed(body: EmbedRequest, request: Request) -> Response:
    """CLIPER features of each item, with the CLI's per-item error policy."""
    return _json(await _service(request).embed(body.items))


async def healthz(request: Request) -> JSONResponse:
    """Ready when the loaded graph ranks a user (checked at most every few seconds); 503 with
    the reason otherwise."""
    try:
        await _service(request).check_ready()
    except Exception as exc:  # a broken session raises ONNX Runtime's own types
        logger.warning("readiness check failed: %s", exc)
        return JSONResponse({"status": "unavailable",
                             "detail": shorten(f"{type(exc).__name__}: {exc}", 300)},
                            status_code=503)
    return JSONResponse({"status": "ok"})


async def docs(request: Request) -> HTMLResponse:
    """The schema as a page that loads nothing from elsewhere."""
    return HTMLResponse(docs_html(request.app.openapi()))


async def metadata(request: Request) -> dict:
    """The bundle serving (``id``, folder name, manifest hash), its manifest (backbone,
    dimensions, model versions, file hashes) and how this process runs it (``providers``:
    each live session's; ``engine``: local or ray, and whether Ray is loaded; ``replica``: the
    replica or worker that answered)."""
    return _service(request).metadata()


def create_app(service: Callable[[], Service]) -> FastAPI:
    """The API, answering through ``service()``: the engine's way to the service of the
    process answering (kept in ``app.state.service``)."""
    app = FastAPI(title="cliper-prod", version=__version__, docs_url=None, redoc_url=None,
                  description="CLIPER top-K recommendations and item features from an exported "
                              "bundle on ONNX Runtime.")
    app.router.route_class = StrictJSONRoute
    app.state.service = service
    app.add_exception_handler(RequestValidationError, invalid_request)
    for refusal in (RequestError, QueryError):
        app.add_exception_handler(refusal, unanswerable)
    for middleware in (CatchAll, LimitBody, RecordMetrics):  # the last added is outermost
        app.add_middleware(middleware)
    app.add_api_route("/topk", topk, methods=["POST"], response_model=TopKResponse)
    app.add_api_route("/similar", similar, methods=["POST"], response_model=SimilarResponse)
    app.add_api_route("/embed", embed, methods=["POST"], response_model=EmbedResponse)
    app.add_api_route("/healthz", healthz, methods=["GET"])
    app.add_api_route("/metadata", metadata, methods=["GET"])
    app.add_api_route("/docs", docs, methods=["GET"], include_in_schema=False)
    return app
