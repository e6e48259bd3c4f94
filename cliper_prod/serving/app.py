"""``cliper-prod serve``: the bundle behind HTTP on Ray Serve, with a FastAPI ingress.

Endpoints: ``POST /topk``, ``POST /embed``, ``GET /healthz``, ``GET /metadata``; the OpenAPI
schema is at ``/openapi.json`` (``/docs`` renders it). ``/topk`` calls from concurrent requests
are merged by Ray Serve's dynamic batching into one ONNX run (``batching`` off runs each request
alone, for comparison). Requests are validated by their schema (422), by the bundle (400: unknown
ids, k too large) and by size (413 over ``max_request_bytes``, 411 without Content-Length); an
answer is never a 500 for bad input. Bodies are read within ``read_timeout_s`` (else 408) and
parsed by :func:`~cliper_prod.features.items.loads_strict`, the CLI's reader (NaN, Infinity and
lone surrogates are a 422). An unexpected exception is logged with a request id and answered
as a 500 with that id. The same deployment runs on a laptop or a Ray cluster.
"""

# No `from __future__ import annotations`: FastAPI reads the endpoint annotations at runtime.
import asyncio
import logging
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Callable

import numpy as np
from fastapi import FastAPI, HTTPException, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from pydantic import BaseModel, ConfigDict, Field
from ray import serve
from ray.serve.api import RunTarget
from ray.serve.deployment import Application
from ray.serve.schema import ApplicationStatus

from cliper_prod import __version__
from cliper_prod.errors import RuntimeSetupError
from cliper_prod.features.items import StrictJSONError, clip, loads_strict
from cliper_prod.runtime.bundle import Bundle
from cliper_prod.runtime.recommender import (ReadinessProbe, Recommender, RequestError,
                                             new_request_id)
from cliper_prod.serving.metrics import ServiceMetrics

logger = logging.getLogger(__name__)
APP_NAME = "cliper"


@dataclass(frozen=True)
class ServeSettings:
    bundle: str
    device: str = "auto"
    image_root: str | None = None  # image paths in /embed resolve (only) under this folder
    batching: bool = True
    max_batch_size: int = 64  # /topk requests merged into one ONNX run
    max_ongoing_requests: int = 256  # per replica; Ray Serve's default (5) caps batches at 5
    batch_wait_timeout_s: float = 0.002
    max_request_bytes: int = 16 << 20
    read_timeout_s: float = 10.0  # to receive a request's body, else 408
    max_users: int = 4096  # per /topk request
    max_items: int = 256  # per /embed request
    embed_batch_size: int = 64  # as `cliper-prod embed --batch-size`
    gpus_per_replica: float = 0.0  # Ray's num_gpus per replica: Ray hides GPUs from the others


class TopKRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    users: list[str] = Field(min_length=1, description="External user ids (user_ids.txt).")
    k: int = Field(20, ge=1, description="Items per user (at most the bundle's max_k).")
    exclude: list[str] = Field(default_factory=list,
                               description="Item ids to leave out for every user of the "
                                           "request, besides their training items.")


class Ranking(BaseModel):
    user_id: str
    items: list[str]
    scores: list[float]


class TopKResponse(BaseModel):
    results: list[Ranking]


class EmbedRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    items: list[dict] = Field(min_length=1, description="Items in the JSONL schema (item_id, "
                              "title, brand, categories, description, image); an image may be a "
                              "path under the server's --image-root or 'image_base64'.")


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
    items: list[EmbeddedItem]
    errors: list[ItemProblem]


class StrictJSONRequest(Request):
    """A request whose body must arrive within ``read_timeout_s`` (408) and be strict JSON
    (422): the one place request bodies are read and parsed."""

    async def body(self) -> bytes:
        timeout = self.app.state.read_timeout_s
        try:
            return await asyncio.wait_for(super().body(), timeout)
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


app = FastAPI(title="cliper-prod", version=__version__,
              description="CLIPER top-K recommendations and item features from an exported "
                          "bundle on ONNX Runtime.")
app.router.route_class = StrictJSONRoute
app.state.max_request_bytes = ServeSettings.max_request_bytes
app.state.read_timeout_s = ServeSettings.read_timeout_s
app.state.metrics = None  # a replica's ServiceMetrics


