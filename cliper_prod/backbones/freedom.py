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
import torch.nn.functional as F
from torch import Tensor, nn

from cliper_prod.device import CPU
from cliper_prod.backbones.base import (FoldInState, Backbone, add_grad, bpr_loss, check_knn_k,
                                        feature_tensors, require_features, train_edges,
                                        trained_features, user_fold_in_arrays)
from cliper_prod.data.mmrec import InteractionData
from cliper_prod.item_knn import check_method
from cliper_prod.errors import ConfigError
from cliper_prod.graph import (Propagation, bipartite_edge_index, degree_sensitive_prune,
                               knn_normalized_adjacency, light_propagate, mixed_item_graph,
                               normalized_adjacency, propagation_layers)


@dataclass(frozen=True)
class FreedomConfig:
    """FREEDOM's ``[model]`` hyper-parameters (``models/freedom.toml``: MMRec's defaults).

    Args:
        embedding_size (int): Width of the user and item ID embeddings, hence of the served
            tables.
        feat_embed_dim (int): Width the modality features are projected to for the modality BPR
            terms, scored against the users' embeddings: ``embedding_size`` when they exist.
        knn_k (int): Neighbours per item in each modality's kNN graph, the item itself
            included.
        knn_method (str): How the kNN graphs are found (:data:`cliper_prod.item_knn.KNN_METHODS`):
            ``exact`` (brute force in torch, O(n^2 d)), ``faiss-flat`` (exact), ``faiss-ivf`` or
            ``faiss-hnsw`` (approximate, for large catalogs; the recall against exact on a
            sample is logged).
        mm_image_weight (float): Weight of the image kNN graph in the item graph, the text graph
            getting ``1 - mm_image_weight``.
        n_mm_layers (int): Propagations of the item ID embeddings over the item graph.
        n_ui_layers (int): LightGCN layers over the user-item graph.
        dropout (float): Share of the user-item edges pruned each epoch (degree-sensitive), in
            ``[0, 1)``; MMRec's grid point 0.8.
        reg_weight (float): Weight of the modality BPR terms; MMRec's grid: 0, 1e-5, 1e-4, 1e-3.
            At 0 (the default) the terms, the trained features and the projections do not exist.
    """

    embedding_size: int
    feat_embed_dim: int
    knn_k: int
    knn_method: str
    mm_image_weight: float
    n_mm_layers: int
    n_ui_layers: int
    dropout: float
    reg_weight: float


