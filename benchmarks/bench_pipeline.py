"""The embed pipeline's CPU side alone: `embed_catalog` with both graphs replaced by no-ops.

    python benchmarks/bench_pipeline.py [--items 2048] [--workers 1 2] [--decode exact draft]
        [--decoders threads processes] [--text same|varied] [--catalog DIR]

Items carry the usual text fields (real CLIP tokenizer, 5 views) and a 640x480 photo-like JPEG
(generated on the fly, ``--images`` distinct files shared round-robin). With ``--text same``
(the default, as in the earlier figures) every item has the same text, so the encoder's token
cache tokenises 5 prompts in the whole run; ``--text varied`` gives each item its own title
and description (so its own global view) among 16 brands and 8 category paths, as a real
catalog would (a catalog folder is written once and reused: give each kind its own).
What is timed: catalog parsing, decoding and preprocessing in the decoders (threads or worker
processes), the per-item policy, tokenising, stacking and filing the outputs; the graphs
return zeros at once.
With ``--pin`` each configuration runs in a fresh process confined to as many CPUs as it has
decode workers (its tokenizer and BLAS threads too): how the pipeline scales with cores, where
the default measures worker counts on every CPU the benchmark may use (one worker then still
has the other CPUs for the driver and the tokenizer's threads). A pinned run starts cold (an
empty token cache, as a fresh ``embed`` does); the child's start-up is outside the clock.
The configurations (decode path x decoders x worker count) run interleaved, round after round,
so a change in the machine's load falls on all of them alike. For each: items/s (median of
``--repeats`` rounds), items/s per decode worker, the scaling from the first worker count, and
CPU milliseconds per item of the process and the worker processes it waited for (user +
system; the per-core cost, which a machine shared with other work disturbs less than the wall
clock). The 1-minute load average before and after each round is recorded, and the machine's
speed at the start of each (Pillow decoding and resizing the catalog's JPEGs on one thread: a
shared VM can slow by half with nothing in its own load average). It runs on any
checkout whose ``embed_catalog`` takes ``EmbedOptions(workers=...)`` (``--decode exact`` and
``--decoders threads`` only before those options existed), so old and new code can be measured
side by side on one machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import numpy as np

from _report import cpu_model, report

from cliper_prod.features.embed import EmbedOptions, embed_catalog
from cliper_prod.features.image_preprocess import ClipImagePreprocessor
from cliper_prod.features.tokenize import SpecialTokens, TokenizedViews, pack_tokens
from cliper_prod.features.views import ViewSpec

try:  # the bundle encoder's tokenising, as this checkout does it
    from cliper_prod.features.tokenize import TokenCache, library_token_ids, splits_at_spaces
except ImportError:  # a checkout from before the cache: its encoder called encode_batch
    TokenCache = None

SKELETON = Path(__file__).resolve().parents[2] / "shared" / "models" / "tinyclip-8m-skeleton"
FIELDS = {"title": "Soft organic cotton baby blanket, 30 x 40 inches, grey", "brand": "Dreamo",
          "categories": "Baby, Nursery, Bedding",
          "description": "A breathable knit blanket for cribs and strollers. " * 4}


class NoOpGraphs:
    """The embed pipeline's encoder with the real tokenizer and graphs that return zeros."""

    source = "no-op graphs"
    random_init = True
    random_weights = True
    max_tokens = 77
    dim = 512

    def __init__(self) -> None:
        from tokenizers import Tokenizer

        self.preprocess = ClipImagePreprocessor()
        self.tokenizer = Tokenizer.from_file(str(SKELETON / "tokenizer.json"))
        self.tokenizer.no_truncation()
        self.tokenizer.no_padding()
        self.special = SpecialTokens(bos=49406, eos=49407, pad=49407)
        self.token_ids = (TokenCache(partial(library_token_ids, self.tokenizer),
                                     joins=splits_at_spaces(self.tokenizer)) if TokenCache
                          else lambda texts: [e.ids for e in self.tokenizer.encode_batch(
                              texts, add_special_tokens=False)])

    def tokenize(self, texts: list[str], chunk: bool = False) -> TokenizedViews:
        return self.pack(self.token_ids(texts))  # what a checkout before `pack` calls

    def pack(self, token_lists: list[list[int]], chunk: bool = False) -> TokenizedViews:
        return pack_tokens(token_lists, self.special, self.max_tokens)

    def encode_images(self, pixel_values: np.ndarray) -> np.ndarray:
        return np.zeros((len(pixel_values), self.dim), np.float32)

    def encode_views(self, tokens, image, has_image, has_text, mode, tau):
        b, v = len(image), len(tokens.input_ids) // len(image)
        return (np.zeros((b, self.dim), np.float32), np.zeros((b, v), np.float32), image,
                np.zeros((b, v, self.dim), np.float32))


