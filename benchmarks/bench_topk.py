"""Top-K latency: the ONNX graph vs PyTorch, full score matrix vs chunked, in one run.

    python benchmarks/bench_topk.py --bundle runs/export/freedom [--batches 1 64 1024] [--ks 20 50]
    python benchmarks/bench_topk.py --items 10000 100000 1000000 --dim 64
    python benchmarks/bench_topk.py --items 1000000 --ks 50 --no-pytorch --format1 --runtime

Every path scores a batch of users against every item, excludes each user's training items
and keeps the K best (:class:`cliper_prod.scoring.TopKScorer`): ``full`` materialises the
[B, N] score matrix (chunk = N), ``chunked`` scores --chunk-items at a time with a running
top-K; each in PyTorch eager (unless --no-pytorch) and as the exported ONNX graph
(``onnx_chunked`` is the bundle's CPU form). ``onnx_gpu_form`` is the bundle's GPU form
(:class:`cliper_prod.scoring.CandidateTopKScorer`: fp16 candidates, --candidates of them
chosen in --candidate-blocks blocks, re-scored in fp32) on the same provider; its recall@K
against the first path is reported. With --format1, ``onnx_format1`` is the format-1 graph
(user table and training CSR inside the graph, the chunk loop unrolled), rebuilt from this
repository's history (``git show FORMAT1:cliper_prod/scoring.py``), at --chunk-items. With
--runtime, ``runtime_auto`` ranks through a bundle written by ``export_tables`` and the
runtime's per-batch choice of form (:class:`cliper_prod.runtime.topk_forms.TopKGraph`; the
form it ran is in the row).

Tables come from a bundle, or are random (``--items``: standard normal, 20 training items per
user, --users users). With --faiss, faiss-cpu's exact IndexFlatIP runs beside them as an
outside baseline. Each row times --repeats batches of random users after a warm-up and reports
p50/p95/p99 latency and users/s; the items of every path are compared with the first path's on
every batch (positions that differ must hold equal scores: near-ties). A full-matrix path
whose matrices would exceed --max-matrix-gib is skipped, and the table says so (12 bytes per
score: the full graph's scores, padded copy and scatter in fp32; the GPU form on the CPU
provider's fp32 product, fp16 copy, excluded copy and fp32 cast for TopK).
"""

from __future__ import annotations

import argparse
import platform
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

import numpy as np
import onnxruntime
import torch

from _report import report

from cliper_prod import __version__
from cliper_prod.export.bundle_writer import (TOPK_INPUTS, EmbeddingTables, GraphOptions,
                                              export_tables, topk_spec)
from cliper_prod.export.graphs import GraphSpec, export_onnx
from cliper_prod.runtime.bundle_reader import Bundle
from cliper_prod.runtime.providers import choose_providers
from cliper_prod.runtime.sessions import Graph
from cliper_prod.runtime.topk_forms import TopKGraph
from cliper_prod.histories import history_pairs, training_csr
from cliper_prod.scoring import CandidateTopKScorer, TopKScorer, default_candidates

#: The last commit whose top-K graph was format 1 (format 2 came with f7ed81e).
FORMAT1 = "f7ed81e^"
#: Bytes per score a full-matrix path holds at once: scores, padded copy, scatter (fp32); the
#: GPU form on the CPU provider: fp32 product, fp16 copy, excluded copy, fp32 cast for TopK.
MATRIX_BYTES = {"full": 12, "gpu_form": 12}


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


def format1_graph(users: torch.Tensor, items: torch.Tensor, indptr: np.ndarray,
                  indices: np.ndarray, k: int, chunk: int, path: Path, providers: list[str]
                  ) -> Graph:
    """The format-1 top-K graph (users [B] in; tables and CSR inside; chunks unrolled), its
    module loaded from this repository's history rather than copied, exported as format 1's
    benchmark exported it."""
    source = subprocess.run(["git", "show", f"{FORMAT1}:cliper_prod/scoring.py"], check=True,
                            capture_output=True, text=True,
                            cwd=Path(__file__).resolve().parent).stdout
    module = types.ModuleType("format1_scoring")
    sys.modules[module.__name__] = module
    exec(compile(source, f"{FORMAT1}:cliper_prod/scoring.py", "exec"), module.__dict__)
    scorer = module.TopKScorer(users, items, indptr, indices, k, chunk).eval()
    export_onnx(GraphSpec("topk", scorer, (torch.arange(2),), (torch.arange(2),), ["users"],
                          ["items", "scores"]), path)
    return Graph(path, providers)


