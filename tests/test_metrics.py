"""Ranking metrics against rankings worked out by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from cliper_prod.evaluation import RankingTask, evaluate_ranking, metrics_from_hits

L3 = 1 / math.log2(3)  # discount at rank 2


def test_metrics_on_hand_computed_rankings() -> None:
    # user A: 2 positives, hits at ranks 1 and 3; user B: 1 positive, hit at rank 2
    hits = np.array([[1, 0, 1], [0, 1, 0]], dtype=bool)
    m = metrics_from_hits(hits, np.array([2, 1]), topk=(1, 2, 3))
    assert m["recall@1"] == pytest.approx((1 / 2 + 0) / 2)
    assert m["recall@2"] == pytest.approx((1 / 2 + 1) / 2)
    assert m["recall@3"] == pytest.approx((1 + 1) / 2)
    assert m["ndcg@1"] == pytest.approx((1 + 0) / 2)
    assert m["ndcg@2"] == pytest.approx((1 / (1 + L3) + L3 / 1) / 2)
    assert m["ndcg@3"] == pytest.approx(((1 + 0.5) / (1 + L3) + L3) / 2)
    assert m["precision@3"] == pytest.approx((2 / 3 + 1 / 3) / 2)
    # MAP: mean of precision at each hit, over min(|positives|, K)
    assert m["map@1"] == pytest.approx((1 / 1 + 0) / 2)
    assert m["map@2"] == pytest.approx((1 / 2 + (1 / 2) / 1) / 2)
    assert m["map@3"] == pytest.approx(((1 + 2 / 3) / 2 + (1 / 2) / 1) / 2)


def test_perfect_ranking_scores_one() -> None:
    hits = np.array([[1, 1, 0, 0]], dtype=bool)
    m = metrics_from_hits(hits, np.array([2]), topk=(2, 4))
    assert m["recall@2"] == m["ndcg@2"] == m["map@2"] == pytest.approx(1.0)
    assert m["ndcg@4"] == pytest.approx(1.0)
    assert m["precision@4"] == pytest.approx(0.5)


def test_full_ranking_masks_training_items() -> None:
    # 2 users, 5 items. User 0 trained on item 4 (the best-scored) which must not count;
    # its test positive is item 2.
    scores = torch.tensor([[0.1, 0.2, 0.8, 0.3, 0.9],
                           [0.5, 0.4, 0.3, 0.2, 0.1]])
    train = np.array([[0, 4], [1, 0]])
    test = np.array([[0, 2], [1, 3]])
    task = RankingTask.build(test, [train], n_users=2, n_items=5)
    m = evaluate_ranking(torch.eye(2), scores.T, task, topk=(1, 3), batch_size=1)
    # user 0 ranking without item 4: 2, 3, 1 -> hit at rank 1
    # user 1 ranking without item 0: 1, 2, 3 -> hit at rank 3
    assert m["recall@1"] == pytest.approx(0.5)
    assert m["recall@3"] == pytest.approx(1.0)
    assert m["ndcg@3"] == pytest.approx((1 + 1 / math.log2(4)) / 2)


def test_users_without_positives_are_not_evaluated() -> None:
    scores = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    task = RankingTask.build(np.array([[2, 3]]), [np.array([[0, 1], [1, 1]])], 3, 4)
    assert task.users.tolist() == [2]
    assert evaluate_ranking(torch.eye(3), scores.T, task, topk=(1,))["recall@1"] == 1.0


def test_k_larger_than_catalog_is_an_error() -> None:
    task = RankingTask.build(np.array([[0, 1]]), [], 1, 3)
    with pytest.raises(ValueError, match="exceeds the number of items"):
        evaluate_ranking(torch.zeros(1, 2), torch.zeros(3, 2), task, topk=(5,))


def _naive_metrics(users: torch.Tensor, items: torch.Tensor, train: np.ndarray,
                   test: np.ndarray, k: int) -> float:
    """Recall@k from the whole score matrix, hidden items set to -inf: the textbook way."""
    scores = users @ items.T
    scores[train[:, 0], train[:, 1]] = -torch.inf
    top = torch.topk(scores, k, dim=1).indices.numpy()
    recalls = []
    for u in np.unique(test[:, 0]):
        positives = set(test[test[:, 0] == u, 1].tolist())
        recalls.append(len(positives & set(top[u].tolist())) / len(positives))
    return float(np.mean(recalls))


@pytest.mark.parametrize("chunk_items", [7, 64, 1000])
def test_evaluation_chunked_over_items_equals_the_whole_matrix(chunk_items: int) -> None:
    # 40 users x 130 items: chunks of 7 put hidden items and positives in every chunk and in a
    # short last one; one user has trained on all but 12 items (the hidden set spans chunks)
    gen = torch.Generator().manual_seed(3)
    users, items = torch.randn(40, 8, generator=gen), torch.randn(130, 8, generator=gen)
    rng = np.random.default_rng(3)
    pairs = np.unique(np.stack([rng.integers(0, 40, 900), rng.integers(0, 130, 900)], 1), axis=0)
    heavy = np.stack([np.zeros(118, dtype=np.int64), np.arange(118)], 1)
    pairs = np.unique(np.concatenate([pairs, heavy]), axis=0)
    is_test = rng.random(len(pairs)) < 0.2
    is_test[(pairs[:, 0] == 0) & (pairs[:, 1] >= 110)] = True  # the heavy user has positives
    train, test = pairs[~is_test], pairs[is_test]
    task = RankingTask.build(test, [train], n_users=40, n_items=130)
    got = evaluate_ranking(users, items, task, topk=(10,), batch_size=16, chunk_items=chunk_items)
    assert got["recall@10"] == pytest.approx(_naive_metrics(users, items, train, test, 10))
