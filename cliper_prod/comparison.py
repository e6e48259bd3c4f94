"""``cliper-prod compare``: every backbone trained on vanilla and on CLIPER features, several
seeds each, reported in the layout of the paper's Table 2 (R@K and N@K, mean over seeds, and the
relative improvement of CLIPER over vanilla).

Each run is selected on validation and ranks test once (``training.train_model``), so the table
never reflects a choice made on test. Figures mean what the features mean: with random-weight
CLIP (the built-in default) they test the plumbing, not CLIPER's semantic gain.
"""

from __future__ import annotations

import statistics
from pathlib import Path

import torch

from cliper_prod.device import CPU
from cliper_prod.config import load_config
from cliper_prod.data.mmrec import load_dataset
from cliper_prod.io import atomic_path, write_json, write_text
from cliper_prod.progress import progress_bar
from cliper_prod.training import train_model

VARIANTS = ("vanilla", "cliper")


def compare_backbones(data_dir: Path, features: dict[str, Path | None], *,
                      backbones: list[str], seeds: list[int], overrides: dict | None = None,
                      progress: bool = True, device: torch.device = CPU) -> dict:
    """Train backbone x variant x seed on ``device``; return per-run test metrics and their
    summaries."""
    datasets = {v: load_dataset(data_dir, features_dir=features[v]) for v in VARIANTS}
    runs = []
    jobs = [(b, v, s) for b in backbones for v in VARIANTS for s in seeds]
    for backbone, variant, seed in progress_bar(jobs, desc="compare", enabled=progress, unit="run"):
        config = load_config(backbone, overrides={**(overrides or {}),
                                                  "train": {**(overrides or {}).get("train", {}),
                                                            "seed": seed}})
        result = train_model(backbone, datasets[variant], config, progress=False, device=device)
        runs.append({"backbone": backbone, "features": variant, "seed": seed,
                     "best_epoch": result.best_epoch, "valid": result.valid,
                     "test": result.test})
    topk = load_config(backbones[0])["train"]["topk"]
    metrics = [f"{m}@{k}" for m in ("recall", "ndcg") for k in topk]
    summary = {}
    for backbone in backbones:
        row = {}
        for variant in VARIANTS:
            values = {m: [r["test"][m] for r in runs
                          if (r["backbone"], r["features"]) == (backbone, variant)]
                      for m in metrics}
            row[variant] = {m: {"mean": statistics.fmean(v),
                                "std": statistics.stdev(v) if len(v) > 1 else 0.0}
                            for m, v in values.items()}
        row["improvement"] = {m: _relative(row["cliper"][m]["mean"], row["vanilla"][m]["mean"])
                              for m in metrics}
        summary[backbone] = row
    return {"data": str(data_dir), "features": {k: str(v) if v else "data folder"
                                                for k, v in features.items()},
            "seeds": seeds, "metrics": metrics, "runs": runs, "summary": summary}


def _relative(new: float, base: float) -> float | None:
    return (new - base) / base if base else None


def table(result: dict) -> str:
    """Markdown in Table 2's layout: one block of rows per backbone."""
    metrics = result["metrics"]
    short = [m.replace("recall", "R").replace("ndcg", "N") for m in metrics]
    lines = ["| backbone | features | " + " | ".join(short) + " |",
             "|---|---|" + "---:|" * len(metrics)]
    for backbone, row in result["summary"].items():
        for variant, label in (("vanilla", "vanilla"), ("cliper", "+CLIPER")):
            cells = [f"{row[variant][m]['mean']:.4f} ± {row[variant][m]['std']:.4f}"
                     for m in metrics]
            lines.append(f"| {backbone} | {label} | " + " | ".join(cells) + " |")
        cells = ["n/a" if row["improvement"][m] is None else f"{row['improvement'][m]:+.1%}"
                 for m in metrics]
        lines.append(f"| {backbone} | improv. | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(f"Mean ± std over seeds {result['seeds']}; test metrics at the best validation "
                 f"epoch of each run.")
    return "\n".join(lines)


def bar_chart(result: dict, path: Path, metric: str = "recall@20") -> None:
    """Vanilla vs CLIPER bars (mean, std whiskers) per backbone."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(result["summary"])
    fig, ax = plt.subplots(figsize=(1.4 * len(names) + 2, 3.6))
    width = 0.38
    for offset, variant in ((-width / 2, "vanilla"), (width / 2, "cliper")):
        stats = [result["summary"][b][variant][metric] for b in names]
        ax.bar([i + offset for i in range(len(names))], [s["mean"] for s in stats], width,
               yerr=[s["std"] for s in stats], capsize=3,
               label="+CLIPER" if variant == "cliper" else variant)
    ax.set_xticks(range(len(names)), names)
    ax.set_ylabel(f"test {metric}")
    ax.legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)


def write_report(result: dict, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(out_dir / "compare.json", result)
    write_text(out_dir / "compare.md", table(result) + "\n")
    bar_chart(result, out_dir / "compare.png")
