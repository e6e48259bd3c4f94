"""How each stage's cost grows with the catalog: synthetic MMRec datasets at up to four sizes,
every stage timed in its own process (peak RSS per stage), MMRec's FREEDOM beside them where
it runs, a log-log plot with the fitted growth exponents and a table.

    python benchmarks/bench_scale.py --sizes 20k 200k 1m 5m --work /tmp/scale \
        --mmrec-cmd "/work/mmrec-venv/bin/python /work/mmrec/time_freedom.py"

Data (seeded, `generate`): user activity and item popularity are Zipf-like (exponents 0.7 and
0.9, at least 3 interactions per user, every item at least once), three heavy users hold 50k+
distinct items each (half the catalog at the smallest size), splits are random 80/10/10 per
interaction; image 512-d and text 384-d float32 features are cluster centres plus noise (the
same 512 clusters for both). Stages: load + validate; the item kNN graph (faiss-hnsw, and exact
where the catalog has at most 100k items); FREEDOM and LightGCN model build + one epoch of
``steps_per_epoch`` steps (``--steps``); a full evaluation (valid split, all users, or a sample
with the full time extrapolated where ``--eval-users`` caps it); ``export_tables`` of the
LightGCN tables; ``cliper-prod topk`` for 100k users. ``--lean`` adds the training stages again
with ``train.memory_lean`` (``freedom_lean``, ``lightgcn_lean``), each in its own process too,
so their peak RSS compares with the plain stages'. Each result is one run.

On a GPU (``--device cuda``) the model, its graphs, the epoch and the evaluation run there and
each training stage also reports its peak GPU memory; the data is generated on the machine
itself (``--work`` on its disk), so nothing large is carried to it:

    python benchmarks/bench_scale.py --device cuda --sizes 1m 5m --work /tmp/scale --lean \
        --eval-users 10000000 --out benchmarks/results/scale_cuda

(``benchmarks/gpu_scale.sh`` runs the stages issue 36 asks for within one call's time.) There
FREEDOM's item graph is exact, built on the GPU.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from _report import MEASURED_CLI, child_peak_rss_gib, peak_rss_gib, report

SIZES = {  # name -> users, items, interactions
    "20k": (20_000, 10_000, 200_000),
    "200k": (200_000, 100_000, 2_000_000),
    "1m": (1_000_000, 300_000, 10_000_000),
    "5m": (5_000_000, 1_000_000, 50_000_000),
}
EXACT_KNN_MAX_ITEMS = 100_000  # beyond, exact O(n^2 d) kNN takes hours here
HERE = Path(__file__).resolve().parent


def generate(folder: Path, users: int, items: int, interactions: int, seed: int = 0) -> dict:
    """Write ``folder/<name>.inter`` and the feature files; the counts actually written."""
    rng = np.random.default_rng(seed)
    heavy = [min(50_000 + 5_000 * j, items // 2) for j in range(3)]
    weights = np.arange(1, users + 1, dtype=np.float64) ** -0.7
    rng.shuffle(weights)
    counts = np.maximum(3, np.floor(weights / weights.sum() * (interactions - sum(heavy))))
    popularity = np.cumsum(np.arange(1, items + 1, dtype=np.float64) ** -0.9)
    item_order = rng.permutation(items)
    drawn = item_order[np.minimum(np.searchsorted(popularity, rng.random(int(counts.sum()))
                                                  * popularity[-1]), items - 1)]
    parts = [np.stack([np.repeat(np.arange(users), counts.astype(np.int64)), drawn], 1),
             np.stack([rng.integers(0, users, items), np.arange(items)], 1)]  # every item once
    heavy_users = rng.choice(users, 3, replace=False)
    parts += [np.stack([np.full(h, u), rng.choice(items, h, replace=False)], 1)
              for u, h in zip(heavy_users, heavy)]
    pairs = np.concatenate(parts)
    keys = np.unique(pairs[:, 0] * items + pairs[:, 1])
    pairs = np.stack([keys // items, keys % items], 1)
    labels = rng.choice(3, len(pairs), p=[0.8, 0.1, 0.1])
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / f"{folder.name}.inter", "w") as fh:
        fh.write("userID\titemID\tx_label\n")
        for start in range(0, len(pairs), 1_000_000):
            block = np.concatenate([pairs[start:start + 1_000_000],
                                    labels[start:start + 1_000_000, None]], 1)
            np.savetxt(fh, block, fmt="%d", delimiter="\t")
    clusters = rng.integers(0, 512, items)
    for name, dim in (("image_feat.npy", 512), ("text_feat.npy", 384)):
        centres = rng.standard_normal((512, dim), dtype=np.float32)
        feat = rng.standard_normal((items, dim), dtype=np.float32)
        feat *= 0.7
        feat += centres[clusters]
        np.save(folder / name, feat)
        del feat
    per_user = np.bincount(pairs[:, 0], minlength=users)
    return {"users": users, "items": items, "interactions": int(len(pairs)),
            "train": int((labels == 0).sum()), "max_user_interactions": int(per_user.max()),
            "heavy_users": heavy_users.tolist()}


def stage(name: str, data_dir: Path, work: Path, steps: int, eval_users: int,
          device_name: str = "cpu") -> dict:
    """Run one stage in this process on ``device_name``; its figures (seconds measured after
    the device finished)."""
    import torch

    device = torch.device(device_name)

    def clock() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter()

    from cliper_prod.config import load_config
    from cliper_prod.data.mmrec import load_dataset

    from cliper_prod.training import lean_loading

    torch.set_grad_enabled(name not in ("item_graph", "topk"))
    backbone, _, variant = name.partition("_")  # "lightgcn_lean": memory_lean on
    start = time.perf_counter()
    data = load_dataset(data_dir, **(lean_loading(backbone, variant == "lean")
                                     if backbone in ("freedom", "lightgcn") else {}))
    out: dict = {"load_s": time.perf_counter() - start}
    if name == "load":
        return out
    if name == "item_graph":
        from cliper_prod.graph import knn_normalized_adjacency
        from cliper_prod.item_knn import knn_neighbours, sampled_recall

        methods = ["faiss-hnsw"] + (["exact"] if data.n_items <= EXACT_KNN_MAX_ITEMS else [])
        for method in methods:
            start = time.perf_counter()
            for feat in data.features.values():
                knn_normalized_adjacency(torch.from_numpy(feat), 10, method)
            out[f"{method}_s"] = time.perf_counter() - start
        normed = torch.nn.functional.normalize(torch.from_numpy(data.features["image"]), dim=1)
        out["hnsw_recall@10_image"] = sampled_recall(normed, knn_neighbours(
            torch.from_numpy(data.features["image"]), 10, "faiss-hnsw"), 10)
        return out
    if backbone in ("freedom", "lightgcn", "tables"):
        from cliper_prod.training import Trainer, evaluate_model, ranking_tasks

        backbone = "lightgcn" if backbone == "tables" else backbone
        # the item graph: approximate on a CPU (exact takes hours at a million items), exact
        # on a GPU (brute force there takes seconds, and faiss runs on the CPU only)
        knn = "exact" if device.type == "cuda" else "faiss-hnsw"
        model = {"knn_method": knn} if backbone == "freedom" else {}
        config = load_config(backbone, overrides={"train": {
            "steps_per_epoch": steps, "memory_lean": variant == "lean"}, "model": model})
        start = clock()
        trainer = Trainer(backbone, data, config, progress=False, device=device)
        out["init_s"] = clock() - start
        if variant == "lean" and data.features and not trainer.model.features:
            data.features.clear()  # FREEDOM at reg_weight 0 reads them only for its item graph
            out["features_released_after_build"] = True
        print(f"built {backbone} in {out['init_s']:.0f} s, RSS {peak_rss_gib()} GiB", file=sys.stderr,
              flush=True)
        if name != "tables":  # "tables": the untrained model's tables, for eval/export/topk
            start, cpu = clock(), time.process_time()
            trainer.train_epoch(0)
            out["epoch_s"], out["epoch_cpu_s"] = clock() - start, time.process_time() - cpu
            out["batch"] = trainer.sampler.batch_size
            if device.type == "cuda":
                out["epoch_peak_gpu_gib"] = torch.cuda.max_memory_allocated() / 2**30
        if backbone == "freedom":
            return out
        task = ranking_tasks(data)["valid"]
        full = len(task.users)
        if full > eval_users:
            keep = np.random.default_rng(0).choice(task.users, eval_users, replace=False)
            from cliper_prod.evaluation import RankingTask

            valid = data.splits["valid"]
            task = RankingTask.build(valid[np.isin(valid[:, 0], keep)], [data.train],
                                     data.n_users, data.n_items)
        with torch.no_grad():
            start = clock()
            evaluate_model(trainer.model, task, trainer.settings)
            took = clock() - start
        out.update(eval_s=took * full / len(task.users), eval_users=len(task.users),
                   eval_users_total=full, eval_extrapolated=len(task.users) < full)
        if device.type == "cuda":
            out["peak_gpu_gib"] = torch.cuda.max_memory_allocated() / 2**30
        from cliper_prod.export.bundle_writer import EmbeddingTables, GraphOptions, export_tables

        users, items = trainer.model.embedding_tables()
        bundle = work / "bundle"
        start = time.perf_counter()
        export_tables(EmbeddingTables(users.cpu(), items.cpu(), data.train), bundle,
                      backbone="lightgcn",
                      dataset=data.name, options=GraphOptions(torchscript=False, fp16=False,
                                                              fused=False))
        out["export_s"] = time.perf_counter() - start
        out["bundle_gb"] = sum(p.stat().st_size for p in bundle.iterdir()) / 1e9
        return out
    raise SystemExit(f"unknown stage {name}")


def topk_stage(work: Path, n_users: int, provider: str = "cpu") -> dict:
    """`cliper-prod topk` on ``n_users`` users of the stage's bundle, its own peak RSS."""
    ids = (work / "bundle" / "user_ids.txt").read_text().split()
    chosen = np.random.default_rng(0).choice(len(ids), min(n_users, len(ids)), replace=False)
    users_file = work / "topk_users.txt"
    users_file.write_text("".join(f"{ids[u]}\n" for u in chosen))
    cmd = [sys.executable, *MEASURED_CLI,
           "topk", "--users", str(users_file), "--bundle", str(work / "bundle"), "-k", "20",
           "--out", str(work / "topk.jsonl"), "--provider", provider]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode:
        return {"error": proc.stderr[-500:]}
    rss = child_peak_rss_gib(proc.stderr)
    return {"topk_s": wall, "topk_users": len(chosen), "users_per_s": len(chosen) / wall,
            "peak_rss_gib": rss}


