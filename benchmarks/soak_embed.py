"""Soak run: `cliper-prod embed` over a large generated catalog with 1% bad items.

    python benchmarks/soak_embed.py [--items 100000] [--bad-fraction 0.01]

Writes a JSONL catalog (titles, brands, categories, descriptions; 64 distinct PNG images) in
which a fraction of the lines are broken in one of seven ways, runs `embed` on it in a child
process with a small random-weight CLIP, and checks the result against what the generator
knows: every good item embedded (kept fallbacks included), every bad line reported with the
expected action, nothing else. Reports wall time, items/s and the child's peak RSS.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from _report import report

from cliper_prod import __version__
from cliper_prod.features.tiny_clip import build_tiny_clip
from cliper_prod.features.views import DEFAULT_TEMPLATES, GLOBAL_TEMPLATE

WORDS = "soft organic cotton baby blanket bottle stroller toy red blue grey green".split()
BAD_KINDS = {  # kind -> (action in errors.jsonl, embedded?)
    "malformed": ("skipped", False), "no_id": ("skipped", False),
    "duplicate": ("skipped", False), "wrong_type": ("skipped", False),
    "missing_image": ("kept", True), "broken_image": ("kept", True),
    "nothing": ("skipped", False),
}


def write_catalog(root: Path, n_items: int, bad_fraction: float, seed: int = 0
                  ) -> tuple[Path, list[str], dict[int, str]]:
    rng = np.random.default_rng(seed)
    (root / "img").mkdir(parents=True)
    for j in range(64):
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(
            root / "img" / f"{j}.png")
    (root / "img" / "broken.png").write_bytes(b"\x89PNG not really")
    kinds = list(BAD_KINDS)
    expected_ids, bad_lines = [], {}
    with open(root / "items.jsonl", "w") as fh:
        for i in range(n_items):
            words = rng.choice(WORDS, size=6)
            item = {"item_id": f"I{i:07d}", "title": " ".join(words[:3]), "brand": words[3],
                    "categories": [["Baby", words[4]]], "description": " ".join(words),
                    "image": f"img/{i % 64}.png"}
            kind = kinds[int(rng.integers(len(kinds)))] if rng.random() < bad_fraction else None
            line = json.dumps(item)
            if kind == "malformed":
                line = line[:-5]
            elif kind == "no_id":
                line = json.dumps({k: v for k, v in item.items() if k != "item_id"})
            elif kind == "duplicate" and expected_ids:
                line = json.dumps({**item, "item_id": expected_ids[0]})
            elif kind == "wrong_type":
                line = json.dumps({**item, "title": 42})
            elif kind == "missing_image":
                line = json.dumps({**item, "image": "img/missing.png"})
            elif kind == "broken_image":
                line = json.dumps({**item, "image": "img/broken.png"})
            elif kind == "nothing":
                line = json.dumps({"item_id": item["item_id"]})
            if kind == "duplicate" and not expected_ids:
                kind = None
            fh.write(line + "\n")
            if kind is not None:
                bad_lines[i + 1] = kind
            if kind is None or BAD_KINDS[kind][1]:
                expected_ids.append(item["item_id"])
    return root / "items.jsonl", expected_ids, bad_lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=int, default=100_000)
    parser.add_argument("--bad-fraction", type=float, default=0.01)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/soak_embed_cpu"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        items, expected_ids, bad_lines = write_catalog(tmp / "catalog", args.items,
                                                       args.bad_fraction)
        clip = build_tiny_clip(tmp / "clip", WORDS + ["Baby", GLOBAL_TEMPLATE, "Missing",
                                                      *DEFAULT_TEMPLATES.values()])
        start = time.perf_counter()
        run = subprocess.run([sys.executable, "-m", "cliper_prod", "embed", str(items),
                              "--clip", str(clip), "--out", str(tmp / "out"), "--quiet",
                              "--batch-size", "256"], capture_output=True, text=True)
        wall = time.perf_counter() - start
        if run.returncode:
            sys.exit(run.stderr)
        peak_mib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
        got_ids = (tmp / "out" / "item_ids.txt").read_text().split()
        errors = [json.loads(line) for line in
                  (tmp / "out" / "errors.jsonl").read_text().splitlines()]
        reported = {e["line"]: e["action"] for e in errors}
        checks = {
            "every_good_item_embedded_in_order": got_ids == expected_ids,
            "every_bad_line_reported_with_its_action": reported == {
                line: BAD_KINDS[kind][0] for line, kind in bad_lines.items()},
            "features_finite": bool(np.isfinite(np.load(tmp / "out" / "text_feat.npy")).all()),
        }
    result = {"machine": f"{platform.machine()} {platform.processor()}, Python "
                         f"{platform.python_version()}", "cliper_prod": __version__,
              "items": args.items, "bad_lines": len(bad_lines),
              "bad_by_kind": {k: sum(v == k for v in bad_lines.values()) for k in BAD_KINDS},
              "embedded": len(got_ids), "wall_s": wall, "items_per_s": args.items / wall,
              "peak_rss_mib": peak_mib, "checks": checks,
              "model": "tiny random CLIP (2 layers, 64 hidden, 32 px), batch 256"}
    table = "\n".join([
        "| items | bad lines | embedded | wall (s) | items/s | peak RSS (MiB) | checks |",
        "| --- | --- | --- | --- | --- | --- | --- |",
        f"| {args.items:,} | {len(bad_lines):,} | {len(got_ids):,} | {wall:.0f} | "
        f"{args.items / wall:.0f} | {peak_mib:.0f} | "
        f"{'all pass' if all(checks.values()) else checks} |"])
    report(args.out, result, table)
    if not all(checks.values()):
        sys.exit(1)


if __name__ == "__main__":
    main()
