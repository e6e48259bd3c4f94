"""New users and new items in a trained model without retraining: each backbone's own
propagation rule applied to one more node, every trained node kept as it is.

A bundle exported from a backbone that supports it holds the rule names, their parameters and
the arrays they read (manifest ``fold_in``, files ``fold_in.<name>.npy``). A new node has no
trained ID embedding: it enters its rule as zero, and its representation is what the graph
propagates into it from its neighbours.

Users, from a history H of known items (duplicates count once); e_i^(l) is item i's
layer-l representation in the trained user-item propagation, L its number of layers:

- ``symmetric`` (LightGCN, FREEDOM; D^-1/2 A D^-1/2): u^(l) = sum_i e_i^(l-1) / sqrt(|H|
  (d_i + 1)) with d_i the item's training degree (+1: the new edge), u = (u^(1) + ... + u^(L))
  / (L + 1) (u^(0), the ID embedding, is zero);
- ``mean_self_loop`` (LATTICE; D^-1 (A + I)): u^(l) = (u^(l-1) + sum_i e_i^(l-1)) / (|H| + 1),
  u = mean of u^(0..L).

Items, from their features (the modalities the item graph was built from):

- ``freedom``: per modality m, the new item's row of the kNN graph is itself plus its k-1 most
  cosine-similar items, each weighted 1/k (every row of FREEDOM's graph has k entries); the
  modalities are mixed by their weights. x^(0) = 0 for the new item, x^(l) = S x^(l-1) over
  the stored x^(l-1) of the other items, and the item's embedding is x^(L_m) (its LightGCN part
  is zero: no ID embedding, no interactions). Other items' rows are unchanged.
- ``lattice``: the new row of LATTICE's item graph, (1 - lambda) x its learned part (cosine
  kNN of the projected features, the new item's raw features through the trained projection,
  modalities mixed by softmax(modal_weight), normalised by the weighted row sums of both ends)
  + lambda x its frozen part (cosine kNN of the raw features, normalised so per modality, then
  mixed); x^(l) as for FREEDOM, and the embedding is x^(L) / ||x^(L)||.

Backbones without an item graph (LightGCN, VBPR, MMGCN, DualGNN, SLMRec) cannot place an item
that has no interactions by a rule of their own (the cold-start student can:
:mod:`cliper_prod.runtime.cold_student`); backbones without a stored user rule cannot fold in
users. Both are refused with a :class:`~cliper_prod.errors.BundleError` that says so.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cliper_prod.bundle_format import FOLD_IN
from cliper_prod.errors import BundleError, ConfigError
from cliper_prod.runtime.bundle_reader import Bundle

USER_RULES = ("symmetric", "mean_self_loop")
NO_STATE = ("the bundle holds no fold-in state (exported before fold-in existed, or from "
            "tables without a checkpoint): re-export it")
QUERY_CHUNK = 256  # new items compared with the catalog at a time: memory chunk x catalog


def unit_rows(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (zero rows stay zero), float32: cosine as a dot product."""
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.where(norms > 0, norms, 1.0)


@dataclass(frozen=True)
class PlacedItems:
    """New items' embeddings, and the fold-in arrays with the new items appended (so that a
    bundle made from them can take further items and users)."""

    vectors: np.ndarray
    arrays: dict[str, np.ndarray]


