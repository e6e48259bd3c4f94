"""Load test of `cliper-prod serve` /topk on loopback: requests/s and p50/p95/p99 latency at
several concurrencies, with and without Ray Serve's dynamic batching, in one run.

Each request asks for one random user's top-k (the online pattern). Every level is bounded by
--requests and --max-seconds. The service runs on a local Ray started here.

    python benchmarks/load_serve.py --bundle /tmp/bundle-baby --out benchmarks/results/serve_load_cpu
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import random
import time
from pathlib import Path

import aiohttp
import numpy as np

from _report import free_port, report
from cliper_prod.serving.app import ServeSettings, start_service, stop_service


async def level(url: str, users: list[str], concurrency: int, requests: int, max_s: float,
                k: int) -> dict:
    """``concurrency`` clients in closed loop until ``requests`` are done or time is up."""
    latencies: list[float] = []
    errors = 0
    rng = random.Random(concurrency)
    deadline = time.perf_counter() + max_s

    async def client(session: aiohttp.ClientSession) -> None:
        nonlocal errors
        while len(latencies) + errors < requests and time.perf_counter() < deadline:
            body = json.dumps({"users": [rng.choice(users)], "k": k})
            t = time.perf_counter()
            async with session.post(url + "/topk", data=body,
                                    headers={"content-type": "application/json"}) as resp:
                await resp.read()
                if resp.status == 200:
                    latencies.append(time.perf_counter() - t)
                else:
                    errors += 1

    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:
        start = time.perf_counter()
        await asyncio.gather(*(client(session) for _ in range(concurrency)))
        wall = time.perf_counter() - start
    ms = np.array(latencies) * 1000
    return {"concurrency": concurrency, "requests": len(latencies), "errors": errors,
            "wall_s": wall, "rps": len(latencies) / wall,
            "p50_ms": float(np.percentile(ms, 50)), "p95_ms": float(np.percentile(ms, 95)),
            "p99_ms": float(np.percentile(ms, 99))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, required=True)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 64])
    parser.add_argument("--requests", type=int, default=2000, help="per level")
    parser.add_argument("--max-seconds", type=float, default=30.0, help="per level")
    parser.add_argument("--k", type=int, default=20)
    parser.add_argument("--max-batch-size", type=int, default=64)
    parser.add_argument("--batch-wait-ms", type=float, default=2.0)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/serve_load_cpu"))
    args = parser.parse_args()

    users = (args.bundle / "user_ids.txt").read_text().split()
    rows = []
    port = free_port()
    for batching in (False, True):
        settings = ServeSettings(str(args.bundle.resolve()), device="cpu", batching=batching,
                                 max_batch_size=args.max_batch_size,
                                 batch_wait_timeout_s=args.batch_wait_ms / 1000)
        url = start_service(settings, port=port)
        asyncio.run(level(url, users, 4, 200, 10, args.k))  # warm-up
        for c in args.concurrency:
            row = asyncio.run(level(url, users, c, args.requests, args.max_seconds, args.k))
            rows.append({"batching": batching, **row})
            print(rows[-1], flush=True)
    stop_service()

    import onnxruntime
    import ray

    lines = ["| dynamic batching | concurrency | requests | req/s | p50 ms | p95 ms | p99 ms |"
             " errors |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {'on' if r['batching'] else 'off'} | {r['concurrency']} | "
                     f"{r['requests']} | {r['rps']:.0f} | {r['p50_ms']:.1f} | "
                     f"{r['p95_ms']:.1f} | {r['p99_ms']:.1f} | {r['errors']} |")
    by = {(r["batching"], r["concurrency"]): r["rps"] for r in rows}
    lines.append("")
    lines.append("req/s ratio batching on/off: " + ", ".join(
        f"c={c}: {by[(True, c)] / by[(False, c)]:.2f}x" for c in args.concurrency))
    result = {"machine": f"{platform.processor() or platform.machine()}, "
                         f"{__import__('os').cpu_count()} cores (loopback, CPU)",
              "bundle": str(args.bundle), "k": args.k, "max_batch_size": args.max_batch_size,
              "batch_wait_ms": args.batch_wait_ms, "ray": ray.__version__,
              "onnxruntime": onnxruntime.__version__, "python": platform.python_version(),
              "rows": rows}
    report(args.out, result, "\n".join(lines))


if __name__ == "__main__":
    main()
