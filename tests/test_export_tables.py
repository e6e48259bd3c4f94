"""A bundle straight from embedding tables: exported, verified, ranked like naive numpy."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from cliper_prod.export.bundle_writer import EmbeddingTables, GraphOptions, export_tables
from cliper_prod.runtime.recommender import Recommender


def test_tables_bundle_ranks_like_naive_numpy_over_several_chunks(tmp_path: Path) -> None:
    gen = torch.Generator().manual_seed(5)
    users, items = torch.randn(30, 6, generator=gen), torch.randn(500, 6, generator=gen)
    rng = np.random.default_rng(5)
    train = np.unique(np.stack([rng.integers(0, 30, 400), rng.integers(0, 500, 400)], 1), axis=0)
    item_ids = [f"i{n}" for n in range(500)]
    tables = EmbeddingTables(users, items, train, [f"u{n}" for n in range(30)], item_ids)
    manifest = export_tables(tables, tmp_path / "b", options=GraphOptions(
        max_k=15, chunk_items=64, torchscript=False, fp16=False, fused=False))
    assert manifest["graphs"]["topk"]["chunk_items"] == 64 and manifest["features"] is None
    got = Recommender(tmp_path / "b", provider="cpu").topk([f"u{n}" for n in range(30)], k=15)
    scores = users.numpy() @ items.numpy().T
    scores[train[:, 0], train[:, 1]] = -np.inf
    for u, rec in enumerate(got):
        assert rec["items"] == [item_ids[i] for i in np.argsort(-scores[u], kind="stable")[:15]]
