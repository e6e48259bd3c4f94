"""Load test of `cliper-prod serve` /topk on loopback, both engines side by side in one run:
``--engine local`` (uvicorn workers, no Ray) and ``--engine ray`` (Ray Serve's proxy and a
replica), with and without dynamic batching, at several concurrencies.

Each engine is started by the real command line (`cliper-prod serve --engine ...`, a child
process) on the same bundle with the same options, and stopped with SIGTERM before the next.
Each request asks for one random user's top-k (the online pattern). The clients are closed
loops on keep-alive connections in this process, writing pre-built HTTP/1.1 requests and reading
the answers by their Content-Length (no HTTP library: a few tens of microseconds of CPU a
request, reported per level, so the load generator is not what is measured). Every level is
bounded by --requests and --max-seconds.

    python benchmarks/load_serve.py --bundle /tmp/bundle-baby --requests 3000 --max-seconds 20
    python benchmarks/load_serve.py --bundle /tmp/bundle-baby --smoke   # a short check
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import re
import signal
import subprocess
import sys
import time
import urllib.request
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import numpy as np

from _report import cpu_model, free_port, report

CLI = [sys.executable, "-m", "cliper_prod", "serve"]  # also where no console script is installed
CONTENT_LENGTH = re.compile(rb"\r\ncontent-length: *(\d+)", re.IGNORECASE)


def start(engine: str, device: str, args: argparse.Namespace, batching: bool, port: int,
          log: Path) -> tuple[subprocess.Popen, float]:
    """`cliper-prod serve --engine ENGINE --device DEVICE` on ``port``, once /healthz answers;
    its start-up seconds."""
    cmd = [*CLI, "--engine", engine, "--bundle", str(args.bundle), "--port", str(port),
           "--device", device, "--max-batch-size", str(args.max_batch_size),
           *([] if args.batch_wait_ms is None else ["--batch-wait-ms", str(args.batch_wait_ms)]),
           *([] if batching else ["--no-batching"]),
           *(["--workers", str(args.workers)] if engine == "local" else
             ["--replicas", str(args.replicas)])]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # a Ray of its own
    begin = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log.open("ab"), env=env)
    deadline = begin + 300
    while time.perf_counter() < deadline and proc.poll() is None:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=10):
                return proc, time.perf_counter() - begin
        except OSError:
            time.sleep(0.5)
    stop(proc)
    raise SystemExit(f"{engine} engine did not start; see {log}")


def stop(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=120)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def requests_for(users: list[str], n: int, k: int, port: int, seed: int) -> list[bytes]:
    """``n`` whole HTTP requests, each for one random user."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        body = json.dumps({"users": [rng.choice(users)], "k": k}).encode()
        out.append(b"POST /topk HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nContent-Type: "
                   b"application/json\r\nContent-Length: %d\r\n\r\n%s" % (port, len(body), body))
    return out


async def level(port: int, requests: list[bytes], concurrency: int, max_s: float) -> dict:
    """``concurrency`` closed-loop clients until every request is sent or time is up."""
    latencies: list[float] = []
    errors = 0
    issued = 0
    deadline = time.perf_counter() + max_s

    async def client() -> None:
        nonlocal errors, issued
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        while issued < len(requests) and time.perf_counter() < deadline:
            raw, issued = requests[issued], issued + 1
            t = time.perf_counter()
            writer.write(raw)
            try:
                head = await reader.readuntil(b"\r\n\r\n")
                length = CONTENT_LENGTH.search(head)
                if length is None:
                    raise SystemExit(f"an answer without Content-Length: {head[:300]!r}")
                await reader.readexactly(int(length.group(1)))
            except (ConnectionError, asyncio.IncompleteReadError):
                errors += 1
                writer.close()
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                continue
            if head.startswith(b"HTTP/1.1 200 "):
                latencies.append(time.perf_counter() - t)
            else:
                errors += 1
        writer.close()

    cpu, start_t = time.process_time(), time.perf_counter()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    wall, cpu = time.perf_counter() - start_t, time.process_time() - cpu
    ms = np.array(latencies) * 1000
    done = len(latencies) + errors
    return {"concurrency": concurrency, "requests": len(latencies), "errors": errors,
            "wall_s": wall, "rps": len(latencies) / wall,
            "p50_ms": float(np.percentile(ms, 50)), "p95_ms": float(np.percentile(ms, 95)),
            "p99_ms": float(np.percentile(ms, 99)),
            "client_cpu_us_per_request": 1e6 * cpu / max(done, 1)}


def run_levels(port: int, users: list[str], args: argparse.Namespace) -> list[dict]:
    """A warm-up, then each concurrency on fresh connections."""
    async def levels() -> list[dict]:
        await level(port, requests_for(users, 200, args.k, port, 0), 4, 10)
        out = []
        for c in args.concurrency:
            out.append(await level(port, requests_for(users, args.requests, args.k, port, c),
                                   c, args.max_seconds))
        return out
    try:
        import uvloop
    except ImportError:
        return asyncio.run(levels())
    return uvloop.run(levels())


