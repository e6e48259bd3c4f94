"""A folder written by ``cliper-prod embed`` read back: item ids and feature rows, checked.

``add-items --features`` places items by these rows, so a row that cannot be placed (not
finite, all zero) or an id that cannot name one item (empty, padded, repeated) is refused with
the file and line, before any work.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from cliper_prod.errors import DataError

#: what an `embed` summary and a bundle's feature settings must share for the features to be
#: in the space the model was trained on (the CLIP itself is named differently by the two
#: paths, a checkpoint or a bundle, so it is not compared)
SAME_EMBEDDING = ("dim", "fusion", "tau", "views")


def read_feature_folder(folder: Path, modalities: list[str], bundle_features: dict | None
                  ) -> tuple[list[str], dict[str, np.ndarray]]:
    """Item ids and the ``modalities``' feature rows of a folder laid out as `embed` writes it,
    checked: one non-empty id per row, finite rows with some length (a zero row has no
    neighbours), and, where both say, the CLIP settings of the bundle."""
    ids_file = folder / "item_ids.txt"
    if not ids_file.is_file():
        raise DataError(ids_file, "missing: --features takes a folder written by "
                                  "`cliper-prod embed` (item_ids.txt, image_feat.npy, "
                                  "text_feat.npy)")
    ids = ids_file.read_text(encoding="utf-8").split("\n")
    if ids[-1] == "":  # the newline ending the last line
        ids.pop()
    if "" in ids or any(i != i.strip() for i in ids):
        raise DataError(ids_file, "an empty id, or one with surrounding whitespace",
                        line=next(n for n, i in enumerate(ids, 1) if not i or i != i.strip()))
    if len(set(ids)) != len(ids):
        raise DataError(ids_file, "repeated item ids")
    summary_file = folder / "embed_summary.json"
    if bundle_features is not None and summary_file.is_file():
        summary = json.loads(summary_file.read_text())
        differ = [key for key in SAME_EMBEDDING if summary.get(key) != bundle_features.get(key)]
        if differ:
            raise DataError(summary_file, f"embedded with other {differ} than the bundle's "
                                          f"model: the features are in another space")
    features = {}
    for m in modalities:
        path = folder / f"{m}_feat.npy"
        if not path.is_file():
            raise DataError(path, f"missing: the model's item graph was built from "
                                  f"{modalities} features")
        rows = np.load(path)
        if rows.ndim != 2 or len(rows) != len(ids) or not np.isfinite(rows).all():
            raise DataError(path, f"expected {len(ids)} finite rows (one per item_ids.txt line), "
                                  f"got shape {rows.shape}")
        zero = np.flatnonzero(~np.any(rows, axis=1))
        if len(zero):
            raise DataError(path, f"item {ids[zero[0]]!r} (and {len(zero) - 1} more) has an "
                                  f"all-zero row: it has no nearest items")
        features[m] = rows
    return ids, features
