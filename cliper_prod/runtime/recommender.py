"""An exported bundle as a Python object: :class:`Recommender` ranks users and embeds items.

One code path for every way in: ``cliper-prod topk`` ranks with :class:`TopKRanker`, the HTTP
service answers ``/topk`` and ``/embed`` with a :class:`Recommender` (batching ``/topk`` rows of
concurrent requests into one graph run), and Python code calls it directly. ``/embed`` and
:meth:`Recommender.embed` run the CLI's :func:`~cliper_prod.features.embed.embed_batch` with its
per-item policy. Requests it cannot answer raise :class:`RequestError` (a 4xx on the service);
messages quote a client's ids and paths as sent, cut short
(:func:`~cliper_prod.features.items.clip`), and never name the server's own paths.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import logging
import math
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from functools import cached_property
from pathlib import Path

import numpy as np

from cliper_prod.bundle_format import TOPK_GRAPH
from cliper_prod.errors import BundleError
from cliper_prod.features.embed import EmbedOptions, ItemErrors, embed_batch, load_image
from cliper_prod.features.image_preprocess import ImageDecodeError, unusable
from cliper_prod.features.items import Item, ItemError, ItemLimits, clip, parse_item
from cliper_prod.features.shards import Shard
from cliper_prod.histories import history_pairs
from cliper_prod.runtime.bundle import Bundle
from cliper_prod.runtime.encoder import OnnxEncoder
from cliper_prod.runtime.fold_in import FoldIn
from cliper_prod.runtime.topk_forms import TopKGraph

logger = logging.getLogger(__name__)


def new_request_id() -> str:
    """The id an unexpected failure is logged under and answered with, to match the two."""
    return uuid.uuid4().hex[:16]


def _ids(ids: list[str], limit: int = 5) -> str:
    """The first ``limit`` of ``ids``, each cut short, and how many more there are."""
    shown = ", ".join(repr(clip(i)) for i in ids[:limit])
    return shown + (f" and {len(ids) - limit} more" if len(ids) > limit else "")


class RequestError(Exception):
    """A request the service cannot answer as asked; ``status`` is the HTTP code."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


