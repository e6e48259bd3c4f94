"""BPR training with early stopping on the validation split only.

The test split is evaluated once, with the weights of the best validation epoch: model selection
never sees test (MMRec picks grid points on test, enoche/MMRec#64; this package does not).

:func:`fit` runs a :class:`Trainer`, which builds the model, optimiser, scheduler, random
generators and sampler from the config, then per epoch trains (:meth:`Trainer.train_epoch`),
validates (:meth:`Trainer.valid_epoch`), applies early stopping (:meth:`TrainState.end_epoch`)
and, when asked, saves everything the next epoch depends on (:meth:`Trainer.save`), so that an
interrupted run resumes (:meth:`Trainer.restore`) to the uninterrupted run's result.

Everything runs on one torch device: the model and its graphs (built there), each batch (moved
there) and the ranking. The weights start from the CPU generator on every device; the sampler
draws with numpy and the graph generator lives on the device (FREEDOM's pruning and DualGNN's
user graph sample there), so CPU runs are those of a build without devices.
"""

from __future__ import annotations

import copy
import ctypes
import json
import logging
import math
import random
import shutil
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from cliper_prod.device import CPU
from cliper_prod.backbones import Backbone, create_model, model_class
from cliper_prod.backbones.base import LOSS_CHUNK, chunks
from cliper_prod.checkpoint import save_embeddings, save_model, save_torch
from cliper_prod.config import LR_SCALING, TrainSettings, build
from cliper_prod.data.mmrec import InteractionData
from cliper_prod.data.sampling import BPRSampler
from cliper_prod.errors import ConfigError, TrainingDiverged
from cliper_prod.evaluation import RankingTask, evaluate_ranking
from cliper_prod.io import write_json
from cliper_prod.plotting import plot_training_curve
from cliper_prod.progress import progress_bar

log = logging.getLogger(__name__)

STATE_DIR = ".train-state"


@dataclass
class FitResult:
    """A model at its best validation epoch; test has not been looked at."""

    model: Backbone
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


@dataclass
class TrainState:
    """What decides the next epoch besides the weights, the optimiser and the random generators.

    The fields are saved under their own names after every epoch (:meth:`to_saved`), so that
    :meth:`from_saved` continues an interrupted run exactly where it stopped.
    """

    #: one record per finished epoch: epoch, loss, train_s, eval_s and the valid metrics
    history: list[dict] = field(default_factory=list)
    #: the best value of the validation metric so far; improving on it resets ``stale``
    best_value: float = -math.inf
    #: the first epoch that reached ``best_value``; -1 before the first epoch
    best_epoch: int = -1
    #: the weights after ``best_epoch``: what the run returns
    best_state: dict[str, torch.Tensor] | None = None
    #: epochs since the last improvement; more than ``patience`` of them stop the run
    stale: int = 0
    #: the last finished epoch; the next one to run is ``epoch + 1`` (-1: none ran yet)
    epoch: int = -1
    #: early stopping or the last epoch ended the run: no epoch is left to run
    finished: bool = False

    def end_epoch(self, record: dict, model: Backbone, settings: TrainSettings) -> bool:
        """Record a finished epoch and apply early stopping; True when it is a new best."""
        self.history.append(record)
        self.epoch = record["epoch"]
        value = record["valid"][settings.valid_metric]
        improved = value > self.best_value
        if improved:
            self.best_value, self.best_epoch, self.stale = value, self.epoch, 0
            self.best_state = copy.deepcopy(model.state_dict())
        else:
            self.stale += 1
        self.finished = self.stale > settings.patience or self.epoch == settings.epochs - 1
        return improved

    def to_saved(self) -> dict:
        """The fields as the state file holds them, next to the weights and generators."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_saved(cls, saved: dict) -> TrainState:
        """The state that :meth:`to_saved` wrote into ``saved``."""
        return cls(**{f.name: saved[f.name] for f in fields(cls)})


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def trim_heap() -> None:
    """Hand the C heap's freed pages back to the system (glibc's ``malloc_trim``): building a
    graph of tens of millions of edges leaves gigabytes freed but still resident. A no-op
    where the C library has none."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def lean_loading(backbone: str, memory_lean: bool) -> dict:
    """:func:`~cliper_prod.data.mmrec.load_dataset`'s options for a run: a memory-lean run of a
    backbone that reads no features loads none (gigabytes at a million items)."""
    return {"feature_files": {}} if memory_lean and not model_class(backbone).reads_features \
        else {}