def run_child(args: list[str]) -> dict:
    path = os.pathsep.join([str(HERE), str(HERE.parent), os.environ.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, str(Path(__file__)), *args], capture_output=True,
                          text=True, cwd=HERE.parent, env={**os.environ, "PYTHONPATH": path})
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return {"error": f"exit {proc.returncode}: " + " | ".join(tail)[-600:]}
    return json.loads(lines[-1])


def mmrec(cmd: str, data_dir: Path) -> dict:
    proc = subprocess.run([*shlex.split(cmd), "--data", str(data_dir.resolve()), "--epochs", "1"],
                          capture_output=True, text=True, cwd="/tmp")  # not beside our models/
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    return json.loads(lines[-1]) if lines else {"ok": False, "error": proc.stderr[-500:]}


def fit_exponent(x: list[float], y: list[float]) -> float | None:
    """Slope of log y against log x (least squares); None with fewer than two points."""
    pairs = [(math.log(a), math.log(b)) for a, b in zip(x, y) if b and b > 0]
    if len(pairs) < 2:
        return None
    lx, ly = np.array(pairs).T
    return float(np.polyfit(lx, ly, 1)[0])


STAGES = [  # table row, (stage, key) of its figure; "tables" stands in where training failed
    ("load", ("load", "load_s")),
    ("item graph hnsw", ("item_graph", "faiss-hnsw_s")),
    ("item graph exact", ("item_graph", "exact_s")),
    ("FREEDOM build", ("freedom", "init_s")),
    ("FREEDOM epoch", ("freedom", "epoch_s")),
    ("FREEDOM epoch, memory_lean", ("freedom_lean", "epoch_s")),
    ("LightGCN epoch", ("lightgcn", "epoch_s")),
    ("LightGCN epoch, memory_lean", ("lightgcn_lean", "epoch_s")),
    ("evaluation", ("lightgcn", "eval_s")),
    ("evaluation, memory_lean", ("lightgcn_lean", "eval_s")),
    ("export", ("lightgcn", "export_s")),
    ("topk, 100k users (all at 20k)", ("topk", "topk_s")),
]
UNTRAINED = "tables"
#: stages in the order they run; the ``_lean`` ones only with ``--lean``
STAGE_ORDER = ("load", "item_graph", "freedom", "freedom_lean", "lightgcn", "lightgcn_lean",
               "tables", "topk")


