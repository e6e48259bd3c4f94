"""LightGCN (He et al., 2020): the ID-only graph baseline, on torch-geometric graph utilities."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from cliper_prod.device import CPU
from cliper_prod.backbones.base import (NO_ITEM_GRAPH, FoldInState, Backbone, add_grad,
                                        bpr_loss, chunks, train_edges, user_fold_in_arrays)
from cliper_prod.data.mmrec import InteractionData
from cliper_prod.graph import (bipartite_edge_index, light_propagate, normalized_adjacency,
                               propagation_layers)


@dataclass(frozen=True)
class LightGCNConfig:
    """LightGCN's ``[model]`` hyper-parameters (``models/lightgcn.toml``: MMRec's defaults).

    Args:
        embedding_size (int): Width of the user and item ID embeddings, hence of the served
            tables.
        n_layers (int): Propagations over the user-item graph.
        reg_weight (float): Weight of the L2 norms of the batch's ID embeddings (MMRec's
            EmbLoss).
    """

    embedding_size: int
    n_layers: int
    reg_weight: float


@dataclass(frozen=True)
class RegContext:
    """What a chunked step needs of the whole batch for the regulariser: the L2 norms of its
    user, positive and negative ego matrices, and those ids."""

    norms: Tensor
    ids: tuple[Tensor, Tensor, Tensor]


class LightGCN(Backbone):
    r"""The LightGCN model from the `"LightGCN: Simplifying and Powering Graph Convolution
    Network for Recommendation" <https://arxiv.org/abs/2002.02126>`_ paper (He et al., SIGIR
    2020), on IDs only.

    The tables are the mean of the ID embeddings' propagations over the user-item graph,

    .. math::
        [\mathbf{U}; \mathbf{I}] = \frac{1}{L + 1} \sum_{l=0}^{L} \hat{A}^l
        [\mathbf{E}_u; \mathbf{E}_i], \qquad \hat{A} = D^{-1/2} A D^{-1/2},

    with :math:`L` = ``n_layers``; the loss is BPR plus ``reg_weight`` times the L2 norms of the
    batch's ID embeddings.

    """

    config_class = LightGCNConfig
    chunked_loss = True
    reads_features = False

    def __init__(self, data: InteractionData, config: LightGCNConfig,
                 device: torch.device = CPU) -> None:
        super().__init__(device)
        self.config = config
        self.init_id_embeddings(data, config.embedding_size)
        users, items = train_edges(data, self.device)  # not kept: fold-in reads data's
        self.adj = normalized_adjacency(bipartite_edge_index(users, items, self.n_users),
                                        self.n_users + self.n_items)

    def propagate(self) -> tuple[Tensor, Tensor]:
        ego = torch.cat([self.user_embedding.weight, self.item_embedding.weight])
        out = light_propagate(self.adj, ego, self.config.n_layers, self.lean_propagation,
                              owned=True)
        return out[:self.n_users], out[self.n_users:]

    @torch.no_grad()
    def fold_in_state(self, data: InteractionData) -> FoldInState:
        """Users: the ``symmetric`` rule over this graph; items: none (no item graph)."""
        ego = torch.cat([self.user_embedding.weight, self.item_embedding.weight])
        layers = propagation_layers(self.adj, ego, self.config.n_layers)
        items = train_edges(data, self.device)[1]
        return FoldInState("symmetric", None, {"n_ui_layers": self.config.n_layers,
                                               "no_item_rule": NO_ITEM_GRAPH},
                           user_fold_in_arrays(layers, self.n_users, items, self.n_items))

    def loss(self, users: Tensor, pos: Tensor, neg: Tensor) -> Tensor:
        u, i = self.propagate()
        mf = bpr_loss(u[users], i[pos], i[neg])
        reg = sum(e.norm(p=2) for e in self._ego(users, pos, neg)) / len(users)  # MMRec's EmbLoss
        return mf + self.config.reg_weight * reg

    def _ego(self, users: Tensor, pos: Tensor, neg: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The ID embeddings of a batch's users, positives and negatives."""
        return self.user_embedding(users), self.item_embedding(pos), self.item_embedding(neg)

    def train_tables(self) -> tuple[Tensor, Tensor]:
        return self.propagate()

    @torch.no_grad()
    def batch_context(self, users: Tensor, pos: Tensor, neg: Tensor) -> RegContext:
        """The L2 norms of the batch's three ego matrices (the regulariser), chunk by chunk."""
        squares = torch.zeros(3, dtype=self.user_embedding.weight.dtype, device=self.device)
        for part in chunks(len(users)):
            squares += torch.stack([e.pow(2).sum() for e in
                                    self._ego(users[part], pos[part], neg[part])])
        return RegContext(squares.sqrt(), (users, pos, neg))

    def chunk_loss(self, rows: tuple[Tensor, Tensor, Tensor], users: Tensor, pos: Tensor,
                   neg: Tensor, batch: int, context: RegContext) -> Tensor:
        """BPR's share; the regulariser's value share only (its gradient goes straight onto
        the ID embeddings in :meth:`backward_tables`, no [nodes, d] buffer of its own)."""
        mf = bpr_loss(*rows) * (len(users) / batch)
        with torch.no_grad():
            reg = sum(e.pow(2).sum() / n for e, n in zip(self._ego(users, pos, neg),
                                                           context.norms)) / batch
        return mf + self.config.reg_weight * reg

    @torch.no_grad()
    def backward_tables(self, grad: Tensor, context: RegContext) -> None:
        """The propagation is linear, mean_l A^l x, with A symmetric: its gradient is the same
        propagation of the tables' gradients. The regulariser's, reg_weight * E[rows] /
        (||E|| batch) for each ego matrix E, is added to it row by row."""
        ego = light_propagate(self.adj.transposed(), grad, self.config.n_layers, lean=True,
                              owned=True)
        batch = len(context.ids[0])
        targets = ((ego[:self.n_users], self.user_embedding.weight),
                   (ego[self.n_users:], self.item_embedding.weight),
                   (ego[self.n_users:], self.item_embedding.weight))
        for (out, weight), ids, norm in zip(targets, context.ids, context.norms):
            scale = self.config.reg_weight / (norm * batch)
            for part in chunks(batch):
                out.index_add_(0, ids[part], weight[ids[part]] * scale)
        add_grad(self.user_embedding.weight, ego[:self.n_users])
        add_grad(self.item_embedding.weight, ego[self.n_users:])
