"""`embed` throughput: text tower (+ fusion) and image tower separately, over batch sizes, plus
image decoding and preprocessing, with a ViT-B/16-sized CLIP built from config (random weights).

    python benchmarks/bench_embed.py [--batches 1 4 16 64 256] [--device cpu]

Throughput is items per second at each batch size (median of --repeats runs after one warm-up).
The tokenizer is the real CLIP BPE from ../shared/models/tinyclip-8m-skeleton when present.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from _report import report

from cliper_prod import __version__
from cliper_prod.features.clip_towers import ClipTowers
from cliper_prod.features.fusion import ViewFusion
from cliper_prod.features.views import ViewSpec

SKELETON = Path(__file__).resolve().parents[2] / "shared" / "models" / "tinyclip-8m-skeleton"


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
    config.save_pretrained(root)
    for f in ("tokenizer.json", "preprocessor_config.json"):
        (root / f).write_bytes((SKELETON / f).read_bytes())
    return root


def timed(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4, 16, 64, 256])
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    out = args.out or Path(f"benchmarks/results/embed_{args.device.split(':')[0]}")

    with tempfile.TemporaryDirectory() as tmp:
        towers = ClipTowers(vit_b16_folder(Path(tmp)), device=args.device, random_init=True)
        rng = np.random.default_rng(0)
        photo = Path(tmp) / "photo.jpg"
        Image.fromarray(rng.integers(0, 256, (500, 400, 3), dtype=np.uint8)).save(photo)
        spec = ViewSpec()
        fields = {"title": "Soft organic cotton baby blanket, 30 x 40 inches, grey",
                  "brand": "Dreamo", "categories": "Baby, Nursery, Bedding",
                  "description": "A breathable knit blanket for cribs and strollers. " * 4}
        prompts = spec.build(fields)
        fusion = ViewFusion("sa", 0.1)
        pre_s = timed(lambda: towers.preprocess.load(photo), max(args.repeats, 5))
        rows = []
        for batch in args.batches:
            pixels = np.stack([towers.preprocess.load(photo)] * batch)
            texts = prompts * batch

            def text_and_fusion() -> None:
                views, _ = towers.encode_texts(texts)
                views = torch.from_numpy(views).reshape(batch, len(prompts), -1)
                fusion(views, torch.from_numpy(views[:, 0].numpy()))

            image_s = timed(lambda: towers.encode_images(pixels), args.repeats)
            text_s = timed(text_and_fusion, args.repeats)
            rows.append({"batch": batch, "image_items_per_s": batch / image_s,
                         "text_items_per_s": batch / text_s,
                         "views_per_item": len(prompts)})
            print(rows[-1], flush=True)

    result = {"machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads, "
                         f"device {args.device}", "torch": torch.__version__,
              "cliper_prod": __version__, "model": "CLIP ViT-B/16 config, random weights",
              "decode_preprocess_images_per_s_one_thread": 1 / pre_s, "rows": rows}
    lines = ["| batch | image tower (items/s) | text tower + SA fusion, 5 views (items/s) |",
             "| --- | --- | --- |"]
    lines += [f"| {r['batch']} | {r['image_items_per_s']:.2f} | {r['text_items_per_s']:.2f} |"
              for r in rows]
    lines.append(f"\nDecode + preprocess of a 500x400 JPEG, one thread: {1 / pre_s:.0f} images/s.")
    report(out, result, "\n".join(lines))


if __name__ == "__main__":
    main()
