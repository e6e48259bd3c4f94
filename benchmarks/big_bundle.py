"""A bundle past ONNX's 2 GB protobuf wall, end to end: random tables of --items x --dim
(default 10M x 64 fp32, a 2.56 GB item table) are exported with ``export_tables``, opened
(manifest hashes checked), ranked by the real ``cliper-prod topk`` and by a real
``cliper-prod serve`` (Ray Serve on loopback), and both answers are compared with naive numpy
on sampled users (top-K by score, training items out).

    python benchmarks/big_bundle.py --work /tmp/big --out benchmarks/results/big_bundle_cpu

The tables are random normal (seed 0); users' training items are uniform, with one user
holding 50,000. Figures: wall times of each stage, file sizes, peak RSS of this process and of
the `topk` child.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import torch

from _report import MEASURED_CLI, child_peak_rss_gib, free_port, peak_rss_gib, report
from cliper_prod.export.bundle_writer import EmbeddingTables, GraphOptions, export_tables
from cliper_prod.runtime.bundle_reader import Bundle

CLI = [sys.executable, "-m", "cliper_prod"]
MEASURED = [sys.executable, *MEASURED_CLI]


def naive_topk(users: np.ndarray, items: np.ndarray, train: set[int], k: int) -> list[int]:
    """Best ``k`` items of one user by dot product, training items out, over the whole table."""
    scores = items @ users
    scores[list(train)] = -np.inf
    top = np.argpartition(-scores, k)[:k]
    return top[np.argsort(-scores[top], kind="stable")].tolist()


def post(url: str, body: dict) -> dict:
    req = urllib.request.Request(url, json.dumps(body).encode(),
                                 {"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=600) as resp:
        return json.loads(resp.read())


def serve_answers(bundle: Path, user_ids: list[str], k: int, log: Path) -> tuple[list, float]:
    """Start `cliper-prod serve --engine ray` (as measured), wait for /healthz, ask /topk, stop
    it with SIGTERM."""
    port = free_port()
    start = time.perf_counter()
    with open(log, "w") as fh:
        proc = subprocess.Popen([*CLI, "serve", "--engine", "ray", "--bundle", str(bundle),
                                 "--port", str(port), "--device", "cpu",
                                 "--startup-timeout-s", "900"],
                                stdout=fh, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"serve exited {proc.returncode}: {log.read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(url + "/healthz", timeout=30) as resp:
                    if resp.status == 200:
                        break
            except OSError:
                time.sleep(2)
        ready_s = time.perf_counter() - start
        return post(url + "/topk", {"users": user_ids, "k": k})["results"], ready_s
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=10_000_000)
    parser.add_argument("--users", type=int, default=2_000)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--k", type=int, default=20)
    parser.add_argument("--sample", type=int, default=50, help="users checked against numpy")
    parser.add_argument("--work", type=Path, default=Path("/tmp/big_bundle"))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/big_bundle_cpu"))
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    shutil.rmtree(args.work, ignore_errors=True)
    args.work.mkdir(parents=True)
    bundle = args.work / "bundle"
    rng = np.random.default_rng(0)
    gen = torch.Generator().manual_seed(0)
    users = torch.randn(args.users, args.dim, generator=gen)
    items = torch.randn(args.items, args.dim, generator=gen)
    train = np.stack([rng.integers(0, args.users, 20 * args.users),
                      rng.integers(0, args.items, 20 * args.users)], 1)
    heavy = np.stack([np.zeros(50_000, np.int64), rng.choice(args.items, 50_000, replace=False)], 1)
    train = np.unique(np.concatenate([train, heavy]), axis=0)
    ids = [f"u{n}" for n in range(args.users)]
    timings: dict[str, float] = {}

    t = time.perf_counter()
    manifest = export_tables(EmbeddingTables(users, items, train, ids), bundle,
                             dataset=f"random {args.users}x{args.items}x{args.dim}",
                             options=GraphOptions(max_k=100, torchscript=False, fp16=False,
                                                  fused=False))
    timings["export_s"] = time.perf_counter() - t
    sizes = {p.name: p.stat().st_size for p in sorted(bundle.iterdir())}
    t = time.perf_counter()
    Bundle(bundle, "cpu")  # every file's hash checked against the manifest
    timings["open_and_verify_s"] = time.perf_counter() - t

    sample = rng.choice(args.users, args.sample, replace=False).tolist()
    sample = [0] + [u for u in sample if u != 0][:args.sample - 1]  # the heavy user first
    users_file = args.work / "users.txt"
    users_file.write_text("".join(f"{ids[u]}\n" for u in sample))
    recs_file = args.work / "recs.jsonl"
    t = time.perf_counter()
    proc = subprocess.run([*MEASURED, "topk", "--users", str(users_file), "--bundle", str(bundle),
                           "-k", str(args.k), "--out", str(recs_file), "--device", "cpu"],
                          capture_output=True, text=True)
    timings["topk_cli_s"] = time.perf_counter() - t
    if proc.returncode:
        raise SystemExit(proc.stderr)
    topk_rss = child_peak_rss_gib(proc.stderr)
    cli = [json.loads(line) for line in recs_file.read_text().splitlines()]
    served, timings["serve_ready_s"] = serve_answers(bundle, [ids[u] for u in sample], args.k,
                                                     args.work / "serve.log")

    by_user: dict[int, set[int]] = {}
    for u, i in train[np.isin(train[:, 0], sample)].tolist():
        by_user.setdefault(u, set()).add(i)
    table = items.numpy()
    t = time.perf_counter()
    expected = [[str(i) for i in naive_topk(users[u].numpy(), table, by_user.get(u, set()),
                                            args.k)] for u in sample]
    timings["naive_numpy_s"] = time.perf_counter() - t
    cli_equal = sum(r["items"] == e for r, e in zip(cli, expected))
    serve_equal = sum(r["items"] == e for r, e in zip(served, expected))
    total = sum(sizes.values())
    result = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
        "command": " ".join(["python", *sys.argv]),
        "versions": manifest["versions"], "items": args.items, "users": args.users,
        "dim": args.dim, "training_pairs": int(len(train)), "heavy_user_pairs": 50_000,
        "k": args.k, "sampled_users": len(sample), "file_bytes": sizes, "bundle_bytes": total,
        "timings_s": {k: round(v, 2) for k, v in timings.items()},
        "peak_rss_gib": {"export_process": peak_rss_gib(), "topk_cli": topk_rss},
        "topk_cli_equal_numpy": f"{cli_equal}/{len(sample)}",
        "serve_equal_numpy": f"{serve_equal}/{len(sample)}",
    }
    lines = ["| stage | figure |", "|---|---|",
             f"| bundle | {total / 1e9:.2f} GB in {len(sizes)} files; topk.onnx "
             f"{sizes['topk.onnx'] / 1e3:.0f} kB + topk.onnx.data "
             f"{sizes['topk.onnx.data'] / 1e9:.2f} GB |"]
    lines += [f"| {name.removesuffix('_s').replace('_', ' ')} | {value:.1f} s |"
              for name, value in timings.items()]
    lines += [f"| peak RSS | export {result['peak_rss_gib']['export_process']} GiB, topk CLI "
              f"{result['peak_rss_gib']['topk_cli']} GiB |",
              f"| `topk` CLI = numpy | {result['topk_cli_equal_numpy']} users |",
              f"| `serve` /topk = numpy | {result['serve_equal_numpy']} users |"]
    report(args.out, result, "\n".join(lines))
    if cli_equal != len(sample) or serve_equal != len(sample):
        raise SystemExit("top-K differs from numpy")


if __name__ == "__main__":
    main()