def _problem(error: dict) -> dict:
    """A validation error without the client's ``input`` (megabytes, perhaps) and with the
    keys of its location cut short."""
    message = error["msg"]
    if "error" in error.get("ctx", {}):
        message += f": {error['ctx']['error']}"
    return {"type": error["type"], "msg": clip(message),
            "loc": [clip(part) if isinstance(part, str) else part for part in error["loc"]]}


@app.exception_handler(RequestValidationError)
async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
    """422 that states what is wrong where, never echoing the value."""
    return JSONResponse({"detail": [_problem(e) for e in exc.errors()[:20]]}, status_code=422)


@app.middleware("http")
async def catch_all(request: Request, call_next: Callable) -> Response:
    """An unexpected exception: logged with a request id, answered as a 500 with that id."""
    try:
        return await call_next(request)
    except Exception:
        request_id = new_request_id()
        logger.exception("%s %s failed (request id %s)", request.method, request.url.path,
                         request_id)
        return JSONResponse({"detail": "internal error", "request_id": request_id},
                            status_code=500)


@app.middleware("http")
async def limit_body(request: Request, call_next):
    """Refuse oversized bodies before reading them."""
    if request.method == "POST":
        length = request.headers.get("content-length")
        if length is None:
            return JSONResponse({"detail": "Content-Length required"}, status_code=411)
        limit = request.app.state.max_request_bytes
        if not length.isdigit() or int(length) > limit:
            return JSONResponse({"detail": f"request body over {limit:,} bytes"},
                                status_code=413)
    return await call_next(request)


@app.middleware("http")
async def record_metrics(request: Request, call_next: Callable) -> Response:
    """Every answer by endpoint and status, with its time in the replica (outermost, so the
    413s, 411s and 500s of the other middleware count too)."""
    start = time.perf_counter()
    response = await call_next(request)
    if request.app.state.metrics is not None:
        request.app.state.metrics.request(request.url.path, response.status_code,
                                          time.perf_counter() - start)
    return response


