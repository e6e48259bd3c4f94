"""Accuracy parity: a backbone trained with several seeds, compared with MMRec's own run.

Each seed trains with the backbone's packaged defaults (models/<backbone>.toml), early-stopped on
valid Recall@20; the test metrics at the best valid epoch are averaged, with the median train
epoch time. MMRec's figures are passed in (``--reference`` JSON: {"recall@20": ..., ...}, and
optionally "std" and "per_seed": {seed: {metrics, "epochs_run"}}) from its own runs on the same
data with the same hyper-parameters. ``--runs-from`` re-reports runs of earlier invocations
(their JSON) instead of training, so seeds trained in several sittings make one table.
``--workdir`` trains each seed into its own folder there: a seed that was interrupted resumes
from its last finished epoch, and a finished one is read back instead of trained again.

    python benchmarks/parity.py --backbone freedom --data DIR --seeds 999 1 2 --reference ref.json
    python benchmarks/parity.py --backbone vbpr --data DIR --runs-from a.json b.json --reference ref.json
    python benchmarks/parity.py --backbone mmgcn --data DIR --seeds 999 --workdir /tmp/parity-mmgcn
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
from cliper_prod.io import write_json
from cliper_prod.training import STATE_DIR, train_model

SHOWN = ("recall@10", "recall@20", "recall@50", "ndcg@10", "ndcg@20", "ndcg@50")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="freedom")
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--seeds", type=int, nargs="+", default=[999, 1, 2])
    parser.add_argument("--reference", type=Path, help="MMRec's test metrics as JSON")
    parser.add_argument("--runs-from", type=Path, nargs="+",
                        help="reuse the runs of these result JSONs (same backbone) instead of "
                             "training; --seeds is then ignored")
    parser.add_argument("--workdir", type=Path,
                        help="train each seed into WORKDIR/seed-S, resumable after an "
                             "interruption; finished seeds are read back, not retrained")
    parser.add_argument("--out", type=Path, help="[default: benchmarks/results/<backbone>_parity]")
    args = parser.parse_args()
    out = args.out or Path(f"benchmarks/results/{args.backbone}_parity")
    runs = reused_runs(args.runs_from, args.backbone) if args.runs_from else \
        train_runs(args.backbone, args.data, args.seeds, args.workdir)
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
        lines += reference_rows(ref)
        label = "MMRec mean" if "per_seed" in ref else "reference"
        lines.append(f"| mean / {label} - 1 | " + " | ".join(
            f"{summary['relative_diff'][k]:+.1%}" for k in SHOWN) + " |")
    report(out, summary, "\n".join(lines))


def reused_runs(paths: list[Path], backbone: str) -> list[dict]:
    runs = []
    for path in paths:
        earlier = json.loads(path.read_text())
        if earlier["backbone"] != backbone:
            raise SystemExit(f"{path}: runs of {earlier['backbone']}, not {backbone}")
        runs += earlier["runs"]
    return runs


def reference_rows(ref: dict) -> list[str]:
    """MMRec's rows: one per seed and the mean when the reference has them, and the gap."""
    per_seed = ref.get("per_seed", {})
    rows = [f"| MMRec seed {seed} ({m['epochs_run']} epochs) | "
            + " | ".join(f"{m[k]:.4f}" for k in SHOWN) + " |" for seed, m in per_seed.items()]
    if per_seed:
        rows.append(f"| MMRec mean of {len(per_seed)} | " + " | ".join(
            f"{ref[k]:.4f} ± {ref['std'][k]:.4f}" for k in SHOWN) + " |")
    else:
        rows.append("| MMRec reference | " + " | ".join(f"{ref[k]:.4f}" for k in SHOWN) + " |")
    return rows


def train_runs(backbone: str, data_dir: Path, seeds: list[int],
               workdir: Path | None = None) -> list[dict]:
    """One early-stopped training per seed with the packaged defaults (resumable per seed in
    ``workdir``)."""
    data = load_dataset(data_dir)
    runs = []
    for seed in seeds:
        out_dir = workdir / f"seed-{seed}" if workdir is not None else None
        record = out_dir / "parity_run.json" if out_dir is not None else None
        config = load_config(backbone, overrides={"train": {"seed": seed}})
        if record is not None and record.exists():
            run = json.loads(record.read_text())
            if run.get("config") != config:
                raise SystemExit(f"{record}: trained with other settings than "
                                 f"models/{backbone}.toml now has; delete {out_dir} to retrain")
            runs.append(run)
            print(f"seed {seed}: read back from {record}", flush=True)
            continue
        resumed = out_dir is not None and (out_dir / STATE_DIR).exists()
        start = time.perf_counter()
        result = train_model(backbone, data, config, out_dir=out_dir, progress=False,
                             resume=True)
        run = {"seed": seed, "config": config, "best_epoch": result.best_epoch,
               "epochs_run": len(result.history), "valid": result.valid, "test": result.test,
               "wall_s": time.perf_counter() - start, "resumed": resumed,
               "train_epoch_median_s": statistics.median(h["train_s"] for h in result.history),
               "valid_recall@20_per_epoch": [round(h["valid"]["recall@20"], 5)
                                             for h in result.history]}
        if record is not None:
            write_json(record, run)
        runs.append(run)
        print(f"seed {seed}: best epoch {result.best_epoch}/{len(result.history)}, test "
              f"recall@20 {result.test['recall@20']:.4f} ndcg@20 {result.test['ndcg@20']:.4f}",
              flush=True)
    return runs


if __name__ == "__main__":
    main()
