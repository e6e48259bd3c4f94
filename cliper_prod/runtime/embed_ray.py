"""``embed --ray``: the embed pipeline as Ray Data stages, with the single-process outputs byte
for byte.

A sequential planning pass on the driver reads the catalog once (every line or row must be
parsed in order to find bad ones and duplicate ids; Parquet image bytes are left unread) and
cuts the items into exactly the batches and shards of the single-process path, recording each
crash-safe shard as a read unit: its batches' sizes and, per input file, the lines (with the
byte offset of the first) or rows it re-reads, not their content. Ray Data then streams three
stages, each with its own back-pressure:

  read        CPU tasks re-read and parse a unit's lines or rows from the shared file(s) in one
              pass per file (for Parquet, only the row groups that hold them) and emit its
              batches one by one;
  preprocess  CPU tasks decode, orient and resize each batch's images;
  encode      actors holding the bundle's ONNX Runtime sessions (one GPU each when the cluster
              has GPUs) run the same per-batch code as the single-process path.

Encoded batches come back to the driver in order and go through the same shard writer, so
``--resume``, the per-item error policy, the merge and every output byte are shared code. On a
cluster the items file or folder and the image paths must be readable at the same path on every
node.
"""

from __future__ import annotations

import json
import logging
import pickle
from dataclasses import dataclass, replace
from itertools import groupby, islice
from pathlib import Path
from typing import Any, Iterator

from cliper_prod.errors import CliperError, ConfigError
from cliper_prod.features.decoders import load_image
from cliper_prod.features.embed import (EmbedOptions, ItemErrors, ShardWriter, batches,
                                        embed_batch, pipeline_preprocess, resume_point,
                                        shard_batches)
from cliper_prod.features.image_preprocess import ClipImagePreprocessor
from cliper_prod.features.catalog import Catalog, is_parquet, read_catalog
from cliper_prod.features.items import Item, ItemLimits, reread_items
from cliper_prod.features.shards import Shard, ShardStore
from cliper_prod.progress import progress_bar
from cliper_prod.runtime.sessions import OrtThreads


# Distinct CPU requests keep Ray Data from fusing the stages into one operator, so each stage
# scales and back-pressures on its own: re-reading a batch is light, decoding images is not.
READ_CPUS, PREPROCESS_CPUS, ENCODE_CPUS = 0.25, 0.5, 1.0


@dataclass(frozen=True)
class RaySettings:
    address: str | None = None  # None: start a local Ray instance (or use the one running)
    actors: int | None = None  # encode actors; default: one per GPU, else one
    provider: str = "auto"
    precision: str = "auto"
    gpus_per_actor: float | None = None  # Ray's num_gpus per encode actor; default: 1 with GPUs
    threads: OrtThreads = OrtThreads()  # of each encode actor's sessions

    def actor_gpus(self, cluster_gpus: float) -> float:
        """What each encode actor asks Ray for: Ray hides GPUs from an actor asking for none."""
        if self.gpus_per_actor is not None:
            return self.gpus_per_actor
        return 1.0 if cluster_gpus else 0.0


def plan(catalog: Catalog, options: EmbedOptions, store: ShardStore, errors: ItemErrors
         ) -> list[dict[str, Any]]:
    """The single-process batches after the store's resume point, one read unit per
    crash-safe shard: the index of its first batch, its batches' sizes and the spans it
    re-reads (one per input file it touches, as JSON). Bad records go to ``errors`` now (with
    ``strict``, the first one stops the run here)."""
    start, seen = resume_point(store)
    records = read_catalog(catalog, options.limits, start, seen, images=False)
    stream, per_unit = batches(records, options.batch_size, errors), shard_batches(options)
    units = []
    while unit := list(islice(stream, per_unit)):
        items = [item for batch in unit for item in batch]
        units.append({"index": len(units) * per_unit,
                      "sizes": json.dumps([len(batch) for batch in unit]),
                      "segments": json.dumps([_segment(list(run)) for _, run in
                                              groupby(items, key=lambda item: item.file)])})
    return units


def _segment(items: list[Item]) -> dict[str, Any]:
    """Where a run of one file's items can be re-read."""
    return {"file": items[0].file, "base": items[0].base, "offset": items[0].offset,
            "first_line": items[0].line, "lines": [item.line for item in items]}


def _reread(root: Path, seg: dict, limits: ItemLimits) -> Iterator[Item]:
    """The items of one segment, read by its file's format."""
    path = root / seg["file"] if seg["file"] else root
    if is_parquet(path):
        from cliper_prod.features.parquet_catalog import reread_parquet_rows

        return reread_parquet_rows(path, seg["lines"], limits, seg["file"], seg["base"])
    return iter(reread_items(path, seg["offset"], seg["first_line"], seg["lines"], limits,
                             seg["file"], seg["base"]))


