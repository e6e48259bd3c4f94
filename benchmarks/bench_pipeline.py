"""The embed pipeline's CPU side alone: `embed_catalog` with both graphs replaced by no-ops.

    python benchmarks/bench_pipeline.py [--items 2048] [--workers 1 2] [--decode exact draft]

Items carry the usual text fields (real CLIP tokenizer, 5 views) and a 640x480 photo-like JPEG
(generated on the fly, ``--images`` distinct files shared round-robin). What is timed: catalog
parsing, decoding and preprocessing in the decode threads, the per-item policy, tokenising,
stacking and filing the outputs; the graphs return zeros at once. For each decode path and
worker count: items/s (median of ``--repeats`` runs), items/s per decode worker, the scaling
from the first worker count, and items per CPU-second of the process (all its threads; the
per-core cost, which a machine shared with other work disturbs less than the wall clock). The
1-minute load average before and after each row is recorded with it. It runs on any checkout whose ``embed_catalog`` takes
``EmbedOptions(workers=...)`` (``--decode exact`` only before the draft path existed), so old
and new code can be measured side by side on one machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from _report import report

from cliper_prod.features.embed import EmbedOptions, embed_catalog
from cliper_prod.features.image_preprocess import ClipImagePreprocessor
from cliper_prod.features.tokenize import SpecialTokens, TokenizedViews, pack_tokens
from cliper_prod.features.views import ViewSpec

SKELETON = Path(__file__).resolve().parents[2] / "shared" / "models" / "tinyclip-8m-skeleton"
FIELDS = {"title": "Soft organic cotton baby blanket, 30 x 40 inches, grey", "brand": "Dreamo",
          "categories": "Baby, Nursery, Bedding",
          "description": "A breathable knit blanket for cribs and strollers. " * 4}


class NoOpGraphs:
    """The embed pipeline's encoder with the real tokenizer and graphs that return zeros."""

    source = "no-op graphs"
    random_init = True
    max_tokens = 77
    dim = 512

    def __init__(self) -> None:
        from tokenizers import Tokenizer

        self.preprocess = ClipImagePreprocessor()
        self.tokenizer = Tokenizer.from_file(str(SKELETON / "tokenizer.json"))
        self.tokenizer.no_truncation()
        self.tokenizer.no_padding()
        self.special = SpecialTokens(bos=49406, eos=49407, pad=49407)

    def tokenize(self, texts: list[str], chunk: bool = False) -> TokenizedViews:
        ids = [e.ids for e in self.tokenizer.encode_batch(texts, add_special_tokens=False)]
        return pack_tokens(ids, self.special, self.max_tokens)

    def encode_images(self, pixel_values: np.ndarray) -> np.ndarray:
        return np.zeros((len(pixel_values), self.dim), np.float32)

    def encode_views(self, tokens, image, has_image, has_text, mode, tau):
        b, v = len(image), len(tokens.input_ids) // len(image)
        return (np.zeros((b, self.dim), np.float32), np.zeros((b, v), np.float32), image,
                np.zeros((b, v, self.dim), np.float32))


def write_catalog(root: Path, n_items: int, n_images: int) -> Path:
    """The items file at ``root``, written unless it is there (an old checkout lacks the
    generator, so a side-by-side run writes the catalog with the new one first)."""
    if (root / "items.jsonl").is_file():
        return root / "items.jsonl"
    from cliper_prod.data.synthetic import photo_like_jpeg

    rng = np.random.default_rng(0)
    (root / "img").mkdir(parents=True)
    for j in range(n_images):
        (root / "img" / f"{j}.jpg").write_bytes(photo_like_jpeg(rng))
    with open(root / "items.jsonl", "w") as fh:
        for i in range(n_items):
            fh.write(json.dumps({"item_id": f"I{i}", **FIELDS,
                                 "image": f"img/{i % n_images}.jpg"}) + "\n")
    return root / "items.jsonl"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=int, default=2048)
    parser.add_argument("--images", type=int, default=64, help="distinct JPEG files")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--decode", nargs="+", default=["exact", "draft"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--catalog", type=Path, help="keep the generated catalog here (reused "
                                                     "when present) [default: a temporary one]")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/pipeline_cpu"))
    args = parser.parse_args()
    encoder = NoOpGraphs()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        items = write_catalog(args.catalog or Path(tmp) / "catalog", args.items, args.images)
        for decode in args.decode:
            first = None
            for workers in args.workers:
                extra = {} if decode == "exact" else {"decode": decode}
                options = EmbedOptions(views=ViewSpec(), batch_size=args.batch_size,
                                       workers=workers, **extra)
                times, cpu = [], []
                load = os.getloadavg()[0]
                for r in range(args.repeats):
                    start, start_cpu = time.perf_counter(), time.process_time()
                    embed_catalog(items, encoder, Path(tmp) / f"out-{decode}-{workers}-{r}",
                                  options, progress=False)
                    times.append(time.perf_counter() - start)
                    cpu.append(time.process_time() - start_cpu)
                rate = args.items / statistics.median(times)
                first = first or rate
                rows.append({"decode": decode, "workers": workers, "items_per_s": rate,
                             "items_per_s_per_worker": rate / workers,
                             "scaling": rate / first,
                             "items_per_cpu_s": args.items / statistics.median(cpu),
                             "runs_s": times, "cpu_s": cpu,
                             "load_1min": [load, os.getloadavg()[0]]})
                print(rows[-1], flush=True)
    result = {"machine": f"{platform.machine()} {platform.processor()}, "
                         f"{len(os.sched_getaffinity(0))} CPUs in affinity, "
                         f"{platform.platform()}",
              "items": args.items, "distinct_images": args.images,
              "batch_size": args.batch_size, "rows": rows}
    lines = ["| decode | workers | items/s | per worker | vs first worker count | "
             "items per CPU-s | load avg (before, after) |", "| --- " * 7 + "|"]
    lines += [f"| {r['decode']} | {r['workers']} | {r['items_per_s']:.0f} | "
              f"{r['items_per_s_per_worker']:.0f} | {r['scaling']:.2f}x | "
              f"{r['items_per_cpu_s']:.0f} | {r['load_1min'][0]:.1f}, {r['load_1min'][1]:.1f} |"
              for r in rows]
    lines.append(f"\n{args.items} items, {args.images} distinct 640x480 JPEGs, batch "
                 f"{args.batch_size}, no-op graphs; median of {args.repeats} runs. "
                 f"{result['machine']}.")
    report(args.out, result, "\n".join(lines))


if __name__ == "__main__":
    main()
