"""Batch feature extraction: a catalog (JSONL or Parquet, one file or a folder of shards) ->
CLIPER features in MMRec layout.

One pipeline for both encoders: :class:`~cliper_prod.features.clip_towers.ClipTowers` (PyTorch)
and the ONNX Runtime encoder of an exported bundle. Three stages overlap: image decoding and
preprocessing, and the token ids of each batch's view prompts, run in a pool of decoders
``prefetch`` batches ahead; the driver thread reads the catalog, applies the per-item policy,
stacks the uint8 pixels and packs the tokens of batch i+1 while a device thread runs the graphs
on batch i; the driver then files batch i in order.
The decoders are threads or worker processes (``decoders``; :mod:`cliper_prod.features.decoders`,
measured side by side in BENCHMARKS.md, "embed pipeline"); either gives the same output bytes.

Per-item policy (every case is written to ``errors.jsonl`` with its reason; nothing is dropped
silently):
  - bad line or row (malformed JSON, not UTF-8, no item_id, wrong field type, duplicate id,
    a Parquet file unreadable from some row on): skipped;
  - image missing or unreadable (a file, or bytes from Parquet), text present: the image
    embedding is replaced by the mean of the item's view embeddings (CLIP puts both in one
    space), and the item is kept;
  - no text field, image readable: every field-view reads "... is Missing." and the fused text
    feature is replaced by the image embedding; the item is kept;
  - neither usable image nor text: skipped.
With ``strict`` the first such case stops the run instead (nothing is written).

Outputs (each written to a temporary file and renamed, ``embed_summary.json`` last):
``image_feat.npy`` [N, D], ``text_feat.npy`` [N, D'] (fused), ``item_ids.txt`` (row order),
``errors.jsonl`` (in catalog order; ``line`` in JSONL, ``row`` in Parquet; a folder's records
name their shard under ``file``), with ``out_format="parquet"`` ``features.parquet``,
``embed_summary.json`` (``fusion: mlp`` writes the
concatenation and leaves the trained fusion to the recommender); with ``save_views`` also
``view_feat.npy`` [N, V, D] and ``similarity.npy`` [N, V]. Progress is kept in shards
(:mod:`cliper_prod.features.shards`), so a killed run resumes where it stopped.
"""

from __future__ import annotations

import os
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from itertools import islice
from pathlib import Path
from typing import Callable, Iterable, Iterator, Protocol

import numpy as np

from cliper_prod.errors import ConfigError, DataError
from cliper_prod.features.catalog import Catalog, read_catalog
from cliper_prod.features.decoders import DECODER_KINDS, open_decoders
from cliper_prod.features.image_preprocess import DRAFT_MIN_COSINE, ClipImagePreprocessor
from cliper_prod.features.items import Item, ItemError, ItemLimits
from cliper_prod.features.shards import Shard, ShardStore
from cliper_prod.features.tokenize import TokenizedViews
from cliper_prod.features.views import ViewSpec
from cliper_prod.fusion_modes import fusion_mode
from cliper_prod.io import write_json
from cliper_prod.progress import progress_bar

DECODE_PATHS = ("exact", "draft")  # see ClipImagePreprocessor.draft
#: How ``embed_summary.json`` names each path; the draft bound is tests/test_decode_paths.py's.
DECODE_SUMMARY = {
    "exact": {"path": "exact", "equals": "CLIPImageProcessor (bicubic from the full image)"},
    "draft": {"path": "draft", "jpeg": "DCT-domain downscale by 2/4/8 (libjpeg-turbo, through "
              "Pillow's draft or simplejpeg: the same pixels) while the shortest edge keeps >= "
              "size, then bicubic of the centre crop's box only",
              "min_image_cosine_vs_exact": DRAFT_MIN_COSINE},
}


