"""`cliper-prod embed --bundle` end to end, this checkout against another one, side by side.

    python benchmarks/bench_embed_versions.py --old /tmp/old-checkout [--items 512]
        [--text same|varied]

Exports the tiny CLIP skeleton (../shared/models/tinyclip-8m-skeleton, random weights; speed
does not depend on them) as a feature bundle with this checkout, writes a catalog of items with
640x480 photo-like JPEGs, then runs the real CLI of each checkout on it in turn (old, new, old,
new, ...: one process each, wall time including start-up), and this checkout once more per
extra ``--decode`` path. The exact-path output files of both checkouts are compared byte for
byte (with ``--text varied``, each item's own title and description, as bench_pipeline.py
writes them: the check covers the token cache and the joined global views too). Both read the
same bundle (an older checkout ignores the uint8 twins it does not know).
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _report import report
from bench_embed import feature_bundle
from bench_pipeline import SKELETON, write_catalog

NEW = Path(__file__).resolve().parents[1]
COMPARED = ("image_feat.npy", "text_feat.npy", "item_ids.txt", "errors.jsonl")


def embed(checkout: Path, items: Path, bundle: Path, out: Path, *args: str
          ) -> tuple[float, float]:
    """Wall and CPU seconds (user + system, all threads) of one `cliper-prod embed --bundle`
    process of ``checkout``."""
    env = {**os.environ, "PYTHONPATH": str(checkout)}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "cliper_prod", "embed", str(items), "--bundle",
                    str(bundle), "--out", str(out), "--quiet", *args], cwd=checkout, env=env,
                   check=True, capture_output=True)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--old", type=Path, required=True, help="the other checkout's root")
    parser.add_argument("--items", type=int, default=512)
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--decode", nargs="*", default=["draft"],
                        help="extra decode paths to time on this checkout")
    parser.add_argument("--text", choices=["same", "varied"], default="same",
                        help="every item's text the same, or each its own")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/embed_versions"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        export_s = feature_bundle(SKELETON, work / "bundle")
        items = write_catalog(work / "catalog", args.items, args.images, args.text)
        times: dict[str, list[tuple[float, float]]] = {}
        loads = [os.getloadavg()[0]]
        for r in range(args.repeats):
            for name, checkout in (("old", args.old.resolve()), ("new", NEW)):
                times.setdefault(name, []).append(
                    embed(checkout, items, work / "bundle", work / f"{name}-{r}"))
            for decode in args.decode:
                times.setdefault(f"new --decode {decode}", []).append(
                    embed(NEW, items, work / "bundle", work / f"{decode}-{r}", "--decode",
                          decode))
            loads.append(os.getloadavg()[0])
            print({k: v[-1] for k, v in times.items()}, flush=True)
        identical = {f: (work / "old-0" / f).read_bytes() == (work / "new-0" / f).read_bytes()
                     for f in COMPARED}
    rates = {k: args.items / statistics.median(w for w, _ in v) for k, v in times.items()}
    per_cpu_s = {k: args.items / statistics.median(c for _, c in v) for k, v in times.items()}
    result = {"machine": f"{platform.machine()}, {len(os.sched_getaffinity(0))} CPUs in "
                         f"affinity, {platform.platform()}",
              "old": str(args.old), "items": args.items, "distinct_images": args.images,
              "text": args.text,
              "export_s": export_s, "runs_wall_cpu_s": times, "items_per_s": rates,
              "items_per_cpu_s": per_cpu_s, "load_1min": loads,
              "exact_outputs_identical": identical}
    lines = ["| run | items/s (median) | items per CPU-s (median) | runs, wall / CPU s |",
             "| --- | --- | --- | --- |"]
    lines += [f"| {k} | {rates[k]:.1f} | {per_cpu_s[k]:.1f} | "
              f"{', '.join(f'{w:.1f} / {c:.1f}' for w, c in v)} |" for k, v in times.items()]
    lines.append(f"\n`embed --bundle` of {args.items} items ({args.images} distinct 640x480 "
                 f"JPEGs, text: {args.text}), tinyclip-8m skeleton, random weights, one process per run (start-up "
                 f"included), runs interleaved; 1-minute load average at the start and after "
                 f"each round {[round(x, 1) for x in loads]}. Exact-path outputs old vs new byte-identical: "
                 f"{identical}. {result['machine']}.")
    report(args.out, result, "\n".join(lines))


if __name__ == "__main__":
    main()
