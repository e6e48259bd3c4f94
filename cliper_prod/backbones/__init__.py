"""Backbone registry: name -> (model class, its hyper-parameter dataclass)."""

from __future__ import annotations

from cliper_prod.backbones.base import Recommender
from cliper_prod.backbones.freedom import Freedom, FreedomConfig
from cliper_prod.backbones.lightgcn import LightGCN, LightGCNConfig
from cliper_prod.config import build
from cliper_prod.data.mmrec import InteractionData
from cliper_prod.errors import ConfigError

BACKBONES: dict[str, tuple[type[Recommender], type]] = {
    "freedom": (Freedom, FreedomConfig),
    "lightgcn": (LightGCN, LightGCNConfig),
}


def create_model(backbone: str, data: InteractionData, model_values: dict) -> Recommender:
    """Instantiate ``backbone`` on ``data`` with the [model] section of its config."""
    if backbone not in BACKBONES:
        raise ConfigError(f"unknown backbone {backbone!r}; available: {', '.join(BACKBONES)}")
    cls, config_cls = BACKBONES[backbone]
    return cls(data, build(config_cls, model_values, "model"))
