"""What the service computes, without Ray or HTTP: top-K for user ids and CLIPER features for
posted items, from one exported bundle. Bad requests raise :class:`RequestError` (a 4xx).

Both run the exact code of the command-line tools (``cliper-prod topk`` formats rankings with
:func:`~cliper_prod.runtime.topk.rankings`; ``/embed`` batches items with the CLI's batch size
and runs :func:`~cliper_prod.features.embed.embed_batch`), so answers match them.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
from dataclasses import replace
from pathlib import Path

import numpy as np

from cliper_prod.bundle_format import TOPK_GRAPH
from cliper_prod.features.embed import EmbedOptions, ItemErrors, embed_batch, load_image
from cliper_prod.features.image_preprocess import ImageDecodeError
from cliper_prod.features.items import Item, ItemError, ItemLimits, parse_item
from cliper_prod.features.shards import Shard
from cliper_prod.runtime.bundle import Bundle
from cliper_prod.runtime.encoder import OnnxEncoder
from cliper_prod.runtime.topk import rankings


class RequestError(Exception):
    """A request the service cannot answer as asked; ``status`` is the HTTP code."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


class TopKRanker:
    """User ids -> rows of the top-K graph -> rankings with training items excluded."""

    def __init__(self, bundle: Bundle) -> None:
        self.graph = bundle.graph(TOPK_GRAPH)
        self.max_k = int(bundle.manifest["graphs"][TOPK_GRAPH]["k"])
        self.item_ids = np.asarray(bundle.item_ids, dtype=object)
        self.item_index = {i: n for n, i in enumerate(bundle.item_ids)}
        self.user_index = {u: n for n, u in enumerate(bundle.user_ids)}

    def rows(self, user_ids: list[str]) -> np.ndarray:
        unknown = [u for u in user_ids if u not in self.user_index]
        if unknown:
            raise RequestError(f"unknown user id(s) {unknown[:5]}" +
                               (f" and {len(unknown) - 5} more" if len(unknown) > 5 else ""))
        if len(set(user_ids)) != len(user_ids):
            raise RequestError("repeated user ids in one request")
        return np.fromiter((self.user_index[u] for u in user_ids), np.int64, len(user_ids))

    def exclusions(self, item_ids: list[str], k: int) -> set[int]:
        """Rows of items to leave out; the graph must rank k of them plus k others."""
        unknown = [i for i in item_ids if i not in self.item_index]
        if unknown:
            raise RequestError(f"exclude: unknown item id(s) {unknown[:5]}")
        rows = {self.item_index[i] for i in item_ids}
        if k + len(rows) > self.max_k:
            raise RequestError(f"k ({k}) plus excluded items ({len(rows)}) exceeds the "
                               f"{self.max_k} items the bundle ranks per user")
        return rows

    def rank(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The graph's padded top rows (the unit Ray Serve batches across requests)."""
        return self.graph(users=rows)

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
            item = self._parse(record, line, seen)
            if isinstance(item, ItemError):
                errors.add(item, "skipped", item.reason)
                continue
            parsed.append(item)
            images.append(self._image(record, item))
        shard = Shard()
        size = self.options.batch_size
        for start in range(0, len(parsed), size):
            embed_batch(parsed[start:start + size], images[start:start + size], self.encoder,
                        self.options, shard, errors)
        text = np.concatenate(shard.arrays["text"]) if shard.ids else np.zeros((0, 0))
        image = np.concatenate(shard.arrays["image"]) if shard.ids else np.zeros((0, 0))
        return {"items": [{"item_id": i, "text_feature": t.tolist(), "image_embedding": v.tolist()}
                          for i, t, v in zip(shard.ids, text, image)],
                "errors": errors.take_until(len(records))}

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
                return self.preprocess.decode(io.BytesIO(raw), f"item {item.item_id} (base64)")
            except ImageDecodeError as exc:
                return str(exc)
        if item.image is not None:
            if self.image_root is None:
                return "image paths are disabled on this server (start it with --image-root)"
            if not item.image.resolve().is_relative_to(self.image_root):
                return f"image path outside the server's image root: {record['image']}"
        return load_image(self.preprocess, item)
