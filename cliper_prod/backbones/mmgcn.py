"""MMGCN (Wei et al., 2019): one graph convolution network per modality over the user-item graph,
the modalities' outputs averaged; as MMRec runs it, which is not quite the paper.

Per modality (image features first pass a Linear to image_latent_dim, text as is, as MMRec):
  x_0    = L2-normalised rows of [user preferences ; item features]
  layer l: h       = lrelu(mean over graph neighbours of x_l W_l)       (paper Eq. 1)
           x_hat   = lrelu(Linear_l(x_l)) + e_id                        (Eq. 5, ID embeddings)
           x_{l+1} = lrelu(G_l([h | x_hat]))   (concat)   or   lrelu(G_l(h) + x_hat)
Tables: mean over modalities of x_L (users, then items). Loss: BPR + reg_weight * (mean e_id^2
over the batch's users and items + mean of the image preferences squared).

MMRec's effective behaviour is the default, so that accuracy can be compared with it:
- ``self.concate = 'False'`` is a non-empty string, hence true: the concatenating G_l runs
  (concat = true; false gives the additive form MMRec meant).
- Its GCN always runs three layers and never reads n_layers (2 in MMGCN.yaml): the preset says 3.
- The ID embeddings and the user preferences are plain tensors, not Parameters: they keep their
  random init and their regulariser is a constant. train_embeddings = true learns them (paper).
- Only the image preferences are regularised; aggregation is 'mean', hard-coded.
- Inits as MMRec's: Xavier-normal ID table, preferences, W_l, Linear_l and G_1 weights; torch
  defaults for the image Linear, G_2.. and biases.
- MMRec ranks with the table of the epoch's last training batch (one optimiser step old); the
  tables here come from the current weights.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cliper_prod.device import CPU
from cliper_prod.backbones.base import (Backbone, bpr_loss, feature_tensors, require_features,
                                        train_edges)
from cliper_prod.data.mmrec import InteractionData
from cliper_prod.errors import ConfigError
from cliper_prod.graph import Propagation, bipartite_edge_index, mean_adjacency


@dataclass(frozen=True)
class MMGCNConfig:
    """MMGCN's ``[model]`` hyper-parameters (``models/mmgcn.toml``: MMRec's defaults and
    effective behaviour).

    Args:
        embedding_size (int): Width of the ID embeddings and of every layer's output, hence of
            the served tables.
        n_layers (int): GCN layers per modality; 3, as MMRec's GCN always runs (its MMGCN.yaml
            says 2).
        image_latent_dim (int): Width of the Linear the image features pass first (MMRec: 256);
            0 uses the raw features.
        text_latent_dim (int): The same for the text features (MMRec: 0, used as they are).
        concat (bool): ``G_l([h | x_hat])`` when true, as MMRec's truthy ``concate = 'False'``
            runs; false gives the additive ``G_l(h) + x_hat`` it meant.
        train_embeddings (bool): Train the ID embeddings and user preferences (the paper);
            MMRec leaves them at their random init (false).
        reg_weight (float): Weight of the L2 term on the batch's ID embeddings and the image
            preferences; MMRec's grid: 0, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1.
    """

    embedding_size: int
    n_layers: int
    image_latent_dim: int
    text_latent_dim: int
    concat: bool
    train_embeddings: bool
    reg_weight: float


def random_table(module: nn.Module, name: str, rows: int, dim: int, trainable: bool) -> None:
    """A Xavier-normal table, learnt or frozen; a frozen one is still saved (scores use it)."""
    table = nn.init.xavier_normal_(torch.empty(rows, dim))
    if trainable:
        module.register_parameter(name, nn.Parameter(table))
    else:
        module.register_buffer(name, table)


class ModalityGCN(nn.Module):
    """One modality's MMGCN: user preferences and item features through n_layers layers."""

    def __init__(self, n_users: int, feat_dim: int, latent_dim: int, config: MMGCNConfig) -> None:
        super().__init__()
        self.concat = config.concat
        self.project = nn.Linear(feat_dim, latent_dim) if latent_dim else None
        width, dim = latent_dim or feat_dim, config.embedding_size
        random_table(self, "preference", n_users, width, config.train_embeddings)
        self.conv = nn.ParameterList()
        self.linear = nn.ModuleList()
        self.gate = nn.ModuleList()
        for layer in range(config.n_layers):
            self.conv.append(nn.Parameter(nn.init.xavier_normal_(torch.empty(width, width))))
            self.linear.append(nn.Linear(width, dim))
            nn.init.xavier_normal_(self.linear[-1].weight)
            self.gate.append(nn.Linear(width + dim if config.concat else width, dim))
            if layer == 0:
                nn.init.xavier_normal_(self.gate[-1].weight)
            width = dim

    def forward(self, features: Tensor, graph: Propagation, id_embedding: Tensor) -> Tensor:
        if self.project is not None:
            features = self.project(features)
        x = F.normalize(torch.cat([self.preference, features]))
        for weight, linear, gate in zip(self.conv, self.linear, self.gate):
            h = F.leaky_relu(graph(x @ weight))
            x_hat = F.leaky_relu(linear(x)) + id_embedding
            x = F.leaky_relu(gate(torch.cat([h, x_hat], 1)) if self.concat else gate(h) + x_hat)
        return x


