"""An exported bundle opened for inference: manifest checked, graphs loaded on demand.

A CLIP graph may come in two variants (plain, and fused by ONNX Runtime's optimizer); ``auto``
runs the one the manifest measured faster on the session's provider, fused on a provider the
export did not measure (CUDA: the fused attention kernels are what the fusions are for), and
plain for bundles written before fused graphs existed.

A CLIP graph may also come in several precisions (fp32, fp16, int8); ``auto`` runs int8 on a
provider where the export measured it faster than fp32 (only the CPU is measured), else fp32.
"""

from __future__ import annotations

import logging
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from cliper_prod.bundle_format import (FOLD_IN, FUSED, IMAGE_GRAPH, INT8, PLAIN, PRECISIONS,
                                       TEXT_GRAPH, TOPK_GRAPH, VARIANTS, file_key, read_manifest,
                                       uint8_key)
from cliper_prod.errors import BundleError, DataError, RuntimeSetupError
from cliper_prod.ids import read_ids
from cliper_prod.runtime.providers import choose_providers
from cliper_prod.runtime.sessions import Graph, OrtThreads

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


def pick_precision(record: dict[str, Any], provider: str, requested: str = "auto") -> str:
    """The precision of one CLIP graph to run (see the module docstring); ``requested``
    overrides."""
    if requested not in ("auto", *PRECISIONS):
        raise BundleError(f"precision must be auto, {', '.join(PRECISIONS)}; got {requested!r}")
    if requested != "auto":
        return requested
    faster = record.get(INT8, {}).get("preferred", {}).get(provider, {})
    return INT8 if faster.get(pick_variant(record, provider)) == INT8 else "fp32"


def _shape(folder: Path, file: str) -> tuple[int, ...]:
    """The shape of a .npy table, from its header (nothing else is read)."""
    return np.load(folder / file, mmap_mode="r").shape


def check_values(folder: Path, manifest: dict[str, Any]) -> None:
    """Refuse a manifest whose values the runtime acts on disagree with the artifacts they
    describe: the top-K record's counts, width and K against the tables (its K against the
    graph's TopK constant when a session opens: :meth:`Bundle.graph`), the training-item
    tables against the counts, each fold-in array against the catalog, ``knn_k`` against the
    catalog's size, and each measured variant choice against the variants present. (A folder
    of CLIP graphs alone, as the embed benchmarks write, has no top-K part to check.)"""
    topk = manifest["graphs"].get(TOPK_GRAPH)
    problems = [] if topk is None else _topk_problems(folder, manifest, topk)
    for name, record in manifest["graphs"].items():
        for provider, choice in record.get(FUSED, {}).get("preferred", {}).items():
            for precision, variant in choice.items():
                if variant not in VARIANTS or file_key(precision, variant) not in record["files"]:
                    problems.append(f"{name}: preferred {variant!r} {precision} variant on "
                                    f"{provider} is not in the bundle")
        for provider, choice in record.get(INT8, {}).get("preferred", {}).items():
            for variant, precision in choice.items():
                if precision not in ("fp32", INT8) or variant not in VARIANTS or \
                        file_key(precision, variant) not in record["files"]:
                    problems.append(f"{name}: preferred {precision!r} precision of the "
                                    f"{variant!r} variant on {provider} is not in the bundle")
    if problems:
        raise BundleError(f"{folder}: the bundle does not hold what its manifest says "
                          f"({'; '.join(problems)}); re-export it")


def _topk_problems(folder: Path, manifest: dict[str, Any], topk: dict[str, Any]) -> list[str]:
    """What :func:`check_values` finds wrong in the top-K record, its tables and the fold-in
    arrays."""
    tables = manifest["tables"]
    n_users, n_items, dim = topk["n_users"], topk["n_items"], topk["dim"]
    found = {"users": _shape(folder, tables["users"]), "items": _shape(folder, tables["items"]),
             "history_indptr": _shape(folder, tables["history_indptr"])}
    expected = {"users": (n_users, dim), "items": (n_items, dim),
                "history_indptr": (n_users + 1,)}
    problems = [f"{tables[name]} has shape {found[name]}, the manifest says {expected[name]}"
                for name in expected if found[name] != expected[name]]
    if not problems:
        pairs = int(np.load(folder / tables["history_indptr"], mmap_mode="r")[-1])
        if _shape(folder, tables["history_items"]) != (pairs,):
            problems.append(f"{tables['history_items']} does not hold the {pairs} training "
                            f"items {tables['history_indptr']} counts")
    if not 1 <= topk["k"] <= n_items or any(o["shape"][1:] != [topk["k"]]
                                            for o in topk["outputs"]):
        problems.append(f"top-K k {topk['k']} is not the width of the graph's outputs "
                        f"{[o['shape'] for o in topk['outputs']]} within {n_items} items")
    fold_in = manifest.get(FOLD_IN) or {}
    for name, file in fold_in.get("arrays", {}).items():
        shape = _shape(folder, file)
        per_item = shape[1] if name == "item_layers" else shape[0]
        if name.startswith(("knn_", "item_", "frozen_degree_", "learned_")) and \
                per_item != n_items:
            problems.append(f"{file} holds {per_item} items, the manifest says {n_items}")
    knn_k = fold_in.get("params", {}).get("knn_k")
    if knn_k is not None and not (isinstance(knn_k, int) and 1 <= knn_k <= n_items):
        problems.append(f"fold-in knn_k {knn_k!r} is not between 1 and the {n_items} items")
    return problems


