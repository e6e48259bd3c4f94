"""Top-K latency: the ONNX graph vs PyTorch, full score matrix vs chunked, in one run.

    python benchmarks/bench_topk.py --bundle runs/export/freedom [--batches 1 64 1024] [--ks 20 50]
    python benchmarks/bench_topk.py --items 10000 100000 1000000 --dim 64

Every path scores a batch of users against every item, excludes each user's training items
and keeps the K best (:class:`cliper_prod.scoring.TopKScorer`): ``full`` materialises the
[B, N] score matrix (chunk = N), ``chunked`` scores --chunk-items at a time with a running
top-K; each in PyTorch eager and as the exported ONNX graph. Tables come from a bundle, or are
random (``--items``: standard normal, 20 training items per user, --users users). With
--faiss, faiss-cpu's exact IndexFlatIP runs beside them as an outside baseline. Each row times
--repeats batches of random users after a warm-up and reports p50/p95/p99 latency and users/s;
the items of every path are compared with the first path's on every batch (positions that
differ must hold equal scores: near-ties). A full-matrix path whose [B, N] float32 matrices
would exceed --max-matrix-gib is skipped, and the table says so.
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
from cliper_prod.export.bundle_writer import TOPK_INPUTS, topk_spec
from cliper_prod.export.graphs import export_onnx
from cliper_prod.runtime.providers import choose_providers
from cliper_prod.runtime.sessions import Graph
from cliper_prod.histories import history_pairs, training_csr
from cliper_prod.scoring import TopKScorer


def percentiles(times: list[float], batch: int) -> dict[str, float]:
    ms = np.asarray(times) * 1e3
    return {"p50_ms": float(np.percentile(ms, 50)), "p95_ms": float(np.percentile(ms, 95)),
            "p99_ms": float(np.percentile(ms, 99)), "users_per_s": batch / float(np.median(ms)) * 1e3}


class FaissFlat:
    """faiss-cpu exact inner-product search (IndexFlatIP) as an outside baseline. faiss knows
    nothing of training items, so it fetches K + the longest history and drops the user's own
    items afterwards, which gives the same exact top K."""

    def __init__(self, users: torch.Tensor, items: torch.Tensor, indptr: np.ndarray,
                 indices: np.ndarray, k: int) -> None:
        import faiss

        self.index = faiss.IndexFlatIP(items.shape[1])
        self.index.add(np.ascontiguousarray(items.numpy(), dtype=np.float32))
        self.users = users.numpy()
        self.indptr, self.indices, self.k = indptr, indices, k
        self.widest = int(np.diff(indptr).max(initial=0))

    def __call__(self, users: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        scores, ids = self.index.search(self.users[users], self.k + self.widest)
        for row, u in enumerate(users):
            seen = self.indices[self.indptr[u]:self.indptr[u + 1]]
            scores[row, np.isin(ids[row], seen)] = -np.inf
        order = np.argsort(-scores, axis=1, kind="stable")[:, :self.k]
        return np.take_along_axis(ids, order, 1), np.take_along_axis(scores, order, 1)


def tables_from_bundle(bundle: Path):
    def table(name: str) -> np.ndarray:
        return np.load(bundle / f"{name}.npy")
    return (torch.from_numpy(table("user_embeddings")), torch.from_numpy(table("item_embeddings")),
            table("history_indptr"), table("history_items"), str(bundle))


def random_tables(n_users: int, n_items: int, dim: int, seen: int = 20):
    gen = torch.Generator().manual_seed(0)
    users = torch.randn(n_users, dim, generator=gen)
    items = torch.randn(n_items, dim, generator=gen)
    rng = np.random.default_rng(0)
    pairs = np.stack([np.repeat(np.arange(n_users), seen),
                      rng.integers(0, n_items, n_users * seen)], 1)
    pairs = np.unique(pairs, axis=0)
    indptr, indices = training_csr(pairs, n_users)
    return users, items, indptr, indices, f"random {n_users} x {n_items} x {dim}"


def bench_catalog(tables, args, providers, rng) -> list[dict]:
    users, items, indptr, indices, source = tables
    users_np = users.numpy()
    n_users, n_items = users.shape[0], items.shape[0]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for k in args.ks:
            paths = {}
            for name, chunk in (("full", n_items), ("chunked", args.chunk_items)):
                if name == "chunked" and chunk >= n_items:
                    continue
                scorer = TopKScorer(items, k, chunk).eval()
                export_onnx(topk_spec(scorer), Path(tmp) / f"{name}{k}.onnx")
                paths[f"pytorch_{name}"] = scorer
                paths[f"onnx_{name}"] = Graph(Path(tmp) / f"{name}{k}.onnx", providers)
            if args.faiss:
                paths["faiss_flat_ip"] = FaissFlat(users, items, indptr, indices, k)
            for batch in args.batches:
                batch = min(batch, n_users)
                matrix_gib = 3 * batch * n_items * 4 / 2**30  # scores, padded copy, scatter
                runnable = {n: p for n, p in paths.items()
                            if "full" not in n or matrix_gib <= args.max_matrix_gib}
                samples = [rng.choice(n_users, size=batch, replace=False)
                           for _ in range(args.repeats + 1)]
                times = {n: [] for n in runnable}
                differing = beyond_ties = 0
                for i, query in enumerate(samples):
                    first = None
                    for name, path in runnable.items():
                        start = time.perf_counter()  # the runtime's work: gather, pairs, rank
                        if name.startswith("faiss"):
                            got_items, got_top = path(query)
                        else:
                            feeds = (users_np[query], *history_pairs(indptr, indices, query))
                            if name.startswith("onnx"):
                                got_items, got_top = path(**dict(zip(TOPK_INPUTS, feeds)))
                            else:
                                with torch.no_grad():
                                    got_items, got_top = (t.numpy() for t in path(
                                        *(torch.from_numpy(a) for a in feeds)))
                        if i:
                            times[name].append(time.perf_counter() - start)
                        if first is None:
                            first = (got_items, got_top)
                        else:
                            differ = got_items != first[0]
                            differing += int(differ.sum())
                            beyond_ties += int((~np.isclose(got_top[differ], first[1][differ],
                                                            rtol=1e-5, atol=1e-5)).sum())
                row = {"catalog": source, "n_items": n_items, "k": k, "batch": batch,
                       "positions_differing": differing,
                       "positions_differing_beyond_ties": beyond_ties,
                       "skipped": sorted(set(paths) - set(runnable))}
                row.update({n: percentiles(ts, batch) for n, ts in times.items()})
                rows.append(row)
                print(row, flush=True)
    return rows


def table(rows: list[dict]) -> list[str]:
    names = ["pytorch_full", "onnx_full", "pytorch_chunked", "onnx_chunked"]
    names += ["faiss_flat_ip"] if any("faiss_flat_ip" in r for r in rows) else []
    lines = ["| items | K | batch | " + " | ".join(f"{n} p50 / p95 / p99 (ms)" for n in names)
             + " | best users/s |", "| --- " * (len(names) + 4) + "|"]
    for r in rows:
        cells = [f"{r[n]['p50_ms']:.2f} / {r[n]['p95_ms']:.2f} / {r[n]['p99_ms']:.2f}"
                 if n in r else ("skipped (memory)" if n in r["skipped"] else "-")
                 for n in names]
        best = max(r[n]["users_per_s"] for n in names if n in r)
        lines.append(f"| {r['n_items']:,} | {r['k']} | {r['batch']} | " + " | ".join(cells)
                     + f" | {best:,.0f} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", type=Path)
    parser.add_argument("--items", type=int, nargs="+", help="random catalogs of these sizes")
    parser.add_argument("--users", type=int, default=20_000)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 64, 1024])
    parser.add_argument("--ks", type=int, nargs="+", default=[20, 50])
    parser.add_argument("--chunk-items", type=int, default=1 << 16)
    parser.add_argument("--repeats", type=int, default=100)
    parser.add_argument("--max-matrix-gib", type=float, default=4.0)
    parser.add_argument("--faiss", action="store_true",
                        help="add faiss-cpu IndexFlatIP as a baseline (pip install faiss-cpu)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/topk_cpu"))
    args = parser.parse_args()
    if (args.bundle is None) == (args.items is None):
        parser.error("give --bundle or --items")
    providers = choose_providers("auto")
    rng = np.random.default_rng(0)
    catalogs = ([tables_from_bundle(args.bundle)] if args.bundle else
                [random_tables(args.users, n, args.dim) for n in args.items])
    rows = [row for tables in catalogs for row in bench_catalog(tables, args, providers, rng)]
    result = {"machine": f"{platform.machine()} {platform.processor()}, "
                         f"{torch.get_num_threads()} torch threads",
              "providers": providers, "torch": torch.__version__,
              "onnxruntime": onnxruntime.__version__, "cliper_prod": __version__,
              "chunk_items": args.chunk_items, "repeats": args.repeats, "rows": rows}
    lines = table(rows)
    lines.append(f"\n{catalogs[0][4] if args.bundle else 'random catalogs'}, fp32, "
                 f"{args.repeats} batches of random users per row, chunk {args.chunk_items} "
                 f"items; providers {providers}.")
    report(args.out, result, "\n".join(lines))


if __name__ == "__main__":
    main()
