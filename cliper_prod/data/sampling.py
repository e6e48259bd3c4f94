"""BPR training triples with uniform negative sampling, vectorised (MMRec draws per row in Python)."""

from __future__ import annotations

from typing import Iterator

import numpy as np
import torch

from cliper_prod.errors import DataError


class BPRSampler:
    """Shuffled (user, positive, negative) batches; negatives are uniform over items the user
    has not interacted with in train, as in MMRec's TrainDataLoader."""

    def __init__(self, train: np.ndarray, n_items: int, batch_size: int,
                 rng: np.random.Generator) -> None:
        # views of the columns, no copy (gigabytes at tens of millions of interactions);
        # batches are int64 copies of their rows
        self.users, self.items = train[:, 0], train[:, 1]
        self.n_items = n_items
        self.batch_size = batch_size
        self.rng = rng
        # sorted keys for membership
        self._seen = np.unique(self.users.astype(np.int64) * n_items + self.items)
        full = np.flatnonzero(np.bincount(self.users) >= n_items)
        if len(full):
            raise DataError("train split", f"user {full[0]} interacted with all {n_items} items; "
                                           f"no negative item can be sampled for BPR")

    def __len__(self) -> int:
        return -(-len(self.users) // self.batch_size)

    def _is_seen(self, users: np.ndarray, items: np.ndarray) -> np.ndarray:
        keys = users * self.n_items + items
        pos = np.searchsorted(self._seen, keys)
        pos[pos == len(self._seen)] = 0
        return self._seen[pos] == keys

    def negatives(self, users: np.ndarray) -> np.ndarray:
        """One uniform negative per user, redrawn until none hits a training item."""
        neg = self.rng.integers(0, self.n_items, size=len(users))
        bad = np.flatnonzero(self._is_seen(users, neg))
        while len(bad):
            neg[bad] = self.rng.integers(0, self.n_items, size=len(bad))
            bad = bad[self._is_seen(users[bad], neg[bad])]
        return neg

    def epoch(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        order = self.rng.permutation(len(self.users))
        for start in range(0, len(order), self.batch_size):
            idx = order[start:start + self.batch_size]
            users, pos = self.users[idx].astype(np.int64), self.items[idx].astype(np.int64)
            neg = self.negatives(users)
            yield torch.from_numpy(users), torch.from_numpy(pos), torch.from_numpy(neg)
