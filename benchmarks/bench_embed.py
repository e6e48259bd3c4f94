"""`embed` throughput, PyTorch path vs ONNX Runtime bundle path, side by side in one run.

    python benchmarks/bench_embed.py [--clip DIR] [--batches 1 8 32] [--items 256]

For each batch size: the image tower and the text tower + SA fusion (5 views per item) in
PyTorch eager fp32, ONNX Runtime fp32 and ONNX Runtime fp16 (items/s, median of --repeats after
a warm-up). Then the whole `embed` job (JSONL -> decode + preprocess JPEG files -> towers ->
fusion -> files) over a generated catalog, PyTorch vs ONNX, with decoding overlapped by the
pipeline's thread pool. The default model is a CLIP ViT-B/16 config with random weights and the
real CLIP tokenizer (../shared/models/tinyclip-8m-skeleton); speed does not depend on weights.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime
import torch
from PIL import Image

from _report import report

from cliper_prod import __version__
from cliper_prod.export.bundle_files import write_manifest
from cliper_prod.bundle_format import TEXT_GRAPH, UINT8_INPUT
from cliper_prod.export.feature_graphs import FeatureSettings, export_features
from cliper_prod.export.graphs import (GraphSpec, export_onnx, optimize_clip, to_fp16,
                                       torch_outputs, verify)
from cliper_prod.export.parity import FP16_BOUND, FP32_BOUND
from cliper_prod.export.verified_graph import GraphOptions
from cliper_prod.features.clip_towers import ClipTowers
from cliper_prod.features.embed import EmbedOptions, embed_catalog
from cliper_prod.features.fusion import ViewFusion
from cliper_prod.features.views import ViewSpec
from cliper_prod.runtime.bundle_reader import Bundle
from cliper_prod.runtime.encoder import OnnxEncoder

SKELETON = Path(__file__).resolve().parents[2] / "shared" / "models" / "tinyclip-8m-skeleton"
FIELDS = {"title": "Soft organic cotton baby blanket, 30 x 40 inches, grey", "brand": "Dreamo",
          "categories": "Baby, Nursery, Bedding",
          "description": "A breathable knit blanket for cribs and strollers. " * 4}


def vit_b16_folder(root: Path) -> Path:
    """A CLIP ViT-B/16 config (text 512 x 12 layers, vision 768 x 12 layers, 224 px, 512-d)."""
    from transformers import CLIPConfig

    config = CLIPConfig(
        text_config=dict(hidden_size=512, intermediate_size=2048, num_hidden_layers=12,
                         num_attention_heads=8, max_position_embeddings=77, vocab_size=49408,
                         bos_token_id=49406, eos_token_id=49407, pad_token_id=49407),
        vision_config=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                           num_attention_heads=12, image_size=224, patch_size=16),
        projection_dim=512)
    root.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(root)
    for f in ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt",
              "special_tokens_map.json", "preprocessor_config.json"):
        if (SKELETON / f).exists():
            (root / f).write_bytes((SKELETON / f).read_bytes())
    return root


def feature_bundle(clip: Path, out: Path) -> float:
    """Export ``clip``'s graphs (random weights, SA fusion, default views) as a bundle of CLIP
    graphs only at ``out``, every ONNX variant; the seconds it took."""
    settings = FeatureSettings(str(clip), True, "sa", 0.1, ViewSpec())
    start = time.perf_counter()
    graphs, features = export_features(settings, out, GraphOptions(torchscript=False))
    export_s = time.perf_counter() - start
    write_manifest(out, graphs, features, 18, None, None)
    return export_s


def tower_inputs(towers: ClipTowers, batch: int, encode: bool = True
                 ) -> dict[str, np.ndarray]:
    """Every input of both CLIP graphs for ``batch`` items (random pixels, FIELDS' views); the
    image embeddings those of the pixels (``encode``: the image tower on the CPU), or random
    ones where only the text graph's cost matters."""
    size = towers.preprocess.crop
    rng = np.random.default_rng(0)
    raw = rng.integers(0, 256, (batch, 3, size, size), dtype=np.uint8)
    pixels = towers.preprocess.normalise(raw)
    tokens = towers.tokenize(ViewSpec().build(FIELDS) * batch)
    n_views = len(ViewSpec().names)
    image = towers.encode_images(pixels) if encode else \
        rng.standard_normal((batch, towers.dim)).astype(np.float32)
    flags = np.ones(batch, dtype=bool)
    return {"pixel_values": pixels, UINT8_INPUT: raw,
            "input_ids": tokens.input_ids.reshape(batch, n_views, -1),
            "attention_mask": tokens.attention_mask.reshape(batch, n_views, -1),
            "image_embedding": image, "has_image": flags, "has_text": flags}


def masked_fused_text(clip: Path, bundle_dir: Path) -> dict[str, str]:
    """The text graph fused with the causal + padding mask as its attention's bias (what export
    wrote before the causal form), fp32 and fp16, beside the bundle's files: the A/B of that
    form on a GPU. Each is held to the export's bounds against the PyTorch module here (on the
    CPU provider); written once per bundle folder."""
    files = {"fused.masked.fp32": f"{TEXT_GRAPH}.fused.masked.onnx",
             "fused.masked.fp16": f"{TEXT_GRAPH}.fused.masked.fp16.onnx"}
    if all((bundle_dir / name).is_file() for name in files.values()):
        return files
    towers = ClipTowers(clip, random_init=True, attn_implementation="eager")
    module = towers.view_encoder(ViewFusion("sa", 0.1))  # the padding mask kept
    names = ["input_ids", "attention_mask", "image_embedding", "has_image", "has_text"]
    inputs = [tower_inputs(towers, batch, encode=False) for batch in (2, 3)]
    spec = GraphSpec(TEXT_GRAPH, module, *(tuple(torch.from_numpy(i[n]) for n in names)
                                           for i in inputs), names,
                     ["text_feature", "similarity", "image_feature", "view_embeddings"])
    with tempfile.TemporaryDirectory() as tmp:
        eager = Path(tmp) / "eager.onnx"
        export_onnx(spec, eager)
        config = module.config
        optimize_clip(eager, bundle_dir / files["fused.masked.fp32"], config.num_hidden_layers,
                      config.num_attention_heads, config.hidden_size)
    to_fp16(bundle_dir / files["fused.masked.fp32"], bundle_dir / files["fused.masked.fp16"])
    reference = torch_outputs(spec)
    for key, bound in (("fused.masked.fp32", FP32_BOUND), ("fused.masked.fp16", FP16_BOUND)):
        session = onnxruntime.InferenceSession(str(bundle_dir / files[key]),
                                               providers=["CPUExecutionProvider"])
        verify(files[key], reference,
               lambda: session.run(None, {n: inputs[1][n] for n in names}), bound)
    return files


def timed(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def write_catalog(root: Path, n_items: int, n_images: int = 32) -> Path:
    """``n_items`` items sharing ``n_images`` distinct 640x480 JPEG photos of smooth noise."""
    rng = np.random.default_rng(0)
    (root / "img").mkdir(parents=True)
    for j in range(n_images):
        small = rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)
        Image.fromarray(small).resize((640, 480), Image.BILINEAR).save(root / "img" / f"{j}.jpg",
                                                                       quality=90)
    with open(root / "items.jsonl", "w") as fh:
        for i in range(n_items):
            fh.write(json.dumps({"item_id": f"I{i}", **FIELDS,
                                 "image": f"img/{i % n_images}.jpg"}) + "\n")
    return root / "items.jsonl"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clip", help="CLIP folder (config enough with --random-init) "
                                       "[default: ViT-B/16 config]")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--items", type=int, default=256,
                        help="catalog size for end to end (0: towers only)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    out = args.out or Path(f"benchmarks/results/embed_{device}")

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        folder = Path(args.clip) if args.clip else vit_b16_folder(tmp / "clip")
        towers = ClipTowers(folder, device=device, random_init=True)
        spec = ViewSpec()
        export_s = feature_bundle(folder, tmp / "bundle")
        bundle = Bundle(tmp / "bundle", provider="auto")
        onnx_paths = {p: OnnxEncoder(bundle, p) for p in ("fp32", "fp16")}
        prompts = spec.build(FIELDS)
        photo = write_catalog(tmp / "catalog", args.items)
        pixel = towers.preprocess.load(tmp / "catalog" / "img" / "0.jpg")
        rows = []
        for batch in args.batches:
            pixels = np.stack([pixel] * batch)
            tokens = towers.tokenize(prompts * batch)
            image = towers.encode_images(pixels)
            flags = np.ones(batch, dtype=bool)
            row = {"batch": batch}
            paths = {"pytorch_fp32": towers, **{f"onnx_{p}": e for p, e in onnx_paths.items()}}
            for name, enc in paths.items():
                row[f"image_{name}"] = batch / timed(lambda: enc.encode_images(pixels),
                                                     args.repeats)
                row[f"text_{name}"] = batch / timed(
                    lambda: enc.encode_views(tokens, image, flags, flags, "sa", 0.1),
                    args.repeats)
            rows.append(row)
            print(row, flush=True)
        end_to_end = {}
        for name, enc in (("pytorch_fp32", towers), ("onnx_fp32", onnx_paths["fp32"]),
                          ("onnx_fp16", onnx_paths["fp16"])) if args.items else ():
            options = EmbedOptions(batch_size=max(args.batches))
            start = time.perf_counter()
            embed_catalog(photo, enc, tmp / f"out-{name}", options, progress=False)
            end_to_end[name] = args.items / (time.perf_counter() - start)
            print(name, "end to end", end_to_end[name], flush=True)
        decode_s = timed(lambda: towers.preprocess.load(tmp / "catalog" / "img" / "1.jpg"), 20)

    result = {"machine": f"{platform.machine()} {platform.processor()}, "
                         f"{torch.get_num_threads()} torch threads, device {device}",
              "torch": torch.__version__, "onnxruntime": onnxruntime.__version__,
              "providers": bundle.providers, "cliper_prod": __version__,
              "model": f"{args.clip or 'CLIP ViT-B/16 config'}, random weights",
              "export_s": export_s, "rows": rows, "end_to_end_items_per_s": end_to_end,
              "decode_preprocess_640x480_jpeg_per_s_one_thread": 1 / decode_s}
    names = ("pytorch_fp32", "onnx_fp32", "onnx_fp16")
    lines = ["| batch | " + " | ".join(f"image {n}" for n in names) + " | "
             + " | ".join(f"text+SA {n}" for n in names) + " |",
             "| --- " * 7 + "|"]
    for r in rows:
        lines.append(f"| {r['batch']} | " + " | ".join(f"{r['image_' + n]:.1f}" for n in names)
                     + " | " + " | ".join(f"{r['text_' + n]:.1f}" for n in names) + " |")
    lines.append("\nItems/s (text: 5 views per item)."
                 + (f" End to end `embed` of {args.items} items with 640x480 JPEGs, batch "
                    f"{max(args.batches)}: " + ", ".join(f"{n} {v:.1f}" for n, v in
                                                          end_to_end.items()) + " items/s."
                    if end_to_end else "")
                 + f" Decode + preprocess alone, one thread: {1 / decode_s:.0f} images/s.")
    report(out, result, "\n".join(lines))


if __name__ == "__main__":
    main()