class FoldIn:
    """The fold-in rules of one bundle (its manifest's ``fold_in`` record and arrays)."""

    def __init__(self, folder: Path, record: dict[str, Any] | None, backbone: str | None) -> None:
        self.folder, self.backbone = folder, backbone
        record = record or {"user_rule": None, "item_rule": None, "arrays": {}, "params": {
            "no_user_rule": NO_STATE, "no_item_rule": NO_STATE}}
        self.user_rule, self.item_rule = record["user_rule"], record["item_rule"]
        self.params: dict[str, Any] = record["params"]
        self.files: dict[str, str] = record["arrays"]
        self.modalities: list[str] = list(self.params.get("modalities", []))
        self._arrays: dict[str, np.ndarray] = {}

    @classmethod
    def of(cls, bundle: Bundle) -> FoldIn:
        """The fold-in rules of an opened bundle."""
        manifest = bundle.manifest
        return cls(bundle.folder, manifest.get(FOLD_IN), manifest.get("backbone"))

    @classmethod
    def in_memory(cls, record: dict[str, Any], arrays: dict[str, np.ndarray],
                  backbone: str | None) -> FoldIn:
        """The rules of a model being exported (``record`` as the manifest will hold it, the
        arrays not yet written): the cold-start student trains on their output."""
        fold = cls(Path("."), {**record, "arrays": {name: name for name in arrays}}, backbone)
        fold._arrays = dict(arrays)
        return fold

    def array(self, name: str) -> np.ndarray:
        """One fold-in array, memory-mapped once: a bundle swapped in under the same folder
        later is not read, as the process's sessions are not."""
        if name not in self._arrays:
            self._arrays[name] = np.load(self.folder / self.files[name], mmap_mode="r")
        return self._arrays[name]

    @property
    def model(self) -> str:
        return f"a {self.backbone} model" if self.backbone else "this bundle's model"

    # -- users --------------------------------------------------------------------------------

    def user_rule_problem(self) -> str | None:
        """Why users cannot be folded in (no server path in it: a service answers with it),
        or None."""
        if self.user_rule in USER_RULES:
            return None
        return (f"cannot fold in users of {self.model}: "
                f"{self.params.get('no_user_rule', 'no user fold-in rule')}")

    def informative(self, rows: np.ndarray) -> bool:
        """Whether a history of item ``rows`` reaches a user: items without interactions
        (added by add-items) have zero layer representations and fold in nothing."""
        return bool((self.array("item_degree")[rows] > 0).any())

    def users(self, histories: Sequence[np.ndarray]) -> np.ndarray:
        """[B, D] float32 user vectors from item-row histories (each non-empty)."""
        problem = self.user_rule_problem()
        if problem:
            raise BundleError(f"{self.folder}: {problem}")
        layers, degree = self.array("item_layers"), self.array("item_degree")
        n_layers = layers.shape[0]
        out = np.zeros((len(histories), layers.shape[2]), dtype=np.float64)
        for b, history in enumerate(histories):
            items = np.unique(np.asarray(history, dtype=np.int64))
            h = layers[:, items, :].astype(np.float64)  # [L, |H|, D]
            if self.user_rule == "symmetric":
                coeff = 1.0 / np.sqrt(len(items) * (degree[items].astype(np.float64) + 1.0))
                out[b] = np.einsum("lhd,h->d", h, coeff) / (n_layers + 1)
            else:
                u, total = np.zeros(h.shape[2]), np.zeros(h.shape[2])
                for layer in h:
                    u = (u + layer.sum(0)) / (len(items) + 1)
                    total += u
                out[b] = total / (n_layers + 1)
        return out.astype(np.float32)

    # -- items --------------------------------------------------------------------------------

    def item_rule_problem(self) -> str | None:
        """Why items cannot be folded in (the backbone's reason), or None."""
        if self.item_rule not in ITEM_ROWS:
            return self.params.get("no_item_rule", "no item fold-in rule")
        if len(self.array("graph_layers")) == 0:
            return ("it propagates nothing over its item graph (n_mm_layers = 0), so a new "
                    "item would be a zero vector")
        return None

    def require_item_rule(self) -> None:
        """Refuse, with the backbone's reason, a model whose items cannot be folded in."""
        problem = self.item_rule_problem()
        if problem:
            raise BundleError(f"{self.folder}: cannot add items to {self.model}: {problem}")

    def padded_arrays(self, n_new: int) -> dict[str, np.ndarray]:
        """Every fold-in array, the user rule's per-item ones with ``n_new`` items appended
        that have no interactions (zero layers and degree): a later history may name them
        and folds nothing in from them. What a bundle whose backbone has no item rule (the
        cold-start student placed its new items) stores after add-items."""
        arrays = {name: self.array(name) for name in self.files}
        if "item_layers" in arrays:
            layers = arrays["item_layers"]
            arrays["item_layers"] = np.concatenate(
                [layers, np.zeros((layers.shape[0], n_new, layers.shape[2]), np.float32)], 1)
        if "item_degree" in arrays:
            arrays["item_degree"] = np.concatenate([arrays["item_degree"],
                                                    np.zeros(n_new, np.float32)])
        return arrays

    def items(self, features: dict[str, np.ndarray], leave_out: np.ndarray | None = None
              ) -> PlacedItems:
        """Embeddings of new items from their features ({modality: [Q, d]}, the modalities of
        ``self.modalities``, in the space the model's item graph was built from).

        ``leave_out`` (training only): query q is the trained item ``leave_out[q]``, placed as
        if it were new, left out of its own neighbours, so a student learns what the rule gives an
        item it has never seen."""
        self.require_item_rule()
        missing = [m for m in self.modalities if m not in features]
        if missing:
            raise ConfigError(f"add-items needs the new items' {', '.join(missing)} features "
                              f"(the model's item graph was built from {self.modalities})")
        for m in self.modalities:
            expected = self.array(f"knn_{m}").shape[1]
            if features[m].ndim != 2 or features[m].shape[1] != expected:
                raise ConfigError(f"the new items' {m} features have shape "
                                  f"{features[m].shape}; the model's are {expected}-d")
        rows = ITEM_ROWS[self.item_rule](self, features, leave_out)
        graph_layers = self.array("graph_layers")  # [L_m, n, D]: x^(0..L_m-1) of known items
        n_new, d = len(rows.self_weight), graph_layers.shape[2]
        x = np.zeros((n_new, d), dtype=np.float64)  # x^(0): no ID embedding
        new_layers = [x]
        for layer in graph_layers:
            x = rows.self_weight[:, None] * x + _scatter_rows(
                rows.row, rows.val, np.asarray(layer[rows.col], np.float64), n_new)
            new_layers.append(x)
        vectors = new_layers[-1]
        if self.params.get("normalize"):  # LATTICE adds h / ||h||
            vectors = unit_rows(vectors)
        arrays = self.padded_arrays(n_new) | {
            "graph_layers": np.concatenate(
                [graph_layers, np.asarray(new_layers[:-1], np.float32).reshape(
                    len(graph_layers), n_new, d)], axis=1)}
        arrays |= {name: np.concatenate([self.array(name), appended.astype(np.float32)])
                   for name, appended in rows.appended.items()}
        return PlacedItems(vectors.astype(np.float32), arrays)


