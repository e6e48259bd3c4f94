"""Where training's memory goes: resident memory after and at its peak during each phase of
building a trainer and its first optimiser steps, beside the bytes of the tensors and arrays
that stay alive (data, sampler, graph, tables, gradients, optimiser state, ranking tasks).

    python benchmarks/profile_train_memory.py --data /tmp/scale/1m/scale1m --backbone lightgcn \
        --set train.steps_per_epoch=64 --set train.memory_lean=true --steps 2

A thread samples VmRSS and RssAnon of /proc/self/status every few milliseconds (tracemalloc does
not see torch's allocations), so a phase's peak is its highest sample: transient tables that
live for less than the interval can be missed. One JSON object on stdout.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np

GIB = 2**30


def _status_kib(*keys: str) -> dict[str, int]:
    with open("/proc/self/status") as fh:
        return {k: int(line.split()[1]) for line in fh for k in keys if line.startswith(k + ":")}


class RssSampler:
    """Resident memory sampled in a thread; the highest sample of the current phase."""

    def __init__(self, interval: float = 0.005) -> None:
        self.interval, self.peak, self.peak_anon = interval, 0, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            s = _status_kib("VmRSS", "RssAnon")
            self.peak = max(self.peak, s["VmRSS"])
            self.peak_anon = max(self.peak_anon, s["RssAnon"])
            time.sleep(self.interval)

    def reset(self) -> None:
        s = _status_kib("VmRSS", "RssAnon")
        self.peak, self.peak_anon = s["VmRSS"], s["RssAnon"]

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def nbytes(obj) -> int:
    """Bytes of the tensors and arrays in ``obj`` (nested dicts, lists, sparse tensors)."""
    import torch

    if isinstance(obj, torch.Tensor):
        if obj.layout == torch.sparse_csr:
            return sum(nbytes(t) for t in (obj.crow_indices(), obj.col_indices(), obj.values()))
        if obj.is_sparse:
            return nbytes(obj._indices()) + nbytes(obj._values())
        return obj.untyped_storage().nbytes()
    if isinstance(obj, np.ndarray):
        return obj.nbytes
    if isinstance(obj, dict):
        return sum(nbytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(nbytes(v) for v in obj)
    return 0


def propagation_bytes(model) -> dict[str, int]:
    """The model's fixed sparse graphs, each Propagation counted once (A and its cached A^T)."""
    from cliper_prod.graph import Propagation

    out, seen = {}, set()
    for name, value in vars(model).items():
        if isinstance(value, Propagation) and id(value) not in seen:
            seen.add(id(value))
            cached_t = 0 if value.adj_t is value.adj else nbytes(value.adj_t)
            out[name] = nbytes(value.adj) + cached_t
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--backbone", default="lightgcn")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="SECTION.KEY=VALUE")
    parser.add_argument("--steps", type=int, default=2, help="optimiser steps profiled")
    parser.add_argument("--eval-users", type=int, default=4096,
                        help="users ranked once after the steps (one score block)")
    args = parser.parse_args()

    from cliper_prod.commands.common import parse_overrides
    from cliper_prod.config import load_config
    from cliper_prod.data.mmrec import load_dataset
    from cliper_prod.training import Trainer, evaluate_model, lean_loading

    sampler = RssSampler()
    phases: list[dict] = []

    @contextmanager
    def phase(name: str):
        sampler.reset()
        start = time.perf_counter()
        yield
        now = _status_kib("VmRSS", "RssAnon")
        phases.append({"phase": name, "s": round(time.perf_counter() - start, 2),
                       "rss_after_gib": round(now["VmRSS"] / 2**20, 3),
                       "peak_gib": round(max(sampler.peak, now["VmRSS"]) / 2**20, 3),
                       "peak_anon_gib": round(max(sampler.peak_anon, now["RssAnon"]) / 2**20, 3)})
        print(phases[-1], file=sys.stderr, flush=True)

    config = load_config(args.backbone, overrides=parse_overrides(tuple(args.overrides)))
    lean = config["train"]["memory_lean"]
    with phase("load"):
        data = load_dataset(args.data, **lean_loading(args.backbone, lean))
    with phase("trainer build (model, graph, sampler, optimiser, ranking tasks)"):
        trainer = Trainer(args.backbone, data, config, progress=False)
    model = trainer.model
    with phase("pre_epoch"):
        model.train()
        model.pre_epoch(trainer.graph_rng)
    batches = trainer.sampler.epoch()
    for step in range(args.steps):
        with phase(f"step {step}"):
            trainer.train_step(*next(batches))
    with phase(f"evaluate {args.eval_users} users"):
        evaluate_model(model, trainer.full_valid_task.sample(args.eval_users, 0), trainer.settings)

    params = {n: p for n, p in model.named_parameters()}
    sizes = {
        "data splits (int pairs)": nbytes(data.splits),
        "data features": nbytes(data.features),
        "sampler arrays": nbytes([trainer.sampler.users, trainer.sampler.items,
                                  trainer.sampler._seen]),
        "model edge lists": nbytes([getattr(model, a) for a in ("train_users", "train_items")
                                    if hasattr(model, a)]),
        **{f"graph {k}": v for k, v in propagation_bytes(model).items()},
        "parameters": nbytes(list(params.values())),
        "optimiser state": nbytes([s for s in trainer.optimizer.state.values()]),
        "ranking tasks": nbytes([vars(t) for t in {id(t): t for t in (
            trainer.full_valid_task, trainer.valid_task)}.values()]),
    }
    sampler.stop()
    print(json.dumps({"backbone": args.backbone, "overrides": args.overrides,
                      "users": data.n_users, "items": data.n_items,
                      "train": len(data.train), "batch": trainer.sampler.batch_size,
                      "phases": phases,
                      "live_gib": {k: round(v / GIB, 3) for k, v in sizes.items()}}))


if __name__ == "__main__":
    main()
