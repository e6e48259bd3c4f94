"""A folder written by ``cliper-prod embed`` read back: item ids and feature rows, checked.

Each file goes through a reader that refuses it with a :class:`~cliper_prod.errors.DataError`
naming it (exit 3) when it cannot be what ``embed`` writes: a ``.npy`` that is not a readable
2-d floating-point array (pickled objects are never loaded), ``item_ids.txt`` that is not UTF-8
or does not pair one id per row, an ``embed_summary.json`` that is not a JSON object with the
keys of an embedding. Within well-formed files, one item's problem is that item's
(:class:`ItemProblem`): an id that cannot name an item (empty, padded, holding a line break,
repeated, ``known`` already), a row that cannot be placed (not finite, no length, a length that
overflows float32). ``add-items`` reports those per item and adds the rest.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cliper_prod.errors import DataError
from cliper_prod.features.items import StrictJSONError, loads_strict
from cliper_prod.ids import id_problem, read_id_lines

IDS_FILE = "item_ids.txt"
SUMMARY_FILE = "embed_summary.json"
#: what an `embed` summary and a bundle's feature settings must share for the features to be
#: in the space the model was trained on (the CLIP itself is named differently by the two
#: paths, a checkpoint or a bundle, so it is not compared)
SAME_EMBEDDING = ("dim", "fusion", "tau", "views")


def read_matrix(path: Path, rows: int | None = None, of: str = "the dataset") -> np.ndarray:
    """A 2-d floating-point ``.npy`` table (with ``rows`` rows, the items ``of`` has, when
    given), or a DataError naming the file: missing, pickled, truncated, of another dtype or
    shape."""
    if not path.is_file():
        raise DataError(path, "missing")
    try:
        array = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise DataError(path, f"not a readable .npy array ({str(exc)[:120]})") from None
    if not isinstance(array, np.ndarray) or array.ndim != 2:
        shape = getattr(array, "shape", "not an array")
        raise DataError(path, f"expected a 2-d table [rows, d], got shape {shape}")
    if not np.issubdtype(array.dtype, np.floating):
        raise DataError(path, f"expected floating-point values, got {array.dtype}")
    if rows is not None and len(array) != rows:
        raise DataError(path, f"{len(array)} feature rows but {of} has {rows} items: ids and "
                              f"rows pair one to one")
    return array


def read_embed_summary(path: Path) -> dict:
    """An ``embed_summary.json``: a JSON object holding :data:`SAME_EMBEDDING`, or a
    DataError naming the file."""
    try:
        summary = loads_strict(path.read_bytes())
    except StrictJSONError as exc:
        raise DataError(path, f"not JSON ({exc})") from None
    except OSError as exc:
        raise DataError(path, f"cannot be read ({exc.strerror})") from None
    if not isinstance(summary, dict):
        raise DataError(path, f"expected a JSON object, got {type(summary).__name__}")
    missing = [key for key in SAME_EMBEDDING if key not in summary]
    if missing:
        raise DataError(path, f"missing key(s) {missing}: not a summary `cliper-prod embed` "
                              f"writes")
    return summary


@dataclass(frozen=True)
class ItemProblem:
    """Why the item of ``row`` (0-based; its line in ``item_ids.txt`` is ``row + 1``) cannot
    be added; ``file`` is the folder's file that shows it."""

    row: int
    item_id: str
    reason: str
    file: str


@dataclass(frozen=True)
class FeatureRows:
    """The items of a feature folder that can be added, and those that cannot."""

    ids: list[str]
    features: dict[str, np.ndarray]
    problems: list[ItemProblem]


def read_feature_folder(folder: Path, modalities: list[str], bundle_features: dict | None,
                        known: set[str] | frozenset[str] = frozenset()) -> FeatureRows:
    """Item ids and the ``modalities``' feature rows of a folder laid out as `embed` writes it,
    each file checked whole (a DataError), each item on its own (an :class:`ItemProblem`; ids
    in ``known`` are one), and, where both say, the CLIP settings of the bundle."""
    ids_file = folder / IDS_FILE
    if not ids_file.is_file():
        raise DataError(ids_file, "missing: --features takes a folder written by "
                                  "`cliper-prod embed` (item_ids.txt, image_feat.npy, "
                                  "text_feat.npy)")
    ids = read_id_lines(ids_file)
    summary_file = folder / SUMMARY_FILE
    if bundle_features is not None and summary_file.is_file():
        summary = read_embed_summary(summary_file)
        differ = [key for key in SAME_EMBEDDING if summary[key] != bundle_features.get(key)]
        if differ:
            raise DataError(summary_file, f"embedded with other {differ} than the bundle's "
                                          f"model: the features are in another space")
    tables = {m: read_matrix(folder / f"{m}_feat.npy", len(ids), IDS_FILE) for m in modalities}
    problems: dict[int, ItemProblem] = {}
    seen: set[str] = set()
    for row, item_id in enumerate(ids):
        reason = id_problem(item_id) or ("duplicate item id (first kept)" if item_id in seen
                                         else "already in the bundle" if item_id in known
                                         else None)
        if reason:
            problems[row] = ItemProblem(row, item_id, reason, IDS_FILE)
        seen.add(item_id)
    for m, rows in tables.items():
        file = f"{m}_feat.npy"
        rows = rows.astype(np.float32, copy=False)  # the precision the fold-in computes in
        with np.errstate(over="ignore", invalid="ignore"):
            norms = np.linalg.norm(rows, axis=1)
        finite = np.isfinite(rows).all(axis=1)
        for row in np.flatnonzero(~finite | ~np.isfinite(norms) | (norms == 0)):
            reason = ("not finite (NaN or infinity)" if not finite[row]
                      else "its length overflows float32: values too large to place"
                      if not np.isfinite(norms[row]) else
                      "an all-zero row (no length): it has no nearest items")
            problems.setdefault(int(row), ItemProblem(int(row), ids[row], f"{m} features: "
                                                      f"{reason}", file))
        tables[m] = rows
    keep = np.array([row not in problems for row in range(len(ids))], dtype=bool)
    return FeatureRows([i for i, ok in zip(ids, keep) if ok],
                       {m: np.ascontiguousarray(rows[keep]) for m, rows in tables.items()},
                       sorted(problems.values(), key=lambda p: p.row))
