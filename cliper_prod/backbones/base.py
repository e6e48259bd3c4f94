"""What every backbone offers the trainer, the evaluator and the exporter."""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cliper_prod.data.mmrec import InteractionData
from cliper_prod.errors import ConfigError


def bpr_loss(users: Tensor, pos: Tensor, neg: Tensor) -> Tensor:
    """-mean log sigmoid(u.p - u.n): Bayesian personalised ranking on dot-product scores."""
    return -F.logsigmoid((users * pos).sum(1) - (users * neg).sum(1)).mean()


def require_features(data: InteractionData, backbone: str) -> None:
    """Multi-modal backbones cannot train on interactions alone: say which files are missing."""
    if not data.features:
        raise ConfigError(f"{backbone} needs image_feat.npy and/or text_feat.npy in the data "
                          f"folder")


def check_knn_k(k: int, n_items: int) -> None:
    """An item kNN graph needs at least one neighbour and fewer than all items."""
    if not 0 < k < n_items:
        raise ConfigError(f"knn_k={k} must be between 1 and the number of items minus one "
                          f"({n_items - 1})")


def train_edges(data: InteractionData) -> tuple[Tensor, Tensor]:
    """The training interactions as (users, items) index tensors."""
    train = torch.from_numpy(data.train)
    return train[:, 0].contiguous(), train[:, 1].contiguous()


class Recommender(nn.Module, ABC):
    """A backbone: trained with BPR triples; serves final user and item embedding tables whose
    dot product is the ranking score."""

    def init_id_embeddings(self, data: InteractionData, dim: int) -> None:
        """User and item ID embeddings, Xavier-uniform as MMRec initialises them."""
        self.n_users, self.n_items = data.n_users, data.n_items
        self.user_embedding = nn.Embedding(self.n_users, dim)
        self.item_embedding = nn.Embedding(self.n_items, dim)
        nn.init.xavier_uniform_(self.user_embedding.weight)
        nn.init.xavier_uniform_(self.item_embedding.weight)

    def pre_epoch(self, generator: torch.Generator) -> None:
        """Per-epoch work before the batches (FREEDOM prunes its graph here)."""

    @abstractmethod
    def loss(self, users: Tensor, pos: Tensor, neg: Tensor) -> Tensor:
        """Training loss of one batch of (user, positive item, negative item) triples."""

    @abstractmethod
    def propagate(self) -> tuple[Tensor, Tensor]:
        """Final user and item embeddings from the full (unpruned) graph."""

    @torch.no_grad()
    def embedding_tables(self) -> tuple[Tensor, Tensor]:
        """The tables that serving uses: score(u, i) = user[u] . item[i]."""
        was_training = self.training
        self.eval()
        try:
            return self.propagate()
        finally:
            self.train(was_training)
