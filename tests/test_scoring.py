"""Top-K scorer against a naive numpy reference: full score matrix, training items set to -inf,
stable argsort. Chunked or not, in PyTorch, TorchScript and as an ONNX graph, the results must
agree; the graph's size must not depend on the catalog's, nor a batch's exclusion work on
anybody else's history."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from cliper_prod.export.bundle_writer import TOPK_INPUTS, topk_spec
from cliper_prod.export.graphs import export_onnx
from cliper_prod.histories import history_pairs, training_csr
from cliper_prod.runtime.sessions import Graph
from cliper_prod.scoring import CandidateTopKScorer, TopKScorer, default_candidates


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


def _rows(pairs: np.ndarray, query: np.ndarray) -> np.ndarray:
    """The training pairs of the queried users, renumbered to their row in the query."""
    out = [(r, i) for r, u in enumerate(query) for uu, i in pairs if uu == u]
    return np.array(out, dtype=np.int64).reshape(-1, 2)


def _inputs(users, pairs, query):
    indptr, history = training_csr(pairs, len(users))
    rows, seen = history_pairs(indptr, history, query)
    return torch.from_numpy(users[query]), torch.from_numpy(rows), torch.from_numpy(seen)


def test_history_pairs_are_each_users_own_items_in_query_order() -> None:
    users, _, pairs = _problem()
    query = np.array([7, 0, 39, 3, 7 - 7])[:4]
    indptr, history = training_csr(pairs, len(users))
    rows, seen = history_pairs(indptr, history, query)
    got = sorted(zip(rows.tolist(), seen.tolist()))
    assert got == sorted(map(tuple, _rows(pairs, query).tolist()))
    empty = history_pairs(indptr, history, np.zeros(0, dtype=np.int64))
    assert [len(a) for a in empty] == [0, 0]


@pytest.mark.parametrize("chunk", [1 << 16, 100, 37, 7])
@pytest.mark.parametrize("k", [1, 20])
def test_chunked_topk_equals_the_naive_reference(chunk: int, k: int) -> None:
    users, items, pairs = _problem()
    query = np.arange(len(users))
    scorer = TopKScorer(torch.from_numpy(items), k, chunk_items=chunk)
    with torch.no_grad():
        got_items, got_top = scorer(*_inputs(users, pairs, query))
    ref_items, ref_top = _naive(users, items, pairs, k)
    np.testing.assert_allclose(got_top.numpy(), ref_top, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(got_items.numpy(), ref_items)
    assert (got_items[0] == -1).sum() == max(0, k - 5)  # user 0 has 5 unseen items
    script = torch.jit.script(scorer)  # the twin loops in TorchScript too
    np.testing.assert_array_equal(script(*_inputs(users, pairs, query))[0].numpy(), ref_items)


def test_a_user_without_training_items_and_an_empty_history() -> None:
    users, items, _ = _problem(n_users=3, n_items=12)
    none = np.zeros((0, 2), dtype=np.int64)
    scorer = TopKScorer(torch.from_numpy(items), 4, chunk_items=5)
    with torch.no_grad():
        got, _ = scorer(*_inputs(users, none, np.array([2, 0])))
    ref, _ = _naive(users[[2, 0]], items, none, 4)
    np.testing.assert_array_equal(got.numpy(), ref)


def _export(items: np.ndarray, k: int, chunk: int, path: Path) -> None:
    export_onnx(topk_spec(TopKScorer(torch.from_numpy(items), k, chunk_items=chunk).eval()),
                path)


def test_the_onnx_graph_matches_and_keeps_one_chunk_body_whatever_the_catalog(
        tmp_path: Path) -> None:
    users, items, pairs = _problem()
    _export(items, 10, 16, tmp_path / "topk.onnx")
    graph = Graph(tmp_path / "topk.onnx", ["CPUExecutionProvider"])
    query = np.array([5, 0, 17, 39, 3], dtype=np.int64)
    q, rows, seen = (t.numpy() for t in _inputs(users, pairs, query))
    got_items, got_top = graph(queries=q, exclude_rows=rows, exclude_items=seen)
    ref_items, ref_top = _naive(users[query], items, _rows(pairs, query), 10)
    np.testing.assert_array_equal(got_items, ref_items)
    np.testing.assert_allclose(got_top, ref_top, rtol=1e-5, atol=1e-5)
    for row, user in enumerate(query):  # ranked alone, a user gets the very same floats
        alone = graph(**dict(zip(("queries", "exclude_rows", "exclude_items"),
                                 (t.numpy() for t in _inputs(users, pairs, np.array([user]))))))
        np.testing.assert_array_equal(alone[1][0], got_top[row])
    # the item table is external data; 15 chunks or 2, the graph has the same nodes
    assert (tmp_path / "topk.onnx.data").stat().st_size >= items.nbytes
    _export(items, 10, 128, tmp_path / "few.onnx")

    def ops(name: str) -> list[str]:
        return sorted(n.op_type for n in onnx.load(str(tmp_path / name),
                                                    load_external_data=False).graph.node)
    assert ops("topk.onnx") == ops("few.onnx") and "Scan" in ops("topk.onnx")


def test_a_heavy_user_is_excluded_exactly_and_costs_only_their_own_batch_rows() -> None:
    """One user holds 90% of the catalog; the others a handful each. The heavy user's top-K
    is the few unseen items; a batch without them gets pairs for its own users' items only."""
    rng = np.random.default_rng(3)
    n_items, heavy = 5000, 4500
    users = rng.standard_normal((50, 16)).astype(np.float32)
    items = rng.standard_normal((n_items, 16)).astype(np.float32)
    pairs = [(0, i) for i in rng.choice(n_items, heavy, replace=False)]
    pairs += [(u, i) for u in range(1, 50) for i in rng.choice(n_items, 3, replace=False)]
    pairs = np.array(pairs, dtype=np.int64)
    indptr, history = training_csr(pairs, len(users))
    light = np.arange(1, 50)
    assert len(history_pairs(indptr, history, light)[0]) == 3 * len(light)
    scorer = TopKScorer(torch.from_numpy(items), 600, chunk_items=512)
    query = np.array([4, 0, 9])
    with torch.no_grad():
        got, top = scorer(*_inputs(users, pairs, query))
    ref, ref_top = _naive(users[query], items, _rows(pairs, query), 600)
    np.testing.assert_array_equal(got.numpy(), ref)
    assert (got[1] >= 0).sum() == n_items - heavy  # 500 unseen, then padding


