"""Shared fixtures: tiny MMRec-format folders written by hand."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest


def write_inter(folder: Path, rows: list[tuple], header: str = "userID\titemID\tx_label",
                name: str = "toy") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.inter"
    lines = [header] + ["\t".join(str(v) for v in r) for r in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def toy_rows(n_users: int = 30, n_items: int = 20, per_user: int = 8, seed: int = 0) -> list[tuple]:
    """Random interactions, every item in train, >= 1 valid and test row per user."""
    rng = np.random.default_rng(seed)
    rows = []
    for u in range(n_users):
        items = rng.choice(n_items, size=per_user, replace=False)
        labels = [0] * (per_user - 2) + [1, 2]
        rows += [(u, int(i), lab) for i, lab in zip(items, labels)]
    seen = {(i) for u, i, lab in rows if lab == 0}
    rows += [(0, i, 0) for i in range(n_items) if i not in seen and (0, i) not in
             {(u, it) for u, it, _ in rows}]
    return rows


@pytest.fixture
def toy_dataset(tmp_path: Path) -> Path:
    """A 30-user, 20-item folder with 16-d image and 8-d text features."""
    folder = tmp_path / "toy"
    write_inter(folder, toy_rows())
    rng = np.random.default_rng(1)
    np.save(folder / "image_feat.npy", rng.standard_normal((20, 16)).astype(np.float32))
    np.save(folder / "text_feat.npy", rng.standard_normal((20, 8)).astype(np.float32))
    return folder
