"""DualGNN (Wang et al., 2021): per-modality propagation over the user-item graph, fused per user
with learnt weights, then a user-user co-occurrence graph; as MMRec runs it.

Per modality m:
  x_m   = L2-normalised rows of [user preferences p_m ; Linear(lrelu(Linear(item features)))]
  rep_m = x_m + A x_m + ... + A^n_layers x_m   (A: D^-1/2 A D^-1/2 for aggr_mode 'add',
                                                 D^-1 A for 'mean')
Items: sum of rep_m over modalities. Users: w_u0 * rep_image + w_u1 * rep_text (w_u per user,
softmax at init, then trained freely), then u + sum_j s_uj u_j over the user graph.
User graph: each user's user_knn_k users sharing the most training items (found once, sparse
R R^T), weighted by the softmax of the shared counts. Each epoch, a user with fewer neighbours is
padded to k by copying a uniformly drawn earlier slot, as MMRec's appending loop does (a Polya
urn), with the trainer's generator; the sample is a saved buffer, so a checkpoint scores the same.
Loss: BPR in log base 2 (MMRec's torch.log2) + reg_weight * (mean p_m^2 over the batch's users
+ mean w_u^2).

MMRec quirks (its effective behaviour is the default, so that accuracy can be compared):
- ``representation += t_rep`` adds in place into v_rep, which the user fusion reads next, so
  users get w_u0 (rep_image + rep_text) + w_u1 rep_text: user_fusion = "mmrec"; "weighted" is
  the paper's w_u0 rep_image + w_u1 rep_text.
- The item-modality dropout (drop_rate 0.1) builds edge lists its GCN never uses; MLP_v, MLP_t
  and MLP_user never run; weight_i is only regularised (it shifts the loss value, no score): all
  left out. num_layer is unused and two propagations are hard-coded: n_layers here, preset 2.
- dim_latent 64 is hard-coded (embedding_size here), the feature MLP is F -> 4 dim -> dim.
- Among users sharing equally many items MMRec keeps torch.topk's order, this module lower ids
  first: same counts and weights, but other tied users may fill the last slots.
- MMRec ranks with the table of the epoch's last training batch; here the current weights.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cliper_prod.device import CPU
from cliper_prod.backbones.base import (Backbone, bpr_loss, feature_tensors, require_features,
                                        train_edges)
from cliper_prod.data.mmrec import InteractionData
from cliper_prod.errors import ConfigError
from cliper_prod.graph import (Propagation, bipartite_edge_index, co_occurrence_neighbours,
                               fixed_propagation, mean_adjacency, normalized_adjacency)


@dataclass(frozen=True)
class DualGNNConfig:
    """DualGNN's ``[model]`` hyper-parameters (``models/dualgnn.toml``: MMRec's defaults and
    effective behaviour).

    Args:
        embedding_size (int): Width of the user preferences and projected item features, hence
            of the served tables (MMRec's hard-coded dim_latent 64).
        n_layers (int): Propagations over the user-item graph (MMRec hard-codes two).
        aggr_mode (str): ``"add"`` propagates with :math:`D^{-1/2} A D^{-1/2}`, ``"mean"`` with
            :math:`D^{-1} A`.
        user_knn_k (int): Neighbours per user in the co-occurrence user graph (MMRec's k, 40).
        user_fusion (str): ``"mmrec"``: users get w0 (image + text) + w1 text, MMRec's in-place
            sum; ``"weighted"``: w0 image + w1 text, the paper's.
        reg_weight (float): Weight of the L2 term on the batch's user preferences and the fusion
            weights; MMRec's grid: 1e-5, 1e-4, 1e-3, 1e-2, 1e-1.
    """

    embedding_size: int
    n_layers: int
    aggr_mode: str
    user_knn_k: int
    user_fusion: str
    reg_weight: float


def sample_user_graph(neighbours: Tensor, counts: Tensor, n_found: Tensor,
                      generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
    """MMRec's per-epoch user graph: [n_users, k] neighbour ids and softmax weights, short lists
    padded by copying slot randint(0, t) into slot t; users without neighbours get weight 0.
    Drawn on the candidates' device, so ``generator`` (if given) must be on it too."""
    k, device = neighbours.shape[1], neighbours.device
    slot = torch.arange(k, device=device).repeat(len(n_found), 1)
    for t in range(1, k):
        short = ((n_found > 0) & (n_found <= t)).nonzero().squeeze(1)
        pick = torch.randint(0, t, (len(short),), generator=generator, device=device)
        slot[short, t] = slot[short, pick]
    weight = torch.softmax(counts.gather(1, slot), 1) * (n_found > 0).unsqueeze(1)
    return neighbours.gather(1, slot), weight


class ModalityEncoder(nn.Module):
    """User preferences and projected item features, propagated over the user-item graph."""

    def __init__(self, n_users: int, feat_dim: int, dim: int) -> None:
        super().__init__()
        self.preference = nn.Parameter(nn.init.xavier_normal_(torch.empty(n_users, dim)))
        self.mlp = nn.Sequential(nn.Linear(feat_dim, 4 * dim), nn.LeakyReLU(),
                                 nn.Linear(4 * dim, dim))

    def forward(self, features: Tensor, graph: Propagation, n_layers: int) -> Tensor:
        x = F.normalize(torch.cat([self.preference, self.mlp(features)]))
        out = h = x
        for _ in range(n_layers):
            h = graph(h)
            out = out + h
        return out


class DualGNN(Backbone):
    r"""The DualGNN model from the `"DualGNN: Dual Graph Neural Network for Multimedia
    Recommendation" <https://doi.org/10.1109/TMM.2021.3138298>`_ paper (Wang et al., IEEE
    Transactions on Multimedia 2023), as MMRec runs it (see the module docstring).

    Per modality :math:`m`, with :math:`\hat{A}` the normalised user-item graph,

    .. math::
        \mathbf{x}_m = \mathrm{normalize}\big([\mathbf{P}_m;
            \mathrm{MLP}_m(\mathbf{F}_m)]\big), \qquad
        \mathbf{r}_m = \sum_{l=0}^{L} \hat{A}^l \mathbf{x}_m;

    items are :math:`\sum_m \mathbf{r}_m`; users fuse their modality rows with learnt
    per-user weights, :math:`\mathbf{u} = w_{u0} \mathbf{r}_{\mathrm{image}}
    + w_{u1} \mathbf{r}_{\mathrm{text}}`, then add their user-graph neighbours,
    :math:`\mathbf{u} + \sum_j s_{uj} \mathbf{u}_j`. The loss is BPR (in log base 2) plus
    ``reg_weight`` times the L2 terms.

    """

    config_class = DualGNNConfig

    def __init__(self, data: InteractionData, config: DualGNNConfig,
                 device: torch.device = CPU) -> None:
        super().__init__(device)
        require_features(data, "DualGNN")
        if config.aggr_mode not in ("add", "mean"):
            raise ConfigError(f"aggr_mode must be 'add' or 'mean', got {config.aggr_mode!r}")
        if config.user_fusion not in ("mmrec", "weighted"):
            raise ConfigError(f"user_fusion must be 'mmrec' or 'weighted', got "
                              f"{config.user_fusion!r}")
        if config.user_knn_k < 1:
            raise ConfigError(f"user_knn_k must be at least 1, got {config.user_knn_k}")
        self.config = config
        self.n_users, self.n_items = data.n_users, data.n_items
        self.features = feature_tensors(data, device=self.device)
        self.init_text_fusion(data)
        self.encoders = nn.ModuleDict({
            m: ModalityEncoder(self.n_users, self.modality_dim(m), config.embedding_size)
            for m in self.features})
        self.fusion_weight: nn.Parameter | None = None  # per-user modality weights
        if len(self.encoders) == 2:
            self.fusion_weight = nn.Parameter(
                nn.init.xavier_normal_(torch.empty(self.n_users, 2)).softmax(1))

        users, items = train_edges(data, self.device)
        edges = bipartite_edge_index(users, items, self.n_users)
        adjacency = normalized_adjacency if config.aggr_mode == "add" else mean_adjacency
        self.graph = adjacency(edges, self.n_users + self.n_items)
        self.candidates = co_occurrence_neighbours(users, items, self.n_users, self.n_items,
                                                   config.user_knn_k)
        neighbours, weight = sample_user_graph(*self.candidates, None)
        self.register_buffer("user_neighbours", neighbours)
        self.register_buffer("user_neighbour_weights", weight)
        self._build_user_graph()
        self.register_load_state_dict_post_hook(lambda module, _: module._build_user_graph())

    def _build_user_graph(self) -> None:
        rows = torch.arange(self.n_users, device=self.device).repeat_interleave(
            self.config.user_knn_k)
        weight = self.user_neighbour_weights.reshape(-1)
        keep = weight > 0
        edges = torch.stack([rows[keep], self.user_neighbours.reshape(-1)[keep]])
        self.user_graph = fixed_propagation(edges, weight[keep], self.n_users)

    def pre_epoch(self, generator: torch.Generator) -> None:
        self.user_neighbours, self.user_neighbour_weights = sample_user_graph(*self.candidates,
                                                                              generator)
        self._build_user_graph()

    def propagate(self) -> tuple[Tensor, Tensor]:
        reps = {m: enc(self.modality(m), self.graph, self.config.n_layers)
                for m, enc in self.encoders.items()}
        items = sum(r[self.n_users:] for r in reps.values())
        if self.fusion_weight is None:
            users = next(iter(reps.values()))[:self.n_users]
        else:
            image, text = reps["image"][:self.n_users], reps["text"][:self.n_users]
            if self.config.user_fusion == "mmrec":
                image = image + text
            users = self.fusion_weight[:, :1] * image + self.fusion_weight[:, 1:] * text
        return users + self.user_graph(users), items

    def loss(self, users: Tensor, pos: Tensor, neg: Tensor) -> Tensor:
        u, i = self.propagate()
        loss = bpr_loss(u[users], i[pos], i[neg]) / math.log(2)
        reg = sum(enc.preference[users].square().mean() for enc in self.encoders.values())
        if self.fusion_weight is not None:
            reg = reg + self.fusion_weight.square().mean()
        return loss + self.config.reg_weight * reg
