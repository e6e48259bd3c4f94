"""Posted items -> CLIPER features with a bundle's CLIP graphs on ONNX Runtime, for the Python
API and ``/embed``: the CLI's :func:`~cliper_prod.features.embed.embed_batch` with its per-item
policy, items given as records in the JSONL schema with images as paths (only under
``image_root``) or base64. Messages quote a client's ids and paths cut short and never name the
server's own paths.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import logging
from dataclasses import replace
from pathlib import Path

import numpy as np

from cliper_prod.errors import incident_id
from cliper_prod.features.decoders import load_image
from cliper_prod.features.embed import EmbedOptions, ItemErrors, embed_batch
from cliper_prod.features.image_preprocess import ImageDecodeError, unusable
from cliper_prod.features.items import Item, ItemError, ItemLimits, parse_item
from cliper_prod.features.shards import Shard
from cliper_prod.messages import shorten
from cliper_prod.runtime.bundle_reader import Bundle
from cliper_prod.runtime.encoder import OnnxEncoder

logger = logging.getLogger(__name__)


class ItemEmbedder:
    """Posted items (the JSONL schema, images as paths under ``image_root`` or base64) ->
    fused text feature and image embedding per item, with the CLI's per-item policy;
    ``precision`` chooses the CLIP graphs as ``embed --bundle --precision`` does."""

    def __init__(self, bundle: Bundle, image_root: Path | None, batch_size: int = 64,
                 limits: ItemLimits = ItemLimits(), max_image_pixels: int = 64_000_000,
                 precision: str = "auto") -> None:
        self.encoder = OnnxEncoder(bundle, precision)
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
                "errors": [{**e, "item_id": e["item_id"] and shorten(e["item_id"])}
                           for e in errors.take_until(len(records))]}

    def _prepare(self, record: dict, line: int, seen: set[str]
                 ) -> tuple[Item, np.ndarray | str] | ItemError:
        """The item and its pixels (or why there are none); an unexpected failure is logged
        and becomes this item's error, so the rest of the request is still answered."""
        try:
            item = self._parse(record, line, seen)
            return item if isinstance(item, ItemError) else (item, self._image(record, item))
        except Exception:
            request_id = incident_id()
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
                return self.preprocess.decode(io.BytesIO(raw), "image_base64", uint8=True)
            except ImageDecodeError as exc:
                return str(exc)
        if item.image is None:
            return load_image(self.preprocess, item)
        if self.image_root is None:
            return "image paths are disabled on this server (start it with --image-root)"
        try:
            inside = item.image.resolve().is_relative_to(self.image_root)
        except (OSError, ValueError, RuntimeError) as exc:  # null byte, link loop
            return str(unusable(exc, shorten(item.image_name)))
        if not inside:
            return f"image path outside the server's image root: {shorten(item.image_name)}"
        return load_image(self.preprocess, item)