@serve.deployment(graceful_shutdown_timeout_s=20, graceful_shutdown_wait_loop_s=1)
@serve.ingress(app)
class CliperService:
    def __init__(self, settings: ServeSettings) -> None:
        self.settings = settings
        bundle = Bundle(Path(settings.bundle), settings.device)
        self.manifest = bundle.manifest
        self.recommender = Recommender(
            bundle, image_root=Path(settings.image_root) if settings.image_root else None,
            embed_batch_size=settings.embed_batch_size)
        self.ranker = self.recommender.ranker
        self.providers = self.live_providers()  # with cuda, Bundle.graph refused CPU ones
        self.readiness = ReadinessProbe(self.ranker.rank)
        app.state.max_request_bytes = settings.max_request_bytes
        app.state.read_timeout_s = settings.read_timeout_s
        self.metrics = app.state.metrics = ServiceMetrics()
        self._rank_batched.set_max_batch_size(settings.max_batch_size)
        self._rank_batched.set_batch_wait_timeout_s(settings.batch_wait_timeout_s)

    def live_providers(self) -> dict[str, list[str]]:
        """The execution providers each ONNX Runtime session of this replica really runs on
        (the CUDA provider may be asked for and not given)."""
        graphs = {"topk": self.ranker.graph}
        if self.recommender.has_features:
            encoder = self.recommender.embedder.encoder
            graphs |= {"image_encoder": encoder.image_graph, "text_fusion": encoder.text_graph}
        return {name: graph.session.get_providers() for name, graph in graphs.items()}

    @serve.batch(max_batch_size=64, batch_wait_timeout_s=0.002)
    async def _rank_batched(self, requests: list[np.ndarray]
                            ) -> list[tuple[np.ndarray, np.ndarray]]:
        """One ONNX run for the rows of every request waiting in this batch."""
        self.metrics.merged(len(requests))
        items, scores = await asyncio.to_thread(self.ranker.rank, np.concatenate(requests))
        bounds = np.cumsum([0] + [len(r) for r in requests])
        return [(items[a:b], scores[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]

    @app.post("/topk", response_model=TopKResponse)
    async def topk(self, request: TopKRequest) -> dict:
        """Top-k items per user, their training items and ``exclude`` left out."""
        if len(request.users) > self.settings.max_users:
            raise HTTPException(413, f"{len(request.users)} users; at most "
                                     f"{self.settings.max_users} per request")
        try:
            rows, exclude = self.ranker.prepare(request.users, request.k, request.exclude)
        except RequestError as exc:
            raise HTTPException(exc.status, str(exc)) from None
        if self.settings.batching:
            top = await self._rank_batched(rows)
        else:
            top = await asyncio.to_thread(self.ranker.rank, rows)
        return {"results": self.ranker.answer(request.users, top, request.k, exclude)}

    @app.post("/embed", response_model=EmbedResponse)
    async def embed(self, request: EmbedRequest) -> dict:
        """CLIPER features of each item, with the CLI's per-item error policy."""
        if not self.recommender.has_features:
            raise HTTPException(404, "this bundle has no CLIP feature graphs (exported without "
                                     "--clip)")
        if len(request.items) > self.settings.max_items:
            raise HTTPException(413, f"{len(request.items)} items; at most "
                                     f"{self.settings.max_items} per request")
        answer = await asyncio.to_thread(self.recommender.embed, request.items)
        self.metrics.embed(answer)
        return answer

    @app.get("/healthz")
    async def healthz(self) -> Response:
        """Ready when the loaded graph ranks a user (checked at most every few seconds); 503
        with the reason otherwise."""
        try:
            await asyncio.to_thread(self.readiness.check)
        except Exception as exc:  # a broken session raises ONNX Runtime's own types
            logger.warning("readiness check failed: %s", exc)
            return JSONResponse({"status": "unavailable",
                                 "detail": clip(f"{type(exc).__name__}: {exc}", 300)},
                                status_code=503)
        return JSONResponse({"status": "ok"})

    def check_health(self) -> None:
        """Ray Serve's periodic replica check: the same ranking; raising makes Serve replace
        the replica."""
        self.readiness.check()

    @app.get("/metadata")
    async def metadata(self) -> dict:
        """The bundle's manifest (backbone, dimensions, model versions, file hashes) and how
        this replica runs it (``providers``: each live session's; ``replica``: Serve's id of
        the replica that answered)."""
        return {"manifest": self.manifest, "providers": self.providers,
                "cliper_prod": __version__, "settings": asdict(self.settings),
                "replica": serve.get_replica_context().replica_id.unique_id}


def connect(address: str | None = None, metrics_port: int | None = None) -> None:
    """Join ``address``, or start a local Ray (its Prometheus endpoint on ``metrics_port``,
    default a free port), unless this process is already connected."""
    import ray

    if not ray.is_initialized():
        local = {"_metrics_export_port": metrics_port} if address is None and metrics_port else {}
        ray.init(address=address, include_dashboard=False, log_to_driver=False, **local)


def service_deployment(settings: ServeSettings, replicas: int | None = None
                       ) -> serve.Deployment:
    """The deployment as Ray receives it: its request cap, GPUs and (unless a config file's
    ``deployments`` section or autoscaling decides) replicas."""
    options = _deployment_options(settings)
    if replicas is not None:
        options["num_replicas"] = replicas
    return CliperService.options(**options)


def _deployment_options(settings: ServeSettings) -> dict:
    """What the settings fix of the deployment, in code or in a config file's ``deployments``."""
    return {"max_ongoing_requests": settings.max_ongoing_requests,
            "ray_actor_options": {"num_gpus": settings.gpus_per_replica}}


BUILDER = "cliper_prod.serving.app:build"  # the import_path of a Serve config file


def build(args: dict) -> Application:
    """Ray Serve's application builder: ``serve run config.yaml`` and ``serve deploy`` call it
    with the config's ``args`` (the fields of :class:`ServeSettings`; ``bundle`` required).
    Replicas, autoscaling and GPUs come from the config's ``deployments`` section (see
    ``cliper_prod/serving/serve_config.example.yaml``); a bad bundle fails the build."""
    known = {f.name for f in fields(ServeSettings)}
    unknown = sorted(set(args) - known)
    if unknown or "bundle" not in args:
        raise ValueError(f"{BUILDER}: args {unknown or 'lack bundle'}; expected bundle and any "
                         f"of {sorted(known - {'bundle'})}")
    settings = ServeSettings(**args)
    Bundle(Path(settings.bundle), settings.device)
    return service_deployment(settings).bind(settings)


def serve_config(settings: ServeSettings, *, replicas: int, host: str, port: int) -> dict:
    """The Serve config file equivalent to ``cliper-prod serve`` with these settings."""
    return {
        "http_options": {"host": host, "port": port},
        "applications": [{
            "name": APP_NAME, "route_prefix": "/", "import_path": BUILDER,
            "args": asdict(settings),
            "deployments": [{"name": CliperService.name, "num_replicas": replicas,
                             **_deployment_options(settings)}],
        }],
    }


def live_providers() -> dict[str, list[str]]:
    """The providers of one running replica's sessions (they all run the same settings)."""
    return serve.get_app_handle(APP_NAME).live_providers.remote().result()


def start_service(settings: ServeSettings, *, replicas: int = 1, host: str = "127.0.0.1",
                  port: int = 8000, address: str | None = None,
                  startup_timeout_s: float = 120.0) -> str:
    """Deploy on the running Ray (or join ``address``, or start a local one); return the URL
    once the application runs. Any failure on the way, or no running application within
    ``startup_timeout_s``, is a :class:`RuntimeSetupError` of one line (the traceback at
    DEBUG)."""
    connect(address)
    _check_gpus(settings.gpus_per_replica * replicas)
    deadline = time.monotonic() + startup_timeout_s
    try:
        # the controller's wait for a proxy to answer (5 s by default) is what a busy machine
        # missed: it gets the whole start-up time (on first start of Serve in the cluster)
        env = {"RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S": str(startup_timeout_s)}
        serve.start(http_options={"host": host, "port": port},
                    controller_options={"runtime_env": {"env_vars": env}})
        deployment = service_deployment(settings, replicas)
        serve.run_many([RunTarget(deployment.bind(settings), name=APP_NAME, route_prefix="/")],
                       wait_for_applications_running=False)
        _wait_running(deadline, startup_timeout_s)
    except RuntimeSetupError:
        raise
    except Exception as exc:
        logger.debug("Ray Serve start-up failed", exc_info=True)
        raise RuntimeSetupError(f"Ray Serve did not start ({type(exc).__name__}: "
                                f"{_first_line(exc)})") from exc
    return f"http://{host}:{port}"


def _check_gpus(needed: float) -> None:
    """Replicas asking for more GPUs than the cluster has would wait for them forever."""
    import ray

    have = ray.cluster_resources().get("GPU", 0)
    if needed > have:
        raise RuntimeSetupError(f"the replicas ask for {needed:g} GPU(s) and the Ray cluster has "
                                f"{have:g}; lower --gpus-per-replica or --replicas, or serve "
                                f"with --device cpu")


def _first_line(exc: BaseException) -> str:
    return clip(str(exc).strip().splitlines()[0] if str(exc).strip() else "no message", 300)


def _wait_running(deadline: float, timeout_s: float) -> None:
    """Until the application runs; its failure or the deadline is a RuntimeSetupError."""
    while True:
        app_status = serve.status().applications.get(APP_NAME)
        state = app_status.status if app_status else ApplicationStatus.NOT_STARTED
        if state == ApplicationStatus.RUNNING:
            return
        if state in (ApplicationStatus.DEPLOY_FAILED, ApplicationStatus.UNHEALTHY):
            raise RuntimeSetupError(f"the service failed to deploy: "
                                    f"{clip(app_status.message.strip() or state.value, 300)}")
        if time.monotonic() > deadline:
            raise RuntimeSetupError(f"the service was not running after {timeout_s:g} s "
                                    f"({state.value}); raise --startup-timeout-s on a busy "
                                    f"machine")
        time.sleep(0.5)


def stop_service() -> None:
    """Drain in-flight requests (graceful_shutdown_timeout_s), then stop Serve and Ray."""
    import ray

    serve.shutdown()
    ray.shutdown()
