"""Time to accuracy of large-batch training: the default settings against ``[train]``
variants (``steps_per_epoch`` with the warm-up / scaling schedule, validation on a user sample),
one seed, each run to early stopping in this process, one after another.

    python benchmarks/bench_large_batch.py --data /tmp/baby-train --backbone freedom \
        --variant "none16:steps_per_epoch=16,eval_users=5000" \
        --variant "sqrt16:steps_per_epoch=16,lr_scaling=sqrt,lr_warmup_steps=80,eval_users=5000"

The first run is always the packaged defaults; its selected epoch's valid metric sets the target
(98% of it, ``--target``). Per run: test and valid metrics at the selected epoch (valid over
every user); wall time and this process's CPU seconds (model build to test metrics, data loading
excluded); epochs and optimiser steps; and the wall and CPU seconds, epochs and steps until the
valid metric over every user first reached the target (runs with ``eval_users`` validate on
their sample, whose metric runs on another scale: the benchmark ranks every user too after each
of their epochs, outside the clocks, for the crossing). On a shared machine wall times swing
with the other jobs: the JSON keeps the load average before and after each run, and CPU seconds
are the steadier comparison.

On a GPU (``--device cuda``: the model, its graphs and the ranking there) the same comparison
runs at the larger sizes of ``bench_scale.py`` (data generated on the machine);
``--max-wall-s`` ends a run after the first epoch past that many seconds, as if early stopping
had stopped it, and marks it ``cut`` (a cut default's target is that of an unfinished run, and
the table says so).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

from _report import report


def parse_variant(text: str) -> tuple[str, dict]:
    """``name:key=value,key=value`` -> (name, its [train] overrides), values parsed as by
    ``--set``."""
    from cliper_prod.commands.common import parse_overrides

    name, _, pairs = text.partition(":")
    return name, parse_overrides(tuple(f"train.{p}" for p in pairs.split(","))).get("train", {})


def run(backbone: str, data, overrides: dict, seed: int, device: str = "cpu",
        max_wall_s: float | None = None) -> dict:
    """Train with ``overrides`` on the defaults on ``device``; the figures of one row, the
    clocks read after every epoch; stopped after the first epoch past ``max_wall_s``."""
    import torch

    from cliper_prod.config import load_config
    from cliper_prod.training import Trainer, evaluate_model, ranking_tasks

    config = load_config(backbone, overrides={"train": {**overrides, "seed": seed}})
    load_before = os.getloadavg()[0]
    metric = config["train"]["valid_metric"]
    start, cpu_start = time.perf_counter(), time.process_time()
    clocks = []  # (wall, cpu) seconds since the start, at the end of each epoch
    full = []  # each epoch's valid metric over every user, for the crossing
    cut = False

    class Timed(Trainer):
        def run_epoch(self, state) -> None:
            nonlocal start, cpu_start, cut
            super().run_epoch(state)
            clocks.append((time.perf_counter() - start, time.process_time() - cpu_start))
            if max_wall_s is not None and clocks[-1][0] > max_wall_s and not state.finished:
                state.finished = cut = True
            if self.valid_task is self.full_valid_task:
                full.append(state.history[-1]["valid"][metric])
                return
            # a sample's metric is on another scale than the full split's: the crossing is read
            # on every user, by an evaluation left out of the clocks
            wall, cpu = time.perf_counter(), time.process_time()
            full.append(evaluate_model(self.model, self.full_valid_task, self.settings)[metric])
            start += time.perf_counter() - wall
            cpu_start += time.process_time() - cpu

    trainer = Timed(backbone, data, config, progress=False, device=torch.device(device))
    fit = trainer.fit()
    test = evaluate_model(fit.model, ranking_tasks(data)["test"], trainer.settings)
    return {"overrides": overrides, "test": test, "valid": fit.valid, "best_epoch": fit.best_epoch,
            "epochs": len(fit.history), "steps_per_epoch": len(trainer.sampler),
            "batch": trainer.sampler.batch_size, "wall_s": time.perf_counter() - start,
            "cpu_s": time.process_time() - cpu_start,
            "train_s": sum(h["train_s"] for h in fit.history),
            "eval_s": sum(h["eval_s"] for h in fit.history),
            "validated_users": len(trainer.valid_task.users),
            "history": [{"epoch": h["epoch"], "wall_s": wall, "cpu_s": cpu,
                         "valid": h["valid"][metric], "valid_all_users": all_users}
                        for h, (wall, cpu), all_users in zip(fit.history, clocks, full)],
            "load_avg_1min": [load_before, os.getloadavg()[0]], "device": device, "cut": cut}


def reach(row: dict, target: float) -> dict:
    """Wall and CPU seconds (model build included), epochs and steps until the valid metric
    over every user first reached ``target``; None where it never did."""
    for h in row["history"]:
        if h["valid_all_users"] >= target:
            epochs = h["epoch"] + 1
            return {"wall_s": h["wall_s"], "cpu_s": h["cpu_s"], "epochs": epochs,
                    "steps": epochs * row["steps_per_epoch"]}
    return {"wall_s": None, "cpu_s": None, "epochs": None, "steps": None}


def table(result: dict) -> str:
    metric = result["metric"]
    base = result["runs"]["default"]
    lines = [f"| run | test {metric} | vs default | wall s (vs default) | CPU s (vs default) | "
             f"epochs (best) | steps x batch | to {result['target_share']:.0%} of default "
             f"valid: wall s / CPU s / epochs / steps |", "|---" * 8 + "|"]
    for name, row in result["runs"].items():
        hit = row["reach"]
        to = "not reached" if hit["epochs"] is None else \
            f"{hit['wall_s']:,.0f} / {hit['cpu_s']:,.0f} / {hit['epochs']} / {hit['steps']:,}"
        lines.append(
            f"| {name}{' (cut at --max-wall-s)' if row.get('cut') else ''} | "
            f"{row['test'][metric]:.4f} | "
            f"{row['test'][metric] / base['test'][metric]:.1%} | {row['wall_s']:,.0f} "
            f"({row['wall_s'] / base['wall_s']:.2f}) | {row['cpu_s']:,.0f} "
            f"({row['cpu_s'] / base['cpu_s']:.2f}) | {row['epochs']} ({row['best_epoch']}) | "
            f"{row['steps_per_epoch']} x {row['batch']:,} | {to} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--backbone", default="freedom")
    parser.add_argument("--seed", type=int, default=999)
    parser.add_argument("--variant", action="append", default=[],
                        help="name:key=value,... of [train] overrides (repeatable)")
    parser.add_argument("--target", type=float, default=0.98,
                        help="share of the default's selected valid metric to reach")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--max-wall-s", type=float, help="end each run after the first epoch "
                                                         "past this many seconds (marked cut)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/large_batch"))
    args = parser.parse_args()

    import torch

    from cliper_prod.config import load_config
    from cliper_prod.data.mmrec import load_dataset

    data = load_dataset(args.data)
    metric = load_config(args.backbone)["train"]["valid_metric"]
    runs: dict[str, dict] = {}
    gpu = f", {torch.cuda.get_device_name(0)}" if args.device == "cuda" else ""
    for name, overrides in [("default", {}), *map(parse_variant, args.variant)]:
        runs[name] = run(args.backbone, data, overrides, args.seed, args.device,
                         args.max_wall_s)
        print(f"{name}: test {metric} {runs[name]['test'][metric]:.4f}, "
              f"{runs[name]['wall_s']:.0f} s", file=sys.stderr, flush=True)
        target = args.target * runs["default"]["valid"][metric]
        for row in runs.values():
            row["reach"] = reach(row, target)
        result = {"machine": f"{platform.machine()}, {os.cpu_count()} CPUs, torch "
                             f"{torch.__version__}, {torch.get_num_threads()} threads{gpu}",
                  "command": " ".join(["python", *sys.argv]), "backbone": args.backbone,
                  "data": str(args.data), "seed": args.seed, "metric": metric,
                  "target_share": args.target, "target": target, "runs": runs}
        report(args.out, result, table(result))  # after each run: a cut-off call keeps these


if __name__ == "__main__":
    main()
