"""The Python API against the CLI on one bundle: ``Recommender.recommend`` (arrays, batches of
1,024 users) beside ``cliper-prod topk`` (a users file in, JSON Lines out, batches of 1,024),
each in its own child process, interleaved over --repeats rounds, so both see the same load.

    python benchmarks/bench_api.py --users 8000 --items 100000 --repeats 3

The bundle is random (standard normal tables, --dim wide, 20 training items per user, seed 0),
written once by ``export_tables`` into --work and reused. Each child is a whole process: start,
import, open the bundle (hashes checked), rank every user, write (CLI) or hold (API) the
answers. Figures per child: wall seconds, CPU seconds (user + system, from ``wait4``) and peak
RSS (VmHWM); the table gives the median of each and the API/CLI ratios. With --old, the
former API call (``Recommender.topk`` of every user at once, one ONNX run) runs once as well.
The answers are compared: the API's ids must be the CLI's file, line for line.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from _report import MEASURED_CLI, child_peak_rss_gib, report

#: the API child: rank every user of the file, print the peak RSS as a MEASURED_CLI child does
API_CHILD = """
import atexit, sys
import numpy as np
atexit.register(lambda: print('PEAK_RSS_KB', next(line.split()[1] for line in
    open('/proc/self/status') if line.startswith('VmHWM:')), file=sys.stderr))
from cliper_prod.runtime import Recommender
users = open(sys.argv[1]).read().split()
rec = Recommender(sys.argv[2], provider='cpu')
if sys.argv[4] == 'old':
    rec.topk(users, k=int(sys.argv[3]))
else:
    ids, scores = rec.recommend(users, int(sys.argv[3]))
    np.save(sys.argv[5], ids.astype(str))
"""


def make_bundle(folder: Path, n_users: int, n_items: int, dim: int) -> None:
    """A random top-K bundle (no feature graphs), written once."""
    import torch

    from cliper_prod.export.bundle_writer import EmbeddingTables, GraphOptions, export_tables

    rng = np.random.default_rng(0)
    gen = torch.Generator().manual_seed(0)
    train = np.unique(np.stack([np.repeat(np.arange(n_users), 20),
                                rng.integers(0, n_items, 20 * n_users)], 1), axis=0)
    export_tables(EmbeddingTables(torch.randn(n_users, dim, generator=gen),
                                  torch.randn(n_items, dim, generator=gen), train,
                                  [f"u{n}" for n in range(n_users)]),
                  folder, dataset=f"random {n_users}x{n_items}x{dim}",
                  options=GraphOptions(max_k=100, torchscript=False, fp16=False, fused=False))


def timed_child(argv: list[str]) -> dict:
    """Run ``argv``; its wall and CPU seconds and peak RSS (GiB)."""
    start = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(Path.cwd())})
    stderr = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status):
        raise SystemExit(f"{argv[:3]} failed:\n{stderr}")
    return {"wall_s": round(wall, 2), "cpu_s": round(usage.ru_utime + usage.ru_stime, 2),
            "peak_rss_gib": child_peak_rss_gib(stderr)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=8000)
    parser.add_argument("--items", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("-k", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--old", action="store_true", help="also time the former API call")
    parser.add_argument("--work", type=Path, default=Path("/tmp/bench_api"))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/api_vs_cli"))
    args = parser.parse_args()
    bundle = args.work / f"bundle_{args.users}x{args.items}x{args.dim}"
    if not bundle.is_dir():
        args.work.mkdir(parents=True, exist_ok=True)
        make_bundle(bundle, args.users, args.items, args.dim)
    users = args.work / "users.txt"
    users.write_text("".join(f"u{n}\n" for n in range(args.users)))
    cli_out, api_out = args.work / "cli.jsonl", args.work / "api_ids.npy"
    cli = [sys.executable, *MEASURED_CLI, "topk", "--users", str(users), "--bundle",
           str(bundle), "-k", str(args.k), "--out", str(cli_out), "--provider", "cpu"]
    api = [sys.executable, "-c", API_CHILD, str(users), str(bundle), str(args.k), "new",
           str(api_out)]
    runs: dict[str, list[dict]] = {"cli": [], "api": []}
    loads = [os.getloadavg()[0]]
    for _ in range(args.repeats):
        runs["cli"].append(timed_child(cli))
        runs["api"].append(timed_child(api))
        loads.append(os.getloadavg()[0])
    if args.old:
        runs["api_old"] = [timed_child(api[:-2] + ["old", str(api_out) + ".old"])]
    expected = [json.loads(line)["items"] for line in cli_out.read_text().splitlines()]
    same = np.load(api_out).tolist() == expected
    median = {name: {key: statistics.median(r[key] for r in rs) for key in rs[0]}
              for name, rs in runs.items()}
    ratio = {key: round(median["api"][key] / median["cli"][key], 2) for key in median["cli"]}
    result = {"users": args.users, "items": args.items, "dim": args.dim, "k": args.k,
              "runs": runs, "median": median, "api_over_cli": ratio, "same_answers": same,
              "load_1min": [round(x, 2) for x in loads], "machine": platform.platform(),
              "cpus": os.cpu_count()}
    rows = [f"| {name} | {m['wall_s']:.2f} | {m['cpu_s']:.2f} | {m['peak_rss_gib']:.2f} |"
            for name, m in median.items()]
    table = "\n".join([
        f"{args.users:,} users x {args.items:,} items x {args.dim}, k={args.k}, median of "
        f"{args.repeats} interleaved runs (load {min(loads):.1f}-{max(loads):.1f}); same "
        f"answers: {same}",
        "", "| path | wall s | CPU s | peak RSS GiB |", "| --- | --- | --- | --- |", *rows,
        f"| API / CLI | {ratio['wall_s']:.2f}x | {ratio['cpu_s']:.2f}x | "
        f"{ratio['peak_rss_gib']:.2f}x |"])
    report(args.out, result, table)
    if not same:
        raise SystemExit("the API's answers differ from the CLI's")


if __name__ == "__main__":
    main()