def machine(devices: list[str]) -> str:
    cpu = cpu_model()
    with open("/proc/meminfo") as fh:
        mem_gib = int(fh.readline().split()[1]) / 2**20
    gpu = ""
    if "cuda" in devices:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version",
                              "--format=csv,noheader"], capture_output=True, text=True)
        gpu = f", GPU {smi.stdout.strip()}"
    return (f"{cpu}, {os.cpu_count()} cores, {mem_gib:.0f} GiB{gpu}; load average "
            f"{os.getloadavg()[0]:.2f} at the start (loopback)")


def server_name(engine: str, device: str, devices: list[str]) -> str:
    """How a row names its server: the engine, with the device when several are compared."""
    return engine if devices == ["cpu"] else f"{engine} {device}"


def table(rows: list[dict], servers: list[str]) -> str:
    """One line per (batching, clients): each server's figures side by side, and the ratio of
    the first's req/s to the second's when there are two."""
    both = len(servers) == 2
    head = ["batching", "clients"] + [f"{e} {m}" for e in servers
                                      for m in ("req/s", "p50 / p95 / p99 ms", "errors")]
    ratio_head = [f"{servers[0]} / {servers[1]} req/s"] if both else []
    lines = ["| " + " | ".join(head + ratio_head) + " |",
             "|" + "---|" * 2 + "---:|" * (len(head) - 2 + both)]
    by = {(r["server"], r["batching"], r["concurrency"]): r for r in rows}
    for batching, c in dict.fromkeys((r["batching"], r["concurrency"]) for r in rows):
        cells = ["on" if batching else "off", str(c)]
        for e in servers:
            r = by[(e, batching, c)]
            cells += [f"{r['rps']:.0f}", f"{r['p50_ms']:.2f} / {r['p95_ms']:.2f} / "
                                         f"{r['p99_ms']:.2f}", str(r["errors"])]
        if both:
            ratio = by[(servers[0], batching, c)]["rps"] / by[(servers[1], batching, c)]["rps"]
            cells.append(f"{ratio:.1f}x")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def package_version(name: str) -> str | None:
    try:
        return version(name)
    except PackageNotFoundError:  # a checkout on PYTHONPATH, not installed
        return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, required=True)
    parser.add_argument("--engines", nargs="+", choices=["local", "ray"], default=["local", "ray"])
    parser.add_argument("--devices", nargs="+", choices=["cpu", "cuda"], default=["cpu"],
                        help="ONNX Runtime device of each engine (cuda: onnxruntime-gpu)")
    parser.add_argument("--batching", nargs="+", choices=["on", "off"], default=["on", "off"])
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 64])
    parser.add_argument("--requests", type=int, default=3000, help="per level")
    parser.add_argument("--max-seconds", type=float, default=20.0, help="per level")
    parser.add_argument("--k", type=int, default=20)
    parser.add_argument("--max-batch-size", type=int, default=64)
    parser.add_argument("--batch-wait-ms", type=float,
                        help="for both engines [default: each engine's own, 0 local, 2 ray]")
    parser.add_argument("--workers", type=int, default=1, help="of the local engine")
    parser.add_argument("--replicas", type=int, default=1, help="of the Ray engine")
    parser.add_argument("--smoke", action="store_true",
                        help="a short check: 200 requests a level, batching on, 10 s at most")
    parser.add_argument("--out", type=Path, help="[default: benchmarks/results/serve_engines_cpu, "
                                                 "with --smoke /tmp/serve_engines_smoke]")
    args = parser.parse_args()
    if args.smoke:
        args.requests, args.max_seconds, args.batching = 200, 10.0, ["on"]
    args.out = args.out or Path("/tmp/serve_engines_smoke" if args.smoke
                                else "benchmarks/results/serve_engines_cpu")
    args.bundle = args.bundle.resolve()
    args.engines = sorted(set(args.engines))
    log = args.out.with_suffix(".log")
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_text("")

    users = (args.bundle / "user_ids.txt").read_text().split()
    rows, started, servers = [], {}, []
    at_start = machine(args.devices)
    for engine in args.engines:
        for device in args.devices:
            name = server_name(engine, device, args.devices)
            servers.append(name)
            for batching in (b == "on" for b in args.batching):
                port = free_port()
                proc, started[f"{name}, batching {'on' if batching else 'off'}"] = \
                    start(engine, device, args, batching, port, log)
                try:
                    for row in run_levels(port, users, args):
                        rows.append({"server": name, "engine": engine, "device": device,
                                     "batching": batching, **row})
                        print(rows[-1], flush=True)
                finally:
                    stop(proc)

    text = table(rows, servers)
    text += "\n\nstart-up to a healthy /healthz: " + ", ".join(
        f"{name} {s:.1f} s" for name, s in started.items())
    result = {"machine": at_start, "bundle": str(args.bundle), "k": args.k,
              "max_batch_size": args.max_batch_size, "batch_wait_ms": args.batch_wait_ms,
              "workers": args.workers, "replicas": args.replicas,
              "requests_per_level": args.requests, "max_seconds_per_level": args.max_seconds,
              "versions": {p: package_version(p) for p in (
                  "cliper-prod", "onnxruntime", "onnxruntime-gpu", "fastapi", "uvicorn", "uvloop",
                  "httptools", "orjson", *(["ray"] if "ray" in args.engines else []))},
              "python": platform.python_version(), "startup_s": started, "rows": rows}
    report(args.out, result, text)


if __name__ == "__main__":
    main()
