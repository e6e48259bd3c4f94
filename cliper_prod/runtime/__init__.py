"""The torch-free runtime: bundles opened on ONNX Runtime, ranking, item features, fold-in.

``cliper_prod.runtime.Recommender`` is the Python API (imported on first use, so that importing
a submodule stays light).
"""

from __future__ import annotations

from typing import Any


def __getattr__(name: str) -> Any:
    if name == "Recommender":
        from cliper_prod.runtime.recommender import Recommender

        return Recommender
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