def varied_fields(i: int) -> dict[str, str]:
    """Item ``i``'s own title and description; brand and categories repeat across items."""
    from cliper_prod.data.synthetic import ADJECTIVES, COLOURS, TOPICS

    path, nouns, brands = TOPICS[i % len(TOPICS)]
    brand, noun = brands[i // len(TOPICS) % 2], nouns[i % 3]
    adj, colour = ADJECTIVES[i % 7], COLOURS[i % 5]
    return {"title": f"{brand} {adj} {colour} {noun}, model {i}", "brand": brand,
            "categories": ", ".join(path),
            "description": f"A {adj} {noun} in {colour}, item {i}. " + FIELDS["description"]}


def write_catalog(root: Path, n_items: int, n_images: int, text: str = "same") -> Path:
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
            fields = FIELDS if text == "same" else varied_fields(i)
            fh.write(json.dumps({"item_id": f"I{i}", **fields,
                                 "image": f"img/{i % n_images}.jpg"}) + "\n")
    return root / "items.jsonl"


def distinct_prompts(items: Path) -> int:
    """How many distinct view prompts the catalog's items make (what the tokenizer sees)."""
    spec = ViewSpec()
    return len({v for line in items.read_text().splitlines()
                for v in spec.build({k: v for k, v in json.loads(line).items()
                                     if k in spec.fields})})


def cpu_seconds() -> float:
    """User + system CPU of this process and of the children it has waited for."""
    own, kids = (resource.getrusage(who) for who in (resource.RUSAGE_SELF,
                                                     resource.RUSAGE_CHILDREN))
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def reference_ms(images: list[Path]) -> float:
    """The machine's speed at this moment: CPU ms per image of Pillow decoding and resizing
    ``images`` on one thread (best of 3), code this package does not change. A shared VM's
    speed can move by half within minutes; this figure beside each round says by how much."""
    from PIL import Image

    best = float("inf")
    for _ in range(3):
        start = time.process_time()
        for path in images:
            with Image.open(path) as img:
                img.convert("RGB").resize((298, 224), Image.Resampling.BICUBIC)
        best = min(best, time.process_time() - start)
    return 1000 * best / len(images)


def timed_run(items: Path, encoder: NoOpGraphs, out: Path, options: EmbedOptions
              ) -> tuple[float, float]:
    """Wall and CPU seconds of one ``embed_catalog`` run."""
    start, start_cpu = time.perf_counter(), cpu_seconds()
    embed_catalog(items, encoder, out, options, progress=False)
    return time.perf_counter() - start, cpu_seconds() - start_cpu


def pinned_run(items: Path, out: Path, workers: int, batch_size: int, extra: dict
               ) -> tuple[float, float]:
    """:func:`timed_run` in a fresh process confined to the first ``workers`` CPUs of this
    one's affinity (every thread it starts inherits them: decoders, tokenizer, BLAS)."""
    spec = {"items": str(items), "out": str(out), "workers": workers,
            "batch_size": batch_size, "extra": extra}
    mine = os.sched_getaffinity(0)  # this thread's; a child forked from it inherits them
    os.sched_setaffinity(0, sorted(mine)[:workers])
    try:
        done = subprocess.run([sys.executable, __file__, "--pinned-run", json.dumps(spec)],
                              capture_output=True, text=True)
    finally:
        os.sched_setaffinity(0, mine)
    if done.returncode:
        raise SystemExit(f"pinned run failed:\n{done.stderr[-2000:]}")
    return tuple(json.loads(done.stdout.splitlines()[-1]))


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--pinned-run":  # the child of pinned_run
        spec = json.loads(sys.argv[2])
        options = EmbedOptions(views=ViewSpec(), batch_size=spec["batch_size"],
                               workers=spec["workers"], **spec["extra"])
        print(json.dumps(timed_run(Path(spec["items"]), NoOpGraphs(), Path(spec["out"]),
                                   options)))
        return
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=int, default=2048)
    parser.add_argument("--images", type=int, default=64, help="distinct JPEG files")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--decode", nargs="+", default=["exact", "draft"])
    parser.add_argument("--decoders", nargs="+", default=["threads", "processes"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--text", choices=["same", "varied"], default="same",
                        help="every item's text the same, or each its own (a new catalog)")
    parser.add_argument("--catalog", type=Path, help="keep the generated catalog here (reused "
                                                     "when present) [default: a temporary one]")
    parser.add_argument("--pin", action="store_true",
                        help="run each configuration in its own process on as many CPUs as "
                             "workers (scaling with cores; start-up outside the clock)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/pipeline_cpu"))
    args = parser.parse_args()
    if args.pin and max(args.workers) > len(os.sched_getaffinity(0)):
        parser.error(f"--pin runs each worker on its own CPU: at most "
                     f"{len(os.sched_getaffinity(0))} here")
    encoder = NoOpGraphs()
    configs = [(d, k, w) for d in args.decode for k in args.decoders for w in args.workers]
    runs: dict[tuple, dict[str, list[float]]] = {c: {"wall": [], "cpu": []} for c in configs}
    loads, references = [], []
    with tempfile.TemporaryDirectory() as tmp:
        items = write_catalog(args.catalog or Path(tmp) / "catalog", args.items, args.images,
                              args.text)
        prompts = distinct_prompts(items)
        sample = sorted((items.parent / "img").glob("*.jpg"))[:16]
        for r in range(args.repeats):
            loads.append([os.getloadavg()[0]])
            references.append(reference_ms(sample))
            for decode, decoders, workers in configs:
                extra = {"decode": decode} if decode != "exact" else {}
                extra |= {"decoders": decoders} if decoders != "threads" else {}
                options = EmbedOptions(views=ViewSpec(), batch_size=args.batch_size,
                                       workers=workers, **extra)
                out = Path(tmp) / f"out-{decode}-{decoders}-{workers}-{r}"
                wall, cpu = pinned_run(items, out, workers, args.batch_size, extra) \
                    if args.pin else timed_run(items, encoder, out, options)
                runs[decode, decoders, workers]["wall"].append(wall)
                runs[decode, decoders, workers]["cpu"].append(cpu)
            loads[-1].append(os.getloadavg()[0])
            print(f"round {r + 1}: load {loads[-1]}", flush=True)
    rows = []
    for decode, decoders, workers in configs:
        wall, cpu = runs[decode, decoders, workers]["wall"], runs[decode, decoders, workers]["cpu"]
        rate = args.items / statistics.median(wall)
        first = args.items / statistics.median(runs[decode, decoders, args.workers[0]]["wall"])
        rows.append({"decode": decode, "decoders": decoders, "workers": workers,
                     "items_per_s": rate, "items_per_s_per_worker": rate / workers,
                     "scaling": rate / first,
                     "cpu_ms_per_item": 1000 * statistics.median(cpu) / args.items,
                     "runs_s": wall, "cpu_s": cpu})
    result = {"machine": f"{platform.machine()} {cpu_model()}, "
                         f"{len(os.sched_getaffinity(0))} CPUs in affinity, "
                         f"{platform.platform()}",
              "items": args.items, "distinct_images": args.images,
              "distinct_prompts": prompts,
              "batch_size": args.batch_size, "pinned": args.pin, "rounds_load_1min": loads,
              "rounds_reference_ms_per_image": references, "rows": rows}
    head = "workers = CPUs" if args.pin else "workers"
    lines = [f"| decode | decoders | {head} | items/s | per worker | vs first worker count | "
             "CPU ms per item |", "| --- " * 7 + "|"]
    lines += [f"| {r['decode']} | {r['decoders']} | {r['workers']} | {r['items_per_s']:.0f} | "
              f"{r['items_per_s_per_worker']:.0f} | {r['scaling']:.2f}x | "
              f"{r['cpu_ms_per_item']:.2f} |" for r in rows]
    lines.append(f"\n{args.items} items, {args.images} distinct 640x480 JPEGs, "
                 f"{prompts} distinct prompts (5 views per item), batch "
                 f"{args.batch_size}, no-op graphs; median of {args.repeats} interleaved rounds; "
                 f"1-minute load average before/after each round: "
                 f"{', '.join(f'{a:.1f}/{b:.1f}' for a, b in loads)}; the machine's speed "
                 f"at the start of each round (CPU ms per image for Pillow to decode and resize "
                 f"a 640x480 JPEG on one thread; lower is faster): "
                 f"{', '.join(f'{x:.2f}' for x in references)}. {result['machine']}.")
    report(args.out, result, "\n".join(lines))


if __name__ == "__main__":
    main()