def _near_ties(n_users: int = 24, groups: int = 30, copies: int = 12, spare: int = 241,
               dim: int = 8, seed: int = 1):
    """Users and items where fp16 cannot order what fp32 can: groups of ``copies`` items
    scaled by 1 + m * 1e-4 (under half an fp16 ulp apart, thousands of fp32 ulps), each group's
    m = 0 copy duplicated (an exact tie, to the lower item), then ``spare`` random items; every
    user's training items include a few of the copies, and user 0 all but 5 items."""
    rng = np.random.default_rng(seed)
    base = rng.standard_normal((groups, dim))
    steps = 1 + 1e-4 * rng.permutation(np.tile(np.arange(copies - 1), (groups, 1)).T).T
    near = np.concatenate([base[:, None] * steps[..., None], base[:, None]], axis=1)
    items = np.concatenate([near.reshape(-1, dim), rng.standard_normal((spare, dim))])
    users = rng.standard_normal((n_users, dim))
    _, _, pairs = _problem(n_users, len(items), dim, seed)
    return users.astype(np.float32), items.astype(np.float32), pairs


@pytest.mark.parametrize("k", [1, 20])
def test_the_gpu_form_ranks_as_naive_numpy_through_fp16_near_ties(tmp_path: Path, k: int) -> None:
    """On the CPU provider the GPU form's items equal the naive float64 ranking for every
    user (recall@K 1.0), with exclusions and ties to the lower item, and its scores are the CPU
    form's very floats, ranked alone or in a batch."""
    users, items, pairs = _near_ties()
    query = np.arange(len(users))
    ref_items, ref_top = _naive(users, items, pairs, k)
    forms = {}
    table = torch.from_numpy(items)
    for name, scorer in (("cpu", TopKScorer(table, k, chunk_items=64)),
                         ("gpu", CandidateTopKScorer(table, k, 3 * k + 40)),
                         ("blocks", CandidateTopKScorer(table, k, 3 * k + 40, blocks=7))):
        export_onnx(topk_spec(scorer.eval()), tmp_path / f"{name}.onnx")
        forms[name] = Graph(tmp_path / f"{name}.onnx", ["CPUExecutionProvider"])
    feeds = dict(zip(TOPK_INPUTS, (t.numpy() for t in _inputs(users, pairs, query))))
    got_items, got_top = forms["gpu"](**feeds)
    np.testing.assert_array_equal(got_items, ref_items)
    np.testing.assert_allclose(got_top, ref_top, rtol=1e-5, atol=1e-5)
    unseen = len(items) - len(np.unique(pairs[pairs[:, 0] == 0, 1]))  # user 0: at most 5
    assert (got_items[0] == -1).sum() == max(0, k - unseen)
    np.testing.assert_array_equal(got_top, forms["cpu"](**feeds)[1])
    for a, b in zip(forms["blocks"](**feeds), (got_items, got_top)):  # two levels: same answer
        np.testing.assert_array_equal(a, b)
    for row in (0, 7, 23):
        alone = forms["gpu"](**dict(zip(TOPK_INPUTS, (t.numpy() for t in _inputs(
            users, pairs, np.array([row]))))))
        np.testing.assert_array_equal(alone[1][0], got_top[row])
    ops = {n.op_type for n in onnx.load(str(tmp_path / "gpu.onnx"), load_external_data=False)
           .graph.node}
    assert not ops & {"Scan", "Loop"}  # the whole catalog in one MatMul


def test_fp16_alone_would_misrank_the_near_ties() -> None:
    """The table above is a real test of the fp32 re-score: ranked by the fp16 scores alone,
    users' top 20 differ from the exact one."""
    users, items, _ = _near_ties()
    unit = users / np.linalg.norm(users, axis=1, keepdims=True)
    coarse = (unit.astype(np.float16) @ items.T.astype(np.float16)).astype(np.float64)
    exact = users.astype(np.float64) @ items.T.astype(np.float64)
    fp16_top = np.argsort(-coarse, axis=1, kind="stable")[:, :20]
    assert (fp16_top != np.argsort(-exact, axis=1, kind="stable")[:, :20]).any(1).mean() > 0.5


def test_the_gpu_form_candidates_are_at_least_k_and_at_most_the_catalog() -> None:
    items = torch.randn(300, 8)
    assert CandidateTopKScorer(items, 10).candidates == 300  # max(4k, 2048), at most the catalog
    assert CandidateTopKScorer(items, 50, candidates=20).candidates == 50  # at least k
    assert default_candidates(100) == 2048 and default_candidates(1000) == 4000
    two_level = CandidateTopKScorer(torch.randn(601, 8), 1, 43, blocks=7)
    assert (two_level.blocks, two_level.block, two_level.per_block) == (7, 86, 43)
    assert CandidateTopKScorer(torch.randn(601, 8), 20, 100, blocks=7).blocks == 6  # >= C each
