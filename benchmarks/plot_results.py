"""Plots from recorded benchmark JSON: embed throughput vs batch size, top-K latency vs catalog.

    python benchmarks/plot_results.py [--results benchmarks/results]

Reads ``embed_*.json`` and ``topk_*catalogs*.json`` as the benchmark scripts wrote them and
writes ``embed_throughput.png`` and ``topk_latency.png`` beside them. Nothing is re-measured.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

PATHS = ("pytorch_fp32", "onnx_fp32", "onnx_fp16")
TOPK_PATHS = ("pytorch_full", "onnx_full", "pytorch_chunked", "onnx_chunked")


def _save(fig, axes, title: str, out: Path) -> Path:
    axes[0].legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    return out


def plot_embed(results: Path) -> Path:
    rows = sorted((r for f in results.glob("embed_*.json")
                   for r in json.loads(f.read_text())["rows"]), key=lambda r: r["batch"])
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, tower in zip(axes, ("image", "text")):
        for path in PATHS:
            ax.plot([r["batch"] for r in rows], [r[f"{tower}_{path}"] for r in rows], "o-",
                    label=path)
        ax.set(xscale="log", xlabel="batch size", title=f"{tower} tower (ViT-B/16 config)")
    axes[0].set_ylabel("items / s")
    return _save(fig, axes, "embed throughput, 2-core CPU", results / "embed_throughput.png")


def plot_topk(results: Path) -> Path:
    rows = [r for f in results.glob("topk_*catalogs*.json")
            for r in json.loads(f.read_text())["rows"] if r["k"] == 50]
    batches = sorted({r["batch"] for r in rows})
    fig, axes = plt.subplots(1, len(batches), figsize=(4 * len(batches), 4))
    for ax, batch in zip(axes, batches):
        sel = sorted((r for r in rows if r["batch"] == batch), key=lambda r: r["n_items"])
        for path in TOPK_PATHS:
            pts = [(r["n_items"], r[path]["p50_ms"]) for r in sel if path in r]
            if pts:
                ax.plot(*zip(*pts), "o-", label=path)
        ax.set(xscale="log", yscale="log", xlabel="items in catalog", ylabel="p50 latency (ms)",
               title=f"K=50, batch {batch}")
    return _save(fig, axes, "top-K latency, 2-core CPU (missing points: full matrix over 4 GiB)",
                 results / "topk_latency.png")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()
    for out in (plot_embed(args.results), plot_topk(args.results)):
        print(out)


if __name__ == "__main__":
    main()
