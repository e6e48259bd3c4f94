"""BPR training with early stopping on the validation split only.

The test split is evaluated once, with the weights of the best validation epoch: model selection
never sees test (MMRec picks grid points on test, enoche/MMRec#64; this package does not).
"""

from __future__ import annotations

import copy
import json
import math
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from cliper_prod.backbones import Recommender, create_model
from cliper_prod.checkpoint import save_embeddings, save_model, save_torch
from cliper_prod.config import TrainSettings, build
from cliper_prod.data.mmrec import InteractionData
from cliper_prod.data.sampling import BPRSampler
from cliper_prod.errors import ConfigError, TrainingDiverged
from cliper_prod.evaluation import RankingTask, evaluate_ranking
from cliper_prod.io import write_json
from cliper_prod.plotting import plot_training_curve


STATE_DIR = ".train-state"


@dataclass
class FitResult:
    """A model at its best validation epoch; test has not been looked at."""

    model: Recommender
    best_epoch: int
    valid: dict[str, float]
    history: list[dict]
    config: dict


@dataclass
class TrainResult:
    best_epoch: int
    valid: dict[str, float]
    test: dict[str, float]
    history: list[dict]
    out_dir: Path | None
    config: dict
    grid: list[dict] | None = None  # every grid point's overrides and best valid metrics


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def ranking_tasks(data: InteractionData, mask_valid_in_test: bool = False
                  ) -> dict[str, RankingTask]:
    """Valid ranks with train items hidden; test likewise (MMRec), plus valid items if asked."""
    test_mask = [data.train, data.splits["valid"]] if mask_valid_in_test else [data.train]
    return {
        "valid": RankingTask.build(data.splits["valid"], [data.train], data.n_users, data.n_items),
        "test": RankingTask.build(data.splits["test"], test_mask, data.n_users, data.n_items),
    }


def evaluate_model(model: Recommender, task: RankingTask, settings: TrainSettings
                   ) -> dict[str, float]:
    users, items = model.embedding_tables()
    return evaluate_ranking(lambda u: users[u] @ items.T, task, settings.topk,
                            settings.eval_batch_size)


def _load_state(path: Path, config: dict) -> dict | None:
    if not path.exists():
        return None
    state = torch.load(path, map_location="cpu", weights_only=True)
    if state["config"] != config:
        raise ConfigError(f"{path}: the interrupted run had other settings; resume with the "
                          f"same options, or delete {path.parent} to start over")
    return state


def fit(backbone: str, data: InteractionData, config: dict, progress: bool = True,
        state_path: Path | None = None) -> FitResult:
    """Train ``backbone`` with early stopping on validation; return the best epoch's model.

    With ``state_path`` everything that decides the next epoch (weights, optimiser, random
    generators, history, early-stopping counters) is saved there atomically after each epoch,
    and a run that finds it continues after the last saved epoch with the same result as an
    uninterrupted one.
    """
    settings = build(TrainSettings, config["train"], "train")
    if max(settings.topk) > data.n_items:
        raise ConfigError(f"topk {list(settings.topk)} asks for more items than the dataset has "
                          f"({data.n_items})")
    seed_everything(settings.seed)
    model = create_model(backbone, data, config["model"])
    optimizer = torch.optim.Adam(model.parameters(), lr=settings.learning_rate,
                                 weight_decay=settings.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda e: settings.lr_decay ** (e / settings.lr_decay_epochs))
    rng = np.random.default_rng(settings.seed)
    graph_rng = torch.Generator().manual_seed(settings.seed)
    sampler = BPRSampler(data.train, data.n_items, settings.batch_size, rng)
    valid_task = ranking_tasks(data)["valid"]

    history: list[dict] = []
    best_value, best_epoch, best_state, stale, first, finished = -math.inf, -1, None, 0, 0, False
    saved = _load_state(state_path, config) if state_path else None
    if saved is not None:
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        rng.bit_generator.state = json.loads(saved["sampler_rng"])
        graph_rng.set_state(saved["graph_rng"])
        torch.set_rng_state(saved["torch_rng"])
        history, best_state = saved["history"], saved["best_state"]
        best_value, best_epoch, stale = saved["best_value"], saved["best_epoch"], saved["stale"]
        first, finished = saved["epoch"] + 1, saved["finished"]
        if progress:
            tqdm.write(f"resuming after epoch {saved['epoch']} ({state_path})")
    for epoch in range(first, 0 if finished else settings.epochs):
        start = time.perf_counter()
        model.train()
        model.pre_epoch(graph_rng)
        total = 0.0
        bar = tqdm(sampler.epoch(), total=len(sampler), desc=f"epoch {epoch}", leave=False,
                   disable=not progress, unit="batch")
        for users, pos, neg in bar:
            optimizer.zero_grad(set_to_none=True)
            loss = model.loss(users, pos, neg)
            loss.backward()
            optimizer.step()
            total += loss.item()
            bar.set_postfix(loss=f"{loss.item():.4f}")
        scheduler.step()
        mean_loss = total / len(sampler)
        if not math.isfinite(mean_loss):
            raise TrainingDiverged(f"training loss became {mean_loss} at epoch {epoch}; lower the "
                                   f"learning rate")
        train_s = time.perf_counter() - start
        valid = evaluate_model(model, valid_task, settings)
        record = {"epoch": epoch, "loss": mean_loss, "train_s": train_s,
                  "eval_s": time.perf_counter() - start - train_s, "valid": valid}
        history.append(record)
        value = valid[settings.valid_metric]
        improved = value > best_value
        if improved:
            best_value, best_epoch, stale = value, epoch, 0
            best_state = copy.deepcopy(model.state_dict())
        else:
            stale += 1
        if progress:
            tqdm.write(f"epoch {epoch:4d}  loss {mean_loss:.4f}  valid {settings.valid_metric} "
                       f"{value:.4f}{'  *' if improved else ''}  ({train_s:.1f}s + "
                       f"{record['eval_s']:.1f}s)")
        finished = stale > settings.patience or epoch == settings.epochs - 1
        if state_path is not None:
            save_torch(state_path, {
                "config": config, "epoch": epoch, "finished": finished,
                "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "sampler_rng": json.dumps(rng.bit_generator.state),
                "graph_rng": graph_rng.get_state(), "torch_rng": torch.get_rng_state(),
                "history": history, "best_state": best_state, "best_value": best_value,
                "best_epoch": best_epoch, "stale": stale})
        if finished:
            break

    model.load_state_dict(best_state)
    return FitResult(model, best_epoch, history[best_epoch]["valid"], history, config)


