"""What several commands share: option parsers, the metrics table, and repeated options."""

from __future__ import annotations

import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from cliper_prod.backbones import BACKBONE_NAMES
from cliper_prod.errors import ConfigError
from cliper_prod.runtime.providers import PROVIDERS

#: Where commands write by default: everything a run makes lies under ``runs/``, apart from the
#: packaged presets (``models/``) and the bundle format's documentation (``export/``).
RUNS = Path("runs")
DEFAULT_CHECKPOINTS = RUNS / "checkpoints"
DEFAULT_EXPORTS = RUNS / "export"
DEFAULT_BUNDLE = DEFAULT_EXPORTS / "freedom"
#: ``--device`` of the torch commands (train, evaluate, compare, ablate-fusion, embed --clip)
DEVICES = ("auto", "cpu", "cuda")


def _split_assignment(pair: str, option: str) -> tuple[str, str, str]:
    key, sep, raw = pair.partition("=")
    section, dot, name = key.partition(".")
    if not sep or not dot or section not in ("model", "train"):
        raise ConfigError(f"{option} expects section.key=value with section model or train, "
                          f"got {pair!r}")
    return section, name, raw


def _parse_value(raw: str) -> Any:
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return raw  # a bare word is a string


def parse_overrides(pairs: tuple[str, ...]) -> dict[str, dict[str, Any]]:
    """``model.dropout=0.5`` -> {"model": {"dropout": 0.5}}; values are parsed as TOML."""
    out: dict[str, dict[str, Any]] = {}
    for pair in pairs:
        section, name, raw = _split_assignment(pair, "--set")
        out.setdefault(section, {})[name] = _parse_value(raw)
    return out


def parse_grid(pairs: tuple[str, ...], config: dict) -> dict[str, list]:
    """``model.reg_weight=0,1e-4`` -> {"model.reg_weight": [0, 0.0001]}, keys checked."""
    grid: dict[str, list] = {}
    for pair in pairs:
        section, name, raw = _split_assignment(pair, "--grid")
        if name not in config[section]:
            raise ConfigError(f"--grid: unknown key [{section}] {name}")
        grid[f"{section}.{name}"] = [_parse_value(v) for v in raw.split(",")]
    return grid


def parse_list(raw: str, option: str, allowed: tuple[str, ...]) -> list[str]:
    """A comma-separated list of names, each one of ``allowed``; at least one."""
    names = [n.strip() for n in raw.split(",") if n.strip()]
    unknown = [n for n in names if n not in allowed]
    if not names or unknown:
        raise ConfigError(f"{option}: unknown {unknown}; available: {', '.join(allowed)}")
    return names


def format_metrics(metrics: dict[str, float], topk: tuple[int, ...] | list[int]) -> str:
    """Recall@K and NDCG@K as a two-line table."""
    names = ("recall", "ndcg")
    header = "        " + "".join(f"{n + '@' + str(k):>14}" for k in topk for n in names)
    row = "        " + "".join(f"{metrics[f'{n}@{k}']:>14.4f}" for k in topk for n in names)
    return header + "\n" + row


Decorator = Callable[[Callable[..., Any]], Callable[..., Any]]


def quiet_option(what: str = "No progress bars or per-epoch lines.") -> Decorator:
    return click.option("--quiet", is_flag=True, help=what)


def device_option(what: str = "auto: the GPU when one is usable.") -> Decorator:
    """``--device auto|cpu|cuda`` of the torch commands, turned into a torch device by
    :func:`cliper_prod.device.resolve_device`."""
    return click.option("--device", type=click.Choice(DEVICES), default="auto",
                        show_default=True, help=what)


def provider_option() -> Decorator:
    """``--provider auto|cpu|cuda``: the ONNX Runtime execution provider of the bundle's
    sessions (:mod:`cliper_prod.runtime.providers`); ``--device`` is kept as its old spelling."""
    return click.option("--provider", "--device", "provider", type=click.Choice(PROVIDERS),
                        default="auto", show_default=True,
                        help="ONNX Runtime provider; auto: CUDA when onnxruntime-gpu sees a GPU "
                             "(--device: the old name, deprecated).")


def backbone_option(**kwargs: Any) -> Decorator:
    return click.option("--backbone", type=click.Choice(BACKBONE_NAMES), **kwargs)
