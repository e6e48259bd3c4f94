"""LATTICE (Zhang et al., 2021): an item-item graph learned from projected modality features,
mixed with the frozen feature kNN graph, on top of LightGCN, as MMRec implements it (its default
cf_model ``lightgcn``).

- Frozen graph, per modality: the cosine kNN graph (knn_k, self included) of the raw features,
  weighted by the cosine and scaled by rowdeg(i)^-1/2 rowdeg(j)^-1/2 (weighted row sums).
- Learned graph: the same kNN construction on the projected, trainable features; the modalities'
  graphs are mixed by softmax(modal_weight) (image, text) before that normalisation. Item graph
  = (1 - lambda_coeff) * learned + lambda_coeff * (modalities' frozen graphs mixed by the same
  softmax). MMRec builds it densely (n_items^2); here it is a sparse edge list (knn_k edges per
  item, modality and kind) with the same values and gradients.
- When it is rebuilt (MMRec's build_item_graph flag): at the first training batch of each epoch,
  with gradients into the raw features, projections and modal weights through that batch only;
  the other batches reuse it detached, so Adam skips those parameters there (their gradient is
  None, as in MMRec under torch >= 2). Evaluation rebuilds it from the current weights.
- Embeddings: LightGCN (n_ui_layers; MMRec's len(weight_size)) over D^-1 (A + I) of the
  user-item graph: MMRec's LATTICE row-normalises with self-loops, unlike its LightGCN. Items add
  L2-normalised h = item_graph^n_layers @ item ID embeddings. No dropout: mess_dropout and the
  weight_size widths only act in MMRec's NGCF branch.
- Loss: BPR + reg_weight * (||u||^2 + ||p||^2 + ||n||^2) / 2 / batch on the final embeddings.
  MMRec divides by the configured batch size; the actual batch length is used here, which only
  differs for the last, short batch of an epoch.
- CLIPER's MLP fusion: the frozen text graph comes from the concatenated views, the learned one
  from the fused text (the fusion layer learns through the rebuild batches).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch_geometric.utils import add_self_loops

from cliper_prod.device import CPU
from cliper_prod.backbones.base import (FoldInState, Backbone, bpr_loss, check_knn_k,
                                        feature_tensors, require_features, train_edges,
                                        trained_features, user_fold_in_arrays)
from cliper_prod.data.mmrec import InteractionData
from cliper_prod.item_knn import check_method
from cliper_prod.errors import ConfigError
from cliper_prod.graph import (Propagation, bipartite_edge_index, cosine_knn_graph, edge_matmul,
                               fixed_propagation, light_propagate, mean_adjacency,
                               propagation_layers, row_degree_normalize)

MODALITIES = ("image", "text")  # the order of modal_weight


def _row_sums(edge_index: Tensor, weight: Tensor, n: int) -> Tensor:
    """Weighted row sums of a graph given as edges, float64 (the degrees its normalisation
    divides by)."""
    return torch.zeros(n, dtype=torch.float64, device=weight.device).index_add(
        0, edge_index[0], weight.double())


@dataclass(frozen=True)
class LatticeConfig:
    """LATTICE's ``[model]`` hyper-parameters (``models/lattice.toml``: MMRec's defaults with
    cf_model lightgcn).

    Args:
        embedding_size (int): Width of the user and item ID embeddings, hence of the served
            tables.
        feat_embed_dim (int): Width of the projected features the learned item graph comes from.
        knn_k (int): Neighbours per item in the learned and the frozen kNN graphs, the item
            itself included.
        knn_method (str): How the kNN graphs are found (:data:`cliper_prod.item_knn.KNN_METHODS`):
            ``exact`` (brute force in torch, O(n^2 d)), ``faiss-flat`` (exact), ``faiss-ivf`` or
            ``faiss-hnsw`` (approximate, for large catalogs; the recall against exact on a
            sample is logged).
        lambda_coeff (float): Share of the frozen feature graph in the item graph, in
            ``[0, 1]``; the learned graph gets ``1 - lambda_coeff``.
        n_layers (int): Propagations of the item ID embeddings over the item graph.
        n_ui_layers (int): LightGCN layers over the user-item graph (MMRec's
            ``len(weight_size)``).
        reg_weight (float): Weight of the squared L2 norm of the batch's final embeddings;
            MMRec's grid: 0, 1e-5 .. 1e-3.
    """

    embedding_size: int
    feat_embed_dim: int
    knn_k: int
    knn_method: str
    lambda_coeff: float
    n_layers: int
    n_ui_layers: int
    reg_weight: float


class Lattice(Backbone):
    r"""The LATTICE model from the `"Mining Latent Structures for Multimedia Recommendation"
    <https://arxiv.org/abs/2104.09036>`_ paper (Zhang et al., ACM MM 2021).

    Per modality :math:`m`, :math:`\tilde{S}_m` is the cosine top-``knn_k`` graph of the
    projected trained features :math:`W_m \mathbf{x}_m + b_m` and :math:`S_m` that of the raw
    features, frozen. With :math:`\alpha = \mathrm{softmax}(\text{modal\_weight})` and
    :math:`N(\cdot)` the symmetric row-degree normalisation, the item graph and the embeddings
    are

    .. math::
        S = (1 - \lambda) N\Big(\sum_m \alpha_m \tilde{S}_m\Big)
            + \lambda \sum_m \alpha_m N(S_m), \qquad
        \mathbf{h} = S^{L_i} \mathbf{E}_i,

        [\mathbf{U}; \mathbf{I}] = \frac{1}{L + 1} \sum_{l=0}^{L}
        \big(D^{-1} (A + I)\big)^l [\mathbf{E}_u; \mathbf{E}_i], \qquad
        \mathbf{I} \leftarrow \mathbf{I} + \mathbf{h} / \lVert \mathbf{h} \rVert_2,

    with :math:`\lambda` = ``lambda_coeff``, :math:`L_i` = ``n_layers``, :math:`L` =
    ``n_ui_layers``; the loss is BPR plus ``reg_weight`` times the batch's squared L2 norms.

    """

    config_class = LatticeConfig

    def __init__(self, data: InteractionData, config: LatticeConfig,
                 device: torch.device = CPU) -> None:
        super().__init__(device)
        require_features(data, "LATTICE")
        check_knn_k(config.knn_k, data.n_items)
        check_method(config.knn_method)
        if not 0.0 <= config.lambda_coeff <= 1.0:
            raise ConfigError(f"lambda_coeff must be in [0, 1], got {config.lambda_coeff}")
        self.config = config
        self.init_id_embeddings(data, config.embedding_size)

        self.frozen_graphs: dict[str, tuple[Tensor, Tensor]] = {}
        for modality, feat in feature_tensors(data, MODALITIES, self.device).items():
            edge_index, weight = cosine_knn_graph(feat, config.knn_k, config.knn_method)
            self.frozen_graphs[modality] = (
                edge_index, row_degree_normalize(edge_index, weight, self.n_items))
        self.features = trained_features(data, MODALITIES)
        self.projections = nn.ModuleDict()
        for modality in self.features:
            if modality == "text":  # the learned text graph comes from the fused views
                self.init_text_fusion(data)
            self.projections[modality] = nn.Linear(self.modality_dim(modality),
                                                   config.feat_embed_dim)
        self.modal_weight = nn.Parameter(torch.tensor([0.5, 0.5])) \
            if len(self.features) == 2 else None

        users, self.train_items = train_edges(data, self.device)
        edge_index, _ = add_self_loops(bipartite_edge_index(users, self.train_items,
                                                            self.n_users),
                                       num_nodes=self.n_users + self.n_items)
        self.ui_adj = mean_adjacency(edge_index, self.n_users + self.n_items)
        self.fixed_item_graph: Propagation | None = None  # None: rebuild at the next batch

    def pre_epoch(self, generator: torch.Generator) -> None:
        self.fixed_item_graph = None

    def item_graph(self) -> tuple[Tensor, Tensor]:
        """(edge_index, weight) of the item graph from the current weights, differentiable."""
        mix = dict(zip(MODALITIES, torch.softmax(self.modal_weight, 0))) \
            if self.modal_weight is not None else {m: 1.0 for m in self.features}
        learned, frozen = [], []
        for modality, project in self.projections.items():
            edge_index, weight = cosine_knn_graph(project(self.modality(modality)),
                                                  self.config.knn_k, self.config.knn_method)
            learned.append((edge_index, mix[modality] * weight))
            edge_index, weight = self.frozen_graphs[modality]
            frozen.append((edge_index, mix[modality] * weight))
        learned_index = torch.cat([e for e, _ in learned], 1)
        learned_weight = row_degree_normalize(learned_index, torch.cat([w for _, w in learned]),
                                              self.n_items)
        lam = self.config.lambda_coeff
        return (torch.cat([learned_index] + [e for e, _ in frozen], 1),
                torch.cat([(1 - lam) * learned_weight] + [lam * w for _, w in frozen]))

    def _embed(self, item_graph: Callable[[Tensor], Tensor]) -> tuple[Tensor, Tensor]:
        h = self.item_embedding.weight
        for _ in range(self.config.n_layers):
            h = item_graph(h)
        ego = torch.cat([self.user_embedding.weight, self.item_embedding.weight])
        out = light_propagate(self.ui_adj, ego, self.config.n_ui_layers,
                              self.lean_propagation)
        return out[:self.n_users], out[self.n_users:] + F.normalize(h, dim=1)

    def propagate(self) -> tuple[Tensor, Tensor]:
        edge_index, weight = self.item_graph()
        return self._embed(lambda x: edge_matmul(edge_index, weight, x))

    @torch.no_grad()
    def fold_in_state(self, data: InteractionData) -> FoldInState:
        """Users: the ``mean_self_loop`` rule over D^-1 (A + I); items: the ``lattice`` rule
        (the item graph's kNN features, projections, row sums and S^l E_i, l < n_layers), except
        with CLIPER's MLP fusion, whose trained layer the fold-in does not run."""
        ego = torch.cat([self.user_embedding.weight, self.item_embedding.weight])
        layers = propagation_layers(self.ui_adj, ego, self.config.n_ui_layers)
        arrays = user_fold_in_arrays(layers, self.n_users, self.train_items, self.n_items)
        params: dict = {"n_ui_layers": self.config.n_ui_layers}
        if self.text_fusion is not None:
            params["no_item_rule"] = ("its learned text graph comes from the MLP fusion of the "
                                      "text views, a trained layer the fold-in does not run")
            return FoldInState("mean_self_loop", None, params, arrays)
        mix = dict(zip(MODALITIES, torch.softmax(self.modal_weight, 0).tolist())) \
            if self.modal_weight is not None else {m: 1.0 for m in self.features}
        edge_index, weight = self.item_graph()
        graph = [self.item_embedding.weight]
        for _ in range(self.config.n_layers - 1):
            graph.append(edge_matmul(edge_index, weight, graph[-1]))
        arrays["graph_layers"] = torch.stack(graph)[:self.config.n_layers].cpu().numpy()
        learned_degree = torch.zeros(self.n_items, dtype=torch.float64, device=self.device)
        for m, feat in feature_tensors(data, list(self.features), self.device).items():
            index, cos = cosine_knn_graph(feat, self.config.knn_k, self.config.knn_method)
            arrays[f"knn_{m}"] = F.normalize(feat, dim=1).cpu().numpy()
            arrays[f"frozen_degree_{m}"] = _row_sums(index, cos, self.n_items).cpu().numpy()
            project = self.projections[m]
            projected = project(self.modality(m))
            index, cos = cosine_knn_graph(projected, self.config.knn_k, self.config.knn_method)
            learned_degree += mix[m] * _row_sums(index, cos, self.n_items)
            arrays[f"learned_{m}"] = F.normalize(projected, dim=1).cpu().numpy()
            arrays[f"proj_weight_{m}"] = project.weight.T.cpu().numpy()
            arrays[f"proj_bias_{m}"] = project.bias.cpu().numpy()
        arrays["learned_degree"] = learned_degree.cpu().numpy()
        params |= {"n_layers": self.config.n_layers, "knn_k": self.config.knn_k,
                   "modalities": list(self.features), "mix": mix,
                   "lambda": self.config.lambda_coeff, "normalize": True}
        return FoldInState("mean_self_loop", "lattice", params, arrays)

    def loss(self, users: Tensor, pos: Tensor, neg: Tensor) -> Tensor:
        if self.fixed_item_graph is None:
            edge_index, weight = self.item_graph()
            self.fixed_item_graph = fixed_propagation(edge_index, weight, self.n_items)
            u_all, i_all = self._embed(lambda x: edge_matmul(edge_index, weight, x))
        else:
            u_all, i_all = self._embed(self.fixed_item_graph)
        u, p, n = u_all[users], i_all[pos], i_all[neg]
        reg = (u.square().sum() + p.square().sum() + n.square().sum()) / 2 / len(users)
        return bpr_loss(u, p, n) + self.config.reg_weight * reg
