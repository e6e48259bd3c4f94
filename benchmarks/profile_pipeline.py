"""Where the no-op embed pipeline's CPU goes: CPU time per item of each stage, one thread.

    python benchmarks/profile_pipeline.py [--items 1024] [--catalog /tmp/pipecat]
        [--text same|varied]

Each stage runs alone over the same catalog as ``bench_pipeline.py`` (its items and 640x480
photo-like JPEGs), timed in CPU time of the process (the tokenizer's own threads count; other
processes on a shared machine disturb it little): parsing the catalog, reading the JPEG bytes,
decoding (exact: ``Image.open`` + ``load``, then EXIF orientation and Pillow's bicubic resize
and crop to uint8 channels-first; draft: ``Image.open`` + ``draft``, the reduced decode by
Pillow and by simplejpeg where installed, then the numpy resize of the crop's box), host
normalisation to float32 (what a bundle without a uint8 graph needs), building the view
prompts, tokenising (``encode_batch``, ``encode_batch_fast``, and through the encoders' token
cache, fresh for the run, global views joined from their pieces' ids), packing the tokens,
stacking a batch, filing the outputs and writing the shard. Then the whole pipeline, ``embed_catalog`` with no-op graphs at 1 worker (a thread, then a worker
process), with the CPU time of each of its threads (read from ``/proc``) and of the worker
process, so the sum of the stages can be set against what the pipeline spends and the
difference (thread hand-offs, the interpreter lock, futures, pipes) shows.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import resource
import tempfile
import threading
import time
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image, ImageOps

from _report import report
from bench_pipeline import NoOpGraphs, write_catalog

from cliper_prod.features import turbo_jpeg
from cliper_prod.features.catalog import Catalog, read_catalog
from cliper_prod.features.embed import EmbedOptions, embed_catalog
from cliper_prod.features.items import Item
from cliper_prod.features.shards import Shard
from cliper_prod.features.tokenize import (TokenCache, library_token_ids, pack_tokens,
                                          splits_at_spaces)
from cliper_prod.features.views import ViewSpec


def per_item_ms(fn, n: int) -> float:
    """CPU milliseconds of the process per item for ``fn()``, which handles ``n`` items (best
    of three: the least disturbed); the process, not the thread, so the tokenizer's own
    threads count."""
    best = float("inf")
    for _ in range(3):
        start = time.process_time()
        fn()
        best = min(best, time.process_time() - start)
    return 1000 * best / n


def image_stages(paths: list[Path], draft: bool) -> dict[str, float]:
    """CPU ms per image of each decode step, as ClipImagePreprocessor.decode does them (the
    draft path: Pillow reads the header and drafts, libjpeg-turbo decodes at the reduced size
    through simplejpeg where installed, else through Pillow, numpy resizes the crop's box)."""
    pre = replace(NoOpGraphs().preprocess, draft=draft)
    blobs = [p.read_bytes() for p in paths]
    n = len(paths)

    def opened() -> list[Image.Image]:
        out = []
        for blob in blobs:
            img = Image.open(io.BytesIO(blob))
            if draft:
                pre._draft(img)
            out.append(img)
        return out

    def loaded() -> list[Image.Image]:
        out = opened()
        for img in out:
            img.load()
        return out

    def pillow_decoded() -> list[np.ndarray]:
        return [np.asarray(img) for img in loaded()]

    if not draft:
        images = loaded()
        uint8 = [pre.pixels(img) for img in images]
        steps = {
            "decode (open, load)": per_item_ms(loaded, n),
            "EXIF orientation": per_item_ms(
                lambda: [ImageOps.exif_transpose(img, in_place=True) for img in images], n),
            "resize (bicubic) + crop to uint8 [3,H,W]": per_item_ms(
                lambda: [pre.pixels(img) for img in images], n)}
    else:
        rgb = pillow_decoded()
        uint8 = [pre.crop_pixels(a) for a in rgb]
        steps = {
            "open + draft (header only)": per_item_ms(opened, n),
            "decode reduced, Pillow (open, draft, load, to numpy)": per_item_ms(
                pillow_decoded, n)}
        if turbo_jpeg.available():
            steps["decode reduced, simplejpeg (read, header, decode; no Pillow)"] = per_item_ms(
                lambda: [turbo_jpeg.decode_reduced(p.read_bytes(), pre.size, pre.max_pixels)
                         for p in paths], n)
            steps["whole load() (uint8) without simplejpeg (Pillow decodes)"] = per_item_ms(
                lambda: without_simplejpeg(lambda: [pre.load(p, uint8=True) for p in paths]), n)
        steps["resize the crop's box (numpy bicubic) to uint8 [3,H,W]"] = per_item_ms(
            lambda: [pre.crop_pixels(a) for a in rgb], n)
    return {
        "read file": per_item_ms(lambda: [p.read_bytes() for p in paths], n),
        **steps,
        "normalise to float32 (host)": per_item_ms(
            lambda: [pre.normalise(p) for p in uint8], n),
        "stack a batch (uint8)": per_item_ms(lambda: np.stack(uint8), n),
        "whole load() (uint8)": per_item_ms(lambda: [pre.load(p, uint8=True) for p in paths], n),
    }


def without_simplejpeg(run: Callable[[], object]) -> object:
    """``run()`` as on a machine without the fast-decode extra."""
    module, turbo_jpeg.simplejpeg = turbo_jpeg.simplejpeg, None
    try:
        return run()
    finally:
        turbo_jpeg.simplejpeg = module


def text_stages(items_file: Path, n: int, batch: int) -> dict[str, float]:
    encoder, spec = NoOpGraphs(), ViewSpec()
    catalog = Catalog.at(items_file)
    items = [r for r in read_catalog(catalog) if isinstance(r, Item)][:n]
    prompts = [v for item in items for v in spec.build(item.fields)]
    ids = [e.ids for e in encoder.tokenizer.encode_batch(prompts, add_special_tokens=False)]
    groups = [range(s, min(s + batch, n)) for s in range(0, n, batch)]
    width = len(spec.names)

    def pack() -> None:
        for g in groups:
            pack_tokens(ids[g.start * width:g.stop * width], encoder.special, 77)

    def tokenise() -> None:
        for g in groups:
            encoder.tokenizer.encode_batch(prompts[g.start * width:g.stop * width],
                                           add_special_tokens=False)

    def tokenise_fast() -> None:
        for g in groups:
            library_token_ids(encoder.tokenizer, prompts[g.start * width:g.stop * width])

    joins = splits_at_spaces(encoder.tokenizer)  # once per encoder

    def tokenise_cached() -> None:  # a fresh cache each time: what one run does
        cache = TokenCache(partial(library_token_ids, encoder.tokenizer), joins=joins)
        for g in groups:
            cache(prompts[g.start * width:g.stop * width])

    def file_and_write() -> None:
        shard = Shard()
        for g in groups:
            shard.ids += [items[i].item_id for i in g]
            shard.read_ids += [items[i].item_id for i in g]
            for name, width_ in (("image", 512), ("text", 512)):
                shard.add(name, np.zeros((len(g), width_), np.float32))
        buf = io.BytesIO()
        np.savez(buf, meta=np.str_(json.dumps(shard.meta())),
                 **{k: np.concatenate(v) for k, v in shard.arrays.items()})

    return {
        "parse catalog (JSONL -> Item)": per_item_ms(
            lambda: [r for _, r in zip(range(n), read_catalog(catalog))], n),
        "build 5 view prompts": per_item_ms(
            lambda: [spec.build(item.fields) for item in items], n),
        "tokenise (tokenizers encode_batch)": per_item_ms(tokenise, n),
        "tokenise (encode_batch_fast)": per_item_ms(tokenise_fast, n),
        "tokenise (the encoders' TokenCache over encode_batch_fast)": per_item_ms(
            tokenise_cached, n),
        "pack tokens": per_item_ms(pack, n),
        "file outputs + write shard (no-op zeros)": per_item_ms(file_and_write, n),
    }


def thread_cpu() -> dict[str, float]:
    """CPU seconds so far of each live thread of this process, by thread name."""
    names = {t.native_id: t.name for t in threading.enumerate()}
    out: dict[str, float] = {}
    for tid in os.listdir("/proc/self/task"):
        fields = Path(f"/proc/self/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()
        seconds = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        name = names.get(int(tid), f"native-{tid}")
        out[name] = out.get(name, 0.0) + seconds
    return out


def pipeline_threads(items_file: Path, n: int, decode: str, decoders: str, out: Path
                     ) -> dict[str, float]:
    """CPU ms per item of each thread of one embed_catalog run at 1 worker, sampled just before
    its pools shut down (a monitor thread keeps the last reading of every thread), and of the
    decode worker process with ``decoders="processes"``."""
    seen: dict[str, float] = {}
    stop = threading.Event()

    def monitor() -> None:
        while not stop.wait(0.05):
            for name, cpu in thread_cpu().items():
                seen[name] = max(seen.get(name, 0.0), cpu)

    before = thread_cpu()
    watcher = threading.Thread(target=monitor, name="monitor")
    watcher.start()
    start, kids = time.process_time(), resource.getrusage(resource.RUSAGE_CHILDREN)
    embed_catalog(items_file, NoOpGraphs(), out,
                  EmbedOptions(workers=1, decode=decode, decoders=decoders), progress=False)
    total = time.process_time() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    workers = (after.ru_utime + after.ru_stime) - (kids.ru_utime + kids.ru_stime)
    stop.set()
    watcher.join()
    per_thread = {k.split("_")[0] if k.startswith("ThreadPoolExecutor") else k:
                  1000 * (v - before.get(k, 0.0)) / n for k, v in seen.items() if k != "monitor"}
    return {**{f"thread {k}": round(v, 3) for k, v in sorted(per_thread.items())},
            "this process": 1000 * total / n, "decode worker process": 1000 * workers / n,
            "total": 1000 * (total + workers) / n}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=int, default=1024)
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--catalog", type=Path)
    parser.add_argument("--text", choices=["same", "varied"], default="same",
                        help="as bench_pipeline.py's (a new catalog folder for each)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/pipeline_profile"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        items_file = write_catalog(args.catalog or Path(tmp) / "catalog", args.items,
                                   args.images, args.text)
        paths = sorted((items_file.parent / "img").glob("*.jpg"))[:args.images]
        load = [os.getloadavg()[0]]
        result: dict = {"text": text_stages(items_file, args.items, 64)}
        for decode in ("exact", "draft"):
            result[decode] = image_stages(paths, decode == "draft")
            for kind in ("threads", "processes"):
                result[f"pipeline {decode} {kind}"] = pipeline_threads(
                    items_file, args.items, decode, kind, Path(tmp) / f"out-{decode}-{kind}")
        load.append(os.getloadavg()[0])
    result["load_1min"] = load
    lines = ["| stage | CPU ms per item |", "| --- | --- |"]
    for section in ("text", "exact", "draft", "pipeline exact threads",
                    "pipeline exact processes", "pipeline draft threads",
                    "pipeline draft processes"):
        lines.append(f"| **{section}** | |")
        lines += [f"| {k} | {v:.3f} |" for k, v in result[section].items()]
    lines.append(f"\n{args.items} items, {args.images} distinct 640x480 JPEGs, batch 64; one "
                 f"thread, best of 3 per stage; load average {load[0]:.1f} -> {load[1]:.1f}.")
    print(json.dumps(result, indent=1))
    report(args.out, result, "\n".join(lines))


if __name__ == "__main__":
    main()