class MMGCN(Backbone):
    r"""The MMGCN model from the `"MMGCN: Multi-modal Graph Convolution Network for Personalized
    Recommendation of Micro-video" <https://doi.org/10.1145/3343031.3351034>`_ paper (Wei et al.,
    ACM MM 2019), as MMRec runs it (see the module docstring).

    Per modality :math:`m`, starting from the L2-normalised rows
    :math:`\mathbf{x}^{(0)} = [\mathbf{P}_m; \mathbf{F}_m]` of the user preferences and item
    features, each layer :math:`l` computes

    .. math::
        \mathbf{h} = \sigma\big(\mathrm{mean}_{j \in \mathcal{N}(i)}
            \mathbf{x}^{(l)}_j W_l\big), \qquad
        \hat{\mathbf{x}} = \sigma\big(\mathrm{Linear}_l(\mathbf{x}^{(l)})\big)
            + \mathbf{e}_{\mathrm{id}}, \qquad
        \mathbf{x}^{(l+1)} = \sigma\big(G_l([\mathbf{h} \,|\, \hat{\mathbf{x}}])\big),

    :math:`\sigma` the leaky ReLU; the tables are the mean over modalities of
    :math:`\mathbf{x}^{(L)}`, trained with BPR plus ``reg_weight`` times the L2 terms.

    """

    config_class = MMGCNConfig

    def __init__(self, data: InteractionData, config: MMGCNConfig,
                 device: torch.device = CPU) -> None:
        super().__init__(device)
        require_features(data, "MMGCN")
        if config.n_layers < 1:
            raise ConfigError(f"n_layers must be at least 1, got {config.n_layers}")
        self.config = config
        self.n_users, self.n_items = data.n_users, data.n_items
        random_table(self, "id_embedding", self.n_users + self.n_items, config.embedding_size,
                     config.train_embeddings)
        self.features = feature_tensors(data, device=self.device)
        self.init_text_fusion(data)
        self.gcns = nn.ModuleDict()
        for modality in self.features:
            latent = config.image_latent_dim if modality == "image" else config.text_latent_dim
            self.gcns[modality] = ModalityGCN(self.n_users, self.modality_dim(modality), latent,
                                              config)
        users, items = train_edges(data, self.device)
        self.graph = mean_adjacency(bipartite_edge_index(users, items, self.n_users),
                                    self.n_users + self.n_items)

    def _embed(self) -> Tensor:
        out = [gcn(self.modality(m), self.graph, self.id_embedding) for m, gcn in
               self.gcns.items()]
        return torch.stack(out).mean(0)

    def propagate(self) -> tuple[Tensor, Tensor]:
        out = self._embed()
        return out[:self.n_users], out[self.n_users:]

    def loss(self, users: Tensor, pos: Tensor, neg: Tensor) -> Tensor:
        out = self._embed()
        pos, neg = pos + self.n_users, neg + self.n_users
        loss = bpr_loss(out[users], out[pos], out[neg])
        ids = self.id_embedding
        reg = ids[users].square().mean() + (ids[pos].square().mean()
                                            + ids[neg].square().mean()) / 2
        if "image" in self.gcns:
            reg = reg + self.gcns["image"].preference.square().mean()
        return loss + self.config.reg_weight * reg
