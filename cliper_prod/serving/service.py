"""What one serving process holds and does, for either engine: a Ray Serve replica or a
uvicorn worker loads the bundle into a :class:`Service`, and the HTTP API
(:mod:`cliper_prod.serving.api`) answers every request through it.

The engine gives the service its metrics backend and its batcher, Ray Serve's ``serve.batch`` or
the local :func:`~cliper_prod.serving.batching.batch` (the same keywords and semantics): with
batching on, the rows of concurrent /topk requests are merged into one ONNX run by
:meth:`Service.rank_merged` and split back per request. Requests the service cannot answer
raise :class:`RequestError` with their HTTP status, or the runtime's
:class:`~cliper_prod.runtime.ranking.QueryError` (a 400; 501 for an unsupported kind).

Live swaps: the service answers from one :class:`LiveBundle` at a time, held in one attribute.
A request takes it when it starts and keeps it to its answer (a merged batch groups its
requests by bundle), so replacing the attribute swaps atomically and in-flight requests finish
on the old bundle, which is freed after them. Every ``reload_poll_s`` a thread looks at the
bundle path (a link to a versioned folder, switched with a rename); when it resolves to another
folder or the manifest changed, the new bundle is opened (hashes checked), its sessions made
and one user ranked before it serves; one that fails is refused, logged and counted, and the
old one keeps serving. Each process (local worker, Ray replica) watches on its own.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, TypeVar

import numpy as np
from pydantic import AliasChoices, BaseModel, ConfigDict, Field

from cliper_prod import __version__
from cliper_prod.bundle_format import MANIFEST, MANIFEST_HASH
from cliper_prod.messages import first_line
from cliper_prod.runtime.bundle_reader import Bundle
from cliper_prod.runtime.cold_student import placement_summary
from cliper_prod.runtime.ranking import NO_PAIRS, Pairs, TopKRanker
from cliper_prod.runtime.recommender import Recommender
from cliper_prod.runtime.sessions import OrtThreads
from cliper_prod.serving.metrics import ServiceMetrics
from cliper_prod.serving.readiness import ReadinessProbe

logger = logging.getLogger(__name__)
R = TypeVar("R")
Top = tuple[np.ndarray, np.ndarray]  # the graph's padded top items and scores of some users
Merged = Callable[[list["RankQuery"]], Awaitable[list[Top]]]
#: ``serve.batch`` or :func:`~cliper_prod.serving.batching.batch`: given ``max_batch_size`` and
#: ``batch_wait_timeout_s``, a decorator that makes a merged run callable once per request
Batcher = Callable[..., Callable[[Merged], Callable[["RankQuery"], Awaitable[Top]]]]


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
    reload_poll_s: float = Field(2.0, ge=0, description="How often to look for a new bundle "
                                 "at the bundle path (a link switched, a folder renamed) and "
                                 "swap it in; 0: never.")
    precision: Literal["auto", "fp32", "fp16", "int8"] = Field(
        "auto", description="CLIP graphs /embed runs (auto: int8 on the CPU where the export "
                            "measured it faster, else fp32).")
    intra_op_threads: int = Field(0, ge=0, description="ONNX Runtime intra-op threads of each "
                                  "session of this process (0: ORT's default, every core).")
    inter_op_threads: int = Field(0, ge=0, description="ONNX Runtime inter-op threads (0: "
                                  "ORT's default).")


@dataclass(frozen=True)
class LiveBundle:
    """One bundle loaded for answering: what a request holds from its start to its answer, so
    that a swap never changes the bundle under it (:meth:`Service.swap_if_changed`)."""

    id: str  # the manifest's hash, first 12 hex digits: in /metadata, /topk answers, metrics
    key: tuple[str, str]  # (resolved folder, sha256 of manifest.json): what a change changes
    recommender: Recommender
    providers: dict[str, list[str]]
    readiness: ReadinessProbe

    @property
    def ranker(self) -> TopKRanker:
        return self.recommender.ranker

    @property
    def manifest(self) -> dict:
        return self.recommender.bundle.manifest


@dataclass(frozen=True)
class RankQuery:
    """The rows of one /topk request waiting for a merged run, on the bundle it started on."""

    live: LiveBundle
    rows: np.ndarray
    pairs: Pairs  # per-user exclusions, positions within ``rows``
    enqueued: float = field(default_factory=time.perf_counter)


def bundle_key(folder: Path) -> tuple[str, str]:
    """The folder ``folder`` resolves to now, and the hash of its manifest.json (bytes):
    different when a new bundle is in place, by a link switched or a folder renamed."""
    resolved = folder.resolve()
    return str(resolved), hashlib.sha256((resolved / MANIFEST).read_bytes()).hexdigest()


class Service:
    """The bundle loaded for answering, with the engine's metrics and batcher.

    ``engine`` names the engine (reported by /metadata); ``replica`` names this process among
    the engine's replicas or workers. With ``reload_poll_s``, a thread checks the bundle path
    that often and swaps in a new bundle found there (:meth:`swap_if_changed`).
    """

    def __init__(self, settings: ServeSettings, metrics: ServiceMetrics, batch: Batcher, *,
                 engine: dict, replica: str) -> None:
        self.settings, self.metrics, self.engine, self.replica = settings, metrics, engine, replica
        self.live = self.load()
        self.metrics.bundle_loaded(self.live.id, "loaded")
        self.refused: tuple[str, str] | None = None  # the key of the last refusal
        self.swap_lock = threading.Lock()

        async def merged(requests: list[RankQuery]) -> list[Top]:
            return await self.rank_merged(requests)  # a function: serve.batch sets attributes
        self.rank_batched = batch(max_batch_size=settings.max_batch_size,
                                  batch_wait_timeout_s=settings.batch_wait_timeout_s)(merged)
        if settings.reload_poll_s > 0:
            threading.Thread(target=self._watch, name="cliper-bundle-watch", daemon=True).start()

    def load(self) -> LiveBundle:
        """The bundle now at the settings' path, opened (hashes checked), every session made
        and one user ranked: what fails here never serves."""
        folder = Path(self.settings.bundle).resolve()
        settings = self.settings
        bundle = Bundle(folder, settings.provider,
                        threads=OrtThreads(settings.intra_op_threads, settings.inter_op_threads))
        key = bundle_key(folder)
        recommender = Recommender(
            bundle, image_root=Path(settings.image_root) if settings.image_root else None,
            embed_batch_size=settings.embed_batch_size, precision=settings.precision)
        recommender.ranker.rank(np.zeros(1, dtype=np.int64))  # ranks before it serves
        readiness = ReadinessProbe(recommender.ranker.rank)
        bundle_id = str(bundle.manifest.get(MANIFEST_HASH) or key[1])[:12]
        return LiveBundle(bundle_id, key, recommender, _live_providers(recommender), readiness)

    def swap_if_changed(self) -> bool:
        """Load the bundle at the settings' path if it is not the one serving, and serve it
        from the next request on (requests already started finish on theirs). A bundle that
        fails to load is refused once (logged, counted) and the old one keeps serving; it is
        tried again only when the path changes again. True when a new bundle now serves."""
        with self.swap_lock:
            try:
                key = bundle_key(Path(self.settings.bundle))
            except OSError as exc:  # no manifest there (yet): keyed by the reason
                return self._refuse(("", str(exc)), f"{type(exc).__name__}: {exc}")
            if key in (self.live.key, self.refused):
                return False
            try:
                live = self.load()
            except Exception as exc:  # noqa: BLE001 - any failure refuses the new bundle
                return self._refuse(key, f"{type(exc).__name__}: {first_line(exc)}")
            old, self.live = self.live, live
            self.refused = None
            self.metrics.bundle_loaded(live.id, "loaded")
            logger.warning("serving bundle %s (was %s)", live.id, old.id)
            return True

    def _refuse(self, key: tuple[str, str], reason: str) -> bool:
        """Keep serving the bundle in place; say so once per new bundle (or reason)."""
        if key != self.refused:
            logger.error("new bundle refused, still serving %s: %s", self.live.id, reason)
            self.metrics.bundle_loaded(key[1][:12] if key[0] else "unreadable", "refused")
        self.refused = key
        return False

    def _watch(self) -> None:
        while True:
            time.sleep(self.settings.reload_poll_s)
            try:
                self.swap_if_changed()
            except Exception:  # noqa: BLE001 - the watch must outlive any one check
                logger.exception("bundle check failed")

    @property
    def providers(self) -> dict[str, list[str]]:
        return self.live.providers

    async def timed(self, endpoint: str, live: LiveBundle, work: Callable[[], R]) -> R:
        """``work()`` off the event loop, its wait for a thread and its run recorded as the
        request's queue and compute time."""
        enqueued = time.perf_counter()

        def run() -> tuple[R, float, float]:
            started = time.perf_counter()
            return work(), started, time.perf_counter()
        result, started, ended = await asyncio.to_thread(run)
        self.metrics.timing(endpoint, live.id, started - enqueued, ended - started)
        return result

    async def rank_merged(self, requests: list[RankQuery]) -> list[Top]:
        """One ONNX run for the rows of every request of a batch on the same bundle, split
        back per request (a batch that straddles a swap runs once per bundle)."""
        self.metrics.merged(len(requests))
        out: list[Top | None] = [None] * len(requests)
        groups: dict[int, list[int]] = {}
        for n, request in enumerate(requests):
            groups.setdefault(id(request.live), []).append(n)
        for members in groups.values():
            mine = [requests[n] for n in members]
            started = time.perf_counter()
            items, scores = await asyncio.to_thread(_rank_group, mine)
            compute = time.perf_counter() - started
            bounds = np.cumsum([0] + [len(r.rows) for r in mine])
            for n, request, a, b in zip(members, mine, bounds[:-1], bounds[1:]):
                out[n] = (items[a:b], scores[a:b])
                self.metrics.timing("/topk", request.live.id, started - request.enqueued,
                                    compute)
        return out

    async def topk(self, users: list[str], k: int, exclude: list[str],
                   exclude_per_user: list[list[str]] | None = None,
                   items: list[str] | None = None) -> dict:
        """Top-k items per user, their training items, ``exclude`` and their own
        ``exclude_per_user`` left out, among ``items`` when given (an allowlist)."""
        if len(users) > self.settings.max_users:
            raise RequestError(f"{len(users)} users; at most {self.settings.max_users} per "
                               f"request", 413)
        live = self.live
        rows, excluded = live.ranker.prepare(users, k, exclude)
        if items is not None:
            per_user = [list(e) + exclude for e in exclude_per_user or [[]] * len(users)]
            ids, scores = await self.timed("/topk", live, lambda: live.recommender.recommend(
                users, k, exclude=per_user, items=items))
            return {"bundle": live.id, "results": _array_rankings(users, ids, scores)}
        query = RankQuery(live, rows, live.recommender.arrays.exclusion_pairs(
            exclude_per_user, len(users)) if exclude_per_user is not None else NO_PAIRS)
        if self.settings.batching:
            top = await self.rank_batched(query)
        else:
            top = await self.timed("/topk", live, lambda: _rank_group([query]))
        return {"bundle": live.id, "results": live.ranker.answer(users, top, k, excluded)}

    async def topk_history(self, history: list[str], k: int, exclude: list[str]) -> dict:
        """Top-k items of one user folded in from ``history`` (run alone: it is not a row of
        the user table that a batch could share)."""
        if len(history) > self.settings.max_history:
            raise RequestError(f"a history of {len(history)} items; at most "
                               f"{self.settings.max_history} per request", 413)
        live = self.live

        def rank() -> list[dict]:  # folding in reads the tables: off the event loop
            prepared, excluded = live.ranker.prepare_histories([history], k, exclude)
            return live.ranker.answer_histories([None], prepared, k, excluded)
        return {"bundle": live.id, "results": await self.timed("/topk", live, rank)}

    async def similar(self, items: list[str], k: int) -> dict:
        """Each item's ``k`` most similar items (cosine on the item table), itself left out."""
        if len(items) > self.settings.max_users:
            raise RequestError(f"{len(items)} items; at most {self.settings.max_users} per "
                               f"request", 413)
        live = self.live
        ids, scores = await self.timed("/similar", live,
                                       lambda: live.recommender.similar_items(items, k))
        results = _array_rankings(items, ids, scores)
        for record in results:
            record["item_id"] = record.pop("user_id")
        return {"bundle": live.id, "results": results}

    async def embed(self, items: list[dict]) -> dict:
        """CLIPER features of each item, with the CLI's per-item error policy."""
        live = self.live
        if not live.recommender.has_features:
            raise RequestError("this bundle has no CLIP feature graphs (exported without "
                               "--clip)", 404)
        if len(items) > self.settings.max_items:
            raise RequestError(f"{len(items)} items; at most {self.settings.max_items} per "
                               f"request", 413)
        answer = await self.timed("/embed", live, lambda: live.recommender.embed(items))
        self.metrics.embed(answer)
        return {"bundle": live.id, **answer}

    async def check_ready(self) -> None:
        """Return when the loaded graph ranks a user (:class:`ReadinessProbe`); raise what
        ranking raised."""
        await asyncio.to_thread(self.live.readiness.check)

    def metadata(self) -> dict:
        """The manifest, how this process runs it, and whether Ray is loaded in it (the local
        engine never imports Ray: tested through this). No server path: the bundle is named by
        its folder's name and its manifest's hash, path settings by their last component."""
        settings = self.settings.model_dump()
        for name in PATH_SETTINGS:
            settings[name] = _name(settings[name])
        live = self.live
        manifest = live.manifest
        if manifest.get("features"):
            manifest = {**manifest, "features": {**manifest["features"],
                                                 "clip": _name(manifest["features"]["clip"])}}
        return {"bundle": {"id": live.id, "name": Path(live.key[0]).name,
                           MANIFEST_HASH: manifest.get(MANIFEST_HASH)},
                "manifest": manifest, "new_items": placement_summary(manifest),
                "providers": live.providers,
                "cliper_prod": __version__, "settings": settings,
                "engine": {**self.engine, "ray_imported": "ray" in sys.modules},
                "replica": self.replica}


