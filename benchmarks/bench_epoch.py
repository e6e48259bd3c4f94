"""Time one training epoch and one full evaluation of a backbone, side by side with MMRec.

Both run on the same machine in the same invocation, on the same data and features; the ratio
is what counts. MMRec is run from a checkout outside this repository through a command that
prints JSON with ``train_epoch_s`` and ``eval_s`` (see BENCHMARKS.md for the one used).

    python benchmarks/bench_epoch.py --backbone freedom --data DIR [--mmrec-cmd "..."] [--epochs 3]
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import statistics
import subprocess
import time
from pathlib import Path

import numpy as np
import torch

from _report import report

from cliper_prod import __version__
from cliper_prod.backbones import create_model
from cliper_prod.config import TrainSettings, build, load_config
from cliper_prod.data.mmrec import load_dataset
from cliper_prod.data.sampling import BPRSampler
from cliper_prod.training import evaluate_model, ranking_tasks


def time_ours(backbone: str, data_dir: Path, epochs: int) -> dict:
    data = load_dataset(data_dir)
    config = load_config(backbone)
    settings = build(TrainSettings, config["train"], "train")
    torch.manual_seed(0)
    model = create_model(backbone, data, config["model"])
    optimizer = torch.optim.Adam(model.parameters(), lr=settings.learning_rate,
                                 weight_decay=settings.weight_decay)
    sampler = BPRSampler(data.train, data.n_items, settings.batch_size, np.random.default_rng(0))
    task = ranking_tasks(data)["valid"]
    gen = torch.Generator().manual_seed(0)
    train_s, eval_s = [], []
    for _ in range(epochs):
        start = time.perf_counter()
        model.train()
        model.pre_epoch(gen)
        for users, pos, neg in sampler.epoch():
            optimizer.zero_grad(set_to_none=True)
            model.loss(users, pos, neg).backward()
            optimizer.step()
        train_s.append(time.perf_counter() - start)
        start = time.perf_counter()
        evaluate_model(model, task, settings)
        eval_s.append(time.perf_counter() - start)
    return {"train_epoch_s": statistics.median(train_s), "eval_s": statistics.median(eval_s),
            "train_epoch_all_s": train_s, "eval_all_s": eval_s}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="freedom")
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--mmrec-cmd", help="command printing MMRec's timings as JSON")
    parser.add_argument("--epochs", type=int, default=3, help="epochs timed (median reported)")
    parser.add_argument("--out", type=Path, help="[default: benchmarks/results/<backbone>_epoch_cpu]")
    args = parser.parse_args()
    out_path = args.out or Path(f"benchmarks/results/{args.backbone}_epoch_cpu")

    result = {"machine": f"{platform.processor() or platform.machine()}, "
                         f"{torch.get_num_threads()} torch threads",
              "torch": torch.__version__, "cliper_prod": __version__, "data": str(args.data),
              "backbone": args.backbone, "ours": time_ours(args.backbone, args.data, args.epochs)}
    if args.mmrec_cmd:
        out = subprocess.run(shlex.split(args.mmrec_cmd), capture_output=True, text=True,
                             check=True).stdout
        result["mmrec"] = json.loads(out.strip().splitlines()[-1])
        result["mmrec_cmd"] = args.mmrec_cmd
        result["speedup"] = {k: result["mmrec"][k] / result["ours"][k]
                             for k in ("train_epoch_s", "eval_s")}
    rows = ["| implementation | train epoch (s) | full evaluation (s) |", "| --- | --- | --- |",
            f"| cliper-prod | {result['ours']['train_epoch_s']:.2f} | "
            f"{result['ours']['eval_s']:.2f} |"]
    if "mmrec" in result:
        rows.append(f"| MMRec | {result['mmrec']['train_epoch_s']:.2f} | "
                    f"{result['mmrec']['eval_s']:.2f} |")
        rows.append(f"| speed-up | {result['speedup']['train_epoch_s']:.1f}x | "
                    f"{result['speedup']['eval_s']:.1f}x |")
    report(out_path, result, "\n".join(rows))


if __name__ == "__main__":
    main()
