"""Load and validate an MMRec-format dataset folder.

MMRec's layout: ``<name>.inter`` (tab-separated, header, columns ``userID itemID x_label`` plus
optional ``rating``/``timestamp``; x_label 0 = train, 1 = valid, 2 = test), optional modality
feature files ``image_feat.npy`` / ``text_feat.npy`` of shape ``[n_items, d]`` and optional
``i_id_mapping.csv`` / ``u_id_mapping.csv`` (external id TAB integer id). Every problem is reported
as a :class:`~cliper_prod.errors.DataError` naming the file, the line and what is wrong.
"""

from __future__ import annotations

import csv
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cliper_prod.errors import DataError
from cliper_prod.features.feature_folder import read_embed_summary, read_matrix
from cliper_prod.fusion_modes import fusion_mode
from cliper_prod.ids import id_problem, read_ids

log = logging.getLogger(__name__)

REQUIRED_COLUMNS = ("userID", "itemID", "x_label")
OPTIONAL_COLUMNS = ("rating", "timestamp")
SPLITS = ("train", "valid", "test")
FEATURE_FILES = {"image": "image_feat.npy", "text": "text_feat.npy"}


@dataclass
class InteractionData:
    """A validated dataset: integer interactions per split, features and id maps."""

    name: str
    root: Path
    n_users: int
    n_items: int
    splits: dict[str, np.ndarray]  # split -> int64 array [n, 2] of (user, item)
    features: dict[str, np.ndarray] = field(default_factory=dict)  # modality -> float32 [n_items, d]
    user_ids: list[str] | None = None  # external id of each integer user id
    item_ids: list[str] | None = None
    dropped_cold: dict[str, int] = field(default_factory=dict)  # split -> rows of users absent from train
    features_dir: Path | None = None  # an embed output folder the features came from
    text_views: int | None = None  # text features are V concatenated views, fused by a layer
    text_fusion: str = "mlp"       # the backbone trains: this fusion mode's (see fusion_modes)

    @property
    def train(self) -> np.ndarray:
        return self.splits["train"]

    def summary(self) -> str:
        counts = ", ".join(f"{s} {len(self.splits[s]):,}" for s in SPLITS)
        feats = ", ".join(f"{m} {a.shape[1]}-d" for m, a in self.features.items()) or "none"
        return (f"{self.name}: {self.n_users:,} users, {self.n_items:,} items; {counts}; "
                f"features: {feats}")


def find_inter_file(root: Path) -> Path:
    """The folder's single ``*.inter`` file (MMRec names it after the dataset)."""
    if not root.is_dir():
        raise DataError(root, "dataset folder does not exist")
    candidates = sorted(root.glob("*.inter"))
    if not candidates:
        raise DataError(root, "no *.inter file in the dataset folder")
    if len(candidates) > 1:
        names = ", ".join(p.name for p in candidates)
        raise DataError(root, f"several *.inter files ({names}); keep one per folder")
    return candidates[0]