@dataclass(frozen=True)
class NewRows:
    """The new items' rows of the item graph: entries (row, known item, weight), each row's
    weight on itself, and what the new items append to the per-item arrays of the rule."""

    row: np.ndarray
    col: np.ndarray
    val: np.ndarray
    self_weight: np.ndarray
    appended: dict[str, np.ndarray]


def _knn_entries(table: np.ndarray, queries: np.ndarray, k: int,
                 leave_out: np.ndarray | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each query's k-1 nearest known items (the query itself is the k-th): rows, items and
    cosines, flat; query q's own row ``leave_out[q]`` left out when given."""
    if leave_out is None:
        neighbours = nearest(table, queries, k - 1)
    else:
        neighbours = nearest(table, queries, k)
        drop = neighbours == leave_out[:, None]
        drop[~drop.any(1), -1] = True  # not among them (a tie): drop the farthest instead
        neighbours = neighbours[~drop].reshape(len(queries), -1)
    cos = np.einsum("qd,qkd->qk", queries, np.asarray(table)[neighbours])
    return np.repeat(np.arange(len(queries)), neighbours.shape[1]), neighbours.reshape(-1), \
        cos.reshape(-1).astype(np.float64)


def _freedom_rows(fold: FoldIn, features: dict[str, np.ndarray],
                  leave_out: np.ndarray | None) -> NewRows:
    """FREEDOM: per modality, itself and k-1 neighbours, each 1/k, mixed by the weights."""
    k, weights = int(fold.params["knn_k"]), fold.params["modality_weights"]
    parts, appended = [], {}
    for m in fold.modalities:
        units = unit_rows(features[m])
        row, col, _ = _knn_entries(fold.array(f"knn_{m}"), units, k, leave_out)
        parts.append((row, col, np.full(len(row), weights[m] / k)))
        appended[f"knn_{m}"] = units
    n_new = len(units)
    self_weight = np.full(n_new, sum(weights[m] for m in fold.modalities) / k)
    return NewRows(*(np.concatenate(a) for a in zip(*parts)), self_weight, appended)


def _lattice_rows(fold: FoldIn, features: dict[str, np.ndarray],
                  leave_out: np.ndarray | None) -> NewRows:
    """LATTICE: (1 - lambda) x the learned graph (cosine kNN of the projected features, mixed
    by softmax(modal_weight), normalised by the weighted row sums of both ends) + lambda x the
    frozen graphs (cosine kNN of the raw features, each normalised so, then mixed); the new
    item's raw features go through the trained projections."""
    k, lam, mix = int(fold.params["knn_k"]), float(fold.params["lambda"]), fold.params["mix"]
    learned, frozen, appended = [], [], {}
    learned_degree = 0.0
    self_weight = 0.0
    for m in fold.modalities:
        raw = unit_rows(features[m])
        row, col, cos = _knn_entries(fold.array(f"knn_{m}"), raw, k, leave_out)
        degree = 1.0 + np.bincount(row, cos, minlength=len(raw))  # the item itself: cosine 1
        known = fold.array(f"frozen_degree_{m}")[col]
        frozen.append((row, col, lam * mix[m] * cos / np.sqrt(degree[row] * known)))
        self_weight = self_weight + lam * mix[m] / degree
        projected = unit_rows(np.asarray(features[m], np.float64)
                              @ fold.array(f"proj_weight_{m}") + fold.array(f"proj_bias_{m}"))
        row, col, cos = _knn_entries(fold.array(f"learned_{m}"), projected, k, leave_out)
        learned.append((row, col, mix[m] * cos))
        learned_degree = learned_degree + mix[m] * (1.0 + np.bincount(row, cos,
                                                                      minlength=len(raw)))
        appended |= {f"knn_{m}": raw, f"frozen_degree_{m}": degree, f"learned_{m}": projected}
    known_degree = fold.array("learned_degree")
    learned = [(row, col, (1 - lam) * val / np.sqrt(learned_degree[row] * known_degree[col]))
               for row, col, val in learned]
    self_weight = self_weight + (1 - lam) * sum(mix[m] for m in fold.modalities) / learned_degree
    appended["learned_degree"] = learned_degree
    return NewRows(*(np.concatenate(a) for a in zip(*(learned + frozen))), self_weight,
                   appended)


#: each item rule's way to the new rows of its graph
ITEM_ROWS = {"freedom": _freedom_rows, "lattice": _lattice_rows}


def nearest(table: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    """[Q, k] rows of ``table`` with the largest dot product with each query (unit rows:
    cosine), exact, scanning the table once per chunk of queries."""
    k = min(k, len(table))
    out = np.empty((len(queries), k), dtype=np.int64)
    for start in range(0, len(queries), QUERY_CHUNK):
        sims = queries[start:start + QUERY_CHUNK] @ np.asarray(table).T
        top = np.argpartition(-sims, k - 1, axis=1)[:, :k]
        order = np.argsort(-np.take_along_axis(sims, top, 1), axis=1, kind="stable")
        out[start:start + len(sims)] = np.take_along_axis(top, order, 1)
    return out


def _scatter_rows(row: np.ndarray, val: np.ndarray, x: np.ndarray, n: int) -> np.ndarray:
    """sum over entries e of val[e] * x[e] into out[row[e]]."""
    out = np.zeros((n, x.shape[1]), dtype=np.float64)
    np.add.at(out, row, val[:, None] * x)
    return out
