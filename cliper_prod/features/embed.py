"""Batch feature extraction: items.jsonl -> CLIPER features in MMRec layout.

One pipeline for both encoders: :class:`~cliper_prod.features.clip_towers.ClipTowers` (PyTorch)
and the ONNX Runtime encoder of an exported bundle. Image decoding and preprocessing run in a
thread pool a few batches ahead of inference, so the CPU prepares batch i+1 while the model
runs batch i.

Per-item policy (every case is written to ``errors.jsonl`` with its reason; nothing is dropped
silently):
  - bad line (malformed JSON, not UTF-8, no item_id, wrong field type, duplicate id): skipped;
  - image missing or unreadable, text present: the image embedding is replaced by the mean of
    the item's view embeddings (CLIP puts both in one space), and the item is kept;
  - no text field, image readable: every field-view reads "... is Missing." and the fused text
    feature is replaced by the image embedding; the item is kept;
  - neither usable image nor text: skipped.
Outputs (each written to a temporary file and renamed): ``image_feat.npy`` [N, D],
``text_feat.npy`` [N, D'] (fused), ``item_ids.txt`` (row order), ``errors.jsonl``,
``embed_summary.json`` (``fusion: mlp`` writes the concatenation and leaves the trained
fusion to the recommender); with ``save_views`` also ``view_feat.npy`` [N, V, D] and
``similarity.npy`` [N, V].
"""

from __future__ import annotations

import json
import os
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from itertools import islice
from pathlib import Path
from typing import Iterable, Iterator, Protocol

import numpy as np
from tqdm import tqdm

from cliper_prod.features.image_preprocess import ClipImagePreprocessor, ImageDecodeError
from cliper_prod.features.items import Item, ItemError, read_items
from cliper_prod.features.tokenize import TokenizedViews
from cliper_prod.features.views import ViewSpec
from cliper_prod.io import write_json, write_npy, write_text

PREFETCH_BATCHES = 2  # batches decoded ahead of the one being encoded


class Encoder(Protocol):
    """What the pipeline needs from a CLIP backend (PyTorch towers or an ONNX bundle)."""

    source: str
    random_init: bool
    max_tokens: int
    dim: int
    preprocess: ClipImagePreprocessor

    def tokenize(self, texts: list[str], chunk: bool = False) -> TokenizedViews: ...

    def encode_images(self, pixel_values: np.ndarray) -> np.ndarray: ...

    def encode_views(self, tokens: TokenizedViews, image: np.ndarray, has_image: np.ndarray,
                     has_text: np.ndarray, mode: str, tau: float
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]: ...


@dataclass
class EmbedOptions:
    views: ViewSpec = field(default_factory=ViewSpec)
    fusion: str = "sa"
    tau: float = 0.1
    batch_size: int = 64
    chunk_long_text: bool = False
    save_views: bool = False
    workers: int = max(os.cpu_count() or 1, 1)

    @property
    def graph_fusion(self) -> str:
        """The fusion the encoder computes: ``mlp`` is extracted as the concatenation."""
        return "concat" if self.fusion == "mlp" else self.fusion


@dataclass
class _Collected:
    ids: list[str] = field(default_factory=list)
    image: list[np.ndarray] = field(default_factory=list)
    text: list[np.ndarray] = field(default_factory=list)
    views: list[np.ndarray] = field(default_factory=list)
    scores: list[np.ndarray] = field(default_factory=list)
    errors: list[dict] = field(default_factory=list)
    truncated_items: int = 0


def _batches(records: Iterable[Item | ItemError], size: int, errors: list[dict]
             ) -> Iterator[list[Item]]:
    """Group items into batches; bad lines go straight to ``errors``."""
    def items() -> Iterator[Item]:
        for rec in records:
            if isinstance(rec, ItemError):
                errors.append({**rec.as_record(), "action": "skipped"})
            else:
                yield rec
    stream = items()
    while batch := list(islice(stream, size)):
        yield batch


def _load_image(preprocess: ClipImagePreprocessor, item: Item) -> np.ndarray | str:
    """Pixel values, or the reason there are none."""
    if item.image is None:
        return "no 'image' field"
    try:
        return preprocess.load(item.image)
    except ImageDecodeError as exc:
        return str(exc)


