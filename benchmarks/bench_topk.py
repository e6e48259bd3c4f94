"""Top-K latency, the bundle's ONNX graph vs the same scorer in PyTorch eager, in one run.

    python benchmarks/bench_topk.py --bundle export/freedom [--batches 1 64 1024] [--ks 20 50]

Both paths score a batch of users against every item, exclude each user's training items and
keep the K best (:class:`cliper_prod.scoring.TopKScorer`, exported per K from the bundle's
own tables and training items). Each configuration times --repeats batches of random users
after a warm-up and reports p50/p95/p99 latency and users/s; the two paths' items are
compared on every batch (positions where they differ must hold equal scores: near-ties).
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime
import torch

from _report import report

from cliper_prod import __version__
from cliper_prod.export.graphs import GraphSpec, export_onnx
from cliper_prod.runtime.sessions import Graph, choose_providers
from cliper_prod.scoring import TopKScorer


def percentiles(times: list[float]) -> dict[str, float]:
    ms = np.asarray(times) * 1e3
    return {"p50_ms": float(np.percentile(ms, 50)), "p95_ms": float(np.percentile(ms, 95)),
            "p99_ms": float(np.percentile(ms, 99))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", type=Path, required=True)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 64, 1024])
    parser.add_argument("--ks", type=int, nargs="+", default=[20, 50])
    parser.add_argument("--repeats", type=int, default=100)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/topk_cpu"))
    args = parser.parse_args()

    scripted = torch.jit.load(str(args.bundle / "topk.pt"))
    user_emb, item_emb_t = scripted.user_emb, scripted.item_emb_t
    indptr, indices = scripted.indptr.numpy(), scripted.indices.numpy()[:-1]
    n_users, n_items = user_emb.shape[0], item_emb_t.shape[1]
    providers = choose_providers("auto")
    rng = np.random.default_rng(0)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for k in args.ks:
            scorer = TopKScorer(user_emb, item_emb_t.t(), indptr, indices, k).eval()
            spec = GraphSpec("topk", scorer, (torch.arange(2),), (torch.arange(2),), ["users"],
                             ["items", "scores"])
            export_onnx(spec, Path(tmp) / f"topk{k}.onnx")
            graph = Graph(Path(tmp) / f"topk{k}.onnx", providers)
            for batch in args.batches:
                batches = [rng.choice(n_users, size=min(batch, n_users), replace=False)
                           for _ in range(args.repeats + 1)]
                times = {"onnx": [], "pytorch": []}
                mismatched, untied = 0, 0
                for i, users in enumerate(batches):
                    start = time.perf_counter()
                    items_ort, scores_ort = graph(users=users)
                    t_ort = time.perf_counter() - start
                    start = time.perf_counter()
                    with torch.no_grad():
                        items_pt, scores_pt = scorer(torch.from_numpy(users))
                    t_pt = time.perf_counter() - start
                    differ = items_pt.numpy() != items_ort
                    mismatched += int(differ.sum())  # near-ties swap places across backends
                    untied += int((~np.isclose(scores_pt.numpy()[differ], scores_ort[differ],
                                               rtol=1e-5, atol=1e-6)).sum())
                    if i:  # the first batch warms up
                        times["onnx"].append(t_ort)
                        times["pytorch"].append(t_pt)
                row = {"k": k, "batch": batch, "positions_differing": mismatched,
                       "positions_differing_beyond_ties": untied}
                for name, ts in times.items():
                    row[name] = {**percentiles(ts), "users_per_s": batch / float(np.median(ts))}
                rows.append(row)
                print(row, flush=True)
    result = {"machine": f"{platform.machine()} {platform.processor()}, "
                         f"{torch.get_num_threads()} torch threads",
              "providers": providers, "torch": torch.__version__,
              "onnxruntime": onnxruntime.__version__, "cliper_prod": __version__,
              "bundle": str(args.bundle), "n_users": n_users, "n_items": n_items,
              "dim": int(user_emb.shape[1]), "repeats": args.repeats, "rows": rows}
    lines = ["| K | batch | ONNX p50 / p95 / p99 (ms) | PyTorch p50 / p95 / p99 (ms) | "
             "ONNX users/s | PyTorch users/s | speed-up (p50) |", "| --- " * 7 + "|"]
    for r in rows:
        o, p = r["onnx"], r["pytorch"]
        lines.append(f"| {r['k']} | {r['batch']} | {o['p50_ms']:.2f} / {o['p95_ms']:.2f} / "
                     f"{o['p99_ms']:.2f} | {p['p50_ms']:.2f} / {p['p95_ms']:.2f} / "
                     f"{p['p99_ms']:.2f} | {o['users_per_s']:.0f} | {p['users_per_s']:.0f} | "
                     f"{p['p50_ms'] / o['p50_ms']:.2f}x |")
    lines.append(f"\n{n_users} users x {n_items} items x {result['dim']}-d, fp32, "
                 f"{args.repeats} batches of random users per row; providers {providers}.")
    report(args.out, result, "\n".join(lines))


if __name__ == "__main__":
    main()