def grid_points(grid: dict[str, list]) -> list[dict[str, dict]]:
    """Every combination of ``{"model.reg_weight": [0, 1e-4], ...}`` as config overrides."""
    points: list[dict[str, dict]] = [{}]
    for key, values in grid.items():
        section, _, name = key.partition(".")
        points = [{**p, section: {**p.get(section, {}), name: v}} for p in points for v in values]
    return points


def train_model(backbone: str, data: InteractionData, config: dict, out_dir: Path | None = None,
                progress: bool = True, mask_valid_in_test: bool = False,
                grid: dict[str, list] | None = None, resume: bool = False) -> TrainResult:
    """Train ``backbone`` (each grid point, if any), select on validation only, then rank test
    once with the selected model and write the checkpoint folder.

    With ``out_dir``, per-epoch state goes to ``out_dir/.train-state/`` until the outputs are
    written; ``resume`` continues from it after an interruption.
    """
    state_dir = out_dir / STATE_DIR if out_dir is not None else None
    if state_dir is not None:
        if state_dir.exists() and not resume:
            raise ConfigError(f"{state_dir}: an interrupted training run left its state here; "
                              f"pass --resume to continue it, or delete the folder to start "
                              f"over")
        state_dir.mkdir(parents=True, exist_ok=True)
    best: FitResult | None = None
    summary = []
    for index, point in enumerate(grid_points(grid or {})):
        cfg = {s: {**config[s], **point.get(s, {})} for s in config}
        result = fit(backbone, data, cfg, progress,
                     state_dir / f"point-{index}.pt" if state_dir else None)
        metric = cfg["train"]["valid_metric"]
        summary.append({"overrides": point, "best_epoch": result.best_epoch,
                        "valid": result.valid})
        if progress and grid:
            tqdm.write(f"grid point {point}: valid {metric} {result.valid[metric]:.4f}")
        if best is None or result.valid[metric] > best.valid[metric]:
            best = result
    assert best is not None
    settings = build(TrainSettings, best.config["train"], "train")
    test = evaluate_model(best.model, ranking_tasks(data, mask_valid_in_test)["test"], settings)
    result = TrainResult(best.best_epoch, best.valid, test, best.history, out_dir, best.config,
                         summary if grid else None)
    if out_dir is not None:
        write_outputs(out_dir, backbone, best.config, data, best.model, result, settings)
        shutil.rmtree(state_dir)
    return result


def write_outputs(out_dir: Path, backbone: str, config: dict, data: InteractionData,
                  model: Recommender, result: TrainResult, settings: TrainSettings) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    save_model(out_dir, backbone, config, data, model.state_dict())
    save_embeddings(out_dir, model)
    write_json(out_dir / "history.json", result.history)
    write_json(out_dir / "metrics.json", {
        "backbone": backbone, "dataset": data.name, "best_epoch": result.best_epoch,
        "epochs_run": len(result.history), "valid_metric": settings.valid_metric,
        "valid": result.valid, "test": result.test, "config": config,
        "dropped_cold_interactions": data.dropped_cold, "grid": result.grid})
    plot_training_curve(result.history, settings.valid_metric, result.best_epoch,
                        out_dir / "training_curve.png")