def embed_catalog(items_path: Path, encoder: Encoder, out_dir: Path,
                  options: EmbedOptions = EmbedOptions(), progress: bool = True) -> dict:
    """Embed every item of ``items_path``; write the outputs; return the summary."""
    got = _Collected()
    bar = tqdm(desc="embed", unit="item", disable=not progress)
    pending: deque[tuple[list[Item], list[Future]]] = deque()

    def encode_oldest() -> None:
        batch, futures = pending.popleft()
        _embed_batch(batch, [f.result() for f in futures], encoder, options, got)
        bar.update(len(batch))

    with ThreadPoolExecutor(options.workers) as pool:
        for batch in _batches(read_items(items_path), options.batch_size, got.errors):
            pending.append((batch, [pool.submit(_load_image, encoder.preprocess, item)
                                    for item in batch]))
            if len(pending) > PREFETCH_BATCHES:
                encode_oldest()
        while pending:
            encode_oldest()
    bar.close()
    return _write_outputs(out_dir, got, encoder, options, items_path)


def _embed_batch(batch: list[Item], images: list[np.ndarray | str], encoder: Encoder,
                 options: EmbedOptions, got: _Collected) -> None:
    spec = options.views
    has_image = np.array([not isinstance(img, str) for img in images])
    has_text = np.array([spec.has_text(item.fields) for item in batch])
    keep = []
    for i, item in enumerate(batch):
        if not has_image[i] and not has_text[i]:
            got.errors.append({"line": item.line, "item_id": item.item_id, "action": "skipped",
                               "reason": f"no usable image ({images[i]}) and no text"})
            continue
        if not has_image[i]:
            got.errors.append({"line": item.line, "item_id": item.item_id, "action": "kept",
                               "reason": f"{images[i]}; image embedding = mean of its views"})
        elif not has_text[i]:
            got.errors.append({"line": item.line, "item_id": item.item_id, "action": "kept",
                               "reason": "no text field; fused text feature = image embedding"})
        keep.append(i)
    if not keep:
        return
    batch = [batch[i] for i in keep]
    has_image, has_text = has_image[keep], has_text[keep]
    image = np.zeros((len(batch), encoder.dim), dtype=np.float32)
    if has_image.any():
        image[has_image] = encoder.encode_images(
            np.stack([images[i] for i, ok in zip(keep, has_image) if ok]))
    tokens = encoder.tokenize([v for item in batch for v in spec.build(item.fields)],
                              chunk=options.chunk_long_text)
    fused, scores, image, views = encoder.encode_views(
        tokens, image, has_image, has_text, options.graph_fusion, options.tau)
    got.truncated_items += int(tokens.truncated.reshape(len(batch), -1).any(1).sum())
    got.ids += [item.item_id for item in batch]
    got.image.append(image)
    got.text.append(fused)
    if options.save_views:
        got.views.append(views)
        got.scores.append(scores)


def _write_outputs(out_dir: Path, got: _Collected, encoder: Encoder, options: EmbedOptions,
                   items_path: Path) -> dict:
    out_dir.mkdir(parents=True, exist_ok=True)
    dim = encoder.dim
    n_views = len(options.views.names)
    text_dim = n_views * dim if options.graph_fusion == "concat" else dim

    def stack(parts: list[np.ndarray], shape: tuple[int, ...]) -> np.ndarray:
        return np.concatenate(parts) if parts else np.zeros((0, *shape), dtype=np.float32)

    write_npy(out_dir / "image_feat.npy", stack(got.image, (dim,)))
    write_npy(out_dir / "text_feat.npy", stack(got.text, (text_dim,)))
    if options.save_views:
        write_npy(out_dir / "view_feat.npy", stack(got.views, (n_views, dim)))
        write_npy(out_dir / "similarity.npy", stack(got.scores, (n_views,)))
    write_text(out_dir / "item_ids.txt", "".join(f"{i}\n" for i in got.ids))
    write_text(out_dir / "errors.jsonl", "".join(json.dumps(e) + "\n" for e in got.errors))
    skipped = sum(e["action"] == "skipped" for e in got.errors)
    summary = {
        "items_file": str(items_path), "embedded": len(got.ids), "skipped": skipped,
        "kept_with_fallback": len(got.errors) - skipped,
        "truncated_items": got.truncated_items,
        "long_text": "chunk-and-sum" if options.chunk_long_text else "truncate",
        "clip": encoder.source, "random_weights": encoder.random_init,
        "max_tokens": encoder.max_tokens, "dim": dim, "fusion": options.fusion,
        "tau": options.tau, "views": list(options.views.names),
        "view_spec": asdict(options.views),
    }
    write_json(out_dir / "embed_summary.json", summary)
    return summary