class ReadinessProbe:
    """Ranks one user on the loaded top-K graph: a replica is ready when its session answers.

    A success is trusted for ``max_age_s`` (health checks and load balancers ask often; one
    ranking each time would cost a graph run per probe); a failure is never cached.
    """

    def __init__(self, rank: Callable[[np.ndarray], object], max_age_s: float = 5.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.rank, self.max_age_s, self.clock = rank, max_age_s, clock
        self.last_ok = -math.inf

    def check(self) -> None:
        """Return when the graph ranked within ``max_age_s``; raise what ranking raised."""
        if self.clock() - self.last_ok < self.max_age_s:
            return
        self.rank(np.zeros(1, dtype=np.int64))
        self.last_ok = self.clock()


def rankings(user_ids: Sequence[str | None], top_items: np.ndarray, top_scores: np.ndarray,
             k: int, item_ids: np.ndarray, exclude: set[int] = frozenset()) -> list[dict]:
    """{"user_id", "items", "scores"} per user from the graph's padded top rows: padding
    (score -inf) and ``exclude`` rows dropped, then the first ``k`` kept."""
    out = []
    for user, idx, scores in zip(user_ids, top_items, top_scores):
        kept = np.isfinite(scores)
        if exclude:
            kept &= ~np.isin(idx, list(exclude))
        idx, scores = idx[kept][:k], scores[kept][:k]
        out.append({"user_id": user, "items": item_ids[idx].tolist(), "scores": scores.tolist()})
    return out


@dataclass(frozen=True)
class HistoryQueries:
    """Users given by their histories, folded in and ready to rank: query vectors, the
    (position, item) pairs to leave out (each history), and each history's unknown ids."""

    queries: np.ndarray
    positions: np.ndarray
    items: np.ndarray
    unknown: list[list[str]]


class TopKRanker:
    """User ids (or histories) -> queries of the top-K graph -> rankings with training (or
    history) items excluded."""

    def __init__(self, bundle: Bundle) -> None:
        self.bundle = bundle
        self.graph = TopKGraph(bundle)  # the CPU or GPU form per provider and batch size
        self.max_k = int(bundle.manifest["graphs"][TOPK_GRAPH]["k"])
        self.item_ids = np.asarray(bundle.item_ids, dtype=object)
        self.item_index = {i: n for n, i in enumerate(bundle.item_ids)}
        self.user_index = {u: n for n, u in enumerate(bundle.user_ids)}
        tables = {name: bundle.folder / file for name, file in bundle.manifest["tables"].items()}
        self.queries = np.load(tables["users"], mmap_mode="r")  # paged in as users are ranked
        self.indptr = np.load(tables["history_indptr"], mmap_mode="r")
        self.history = np.load(tables["history_items"], mmap_mode="r")

    def rows(self, user_ids: list[str]) -> np.ndarray:
        unknown = [u for u in user_ids if u not in self.user_index]
        if unknown:
            raise RequestError(f"unknown user id(s) {_ids(unknown)}")
        if len(set(user_ids)) != len(user_ids):
            raise RequestError("repeated user ids in one request")
        return np.fromiter((self.user_index[u] for u in user_ids), np.int64, len(user_ids))

    def check_k(self, k: int) -> None:
        """A request's ``k`` must be one the graph can rank."""
        if not 1 <= k <= self.max_k:
            raise RequestError(f"k={k}: the bundle ranks at most {self.max_k} items per user")

    def exclusions(self, item_ids: list[str], k: int) -> set[int]:
        """Rows of items to leave out; the graph must rank k of them plus k others."""
        unknown = [i for i in item_ids if i not in self.item_index]
        if unknown:
            raise RequestError(f"exclude: unknown item id(s) {_ids(unknown)}")
        rows = {self.item_index[i] for i in item_ids}
        if k + len(rows) > self.max_k:
            raise RequestError(f"k ({k}) plus excluded items ({len(rows)}) exceeds the "
                               f"{self.max_k} items the bundle ranks per user")
        return rows

    def prepare(self, user_ids: list[str], k: int, exclude: Sequence[str] = ()
                ) -> tuple[np.ndarray, set[int]]:
        """The graph rows of ``user_ids`` and the rows to leave out, every check of a request
        made before any graph runs."""
        self.check_k(k)
        return self.rows(user_ids), self.exclusions(list(exclude), k)

    def rank(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The graph's padded top rows of the users ``rows``, their training items excluded
        (the unit Ray Serve batches across requests)."""
        positions, seen = history_pairs(self.indptr, self.history, rows)
        return self.graph(queries=self.queries[rows], exclude_rows=positions,
                          exclude_items=seen)

    @cached_property
    def fold_in(self) -> FoldIn:
        return FoldIn.of(self.bundle)

    def prepare_histories(self, histories: Sequence[Sequence[str]], k: int,
                          exclude: Sequence[str] = ()) -> tuple[HistoryQueries, set[int]]:
        """Fold in one user per history of item ids (unknown ids are reported, never guessed;
        a history needs one known item) and check the request as :meth:`prepare` does."""
        problem = self.fold_in.user_rule_problem()
        if problem:
            raise RequestError(f"this bundle {problem}", 501)
        self.check_k(k)
        if not histories:
            raise RequestError("no history to rank")
        excluded = self.exclusions(list(exclude), k)
        rows, unknown = [], []
        for n, history in enumerate(histories):
            known, missing = self.history_rows(history)
            problem = self.history_problem(known, missing)
            if problem:
                raise RequestError(f"history {n + 1}: {problem}")
            rows.append(known)
            unknown.append(missing)
        queries = self.fold_in.users(rows)
        positions = np.repeat(np.arange(len(rows), dtype=np.int64), [len(r) for r in rows])
        return HistoryQueries(queries, positions, np.concatenate(rows), unknown), excluded

    def history_rows(self, history: Sequence[str]) -> tuple[np.ndarray, list[str]]:
        """The item rows of a history's known ids (each once) and its unknown ids (each once)."""
        known = dict.fromkeys(self.item_index[i] for i in history if i in self.item_index)
        missing = dict.fromkeys(i for i in history if i not in self.item_index)
        return np.fromiter(known, np.int64, len(known)), list(missing)

    def history_problem(self, known: np.ndarray, missing: list[str]) -> str | None:
        """Why a history cannot fold in a user (no known id; only items without
        interactions), or None."""
        if not len(known):
            return "no known item id" + (f" (unknown: {_ids(missing)})" if missing
                                         else " (empty)")
        if not self.fold_in.informative(known):
            return ("only items without interactions (added by add-items), which fold in "
                    "nothing")
        return None

    def rank_histories(self, prepared: HistoryQueries) -> tuple[np.ndarray, np.ndarray]:
        """The graph's padded top rows of folded-in users, their histories excluded."""
        return self.graph(queries=prepared.queries, exclude_rows=prepared.positions,
                          exclude_items=prepared.items)

    def answer_histories(self, labels: Sequence[str | None], prepared: HistoryQueries, k: int,
                         exclude: set[int]) -> list[dict]:
        """Rankings of folded-in users, each with its ``unknown_items`` when it had some."""
        out = rankings(labels, *self.rank_histories(prepared), k, self.item_ids, exclude)
        for record, missing in zip(out, prepared.unknown):
            if missing:
                record["unknown_items"] = [clip(i) for i in missing]
        return out

    def answer(self, user_ids: list[str], top: tuple[np.ndarray, np.ndarray], k: int,
               exclude: set[int]) -> list[dict]:
        return rankings(user_ids, top[0], top[1], k, self.item_ids, exclude)


class ItemEmbedder:
    """Posted items (the JSONL schema, images as paths under ``image_root`` or base64) ->
    fused text feature and image embedding per item, with the CLI's per-item policy."""

    def __init__(self, bundle: Bundle, image_root: Path | None, batch_size: int = 64,
                 limits: ItemLimits = ItemLimits(), max_image_pixels: int = 64_000_000) -> None:
        self.encoder = OnnxEncoder(bundle)
        self.options = EmbedOptions(views=self.encoder.views, fusion=self.encoder.fusion,
                                    tau=self.encoder.tau, batch_size=batch_size, limits=limits,
                                    max_image_pixels=max_image_pixels)
        self.preprocess = replace(self.encoder.preprocess, max_pixels=max_image_pixels)
        self.image_root = image_root.resolve() if image_root else None

    def embed(self, records: list[dict]) -> dict:
        """{"items": [{"item_id", "text_feature", "image_embedding"}], "errors": [...]};
        an error's ``line`` is the item's 1-based position in the request."""
        errors = ItemErrors(Path("<request>"), strict=False)
        parsed, images, seen = [], [], set()
        for line, record in enumerate(records, start=1):
            prepared = self._prepare(record, line, seen)
            if isinstance(prepared, ItemError):
                errors.add(prepared, "skipped", prepared.reason)
                continue
            parsed.append(prepared[0])
            images.append(prepared[1])
        shard = Shard()
        size = self.options.batch_size
        for start in range(0, len(parsed), size):
            embed_batch(parsed[start:start + size], images[start:start + size], self.encoder,
                        self.options, shard, errors)
        text = np.concatenate(shard.arrays["text"]) if shard.ids else np.zeros((0, 0))
        image = np.concatenate(shard.arrays["image"]) if shard.ids else np.zeros((0, 0))
        return {"items": [{"item_id": i, "text_feature": t.tolist(), "image_embedding": v.tolist()}
                          for i, t, v in zip(shard.ids, text, image)],
                "errors": [{**e, "item_id": e["item_id"] and clip(e["item_id"])}
                           for e in errors.take_until(len(records))]}

    def _prepare(self, record: dict, line: int, seen: set[str]
                 ) -> tuple[Item, np.ndarray | str] | ItemError:
        """The item and its pixels (or why there are none); an unexpected failure is logged
        and becomes this item's error, so the rest of the request is still answered."""
        try:
            item = self._parse(record, line, seen)
            return item if isinstance(item, ItemError) else (item, self._image(record, item))
        except Exception:
            request_id = new_request_id()
            logger.exception("item %d of an /embed request failed (request id %s)", line,
                             request_id)
            return ItemError(line, None, f"internal error (request id {request_id})")

    def _parse(self, record: dict, line: int, seen: set[str]) -> Item | ItemError:
        if "image" in record and "image_base64" in record:
            return ItemError(line, record.get("item_id"), "give 'image' or 'image_base64', "
                                                          "not both")
        item = parse_item(json.dumps(record), line, self.image_root or Path("."),
                          self.options.limits)
        if isinstance(item, Item):
            if item.item_id in seen:
                return ItemError(line, item.item_id, "duplicate 'item_id' (first kept)")
            seen.add(item.item_id)
        return item

    def _image(self, record: dict, item: Item) -> np.ndarray | str:
        """Pixels, or why there are none (the item then falls back as in the CLI)."""
        encoded = record.get("image_base64")
        if encoded is not None:
            if not isinstance(encoded, str):
                return "'image_base64' must be a string"
            try:
                raw = base64.b64decode(encoded, validate=True)
            except (binascii.Error, ValueError):
                return "'image_base64' is not valid base64"
            try:
                return self.preprocess.decode(io.BytesIO(raw), "image_base64")
            except ImageDecodeError as exc:
                return str(exc)
        if item.image is None:
            return load_image(self.preprocess, item)
        if self.image_root is None:
            return "image paths are disabled on this server (start it with --image-root)"
        try:
            inside = item.image.resolve().is_relative_to(self.image_root)
        except (OSError, ValueError, RuntimeError) as exc:  # null byte, link loop
            return str(unusable(exc, clip(item.image_name)))
        if not inside:
            return f"image path outside the server's image root: {clip(item.image_name)}"
        return load_image(self.preprocess, item)


class Recommender:
    """A bundle written by ``cliper-prod export``, ready to answer in Python::

        rec = Recommender("export/freedom")
        rec.topk(["u1", "u2"], k=10, exclude=["i7"])  # [{"user_id", "items", "scores"}, ...]
        rec.topk_histories([["i1", "i9"]], k=10)  # a user the model never saw, folded in
        rec.embed([{"item_id": "x", "title": "..."}])  # {"items": [...], "errors": [...]}

    ``topk`` leaves out each user's training items and ``exclude`` (``topk_histories`` the
    history and ``exclude``); ``embed`` follows the CLI's
    per-item policy (bad items are listed in ``errors``, the others embedded), with image paths
    only under ``image_root``. Both raise :class:`RequestError` for what cannot be answered.
    """

    def __init__(self, bundle: str | Path | Bundle, *, device: str = "auto",
                 backbone: str | None = None, image_root: Path | None = None,
                 embed_batch_size: int = 64) -> None:
        self.bundle = bundle if isinstance(bundle, Bundle) else Bundle(Path(bundle), device,
                                                                       backbone)
        self.ranker = TopKRanker(self.bundle)
        self.image_root, self.embed_batch_size = image_root, embed_batch_size

    @property
    def has_features(self) -> bool:
        """Whether the bundle carries the CLIP graphs :meth:`embed` runs."""
        return self.bundle.manifest.get("features") is not None

    @cached_property
    def embedder(self) -> ItemEmbedder:
        if not self.has_features:
            raise BundleError(f"{self.bundle.folder}: no CLIP feature graphs (exported without "
                              f"--clip)")
        return ItemEmbedder(self.bundle, self.image_root, self.embed_batch_size)

    def topk(self, user_ids: Sequence[str], k: int = 20, exclude: Sequence[str] = ()
             ) -> list[dict]:
        """The top ``k`` items of each user, best first, with their scores."""
        users = list(user_ids)
        rows, excluded = self.ranker.prepare(users, k, exclude)
        return self.ranker.answer(users, self.ranker.rank(rows), k, excluded)

    def topk_histories(self, histories: Sequence[Sequence[str]], k: int = 20,
                       exclude: Sequence[str] = ()) -> list[dict]:
        """The top ``k`` items of users absent from training, each given by a history of item
        ids: folded in by the backbone's user rule (:mod:`cliper_prod.runtime.fold_in`), the
        history and ``exclude`` left out; unknown ids are listed in ``unknown_items``."""
        prepared, excluded = self.ranker.prepare_histories(histories, k, exclude)
        return self.ranker.answer_histories([None] * len(prepared.unknown), prepared, k,
                                            excluded)

    def embed(self, items: list[dict]) -> dict:
        """CLIPER features of items in the JSONL schema (``item_id``, text fields, ``image``
        path or ``image_base64``)."""
        return self.embedder.embed(items)
