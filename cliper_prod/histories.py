"""Users' training items as CSR tables, and the (row, item) pairs a batch of users excludes.

Torch-free: the exporter writes the tables into the bundle and the runtime reads them back. The
pairs of a batch are as many as its users' own training items, so a user with 100k interactions
costs their own batch 100k pairs and nobody else anything.
"""

from __future__ import annotations

import numpy as np


def training_csr(pairs: np.ndarray, n_users: int) -> tuple[np.ndarray, np.ndarray]:
    """(user, item) rows -> (indptr [U+1] int64, items int32): each user's items, ascending."""
    order = np.lexsort((pairs[:, 1], pairs[:, 0]))
    counts = np.bincount(pairs[:, 0], minlength=n_users)
    indptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    return indptr, pairs[order, 1].astype(np.int32)


def history_pairs(indptr: np.ndarray, items: np.ndarray, rows: np.ndarray
                  ) -> tuple[np.ndarray, np.ndarray]:
    """(position in ``rows``, item) for every training item of the users ``rows``, int64."""
    rows = np.asarray(rows, dtype=np.int64)
    starts, ends = indptr[rows], indptr[rows + 1]
    counts = ends - starts
    total = int(counts.sum())
    positions = np.repeat(np.arange(len(rows), dtype=np.int64), counts)
    # slot of each pair: its user's start plus its rank among that user's pairs
    offsets = np.repeat(starts - np.concatenate([[0], np.cumsum(counts)[:-1]]), counts)
    slots = offsets + np.arange(total, dtype=np.int64)
    return positions, np.asarray(items[slots], dtype=np.int64)
