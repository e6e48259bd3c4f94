"""The backbone table: every backbone's name and model class, in one place.

Importing this module does not import torch: the CLI builds its ``--backbone`` choices from
:data:`BACKBONE_NAMES` at import time, and a serving host has no torch. A model class (with its
hyper-parameter dataclass, its ``config_class``) is imported when a model is created.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

from cliper_prod.config import build
from cliper_prod.errors import ConfigError

if TYPE_CHECKING:
    import torch

    from cliper_prod.backbones.base import Backbone
    from cliper_prod.data.mmrec import InteractionData

BACKBONES: dict[str, str] = {  # name -> "module:ModelClass"; its preset is models/<name>.toml
    "dualgnn": "cliper_prod.backbones.dualgnn:DualGNN",
    "freedom": "cliper_prod.backbones.freedom:Freedom",
    "lattice": "cliper_prod.backbones.lattice:Lattice",
    "lightgcn": "cliper_prod.backbones.lightgcn:LightGCN",
    "mmgcn": "cliper_prod.backbones.mmgcn:MMGCN",
    "slmrec": "cliper_prod.backbones.slmrec:SLMRec",
    "vbpr": "cliper_prod.backbones.vbpr:VBPR",
}
BACKBONE_NAMES: tuple[str, ...] = tuple(sorted(BACKBONES))


def model_class(backbone: str) -> type[Backbone]:
    """The model class of ``backbone``, imported on first use."""
    if backbone not in BACKBONES:
        raise ConfigError(f"unknown backbone {backbone!r}; available: {', '.join(BACKBONE_NAMES)}")
    module, _, name = BACKBONES[backbone].partition(":")
    return getattr(import_module(module), name)


def create_model(backbone: str, data: InteractionData, model_values: dict,
                 device: torch.device | None = None) -> Backbone:
    """Instantiate ``backbone`` on ``data`` with the [model] section of its config, its fixed
    inputs built on ``device`` (default the CPU) and its (CPU-initialised) parameters moved
    there."""
    from cliper_prod.device import CPU

    cls = model_class(backbone)
    device = device or CPU
    return cls(data, build(cls.config_class, model_values, "model"), device).to(device)


def __getattr__(name: str) -> Any:
    """``Backbone`` on first use (it imports torch)."""
    if name == "Backbone":
        return import_module("cliper_prod.backbones.base").Backbone
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
