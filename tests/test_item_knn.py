"""The item kNN graph's methods against a naive numpy brute force: exact ones return the same
neighbour sets, approximate ones keep most of them and say how many (sampled recall)."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from cliper_prod.errors import ConfigError
from cliper_prod.item_knn import KNN_METHODS, knn_neighbours, sampled_recall

pytest.importorskip("faiss")


def _clustered(n: int = 3000, dim: int = 32, seed: int = 0) -> np.ndarray:
    """Items around 60 centres: neighbourhoods an index can find (pure noise has none)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((60, dim))
    return (centres[rng.integers(0, 60, n)] + 0.5 * rng.standard_normal((n, dim))
            ).astype(np.float32)


def _naive(x: np.ndarray, k: int) -> np.ndarray:
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    return np.argsort(-(unit @ unit.T), axis=1, kind="stable")[:, :k]


@pytest.mark.parametrize("method", ["exact", "faiss-flat"])
def test_exact_methods_find_the_brute_force_neighbours(method: str) -> None:
    x = _clustered(800)
    got = knn_neighbours(torch.from_numpy(x), 10, method).numpy()
    ref = _naive(x, 10)
    same = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(got, ref)])
    assert same > 0.999  # float ties aside
    assert (got[:, 0] == np.arange(len(x))).mean() > 0.99  # the item itself comes first


@pytest.mark.parametrize("method", ["faiss-ivf", "faiss-hnsw"])
def test_approximate_methods_keep_most_neighbours_and_log_their_recall(
        method: str, caplog: pytest.LogCaptureFixture) -> None:
    x = _clustered()
    with caplog.at_level(logging.INFO, logger="cliper_prod.item_knn"):
        got = knn_neighbours(torch.from_numpy(x), 10, method)
    ref = _naive(x, 10)
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(got.numpy(), ref)])
    assert recall > 0.8
    logged = [r.getMessage() for r in caplog.records if "recall@10" in r.getMessage()]
    assert len(logged) == 1
    sampled = float(logged[0].rsplit("= ", 1)[1])
    assert abs(sampled - recall) < 0.05  # 1000 of 3000 items: close to the full figure
    assert got.shape == (len(x), 10) and int(got.min()) >= 0


def test_sampled_recall_counts_shared_neighbours() -> None:
    x = torch.nn.functional.normalize(torch.from_numpy(_clustered(200)), dim=1)
    exact = torch.from_numpy(_naive(x.numpy(), 5))
    assert sampled_recall(x, exact, 5) == pytest.approx(1.0)
    half = exact.clone()
    half[:, 3:] = (exact[:, 3:] + 1) % 200  # 2 of 5 replaced (mostly by non-neighbours)
    assert 0.55 < sampled_recall(x, half, 5) <= 0.65


def test_an_unknown_method_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="knn_method must be one of"):
        knn_neighbours(torch.zeros(4, 2), 2, "annoy")
    assert sorted(KNN_METHODS) == ["exact", "faiss-flat", "faiss-hnsw", "faiss-ivf"]
