"""The files of a bundle besides its graphs, and the atomic write of the folder: torch-free, so
``add-items`` writes a bundle on a host without torch (:mod:`.topk_table`) as ``export`` does.
"""

from __future__ import annotations

import os
import platform
import shutil
import sys
import tempfile
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from cliper_prod import __version__
from cliper_prod.bundle_format import (FOLD_IN, FORMAT_VERSION, HISTORY_INDPTR, HISTORY_ITEMS,
                                       IMAGE_GRAPH, ITEM_IDS, ITEM_TABLE, MANIFEST,
                                       MANIFEST_HASH, TEXT_GRAPH, TOKENIZER, USER_IDS,
                                       USER_TABLE, fold_in_file, manifest_hash, sha256_file)
from cliper_prod.fold_in_state import FoldInState
from cliper_prod.ids import write_ids
from cliper_prod.io import TEMP_SUFFIX, check_output, temp_prefix, write_json, write_npy
from cliper_prod.progress import Progress
from cliper_prod.student_format import COLD_STUDENT, StudentState, student_file

FeatureGraphs = Callable[[], "tuple[dict[str, Any], dict[str, Any]] | None"]


@dataclass(frozen=True)
class ServedTables:
    """The arrays the runtime reads beside the top-K graph: the embedding tables, each user's
    training items (CSR) and the ids (default: row numbers)."""

    users: np.ndarray
    items: np.ndarray
    history_indptr: np.ndarray
    history_items: np.ndarray
    user_ids: Sequence[str] | None = None
    item_ids: Sequence[str] | None = None


@dataclass(frozen=True)
class Extension:
    """What the extended bundle holds: the source (``manifest``: its manifest, as
    :func:`~cliper_prod.bundle_format.read_manifest` checked it), its tables with the new
    items appended, the fold-in state placing them, the lineage, and the source's cold-start
    student."""

    source: Path
    manifest: dict[str, Any]
    tables: ServedTables
    fold_in: FoldInState
    lineage: dict[str, Any]
    student: StudentState | None = None  # the source's cold-start student, kept


def write_atomically(out: Path, build: Callable[[Path], dict[str, Any]]) -> dict[str, Any]:
    """Run ``build`` in a temporary sibling of ``out`` (named as :mod:`cliper_prod.io` names
    temporaries, so a killed run's is found), then swap it into place."""
    check_output(out, "bundle")
    out.parent.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix=temp_prefix(out), suffix=TEMP_SUFFIX, dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)  # mkdtemp makes it private; the bundle is an ordinary folder
    try:
        manifest = build(folder)
        replace_dir(folder, out)
    finally:
        if folder.exists():
            shutil.rmtree(folder)
    return manifest


def write_bundle_files(folder: Path, graphs: dict[str, Any], tables: ServedTables, opset: int,
                       backbone: str | None, dataset: str | None, *,
                       features: FeatureGraphs = lambda: None,
                       fold_in: FoldInState | None = None,
                       lineage: dict[str, Any] | None = None,
                       student: StudentState | None = None,
                       bar: Progress | None = None) -> dict[str, Any]:
    """Beside the top-K graph (its record in ``graphs``): the tables and ids, the CLIP graphs
    ``features`` writes (their records and the feature settings, or None), the fold-in arrays,
    the cold-start student's, then the manifest; two steps counted on ``bar`` (the CLIP graphs,
    the manifest)."""
    write_npy(folder / USER_TABLE, tables.users)
    write_npy(folder / ITEM_TABLE, tables.items)
    write_npy(folder / HISTORY_INDPTR, tables.history_indptr)
    write_npy(folder / HISTORY_ITEMS, tables.history_items)
    write_ids(folder / USER_IDS, tables.user_ids or range(len(tables.users)))
    write_ids(folder / ITEM_IDS, tables.item_ids or range(len(tables.items)))
    feature_graphs = features()
    feature_info = None
    if feature_graphs is not None:
        records, feature_info = feature_graphs
        graphs.update(records)
    if bar is not None:
        bar.update(1)
    extra: dict[str, Any] = {"lineage": lineage} if lineage else {}
    if fold_in is not None:
        for name, array in fold_in.arrays.items():
            write_npy(folder / fold_in_file(name), np.ascontiguousarray(array))
        extra[FOLD_IN] = {"user_rule": fold_in.user_rule, "item_rule": fold_in.item_rule,
                          "params": fold_in.params,
                          "arrays": {name: fold_in_file(name) for name in fold_in.arrays}}
    if student is not None:
        for name, array in student.arrays.items():
            write_npy(folder / student_file(name), np.ascontiguousarray(array, np.float32))
        extra[COLD_STUDENT] = {"params": student.params,
                               "arrays": {name: student_file(name) for name in student.arrays}}
    manifest = write_manifest(folder, graphs, feature_info, opset, backbone=backbone,
                              dataset=dataset, extra=extra)
    if bar is not None:
        bar.update(1)
    return manifest


def copied_feature_graphs(source: Path, manifest: dict[str, Any], folder: Path
                          ) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """The source bundle's CLIP graphs and tokenizer copied into ``folder`` with their verified
    records and feature settings (None: it has none)."""
    if manifest.get("features") is None:
        return None
    records = {name: manifest["graphs"][name] for name in (IMAGE_GRAPH, TEXT_GRAPH)}
    names = [f for r in records.values() for f in r["files"].values()] + [TOKENIZER]
    for name in names:
        shutil.copy2(source / name, folder / name)
    return records, manifest["features"]


def write_manifest(folder: Path, graphs: dict[str, Any], features: dict[str, Any] | None,
                   opset: int, backbone: str | None, dataset: str | None,
                   extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Hash every file of ``folder`` and write ``manifest.json`` (last, once all is verified)."""
    import onnx
    import onnxruntime

    torch = sys.modules.get("torch")  # None when this bundle was written without it

    files = sorted(p.name for p in folder.iterdir() if p.name != MANIFEST)
    manifest = {
        "format_version": FORMAT_VERSION, "cliper_prod": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "backbone": backbone, "dataset": dataset,
        "versions": {"torch": torch and torch.__version__, "onnx": onnx.__version__,
                     "onnxruntime": onnxruntime.__version__, "python": platform.python_version()},
        "opset": opset, "graphs": graphs, "features": features,
        "ids": {"users": USER_IDS, "items": ITEM_IDS},
        "tables": {"users": USER_TABLE, "items": ITEM_TABLE,
                   "history_indptr": HISTORY_INDPTR, "history_items": HISTORY_ITEMS},
        **(extra or {}),
        "files": {name: sha256_file(folder / name) for name in files},
    }
    manifest[MANIFEST_HASH] = manifest_hash(manifest)
    write_json(folder / MANIFEST, manifest)
    return manifest


def replace_dir(new: Path, final: Path) -> None:
    """Swap ``new`` into ``final``: readers see the old bundle or the new one, never a mix."""
    if not final.exists():
        os.replace(new, final)
        return
    old = final.with_name(f"{temp_prefix(final)}old{TEMP_SUFFIX}")
    os.replace(final, old)
    os.replace(new, final)
    shutil.rmtree(old)
