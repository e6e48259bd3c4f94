"""An exported bundle opened for inference: manifest checked, graphs loaded on demand."""

from __future__ import annotations

from functools import cached_property
from pathlib import Path
from typing import Any

from cliper_prod.bundle_format import read_manifest
from cliper_prod.errors import BundleError
from cliper_prod.runtime.sessions import Graph, choose_providers


class Bundle:
    def __init__(self, folder: Path, device: str = "auto", backbone: str | None = None) -> None:
        self.folder = folder
        self.manifest: dict[str, Any] = read_manifest(folder)
        if backbone is not None and self.manifest["backbone"] != backbone:
            raise BundleError(f"{folder}: holds a {self.manifest['backbone']} model, not "
                              f"{backbone}")
        self.providers = choose_providers(device)

    def graph(self, name: str, precision: str = "fp32") -> Graph:
        return Graph(self.graph_file(name, precision), self.providers)

    def graph_file(self, name: str, precision: str = "fp32") -> Path:
        record = self.manifest["graphs"].get(name)
        if record is None:
            raise BundleError(f"{self.folder}: the bundle has no {name} graph")
        file = record["files"].get(precision)
        if file is None:
            raise BundleError(f"{self.folder}: no {precision} variant of {name} "
                              f"(has {sorted(k for k in record['files'] if k != 'torchscript')})")
        return self.folder / file

    @property
    def features(self) -> dict[str, Any]:
        info = self.manifest.get("features")
        if info is None:
            raise BundleError(f"{self.folder}: the bundle has no CLIP feature graphs (the model "
                              f"was trained on vanilla features: pass --clip to `cliper-prod "
                              f"export` to include them)")
        return info

    @cached_property
    def user_ids(self) -> list[str]:
        return self._ids("users")

    @cached_property
    def item_ids(self) -> list[str]:
        return self._ids("items")

    def _ids(self, which: str) -> list[str]:
        path = self.folder / self.manifest["ids"][which]
        return path.read_text(encoding="utf-8").splitlines()
