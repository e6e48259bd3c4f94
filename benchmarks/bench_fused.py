"""Fused vs plain ONNX graphs vs PyTorch eager: the CLIP image tower, side by side in one run.

    python benchmarks/bench_fused.py [--clip DIR] [--batches 1 8 32] [--fp16-batches 1 8]

Exports the CLIP graphs as `cliper-prod export` does (plain and ONNX Runtime-optimized, fp32
and fp16), prints the fused op counts of both graphs and the export's parity and CPU
preference, then times the image tower per batch: PyTorch eager fp32 (transformers' default
SDPA attention), ONNX plain and fused fp32, and fp16 for ``--fp16-batches`` (fp16 on a CPU is
slow; it is timed to show by how much). Images/s, median of --repeats after a warm-up, and the
ratio to ONNX plain of the same precision; worst-row cosine of each ONNX output vs PyTorch at
that batch. Then the text + SA graph at ``--text-batches`` (items of 5 views each), fp32: PyTorch
eager, ONNX plain, fused (attention causal, no bias) and ``fused.masked`` (the same graph with
the causal + padding mask as the attention's bias, as export wrote it before), items/s and the
worst view-embedding cosine against PyTorch. Default model: a CLIP ViT-B/16 config with random
weights (speed does not depend on weights).
"""

from __future__ import annotations

import argparse
import platform
import tempfile
from pathlib import Path

import numpy as np
import onnxruntime
import torch
from bench_embed import (feature_bundle, masked_fused_text, timed, tower_inputs,
                         vit_b16_folder)

from _report import report

from cliper_prod import __version__
from cliper_prod.bundle_format import FUSED, IMAGE_GRAPH, PLAIN, TEXT_GRAPH
from cliper_prod.export.graphs import parity
from cliper_prod.features.clip_towers import ClipTowers
from cliper_prod.features.fusion import ViewFusion
from cliper_prod.runtime.bundle_reader import Bundle
from cliper_prod.runtime.sessions import Graph


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clip", help="CLIP config folder [default: ViT-B/16 config]")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--fp16-batches", type=int, nargs="*", default=[1, 8])
    parser.add_argument("--text-batches", type=int, nargs="*", default=[8])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/fused_cpu"))
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        folder = Path(args.clip) if args.clip else vit_b16_folder(tmp / "clip")
        towers = ClipTowers(folder, random_init=True)
        export_s = feature_bundle(folder, tmp / "bundle")
        bundle = Bundle(tmp / "bundle", provider="cpu")
        graphs = bundle.manifest["graphs"]  # each graph's files, parity and fused record
        sessions = {(v, p): bundle.graph(IMAGE_GRAPH, p, v)
                    for v in (PLAIN, FUSED) for p in ("fp32", "fp16")}
        size = towers.preprocess.crop
        rows = []
        for batch in args.batches:
            pixels = np.random.default_rng(batch).standard_normal(
                (batch, 3, size, size)).astype(np.float32)
            reference = [towers.encode_images(pixels)]
            row = {"batch": batch, "pytorch_fp32": batch / timed(
                lambda: towers.encode_images(pixels), args.repeats)}
            for (variant, precision), graph in sessions.items():
                if precision == "fp16" and batch not in args.fp16_batches:
                    continue
                name = f"onnx_{variant}_{precision}"
                row[name] = batch / timed(lambda: graph(pixel_values=pixels), args.repeats)
                row[f"{name}_cosine"] = parity(reference, graph(pixel_values=pixels))[
                    "min_cosine"]
            rows.append(row)
            print(row, flush=True)
        text_rows = text_forms(folder, tmp / "bundle", bundle, args.text_batches, args.repeats)

    result = {"machine": f"{platform.machine()} {platform.processor()}, "
                         f"{torch.get_num_threads()} torch threads, CPU",
              "torch": torch.__version__, "onnxruntime": onnxruntime.__version__,
              "cliper_prod": __version__,
              "model": f"{args.clip or 'CLIP ViT-B/16 config'}, random weights",
              "export_s": export_s, "rows": rows, "text_rows": text_rows,
              "graphs": {name: {k: graphs[name][k] for k in ("parity", FUSED)}
                         for name in (IMAGE_GRAPH, TEXT_GRAPH)}}
    report(args.out, result, table(rows, graphs) + "\n\n" + text_table(text_rows))