def available_cpus() -> int:
    """CPUs this process may run on: its affinity (a container's share), not the host's count."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # no affinity API (macOS, Windows)
        return os.cpu_count() or 1


class Encoder(Protocol):
    """What the pipeline needs from a CLIP backend (PyTorch towers or an ONNX bundle)."""

    source: str
    random_init: bool  # built from a config at load (PyTorch only): export rebuilds it so
    random_weights: bool  # the weights are random (built so, or saved so): the features are not
    max_tokens: int
    dim: int
    preprocess: ClipImagePreprocessor

    def token_ids(self, texts: list[str]) -> list[list[int]]:
        """Each text's ids without start and end tokens (safe to call from several threads)."""

    def pack(self, token_lists: list[list[int]], chunk: bool = False) -> TokenizedViews:
        """Ids -> the text graph's inputs, padded to ``max_tokens`` (see pack_tokens)."""

    def encode_images(self, pixel_values: np.ndarray) -> np.ndarray:
        """Images [B, 3, H, W]: uint8 pixels (normalised by the encoder) or float32 (already
        normalised) -> embeddings [B, D]."""

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
    strict: bool = False  # any item error fails the run (exit 3), nothing written
    shard_items: int = 8192  # items per crash-safe shard (rounded up to whole batches)
    limits: ItemLimits = field(default_factory=ItemLimits)
    max_image_pixels: int = 64_000_000
    decode: str = "exact"  # "draft": JPEG DCT-domain downscale first (ClipImagePreprocessor)
    workers: int = field(default_factory=available_cpus)  # image decoders
    decoders: str = "threads"  # or "processes" (cliper_prod.features.decoders)
    prefetch: int = 2  # batches decoded ahead of the one the driver prepares
    out_format: str = "npy"  # "parquet": features.parquet as well, written from the .npy files

    def fingerprint(self) -> dict:
        """What decides the output bytes (not workers, strictness or progress)."""
        return {"views": asdict(self.views), "fusion": self.fusion, "tau": self.tau,
                "batch_size": self.batch_size, "chunk_long_text": self.chunk_long_text,
                "save_views": self.save_views, "shard_items": self.shard_items,
                "limits": asdict(self.limits), "max_image_pixels": self.max_image_pixels,
                "decode": self.decode}

    def __post_init__(self) -> None:
        if self.decode not in DECODE_PATHS:
            raise ConfigError(f"decode must be one of {DECODE_PATHS}, got {self.decode!r}")
        if self.decoders not in DECODER_KINDS:
            raise ConfigError(f"decoders must be one of {DECODER_KINDS}, got {self.decoders!r}")
        if self.workers < 1 or self.prefetch < 0:
            raise ConfigError(f"workers must be >= 1 and prefetch >= 0, got {self.workers} and "
                              f"{self.prefetch}")


class ItemErrors:
    """Item errors as found, each with its catalog position; with ``strict`` the first one
    stops the run, naming the file and line (or row)."""

    def __init__(self, catalog: Path, strict: bool) -> None:
        self.catalog, self.strict = catalog, strict
        self.pending: list[tuple[int, dict]] = []  # (catalog position, errors.jsonl record)

    def add(self, at: Item | ItemError, action: str, reason: str) -> None:
        record = {"file": at.file} if at.file is not None else {}
        record |= {at.unit: at.line, "item_id": at.item_id, "action": action, "reason": reason}
        self.extend([(at.position, record)])

    def extend(self, found: list[tuple[int, dict]]) -> None:
        """Add errors found elsewhere too (by a Ray actor): ``strict`` is applied here."""
        for position, record in found:
            if self.strict:
                item_id, reason = record["item_id"], record["reason"]
                path = self.catalog / record["file"] if "file" in record else self.catalog
                problem = f"item {item_id!r}: {reason} (--strict)" if item_id \
                    else f"{reason} (--strict)"
                if "row" in record:
                    raise DataError(path, f"row {record['row']}: {problem}")
                raise DataError(path, problem, line=record["line"])
            self.pending.append((position, record))

    def last_position(self) -> int:
        return max((position for position, _ in self.pending), default=0)

    def take_until(self, position: int) -> list[dict]:
        """The errors up to catalog ``position``, in catalog order (later ones were read ahead
        for the next shard)."""
        done = sorted((e for e in self.pending if e[0] <= position), key=lambda e: e[0])
        self.pending = [e for e in self.pending if e[0] > position]
        return [record for _, record in done]