def _live_providers(recommender: Recommender) -> dict[str, list[str]]:
    """The execution providers each ONNX Runtime session of a bundle really runs on (the CUDA
    provider may be asked for and not given); every session is made here."""
    graphs = {"topk": recommender.ranker.graph}
    if recommender.has_features:
        encoder = recommender.embedder.encoder
        graphs |= {"image_encoder": encoder.image_graph, "text_fusion": encoder.text_graph}
    return {name: graph.session.get_providers() for name, graph in graphs.items()}


def _rank_group(requests: list[RankQuery]) -> Top:
    """One graph run for requests on one bundle: their rows concatenated, each request's
    pairs moved to its rows' positions."""
    offsets = np.cumsum([0] + [len(r.rows) for r in requests[:-1]])
    extra = (np.concatenate([r.pairs[0] + o for r, o in zip(requests, offsets)]),
             np.concatenate([r.pairs[1] for r in requests]))
    return requests[0].live.ranker.rank(np.concatenate([r.rows for r in requests]), extra)


def _array_rankings(labels: list[str], ids: np.ndarray, scores: np.ndarray) -> list[dict]:
    """``recommend``'s arrays as /topk results, padding dropped."""
    return [{"user_id": label, "items": [i for i in row if i is not None],
             "scores": score[np.isfinite(score)].tolist()}
            for label, row, score in zip(labels, ids, scores)]


#: settings that name a path on the server: /metadata shows their last component only
PATH_SETTINGS = ("bundle", "image_root")


def _name(value: str | None) -> str | None:
    """A path's last component (a hub id such as ``openai/clip-vit-base-patch32``, not a
    path on this machine, is kept)."""
    if value is None or not (Path(value).is_absolute() or Path(value).exists()):
        return value
    return Path(value).resolve().name
