"""The chunk-major item table of the top-K graph's CPU form (:class:`~.scoring.TopKScorer`),
built in numpy: the exporter registers it as the module's buffers, and ``add-items`` writes a
longer one into the graph without torch (:mod:`cliper_prod.export.topk_table`)."""

from __future__ import annotations

import numpy as np

#: Score of padding items: below every real score, above the -inf of excluded items.
FLOOR = -3.0e38


def chunked_table(items: np.ndarray, chunk: int) -> dict[str, np.ndarray]:
    """``chunks`` [C, D + 1, chunk + 1] (a chunk's items as columns, a last row giving padding
    items :data:`FLOOR`, a spare last column that exclusions outside the chunk land in) and
    ``firsts`` [C] (each chunk's first item) for ``items`` [N, D], C = ceil(N / chunk)."""
    n_items, dim = items.shape
    n_chunks = -(-n_items // chunk)
    rows = np.zeros((n_chunks * chunk, dim + 1), np.float32)
    rows[:n_items, :dim] = items
    rows[n_items:, dim] = FLOOR  # padding items
    spare = np.zeros((n_chunks, 1, dim + 1), np.float32)
    spare[..., dim] = FLOOR
    table = np.concatenate([rows.reshape(n_chunks, chunk, dim + 1), spare], axis=1)
    return {"chunks": np.ascontiguousarray(table.transpose(0, 2, 1)),
            "firsts": np.arange(n_chunks, dtype=np.int64) * chunk}
