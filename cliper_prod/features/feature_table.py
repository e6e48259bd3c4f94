"""``embed --out-format parquet``: the features as one Parquet table beside the MMRec files.

``features.parquet`` holds ``item_id`` (string) and ``image_feat`` / ``text_feat`` (fixed-size
lists of float32), row for row the rows of ``item_ids.txt``, ``image_feat.npy`` and
``text_feat.npy``, for readers that take Parquet (Ray Data, Spark, pandas, a vector store's
loader). The schema metadata key ``cliper`` holds the run's summary as JSON (dims, CLIP source,
fusion, views, ...), so the table says how it was made. It is written from the merged .npy files
one row group at a time (memory stays one group wide), under a temporary name renamed when
complete.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from cliper_prod.features.parquet_catalog import arrow
from cliper_prod.io import atomic_path

TABLE = "features.parquet"
ROWS_PER_GROUP = 4096


def write_feature_table(out_dir: Path, ids: list[str], summary: dict) -> Path:
    """Write ``out_dir/features.parquet`` from ``ids`` and the .npy files there."""
    pa, pq = arrow()
    image = np.load(out_dir / "image_feat.npy", mmap_mode="r")
    text = np.load(out_dir / "text_feat.npy", mmap_mode="r")
    schema = pa.schema([("item_id", pa.string()),
                        ("image_feat", pa.list_(pa.float32(), image.shape[1])),
                        ("text_feat", pa.list_(pa.float32(), text.shape[1]))],
                       metadata={"cliper": json.dumps(summary, sort_keys=True)})
    with atomic_path(out_dir / TABLE) as tmp, pq.ParquetWriter(tmp, schema) as writer:
        for start in range(0, len(ids), ROWS_PER_GROUP):
            rows = slice(start, start + ROWS_PER_GROUP)
            writer.write_batch(pa.record_batch(
                [pa.array(ids[rows], pa.string()), _vectors(pa, image[rows]),
                 _vectors(pa, text[rows])], schema=schema))
    return out_dir / TABLE


def _vectors(pa, rows: np.ndarray):
    """A [n, d] float32 matrix as n fixed-size lists of d floats."""
    flat = pa.array(np.ascontiguousarray(rows, dtype=np.float32).reshape(-1))
    return pa.FixedSizeListArray.from_arrays(flat, rows.shape[1])
