"""`embed --ray` vs the single-process `embed --bundle`, same catalog and bundle, one run:
items/s of each and whether the outputs are byte-identical.

The catalog is the built-in synthetic generator's (items.jsonl + rendered PNGs, 64 px unless
--image-size), so the figures show pipeline overhead and scaling, not a real catalog's decode
cost. Ray's start-up is timed separately and left out of its items/s.

    python benchmarks/bench_embed_ray.py --bundle /tmp/demo/bundle --items 4000
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import time
from pathlib import Path

from _report import report
from cliper_prod.data.synthetic import SyntheticSpec, generate_catalog
from cliper_prod.features.embed import EmbedOptions, embed_catalog
from cliper_prod.runtime.embed_ray import RaySettings, ray_runner
from cliper_prod.runtime.bundle_reader import Bundle
from cliper_prod.runtime.encoder import OnnxEncoder


def same_outputs(a: Path, b: Path) -> bool:
    names = sorted(p.name for p in a.iterdir())
    return names == sorted(p.name for p in b.iterdir()) and all(
        (a / n).read_bytes() == (b / n).read_bytes() for n in names)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, required=True)
    parser.add_argument("--items", type=int, default=4000)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--actors", type=int, default=None)
    parser.add_argument("--workdir", type=Path, default=Path("runs/bench-embed-ray"))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/embed_ray_cpu"))
    args = parser.parse_args()

    import ray

    shutil.rmtree(args.workdir, ignore_errors=True)
    catalog = args.workdir / "catalog"
    generate_catalog(catalog, SyntheticSpec(n_users=50, n_items=args.items,
                                            image_size=args.image_size, seed=7))
    items = catalog / "items.jsonl"
    encoder = OnnxEncoder(Bundle(args.bundle, "cpu"))
    options = EmbedOptions(views=encoder.views, fusion=encoder.fusion, tau=encoder.tau,
                           batch_size=args.batch_size)

    start = time.perf_counter()
    single = embed_catalog(items, encoder, args.workdir / "single", options, progress=False)
    single_s = time.perf_counter() - start

    start = time.perf_counter()
    ray.init(include_dashboard=False, log_to_driver=False)
    ray_start_s = time.perf_counter() - start
    runner = ray_runner(args.bundle, RaySettings(actors=args.actors, provider="cpu"))
    start = time.perf_counter()
    embed_catalog(items, OnnxEncoder(Bundle(args.bundle, "cpu")), args.workdir / "ray",
                  options, progress=False, runner=runner)
    ray_s = time.perf_counter() - start
    ray.shutdown()

    n = single["embedded"]
    identical = same_outputs(args.workdir / "single", args.workdir / "ray")
    result = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
              "bundle": str(args.bundle), "clip": encoder.source, "items": n,
              "image_size": args.image_size, "batch_size": args.batch_size,
              "actors": args.actors or 1, "single_s": single_s, "ray_s": ray_s,
              "ray_start_s": ray_start_s, "single_items_per_s": n / single_s,
              "ray_items_per_s": n / ray_s, "byte_identical": identical,
              "ray": ray.__version__, "python": platform.python_version()}
    table = "\n".join([
        "| path | items | seconds | items/s | ratio |", "|---|---:|---:|---:|---:|",
        f"| single process (`embed --bundle`) | {n} | {single_s:.1f} | {n / single_s:.0f} | 1.00 |",
        f"| Ray Data (`embed --ray`, {args.actors or 1} encode actor(s)) | {n} | {ray_s:.1f} | "
        f"{n / ray_s:.0f} | {single_s / ray_s:.2f} |",
        "", f"Ray start-up (not counted): {ray_start_s:.1f} s; outputs byte-identical: "
            f"{identical}"])
    report(args.out, result, table)


if __name__ == "__main__":
    main()