def figure(stages: dict, stage_name: str, key: str) -> tuple[float | None, str]:
    """A stage's figure and its table note: * extrapolated from sampled users, + from the
    untrained tables (training failed), an error kind where it failed."""
    res = stages.get(stage_name, {})
    if key not in res and key in stages.get(UNTRAINED, {}) and stage_name == "lightgcn":
        res, note = stages[UNTRAINED], "+"
    else:
        note = ""
    if key in res:
        return res[key], note + ("*" if key == "eval_s" and res.get("eval_extrapolated") else "")
    error = res.get("error")
    if error is None:
        return None, "-"
    return None, "killed (out of memory)" if error.startswith("exit -9") else "error"


def table(results: dict) -> str:
    names = [n for n in SIZES if n in results]  # the JSON keeps its keys sorted
    head = "| stage (s) | " + " | ".join(names) + " | exponent |"
    lines = [head, "|---" * (len(names) + 2) + "|"]
    size = [results[n]["data"]["interactions"] for n in names]
    for label, (st, key) in STAGES:
        found = [figure(results[n]["stages"], st, key) for n in names]
        exp = fit_exponent(size, [v for v, _ in found])
        cells = [note if v is None else f"{v:,.1f}{note}" for v, note in found]
        fitted = "-" if exp is None else f"{exp:.2f}"
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {fitted} |")
    rows = {
        "users x items x interactions": [
            f"{d['users']:,} x {d['items']:,} x {d['interactions']:,}"
            for d in (results[n]["data"] for n in names)],
        "bundle (GB)": [f"{_bundle_gb(results[n]['stages']):.2f}" for n in names],
        "topk users/s": [f"{results[n]['stages'].get('topk', {}).get('users_per_s', 0):,.0f}"
                         for n in names],
        "peak RSS (GiB), max stage": [
            f"{max(s.get('peak_rss_gib', 0) for s in results[n]['stages'].values()):.1f}"
            for n in names],
        "MMRec FREEDOM": [_mmrec_cell(results[n].get("mmrec"), results[n]["data"]["items"])
                          for n in names],
    }
    for st in STAGE_ORDER:  # each stage's own process: its peak RSS (and GPU memory)
        for key, label in (("peak_rss_gib", "peak RSS (GiB)"), ("peak_gpu_gib", "peak GPU (GiB)")):
            cells = [results[n]["stages"].get(st, {}).get(key) for n in names]
            if any(c is not None for c in cells):
                rows[f"{label}: {st}"] = ["-" if c is None else f"{c:.2f}" for c in cells]
    for label, cells in rows.items():
        lines.append(f"| {label} | " + " | ".join(cells) + " | |")
    return "\n".join(lines)


