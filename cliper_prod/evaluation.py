"""Full-ranking evaluation: every item is scored for every evaluated user, in chunks of items
so that memory does not grow with the catalog.

Metrics follow MMRec's definitions so numbers compare: Recall@K = hits / |positives|,
NDCG@K with the ideal DCG over min(|positives|, K) items, Precision@K = hits / K and MAP@K =
sum of precision at each hit / min(|positives|, K). Each is averaged over users with at least one
positive in the evaluated split.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Sequence

import numpy as np
import torch
from torch import Tensor

from cliper_prod.histories import history_pairs, training_csr
from cliper_prod.scoring import merge_top_k

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

    def sample(self, n_users: int, seed: int) -> "RankingTask":
        """The same task on ``n_users`` of its users drawn without replacement by
        ``default_rng(seed)`` (a generator of its own: the caller's draws are untouched); this
        task itself when ``n_users`` is 0 or not below its count."""
        if n_users == 0 or n_users >= len(self.users):
            return self
        chosen = np.random.default_rng(seed).choice(self.users, n_users, replace=False)
        return replace(self, users=np.sort(chosen))

    def top_items(self, users: np.ndarray, queries: Tensor, item_emb: Tensor, max_k: int,
                  chunk_items: int) -> Tensor:
        """Each user's ``max_k`` best items by ``queries @ item_emb.T`` with their hidden items
        out, scored ``chunk_items`` items at a time (memory [users, chunk], whatever the
        catalog's size) and merged into a running top K, on the tables' device."""
        device = queries.device
        rows, cols = (torch.from_numpy(a).to(device)
                      for a in history_pairs(self.mask_indptr, self.mask_items, users))
        order = torch.argsort(cols)
        rows, cols = rows[order], cols[order]
        bounds = torch.arange(0, self.n_items + chunk_items, chunk_items, device=device)
        cuts = torch.searchsorted(cols, bounds.clamp(max=self.n_items)).tolist()
        best = owner = None
        for c, first in enumerate(range(0, self.n_items, chunk_items)):
            scores = queries @ item_emb[first:first + chunk_items].T
            hidden = slice(cuts[c], cuts[c + 1])
            scores[rows[hidden], cols[hidden] - first] = -torch.inf
            top, pos = torch.topk(scores, min(max_k, scores.shape[1]), dim=1)
            if best is None:  # one chunk: exactly one topk over the whole catalog
                best, owner = top, pos
                continue
            best, owner = merge_top_k(best, owner, top, pos + first, max_k)
        return owner

    def hits(self, users: np.ndarray, top: Tensor) -> tuple[np.ndarray, np.ndarray]:
        """Which of each user's ranked items [users, K] are positives, and how many positives
        each user has; only the hit matrix comes back to the CPU."""
        rows, cols = (torch.from_numpy(a).to(top.device)
                      for a in history_pairs(self.pos_indptr, self.pos_items, users))
        ranked = torch.arange(len(users), device=top.device)[:, None] * self.n_items + top
        return (torch.isin(ranked, rows * self.n_items + cols).cpu().numpy(),
                np.diff(self.pos_indptr)[users])


@torch.no_grad()
def evaluate_ranking(user_emb: Tensor, item_emb: Tensor, task: RankingTask,
                     topk: Sequence[int] = DEFAULT_TOPK, batch_size: int = 4096,
                     chunk_items: int = 1 << 15) -> dict[str, float]:
    """Rank all items by ``user_emb @ item_emb.T`` for every user of ``task`` (on the tables'
    device, ``batch_size`` users by ``chunk_items`` items at a time) and return the averaged
    metrics."""
    max_k = max(topk)
    if max_k > task.n_items:
        raise ValueError(f"K={max_k} exceeds the number of items ({task.n_items})")
    all_hits, all_pos = [], []
    item_emb = item_emb.float()
    for start in range(0, len(task.users), batch_size):
        users = task.users[start:start + batch_size]
        queries = user_emb[torch.from_numpy(users).to(user_emb.device)].float()
        top = task.top_items(users, queries, item_emb, max_k, chunk_items)
        hit, n_pos = task.hits(users, top)
        all_hits.append(hit)
        all_pos.append(n_pos)
    return metrics_from_hits(np.concatenate(all_hits), np.concatenate(all_pos), topk)
