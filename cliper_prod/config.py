"""Hyper-parameters: the packaged TOML defaults in ``models/`` merged with a user's file.

The defaults of a backbone are its ``models/<backbone>.toml`` (``[model]``, and the few
``[train]`` keys it changes) over ``models/train.toml`` (the ``[train]`` section every backbone
shares). A user file holds the same ``[model]`` / ``[train]`` sections with any subset of keys;
an unknown section or key is an error (a typo must not silently train with the default).
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, fields
from importlib import resources
from pathlib import Path
from typing import Any

from cliper_prod.errors import ConfigError

SECTIONS = ("model", "train")
#: ``train.lr_scaling`` -> the power p of the rate's factor (batch / batch_size) ** p
LR_SCALING = {"none": 0.0, "sqrt": 0.5, "linear": 1.0}


@dataclass(frozen=True)
class TrainSettings:
    """Optimisation, early stopping and evaluation settings shared by every backbone: the
    ``[train]`` section (defaults in ``models/train.toml``, MMRec's).

    Args:
        learning_rate (float): Adam's learning rate at epoch 0.
        lr_decay (float): The learning rate is ``learning_rate * lr_decay ** (epoch /
            lr_decay_epochs)`` (MMRec's scheduler); 1 keeps it constant.
        lr_decay_epochs (int): Epochs over which the rate falls by one factor ``lr_decay``.
        lr_warmup_steps (int): Optimiser steps over which the rate climbs linearly to its full
            value (step s trains at ``(s + 1) / lr_warmup_steps`` of it); 0: none. Large batches
            diverge or stall without it once ``lr_scaling`` raises the rate.
        lr_scaling (str): How the rate follows the batch of :meth:`epoch_batch_size` against
            ``batch_size``, the batch it was tuned for: ``none``, ``sqrt`` (x sqrt(batch /
            batch_size)) or ``linear`` (x batch / batch_size). Only ``steps_per_epoch`` runs
            train with another batch.
        weight_decay (float): Adam's L2 weight decay.
        batch_size (int): BPR triples per optimiser step.
        steps_per_epoch (int): 0: batches of ``batch_size``; N: N batches per epoch whatever the
            data, the batch growing with it (:meth:`epoch_batch_size`).
        eval_batch_size (int): Users ranked at a time by the full evaluation.
        eval_users (int): 0: every epoch validates on all valid users; N: on the same seeded
            sample of N of them, and only the selected epoch gets the full validation, so
            validating costs in proportion to N once epochs are cheap (large catalogs, large
            batches).
        memory_lean (bool): Propagate with a running sum of the layers instead of stacking them
            (in place where nothing records a gradient, by blocks of rows), so training and
            evaluation hold about three [nodes, d] tables instead of 2 x (layers + 1); LightGCN
            and FREEDOM also take each batch's loss in chunks of triples over tables built
            without a graph and propagate the gradient back by hand (memory independent of the
            batch; about four tables at a step's peak), and a backbone that reads no features
            (LightGCN) loads none. Same arithmetic up to float rounding order, hence off by
            default (the default keeps the parity figures bit for bit).
        epochs (int): The most epochs trained.
        patience (int): Epochs without a better ``valid_metric`` before training stops.
        valid_metric (str): The validation metric that selects the epoch, e.g. ``recall@20``;
            its K must be in ``topk``.
        topk (tuple[int, ...]): The cut-offs every evaluation reports.
        seed (int): Seeds initialisation, sampling and dropout.
    """

    learning_rate: float
    lr_decay: float
    lr_decay_epochs: int
    lr_warmup_steps: int
    lr_scaling: str
    weight_decay: float
    batch_size: int
    steps_per_epoch: int
    eval_batch_size: int
    eval_users: int
    memory_lean: bool
    epochs: int
    patience: int
    valid_metric: str
    topk: tuple[int, ...]
    seed: int

    def epoch_batch_size(self, n_train: int) -> int:
        """Triples per step: ``batch_size``, or with ``steps_per_epoch`` as many as make that
        many steps, so an epoch propagates the graph a fixed number of times and its cost grows
        linearly with the data instead of (interactions / batch) x (nodes + edges)."""
        if self.steps_per_epoch == 0:
            return self.batch_size
        return max(1, -(-n_train // self.steps_per_epoch))

    def __post_init__(self) -> None:
        object.__setattr__(self, "topk", tuple(self.topk))
        if min(self.batch_size, self.eval_batch_size, self.epochs, self.lr_decay_epochs) < 1 \
                or min(self.patience, self.steps_per_epoch, self.eval_users,
                       self.lr_warmup_steps) < 0:
            raise ConfigError("batch sizes, epochs and lr_decay_epochs must be >= 1 and "
                              "patience, steps_per_epoch, eval_users and lr_warmup_steps >= 0")
        if self.lr_scaling not in LR_SCALING:
            raise ConfigError(f"lr_scaling must be one of {sorted(LR_SCALING)}, got "
                              f"{self.lr_scaling!r}")
        if not 0 < self.lr_decay <= 1:
            raise ConfigError(f"lr_decay must be in (0, 1], got {self.lr_decay}")
        name, _, k = self.valid_metric.partition("@")
        if name not in ("recall", "ndcg", "precision", "map") or not k.isdigit():
            raise ConfigError(f"valid_metric must look like 'recall@20', got {self.valid_metric!r}")
        if int(k) not in self.topk:
            raise ConfigError(f"valid_metric {self.valid_metric} needs K={k} in topk {self.topk}")


TRAIN_PRESET = "train"  # models/train.toml: the [train] defaults that every backbone shares


def _packaged(name: str) -> Path:
    return Path(str(resources.files("cliper_prod.presets") / f"{name}.toml"))


def preset_path(backbone: str) -> Path:
    """The packaged default file of a backbone (``models/<backbone>.toml`` in a checkout)."""
    path = _packaged(backbone)
    if backbone == TRAIN_PRESET or not path.exists():
        raise ConfigError(f"no default hyper-parameters for backbone {backbone!r} ({path})")
    return path


def preset(backbone: str) -> dict[str, dict[str, Any]]:
    """The packaged defaults of ``backbone``: its own [model], and the shared [train] with the
    keys its file overrides."""
    path = preset_path(backbone)
    own = read_toml(path)
    shared = {"model": own["model"], "train": read_toml(_packaged(TRAIN_PRESET))["train"]}
    return merge(shared, {"train": own["train"]}, str(path))


def read_toml(path: Path) -> dict[str, dict[str, Any]]:
    try:
        with open(path, "rb") as fh:
            data = tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML ({exc})") from None
    unknown = set(data) - set(SECTIONS)
    if unknown:
        raise ConfigError(f"{path}: unknown section(s) {sorted(unknown)}; expected {SECTIONS}")
    return {s: dict(data.get(s, {})) for s in SECTIONS}


def merge(defaults: dict[str, dict[str, Any]], override: dict[str, dict[str, Any]],
          source: str) -> dict[str, dict[str, Any]]:
    """Override keys of ``defaults``; a key the defaults do not have is a typo."""
    merged = {s: dict(defaults[s]) for s in SECTIONS}
    for section, values in override.items():
        for key, value in values.items():
            if key not in merged[section]:
                raise ConfigError(f"{source}: unknown key [{section}] {key}; known: "
                                  f"{', '.join(sorted(merged[section]))}")
            merged[section][key] = value
    return merged


def load_config(backbone: str, user_file: Path | None = None,
                overrides: dict[str, dict[str, Any]] | None = None) -> dict[str, dict[str, Any]]:
    """Defaults of ``backbone``, then ``user_file``, then command-line ``overrides``."""
    config = preset(backbone)
    if user_file is not None:
        config = merge(config, read_toml(user_file), str(user_file))
    if overrides:
        config = merge(config, overrides, "command line")
    return config


def build(cls: type, values: dict[str, Any], section: str) -> Any:
    """Instantiate a settings dataclass, reporting missing keys and wrong types clearly."""
    names = {f.name for f in fields(cls)}
    missing = names - set(values)
    if missing:
        raise ConfigError(f"[{section}] lacks key(s) {sorted(missing)}")
    extra = set(values) - names
    if extra:
        raise ConfigError(f"[{section}] has unknown key(s) {sorted(extra)}")
    for f in fields(cls):
        value = values[f.name]
        expected = {"int": int, "float": (int, float), "str": str, "bool": bool}.get(str(f.type))
        if expected is not None and (not isinstance(value, expected) or
                                     (expected is int and isinstance(value, bool))):
            raise ConfigError(f"[{section}] {f.name} must be {f.type}, got {value!r}")
    return cls(**{k: float(v) if str(f.type) == "float" else v
                  for f in fields(cls) for k, v in [(f.name, values[f.name])]})
