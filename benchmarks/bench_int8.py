"""int8 vs fp32 CLIP graphs on the CPU provider, side by side in one run.

    python benchmarks/bench_int8.py [--clip DIR] [--batches 1 8] [--repeats 5] [--threads N]

Exports the CLIP graphs as `cliper-prod export` does (plain and fused, fp32 and the dynamically
quantised int8 twins; no fp16, uint8 or TorchScript, which do not enter this comparison), then
times each graph per batch, the four variants interleaved in every round (so load on a shared
machine falls on all of them alike): wall and CPU time per batch, median of --repeats after a
warm-up, and each ratio to fp32 plain. Worst-row cosine of every output against the PyTorch fp32
module on the same batch (the image tower: its embedding; the text graph: all four outputs, as
the export checks them). Also prints the export's own int8 record (bound, parity, latency on
its verification batch) and the precision ``auto`` runs on the CPU. Default model: a CLIP
ViT-B/16 config with random weights (speed does not depend on weights).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime
import torch
from bench_embed import FIELDS, vit_b16_folder

from _report import report

from cliper_prod import __version__
from cliper_prod.bundle_format import IMAGE_GRAPH, INT8, TEXT_GRAPH
from cliper_prod.export.bundle_files import write_manifest
from cliper_prod.export.feature_graphs import FeatureSettings, export_features
from cliper_prod.export.parity import parity
from cliper_prod.export.verified_graph import GraphOptions
from cliper_prod.features.clip_towers import ClipTowers
from cliper_prod.features.fusion import ViewFusion
from cliper_prod.features.views import ViewSpec
from cliper_prod.runtime.bundle_reader import Bundle
from cliper_prod.runtime.encoder import OnnxEncoder
from cliper_prod.runtime.sessions import OrtThreads

CPU = "CPUExecutionProvider"
VARIANTS = [("plain", "fp32"), ("fused", "fp32"), ("plain", INT8), ("fused", INT8)]


def interleaved(runs: dict[str, callable], repeats: int) -> dict[str, dict[str, float]]:
    """Median wall and CPU ms of each run, every round running each once."""
    wall = {k: [] for k in runs}
    cpu = {k: [] for k in runs}
    for run in runs.values():
        run()  # warm-up
    for _ in range(repeats):
        for name, run in runs.items():
            w, c = time.perf_counter(), time.process_time()
            run()
            wall[name].append(time.perf_counter() - w)
            cpu[name].append(time.process_time() - c)
    return {k: {"wall_ms": 1e3 * statistics.median(wall[k]),
                "cpu_ms": 1e3 * statistics.median(cpu[k])} for k in runs}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clip", help="CLIP config folder [default: ViT-B/16 config]")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0,
                        help="ONNX Runtime intra-op threads (0: ORT's default)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/int8_cpu"))
    args = parser.parse_args()
    load_before = os.getloadavg()

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        folder = Path(args.clip) if args.clip else vit_b16_folder(tmp / "clip")
        settings = FeatureSettings(str(folder), True, "sa", 0.1, ViewSpec())
        start = time.perf_counter()
        graphs, features = export_features(settings, tmp / "bundle", GraphOptions(
            torchscript=False, fp16=False, uint8=False))
        export_s = time.perf_counter() - start
        write_manifest(tmp / "bundle", graphs, features, 18, None, None)
        bundle = Bundle(tmp / "bundle", "cpu", threads=OrtThreads(args.threads))
        auto = OnnxEncoder(bundle)
        towers = ClipTowers(folder, random_init=True)
        encoder = towers.view_encoder(ViewFusion("sa", 0.1))
        sessions = {name: {f"{v}_{p}": bundle.graph(name, p, v) for v, p in VARIANTS}
                    for name in (IMAGE_GRAPH, TEXT_GRAPH)}
        size = towers.preprocess.crop
        rows = []
        for batch in args.batches:
            pixels = np.random.default_rng(batch).standard_normal(
                (batch, 3, size, size)).astype(np.float32)
            image = towers.encode_images(pixels)
            tokens = towers.tokenize([v for _ in range(batch) for v in ViewSpec().build(FIELDS)])
            feeds = {
                IMAGE_GRAPH: {"pixel_values": pixels},
                TEXT_GRAPH: {"input_ids": tokens.input_ids.reshape(batch, -1, towers.max_tokens),
                             "attention_mask": tokens.attention_mask.reshape(
                                 batch, -1, towers.max_tokens),
                             "image_embedding": image, "has_image": np.ones(batch, bool),
                             "has_text": np.ones(batch, bool)}}
            with torch.no_grad():
                text_ref = [t.numpy() for t in encoder(*(torch.from_numpy(feeds[TEXT_GRAPH][k])
                                                         for k in feeds[TEXT_GRAPH]))]
            reference = {IMAGE_GRAPH: [image], TEXT_GRAPH: text_ref}
            for name, graphs_of in sessions.items():
                times = interleaved({k: (lambda g=g: g(**feeds[name]))
                                     for k, g in graphs_of.items()}, args.repeats)
                row = {"graph": name, "batch": batch}
                for key, graph in graphs_of.items():
                    row[key] = {**times[key], "min_cosine": parity(
                        reference[name], graph(**feeds[name]))["min_cosine"]}
                rows.append(row)
                print(row, flush=True)
        record = {name: {k: graphs[name][k] for k in (INT8, "parity")}
                  for name in (IMAGE_GRAPH, TEXT_GRAPH)}

    result = {"machine": f"{platform.machine()}, {os.cpu_count()} CPUs, CPU provider",
              "load_before": load_before, "load_after": os.getloadavg(),
              "threads": args.threads or "ORT default",
              "torch": torch.__version__, "onnxruntime": onnxruntime.__version__,
              "cliper_prod": __version__,
              "model": f"{args.clip or 'CLIP ViT-B/16 config'}, random weights",
              "export_s": export_s, "auto_on_cpu": auto.precisions, "rows": rows,
              "export_records": record}
    report(args.out, result, table(result))


def table(result: dict) -> str:
    lines = ["| graph | batch | " + " | ".join(f"{v} {p} ms (CPU ms)" for v, p in VARIANTS)
             + " | int8 / fp32 plain | int8 / best fp32 | int8 worst cosine vs PyTorch |",
             "| --- " * (len(VARIANTS) + 5) + "|"]
    for r in result["rows"]:
        cells = [f"{r[f'{v}_{p}']['wall_ms']:.0f} ({r[f'{v}_{p}']['cpu_ms']:.0f})"
                 for v, p in VARIANTS]
        best32 = min(r["plain_fp32"]["wall_ms"], r["fused_fp32"]["wall_ms"])
        best8 = min(r["plain_int8"]["wall_ms"], r["fused_int8"]["wall_ms"])
        cosine = min(r["plain_int8"]["min_cosine"], r["fused_int8"]["min_cosine"])
        lines.append(f"| {r['graph']} | {r['batch']} | " + " | ".join(cells) +
                     f" | {r['plain_fp32']['wall_ms'] / r['plain_int8']['wall_ms']:.2f}x | "
                     f"{best32 / best8:.2f}x | {cosine:.5f} |")
    lines.append(f"\nSpeed-up = fp32 time / int8 time (wall, median of the interleaved rounds). "
                 f"Load average before / after: {result['load_before']} / "
                 f"{result['load_after']}. `auto` on the CPU runs {result['auto_on_cpu']}.")
    for name, rec in result["export_records"].items():
        int8 = rec[INT8]
        lines.append(f"\n{name}: export parity vs PyTorch (worst cosine) int8 "
                     f"{rec['parity']['onnx_int8']['min_cosine']:.5f}, fused int8 "
                     f"{rec['parity']['onnx_fused_int8']['min_cosine']:.5f} (bound "
                     f"{int8['bound']['min_cosine']}); export-time CPU latency (ms) "
                     f"{int8['latency_ms'][CPU]} -> preferred {int8['preferred'][CPU]}.")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