def text_forms(clip: Path, bundle_dir: Path, bundle: Bundle, batches: list[int], repeats: int
               ) -> list[dict]:
    """Items/s of the text + SA graph per form, and each form's worst view cosine vs PyTorch."""
    towers = ClipTowers(clip, random_init=True)
    module = towers.view_encoder(ViewFusion("sa", 0.1))
    masked = masked_fused_text(clip, bundle_dir)["fused.masked.fp32"]
    graphs = {"onnx_plain": bundle.graph(TEXT_GRAPH, "fp32", PLAIN),
              "onnx_fused": bundle.graph(TEXT_GRAPH, "fp32", FUSED),
              "onnx_fused_masked": Graph(bundle_dir / masked, bundle.providers, bundle.threads)}
    rows = []
    for batch in batches:
        inputs = tower_inputs(towers, batch, encode=False)  # the text graph's inputs alone
        feeds = {k: inputs[k] for k in graphs["onnx_plain"].input_names}
        args = tuple(torch.from_numpy(v) for v in feeds.values())
        with torch.no_grad():
            reference = [module(*args)[3].numpy().reshape(-1, towers.dim)]
        row = {"batch": batch, "pytorch_fp32": batch / timed(lambda: module(*args), repeats)}
        for name, graph in graphs.items():
            row[name] = batch / timed(lambda: graph(**feeds), repeats)
            row[f"{name}_cosine"] = parity(reference, [graph(**feeds)[3].reshape(
                -1, towers.dim)])["min_cosine"]
        rows.append(row)
        print(row, flush=True)
    return rows


def text_table(rows: list[dict]) -> str:
    cols = ["pytorch_fp32", "onnx_plain", "onnx_fused", "onnx_fused_masked"]
    lines = ["| text batch (items x 5 views) | " + " | ".join(cols) + " | fused / fused_masked "
             "| 1 - worst view cosine (plain, fused, fused_masked) |", "| --- " * 7 + "|"]
    for r in rows:
        lines.append(f"| {r['batch']} | " + " | ".join(f"{r[c]:.2f}" for c in cols)
                     + f" | {r['onnx_fused'] / r['onnx_fused_masked']:.2f} | " + ", ".join(
                         f"{1 - r[f'{c}_cosine']:.1e}" for c in cols[1:]) + " |")
    lines.append("\nItems/s, fp32, the text + SA graph (5 views per item).")
    return "\n".join(lines)


def table(rows: list[dict], graphs: dict) -> str:
    cols = ["pytorch_fp32", "onnx_plain_fp32", "onnx_fused_fp32", "onnx_plain_fp16",
            "onnx_fused_fp16"]
    lines = ["| batch | " + " | ".join(cols) + " | fused / plain fp32 | fused / plain fp16 | "
             "PyTorch / plain fp32 |", "| --- " * (len(cols) + 4) + "|"]
    for r in rows:
        cells = [f"{r[c]:.1f}" if c in r else "-" for c in cols]
        ratios = [f"{r[a] / r[b]:.2f}" if a in r else "-" for a, b in (
            ("onnx_fused_fp32", "onnx_plain_fp32"), ("onnx_fused_fp16", "onnx_plain_fp16"),
            ("pytorch_fp32", "onnx_plain_fp32"))]
        lines.append(f"| {r['batch']} | " + " | ".join(cells + ratios) + " |")
    lines.append("\nImages/s. 1 - worst-row cosine vs PyTorch at each batch: " + "; ".join(
        f"batch {r['batch']}: " + ", ".join(f"{k[5:-7]} {1 - v:.1e}" for k, v in r.items()
                                            if k.endswith("_cosine")) for r in rows) + ".")
    for name, record in graphs.items():
        fused = record[FUSED]
        lines.append(f"\n{name}: {fused['layers']} layers, fused ops {fused['ops']}; export "
                     f"parity (1 - cosine) " + ", ".join(f"{k} {1 - v['min_cosine']:.1e}"
                                                         for k, v in record["parity"].items())
                     + f"; export-time CPU latency (ms, verification batch) "
                     f"{fused['latency_ms']['CPUExecutionProvider']} -> preferred "
                     f"{fused['preferred']['CPUExecutionProvider']}.")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