def batches(records: Iterable[Item | ItemError], size: int, errors: ItemErrors
             ) -> Iterator[list[Item]]:
    """Group items into batches; bad lines go straight to ``errors``."""
    def items() -> Iterator[Item]:
        for rec in records:
            if isinstance(rec, ItemError):
                errors.add(rec, "skipped", rec.reason)
            else:
                yield rec
    stream = items()
    while batch := list(islice(stream, size)):
        yield batch


def pipeline_preprocess(encoder: Encoder, options: EmbedOptions) -> ClipImagePreprocessor:
    """The encoder's preprocessing with the run's pixel limit and decode path (every runner
    uses this one)."""
    return replace(encoder.preprocess, max_pixels=options.max_image_pixels,
                   draft=options.decode == "draft")


def run_fingerprint(catalog: Catalog, encoder: Encoder, options: EmbedOptions) -> dict:
    """What a resumed run must share with the interrupted one: every input file unchanged."""
    files = [[catalog.shard_name(f), st.st_size, st.st_mtime_ns]
             for f in catalog.files for st in [f.stat()]]
    return {"items": str(catalog.root.resolve()), "files": files, "encoder": encoder.source,
            "dim": encoder.dim, "options": options.fingerprint()}


Runner = Callable[[Catalog, "Encoder", EmbedOptions, ShardStore, bool], None]


def check_catalog(items_path: Path, out_dir: Path) -> Catalog:
    """The catalog at ``items_path``; refuse a missing or empty one, and an output folder inside
    a catalog folder (its ``errors.jsonl`` would be read as a shard by the next run)."""
    catalog = Catalog.at(items_path)
    if items_path.is_dir() and out_dir.resolve().is_relative_to(items_path.resolve()):
        raise ConfigError(f"{out_dir}: the output folder is inside the catalog folder "
                          f"{items_path}, whose *.jsonl or *.parquet files are all read as "
                          f"shards; write the outputs elsewhere")
    return catalog


def embed_catalog(items_path: Path, encoder: Encoder, out_dir: Path,
                  options: EmbedOptions = EmbedOptions(), *, progress: bool = True,
                  resume: bool = False, runner: Runner | None = None) -> dict:
    """Embed every item of ``items_path`` (a JSONL or Parquet file, or a folder of shards);
    write the outputs; return the summary.

    Work is saved in shards as it goes; ``resume`` continues a run that was killed.
    ``runner`` fills the shard store (default: this process; ``embed_ray`` passes a Ray one).
    """
    catalog = check_catalog(items_path, out_dir)
    store = ShardStore(out_dir, run_fingerprint(catalog, encoder, options), resume)
    try:
        (runner or _run)(catalog, encoder, options, store, progress)
    except DataError:  # --strict: the input needs fixing, nothing to resume
        store.remove()
        raise
    return write_outputs(out_dir, store, encoder, options, items_path)


def resume_point(store: ShardStore) -> tuple[int, set[str]]:
    """The last catalog position the saved shards account for, and the item ids they read."""
    done = list(store.metas())
    return (done[-1]["last_position"] if done else 0), {i for m in done for i in m["read_ids"]}


