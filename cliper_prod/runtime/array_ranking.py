"""Array-in, array-out ranking for the Python API (``Recommender.recommend`` and
``Recommender.similar_items``), at a bounded memory whatever the number of users.

``recommend`` ranks users in batches of ``batch_size`` (1,024: the CLI's batch), each batch one
run of the top-K graph, so its peak memory is the CLI's: per batch the graph holds
``batch_size x chunk_items x 4`` bytes of scores. Per-user exclusions (and, with
``filter_seen``, the training items) enter the graph as (row, item) pairs, so they are masked
before the top K is taken: exact, and with no extra ``k``. An allowlist (``items``) is not a
mask the graph can take cheaply (its complement may be most of the catalog), so an allowlisted
query is scored from the bundle's item table in numpy: ``queries @ table[allowed].T`` with the
same pairs masked, then an exact top K; a batch then holds at most :data:`SCORE_BYTES` of scores
(rows per batch shrink as the allowlist grows) and as many bytes of indices. Both are equal
to a full naive scoring with masks (the allowlist path's scores within float32 rounding of the
graph's: numpy and ONNX Runtime sum the products in their own orders).

``similar_items`` is cosine similarity on the served item table: the table's dot product is the
user-item score, and between two items it favours long (popular) vectors, so every item would
have the same few neighbours; cosine compares directions only. The item itself is left out.
It holds a unit-length copy of the item table (items x dim x 4 bytes) once asked, and batches
of at most :data:`SCORE_BYTES` of similarities.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import cached_property
from typing import NamedTuple

import numpy as np

from cliper_prod.messages import preview_ids
from cliper_prod.runtime.ranking import Pairs, QueryError, TopKRanker

#: Users per top-K graph run (the CLI's ``--batch-size`` default).
BATCH_USERS = 1024
#: Most bytes of one batch's score matrix when scoring from the item table (allowlists,
#: similar items); the top-K indices of that batch take as many again.
SCORE_BYTES = 256 << 20

Ranked = tuple[np.ndarray, np.ndarray]  # ids (object, None as padding), scores (-inf padding)


class Allowlist(NamedTuple):
    """Items a query may rank: their rows, their rows of the item table, and the column of
    each item row among them (-1: not allowed)."""

    rows: np.ndarray
    table: np.ndarray
    column: np.ndarray


def top_k(scores: np.ndarray, k: int) -> Ranked:
    """The ``k`` best columns of each row, best first, and their scores; a row with fewer
    than ``k`` finite scores is padded with column -1 and score ``-inf``."""
    kk = min(k, scores.shape[1])
    part = np.argpartition(-scores, kk - 1, axis=1)[:, :kk] if kk < scores.shape[1] else \
        np.broadcast_to(np.arange(kk), (len(scores), kk))
    best = np.take_along_axis(scores, part, 1)
    order = np.argsort(-best, axis=1, kind="stable")
    cols, best = np.take_along_axis(part, order, 1), np.take_along_axis(best, order, 1)
    cols = np.where(np.isfinite(best), cols, -1)
    pad = k - kk
    if pad:
        cols = np.pad(cols, ((0, 0), (0, pad)), constant_values=-1)
        best = np.pad(best, ((0, 0), (0, pad)), constant_values=-np.inf)
    return cols, np.where(cols >= 0, best, -np.inf).astype(np.float32)


class ArrayRanker:
    """:class:`TopKRanker` queries in arrays and in batches (see the module docstring)."""

    def __init__(self, ranker: TopKRanker, batch_size: int = BATCH_USERS) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1; got {batch_size}")
        self.ranker, self.batch_size = ranker, batch_size

    @cached_property
    def table(self) -> np.ndarray:
        """The served item table (the rows the top-K graph scores), memory-mapped."""
        bundle = self.ranker.bundle
        return np.load(bundle.folder / bundle.manifest["tables"]["items"], mmap_mode="r")

    @cached_property
    def unit_table(self) -> np.ndarray:
        """The item table with rows of length 1 (a zero row stays zero: cosine 0)."""
        table = np.asarray(self.table, dtype=np.float32)
        norms = np.linalg.norm(table, axis=1, keepdims=True)
        return table / np.where(norms > 0, norms, 1)

    def item_rows(self, item_ids: Sequence[str], what: str) -> np.ndarray:
        """The rows of ``item_ids`` (each once, in order); an unknown id is a QueryError."""
        index = self.ranker.item_index
        unknown = [i for i in item_ids if i not in index]
        if unknown:
            raise QueryError(f"{what}: unknown item id(s) {preview_ids(unknown)}")
        rows = dict.fromkeys(index[i] for i in item_ids)
        return np.fromiter(rows, np.int64, len(rows))

    def exclusion_pairs(self, exclude: Sequence[Sequence[str]] | None, users: int
                        ) -> Pairs:
        """(user position, item row) for each per-user exclusion, positions ascending."""
        if exclude is None:
            return np.empty(0, np.int64), np.empty(0, np.int64)
        if isinstance(exclude, str) or len(exclude) != users:
            raise QueryError(f"exclude: one sequence of item ids per user ({users}); got "
                             f"{'a string' if isinstance(exclude, str) else len(exclude)}")
        rows = [self.item_rows([] if e is None else e, f"exclude of user {n + 1}")
                for n, e in enumerate(exclude)]
        positions = np.repeat(np.arange(users, dtype=np.int64), [len(r) for r in rows])
        return positions, np.concatenate(rows) if rows else np.empty(0, np.int64)

    def recommend(self, user_ids: Sequence[str], k: int, *,
                  exclude: Sequence[Sequence[str]] | None = None,
                  items: Sequence[str] | None = None, filter_seen: bool = True) -> Ranked:
        """The top ``k`` item ids and scores of each user, ``[len(user_ids), k]`` arrays."""
        ranker = self.ranker
        ranker.check_k(k)
        rows = ranker.rows(list(user_ids))
        positions, excluded = self.exclusion_pairs(exclude, len(rows))
        allowed = None if items is None else self.allowlist(items)
        step = self.batch_size if allowed is None else \
            max(1, min(self.batch_size, SCORE_BYTES // (4 * len(allowed.rows))))
        cols = np.full((len(rows), k), -1, np.int64)
        scores = np.full((len(rows), k), -np.inf, np.float32)
        for start in range(0, len(rows), step):
            batch = rows[start:start + step]
            a, b = np.searchsorted(positions, [start, start + len(batch)])
            extra = positions[a:b] - start, excluded[a:b]
            if allowed is None:
                top_items, top_scores = ranker.rank(batch, extra, filter_seen)
                cols[start:start + len(batch)] = top_items[:, :k]
                scores[start:start + len(batch)] = top_scores[:, :k]
            else:
                got, scores[start:start + len(batch)] = self._score_allowed(
                    batch, allowed, ranker.pairs(batch, extra, filter_seen), k)
                cols[start:start + len(batch)] = np.where(got >= 0, allowed.rows[got], -1)
        return self._ids(cols), scores

    def allowlist(self, items: Sequence[str]) -> Allowlist:
        """The allowed rows, their rows of the item table and each item row's column."""
        rows = self.item_rows(items, "items")
        column = np.full(len(self.ranker.item_ids), -1, np.int64)
        column[rows] = np.arange(len(rows))
        return Allowlist(rows, np.asarray(self.table[rows], np.float32), column)

    def _score_allowed(self, batch: np.ndarray, allowed: Allowlist, pairs: Pairs, k: int
                       ) -> Ranked:
        """Exact top ``k`` among the allowed items (columns into them), the pairs masked."""
        scores = np.asarray(self.ranker.queries[batch], np.float32) @ allowed.table.T
        cols = allowed.column[pairs[1]]
        inside = cols >= 0
        scores[pairs[0][inside], cols[inside]] = -np.inf
        return top_k(scores, k)

    def similar_items(self, item_ids: Sequence[str], k: int) -> Ranked:
        """The ``k`` items of highest cosine similarity to each item (itself left out)."""
        n_items = len(self.ranker.item_ids)
        if not 1 <= k < n_items:
            raise QueryError(f"k={k}: similar items ranks 1 to {n_items - 1} items (the "
                             f"catalog less the item itself)")
        rows = np.fromiter((self._one_row(i) for i in item_ids), np.int64, len(item_ids))
        table = self.unit_table
        step = max(1, min(self.batch_size, SCORE_BYTES // (4 * n_items)))
        cols = np.empty((len(rows), k), np.int64)
        scores = np.empty((len(rows), k), np.float32)
        for start in range(0, len(rows), step):
            batch = rows[start:start + step]
            sims = table[batch] @ table.T
            sims[np.arange(len(batch)), batch] = -np.inf
            cols[start:start + step], scores[start:start + step] = top_k(sims, k)
        return self._ids(cols), scores

    def _one_row(self, item_id: str) -> int:
        row = self.ranker.item_index.get(item_id)
        if row is None:
            raise QueryError(f"unknown item id(s) {preview_ids([item_id])}")
        return row

    def _ids(self, cols: np.ndarray) -> np.ndarray:
        """Item ids of columns; -1 (padding) is None."""
        return np.where(cols >= 0, self.ranker.item_ids[cols], None)
