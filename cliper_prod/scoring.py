"""Top-K recommendation from the final embedding tables, each user's training items excluded.

:class:`TopKScorer` is the module the bundle exports (ONNX and TorchScript): user indices [B]
-> item indices [B, K] and scores [B, K], best first. Training items are looked up in a CSR
table inside the graph; a user with fewer than K unseen items gets item ``-1`` and score
``-inf`` at the tail, which the runtime drops. Every shape is static apart from the batch, so the graph exports
without data-dependent sizes.
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
                 indices: np.ndarray, k: int) -> None:
        super().__init__()
        n_items = item_emb.shape[0]
        self.k = min(int(k), n_items)
        self.register_buffer("user_emb", user_emb.detach().float().contiguous())
        self.register_buffer("item_emb_t", item_emb.detach().float().t().contiguous())
        self.register_buffer("indptr", torch.from_numpy(indptr))
        # one padding entry pointing at the extra column, so lookups never leave the table
        self.register_buffer("indices", torch.from_numpy(np.append(indices, n_items)))
        widest = int(np.diff(indptr).max(initial=0))
        self.register_buffer("offsets", torch.arange(max(widest, 1)))

    def forward(self, users: Tensor) -> tuple[Tensor, Tensor]:
        scores = self.user_emb[users] @ self.item_emb_t  # [B, N]
        start = self.indptr[users]
        count = self.indptr[users + 1] - start
        slot = start.unsqueeze(1) + self.offsets  # [B, widest]
        valid = self.offsets < count.unsqueeze(1)
        seen = torch.where(valid, self.indices[slot.clamp(max=self.indices.shape[0] - 1)],
                           self.item_emb_t.shape[1])
        padded = torch.cat([scores, scores.new_zeros(scores.shape[0], 1)], dim=1)
        padded = padded.scatter(1, seen, float("-inf"))[:, :-1]
        top, items = padded.topk(self.k, dim=1)
        return torch.where(torch.isfinite(top), items, -1), top
