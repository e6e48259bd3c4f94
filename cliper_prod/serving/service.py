"""What one serving process holds and does, for either engine: a Ray Serve replica or a
uvicorn worker loads the bundle into a :class:`Service`, and the HTTP API
(:mod:`cliper_prod.serving.api`) answers every request through it.

The engine gives the service its metrics backend and its batcher, Ray Serve's ``serve.batch`` or
the local :func:`~cliper_prod.serving.batching.batch` (the same keywords and semantics): with
batching on, the rows of concurrent /topk requests are merged into one ONNX run by
:meth:`Service.rank_merged` and split back per request. Requests the service cannot answer
raise :class:`RequestError` with their HTTP status, or the runtime's
:class:`~cliper_prod.runtime.ranking.QueryError` (a 400; 501 for an unsupported kind).
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import AliasChoices, BaseModel, ConfigDict, Field

from cliper_prod import __version__
from cliper_prod.bundle_format import MANIFEST_HASH
from cliper_prod.runtime.bundle_reader import Bundle
from cliper_prod.runtime.cold_student import placement_summary
from cliper_prod.runtime.recommender import Recommender
from cliper_prod.serving.metrics import ServiceMetrics
from cliper_prod.serving.readiness import ReadinessProbe

Top = tuple[np.ndarray, np.ndarray]  # the graph's padded top items and scores of some users
Merged = Callable[[list[np.ndarray]], Awaitable[list[Top]]]
#: ``serve.batch`` or :func:`~cliper_prod.serving.batching.batch`: given ``max_batch_size`` and
#: ``batch_wait_timeout_s``, a decorator that makes a merged run callable once per request
Batcher = Callable[..., Callable[[Merged], Callable[[np.ndarray], Awaitable[Top]]]]


class RequestError(Exception):
    """A request the service refuses before ranking (too large, no CLIP graphs); ``status`` is
    the HTTP code."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


class ServeSettings(BaseModel):
    """How a replica or worker serves; the ``args`` of a Ray Serve config file, which Ray
    validates against this model (``serve run ... key=value`` values arrive as strings and are
    converted here; an unknown key is refused)."""

    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)

    bundle: str = Field(description="The bundle folder.")
    provider: Literal["auto", "cpu", "cuda"] = Field(
        "auto", validation_alias=AliasChoices("provider", "device"),
        description="ONNX Runtime provider choice ('device' is its old name).")
    image_root: str | None = Field(None, description="Folder that /embed image paths resolve "
                                                     "(only) under; None refuses paths.")
    batching: bool = Field(True, description="Merge concurrent /topk requests into one run.")
    max_batch_size: int = Field(64, ge=1, description="/topk requests merged into one ONNX run.")
    max_ongoing_requests: int = Field(256, ge=1, description="Ray: requests per replica (Ray "
                                      "Serve's default, 5, would cap batches at 5).")
    batch_wait_timeout_s: float = Field(0.002, ge=0, description="How long a batch's first "
                                        "request waits for others.")
    max_request_bytes: int = Field(16 << 20, ge=1, description="Larger bodies get a 413.")
    read_timeout_s: float = Field(10.0, gt=0, description="Time to receive a body, else 408.")
    max_users: int = Field(4096, ge=1, description="Users per /topk request.")
    max_history: int = Field(10_000, ge=1, description="Item ids in a /topk history.")
    max_items: int = Field(256, ge=1, description="Items per /embed request.")
    embed_batch_size: int = Field(64, ge=1, description="As `cliper-prod embed --batch-size`.")
    gpus_per_replica: float = Field(0.0, ge=0, description="Ray's num_gpus per replica (Ray "
                                    "hides GPUs from the others).")