def recall(reference: np.ndarray, got: np.ndarray) -> float:
    """Share of the reference's real items (not -1) that ``got`` holds in the same row."""
    found = [np.isin(ref[ref >= 0], row).sum() for ref, row in zip(reference, got)]
    return float(np.sum(found) / max(1, (reference >= 0).sum()))


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
            for name, chunk in (("chunked", args.chunk_items), ("full", n_items)):
                if name == "chunked" and chunk >= n_items:
                    continue
                scorer = TopKScorer(items, k, chunk).eval()
                export_onnx(topk_spec(scorer), Path(tmp) / f"{name}{k}.onnx")
                if not args.no_pytorch:
                    paths[f"pytorch_{name}"] = scorer
                paths[f"onnx_{name}"] = Graph(Path(tmp) / f"{name}{k}.onnx", providers)
            candidates = args.candidates or default_candidates(k)
            export_onnx(topk_spec(CandidateTopKScorer(items, k, candidates,
                                                      args.candidate_blocks).eval()),
                        Path(tmp) / f"gpu{k}.onnx")
            paths["onnx_gpu_form"] = Graph(Path(tmp) / f"gpu{k}.onnx", providers)
            if args.format1:
                paths["onnx_format1"] = format1_graph(users, items, indptr, indices, k,
                                                      args.chunk_items,
                                                      Path(tmp) / f"format1_{k}.onnx", providers)
            if args.runtime:
                train = np.stack([np.repeat(np.arange(n_users), np.diff(indptr)), indices], 1)
                export_tables(EmbeddingTables(users, items, train), Path(tmp) / f"bundle{k}",
                              options=GraphOptions(max_k=k, chunk_items=args.chunk_items,
                                                   torchscript=False, fp16=False,
                                                   candidates=args.candidates,
                                                   candidate_blocks=args.candidate_blocks))
                paths["runtime_auto"] = TopKGraph(Bundle(Path(tmp) / f"bundle{k}", "cpu"))
            if args.faiss:
                paths["faiss_flat_ip"] = FaissFlat(users, items, indptr, indices, k)
            for batch in args.batches:
                batch = min(batch, n_users)
                runnable = {n: p for n, p in paths.items() if all(
                    kind not in n or batch * n_items * size / 2**30 <= args.max_matrix_gib
                    for kind, size in MATRIX_BYTES.items())}
                samples = [rng.choice(n_users, size=batch, replace=False)
                           for _ in range(args.repeats + 1)]
                times = {n: [] for n in runnable}
                differing = beyond_ties = 0
                found = {n: [] for n in runnable}
                for i, query in enumerate(samples):
                    first = None
                    for name, path in runnable.items():
                        start = time.perf_counter()  # the runtime's work: gather, pairs, rank
                        if name.startswith("faiss"):
                            got_items, got_top = path(query)
                        elif name == "onnx_format1":
                            got_items, got_top = path(users=query.astype(np.int64))
                        else:
                            feeds = (users_np[query], *history_pairs(indptr, indices, query))
                            if name.startswith(("onnx", "runtime")):
                                got_items, got_top = path(**dict(zip(TOPK_INPUTS, feeds)))
                            else:
                                with torch.no_grad():
                                    got_items, got_top = (t.numpy() for t in path(
                                        *(torch.from_numpy(a) for a in feeds)))
                        if i:
                            times[name].append(time.perf_counter() - start)
                        if first is None:
                            first = (got_items, got_top)
                        found[name].append(recall(first[0], got_items))
                        if name != next(iter(runnable)):
                            differ = got_items != first[0]
                            differing += int(differ.sum())
                            beyond_ties += int((~np.isclose(got_top[differ], first[1][differ],
                                                            rtol=1e-5, atol=1e-5)).sum())
                row = {"catalog": source, "n_items": n_items, "k": k, "batch": batch,
                       "reference": next(iter(runnable)),
                       "recall_vs_reference": {n: min(r) for n, r in found.items()},
                       "positions_differing": differing,
                       "positions_differing_beyond_ties": beyond_ties,
                       "skipped": sorted(set(paths) - set(runnable))}
                row.update({n: percentiles(ts, batch) for n, ts in times.items()})
                if "runtime_auto" in paths:
                    row["runtime_form"] = paths["runtime_auto"].pick(batch)
                rows.append(row)
                print(row, flush=True)
    return rows


def table(rows: list[dict]) -> list[str]:
    names = ["pytorch_full", "onnx_full", "pytorch_chunked", "onnx_chunked", "onnx_gpu_form",
             "onnx_format1", "runtime_auto", "faiss_flat_ip"]
    names = [n for n in names if any(n in r or n in r["skipped"] for r in rows)]
    extra = [("gpu form recall", lambda r: f"{r['recall_vs_reference']['onnx_gpu_form']:.4f}"
              if "onnx_gpu_form" in r["recall_vs_reference"] else "-")]
    if any("runtime_form" in r for r in rows):
        extra.append(("runtime form", lambda r: r.get("runtime_form", "-")))
    lines = ["| items | K | batch | " + " | ".join(f"{n} p50 / p95 / p99 (ms)" for n in names)
             + " | best users/s | " + " | ".join(e[0] for e in extra) + " |",
             "| --- " * (len(names) + 4 + len(extra)) + "|"]
    for r in rows:
        cells = [f"{r[n]['p50_ms']:.2f} / {r[n]['p95_ms']:.2f} / {r[n]['p99_ms']:.2f}"
                 if n in r else ("skipped (memory)" if n in r["skipped"] else "-")
                 for n in names]
        best = max(r[n]["users_per_s"] for n in names if n in r)
        lines.append(f"| {r['n_items']:,} | {r['k']} | {r['batch']} | " + " | ".join(cells)
                     + f" | {best:,.0f} | " + " | ".join(e[1](r) for e in extra) + " |")
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
    parser.add_argument("--candidates", type=int,
                        help="the GPU form's candidates [default: max(4 K, 2048)]")
    parser.add_argument("--candidate-blocks", type=int, default=1,
                        help="blocks the GPU form picks its candidates in (two levels if > 1)")
    parser.add_argument("--no-pytorch", action="store_true", help="ONNX paths only")
    parser.add_argument("--format1", action="store_true",
                        help=f"add the format-1 graph, rebuilt from git ({FORMAT1})")
    parser.add_argument("--runtime", action="store_true",
                        help="add the runtime's per-batch choice over an exported bundle")
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
