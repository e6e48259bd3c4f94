"""FREEDOM (Zhou & Shen, 2023): a frozen multi-modal item-item graph plus a degree-pruned
user-item graph, as published and as MMRec implements it.

- Item graph: per modality, the cosine kNN graph (knn_k, self included) of the raw features,
  normalised with the row degree on both sides; modalities mixed by mm_image_weight; frozen.
- User-item graph: each epoch keeps (1 - dropout) of the training edges, sampled without
  replacement with probability 1/sqrt(deg(u) deg(i)), renormalised; evaluation uses the full graph.
- Embeddings: LightGCN over the user-item graph; items add n_mm_layers propagations of their ID
  embeddings over the item graph.
- Loss: BPR + reg_weight * (BPR with projected image features + BPR with projected text features).
  The raw features are trainable parameters (MMRec loads them with freeze=False).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from cliper_prod.backbones.base import (Recommender, bpr_loss, check_knn_k,
                                        require_features, train_edges)
from cliper_prod.backbones.lightgcn import light_propagate
from cliper_prod.data.mmrec import InteractionData
from cliper_prod.errors import ConfigError
from cliper_prod.features.fusion import MLPFusion
from cliper_prod.graph import (Propagation, bipartite_edge_index, degree_sensitive_prune,
                               knn_normalized_adjacency, mixed_item_graph, normalized_adjacency)


@dataclass(frozen=True)
class FreedomConfig:
    embedding_size: int
    feat_embed_dim: int
    knn_k: int
    mm_image_weight: float
    n_mm_layers: int
    n_ui_layers: int
    dropout: float
    reg_weight: float


class Freedom(Recommender):
    def __init__(self, data: InteractionData, config: FreedomConfig) -> None:
        super().__init__()
        require_features(data, "FREEDOM")
        check_knn_k(config.knn_k, data.n_items)
        if not 0.0 <= config.dropout < 1.0:
            raise ConfigError(f"dropout must be in [0, 1), got {config.dropout}")
        self.config = config
        self.init_id_embeddings(data, config.embedding_size)

        # With reg_weight 0 the modality BPR terms add exactly nothing (MMRec still computes them
        # and Adam leaves the zero-gradient features unchanged), so the features and projections
        # only exist when they are trained.
        self.features = nn.ParameterDict()
        self.projections = nn.ModuleDict()
        graphs = {}
        for modality, array in data.features.items():
            feat = torch.from_numpy(array)
            graphs[modality] = knn_normalized_adjacency(feat, config.knn_k)
            if config.reg_weight:
                self.features[modality] = nn.Parameter(feat.clone())
                self.projections[modality] = nn.Linear(feat.shape[1], config.feat_embed_dim)
        self.item_graph = mixed_item_graph(graphs, config.mm_image_weight)
        # CLIPER's MLP fusion: the text features are V concatenated view embeddings, fused by a
        # layer trained here. FREEDOM's item graph is frozen at start, so it is built from the
        # concatenation, and the layer learns through the text BPR term.
        self.text_fusion: MLPFusion | None = None
        if data.text_views:
            if not config.reg_weight:
                raise ConfigError("MLP fusion is trained through FREEDOM's modality loss: set "
                                  "model.reg_weight > 0 (e.g. --set model.reg_weight=1e-3)")
            dim = data.features["text"].shape[1] // data.text_views
            self.text_fusion = MLPFusion(data.text_views, dim)
            self.projections["text"] = nn.Linear(dim, config.feat_embed_dim)

        self.train_users, self.train_items = train_edges(data)
        self.full_adj = normalized_adjacency(
            bipartite_edge_index(self.train_users, self.train_items, self.n_users),
            self.n_users + self.n_items)
        self.train_adj = self.full_adj

    def pre_epoch(self, generator: torch.Generator) -> None:
        if self.config.dropout > 0:
            self.train_adj = degree_sensitive_prune(self.train_users, self.train_items, self.n_users,
                                                    self.n_items, 1.0 - self.config.dropout,
                                                    generator)

    def _embed(self, adj: Propagation) -> tuple[Tensor, Tensor]:
        h = self.item_embedding.weight
        for _ in range(self.config.n_mm_layers):
            h = self.item_graph(h)
        ego = torch.cat([self.user_embedding.weight, self.item_embedding.weight])
        out = light_propagate(adj, ego, self.config.n_ui_layers)
        return out[:self.n_users], out[self.n_users:] + h

    def propagate(self) -> tuple[Tensor, Tensor]:
        return self._embed(self.full_adj)

    def loss(self, users: Tensor, pos: Tensor, neg: Tensor) -> Tensor:
        u_all, i_all = self._embed(self.train_adj)
        u = u_all[users]
        loss = bpr_loss(u, i_all[pos], i_all[neg])
        for modality, feat in self.features.items():
            pos_f, neg_f = feat[pos], feat[neg]
            if modality == "text" and self.text_fusion is not None:
                pos_f, neg_f = self.text_fusion(pos_f), self.text_fusion(neg_f)
            proj = self.projections[modality]
            loss = loss + self.config.reg_weight * bpr_loss(u, proj(pos_f), proj(neg_f))
        return loss