def _bundle_gb(stages: dict) -> float:
    return max(stages.get(st, {}).get("bundle_gb", 0) for st in ("lightgcn", "tables"))


def _mmrec_cell(res: dict | None, items: int) -> str:
    if res is None:  # past --mmrec-max-items
        return f"not run: its dense item-item similarity would be {items ** 2 * 4 / 1e9:,.0f} GB"
    if res.get("ok"):
        return f"epoch {res['train_epoch_s']:.1f} s, eval {res['eval_s']:.1f} s"
    asked = re.search(r"allocate (\d+) bytes", res.get("error", ""))
    if asked:
        return (f"fails at {res.get('stage', '?')}: {int(asked.group(1)) / 1e9:.1f} GB asked "
                f"(items^2 x 4 B: its dense item-item similarity)")
    return f"fails at {res.get('stage', '?')}: {res.get('error', '')[:90]}"


def _gpu_name(device: str) -> str | None:
    if device != "cuda":
        return None
    import torch

    return torch.cuda.get_device_name(0)


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n in SIZES if n in results]  # the JSON keeps its keys sorted
    size = [results[n]["data"]["interactions"] for n in names]
    fig, ax = plt.subplots(figsize=(7.5, 5))
    for label, (st, key) in STAGES:
        pts = [(s, figure(results[n]["stages"], st, key)[0]) for s, n in zip(size, names)]
        pts = [(s, v) for s, v in pts if v]
        if len(pts) < 1:
            continue
        exp = fit_exponent(*zip(*pts)) if len(pts) > 1 else None
        ax.plot(*zip(*pts), marker="o",
                label=f"{label} (x^{exp:.2f})" if exp is not None else label)
    ax.set(xscale="log", yscale="log", xlabel="interactions", ylabel="seconds",
           title="cliper-prod stage cost vs catalog size (2-core CPU, one run each)")
    ax.legend(fontsize=7)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    parser.add_argument("--work", type=Path, default=Path("/tmp/scale"))
    parser.add_argument("--steps", type=int, default=64, help="train.steps_per_epoch")
    parser.add_argument("--eval-users", type=int, default=1_000_000)
    parser.add_argument("--topk-users", type=int, default=100_000)
    parser.add_argument("--skip", nargs="*", default=[], help="stages not to run, per size: "
                        "SIZE:STAGE (e.g. 5m:freedom); a stage measured by an earlier run "
                        "(same --out) is kept")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                        help="where training, evaluation and top-K run")
    parser.add_argument("--lean", action="store_true",
                        help="also run the training stages with train.memory_lean")
    parser.add_argument("--mmrec-cmd", help="prints MMRec's FREEDOM timing as JSON")
    parser.add_argument("--mmrec-max-items", type=int, default=150_000)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/scale_cpu"))
    parser.add_argument("--stage", help=argparse.SUPPRESS)
    parser.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.stage:  # child: one stage, one JSON line
        res = stage(args.stage, args.data, args.work, args.steps, args.eval_users, args.device)
        print(json.dumps({**res, "peak_rss_gib": peak_rss_gib()}))
        return
    previous = args.out.with_suffix(".json")
    results = json.loads(previous.read_text())["sizes"] if previous.exists() else {}
    for name in args.sizes:
        users, items, inter = SIZES[name]
        work = args.work / name
        data_dir = work / f"scale{name}"
        made = data_dir / "generated.json"  # a later run (other stages) reuses the data
        if made.exists():
            info = json.loads(made.read_text())
        else:
            start = time.perf_counter()
            info = generate(data_dir, users, items, inter)
            info["generate_s"] = time.perf_counter() - start
            made.write_text(json.dumps(info))
        print(f"[{name}] data {info}", flush=True)
        entry = {"data": info, "stages": dict(results.get(name, {}).get("stages", {}))}
        for st in STAGE_ORDER:
            if f"{name}:{st}" in args.skip or (st.endswith("_lean") and not args.lean):
                continue
            if st == "tables" and "error" not in entry["stages"].get("lightgcn", {"error": 1}):
                continue  # only where training failed: export and top-K still get measured
            if st == "topk":
                res = topk_stage(work, args.topk_users, args.device) \
                    if (work / "bundle").exists() else \
                    {"error": "no bundle"}
            else:
                res = run_child(["--stage", st, "--data", str(data_dir), "--work", str(work),
                                 "--steps", str(args.steps), "--eval-users",
                                 str(args.eval_users), "--device", args.device])
            entry["stages"][st] = res
            print(f"[{name}] {st}: {res}", flush=True)
        if args.mmrec_cmd and items <= args.mmrec_max_items:
            entry["mmrec"] = mmrec(args.mmrec_cmd, data_dir)
            print(f"[{name}] mmrec: {entry['mmrec']}", flush=True)
        elif "mmrec" in results.get(name, {}):
            entry["mmrec"] = results[name]["mmrec"]
        results[name] = entry
        ordered = {n: results[n] for n in SIZES if n in results}
        result = {"machine": f"{platform.machine()}, {os.cpu_count()} CPUs, "
                             f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB",
                  "command": " ".join(["python", *sys.argv]), "steps_per_epoch": args.steps,
                  "device": args.device, "gpu": _gpu_name(args.device),
                  "sizes": ordered}
        report(args.out, result, table(ordered))
        plot(ordered, args.out.with_suffix(".png"))


if __name__ == "__main__":
    main()