def _parse_int(value: str, path: Path, line: int, column: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise DataError(path, f"column {column!r} must be an integer, got {value!r}", line) from None


def read_inter(path: Path) -> np.ndarray:
    """Parse the .inter file into an int64 array [n, 3] of (user, item, x_label).

    A well-formed file of the three required columns is parsed by numpy's C reader (millions of
    rows a second); anything it rejects, or any row that fails a check, is parsed again line by
    line, which names the first bad line."""
    with open(path, encoding="utf-8", newline="") as fh:
        header = _read_header(fh, path)
        cols = [header.index(c) for c in REQUIRED_COLUMNS]
        if len(header) == len(REQUIRED_COLUMNS):
            rows = _parse_fast(fh, cols)
            if rows is not None:
                return rows
            fh.seek(0)
            fh.readline()
        return _parse_lines(fh, path, header, cols)


def _read_header(fh, path: Path) -> list[str]:
    header_line = fh.readline()
    if not header_line.strip():
        raise DataError(path, "file is empty; expected a header 'userID\\titemID\\tx_label'", 1)
    header = header_line.rstrip("\r\n").split("\t")
    missing = [c for c in REQUIRED_COLUMNS if c not in header]
    if missing:
        raise DataError(path, f"header lacks column(s) {', '.join(missing)}; found {header}", 1)
    unknown = [c for c in header if c not in REQUIRED_COLUMNS + OPTIONAL_COLUMNS]
    if unknown:
        log.warning("%s: ignoring unknown column(s) %s", path, ", ".join(unknown))
    return header


def _parse_fast(fh, cols: list[int]) -> np.ndarray | None:
    """The rows if every one is three integers that pass the checks, else None."""
    try:
        rows = np.loadtxt(fh, delimiter="\t", dtype=np.int64, ndmin=2, comments=None)
    except ValueError:
        return None
    if rows.shape[0] == 0 or rows.shape[1] != len(cols):
        return None
    rows = rows[:, cols]
    if (rows[:, :2] < 0).any() or not np.isin(rows[:, 2], (0, 1, 2)).all():
        return None
    return rows


def _parse_lines(fh, path: Path, header: list[str], cols: list[int]) -> np.ndarray:
    rows: list[tuple[int, int, int]] = []
    for line_no, raw in enumerate(fh, start=2):
        text = raw.rstrip("\r\n")
        if not text.strip():
            continue
        fields = text.split("\t")
        if len(fields) != len(header):
            raise DataError(path, f"expected {len(header)} tab-separated fields, got {len(fields)}",
                            line_no)
        user, item, label = (_parse_int(fields[c], path, line_no, name)
                             for c, name in zip(cols, REQUIRED_COLUMNS))
        if user < 0 or item < 0:
            raise DataError(path, f"ids must be non-negative, got userID={user} itemID={item}",
                            line_no)
        if label not in (0, 1, 2):
            raise DataError(path, f"unknown x_label {label}; expected 0 (train), 1 (valid) or "
                                  f"2 (test)", line_no)
        rows.append((user, item, label))
    if not rows:
        raise DataError(path, "no interactions after the header")
    return np.asarray(rows, dtype=np.int64)


def _check_contiguous(ids: np.ndarray, path: Path, what: str) -> int:
    present = np.unique(ids)
    n = int(present[-1]) + 1
    if len(present) != n:
        gaps = np.setdiff1d(np.arange(n), present)
        shown = ", ".join(str(g) for g in gaps[:5]) + (" ..." if len(gaps) > 5 else "")
        raise DataError(path, f"{what} ids must be contiguous 0..{n - 1}; {len(gaps)} missing "
                              f"({shown}); re-map ids before loading")
    return n


def read_id_mapping(path: Path, column: str, n: int) -> list[str]:
    """Read ``external<TAB>integer`` rows; return the external id of each integer 0..n-1."""
    try:
        return _read_id_mapping(path, column, n)
    except UnicodeDecodeError:
        raise DataError(path, "not UTF-8 text") from None


def _read_id_mapping(path: Path, column: str, n: int) -> list[str]:
    out: list[str | None] = [None] * n
    with open(path, encoding="utf-8", newline="") as fh:
        reader = csv.reader(fh, delimiter="\t")
        header = next(reader, None)
        if header is None or column not in header or len(header) != 2:
            raise DataError(path, f"header must be '<external id>\\t{column}', got {header}", 1)
        idx = header.index(column)
        for line_no, fields in enumerate(reader, start=2):
            if not fields:
                continue
            if len(fields) != 2:
                raise DataError(path, f"expected 2 tab-separated fields, got {len(fields)}", line_no)
            num = _parse_int(fields[idx], path, line_no, column)
            if not 0 <= num < n:
                raise DataError(path, f"{column} {num} is outside the dataset's 0..{n - 1}", line_no)
            if out[num] is not None:
                raise DataError(path, f"{column} {num} is mapped twice", line_no)
            problem = id_problem(fields[1 - idx])
            if problem:
                raise DataError(path, f"{column} {num}: external id {fields[1 - idx][:60]!r}: "
                                      f"{problem}", line_no)
            out[num] = fields[1 - idx]
    missing = [i for i, v in enumerate(out) if v is None]
    if missing:
        raise DataError(path, f"{len(missing)} {column} value(s) have no external id (first: "
                              f"{missing[0]})")
    return out  # type: ignore[return-value]


def read_features(path: Path, n_items: int, of: str = "the dataset") -> np.ndarray:
    """Load a feature matrix (:func:`~cliper_prod.features.feature_folder.read_matrix`) and
    check its values."""
    arr = read_matrix(path, n_items, of)
    bad = ~np.isfinite(arr)
    if bad.any():
        row = int(np.argwhere(bad)[0, 0])
        raise DataError(path, f"{int(bad.sum())} NaN/Inf value(s), first in row {row} (item {row})")
    return np.ascontiguousarray(arr, dtype=np.float32)


def _drop_cold_users(splits: dict[str, np.ndarray], path: Path) -> dict[str, int]:
    """MMRec's rule: valid/test rows of users with no training interaction are removed, and counted."""
    train_users = np.unique(splits["train"][:, 0])
    dropped: dict[str, int] = {}
    for name in ("valid", "test"):
        keep = np.isin(splits[name][:, 0], train_users)
        dropped[name] = int((~keep).sum())
        if dropped[name]:
            users = len(np.unique(splits[name][~keep, 0]))
            log.warning("%s: %d %s interaction(s) of %d user(s) absent from train are excluded",
                        path, dropped[name], name, users)
        splits[name] = splits[name][keep]
    return dropped


def read_embedded_features(folder: Path, item_ids: list[str] | None, n_items: int
                           ) -> tuple[dict[str, np.ndarray], tuple[str, int] | None]:
    """Features written by ``cliper-prod embed`` (rows in ``item_ids.txt`` order), reordered
    to the dataset's item ids (its ``i_id_mapping.csv``, else the integer ids themselves), and,
    when their fusion is trained with the recommender, that mode and the number of views."""
    ids_path = folder / "item_ids.txt"
    if not ids_path.exists():
        raise DataError(ids_path, "not found: --features-dir must be an output folder of "
                                  "`cliper-prod embed`")
    rows = {item: r for r, item in enumerate(read_ids(ids_path))}
    wanted = item_ids if item_ids is not None else [str(i) for i in range(n_items)]
    missing = [item for item in wanted if item not in rows]
    if missing:
        raise DataError(ids_path, f"{len(missing)} of the dataset's {n_items} items have no "
                                  f"embedding (first: {missing[0]}); see errors.jsonl beside it")
    order = np.array([rows[item] for item in wanted])
    out = {}
    for modality, fname in FEATURE_FILES.items():
        feat = read_features(folder / fname, len(rows), ids_path.name)
        out[modality] = np.ascontiguousarray(feat[order])
    summary_path = folder / "embed_summary.json"
    summary = read_embed_summary(summary_path) if summary_path.exists() else {}
    mode = fusion_mode(summary.get("fusion", "sa"))
    return out, (mode.name, len(summary["views"])) if mode.trained_with_recommender else None


def load_dataset(root: str | Path, feature_files: dict[str, str] | None = None,
                 features_dir: Path | None = None) -> InteractionData:
    """Load an MMRec-format folder; ``feature_files`` maps modality -> file name (default both;
    ``{}``: none, for a model that reads none); ``features_dir`` takes the features from an
    embed output folder instead."""
    root = Path(root)
    inter_path = find_inter_file(root)
    rows = read_inter(inter_path)
    n_users = _check_contiguous(rows[:, 0], inter_path, "userID")
    n_items = _check_contiguous(rows[:, 1], inter_path, "itemID")

    splits = {name: rows[rows[:, 2] == label][:, :2].copy() for label, name in enumerate(SPLITS)}
    if len(splits["train"]) == 0:
        raise DataError(inter_path, "the train split (x_label 0) is empty")
    pairs = rows[:, 0] * n_items + rows[:, 1]
    uniq, first, counts = np.unique(pairs, return_index=True, return_counts=True)
    if (counts > 1).any():
        dup = int(uniq[counts > 1][0])
        raise DataError(inter_path, f"duplicate interaction userID={dup // n_items} "
                                    f"itemID={dup % n_items} ({int((counts > 1).sum())} duplicated "
                                    f"pair(s)); each pair may appear once")
    dropped = _drop_cold_users(splits, inter_path)

    user_ids = item_ids = None
    if (root / "u_id_mapping.csv").exists():
        user_ids = read_id_mapping(root / "u_id_mapping.csv", "userID", n_users)
    if (root / "i_id_mapping.csv").exists():
        item_ids = read_id_mapping(root / "i_id_mapping.csv", "itemID", n_items)

    trained_fusion = None
    if features_dir is not None:
        features, trained_fusion = read_embedded_features(Path(features_dir), item_ids, n_items)
    else:
        features = {}
        for modality, fname in (FEATURE_FILES if feature_files is None else feature_files
                                ).items():
            fpath = root / fname
            if fpath.exists():
                features[modality] = read_features(fpath, n_items)
            elif feature_files is not None:
                raise DataError(fpath, f"{modality} feature file not found")

    return InteractionData(name=inter_path.stem, root=root, n_users=n_users, n_items=n_items,
                           splits=splits, features=features, user_ids=user_ids,
                           item_ids=item_ids, dropped_cold=dropped,
                           features_dir=Path(features_dir) if features_dir else None,
                           **({"text_fusion": trained_fusion[0], "text_views": trained_fusion[1]}
                              if trained_fusion else {}))
