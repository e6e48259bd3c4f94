"""A bundle with items added to its catalog (``add-items``), written with or without torch.

The tables, ids, fold-in arrays and CLIP graphs are written as ``export`` writes them
(:mod:`.bundle_files`). With torch installed the top-K graph is re-exported in every form the
source has and verified against PyTorch (:func:`~.bundle_writer.extend_with_torch`); without
it, the CPU form's item table is swapped in the source graph and checked against numpy
(:mod:`.topk_table`), the GPU form and the TorchScript twin left out (the manifest says so).
Either way the source bundle is not touched.
"""

from __future__ import annotations

import importlib
import logging
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from cliper_prod.bundle_format import MANIFEST, TOPK_GRAPH, sha256_file
from cliper_prod.export.bundle_files import (Extension, ServedTables, copied_feature_graphs,
                                             write_atomically, write_bundle_files)
from cliper_prod.export.topk_table import onnx_package, retabled_topk
from cliper_prod.fold_in_state import FoldInState
from cliper_prod.ids import read_ids
from cliper_prod.progress import progress_bar
from cliper_prod.student_format import StudentState

log = logging.getLogger(__name__)




def torch_available() -> bool:
    try:
        importlib.import_module("torch")
    except ImportError:
        return False
    return True


def check_writable() -> None:
    """Without torch, the onnx package must be there to swap the table (one line naming the
    extra otherwise): checked before any item is embedded."""
    if not torch_available():
        onnx_package()


def extend_bundle(source: Path, manifest: dict[str, Any], *, item_ids: Sequence[str],
                  items: np.ndarray, fold_in: FoldInState, out: Path,
                  placement: str = "fold-in", student: StudentState | None = None,
                  with_torch: bool | None = None, progress: bool = False) -> dict[str, Any]:
    """A new bundle at ``out``: ``source`` with the items ``item_ids`` (embeddings ``items``,
    placed by ``fold_in``, which holds the arrays with them appended) added to its catalog;
    ``placement`` (how the new items were placed) goes into the lineage and ``student``, the
    source's cold-start student, is kept; ``with_torch``: re-export the top-K graph with torch
    (default: when it is installed); ``progress`` reports the writing's steps."""
    tables = {name: np.load(source / file) for name, file in manifest["tables"].items()}
    old_ids = read_ids(source / manifest["ids"]["items"], len(tables["items"]))
    user_ids = read_ids(source / manifest["ids"]["users"], len(tables["users"]))
    before = manifest.get("lineage", {})
    placements = dict(before.get("placements", {}))
    placements[placement] = placements.get(placement, 0) + len(item_ids)
    extension = Extension(source, manifest, ServedTables(
        tables["users"], np.concatenate([tables["items"], items]).astype(np.float32),
        tables["history_indptr"], tables["history_items"], user_ids,
        old_ids + list(item_ids)), fold_in, {
        "extended_from": {"created": manifest["created"],
                          "manifest_sha256": sha256_file(source / MANIFEST)},
        "added_items": before.get("added_items", 0) + len(item_ids),
        "placement": placement, "placements": placements}, student)
    if with_torch is None:
        with_torch = torch_available()
    if with_torch:
        from cliper_prod.export.bundle_writer import extend_with_torch

        return extend_with_torch(extension, out, progress)
    log.info("torch is not installed: the new items go into the top-K graph's table; its GPU "
             "form and TorchScript twin are left out")
    return write_atomically(out, lambda folder: _write_without_torch(extension, folder,
                                                                     progress))


def _write_without_torch(extension: Extension, folder: Path, progress: bool) -> dict[str, Any]:
    manifest, tables = extension.manifest, extension.tables
    with progress_bar(desc="export", unit="step", total=3, enabled=progress) as bar:
        graphs = {TOPK_GRAPH: retabled_topk(extension.source, manifest["graphs"][TOPK_GRAPH],
                                            folder, tables.users, tables.items,
                                            tables.history_indptr, tables.history_items)}
        bar.update(1)
        return write_bundle_files(
            folder, graphs, tables, manifest["opset"], manifest["backbone"],
            manifest["dataset"],
            features=lambda: copied_feature_graphs(extension.source, manifest, folder),
            fold_in=extension.fold_in, lineage=extension.lineage, student=extension.student,
            bar=bar)
