"""Top-K recommendation from the final embedding tables, each user's training items excluded.

:class:`TopKScorer` is the module the bundle exports (ONNX and TorchScript): user indices [B]
-> item indices [B, K] and scores [B, K], best first. Training items are looked up in a CSR
table inside the graph; a user with fewer than K unseen items gets item ``-1`` and score
``-inf`` at the tail, which the runtime drops. Every shape is static apart from the batch, so
the graph exports without data-dependent sizes.

Large catalogs are scored in chunks of ``chunk_items`` items: each chunk keeps its own top K
and the final top K is taken over those candidates, which is exact (every global winner is a
winner of its chunk) and never materialises the [B, N] score matrix; peak memory is
[B, chunk_items]. The chunk loop is unrolled when the module is exported.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor, nn


def training_csr(pairs: np.ndarray, n_users: int) -> tuple[np.ndarray, np.ndarray]:
    """(user, item) rows -> (indptr [U+1], indices): each user's training items."""
    order = np.lexsort((pairs[:, 1], pairs[:, 0]))
    counts = np.bincount(pairs[:, 0], minlength=n_users)
    indptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    return indptr, pairs[order, 1].astype(np.int64)


class TopKScorer(nn.Module):
    def __init__(self, user_emb: Tensor, item_emb: Tensor, indptr: np.ndarray,
                 indices: np.ndarray, k: int, chunk_items: int = 1 << 16) -> None:
        super().__init__()
        n_items = item_emb.shape[0]
        self.k = min(int(k), n_items)
        self.chunk_items = int(chunk_items)
        self.register_buffer("user_emb", user_emb.detach().float().contiguous())
        self.register_buffer("item_emb_t", item_emb.detach().float().t().contiguous())
        self.register_buffer("indptr", torch.from_numpy(indptr))
        # one padding entry, so the clamped lookups of users without history stay in the table
        self.register_buffer("indices", torch.from_numpy(np.append(indices, n_items)))
        widest = int(np.diff(indptr).max(initial=0))
        self.register_buffer("offsets", torch.arange(max(widest, 1)))

    def forward(self, users: Tensor) -> tuple[Tensor, Tensor]:
        queries = self.user_emb[users]
        start = self.indptr[users]
        count = self.indptr[users + 1] - start
        slot = start.unsqueeze(1) + self.offsets  # [B, widest]
        valid = self.offsets < count.unsqueeze(1)
        seen = self.indices[slot.clamp(max=self.indices.shape[0] - 1)]
        n_items = self.item_emb_t.shape[1]
        tops, items = [], []
        for first in range(0, n_items, self.chunk_items):
            size = min(self.chunk_items, n_items - first)
            top, idx = self._chunk_top(queries, first, size, seen - first, valid)
            tops.append(top)
            items.append(idx + first)
        top, item = (tops[0], items[0]) if len(tops) == 1 else self._merge(tops, items)
        return torch.where(torch.isfinite(top), item, -1), top

    def _chunk_top(self, queries: Tensor, first: int, size: int, local: Tensor,
                   valid: Tensor) -> tuple[Tensor, Tensor]:
        """Top K of items [first, first + size), the user's training items excluded."""
        scores = queries @ self.item_emb_t[:, first:first + size]  # [B, size]
        inside = valid & (local >= 0) & (local < size)
        local = torch.where(inside, local, size)  # outside the chunk: the padding column
        padded = torch.cat([scores, scores.new_zeros(scores.shape[0], 1)], dim=1)
        padded = padded.scatter(1, local, float("-inf"))[:, :-1]
        return padded.topk(min(self.k, size), dim=1)

    def _merge(self, tops: list[Tensor], items: list[Tensor]) -> tuple[Tensor, Tensor]:
        candidates, owners = torch.cat(tops, dim=1), torch.cat(items, dim=1)
        top, pos = candidates.topk(self.k, dim=1)
        return top, owners.gather(1, pos)