def _read(unit: dict, items_path: str, limits: ItemLimits) -> Iterator[dict]:
    """A unit's batches, one row each, its files read once in order."""
    items = (item for seg in json.loads(unit["segments"])
             for item in _reread(Path(items_path), seg, limits))
    for k, size in enumerate(json.loads(unit["sizes"])):
        yield {"index": unit["index"] + k, "payload": pickle.dumps(list(islice(items, size)))}


def _preprocess(row: dict, preprocess: ClipImagePreprocessor) -> dict:
    """A batch's pixels; its items travel on without their image bytes (decoded now)."""
    items = pickle.loads(row["payload"])
    images = [load_image(preprocess, item) for item in items]
    items = [replace(item, image_bytes=None) for item in items]
    return {"index": row["index"], "payload": pickle.dumps((items, images))}


class _Encode:
    """One encode actor: the bundle's sessions, opened once, reused for every batch."""

    def __init__(self, bundle_dir: str, settings: RaySettings, options: EmbedOptions) -> None:
        from cliper_prod.runtime.bundle_reader import Bundle
        from cliper_prod.runtime.encoder import OnnxEncoder

        self.encoder = OnnxEncoder(Bundle(Path(bundle_dir), settings.provider,
                                          threads=settings.threads), settings.precision)
        self.options = options

    def __call__(self, row: dict) -> dict:
        items, images = pickle.loads(row["payload"])
        part = Shard()
        errors = ItemErrors(Path(), strict=False)  # the driver applies --strict
        embed_batch(items, images, self.encoder, self.options, part, errors)
        return {"index": row["index"],
                "payload": pickle.dumps((part, errors.pending, items[-1].position,
                                         len(items)))}


def ray_runner(bundle_dir: Path, settings: RaySettings):
    """A runner for :func:`~cliper_prod.features.embed.embed_catalog` that encodes on Ray."""
    try:
        import ray
    except ImportError:
        raise ConfigError("--ray needs Ray: pip install 'cliper-prod[ray]'") from None

    def run(catalog: Catalog, encoder, options: EmbedOptions, store: ShardStore,
            progress: bool) -> None:
        errors = ItemErrors(catalog.root, options.strict)
        writer = ShardWriter(store, errors, options)
        units = plan(catalog, options, store, errors)
        started = not ray.is_initialized()
        if started:
            ray.init(address=settings.address, include_dashboard=False, log_to_driver=False)
        try:
            bar = progress_bar(desc="embed (ray)", unit="item", enabled=progress,
                               initial=len(resume_point(store)[1]),
                               total=catalog.record_count() if progress else None)
            stream = _stream(ray, units, catalog.root, encoder, options, bundle_dir, settings,
                             progress)
            try:
                for expected, (index, (part, part_errors, last_position, n)) in enumerate(stream):
                    if index != expected:
                        raise RuntimeError(f"Ray returned batch {index} where {expected} was due")
                    errors.extend(part_errors)
                    writer.shard.extend(part)
                    writer.batch_done(last_position)
                    bar.update(n)
            except ray.exceptions.RayTaskError as exc:
                if isinstance(exc.cause, CliperError):  # a worker's input problem: its one line
                    raise exc.cause from None
                raise
            bar.close()
        finally:
            if started:
                ray.shutdown()
        writer.close()

    return run


def _stream(ray, units: list[dict], items_path: Path, encoder, options: EmbedOptions,
            bundle_dir: Path, settings: RaySettings, progress: bool):
    """The encoded batches in input order."""
    if not units:
        return
    resources = ray.cluster_resources()
    gpus = int(resources.get("GPU", 0))
    actors = settings.actors or max(gpus, 1)
    needed = actors * ENCODE_CPUS + PREPROCESS_CPUS + READ_CPUS
    if resources.get("CPU", 0) < needed:  # Ray Data would wait for them forever
        raise ConfigError(f"--ray with {actors} encode actor(s) needs {needed:g} CPUs in the "
                          f"Ray cluster; it has {resources.get('CPU', 0):g}")
    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True  # shards must be cut in input order
    ctx.enable_progress_bars = False  # the driver's own bar counts items
    logging.getLogger("ray.data").setLevel(logging.INFO if progress else logging.WARNING)
    preprocess = pipeline_preprocess(encoder, options)
    dataset = (ray.data.from_items(units)
               .flat_map(_read, fn_kwargs={"items_path": str(items_path.resolve()),
                                           "limits": options.limits}, num_cpus=READ_CPUS)
               .map(_preprocess, fn_kwargs={"preprocess": preprocess}, num_cpus=PREPROCESS_CPUS)
               .map(_Encode, fn_constructor_kwargs={"bundle_dir": str(bundle_dir.resolve()),
                                                    "settings": settings, "options": options},
                    concurrency=actors, num_cpus=ENCODE_CPUS,
                    num_gpus=settings.actor_gpus(gpus)))
    for row in dataset.iter_rows():
        yield row["index"], pickle.loads(row["payload"])