def shard_batches(options: EmbedOptions) -> int:
    """Batches per shard: shard_items rounded up to whole batches."""
    return max(1, -(-options.shard_items // options.batch_size))


class ShardWriter:
    """Cuts the stream of encoded batches into the store's shards: the one place shard
    boundaries and their errors are decided, so every runner writes the same shards."""

    def __init__(self, store: ShardStore, errors: ItemErrors, options: EmbedOptions) -> None:
        self.store, self.errors, self.per_shard = store, errors, shard_batches(options)
        self.shard, self.batches = Shard(), 0

    def batch_done(self, last_position: int) -> None:
        """The current shard received one more batch, whose last item is at ``last_position``
        of the catalog."""
        self.batches += 1
        self.shard.last_position = last_position
        if self.batches == self.per_shard:
            self._write()

    def close(self) -> None:
        """Write the last partial shard, with any bad lines after the last item."""
        if self.batches or self.errors.pending:
            self.shard.last_position = max(self.shard.last_position,
                                           self.errors.last_position())
            self._write()

    def _write(self) -> None:
        self.shard.errors = self.errors.take_until(self.shard.last_position)
        self.store.write(self.shard)
        self.shard, self.batches = Shard(), 0


def _run(catalog: Catalog, encoder: Encoder, options: EmbedOptions, store: ShardStore,
         progress: bool) -> None:
    start, seen = resume_point(store)
    preprocess = pipeline_preprocess(encoder, options)
    errors = ItemErrors(catalog.root, options.strict)
    writer = ShardWriter(store, errors, options)
    bar = progress_bar(desc="embed", unit="item", enabled=progress, initial=len(seen),
                       total=catalog.record_count() if progress else None)
    decoding: deque[tuple[list[Item], list[Future], Future]] = deque()
    running: deque[tuple[PreparedBatch, Future]] = deque()

    def file_oldest() -> None:
        prepared, encoded = running.popleft()
        store_batch(prepared, encoded.result(), writer.shard, options)
        bar.update(len(prepared.read_ids))
        writer.batch_done(prepared.last_position)

    def launch_oldest() -> None:
        batch, futures, token_ids = decoding.popleft()
        prepared = prepare_batch(batch, [f.result() for f in futures], token_ids.result(),
                                 encoder, options, errors)
        running.append((prepared, device.submit(encode_batch, prepared, encoder, options)))
        if len(running) > 1:  # the device holds one batch while the driver prepares the next
            file_oldest()

    records = read_catalog(catalog, options.limits, start, seen)
    with open_decoders(options.decoders, preprocess, options.workers) as decoders, \
            ThreadPoolExecutor(1, thread_name_prefix="embed-device") as device:
        for batch in batches(records, options.batch_size, errors):
            decoding.append((batch, [decoders.image(item) for item in batch],
                             decoders.host.submit(view_token_ids, batch, encoder, options)))
            if len(decoding) > options.prefetch:
                launch_oldest()
        while decoding:
            launch_oldest()
        while running:
            file_oldest()
    bar.close()
    writer.close()


@dataclass
class PreparedBatch:
    """One batch after the per-item policy, with its graph inputs built on the host."""

    read_ids: list[str]  # every item read, kept or skipped (resume skips them all)
    last_position: int  # catalog position of the batch's last item
    ids: list[str] = field(default_factory=list)  # the kept items, in order
    pixels: np.ndarray | None = None  # [n with an image, 3, H, W]
    has_image: np.ndarray | None = None
    has_text: np.ndarray | None = None
    tokens: TokenizedViews | None = None
    truncated_items: int = 0


def view_token_ids(batch: list[Item], encoder: Encoder, options: EmbedOptions
                   ) -> list[list[list[int]]]:
    """Each item's view prompts as token ids: the text half of a batch's preparation, which
    the pipeline runs on its decode threads, beside the images, rather than on the driver."""
    per_item = len(options.views.names)
    ids = encoder.token_ids([v for item in batch for v in options.views.build(item.fields)])
    return [ids[i:i + per_item] for i in range(0, len(ids), per_item)]


def prepare_batch(batch: list[Item], images: list[np.ndarray | str],
                  token_ids: list[list[list[int]]], encoder: Encoder, options: EmbedOptions,
                  errors: ItemErrors) -> PreparedBatch:
    """The per-item policy (errors filed here, in catalog order) and the graphs' inputs
    (``token_ids``: :func:`view_token_ids` of the batch)."""
    spec = options.views
    prepared = PreparedBatch([item.item_id for item in batch], batch[-1].position)
    has_image = np.array([not isinstance(img, str) for img in images])
    has_text = np.array([spec.has_text(item.fields) for item in batch])
    keep = []
    for i, item in enumerate(batch):
        reasons = list(item.notes)
        if not has_image[i] and not has_text[i]:
            errors.add(item, "skipped",
                       "; ".join(reasons + [f"no usable image ({images[i]}) and no text"]))
            continue
        if not has_image[i]:
            reasons.append(f"{images[i]}; image embedding = mean of its views")
        elif not has_text[i]:
            reasons.append("no text field; fused text feature = image embedding")
        if reasons:
            errors.add(item, "kept", "; ".join(reasons))
        keep.append(i)
    if not keep:
        return prepared
    prepared.ids = [batch[i].item_id for i in keep]
    prepared.has_image, prepared.has_text = has_image[keep], has_text[keep]
    if prepared.has_image.any():
        prepared.pixels = np.stack([images[i] for i in keep if has_image[i]])
    prepared.tokens = encoder.pack([ids for i in keep for ids in token_ids[i]],
                                   chunk=options.chunk_long_text)
    prepared.truncated_items = int(
        prepared.tokens.truncated.reshape(len(keep), -1).any(1).sum())
    return prepared


def encode_batch(prepared: PreparedBatch, encoder: Encoder, options: EmbedOptions
                 ) -> dict[str, np.ndarray] | None:
    """The graphs on one prepared batch (the device thread's work): the arrays to store."""
    if not prepared.ids:
        return None
    image = np.zeros((len(prepared.ids), encoder.dim), dtype=np.float32)
    if prepared.pixels is not None:
        image[prepared.has_image] = encoder.encode_images(prepared.pixels)
    fused, scores, image, views = encoder.encode_views(
        prepared.tokens, image, prepared.has_image, prepared.has_text,
        fusion_mode(options.fusion).extracted_as, options.tau)
    arrays = {"image": image, "text": fused}
    if options.save_views:
        arrays |= {"views": views, "scores": scores}
    return arrays


def store_batch(prepared: PreparedBatch, arrays: dict[str, np.ndarray] | None, shard: Shard,
                options: EmbedOptions) -> None:
    """File one encoded batch into ``shard`` (in catalog order: the driver calls this)."""
    shard.read_ids += prepared.read_ids
    if arrays is None:
        return
    shard.truncated_items += prepared.truncated_items
    shard.ids += prepared.ids
    for name, values in arrays.items():
        shard.add(name, values)


def embed_batch(batch: list[Item], images: list[np.ndarray | str], encoder: Encoder,
                options: EmbedOptions, shard: Shard, errors: ItemErrors) -> None:
    """Prepare, encode and file one batch in the calling thread (Ray actors, serving)."""
    prepared = prepare_batch(batch, images, view_token_ids(batch, encoder, options), encoder,
                             options, errors)
    store_batch(prepared, encode_batch(prepared, encoder, options), shard, options)


def write_outputs(out_dir: Path, store: ShardStore, encoder: Encoder, options: EmbedOptions,
                   items_path: Path) -> dict:
    dim = encoder.dim
    n_views = len(options.views.names)
    text_dim = fusion_mode(options.fusion).text_width(n_views, dim)
    shapes = {"image": ((dim,), "image_feat.npy"), "text": ((text_dim,), "text_feat.npy")}
    if options.save_views:
        shapes |= {"views": ((n_views, dim), "view_feat.npy"),
                   "scores": ((n_views,), "similarity.npy")}
    totals = store.merge(out_dir, shapes)
    skipped = sum(e["action"] == "skipped" for e in totals["errors"])
    summary = {
        "items_file": str(items_path), "input_files": len(store.fingerprint["files"]),
        "embedded": totals["embedded"], "skipped": skipped,
        "kept_with_fallback": len(totals["errors"]) - skipped,
        "truncated_items": totals["truncated_items"],
        "long_text": "chunk-and-sum" if options.chunk_long_text else "truncate",
        "clip": encoder.source, "random_weights": encoder.random_weights,
        "built_from_config": encoder.random_init,
        "max_tokens": encoder.max_tokens, "dim": dim, "fusion": options.fusion,
        "tau": options.tau, "views": list(options.views.names),
        "view_spec": asdict(options.views), "out_format": options.out_format,
        "image_decode": DECODE_SUMMARY[options.decode],
    }
    if options.out_format == "parquet":
        from cliper_prod.features.feature_table import write_feature_table

        write_feature_table(out_dir, totals["ids"], summary)
    write_json(out_dir / "embed_summary.json", summary)  # last: the outputs are complete
    store.remove()
    return summary
