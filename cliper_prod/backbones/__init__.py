"""Backbone registry: name -> (model class, its hyper-parameter dataclass)."""

from __future__ import annotations

from cliper_prod.backbones.base import Recommender
from cliper_prod.backbones.dualgnn import DualGNN, DualGNNConfig
from cliper_prod.backbones.freedom import Freedom, FreedomConfig
from cliper_prod.backbones.lattice import Lattice, LatticeConfig
from cliper_prod.backbones.lightgcn import LightGCN, LightGCNConfig
from cliper_prod.backbones.mmgcn import MMGCN, MMGCNConfig
from cliper_prod.backbones.slmrec import SLMRec, SLMRecConfig
from cliper_prod.backbones.vbpr import VBPR, VBPRConfig
from cliper_prod.config import build
from cliper_prod.data.mmrec import InteractionData
from cliper_prod.errors import ConfigError

BACKBONES: dict[str, tuple[type[Recommender], type]] = {
    "dualgnn": (DualGNN, DualGNNConfig),
    "freedom": (Freedom, FreedomConfig),
    "lattice": (Lattice, LatticeConfig),
    "lightgcn": (LightGCN, LightGCNConfig),
    "mmgcn": (MMGCN, MMGCNConfig),
    "slmrec": (SLMRec, SLMRecConfig),
    "vbpr": (VBPR, VBPRConfig),
}


def create_model(backbone: str, data: InteractionData, model_values: dict) -> Recommender:
    """Instantiate ``backbone`` on ``data`` with the [model] section of its config."""
    if backbone not in BACKBONES:
        raise ConfigError(f"unknown backbone {backbone!r}; available: {', '.join(BACKBONES)}")
    cls, config_cls = BACKBONES[backbone]
    return cls(data, build(config_cls, model_values, "model"))
