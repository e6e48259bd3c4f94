"""The import path of Ray Serve config files written before the Ray engine's module was named
:mod:`cliper_prod.serving.ray_engine` (``import_path: cliper_prod.serving.app:build``)."""

from cliper_prod.serving.ray_engine import build

__all__ = ["build"]
