"""Top-K scorer against a naive numpy reference: full score matrix, training items set to -inf,
stable argsort. Chunked or not, in PyTorch and as an ONNX graph, the results must agree."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from cliper_prod.export.graphs import GraphSpec, export_onnx
from cliper_prod.runtime.sessions import Graph
from cliper_prod.scoring import TopKScorer, training_csr


def _problem(n_users: int = 40, n_items: int = 230, dim: int = 8, seed: int = 0):
    rng = np.random.default_rng(seed)
    users = rng.standard_normal((n_users, dim)).astype(np.float32)
    items = rng.standard_normal((n_items, dim)).astype(np.float32)
    pairs = np.array([(u, i) for u in range(n_users)
                      for i in rng.choice(n_items, size=rng.integers(0, min(60, n_items)),
                                                     replace=False)])
    pairs = np.concatenate([pairs, [(0, i) for i in range(n_items - 5)]])  # user 0: 5 unseen
    pairs = np.unique(pairs, axis=0)
    return users, items, pairs


def _naive(users: np.ndarray, items: np.ndarray, pairs: np.ndarray, k: int):
    scores = users.astype(np.float64) @ items.T.astype(np.float64)
    scores[pairs[:, 0], pairs[:, 1]] = -np.inf
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    top = np.take_along_axis(scores, order, 1)
    return np.where(np.isfinite(top), order, -1), top


@pytest.mark.parametrize("chunk", [1 << 16, 100, 37, 7])
@pytest.mark.parametrize("k", [1, 20])
def test_chunked_topk_equals_the_naive_reference(chunk: int, k: int) -> None:
    users, items, pairs = _problem()
    indptr, indices = training_csr(pairs, len(users))
    scorer = TopKScorer(torch.from_numpy(users), torch.from_numpy(items), indptr, indices, k,
                        chunk_items=chunk)
    with torch.no_grad():
        got_items, got_top = scorer(torch.arange(len(users)))
    ref_items, ref_top = _naive(users, items, pairs, k)
    np.testing.assert_allclose(got_top.numpy(), ref_top, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(got_items.numpy(), ref_items)
    assert (got_items[0] == -1).sum() == max(0, k - 5)  # user 0 has 5 unseen items


def test_a_user_without_training_items_and_an_empty_history() -> None:
    users, items, _ = _problem(n_users=3, n_items=12)
    indptr, indices = training_csr(np.zeros((0, 2), dtype=np.int64), 3)
    scorer = TopKScorer(torch.from_numpy(users), torch.from_numpy(items), indptr, indices, 4,
                        chunk_items=5)
    with torch.no_grad():
        got, _ = scorer(torch.tensor([2, 0]))
    ref, _ = _naive(users[[2, 0]], items, np.zeros((0, 2), dtype=np.int64), 4)
    np.testing.assert_array_equal(got.numpy(), ref)


def test_chunked_topk_exports_to_onnx_and_matches(tmp_path: Path) -> None:
    users, items, pairs = _problem()
    indptr, indices = training_csr(pairs, len(users))
    scorer = TopKScorer(torch.from_numpy(users), torch.from_numpy(items), indptr, indices, 10,
                        chunk_items=64).eval()
    spec = GraphSpec("topk", scorer, (torch.arange(2),), (torch.arange(2),), ["users"],
                     ["items", "scores"])
    export_onnx(spec, tmp_path / "topk.onnx")
    graph = Graph(tmp_path / "topk.onnx", ["CPUExecutionProvider"])
    query = np.array([5, 0, 17, 39, 3], dtype=np.int64)
    got_items, got_top = graph(users=query)
    ref_items, ref_top = _naive(users[query], items, _rows(pairs, query), 10)
    np.testing.assert_array_equal(got_items, ref_items)
    np.testing.assert_allclose(got_top, ref_top, rtol=1e-5, atol=1e-5)


def _rows(pairs: np.ndarray, query: np.ndarray) -> np.ndarray:
    """The training pairs of the queried users, renumbered to their row in the query."""
    return np.array([(r, i) for r, u in enumerate(query) for uu, i in pairs if uu == u])
