"""Accuracy parity: a backbone trained with several seeds, compared with MMRec's own run.

Each seed trains with the backbone's packaged defaults (models/<backbone>.toml), early-stopped on
valid Recall@20; the test metrics at the best valid epoch are averaged, with the median train
epoch time. MMRec's figures are passed in (``--reference`` JSON: {"recall@20": ..., ...}) from
its own run on the same data with the same hyper-parameters.

    python benchmarks/parity.py --backbone freedom --data DIR --seeds 999 1 2 --reference ref.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from _report import report

from cliper_prod import __version__
from cliper_prod.config import load_config
from cliper_prod.data.mmrec import load_dataset
from cliper_prod.training import train_model

SHOWN = ("recall@10", "recall@20", "recall@50", "ndcg@10", "ndcg@20", "ndcg@50")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="freedom")
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--seeds", type=int, nargs="+", default=[999, 1, 2])
    parser.add_argument("--reference", type=Path, help="MMRec's test metrics as JSON")
    parser.add_argument("--out", type=Path, help="[default: benchmarks/results/<backbone>_parity]")
    args = parser.parse_args()
    out = args.out or Path(f"benchmarks/results/{args.backbone}_parity")

    data = load_dataset(args.data)
    runs = []
    for seed in args.seeds:
        config = load_config(args.backbone, overrides={"train": {"seed": seed}})
        start = time.perf_counter()
        result = train_model(args.backbone, data, config, out_dir=None, progress=False)
        runs.append({"seed": seed, "best_epoch": result.best_epoch,
                     "epochs_run": len(result.history), "valid": result.valid,
                     "test": result.test, "wall_s": time.perf_counter() - start,
                     "train_epoch_median_s": statistics.median(h["train_s"]
                                                               for h in result.history)})
        print(f"seed {seed}: best epoch {result.best_epoch}/{len(result.history)}, test "
              f"recall@20 {result.test['recall@20']:.4f} ndcg@20 {result.test['ndcg@20']:.4f}",
              flush=True)
    mean = {k: statistics.mean(r["test"][k] for r in runs) for k in SHOWN}
    std = {k: statistics.pstdev(r["test"][k] for r in runs) for k in SHOWN}
    summary = {"backbone": args.backbone, "config": load_config(args.backbone),
               "data": str(args.data), "torch": torch.__version__, "cliper_prod": __version__,
              "runs": runs, "test_mean": mean, "test_std": std}
    header = "| run | " + " | ".join(SHOWN) + " |\n|" + " --- |" * (len(SHOWN) + 1)
    lines = [header]
    for r in runs:
        lines.append(f"| cliper-prod seed {r['seed']} (best epoch {r['best_epoch']}) | "
                     + " | ".join(f"{r['test'][k]:.4f}" for k in SHOWN) + " |")
    lines.append(f"| cliper-prod mean of {len(runs)} | "
                 + " | ".join(f"{mean[k]:.4f} ± {std[k]:.4f}" for k in SHOWN) + " |")
    if args.reference:
        ref = json.loads(args.reference.read_text())
        summary["reference"] = ref
        summary["relative_diff"] = {k: mean[k] / ref[k] - 1 for k in SHOWN if k in ref}
        lines.append("| MMRec reference | " + " | ".join(f"{ref[k]:.4f}" for k in SHOWN) + " |")
        lines.append("| mean / reference - 1 | " + " | ".join(
            f"{summary['relative_diff'][k]:+.1%}" for k in SHOWN) + " |")
    report(out, summary, "\n".join(lines))


if __name__ == "__main__":
    main()
