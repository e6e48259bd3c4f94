"""Full-ranking evaluation: every item is scored for every evaluated user.

Metrics follow MMRec's definitions so numbers compare: Recall@K = hits / |positives|,
NDCG@K with the ideal DCG over min(|positives|, K) items, Precision@K = hits / K and MAP@K =
sum of precision at each hit / min(|positives|, K). Each is averaged over users with at least one
positive in the evaluated split.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch
from torch import Tensor

from cliper_prod.histories import history_pairs, training_csr

DEFAULT_TOPK = (10, 20, 50)
METRICS = ("recall", "ndcg", "precision", "map")


def metric_key(name: str, k: int) -> str:
    return f"{name}@{k}"


def metrics_from_hits(hits: np.ndarray, n_pos: np.ndarray, topk: Sequence[int]) -> dict[str, float]:
    """Average the metrics over users from a boolean hit matrix [users, max K] (ranked order)
    and each user's number of positives."""
    max_k = hits.shape[1]
    if max(topk) > max_k:
        raise ValueError(f"hit matrix has {max_k} columns, fewer than K={max(topk)}")
    hits = hits.astype(np.float64)
    ranks = np.arange(1, max_k + 1)
    discount = 1.0 / np.log2(ranks + 1)
    cum_hits = np.cumsum(hits, axis=1)
    dcg = np.cumsum(hits * discount, axis=1)
    ideal = np.cumsum(discount)
    prec_at_hit = np.cumsum(hits * cum_hits / ranks, axis=1)
    out: dict[str, float] = {}
    for k in topk:
        denom = np.minimum(n_pos, k)
        out[metric_key("recall", k)] = float(np.mean(cum_hits[:, k - 1] / n_pos))
        out[metric_key("ndcg", k)] = float(np.mean(dcg[:, k - 1] / ideal[denom - 1]))
        out[metric_key("precision", k)] = float(np.mean(cum_hits[:, k - 1] / k))
        out[metric_key("map", k)] = float(np.mean(prec_at_hit[:, k - 1] / denom))
    return out


@dataclass
class RankingTask:
    """Which users are ranked, which items are hidden from them and which are the answers."""

    users: np.ndarray  # evaluated users, sorted
    mask_indptr: np.ndarray
    mask_items: np.ndarray
    pos_indptr: np.ndarray
    pos_items: np.ndarray
    n_items: int

    @classmethod
    def build(cls, positives: np.ndarray, masked: Sequence[np.ndarray], n_users: int,
              n_items: int) -> "RankingTask":
        mask = np.concatenate(list(masked)) if masked else np.zeros((0, 2), dtype=np.int64)
        mask_indptr, mask_items = training_csr(mask, n_users)
        pos_indptr, pos_items = training_csr(positives, n_users)
        return cls(np.unique(positives[:, 0]), mask_indptr, mask_items, pos_indptr, pos_items,
                   n_items)

    def hits(self, users: np.ndarray, scores: Tensor, max_k: int) -> tuple[np.ndarray, np.ndarray]:
        """Mask each user's hidden items, take the top max_k and mark the positives among them,
        on the scores' device; only the [users, max_k] hit matrix comes back to the CPU."""
        device = scores.device
        rows, cols = history_pairs(self.mask_indptr, self.mask_items, users)
        scores[torch.from_numpy(rows).to(device), torch.from_numpy(cols).to(device)] = -torch.inf
        top = torch.topk(scores, max_k, dim=1).indices
        is_pos = torch.zeros(scores.shape, dtype=torch.bool, device=device)
        rows, cols = history_pairs(self.pos_indptr, self.pos_items, users)
        is_pos[torch.from_numpy(rows).to(device), torch.from_numpy(cols).to(device)] = True
        return torch.gather(is_pos, 1, top).cpu().numpy(), np.diff(self.pos_indptr)[users]


ScoreFn = Callable[[Tensor], Tensor]  # user indices [B] (CPU) -> scores [B, n_items] (any device)


@torch.no_grad()
def evaluate_ranking(score: ScoreFn, task: RankingTask, topk: Sequence[int] = DEFAULT_TOPK,
                     batch_size: int = 4096) -> dict[str, float]:
    """Rank all items for every user of ``task`` with ``score`` and return the averaged metrics."""
    max_k = max(topk)
    if max_k > task.n_items:
        raise ValueError(f"K={max_k} exceeds the number of items ({task.n_items})")
    all_hits, all_pos = [], []
    for start in range(0, len(task.users), batch_size):
        users = task.users[start:start + batch_size]
        scores = score(torch.from_numpy(users)).float().clone()
        hit, n_pos = task.hits(users, scores, max_k)
        all_hits.append(hit)
        all_pos.append(n_pos)
    return metrics_from_hits(np.concatenate(all_hits), np.concatenate(all_pos), topk)
