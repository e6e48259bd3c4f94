"""LightGCN (He et al., 2020): the ID-only graph baseline, on torch-geometric graph utilities."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from cliper_prod.backbones.base import Recommender, bpr_loss, train_edges
from cliper_prod.data.mmrec import InteractionData
from cliper_prod.graph import Propagation, bipartite_edge_index, normalized_adjacency


@dataclass(frozen=True)
class LightGCNConfig:
    embedding_size: int
    n_layers: int
    reg_weight: float


def light_propagate(adj: Propagation, ego: Tensor, n_layers: int) -> Tensor:
    """Mean of the layer outputs 0..n_layers of repeated normalised-adjacency propagation."""
    layers = [ego]
    for _ in range(n_layers):
        layers.append(adj(layers[-1]))
    return torch.stack(layers).mean(0)


class LightGCN(Recommender):
    def __init__(self, data: InteractionData, config: LightGCNConfig) -> None:
        super().__init__()
        self.config = config
        self.init_id_embeddings(data, config.embedding_size)
        users, items = train_edges(data)
        self.adj = normalized_adjacency(bipartite_edge_index(users, items, self.n_users),
                                        self.n_users + self.n_items)

    def propagate(self) -> tuple[Tensor, Tensor]:
        ego = torch.cat([self.user_embedding.weight, self.item_embedding.weight])
        out = light_propagate(self.adj, ego, self.config.n_layers)
        return out[:self.n_users], out[self.n_users:]

    def loss(self, users: Tensor, pos: Tensor, neg: Tensor) -> Tensor:
        u, i = self.propagate()
        mf = bpr_loss(u[users], i[pos], i[neg])
        ego = (self.user_embedding(users), self.item_embedding(pos), self.item_embedding(neg))
        reg = sum(e.norm(p=2) for e in ego) / len(users)  # MMRec's EmbLoss
        return mf + self.config.reg_weight * reg