class Bundle:
    """A bundle folder opened on one provider choice (:data:`~.providers.PROVIDERS`);
    ``backbone``, when given, must be the one the bundle holds; every session it opens has
    ``threads``."""

    def __init__(self, folder: Path, provider: str = "auto", backbone: str | None = None,
                 threads: OrtThreads = OrtThreads()) -> None:
        self.folder = folder
        self.threads = threads
        self.manifest: dict[str, Any] = read_manifest(folder)
        if backbone is not None and self.manifest["backbone"] != backbone:
            raise BundleError(f"{folder}: holds a {self.manifest['backbone']} model, not "
                              f"{backbone}")
        self.provider = provider
        self.providers = choose_providers(provider)
        check_values(folder, self.manifest)
        if TOPK_GRAPH in self.manifest["graphs"]:
            self.user_ids, self.item_ids  # read at open: ids and rows must pair one to one

    def graph(self, name: str, precision: str = "fp32", variant: str = PLAIN,
              uint8: bool = False) -> Graph:
        """A session of one graph; with ``cuda`` asked for, one that really runs on the GPU.
        Its output shapes must be those its manifest record gives (the top-K graph's K is
        its TopK constant, a CLIP graph's width its projection)."""
        graph = Graph(self.graph_file(name, precision, variant, uint8), self.providers,
                      self.threads)
        for spec, output in zip(self._record(name)["outputs"], graph.session.get_outputs()):
            if len(spec["shape"]) != len(output.shape) or any(
                    isinstance(a, int) and isinstance(b, int) and a != b
                    for a, b in zip(spec["shape"], output.shape)):
                raise BundleError(f"{graph.path}: output {output.name} has shape "
                                  f"{output.shape}, the manifest says {spec['shape']}: the "
                                  f"bundle does not hold what its manifest says; re-export it")
        live = graph.session.get_providers()[0]
        if self.provider == "cuda" and live != "CUDAExecutionProvider":
            raise RuntimeSetupError(
                f"--provider cuda: ONNX Runtime runs {name} on {live}: it sees no GPU and falls "
                f"back without a word (under Ray a replica or actor sees a GPU only when given "
                f"one: --gpus-per-replica, --gpus-per-actor)")
        return graph

    def variant(self, name: str, precision: str = "fp32", requested: str = "auto") -> str:
        """Which variant of ``name`` this bundle's provider runs (:func:`pick_variant`)."""
        chosen = pick_variant(self._record(name), self.providers[0], precision, requested)
        log.debug("%s %s: %s graph on %s", name, precision, chosen, self.providers[0])
        return chosen

    def precision(self, name: str, requested: str = "auto") -> str:
        """Which precision of ``name`` this bundle's provider runs (:func:`pick_precision`)."""
        return pick_precision(self._record(name), self.providers[0], requested)

    def check_precision(self, requested: str) -> None:
        """Refuse a precision the bundle's CLIP graphs lack (or asked of a bundle without
        them) before any session opens; ``auto`` always has one."""
        if self.manifest.get("features") is None:
            if requested != "auto":
                raise BundleError(f"{self.folder}: precision {requested}: the bundle has no CLIP "
                                  f"graphs (exported without --clip)")
            return
        for name in (IMAGE_GRAPH, TEXT_GRAPH):
            precision = self.precision(name, requested)
            self.graph_file(name, precision, self.variant(name, precision))

    def has_uint8(self, name: str, precision: str = "fp32", variant: str = PLAIN) -> bool:
        """Whether the export wrote a uint8-pixel twin of this graph (bundles before it did
        not)."""
        return uint8_key(precision, variant) in self._record(name)["files"]

    def graph_file(self, name: str, precision: str = "fp32", variant: str = PLAIN,
                   uint8: bool = False) -> Path:
        """The file of one variant; ``uint8``: its twin taking uint8 pixels (image graph)."""
        key = uint8_key(precision, variant) if uint8 else file_key(precision, variant)
        files = self._record(name)["files"]
        if key not in files:
            why = {INT8: "; the export writes int8 unless --no-int8 or its parity missed, "
                         "see the manifest's int8 record"}.get(precision, "")
            raise BundleError(f"{self.folder}: no {key} variant of {name} (has "
                              f"{sorted(k for k in files if k != 'torchscript')}){why}")
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
        """The ``which`` ids, one per row of the table of the same name (checked at open)."""
        try:
            return read_ids(self.folder / self.manifest["ids"][which],
                            self.manifest["graphs"][TOPK_GRAPH][f"n_{which}"])
        except DataError as exc:
            raise BundleError(f"{exc}: the bundle does not hold what its manifest says; "
                              f"re-export it") from None
