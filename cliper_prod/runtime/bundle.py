"""An exported bundle opened for inference: manifest checked, graphs loaded on demand.

A CLIP graph may come in two variants (plain, and fused by ONNX Runtime's optimizer); ``auto``
runs the one the manifest measured faster on the session's provider, fused on a provider the
export did not measure (CUDA: the fused attention kernels are what the fusions are for), and
plain for bundles written before fused graphs existed.
"""

from __future__ import annotations

import logging
from functools import cached_property
from pathlib import Path
from typing import Any

from cliper_prod.bundle_format import (FUSED, PLAIN, VARIANTS, file_key, read_manifest,
                                       uint8_key)
from cliper_prod.errors import BundleError, RuntimeSetupError
from cliper_prod.runtime.sessions import Graph, choose_providers

log = logging.getLogger(__name__)


def pick_variant(record: dict[str, Any], provider: str, precision: str = "fp32",
                 requested: str = "auto") -> str:
    """The variant of one graph to run (see the module docstring); ``requested`` overrides."""
    if requested not in ("auto", *VARIANTS):
        raise BundleError(f"graph variant must be auto, {' or '.join(VARIANTS)}; got "
                          f"{requested!r}")
    if requested != "auto":
        return requested
    if file_key(precision, FUSED) not in record["files"]:
        return PLAIN
    measured = record.get(FUSED, {}).get("preferred", {}).get(provider, {})
    return measured.get(precision, FUSED)


class Bundle:
    def __init__(self, folder: Path, device: str = "auto", backbone: str | None = None) -> None:
        self.folder = folder
        self.manifest: dict[str, Any] = read_manifest(folder)
        if backbone is not None and self.manifest["backbone"] != backbone:
            raise BundleError(f"{folder}: holds a {self.manifest['backbone']} model, not "
                              f"{backbone}")
        self.device = device
        self.providers = choose_providers(device)

    def graph(self, name: str, precision: str = "fp32", variant: str = PLAIN,
              uint8: bool = False) -> Graph:
        """A session of one graph; with ``cuda`` asked for, one that really runs on the GPU."""
        graph = Graph(self.graph_file(name, precision, variant, uint8), self.providers)
        live = graph.session.get_providers()[0]
        if self.device == "cuda" and live != "CUDAExecutionProvider":
            raise RuntimeSetupError(
                f"--device cuda: ONNX Runtime runs {name} on {live}: it sees no GPU and falls "
                f"back without a word (under Ray a replica or actor sees a GPU only when given "
                f"one: --gpus-per-replica, --gpus-per-actor)")
        return graph

    def has_uint8(self, name: str, precision: str = "fp32", variant: str = PLAIN) -> bool:
        """Whether the export wrote a uint8-pixel twin of this graph (bundles before it did
        not)."""
        return uint8_key(precision, variant) in self._record(name)["files"]

    def variant(self, name: str, precision: str = "fp32", requested: str = "auto") -> str:
        """Which variant of ``name`` this bundle's provider runs (:func:`pick_variant`)."""
        chosen = pick_variant(self._record(name), self.providers[0], precision, requested)
        log.debug("%s %s: %s graph on %s", name, precision, chosen, self.providers[0])
        return chosen

    def graph_file(self, name: str, precision: str = "fp32", variant: str = PLAIN,
                   uint8: bool = False) -> Path:
        """The file of one variant; ``uint8``: its twin taking uint8 pixels (image graph)."""
        key = uint8_key(precision, variant) if uint8 else file_key(precision, variant)
        files = self._record(name)["files"]
        if key not in files:
            raise BundleError(f"{self.folder}: no {key} variant of {name} (has "
                              f"{sorted(k for k in files if k != 'torchscript')})")
        return self.folder / files[key]

    def _record(self, name: str) -> dict[str, Any]:
        record = self.manifest["graphs"].get(name)
        if record is None:
            raise BundleError(f"{self.folder}: the bundle has no {name} graph")
        return record

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
