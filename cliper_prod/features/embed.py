"""Batch feature extraction (PyTorch path): items.jsonl -> CLIPER features in MMRec layout.

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
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from itertools import islice
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import torch
from tqdm import tqdm

from cliper_prod.features.clip_towers import ClipTowers
from cliper_prod.features.fusion import ViewFusion
from cliper_prod.features.image_preprocess import ImageDecodeError
from cliper_prod.features.items import Item, ItemError, read_items
from cliper_prod.features.views import ViewSpec
from cliper_prod.io import write_json, write_npy, write_text


@dataclass
class EmbedOptions:
    views: ViewSpec = field(default_factory=ViewSpec)
    fusion: str = "sa"
    tau: float = 0.1
    batch_size: int = 64
    chunk_long_text: bool = False
    save_views: bool = False
    workers: int = max(os.cpu_count() or 1, 1)


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


def _load_image(towers: ClipTowers, item: Item) -> np.ndarray | str:
    if item.image is None:
        return "no 'image' field"
    try:
        return towers.preprocess.load(item.image)
    except ImageDecodeError as exc:
        return str(exc)


def embed_catalog(items_path: Path, towers: ClipTowers, out_dir: Path,
                  options: EmbedOptions = EmbedOptions(), progress: bool = True) -> dict:
    """Embed every item of ``items_path``; write the outputs; return the summary."""
    fusion = ViewFusion("concat" if options.fusion == "mlp" else options.fusion, options.tau)
    spec = options.views
    got = _Collected()
    bar = tqdm(desc="embed", unit="item", disable=not progress)
    with ThreadPoolExecutor(options.workers) as pool:
        batches = _batches(read_items(items_path), options.batch_size, got.errors)
        for batch in batches:
            images = list(pool.map(lambda it: _load_image(towers, it), batch))
            _embed_batch(batch, images, towers, fusion, spec, options, got)
            bar.update(len(batch))
    bar.close()
    return _write_outputs(out_dir, got, towers, options, items_path)


def _embed_batch(batch: list[Item], images: list[np.ndarray | str], towers: ClipTowers,
                 fusion: ViewFusion, spec: ViewSpec, options: EmbedOptions,
                 got: _Collected) -> None:
    n_views = len(spec.names)
    texts = [view for item in batch for view in spec.build(item.fields)]
    view_emb, truncated = towers.encode_texts(texts, chunk=options.chunk_long_text)
    view_emb = view_emb.reshape(len(batch), n_views, -1)
    got.truncated_items += int(truncated.reshape(len(batch), n_views).any(1).sum())
    ok = [i for i, img in enumerate(images) if not isinstance(img, str)]
    image_emb = np.zeros((len(batch), view_emb.shape[2]), dtype=np.float32)
    if ok:
        image_emb[ok] = towers.encode_images(np.stack([images[i] for i in ok]))
    has_text = np.array([spec.has_text(item.fields) for item in batch])
    keep = []
    for i, item in enumerate(batch):
        image_ok = i in ok
        if not image_ok and not has_text[i]:
            got.errors.append({"line": item.line, "item_id": item.item_id, "action": "skipped",
                               "reason": f"no usable image ({images[i]}) and no text"})
            continue
        if not image_ok:
            image_emb[i] = view_emb[i].mean(0)
            got.errors.append({"line": item.line, "item_id": item.item_id, "action": "kept",
                               "reason": f"{images[i]}; image embedding = mean of its views"})
        elif not has_text[i]:
            got.errors.append({"line": item.line, "item_id": item.item_id, "action": "kept",
                               "reason": "no text field; fused text feature = image embedding"})
        keep.append(i)
    if not keep:
        return
    views_t, image_t = torch.from_numpy(view_emb[keep]), torch.from_numpy(image_emb[keep])
    fused, scores = (t.numpy() for t in fusion(views_t, image_t))
    for row, i in enumerate(keep):
        if not has_text[i] and fusion.mode != "concat":
            fused[row] = image_emb[i]
    got.ids += [batch[i].item_id for i in keep]
    got.image.append(image_emb[keep])
    got.text.append(fused)
    if options.save_views:
        got.views.append(view_emb[keep])
        got.scores.append(scores)


def _write_outputs(out_dir: Path, got: _Collected, towers: ClipTowers, options: EmbedOptions,
                   items_path: Path) -> dict:
    out_dir.mkdir(parents=True, exist_ok=True)
    dim = towers.dim
    n_views = len(options.views.names)
    text_dim = n_views * dim if options.fusion in ("concat", "mlp") else dim

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
        "clip": towers.source, "random_weights": towers.random_init,
        "max_tokens": towers.max_tokens, "dim": dim, "fusion": options.fusion,
        "tau": options.tau, "views": list(options.views.names),
        "view_spec": asdict(options.views),
    }
    write_json(out_dir / "embed_summary.json", summary)
    return summary