class Service:
    """The bundle loaded for answering, with the engine's metrics and batcher.

    ``engine`` names the engine (reported by /metadata); ``replica`` names this process among
    the engine's replicas or workers.
    """

    def __init__(self, settings: ServeSettings, metrics: ServiceMetrics, batch: Batcher, *,
                 engine: dict, replica: str) -> None:
        self.settings, self.metrics, self.engine, self.replica = settings, metrics, engine, replica
        bundle = Bundle(Path(settings.bundle), settings.provider)
        self.manifest = bundle.manifest
        self.recommender = Recommender(
            bundle, image_root=Path(settings.image_root) if settings.image_root else None,
            embed_batch_size=settings.embed_batch_size)
        self.ranker = self.recommender.ranker
        self.providers = self._live_providers()  # with cuda, Bundle.graph refused CPU ones
        self.readiness = ReadinessProbe(self.ranker.rank)

        async def merged(requests: list[np.ndarray]) -> list[Top]:
            return await self.rank_merged(requests)  # a function: serve.batch sets attributes
        self.rank_batched = batch(max_batch_size=settings.max_batch_size,
                                  batch_wait_timeout_s=settings.batch_wait_timeout_s)(merged)

    def _live_providers(self) -> dict[str, list[str]]:
        """The execution providers each ONNX Runtime session of this process really runs on
        (the CUDA provider may be asked for and not given)."""
        graphs = {"topk": self.ranker.graph}
        if self.recommender.has_features:
            encoder = self.recommender.embedder.encoder
            graphs |= {"image_encoder": encoder.image_graph, "text_fusion": encoder.text_graph}
        return {name: graph.session.get_providers() for name, graph in graphs.items()}

    async def rank_merged(self, requests: list[np.ndarray]) -> list[Top]:
        """One ONNX run for the rows of every request of a batch, split back per request."""
        self.metrics.merged(len(requests))
        items, scores = await asyncio.to_thread(self.ranker.rank, np.concatenate(requests))
        bounds = np.cumsum([0] + [len(r) for r in requests])
        return [(items[a:b], scores[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]

    async def topk(self, users: list[str], k: int, exclude: list[str]) -> dict:
        """Top-k items per user, their training items and ``exclude`` left out."""
        if len(users) > self.settings.max_users:
            raise RequestError(f"{len(users)} users; at most {self.settings.max_users} per "
                               f"request", 413)
        rows, excluded = self.ranker.prepare(users, k, exclude)
        if self.settings.batching:
            top = await self.rank_batched(rows)
        else:
            top = await asyncio.to_thread(self.ranker.rank, rows)
        return {"results": self.ranker.answer(users, top, k, excluded)}

    async def topk_history(self, history: list[str], k: int, exclude: list[str]) -> dict:
        """Top-k items of one user folded in from ``history`` (run alone: it is not a row of
        the user table that a batch could share)."""
        if len(history) > self.settings.max_history:
            raise RequestError(f"a history of {len(history)} items; at most "
                               f"{self.settings.max_history} per request", 413)

        def rank() -> list[dict]:  # folding in reads the tables: off the event loop
            prepared, excluded = self.ranker.prepare_histories([history], k, exclude)
            return self.ranker.answer_histories([None], prepared, k, excluded)
        return {"results": await asyncio.to_thread(rank)}

    async def embed(self, items: list[dict]) -> dict:
        """CLIPER features of each item, with the CLI's per-item error policy."""
        if not self.recommender.has_features:
            raise RequestError("this bundle has no CLIP feature graphs (exported without "
                               "--clip)", 404)
        if len(items) > self.settings.max_items:
            raise RequestError(f"{len(items)} items; at most {self.settings.max_items} per "
                               f"request", 413)
        answer = await asyncio.to_thread(self.recommender.embed, items)
        self.metrics.embed(answer)
        return answer

    async def check_ready(self) -> None:
        """Return when the loaded graph ranks a user (:class:`ReadinessProbe`); raise what
        ranking raised."""
        await asyncio.to_thread(self.readiness.check)

    def metadata(self) -> dict:
        """The manifest, how this process runs it, and whether Ray is loaded in it (the local
        engine never imports Ray: tested through this). No server path: the bundle is named by
        its folder's name and its manifest's hash, path settings by their last component."""
        settings = self.settings.model_dump()
        for name in PATH_SETTINGS:
            settings[name] = _name(settings[name])
        manifest = self.manifest
        if manifest.get("features"):
            manifest = {**manifest, "features": {**manifest["features"],
                                                 "clip": _name(manifest["features"]["clip"])}}
        return {"bundle": {"name": _name(self.settings.bundle),
                           MANIFEST_HASH: self.manifest[MANIFEST_HASH]},
                "manifest": manifest, "new_items": placement_summary(manifest),
                "providers": self.providers,
                "cliper_prod": __version__, "settings": settings,
                "engine": {**self.engine, "ray_imported": "ray" in sys.modules},
                "replica": self.replica}


#: settings that name a path on the server: /metadata shows their last component only
PATH_SETTINGS = ("bundle", "image_root")


def _name(value: str | None) -> str | None:
    """A path's last component (a hub id such as ``openai/clip-vit-base-patch32``, not a
    path on this machine, is kept)."""
    if value is None or not (Path(value).is_absolute() or Path(value).exists()):
        return value
    return Path(value).resolve().name