class Freedom(Backbone):
    r"""The FREEDOM model from the `"A Tale of Two Graphs: Freezing and Denoising Graph
    Structures for Multimodal Recommendation" <https://arxiv.org/abs/2211.06924>`_ paper (Zhou
    and Shen, ACM MM 2023).

    A frozen item-item graph :math:`S = \sum_m w_m S_m` mixes the modalities' kNN graphs
    (:math:`S_m = D_m^{-1/2} A_m D_m^{-1/2}`, :math:`A_m` the cosine top-``knn_k`` of the raw
    features). Each epoch the user-item graph :math:`\hat{A}` keeps ``1 - dropout`` of the
    training edges, drawn with probability :math:`\propto 1 / \sqrt{d_u d_i}`. The embeddings
    are

    .. math::
        [\mathbf{U}; \mathbf{I}] = \frac{1}{L + 1} \sum_{l=0}^{L} \hat{A}^l
        [\mathbf{E}_u; \mathbf{E}_i], \qquad
        \mathbf{I} \leftarrow \mathbf{I} + S^{L_m} \mathbf{E}_i,

    with :math:`L` = ``n_ui_layers``, :math:`L_m` = ``n_mm_layers``, and the loss is
    :math:`\mathrm{BPR}(\mathbf{U}, \mathbf{I}) + \lambda \sum_m
    \mathrm{BPR}(\mathbf{U}, W_m \mathbf{x}_m + b_m)` with :math:`\lambda` = ``reg_weight``
    and :math:`\mathbf{x}_m` the trained modality features.

    """

    config_class = FreedomConfig
    chunked_loss = True

    def __init__(self, data: InteractionData, config: FreedomConfig,
                 device: torch.device = CPU) -> None:
        super().__init__(device)
        require_features(data, "FREEDOM")
        check_knn_k(config.knn_k, data.n_items)
        check_method(config.knn_method)
        if not 0.0 <= config.dropout < 1.0:
            raise ConfigError(f"dropout must be in [0, 1), got {config.dropout}")
        if data.text_views and not config.reg_weight:
            raise ConfigError("MLP fusion is trained through FREEDOM's modality loss: set "
                              "model.reg_weight > 0 (e.g. --set model.reg_weight=1e-3)")
        self.config = config
        self.init_id_embeddings(data, config.embedding_size)

        # With reg_weight 0 the modality BPR terms add exactly nothing (MMRec still computes them
        # and Adam leaves the zero-gradient features unchanged), so the features and projections
        # only exist when they are trained.
        self.features = trained_features(data) if config.reg_weight else nn.ParameterDict()
        self.projections = nn.ModuleDict({m: nn.Linear(f.shape[1], config.feat_embed_dim)
                                          for m, f in self.features.items()})
        graphs = {m: knn_normalized_adjacency(f, config.knn_k, config.knn_method)
                  for m, f in feature_tensors(data, device=self.device).items()}
        self.item_graph = mixed_item_graph(graphs, config.mm_image_weight)
        # The item graph is frozen at start, so it comes from the concatenated text views; the
        # fusion layer learns through the text BPR term, whose projection takes the fused width.
        # The raw-width one it replaces stays above: its random draws fix today's seeded runs.
        self.init_text_fusion(data)
        if self.text_fusion is not None:
            self.projections["text"] = nn.Linear(self.modality_dim("text"), config.feat_embed_dim)

        self.train_users, self.train_items = train_edges(data, self.device)
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
        out = light_propagate(adj, ego, self.config.n_ui_layers, self.lean_propagation,
                              owned=True)
        return out[:self.n_users], out[self.n_users:] + h

    def propagate(self) -> tuple[Tensor, Tensor]:
        return self._embed(self.full_adj)

    @torch.no_grad()
    def fold_in_state(self, data: InteractionData) -> FoldInState:
        """Users: the ``symmetric`` rule over the full user-item graph; items: the ``freedom``
        rule over the item graph's kNN features (unit rows of the raw features it was built
        from) and the propagations S^l E_i, l < n_mm_layers."""
        ego = torch.cat([self.user_embedding.weight, self.item_embedding.weight])
        layers = propagation_layers(self.full_adj, ego, self.config.n_ui_layers)
        graph = [self.item_embedding.weight]
        for _ in range(self.config.n_mm_layers - 1):
            graph.append(self.item_graph(graph[-1]))
        features = feature_tensors(data)
        w = self.config.mm_image_weight
        weights = {"image": w, "text": 1.0 - w} if len(features) == 2 else \
            {m: 1.0 for m in features}
        arrays = {**user_fold_in_arrays(layers, self.n_users, self.train_items, self.n_items),
                  "graph_layers": torch.stack(graph)[:self.config.n_mm_layers].cpu().numpy(),
                  **{f"knn_{m}": F.normalize(f, dim=1).numpy() for m, f in features.items()}}
        params = {"n_ui_layers": self.config.n_ui_layers, "n_mm_layers": self.config.n_mm_layers,
                  "knn_k": self.config.knn_k, "modalities": list(features),
                  "modality_weights": weights}
        return FoldInState("symmetric", "freedom", params, arrays)

    def loss(self, users: Tensor, pos: Tensor, neg: Tensor) -> Tensor:
        u_all, i_all = self.train_tables()
        return self._rows_loss((u_all[users], i_all[pos], i_all[neg]), pos, neg)

    def train_tables(self) -> tuple[Tensor, Tensor]:
        return self._embed(self.train_adj)

    def chunk_loss(self, rows: tuple[Tensor, Tensor, Tensor], users: Tensor, pos: Tensor,
                   neg: Tensor, batch: int, context: None) -> Tensor:
        return self._rows_loss(rows, pos, neg) * (len(users) / batch)

    @torch.no_grad()
    def backward_tables(self, grad: Tensor, context: None) -> None:
        """Users and items: the user-item propagation's gradient, mean_l (A^T)^l of the tables'
        gradients; items also (S^T)^{L_m} of theirs, through the item graph."""
        item_graph_t = self.item_graph.transposed()
        h = grad[self.n_users:]
        for _ in range(self.config.n_mm_layers):
            h = item_graph_t(h)
        if not self.config.n_mm_layers:
            h = h.clone()  # a view of grad, which the propagation below overwrites
        ego = light_propagate(self.train_adj.transposed(), grad, self.config.n_ui_layers,
                              lean=True, owned=True)
        add_grad(self.user_embedding.weight, ego[:self.n_users])
        add_grad(self.item_embedding.weight, ego[self.n_users:].add_(h))

    def _rows_loss(self, rows: tuple[Tensor, Tensor, Tensor], pos: Tensor, neg: Tensor
                   ) -> Tensor:
        """BPR on the gathered user, positive and negative rows plus the modality terms, every
        one a mean over the triples."""
        u = rows[0]
        loss = bpr_loss(*rows)
        for modality, proj in self.projections.items():
            pos_f, neg_f = self.modality(modality, pos), self.modality(modality, neg)
            loss = loss + self.config.reg_weight * bpr_loss(u, proj(pos_f), proj(neg_f))
        return loss