def ranking_tasks(data: InteractionData, mask_valid_in_test: bool = False
                  ) -> dict[str, RankingTask]:
    """Valid ranks with train items hidden; test likewise (MMRec), plus valid items if asked."""
    test_mask = [data.train, data.splits["valid"]] if mask_valid_in_test else [data.train]
    return {
        "valid": RankingTask.build(data.splits["valid"], [data.train], data.n_users, data.n_items),
        "test": RankingTask.build(data.splits["test"], test_mask, data.n_users, data.n_items),
    }


def learning_rate_factor(settings: TrainSettings, batch: int, epoch_steps: int
                         ) -> Callable[[int], float]:
    """The factor of ``learning_rate`` at each optimiser step (0-based), for a run of ``batch``
    triples per step and ``epoch_steps`` steps per epoch: (batch / batch_size) ** p of
    ``lr_scaling``, times the linear warm-up (s + 1) / lr_warmup_steps while it lasts, times
    MMRec's per-epoch decay. The defaults give exactly 1.0 (times the decay), so default runs
    keep their rates bit for bit."""
    scale = (batch / settings.batch_size) ** LR_SCALING[settings.lr_scaling]
    warmup = settings.lr_warmup_steps

    def factor(step: int) -> float:
        warm = min(1.0, (step + 1) / warmup) if warmup else 1.0
        decay = settings.lr_decay ** (step // epoch_steps / settings.lr_decay_epochs)
        return scale * warm * decay

    return factor


def chunked_backward(model: Backbone, users: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor,
                     chunk: int = LOSS_CHUNK) -> float:
    """Back-propagate the batch loss ``chunk`` triples at a time; its value.

    The propagated tables are built once without a graph (autograd would keep its
    temporaries). Each chunk's rows of them are leaves of the chunk's loss, whose gradients are
    added into one [nodes, d] buffer; that buffer then goes back through the propagation by
    hand (:meth:`~Backbone.backward_tables`). The gradients equal the whole batch's up to
    rounding, with a chunk's rows alive at a time instead of the whole batch's (gigabytes at
    millions of triples per step) and three [nodes, d] tables at the step's peak."""
    with torch.no_grad():
        user_table, item_table = model.train_tables()
    n_users = len(user_table)
    grad = user_table.new_zeros(n_users + len(item_table), user_table.shape[1])
    context = model.batch_context(users, pos, neg)
    total = 0.0
    for part in chunks(len(users), chunk):
        ids = ((users[part], user_table, grad[:n_users]), (pos[part], item_table, grad[n_users:]),
               (neg[part], item_table, grad[n_users:]))
        rows = tuple(table[i].requires_grad_() for i, table, _ in ids)
        loss = model.chunk_loss(rows, users[part], pos[part], neg[part], len(users), context)
        loss.backward()
        for (i, _, out), row in zip(ids, rows):
            out.index_add_(0, i, row.grad)
        total += loss.item()
    del user_table, item_table, ids, rows, loss  # the tables: their values are no longer needed
    model.backward_tables(grad, context)
    return total


def evaluate_model(model: Backbone, task: RankingTask, settings: TrainSettings
                   ) -> dict[str, float]:
    """Rank with the model's tables on the device they are on."""
    users, items = model.embedding_tables()
    return evaluate_ranking(users, items, task, settings.topk, settings.eval_batch_size)


def _load_state(path: Path, config: dict, device: torch.device) -> dict | None:
    """The state saved at ``path`` with its tensors on the CPU whatever device wrote it, None
    without one; a state of other settings, or of another kind of device (whose generators
    cannot continue here), is refused."""
    if not path.exists():
        return None
    state = torch.load(path, map_location="cpu", weights_only=True)
    if state["config"] != config:
        raise ConfigError(f"{path}: the interrupted run had other settings; resume with the "
                          f"same options, or delete {path.parent} to start over")
    saved_on = state.get("device", "cpu")  # states written before --device were all CPU
    if saved_on != device.type:
        raise ConfigError(f"{path}: the interrupted run trained on {saved_on}; resume it with "
                          f"--device {saved_on}, or delete {path.parent} to start over on "
                          f"{device.type}")
    return state


def _epoch_line(record: dict, metric: str, improved: bool) -> str:
    """The one line logged per epoch; ``*`` marks a new best."""
    return (f"epoch {record['epoch']:4d}  loss {record['loss']:.4f}  valid {metric} "
            f"{record['valid'][metric]:.4f}{'  *' if improved else ''}  "
            f"({record['train_s']:.1f}s + {record['eval_s']:.1f}s)")


class Trainer:
    """One backbone trained on one config: the objects built from it and the steps of an epoch.

    Every random draw (torch's global generators, the sampler's and the graph generator) happens
    in the same order in an uninterrupted and in a resumed run; keep it so when changing a step.
    """

    def __init__(self, backbone: str, data: InteractionData, config: dict,
                 progress: bool = True, device: torch.device = CPU) -> None:
        """Build the model (on ``device``), optimiser, scheduler, generators and sampler, seeded
        first."""
        settings = build(TrainSettings, config["train"], "train")
        if max(settings.topk) > data.n_items:
            raise ConfigError(f"topk {list(settings.topk)} asks for more items than the dataset "
                              f"has ({data.n_items})")
        seed_everything(settings.seed)
        self.config, self.settings, self.progress = config, settings, progress
        self.device = device
        self.model = create_model(backbone, data, config["model"], self.device)
        self.model.lean_propagation = settings.memory_lean
        self.sampler_rng = np.random.default_rng(settings.seed)
        # on the device: a generator samples only tensors on its own device
        self.graph_rng = torch.Generator(device=self.device).manual_seed(settings.seed)
        self.sampler = BPRSampler(data.train, data.n_items,
                                  settings.epoch_batch_size(len(data.train)), self.sampler_rng)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=settings.learning_rate,
                                          weight_decay=settings.weight_decay)
        # stepped after every optimiser step (warm-up is counted in steps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, learning_rate_factor(
            settings, self.sampler.batch_size, len(self.sampler)))
        self.full_valid_task = ranking_tasks(data)["valid"]
        # every epoch validates on this (the same users each epoch, from the seed alone)
        self.valid_task = self.full_valid_task.sample(settings.eval_users, settings.seed)
        if settings.memory_lean:
            trim_heap()

    def train_epoch(self, epoch: int) -> float:
        """One pass over freshly sampled BPR batches, a scheduler step after each; the mean
        loss."""
        self.model.train()
        self.model.pre_epoch(self.graph_rng)
        total = 0.0
        bar = progress_bar(self.sampler.epoch(), enabled=self.progress, total=len(self.sampler),
                           desc=f"epoch {epoch}", leave=False, unit="batch")
        for batch in bar:
            value = self.train_step(*batch)
            total += value
            bar.set_postfix(loss=f"{value:.4f}")
        mean_loss = total / len(self.sampler)
        if not math.isfinite(mean_loss):
            raise TrainingDiverged(f"training loss became {mean_loss} at epoch {epoch}; lower the "
                                   f"learning rate")
        return mean_loss

    def train_step(self, users: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor) -> float:
        """One optimiser step (and scheduler step) on a batch of triples; its loss. With
        ``memory_lean`` a backbone with a chunked loss takes the batch in chunks of triples
        (:func:`chunked_backward`)."""
        users, pos, neg = (t.to(self.device, non_blocking=True) for t in (users, pos, neg))
        self.optimizer.zero_grad(set_to_none=True)
        if self.settings.memory_lean and self.model.chunked_loss:
            value = chunked_backward(self.model, users, pos, neg)
        else:
            loss = self.model.loss(users, pos, neg)
            loss.backward()
            value = loss.item()
        self.optimizer.step()
        self.scheduler.step()
        return value

    def valid_epoch(self) -> dict[str, float]:
        """The current weights' metrics on the validation split (never test), on the sampled
        users where ``eval_users`` samples them."""
        return evaluate_model(self.model, self.valid_task, self.settings)

    def selected_valid(self, state: TrainState) -> dict[str, float]:
        """The selected epoch's valid metrics over every valid user: recorded, or computed now
        (with its weights loaded) where the epochs validated on a sample."""
        if self.valid_task is self.full_valid_task:
            return state.history[state.best_epoch]["valid"]
        valid = evaluate_model(self.model, self.full_valid_task, self.settings)
        if self.progress:
            log.info(f"epoch {state.best_epoch} on all {len(self.full_valid_task.users)} valid "
                     f"users (epochs validated on {len(self.valid_task.users)}): "
                     f"{self.settings.valid_metric} {valid[self.settings.valid_metric]:.4f}")
        return valid

    def run_epoch(self, state: TrainState) -> None:
        """Train and validate the epoch after ``state.epoch`` and record it in ``state``."""
        epoch = state.epoch + 1
        start = time.perf_counter()
        loss = self.train_epoch(epoch)
        train_s = time.perf_counter() - start
        valid = self.valid_epoch()
        record = {"epoch": epoch, "loss": loss, "train_s": train_s,
                  "eval_s": time.perf_counter() - start - train_s, "valid": valid}
        improved = state.end_epoch(record, self.model, self.settings)
        if self.progress:
            log.info(_epoch_line(record, self.settings.valid_metric, improved))

    def save(self, path: Path, state: TrainState) -> None:
        """Write ``state`` with the weights, optimiser, scheduler and generators (CUDA's too, on
        a GPU), atomically."""
        cuda = self.device.type == "cuda"
        save_torch(path, {
            "config": self.config, "device": self.device.type, **state.to_saved(),
            "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "sampler_rng": json.dumps(self.sampler_rng.bit_generator.state),
            "graph_rng": self.graph_rng.get_state(), "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if cuda else []})

    def restore(self, path: Path) -> TrainState:
        """Load what :meth:`save` wrote at ``path``; a fresh state when nothing is there."""
        saved = _load_state(path, self.config, self.device)
        if saved is None:
            return TrainState()
        self.model.load_state_dict(saved["model"])
        self.optimizer.load_state_dict(saved["optimizer"])
        self.scheduler.load_state_dict(saved["scheduler"])
        self.sampler_rng.bit_generator.state = json.loads(saved["sampler_rng"])
        self.graph_rng.set_state(saved["graph_rng"])
        torch.set_rng_state(saved["torch_rng"])
        if saved.get("cuda_rng"):
            torch.cuda.set_rng_state_all(saved["cuda_rng"])
        state = TrainState.from_saved(saved)
        if self.progress:
            log.info(f"resuming after epoch {state.epoch} ({path})")
        return state

    def fit(self, state_path: Path | None = None) -> FitResult:
        """Run epochs until early stopping or the last one; return the best epoch's model."""
        state = self.restore(state_path) if state_path is not None else TrainState()
        while not state.finished:
            self.run_epoch(state)
            if state_path is not None:
                self.save(state_path, state)
        self.model.load_state_dict(state.best_state)
        return FitResult(self.model, state.best_epoch, self.selected_valid(state), state.history,
                         self.config)


def fit(backbone: str, data: InteractionData, config: dict, progress: bool = True,
        state_path: Path | None = None, device: torch.device = CPU) -> FitResult:
    """Train ``backbone`` with early stopping on validation; return the best epoch's model.

    With ``state_path`` everything that decides the next epoch (weights, optimiser, random
    generators, history, early-stopping counters) is saved there atomically after each epoch,
    and a run that finds it continues after the last saved epoch with the same result as an
    uninterrupted one. Everything runs on ``device``.
    """
    return Trainer(backbone, data, config, progress, device).fit(state_path)


def grid_points(grid: dict[str, list]) -> list[dict[str, dict]]:
    """Every combination of ``{"model.reg_weight": [0, 1e-4], ...}`` as config overrides."""
    points: list[dict[str, dict]] = [{}]
    for key, values in grid.items():
        section, _, name = key.partition(".")
        points = [{**p, section: {**p.get(section, {}), name: v}} for p in points for v in values]
    return points


def train_model(backbone: str, data: InteractionData, config: dict, out_dir: Path | None = None,
                *, progress: bool = True, mask_valid_in_test: bool = False,
                grid: dict[str, list] | None = None, resume: bool = False,
                device: torch.device = CPU) -> TrainResult:
    """Train ``backbone`` (each grid point, if any) on ``device``, select on validation only,
    then rank test once with the selected model and write the checkpoint folder (its files
    hold CPU tensors and arrays, whatever the device).

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
                     state_dir / f"point-{index}.pt" if state_dir else None, device)
        metric = cfg["train"]["valid_metric"]
        summary.append({"overrides": point, "best_epoch": result.best_epoch,
                        "valid": result.valid})
        if progress and grid:
            log.info(f"grid point {point}: valid {metric} {result.valid[metric]:.4f}")
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
                  model: Backbone, result: TrainResult, settings: TrainSettings) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    save_model(out_dir, backbone, config, data, model.state_dict())
    save_embeddings(out_dir, model)
    write_json(out_dir / "history.json", result.history)
    write_json(out_dir / "metrics.json", {
        "backbone": backbone, "dataset": data.name, "best_epoch": result.best_epoch,
        "epochs_run": len(result.history), "valid_metric": settings.valid_metric,
        "valid": result.valid, "test": result.test, "config": config,
        "device": model.device.type,
        "dropped_cold_interactions": data.dropped_cold, "grid": result.grid})
    plot_training_curve(result.history, settings.valid_metric, result.best_epoch,
                        out_dir / "training_curve.png")
